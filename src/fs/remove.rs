//! Names going away: unlink, rmdir and rename over an existing name. The
//! inode losing its last name is pinned while the kernel still knows it,
//! its data key is crypto-shredded and a symlink target kept in the DB is
//! erased; a directory's IV is set aside so the backing rmdir can proceed.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use fuser::{Errno, FileType};
use rustix::fs::{AtFlags, OFlags, RenameFlags, Stat};

use super::KmsFs;
use super::atime;
use super::attr::{FsResult, errno, io_errno};
use super::inodes::{Node, file_type};
use super::removals::Ticket;
use crate::volume::header::HEADER_LEN;
use crate::volume::layout::BackingName;
use crate::volume::namespace;

/// What becomes garbage when an inode loses its last name.
#[derive(Default)]
struct Orphans {
    /// A file the kernel still knows (it may be open): its key is erased
    /// once the kernel forgets it, so open descriptors keep reading it.
    held: Option<Arc<Node>>,
    /// A file the kernel does not know: its key is erased now, by the id in
    /// the header behind this descriptor (read off the request path).
    header_of: Option<OwnedFd>,
    /// A symlink target kept in the DB (see `LONG_LINK_PREFIX`).
    long_link_target: Option<Vec<u8>>,
}

impl KmsFs {
    /// Called with the stat of a name about to be removed or replaced, read
    /// once: pins the inode if this is its last name and the kernel knows it
    /// (so its number is not reused meanwhile), and returns what becomes
    /// garbage once the name is gone.
    fn before_last_name_goes(&self, parent: &Node, backing: &str, st: &Stat) -> Orphans {
        let kind = file_type(st.st_mode as u32);
        let mut orphans = Orphans::default();
        if st.st_nlink > 1 && kind != FileType::Directory {
            return orphans;
        }
        let known_node = self.inodes.get(self.inodes.fuse_ino(st.st_ino as u64));
        if let Some(node) = &known_node {
            node.pin();
        }
        let Ok(pfd) = parent.fd() else { return orphans };
        match kind {
            FileType::RegularFile => match known_node {
                Some(node) => orphans.held = Some(node),
                // A file shorter than a header has none, and so no key. The
                // inode is cached after the stat: opening it reads nothing from
                // disk. Never waiting on a FIFO swapped in since the stat.
                None if st.st_size >= HEADER_LEN as i64 => {
                    orphans.header_of = namespace::openat_quietly(
                        pfd.as_fd(),
                        backing,
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
                    )
                    .ok();
                }
                None => {}
            },
            FileType::Symlink => {
                orphans.long_link_target = rustix::fs::readlinkat(pfd.as_fd(), backing, Vec::new())
                    .ok()
                    .map(|target| target.into_bytes())
                    .filter(|stored| stored.starts_with(crate::volume::LONG_LINK_PREFIX.as_bytes()));
            }
            _ => {}
        }
        orphans
    }

    /// Crypto-shreds the key (now, or once the kernel forgets the inode) and
    /// erases the stored link target of an inode whose last name is gone.
    fn discard(&self, orphans: Orphans) {
        if let Some(node) = orphans.held {
            node.mark_unlinked();
            // Forgotten meanwhile: nothing will call back, so erase now.
            let still_held = self.inodes.get(node.ino).is_some_and(|n| Arc::ptr_eq(&n, &node));
            if !still_held {
                self.erase_key_of_unlinked(&node);
            }
        }
        if let Some(file) = orphans.header_of {
            self.shredder.shred(file);
        }
        if let Some(stored) = orphans.long_link_target {
            self.volume.forget_link_target(&stored);
        }
    }

    /// Erases the key of a node whose last name went while the kernel knew
    /// it, once nothing can use it any more.
    pub(super) fn erase_key_of_unlinked(&self, node: &Node) {
        match node.file_id() {
            Some(id) => self.shredder.erase(&id, Some(node.ino)),
            None => match atime::reopen_quietly(node, OFlags::RDONLY | OFlags::CLOEXEC) {
                Ok(file) => self.shredder.shred(file),
                Err(e) => log::error!(
                    "cannot read the header of removed file {} ({e:?}); its key stays until fsck --repair",
                    node.ino
                ),
            },
        }
    }

    /// Removes the backing name of a file (not a directory) in `parent`.
    pub(super) fn remove_backing_file(&self, parent: &Node, backing: &BackingName) -> FsResult<()> {
        // From the stat that decides whether this is the last name to the
        // unlink, no other removal of a name of the same inode may run (the
        // kernel's inode lock no longer covers an unlink answered earlier).
        let _one_at_a_time = self.removal_guard();
        let pfd = parent.fd()?;
        let st = rustix::fs::statat(pfd.as_fd(), backing.as_str(), AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        if file_type(st.st_mode as u32) == FileType::Directory {
            return Err(Errno::EISDIR);
        }
        let orphans = self.before_last_name_goes(parent, backing.as_str(), &st);
        rustix::fs::unlinkat(pfd.as_fd(), backing.as_str(), AtFlags::empty()).map_err(errno)?;
        self.remove_sidecar(parent, backing);
        self.discard(orphans);
        Ok(())
    }

    /// Serialises the removals of names (see `remove_backing_file`) while
    /// unlinks are answered before their backing removal.
    fn removal_guard(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.defer_removals.then(|| crate::util::lock(&self.removal_lock))
    }

    /// A pending removal for an unlink of `backing` in `parent`, to be
    /// answered now and finished by `finish_removal`; None when too many
    /// are pending. Errors are the unlink's own (no such name, a directory).
    pub(super) fn removal_ticket(&self, parent: &Node, backing: &BackingName) -> FsResult<Option<Ticket>> {
        let st =
            rustix::fs::statat(parent.fd()?.as_fd(), backing.as_str(), AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        if file_type(st.st_mode as u32) == FileType::Directory {
            return Err(Errno::EISDIR);
        }
        Ok(self.removals.begin(parent.ino, self.inodes.fuse_ino(st.st_ino as u64)))
    }

    /// The backing half of an unlink already answered (see removals.rs).
    pub(super) fn finish_removal(&self, parent: &Node, backing: &BackingName, ticket: Ticket) {
        if let Some(ms) = crate::test_hooks::number("KMSFS_TEST_REMOVAL_DELAY_MS") {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        // The ticket must end whatever happens, or whatever waits for it hangs.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.remove_backing_file(parent, backing)
        }))
        .unwrap_or(Err(Errno::EIO));
        let failed = match result {
            Ok(()) => None,
            Err(e) if e == Errno::ENOENT => {
                log::warn!(
                    "{} in {} was gone before its answered unlink removed it (changed behind the mount)",
                    backing.as_str(),
                    self.describe(parent)
                );
                None
            }
            Err(e) => {
                let what = format!(
                    "removing {} in {} after its unlink was answered failed ({}); the name is back",
                    backing.as_str(),
                    self.describe(parent),
                    std::io::Error::from_raw_os_error(e.code())
                );
                log::error!("{what}");
                self.volume.record_problem(what);
                Some(e)
            }
        };
        self.removals.end(ticket, failed);
    }

    /// Waits for the removals pending in the directory `backing` of `parent`
    /// (before it is removed or replaced: it must be empty by then).
    fn settle_child_dir(&self, parent: &Node, backing: &str) -> FsResult<()> {
        if !self.removals.any() {
            return Ok(());
        }
        let st = rustix::fs::statat(parent.fd()?.as_fd(), backing, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        self.removals.settle(self.inodes.fuse_ino(st.st_ino as u64));
        Ok(())
    }

    /// Removes the IV of an empty directory so the backing rmdir/rename can
    /// proceed; returns it so it can be put back if that fails.
    fn strip_empty_dir(&self, parent: &Node, backing: &str) -> FsResult<Vec<u8>> {
        let dir = namespace::openat_quietly(
            parent.fd()?.as_fd(),
            backing,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        )
        .map_err(errno)?;
        namespace::take_dir_iv(dir.as_fd()).map_err(|e| io_errno(&e))
    }

    fn restore_dir_iv(&self, parent: &Node, backing: &str, iv: &[u8]) {
        let restored = parent
            .fd()
            .map_err(|e| std::io::Error::from_raw_os_error(e.code()))
            .and_then(|pfd| {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                Ok(namespace::openat_quietly(pfd.as_fd(), backing, flags)?)
            })
            .and_then(|dir| namespace::restore_dir_iv(dir.as_fd(), iv));
        if let Err(e) = restored {
            log::error!(
                "could not restore the IV of directory {backing} in {}: {e}",
                self.describe(parent)
            );
        }
    }

    pub(super) fn remove_dir(&self, parent: &Node, name: &OsStr) -> FsResult<()> {
        let backing = self.backing_name(parent, name)?;
        let b = backing.as_str();
        self.settle_child_dir(parent, b)?;
        let iv = self.strip_empty_dir(parent, b)?;
        if let Ok(st) = rustix::fs::statat(parent.fd()?.as_fd(), b, AtFlags::SYMLINK_NOFOLLOW) {
            self.before_last_name_goes(parent, b, &st);
        }
        if let Err(e) = rustix::fs::unlinkat(parent.fd()?.as_fd(), b, AtFlags::REMOVEDIR) {
            self.restore_dir_iv(parent, b, &iv);
            return Err(errno(e));
        }
        self.remove_sidecar(parent, &backing);
        Ok(())
    }

    pub(super) fn rename(
        &self,
        parent: &Node,
        name: &OsStr,
        new_parent: &Node,
        new_name: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        let from = self.backing_name(parent, name)?;
        let to = self.backing_name(new_parent, new_name)?;
        let flags = RenameFlags::from_bits(flags).ok_or(Errno::EINVAL)?;
        if flags.contains(RenameFlags::EXCHANGE) {
            // Names depend only on (directory, name): both backing names stay valid.
            return rustix::fs::renameat_with(
                parent.fd()?.as_fd(),
                from.as_str(),
                new_parent.fd()?.as_fd(),
                to.as_str(),
                flags,
            )
            .map_err(errno);
        }
        // A directory replaced must be empty: its pending removals finish
        // first, before the guard, which each of them takes. (The kernel
        // holds the target directory's lock meanwhile: none can start.)
        match self.settle_child_dir(new_parent, to.as_str()) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(e),
        }
        // A name replaced is a name removed (see `remove_backing_file`).
        let _one_at_a_time = self.removal_guard();
        let source =
            rustix::fs::statat(parent.fd()?.as_fd(), from.as_str(), AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        let target = rustix::fs::statat(new_parent.fd()?.as_fd(), to.as_str(), AtFlags::SYMLINK_NOFOLLOW).ok();
        if let Some(t) = &target {
            if t.st_ino == source.st_ino && t.st_dev == source.st_dev {
                return Ok(()); // POSIX: renaming onto another link of the same file does nothing.
            }
            if flags.contains(RenameFlags::NOREPLACE) {
                return Err(Errno::EEXIST);
            }
        }
        let mut stripped_iv = None;
        if let Some(t) = &target {
            let target_is_dir = file_type(t.st_mode as u32) == FileType::Directory;
            let source_is_dir = file_type(source.st_mode as u32) == FileType::Directory;
            match (source_is_dir, target_is_dir) {
                (true, true) => stripped_iv = Some(self.strip_empty_dir(new_parent, to.as_str())?),
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (false, false) => {}
            }
        }
        let orphans = match &target {
            Some(t) => self.before_last_name_goes(new_parent, to.as_str(), t),
            None => Orphans::default(),
        };
        if let Err(e) = self.write_sidecar(new_parent, &to) {
            if let Some(iv) = &stripped_iv {
                self.restore_dir_iv(new_parent, to.as_str(), iv);
            }
            return Err(e);
        }
        if let Err(e) = rustix::fs::renameat_with(
            parent.fd()?.as_fd(),
            from.as_str(),
            new_parent.fd()?.as_fd(),
            to.as_str(),
            flags,
        ) {
            if let Some(iv) = stripped_iv {
                self.restore_dir_iv(new_parent, to.as_str(), &iv);
            }
            if target.is_none() {
                self.remove_sidecar(new_parent, &to);
            }
            return Err(errno(e));
        }
        self.remove_sidecar(parent, &from);
        self.discard(orphans);
        Ok(())
    }
}
