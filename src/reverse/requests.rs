//! The reverse view's FUSE requests: read-only, each a call into
//! `ReverseFs` and a reply. Every request that would change something is
//! left to fuser's default (ENOSYS) and refused by the kernel first (the
//! mount is read-only).

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use fuser::{
    Errno, FileHandle, FopenFlags, INodeNo, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use super::ReverseFs;
use crate::fs::MountOptions;
use crate::fs::attr::reply_xattr;

const GENERATION: fuser::Generation = fuser::Generation(0);

/// An open directory: its listing, taken at OPENDIR.
type Listing = Vec<(std::ffi::OsString, u64, fuser::FileType)>;

pub struct Mounted {
    fs: ReverseFs,
    listings: std::sync::Mutex<std::collections::HashMap<u64, Arc<Listing>>>,
    next_listing: std::sync::atomic::AtomicU64,
}

/// Mounts the view (always read-only, the kernel checking permissions
/// against the plaintext's modes); the session serves it when run.
pub fn mount(
    fs: ReverseFs,
    plain: &Path,
    mountpoint: &Path,
    options: &MountOptions,
) -> io::Result<fuser::Session<Mounted>> {
    let mut options = options.clone();
    options.read_only = true;
    options.default_permissions = true;
    let config = crate::fs::mount::session_config(plain, &options);
    let mounted = Mounted {
        fs,
        listings: Default::default(),
        next_listing: std::sync::atomic::AtomicU64::new(1),
    };
    fuser::Session::new(mounted, mountpoint, &config)
}

impl fuser::Filesystem for Mounted {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Err(limit) = config.set_max_readahead(1 << 20) {
            let _ = config.set_max_readahead(limit);
        }
        // Listings carry attributes: a backup tool's lstat of every entry
        // then costs no LOOKUP each.
        if config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS).is_err() {
            log::info!("kernel does not offer readdirplus; going without");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name) {
            Ok(attr) => reply.entry(&self.fs.options.ttl, &attr, GENERATION),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(attr) => reply.attr(&self.fs.options.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.fs.open(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(ino.0, fh.0, offset, size as usize) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.list(ino.0) {
            Ok(listing) => {
                let fh = self.next_listing.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                crate::util::lock(&self.listings).insert(fh, Arc::new(listing));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(listing) = crate::util::lock(&self.listings).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let mut index = offset as usize;
        while index < listing.len() + 2 {
            let next = index as u64 + 1;
            let full = match index {
                0 => reply.add(ino, next, fuser::FileType::Directory, "."),
                1 => reply.add(ino, next, fuser::FileType::Directory, ".."),
                i => {
                    let (name, node, kind) = &listing[i - 2];
                    reply.add(INodeNo(*node), next, *kind, name)
                }
            };
            if full {
                break;
            }
            index += 1;
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let Some(listing) = crate::util::lock(&self.listings).get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let ttl = self.fs.options.ttl;
        let dir = match self.fs.open_dir_node(ino.0) {
            Ok(dir) => dir,
            Err(e) => return reply.error(e),
        };
        let mut index = offset as usize;
        while index < listing.len() + 2 {
            let next = index as u64 + 1;
            let full = match index {
                0 | 1 => match self.fs.getattr(ino.0) {
                    Ok(attr) => reply.add(ino, next, if index == 0 { "." } else { ".." }, &ttl, &attr, GENERATION),
                    Err(e) => return reply.error(e),
                },
                i => {
                    let (name, _, _) = &listing[i - 2];
                    // As LOOKUP would, counted; an entry gone meanwhile is skipped.
                    let Ok(attr) = self.fs.lookup_in(&dir, name) else {
                        index += 1;
                        continue;
                    };
                    let full = reply.add(attr.ino, next, name, &ttl, &attr, GENERATION);
                    if full {
                        self.fs.forget(attr.ino.0, 1); // not sent: the kernel did not count it
                    }
                    full
                }
            };
            if full {
                break;
            }
            index += 1;
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        crate::util::lock(&self.listings).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                crate::volume::layout::NAME_MAX as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.fs.get_xattr(ino.0, name.as_bytes()));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.fs.list_xattrs(ino.0));
    }
}
