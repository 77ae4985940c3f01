//! Reaching backing inodes without holding a descriptor for each: a node
//! keeps its kernel file handle (`name_to_handle_at`), and descriptors are
//! opened from it on demand (`open_by_handle_at`) and kept in a bounded
//! cache. The daemon's descriptor use stays bounded however many inodes the
//! kernel remembers. Backing filesystems without file handles fall back to
//! one pinned descriptor per node.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use fuser::Errno;

use super::bounded::BoundedCache;

const HANDLE_HEADER: usize = 8;
const MAX_HANDLE_BYTES: usize = 128;

/// How a node finds its backing inode again.
pub enum Locator {
    Handle(FileHandle),
    /// A descriptor kept open for the node's lifetime.
    Pinned(Arc<OwnedFd>),
}

/// Handle bytes kept inside the node: ext4's handles (16 bytes with their
/// header) and xfs's 32-bit-inode ones fit, so a million nodes make no
/// million extra allocations.
const INLINE_HANDLE_BYTES: usize = 22;

/// A serialized `struct file_handle`, as `name_to_handle_at` wrote it.
pub enum FileHandle {
    Inline { len: u8, bytes: [u8; INLINE_HANDLE_BYTES] },
    Boxed(Box<[u8]>),
}

impl FileHandle {
    fn new(serialized: &[u8]) -> Self {
        match u8::try_from(serialized.len()) {
            Ok(len) if serialized.len() <= INLINE_HANDLE_BYTES => {
                let mut bytes = [0u8; INLINE_HANDLE_BYTES];
                bytes[..serialized.len()].copy_from_slice(serialized);
                FileHandle::Inline { len, bytes }
            }
            _ => FileHandle::Boxed(serialized.into()),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            FileHandle::Inline { len, bytes } => &bytes[..usize::from(*len)],
            FileHandle::Boxed(bytes) => bytes,
        }
    }
}

/// An `O_PATH` descriptor of a node, valid while this value lives.
#[derive(Clone)]
pub struct NodeFd(Arc<OwnedFd>);

impl NodeFd {
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// A path that reopens the inode (through /proc).
    pub fn proc_path(&self) -> String {
        format!("/proc/self/fd/{}", self.0.as_raw_fd())
    }
}

/// Reads the file handle of the inode behind `fd`, if the filesystem has them.
pub fn handle_of(fd: BorrowedFd<'_>) -> Option<FileHandle> {
    let mut buf = vec![0u8; HANDLE_HEADER + MAX_HANDLE_BYTES];
    buf[..4].copy_from_slice(&(MAX_HANDLE_BYTES as u32).to_ne_bytes());
    let mut mount_id: libc::c_int = 0;
    // SAFETY: buf is large enough for a file_handle with MAX_HANDLE_BYTES of
    // payload, and its handle_bytes field says so; the path is a valid C string.
    let rc = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast::<libc::file_handle>(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return None;
    }
    let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    Some(FileHandle::new(&buf[..HANDLE_HEADER + len.min(MAX_HANDLE_BYTES)]))
}

/// Opens nodes' descriptors from their handles, caching up to `capacity`.
pub struct Opener {
    mount_fd: OwnedFd,
    cache: BoundedCache<Arc<OwnedFd>>,
}

impl Opener {
    pub fn new(mount_fd: OwnedFd, capacity: usize) -> Self {
        Opener {
            mount_fd,
            cache: BoundedCache::new(capacity),
        }
    }

    pub fn open(&self, ino: u64, locator: &Locator) -> Result<NodeFd, Errno> {
        let handle = match locator {
            Locator::Pinned(fd) => return Ok(NodeFd(Arc::clone(fd))),
            Locator::Handle(h) => h.bytes(),
        };
        if let Some(fd) = self.cache.get(ino) {
            return Ok(NodeFd(fd));
        }
        let fd = Arc::new(self.open_handle(handle, libc::O_PATH | libc::O_CLOEXEC)?);
        self.remember(ino, &fd);
        Ok(NodeFd(fd))
    }

    /// A new descriptor of the inode behind `handle`, opened with `flags`.
    pub fn open_handle(&self, handle: &[u8], flags: libc::c_int) -> Result<OwnedFd, Errno> {
        let mut buf = handle.to_vec();
        // SAFETY: buf holds a file_handle exactly as name_to_handle_at wrote it.
        let raw = unsafe {
            libc::open_by_handle_at(
                self.mount_fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::file_handle>(),
                flags,
            )
        };
        if raw < 0 {
            let err = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
            // A handle goes stale when its inode is gone: for the caller, it does not exist.
            return Err(Errno::from_i32(if err == libc::ESTALE { libc::ENOENT } else { err }));
        }
        // SAFETY: raw is a descriptor we just opened and own.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// Caches a descriptor just opened by a lookup.
    pub fn remember(&self, ino: u64, fd: &Arc<OwnedFd>) {
        self.cache.insert(ino, Arc::clone(fd));
    }

    /// Closes every cached descriptor (when the process runs out of them).
    pub fn clear(&self) {
        self.cache.clear();
    }

    /// Takes the cached descriptor of `ino` out, for the caller to close
    /// outside its locks.
    #[must_use = "closing the descriptor is the caller's: outside any lock it holds"]
    pub fn forget(&self, ino: u64) -> Option<Arc<OwnedFd>> {
        self.cache.remove(ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_handles_are_kept_inline_and_long_ones_boxed_both_byte_for_byte() {
        let short: Vec<u8> = (1..=16).collect();
        let h = FileHandle::new(&short);
        assert!(matches!(h, FileHandle::Inline { .. }));
        assert_eq!(h.bytes(), &short[..]);
        let at_limit: Vec<u8> = (1..=INLINE_HANDLE_BYTES as u8).collect();
        assert!(matches!(FileHandle::new(&at_limit), FileHandle::Inline { .. }));
        assert_eq!(FileHandle::new(&at_limit).bytes(), &at_limit[..]);
        let long: Vec<u8> = (0..40).collect();
        let h = FileHandle::new(&long);
        assert!(matches!(h, FileHandle::Boxed(_)));
        assert_eq!(h.bytes(), &long[..]);
    }

    #[test]
    fn a_handle_read_from_a_directory_reopens_it() {
        let dir = tempfile::tempdir().unwrap();
        let fd = rustix::fs::open(dir.path(), rustix::fs::OFlags::PATH, rustix::fs::Mode::empty()).unwrap();
        let Some(handle) = handle_of(fd.as_fd()) else {
            return; // a backing filesystem without handles (tmpfs of old kernels)
        };
        let mount_fd = rustix::fs::open(dir.path(), rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty()).unwrap();
        let opener = Opener::new(mount_fd, 4);
        let Ok(reopened) = opener.open_handle(handle.bytes(), libc::O_PATH) else {
            return; // no CAP_DAC_READ_SEARCH: the daemon falls back to pinned descriptors
        };
        let ino = |fd: BorrowedFd<'_>| rustix::fs::fstat(fd).unwrap().st_ino;
        assert_eq!(ino(reopened.as_fd()), ino(fd.as_fd()));
    }
}
