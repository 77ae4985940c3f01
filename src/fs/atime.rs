//! Access times. The kernel never moves the atime of a FUSE inode itself
//! (it marks them S_NOATIME), and what kmsfs shows is the backing inode's.
//! Every backing descriptor is opened with O_NOATIME, so the daemon's own
//! reads (headers, directory IVs, sidecars, the read half of a partial-block
//! write, prefetching) never move it. Reads the user makes move it the way
//! a read on the backing filesystem would, with that filesystem's own
//! atime rules (`relatime` on most systems; its mount options decide):
//! listings read the backing directory through a descriptor without
//! O_NOATIME, and a file's first read since it last changed (or for an
//! hour) reads one byte of it through such a descriptor. `utimensat` is no
//! way to do it: it moves the ctime too. Under `noatime` nothing moves.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rustix::fs::OFlags;

use super::KmsFs;
use super::inodes::Node;

/// How long a file's atime counts as moved after its last move (relatime
/// moves it at most once a day once it is newer than the mtime).
const RETOUCH_AFTER_SECS: u64 = 3600;

/// Opens with `quiet` (O_NOATIME) if it is not empty, or without it where
/// the backing filesystem refuses it (see `namespace::openat_quietly`).
pub(super) fn open_with<T>(
    quiet: OFlags,
    flags: OFlags,
    open: impl Fn(OFlags) -> Result<T, rustix::io::Errno>,
) -> Result<T, rustix::io::Errno> {
    match open(flags | quiet) {
        Err(rustix::io::Errno::PERM) if !quiet.is_empty() => open(flags),
        other => other,
    }
}

/// Reopens a node's backing inode for the daemon's own I/O.
pub(super) fn reopen_quietly(node: &Node, flags: OFlags) -> Result<OwnedFd, fuser::Errno> {
    match node.reopen(flags | OFlags::NOATIME) {
        Err(e) if e == fuser::Errno::EPERM => node.reopen(flags),
        other => other,
    }
}

/// Seconds on a clock private to this process, never 0 (which means "not moved").
fn now_secs() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs() + 1
}

impl KmsFs {
    /// The O_NOATIME a listing's descriptor gets: none when listings move
    /// directory access times.
    pub(super) fn listing_flags(&self) -> OFlags {
        if self.options.dir_atime {
            OFlags::empty()
        } else {
            OFlags::NOATIME
        }
    }

    /// The user read `node`'s data: move its access time as a read of the
    /// backing file would. Best effort: the read itself succeeded.
    pub(super) fn file_read(&self, node: &Node) {
        if !self.options.file_atime {
            return;
        }
        let moved = node.state().atime_moved.load(Ordering::Relaxed);
        let now = now_secs();
        if moved != 0 && now - moved < RETOUCH_AFTER_SECS {
            return;
        }
        node.state().atime_moved.store(now, Ordering::Relaxed);
        if let Ok(fd) = node.reopen(OFlags::RDONLY | OFlags::CLOEXEC) {
            let _ = rustix::io::pread(&fd, &mut [0u8; 1], 0);
        }
    }
}
