//! Reaching backing inodes without holding a descriptor for each: a node
//! keeps its kernel file handle (`name_to_handle_at`), and descriptors are
//! opened from it on demand (`open_by_handle_at`) and kept in a bounded
//! cache. The daemon's descriptor use stays bounded however many inodes the
//! kernel remembers. Backing filesystems without file handles fall back to
//! one pinned descriptor per node.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::Errno;

const HANDLE_HEADER: usize = 8;
const MAX_HANDLE_BYTES: usize = 128;

/// How a node finds its backing inode again.
pub enum Locator {
    /// A serialized `struct file_handle`.
    Handle(Box<[u8]>),
    /// A descriptor kept open for the node's lifetime.
    Pinned(Arc<OwnedFd>),
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
pub fn handle_of(fd: BorrowedFd<'_>) -> Option<Box<[u8]>> {
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
    buf.truncate(HANDLE_HEADER + len.min(MAX_HANDLE_BYTES));
    Some(buf.into_boxed_slice())
}

struct CacheEntry {
    fd: Arc<OwnedFd>,
    used: u64,
}

/// Opens nodes' descriptors from their handles, caching up to `capacity`.
pub struct Opener {
    mount_fd: OwnedFd,
    cache: Mutex<HashMap<u64, CacheEntry>>,
    tick: AtomicU64,
    capacity: usize,
}

impl Opener {
    pub fn new(mount_fd: OwnedFd, capacity: usize) -> Self {
        Opener {
            mount_fd,
            cache: Mutex::new(HashMap::new()),
            tick: AtomicU64::new(0),
            capacity: capacity.max(16),
        }
    }

    pub fn open(&self, ino: u64, locator: &Locator) -> Result<NodeFd, Errno> {
        let handle = match locator {
            Locator::Pinned(fd) => return Ok(NodeFd(Arc::clone(fd))),
            Locator::Handle(h) => h,
        };
        let now = self.tick.fetch_add(1, Ordering::Relaxed);
        if let Some(entry) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&ino) {
            entry.used = now;
            return Ok(NodeFd(Arc::clone(&entry.fd)));
        }
        let mut buf = handle.to_vec();
        // SAFETY: buf holds a file_handle exactly as name_to_handle_at wrote it.
        let raw = unsafe {
            libc::open_by_handle_at(
                self.mount_fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::file_handle>(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            let err = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
            // A handle goes stale when its inode is gone: for the caller, it does not exist.
            return Err(Errno::from_i32(if err == libc::ESTALE { libc::ENOENT } else { err }));
        }
        // SAFETY: raw is a descriptor we just opened and own.
        let fd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        self.remember(ino, &fd);
        Ok(NodeFd(fd))
    }

    /// Caches a descriptor just opened by a lookup.
    pub fn remember(&self, ino: u64, fd: &Arc<OwnedFd>) {
        let now = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.insert(
            ino,
            CacheEntry {
                fd: Arc::clone(fd),
                used: now,
            },
        );
        if cache.len() > self.capacity {
            // Drop the least recently used half: amortised O(1) per insert.
            let mut ticks: Vec<u64> = cache.values().map(|e| e.used).collect();
            let mid = ticks.len() / 2;
            let (_, median, _) = ticks.select_nth_unstable(mid);
            let cutoff = *median;
            cache.retain(|_, e| e.used > cutoff);
        }
    }

    /// Closes every cached descriptor (when the process runs out of them).
    pub fn clear(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn forget(&self, ino: u64) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).remove(&ino);
    }
}
