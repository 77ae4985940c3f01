//! Namespace operations: names, directory IVs, lookups, creating, removing
//! and renaming entries in the backing directory.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use fuser::{Errno, FileAttr, FileType};
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags, Stat};

use super::KmsFs;
use super::atime;
use super::attr::{FsResult, errno, io_errno, to_attr};
use super::inodes::{Node, file_type};
use crate::crypto::{BlockCipher, Layout, random_array};
use crate::util::hex;
use crate::util::lock;
use crate::volume::content;
use crate::volume::layout::{self, BackingName, DIR_IV_FILE, DirIv, NAME_MAX, TEMP_PREFIX};
use crate::volume::namespace;

/// One entry of a directory listing snapshot.
pub struct DirEntry {
    pub name: OsString,
    /// Its name in the backing directory: readdirplus looks entries up by
    /// it, without encrypting every name again.
    pub backing: String,
    pub ino: u64,
    pub kind: FileType,
}

impl KmsFs {
    pub(super) fn dir_iv(&self, dir: &Node) -> FsResult<DirIv> {
        if let Some(iv) = dir.state().dir_iv.get() {
            return Ok(*iv);
        }
        let iv = namespace::read_dir_iv(dir.fd()?.as_fd()).map_err(|e| {
            log::error!("directory {}: {e}", self.describe(dir));
            Errno::EIO
        })?;
        Ok(*dir.state().dir_iv.get_or_init(|| iv))
    }

    pub(super) fn backing_name(&self, parent: &Node, name: &OsStr) -> FsResult<BackingName> {
        let bytes = name.as_bytes();
        if bytes.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let iv = self.dir_iv(parent)?;
        Ok(layout::backing_name(self.volume.names(), &iv, bytes))
    }

    pub(super) fn write_sidecar(&self, parent: &Node, name: &BackingName) -> FsResult<()> {
        namespace::write_sidecar(parent.fd()?.as_fd(), name).map_err(|e| io_errno(&e))
    }

    pub(super) fn remove_sidecar(&self, parent: &Node, name: &BackingName) {
        let removed = parent
            .fd()
            .map_err(|e| std::io::Error::from_raw_os_error(e.code()))
            .and_then(|pfd| namespace::remove_sidecar(pfd.as_fd(), name));
        if let Err(e) = removed {
            log::warn!("removing long-name sidecar in {}: {e}", self.describe(parent));
        }
    }

    /// Looks up `backing` in `parent`, registering the lookup.
    pub(super) fn lookup_backing(&self, parent: &Node, backing: &str) -> FsResult<(Arc<Node>, FileAttr)> {
        self.lookup_new(parent, backing, None)
    }

    /// As `lookup_backing`; a file just made here comes with its cipher.
    fn lookup_new(
        &self,
        parent: &Node,
        backing: &str,
        made: Option<Arc<BlockCipher>>,
    ) -> FsResult<(Arc<Node>, FileAttr)> {
        let fd = rustix::fs::openat(
            parent.fd()?.as_fd(),
            backing,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        let st = rustix::fs::fstat(&fd).map_err(errno)?;
        let node = self.inodes.remember(fd, &st);
        if let Some(cipher) = made {
            if let Err(e) = self.claim_id(&node, cipher.file_id()) {
                self.forget_node(node.ino, 1);
                return Err(e);
            }
            *lock(&node.state().cipher) = Some(cipher);
            node.mark_verified_empty(); // made here: its empty final block is ours
        } else if self.reads_checks_ahead(&st, &node) {
            let taken = self.take_authenticated_ahead(parent, &node, &st);
            self.checks_ahead.checking(parent, st.st_ino, taken);
        } else if self.options.prefetch_files > 0 && file_type(st.st_mode as u32) == FileType::Directory {
            let parent_fd = || parent.fd().ok().and_then(|fd| rustix::io::dup(fd.as_fd()).ok());
            self.ivs_ahead.subdirectory_looked_up(parent.ino, parent_fd);
        }
        match self.attr_of(&node, &st) {
            Ok(attr) => Ok((node, attr)),
            Err(e) => {
                self.forget_node(node.ino, 1); // the kernel gets no entry to forget
                Err(e)
            }
        }
    }

    pub(super) fn lookup(&self, parent: &Node, name: &OsStr) -> FsResult<(Arc<Node>, FileAttr)> {
        let backing = self.backing_name(parent, name)?;
        self.lookup_backing(parent, backing.as_str())
    }

    /// Whether `node`, just looked up, is an empty file about to be checked
    /// whose check counts towards reading others ahead (check_ahead.rs;
    /// `prefetch=0` turns off reading ahead of any kind).
    fn reads_checks_ahead(&self, st: &Stat, node: &Node) -> bool {
        self.options.prefetch_files > 0
            && st.st_size as u64 == content::EMPTY_FILE_LEN
            && file_type(st.st_mode as u32) == FileType::RegularFile
            && self.volume.layout() == Layout::Sealed
            && !node.is_verified_empty()
    }

    pub(super) fn attr_of(&self, node: &Node, st: &Stat) -> FsResult<FileAttr> {
        // The size shown, where it is not the stored one's plaintext size.
        let size = match file_type(st.st_mode as u32) {
            FileType::Symlink => Some(self.read_link(node)?.len() as u64),
            FileType::RegularFile => self.damaged_size(node, st.st_size as u64),
            _ => None,
        };
        let mut attr = to_attr(node.ino, st, size);
        // Names answered removed and not yet removed (removals.rs) no longer count.
        attr.nlink = attr.nlink.saturating_sub(self.removals.names_going(node.ino));
        Ok(attr)
    }

    pub(super) fn stat_attr(&self, node: &Node) -> FsResult<FileAttr> {
        let st = rustix::fs::fstat(node.fd()?.as_fd()).map_err(errno)?;
        self.attr_of(node, &st)
    }

    /// Gives a new entry to the calling user, as the kernel would have.
    fn set_owner(&self, parent: &Node, backing: &str, uid: u32, gid: u32) -> FsResult<()> {
        if !rustix::process::geteuid().is_root() {
            return Ok(());
        }
        let parent_st = rustix::fs::fstat(parent.fd()?.as_fd()).map_err(errno)?;
        let gid = if parent_st.st_mode as u32 & libc::S_ISGID != 0 {
            parent_st.st_gid
        } else {
            gid
        };
        rustix::fs::chownat(
            parent.fd()?.as_fd(),
            backing,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(errno)
    }

    /// Gives a new entry, just looked up as `node` with `attr`, to the
    /// calling user unless it is theirs already (a root caller's, usually:
    /// then no chown and no stat of the parent).
    fn settle_owner(
        &self,
        parent: &Node,
        backing: &str,
        node: &Node,
        attr: FileAttr,
        owner: (u32, u32),
    ) -> FsResult<FileAttr> {
        if (attr.uid, attr.gid) == owner {
            return Ok(attr);
        }
        let settled = self
            .set_owner(parent, backing, owner.0, owner.1)
            .and_then(|()| self.stat_attr(node));
        if settled.is_err() {
            self.forget_node(node.ino, 1); // the kernel never hears of it
        }
        settled
    }

    /// Creates a regular file, fifo, socket or device node (`rdev`); returns
    /// the open descriptor for regular files.
    pub(super) fn make_node(
        &self,
        parent: &Node,
        name: &OsStr,
        mode: u32,
        rdev: u32,
        owner: (u32, u32),
        open_flags: Option<OFlags>,
    ) -> FsResult<(Arc<Node>, FileAttr, Option<OwnedFd>)> {
        let backing = self.backing_name(parent, name)?;
        self.write_sidecar(parent, &backing)?;
        let perm = Mode::from_raw_mode(mode & 0o7777);
        let b = backing.as_str();
        let pfd = parent.fd()?;
        let mknod = |kind, dev| rustix::fs::mknodat(pfd.as_fd(), b, kind, perm, dev).map_err(errno);
        let created = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => self
                .create_regular(pfd.as_fd(), b, perm, open_flags.unwrap_or(OFlags::RDWR))
                .map(|(fd, cipher)| (open_flags.map(|_| fd), cipher)),
            libc::S_IFIFO => mknod(rustix::fs::FileType::Fifo, 0).map(|()| (None, None)),
            libc::S_IFSOCK => mknod(rustix::fs::FileType::Socket, 0).map(|()| (None, None)),
            // Stored as what they are: the backing filesystem keeps the
            // device number. The mount is nodev unless `-o dev`.
            libc::S_IFCHR => mknod(rustix::fs::FileType::CharacterDevice, u64::from(rdev)).map(|()| (None, None)),
            libc::S_IFBLK => mknod(rustix::fs::FileType::BlockDevice, u64::from(rdev)).map(|()| (None, None)),
            _ => Err(Errno::EPERM),
        };
        let (fd, cipher) = match created {
            Ok(made) => made,
            Err(e) => {
                if e != Errno::EEXIST {
                    self.remove_sidecar(parent, &backing);
                }
                return Err(e);
            }
        };
        let (node, attr) = self.lookup_new(parent, b, cipher)?;
        let attr = self.settle_owner(parent, b, &node, attr, owner)?;
        Ok((node, attr, fd))
    }

    pub(super) fn make_dir(
        &self,
        parent: &Node,
        name: &OsStr,
        mode: u32,
        owner: (u32, u32),
    ) -> FsResult<(Arc<Node>, FileAttr)> {
        let backing = self.backing_name(parent, name)?;
        // Build the directory, IV included, under a temporary name and move it
        // into place: a crash never leaves a directory without its IV.
        let tmp = format!("{TEMP_PREFIX}{}", hex(&random_array::<8>()));
        rustix::fs::mkdirat(parent.fd()?.as_fd(), tmp.as_str(), Mode::from_raw_mode(0o700)).map_err(errno)?;
        let result = (|| {
            let dir = rustix::fs::openat(
                parent.fd()?.as_fd(),
                tmp.as_str(),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno)?;
            namespace::create_dir_iv(dir.as_fd()).map_err(|e| io_errno(&e))?;
            self.set_owner(parent, &tmp, owner.0, owner.1)?;
            // A directory made in a set-group-ID directory is one too, as
            // the kernel's inode_init_owner makes it on a disk filesystem.
            let parent_mode = rustix::fs::fstat(parent.fd()?.as_fd()).map_err(errno)?.st_mode as u32;
            let inherited = if parent_mode & libc::S_ISGID != 0 {
                libc::S_ISGID
            } else {
                0
            };
            rustix::fs::fchmod(&dir, Mode::from_raw_mode((mode | inherited) & 0o7777)).map_err(errno)?;
            self.write_sidecar(parent, &backing)?;
            rustix::fs::renameat_with(
                parent.fd()?.as_fd(),
                tmp.as_str(),
                parent.fd()?.as_fd(),
                backing.as_str(),
                RenameFlags::NOREPLACE,
            )
            .map_err(errno)
        })();
        if let Err(e) = result {
            let _ = rustix::fs::unlinkat(
                parent.fd()?.as_fd(),
                format!("{tmp}/{DIR_IV_FILE}").as_str(),
                AtFlags::empty(),
            );
            let _ = rustix::fs::unlinkat(parent.fd()?.as_fd(), tmp.as_str(), AtFlags::REMOVEDIR);
            return Err(e);
        }
        self.lookup_backing(parent, backing.as_str())
    }

    pub(super) fn make_symlink(
        &self,
        parent: &Node,
        name: &OsStr,
        target: &[u8],
        owner: (u32, u32),
    ) -> FsResult<(Arc<Node>, FileAttr)> {
        let backing = self.backing_name(parent, name)?;
        if target.len() >= libc::PATH_MAX as usize {
            return Err(Errno::ENAMETOOLONG);
        }
        let stored = self.volume.encrypt_link_target(target).map_err(|e| {
            log::error!("storing a long symlink target: {e}");
            Errno::EIO
        })?;
        self.write_sidecar(parent, &backing)?;
        if let Err(e) = rustix::fs::symlinkat(stored.as_str(), parent.fd()?.as_fd(), backing.as_str()) {
            if e != rustix::io::Errno::EXIST {
                self.remove_sidecar(parent, &backing);
            }
            self.volume.forget_link_target(stored.as_bytes());
            return Err(errno(e));
        }
        let (node, attr) = self.lookup_backing(parent, backing.as_str())?;
        let attr = self.settle_owner(parent, backing.as_str(), &node, attr, owner)?;
        Ok((node, attr))
    }

    pub(super) fn read_link(&self, node: &Node) -> FsResult<Vec<u8>> {
        let stored = rustix::fs::readlinkat(node.fd()?.as_fd(), "", Vec::new()).map_err(errno)?;
        self.volume.decrypt_link_target(stored.as_bytes()).map_err(|e| {
            log::error!("symlink {}: target does not decrypt ({e})", self.describe(node));
            Errno::EIO
        })
    }

    pub(super) fn make_link(&self, node: &Node, new_parent: &Node, new_name: &OsStr) -> FsResult<FileAttr> {
        let backing = self.backing_name(new_parent, new_name)?;
        self.write_sidecar(new_parent, &backing)?;
        if let Err(e) = rustix::fs::linkat(
            node.fd()?.as_fd(),
            "",
            new_parent.fd()?.as_fd(),
            backing.as_str(),
            AtFlags::EMPTY_PATH,
        ) {
            if e != rustix::io::Errno::EXIST {
                self.remove_sidecar(new_parent, &backing);
            }
            return Err(errno(e));
        }
        self.inodes.add_lookup(node);
        self.stat_attr(node)
    }

    /// Decrypted listing of a directory, taken at opendir time.
    pub(super) fn list_dir(&self, dir: &Node) -> FsResult<Vec<DirEntry>> {
        let iv = self.dir_iv(dir)?;
        let dir_fd = dir.fd()?;
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = atime::open_with(self.listing_flags(), flags, |f| {
            rustix::fs::openat(dir_fd.as_fd(), ".", f, Mode::empty())
        })
        .map_err(errno)?;
        let mut entries = rustix::fs::Dir::read_from(&fd).map_err(errno)?;
        let mut out = Vec::new();
        // One log line per listing, not per name: a backing directory full
        // of foreign names must not fill the log.
        let mut hidden = 0usize;
        let mut first_hidden = None;
        while let Some(entry) = entries.read() {
            let entry = entry.map_err(errno)?;
            let raw = entry.file_name().to_bytes();
            let Some(decrypted) = namespace::plain_name(self.volume.names(), fd.as_fd(), &iv, raw) else {
                continue;
            };
            match decrypted {
                Ok(name) => out.push(DirEntry {
                    name: OsString::from(std::ffi::OsStr::from_bytes(&name)),
                    // Names that decrypt are ASCII (base64url, or a hashed long name).
                    backing: String::from_utf8_lossy(raw).into_owned(),
                    ino: self.inodes.fuse_ino(entry.ino()),
                    kind: fuse_kind(entry.file_type()),
                }),
                Err(e) => {
                    hidden += 1;
                    first_hidden.get_or_insert_with(|| format!("{:?} ({e})", String::from_utf8_lossy(raw)));
                }
            }
        }
        if let Some(first) = first_hidden {
            log::warn!(
                "directory {}: names that do not decrypt, hidden: {hidden} (the first: {first})",
                self.describe(dir)
            );
        }
        Ok(out)
    }

    /// The backing path of a node, for log lines.
    pub(super) fn describe(&self, node: &Node) -> String {
        node.fd()
            .ok()
            .and_then(|fd| std::fs::read_link(fd.proc_path()).ok())
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("inode {}", node.ino))
    }

    pub(super) fn io_error(&self, node: &Node, what: &str, e: &std::io::Error) -> Errno {
        if !super::space::is_full(e) {
            log::warn!("{what} on {}: {e}", self.describe(node));
        } else if let Some(unlogged) = self.space.log_full_error() {
            let since = match unlogged {
                0 => String::new(),
                n => format!(" ({n} more such errors since the last one logged)"),
            };
            log::warn!("{what} on {}: {e}{since}", self.describe(node));
        }
        io_errno(e)
    }
}

fn fuse_kind(t: rustix::fs::FileType) -> FileType {
    match t {
        rustix::fs::FileType::Directory => FileType::Directory,
        rustix::fs::FileType::Symlink => FileType::Symlink,
        rustix::fs::FileType::Fifo => FileType::NamedPipe,
        rustix::fs::FileType::Socket => FileType::Socket,
        rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
        rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}
