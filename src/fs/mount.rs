//! Mount options and mounting.

use std::io;
use std::path::Path;
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use fuser::{Config, InitFlags, KernelConfig, MountOption, SessionACL};

use super::mounted::Mounted;
use super::prefetch;
use super::workers::WorkerPool;
use super::{KmsFs, MAX_WRITE, bdi};

/// How long the kernel keeps a volume's entries and attributes by default.
/// Every change to a mounted volume goes through the daemon, which holds the
/// volume lock, so what the kernel learnt stays true (a write that clears
/// set-ID bits is announced: see `KmsFs::attributes_changed`); a short TTL only makes
/// it ask again (a LOOKUP of each directory along a path once it expired:
/// a third of an extraction's LOOKUPs at 1 s). securefs uses 30 s too.
pub const VOLUME_ATTR_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the kernel keeps a reverse view's entries and attributes by
/// default: the plaintext directory under a view changes behind it, and a
/// backup must see a change soon after it was made (gocryptfs `-reverse`
/// uses 1 s too).
pub const VIEW_ATTR_TIMEOUT: Duration = Duration::from_secs(1);

/// How the daemon serves the mount: the kernel caches it asks for (every
/// change goes through the daemon, so the kernel's view can only go stale
/// if the backing directory is changed behind the mount's back, which is
/// unsupported), the requests it takes, and what it keeps of POSIX.
#[derive(Debug, Clone, Copy)]
pub struct FsOptions {
    /// Entry and attribute TTL (`attr_timeout=`): [`VOLUME_ATTR_TIMEOUT`]
    /// unless given.
    pub ttl: Duration,
    /// The kernel writeback cache: writes land in the page cache and reach
    /// the daemon in large batches, at the latest on close or fsync.
    pub writeback: bool,
    /// Keep a file's page cache across opens (FOPEN_KEEP_CACHE).
    pub keep_cache: bool,
    /// Let the kernel keep directory listings (FOPEN_CACHE_DIR): a listing
    /// read again is served from the kernel until the directory changes.
    /// Safe because the daemon is the backing directory's only writer.
    pub cache_dir: bool,
    /// Have the kernel send OPEN and RELEASE for regular files. Without
    /// them it opens files by itself, so nobody but the kernel checks the
    /// access mode: only safe when the kernel checks permissions
    /// (default_permissions) or the daemon runs as root (whom the backing
    /// filesystem lets open anything anyway).
    pub open_requests: bool,
    /// Serve extended attributes. Without (`noxattr`, as gocryptfs's
    /// `-noxattr`), the first xattr request of each kind is answered ENOSYS
    /// and the kernel answers the rest with EOPNOTSUPP itself: no more
    /// GETXATTR round trips for `security.capability` before writes and
    /// chowns, or for the SELinux label and ACL `ls -l` asks for.
    pub xattrs: bool,
    /// Files of a directory asked for ahead of the one being read in
    /// listing order (`prefetch=N`, 0 turns it off; see prefetch.rs).
    pub prefetch_files: usize,
    /// Below this much free space on the backing filesystem, files created
    /// are written through (`write_through_below=MIB`; see space.rs).
    pub write_through_below: u64,
    /// Reads the daemon serves move a file's access time (not `noatime`);
    /// see atime.rs.
    pub file_atime: bool,
    /// Listings move a directory's access time (not `noatime`/`nodiratime`).
    pub dir_atime: bool,
    /// POSIX ACLs (`acl`; on with `allow_other` and `default_permissions`
    /// unless `noacl`): the kernel enforces them, the daemon stores them as
    /// encrypted xattrs and inherits default ACLs (see acl.rs).
    pub posix_acl: bool,
    /// Answer unlinks before removing the backing file (`deferred_unlink`;
    /// never with `dirsync` or `sync`; see removals.rs).
    pub deferred_removal: bool,
    /// Set-ID bits take effect at `exec` (`suid`): the kernel then clears
    /// them on write itself, before the data (see `KmsFs::negotiate`).
    pub set_id_exec: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            ttl: VOLUME_ATTR_TIMEOUT,
            writeback: true,
            keep_cache: true,
            cache_dir: false,
            open_requests: true,
            xattrs: true,
            prefetch_files: prefetch::DEFAULT_WINDOW,
            write_through_below: 256 << 20,
            file_atime: true,
            dir_atime: true,
            posix_acl: false,
            deferred_removal: false,
            set_id_exec: false,
        }
    }
}

/// How to mount: the `-o` options a user gives.
#[derive(Debug, Clone, Default)]
pub struct MountOptions {
    pub read_only: bool,
    pub allow_other: bool,
    /// Let the kernel check permissions (always on with `allow_other`).
    pub default_permissions: bool,
    pub fsname: Option<String>,
    /// Mount over a directory that is not empty (or is a mount point).
    pub nonempty: bool,
    /// Threads reading requests from the kernel (`threads=`).
    pub threads: usize,
    /// Threads for fsync and fsyncdir (`sync_threads=`).
    pub sync_threads: usize,
    pub fs: FsOptions,
    /// The kernel's writeback and readahead limits for this mount.
    pub bdi: bdi::BdiTuning,
    /// Further kernel mount flags (`noexec`, `nosuid`, `noatime` …).
    pub kernel: Vec<MountOption>,
    /// Unmount after this long without a request naming a file (`idle=`).
    pub idle: Option<Duration>,
    /// After SIGTERM, how long a busy mount is retried before it is
    /// detached (`lazy_unmount_after=`; the daemon's default otherwise).
    pub lazy_unmount_after: Option<Duration>,
}

/// Mounts the filesystem; the returned session serves requests when run.
pub fn mount(fs: KmsFs, mountpoint: &Path, options: &MountOptions) -> io::Result<fuser::Session<Mounted>> {
    let config = session_config(fs.volume.backing(), options);
    let fs = Arc::new(fs);
    let mounted = Mounted {
        fs: Arc::clone(&fs),
        syncs: WorkerPool::new("sync", options.sync_threads, usize::MAX)?,
        // One thread: its jobs only start reads. At most a few sequential
        // readers' worth of jobs wait; beyond that advice is dropped.
        prefetches: WorkerPool::new("ahead", 1, 32)?,
        // One thread: removals are short, and their number is bounded by
        // PendingRemovals (beyond it, unlinks remove before replying).
        removals: WorkerPool::new("remove", 1, usize::MAX)?,
    };
    let session = fuser::Session::new(mounted, mountpoint, &config)?;
    let _ = fs.notifier.set(session.notifier());
    Ok(session)
}

/// The kernel's side of a kmsfs mount of `source` (forward or reverse).
pub(crate) fn session_config(source: &Path, options: &MountOptions) -> Config {
    let mut config = Config::default();
    let fsname = options.fsname.clone().unwrap_or_else(|| source.display().to_string());
    config.mount_options = vec![MountOption::FSName(fsname)];
    // A root daemon mounts with mount(2) itself, where the subtype must be a
    // kernel option to make the type "fuse.kmsfs"; fusermount3 takes it as is.
    config.mount_options.push(if rustix::process::geteuid().is_root() {
        MountOption::CUSTOM("subtype=kmsfs".into())
    } else {
        MountOption::Subtype("kmsfs".into())
    });
    // nodev and nosuid unless asked otherwise: a device node or set-ID file
    // is only as trustworthy as the backing directory it came from.
    if !options.kernel.contains(&MountOption::Dev) {
        config.mount_options.push(MountOption::NoDev);
    }
    if !options.kernel.contains(&MountOption::Suid) {
        config.mount_options.push(MountOption::NoSuid);
    }
    // Other users reach the files only through the kernel's permission
    // checks. Without allow_other only the daemon's own user can, and the
    // daemon acts with that user's rights: the checks would change nothing
    // but cost a GETATTR of the parent before every create and unlink (the
    // kernel drops the directory's cached attributes on each change).
    if options.allow_other || options.default_permissions || options.fs.posix_acl {
        config.mount_options.push(MountOption::DefaultPermissions);
    }
    if options.read_only {
        config.mount_options.push(MountOption::RO);
    }
    config.mount_options.extend(options.kernel.iter().cloned());
    if options.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;
    config
}

/// Descriptors cached for nodes: a quarter of what the process may open,
/// or KMSFS_FD_CACHE.
pub(super) fn fd_cache_capacity() -> usize {
    if let Some(n) = std::env::var("KMSFS_FD_CACHE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        return n.max(8);
    }
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1024);
    (soft / 4).clamp(8, 16384) as usize
}

impl KmsFs {
    /// What kmsfs asks of the kernel at INIT: request sizes and the
    /// capabilities behind the levers in DESIGN.md.
    pub(super) fn negotiate(&self, config: &mut KernelConfig) {
        if let Err(limit) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(limit);
        }
        // The kernel caps this at what it offered; read_ahead_kb (bdi.rs) raises it after mounting.
        if let Err(limit) = config.set_max_readahead(MAX_WRITE) {
            let _ = config.set_max_readahead(limit);
        }
        // Room for the writeback cache's and readahead's requests in flight.
        let _ = config.set_max_background(64);
        let mut wanted = vec![
            // Every READDIR is a READDIRPLUS (no _AUTO): with the automatic
            // mode the kernel asks for attributes only in a directory's first
            // batch, and a `find | xargs cat` then costs a LOOKUP per file.
            (InitFlags::FUSE_DO_READDIRPLUS, "readdirplus"),
            (InitFlags::FUSE_PARALLEL_DIROPS, "parallel directory operations"),
        ];
        // Where set-ID bits take effect the kernel clears them itself, with
        // a SETATTR under the inode lock before the data is written: cleared
        // by the daemon, with the data, an `exec` that had just checked the
        // cached mode could still run the new content with the old bits.
        if !self.options.set_id_exec {
            wanted.push((InitFlags::FUSE_HANDLE_KILLPRIV_V2, "clearing set-ID bits in the daemon"));
        }
        if self.options.writeback {
            wanted.push((InitFlags::FUSE_WRITEBACK_CACHE, "the writeback cache"));
        }
        if self.options.posix_acl && self.options.xattrs {
            // DONT_MASK: the umask is not for the kernel to apply where a
            // default ACL replaces it (acl.rs applies one or the other).
            wanted.push((InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK, "POSIX ACLs"));
        }
        for (flags, what) in wanted {
            match config.add_capabilities(flags) {
                Ok(()) => log::debug!("kernel: using {what}"),
                Err(_) => log::info!("kernel does not offer {what}; going without"),
            }
            if flags == InitFlags::FUSE_HANDLE_KILLPRIV_V2 {
                self.kill_suidgid
                    .store(config.capabilities().contains(flags), Ordering::Relaxed);
            }
            if flags.contains(InitFlags::FUSE_POSIX_ACL) {
                self.acl_on
                    .store(config.capabilities().contains(flags), Ordering::Relaxed);
            }
        }
    }
}
