//! Mount options and mounting.

use std::io;
use std::path::Path;
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL};

use super::{KmsFs, bdi};

/// The kernel caches kmsfs asks for; every change goes through the daemon,
/// so the kernel's view can only go stale if the backing directory is
/// changed behind the mount's back (which is unsupported).
#[derive(Debug, Clone, Copy)]
pub struct CacheOptions {
    /// Entry and attribute TTL (`attr_timeout=`).
    pub ttl: Duration,
    /// The kernel writeback cache: writes land in the page cache and reach
    /// the daemon in large batches, at the latest on close or fsync.
    pub writeback: bool,
    /// Keep a file's page cache across opens (FOPEN_KEEP_CACHE).
    pub keep_cache: bool,
    /// Have the kernel send OPEN and RELEASE for regular files. Without
    /// them it opens files by itself, so nobody but the kernel checks the
    /// access mode: only safe when the kernel checks permissions
    /// (default_permissions) or the daemon runs as root (whom the backing
    /// filesystem lets open anything anyway).
    pub open_requests: bool,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            ttl: Duration::from_secs(1),
            writeback: true,
            keep_cache: true,
            open_requests: true,
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
    pub threads: usize,
    pub cache: CacheOptions,
    /// The kernel's writeback and readahead limits for this mount.
    pub bdi: bdi::BdiTuning,
    /// Further kernel mount flags (`noexec`, `nosuid`, `noatime` …).
    pub kernel: Vec<MountOption>,
}

/// Mounts the filesystem; the returned session serves requests when run.
pub fn mount(fs: KmsFs, mountpoint: &Path, options: &MountOptions) -> io::Result<fuser::Session<KmsFs>> {
    let mut config = Config::default();
    let fsname = options
        .fsname
        .clone()
        .unwrap_or_else(|| fs.volume.backing().display().to_string());
    config.mount_options = vec![
        MountOption::FSName(fsname),
        MountOption::Subtype("kmsfs".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    // Other users reach the files only through the kernel's permission
    // checks. Without allow_other only the daemon's own user can, and the
    // daemon acts with that user's rights: the checks would change nothing
    // but cost a GETATTR of the parent before every create and unlink (the
    // kernel drops the directory's cached attributes on each change).
    if options.allow_other || options.default_permissions {
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
    fuser::Session::new(fs, mountpoint, &config)
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
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the stack value.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    };
    (soft / 4).clamp(8, 16384) as usize
}
