//! The kernel's open files: handles given out at OPEN, CREATE and OPENDIR,
//! and, when the kernel sends no OPEN, one backing file per inode.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use fuser::{Errno, FileHandle, FopenFlags, INodeNo};

use super::KmsFs;
use super::attr::FsResult;
use super::dirs::DirEntry;
use super::files::OpenFile;

/// The file handle of files opened without an OPEN request.
pub(super) const NO_OPEN_HANDLE: u64 = 0;

pub(super) enum Handle {
    File(Arc<OpenFile>),
    Dir(Arc<DirHandle>),
}

/// An open directory. Listed at its first READDIR, not at OPENDIR: when
/// the kernel serves the listing from its cache, it still opens the
/// directory but never reads it, and nothing is listed for nothing.
pub(super) struct DirHandle {
    node: Arc<super::inodes::Node>,
    listing: std::sync::OnceLock<Arc<Vec<DirEntry>>>,
}

impl DirHandle {
    pub(super) fn new(node: Arc<super::inodes::Node>) -> Self {
        DirHandle {
            node,
            listing: std::sync::OnceLock::new(),
        }
    }
}

impl KmsFs {
    /// How the kernel is to treat a file it opens or creates: its page
    /// cache kept across opens, and (when the backing filesystem runs low)
    /// every write sent through at once, so that ENOSPC reaches `write`.
    pub(super) fn file_open_flags(&self) -> FopenFlags {
        let mut flags = FopenFlags::empty();
        if self.options.keep_cache {
            flags |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        if self.options.writeback && self.space.is_low() {
            flags |= FopenFlags::FOPEN_DIRECT_IO;
        }
        flags
    }

    pub(super) fn add_handle(&self, handle: Handle) -> FileHandle {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        crate::util::lock(&self.handles).insert(fh, handle);
        FileHandle(fh)
    }

    /// The open file behind a request. Handle 0 is never given out: it comes
    /// with files the kernel opened without asking (no OPEN requests), and
    /// `write` says whether the request needs to write.
    pub(super) fn open_file(&self, ino: INodeNo, fh: FileHandle, write: bool) -> FsResult<Arc<OpenFile>> {
        self.activity.touch();
        if fh.0 == NO_OPEN_HANDLE {
            return self.node_file(ino, write);
        }
        match crate::util::lock(&self.handles).get(&fh.0) {
            Some(Handle::File(f)) => Ok(Arc::clone(f)),
            _ => Err(Errno::EBADF),
        }
    }

    /// The backing file of an inode opened without an OPEN request: read-write
    /// when the backing file allows it, cached for the next requests.
    pub(super) fn node_file(&self, ino: INodeNo, write: bool) -> FsResult<Arc<OpenFile>> {
        let node = self.node(ino)?;
        // An entry cached for an earlier node of this inode (forgotten and
        // looked up again) would not share the current node's locks; a
        // read-only one is replaced once a write comes (after a chmod).
        if let Some(open) = self
            .node_files
            .get(ino.0)
            .filter(|open| Arc::ptr_eq(&open.node, &node) && (open.writable || !write))
        {
            return Ok(open);
        }
        let (file, writable) = match self.reopen(&node, libc::O_RDWR) {
            Err(e) if !write && [libc::EACCES, libc::EROFS, libc::EPERM].contains(&e.code()) => {
                (self.reopen(&node, libc::O_RDONLY)?, false)
            }
            other => (other?, true),
        };
        let open = Arc::new(OpenFile { node, file, writable });
        self.node_files.insert(ino.0, Arc::clone(&open));
        Ok(open)
    }

    /// How the kernel is to treat a directory it opens.
    pub(super) fn dir_open_flags(&self) -> FopenFlags {
        if self.options.cache_dir {
            FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        }
    }

    pub(super) fn dir_listing(&self, fh: FileHandle) -> FsResult<Arc<Vec<DirEntry>>> {
        self.activity.touch();
        let dir = match crate::util::lock(&self.handles).get(&fh.0) {
            Some(Handle::Dir(d)) => Arc::clone(d),
            _ => return Err(Errno::EBADF),
        };
        if let Some(listing) = dir.listing.get() {
            return Ok(Arc::clone(listing));
        }
        self.removals.settle(dir.node.ino);
        let listing = Arc::new(self.list_dir(&dir.node)?);
        self.read_orders.listed(&listing);
        Ok(Arc::clone(dir.listing.get_or_init(|| listing)))
    }

    pub(super) fn drop_handle(&self, fh: FileHandle) {
        // Closed after the lock is released (see `BoundedCache::insert`).
        let handle = crate::util::lock(&self.handles).remove(&fh.0);
        drop(handle);
    }
}
