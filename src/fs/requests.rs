//! The FUSE request handlers: each decodes a kernel request, calls the
//! filesystem (`KmsFs`, reached as `self.fs`: no `Deref`, so that a handler
//! can never call itself by a name it shares with a `KmsFs` method) and
//! replies.

// `stat` field types differ between architectures; the casts are for the others.
#![allow(clippy::unnecessary_cast)]

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileHandle, FileType, INodeNo, IoctlFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use rustix::fs::OFlags;

use super::attr::{errno, reply_empty, reply_entry, reply_xattr};
use super::files::OpenFile;
use super::mounted::Mounted;
use super::open_files::{DirHandle, Handle, NO_OPEN_HANDLE};
use super::setattr::AttrChange;
use super::{GENERATION, inodes, xattrs};

fn owner(req: &Request) -> (u32, u32) {
    (req.uid(), req.gid())
}

impl fuser::Filesystem for Mounted {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        self.fs.negotiate(config);
        Ok(())
    }

    fn destroy(&mut self) {
        self.fs.removals.settle_all();
        self.removals.shutdown();
        self.syncs.shutdown();
        self.prefetches.shutdown();
        self.fs.verified_ahead.log_summary();
        match self.fs.space.unlogged_full_errors() {
            0 => {}
            n => log::warn!("{n} more backing I/O requests failed for lack of space (not logged one by one)"),
        }
        // Removed files still open (or not yet forgotten) at unmount.
        for node in self.fs.inodes.unlinked_nodes() {
            self.fs.erase_key_of_unlinked(&node);
        }
        self.fs.shredder.drain();
        if let Err(e) = self.fs.volume.sync_keys() {
            log::error!("committing file keys at unmount failed: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self.fs.node(parent).and_then(|p| self.fs.lookup(&p, name));
        self.start_reads_ahead();
        reply_entry(reply, &self.fs.options.ttl, found);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget_node(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        // fstat on an open file: its descriptor still works after an unlink or a rename over it.
        let handle = fh.filter(|fh| fh.0 != NO_OPEN_HANDLE);
        let via_handle = handle
            .and_then(|fh| self.fs.open_file(ino, fh, false).ok())
            .map(|open| {
                rustix::fs::fstat(&open.file)
                    .map_err(errno)
                    .and_then(|st| self.fs.attr_of(&open.node, &st))
            });
        match via_handle.unwrap_or_else(|| self.fs.node(ino).and_then(|n| self.fs.stat_attr(&n))) {
            Ok(attr) => reply.attr(&self.fs.options.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.fs.setattr_inner(
            ino,
            AttrChange {
                // The kernel leaves this to us (FUSE_HANDLE_KILLPRIV_V2);
                // fuser does not pass FATTR_KILL_SUIDGID, so root stands for
                // CAP_FSETID.
                kill_suidgid: size.is_some() && req.uid() != 0 && self.fs.kill_suidgid.load(Ordering::Relaxed),
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
            },
            fh,
        ) {
            Ok(attr) => reply.attr(&self.fs.options.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.node(ino).and_then(|n| self.fs.read_link(&n)) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let result = self.fs.node(parent).and_then(|p| {
            let (mode, inherited) = self.fs.creation_mode(&p, mode, umask, mode & libc::S_IFMT)?;
            let initial = xattrs::provisional_mode(mode, inherited.as_ref());
            let (node, attr, _) = self.fs.make_node(&p, name, initial, rdev, owner(req), None)?;
            match inherited {
                None => Ok((node, attr)),
                Some(_) => Ok((Arc::clone(&node), self.fs.apply_inherited(&node, inherited, mode)?)),
            }
        });
        reply_entry(reply, &self.fs.options.ttl, result);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let result = self.fs.node(parent).and_then(|p| {
            let (mode, inherited) = self.fs.creation_mode(&p, libc::S_IFDIR | mode, umask, libc::S_IFDIR)?;
            let initial = xattrs::provisional_mode(mode, inherited.as_ref());
            let (node, attr) = self.fs.make_dir(&p, name, initial, owner(req))?;
            match inherited {
                None => Ok((node, attr)),
                Some(_) => Ok((Arc::clone(&node), self.fs.apply_inherited(&node, inherited, mode)?)),
            }
        });
        reply_entry(reply, &self.fs.options.ttl, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.serve_unlink(parent, name, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.fs.node(parent).and_then(|p| self.fs.remove_dir(&p, name)));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let result = self.fs.node(parent).and_then(|p| {
            self.fs
                .make_symlink(&p, link_name, target.as_os_str().as_bytes(), owner(req))
        });
        reply_entry(reply, &self.fs.options.ttl, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self
            .fs
            .node(parent)
            .and_then(|p| Ok((p, self.fs.node(newparent)?)))
            .and_then(|(p, np)| self.fs.rename(&p, name, &np, newname, flags.bits()));
        reply_empty(reply, result);
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        // The inode's link count must be what the removals answered say
        // before it gains a name (removals.rs).
        self.fs.removals.settle_all();
        let result = self.fs.node(ino).and_then(|n| {
            let np = self.fs.node(newparent)?;
            let attr = self.fs.make_link(&n, &np, newname)?;
            Ok((n, attr))
        });
        reply_entry(reply, &self.fs.options.ttl, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if !self.fs.options.open_requests {
            // The kernel then opens files by itself (keeping their page
            // cache) and sends no OPEN or RELEASE again: two round trips
            // less per open. I/O comes with handle 0 (see `node_file`).
            reply.error(Errno::ENOSYS);
            return;
        }
        let result = self.fs.node(ino).and_then(|node| {
            let file = self.fs.reopen(&node, flags.0)?;
            // Load the key now: reads and writes on an open file never touch the DB.
            self.fs.cipher(&node, &file)?;
            let writable = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
            Ok(self
                .fs
                .add_handle(Handle::File(Arc::new(OpenFile { node, file, writable }))))
        });
        match result {
            Ok(fh) => reply.opened(fh, self.fs.file_open_flags()),
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
        if offset == 0 {
            self.prefetch_after(ino);
        }
        // Replied to from the decryption buffer on success, else with the error.
        let mut reply = Some(reply);
        let result = self.fs.open_file(ino, fh, false).and_then(|f| {
            self.fs.file_read(&f.node);
            self.fs.read(&f, offset, size as usize, |data| {
                if let Some(r) = reply.take() {
                    r.data(data);
                }
            })
        });
        if let (Err(e), Some(r)) = (result, reply) {
            r.error(e);
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        let result = self.fs.open_file(ino, fh, true).and_then(|f| {
            // Before the data, as the kernel would: a failed write leaves
            // no new content with the old bits.
            if kill && self.fs.kill_suidgid(&f.file)? {
                self.fs.attributes_changed(ino.0);
            }
            self.fs.write(&f, offset, data)
        });
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // Nothing to do at close (no locks, keys are committed on fsync and
        // in the background); ENOSYS makes the kernel stop sending FLUSH,
        // saving a round trip per close. With the writeback cache the
        // kernel still writes a closing file's dirty pages first, and
        // reports their errors from close().
        reply.error(Errno::ENOSYS);
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
        self.fs.drop_handle(fh);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.serve_fsync(ino, fh, datasync, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.node(ino) {
            Ok(node) => reply.opened(
                self.fs.add_handle(Handle::Dir(Arc::new(DirHandle::new(node)))),
                self.fs.dir_open_flags(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.fs.dir_listing(fh) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        let mut index = offset as usize;
        while index < entries.len() + 2 {
            let next = index as u64 + 1;
            let full = match index {
                0 => reply.add(ino, next, FileType::Directory, "."),
                1 => reply.add(ino, next, FileType::Directory, ".."),
                i => {
                    let e = &entries[i - 2];
                    reply.add(INodeNo(e.ino), next, e.kind, &e.name)
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
        let listed = self.fs.readdirplus_inner(ino, fh, offset, &mut reply);
        self.start_reads_ahead();
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.fs.drop_handle(fh);
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.serve_fsyncdir(ino, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The space of removed files counts as free once they are.
        self.fs.removals.settle_all();
        match self
            .fs
            .node(INodeNo(inodes::ROOT_INO))
            .and_then(|root| rustix::fs::fstatvfs(root.fd()?.as_fd()).map_err(errno))
        {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                layout_name_max(),
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if !self.fs.options.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        reply_empty(
            reply,
            self.fs
                .node(ino)
                .and_then(|n| self.fs.set_xattr(&n, name.as_bytes(), value, flags, owner(req))),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.fs.options.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        reply_xattr(
            reply,
            size,
            self.fs.node(ino).and_then(|n| self.fs.get_xattr(&n, name.as_bytes())),
        );
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.fs.options.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        reply_xattr(reply, size, self.fs.node(ino).and_then(|n| self.fs.list_xattrs(&n)));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if !self.fs.options.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        reply_empty(
            reply,
            self.fs
                .node(ino)
                .and_then(|n| self.fs.remove_xattr(&n, name.as_bytes())),
        );
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let result = self.fs.node(ino).and_then(|n| self.fs.stat_attr(&n)).and_then(|attr| {
            let mask = mask.bits() as u32 & 0o7;
            if mask == 0
                || req.uid() == 0 && (mask & 1 == 0 || attr.perm & 0o111 != 0 || attr.kind == FileType::Directory)
            {
                return Ok(());
            }
            let shift = if req.uid() == attr.uid {
                6
            } else if req.gid() == attr.gid {
                3
            } else {
                0
            };
            if (u32::from(attr.perm) >> shift) & mask == mask {
                Ok(())
            } else {
                Err(Errno::EACCES)
            }
        });
        reply_empty(reply, result);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        // Without OPEN requests the new file's descriptor serves every later
        // open of it too, so it must allow writing.
        let access = if flags & libc::O_ACCMODE == libc::O_RDONLY && self.fs.options.open_requests {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        let oflags = OFlags::from_bits_retain(access as u32);
        let result = self.fs.node(parent).and_then(|p| {
            let (mode, inherited) = self.fs.creation_mode(&p, libc::S_IFREG | mode, umask, libc::S_IFREG)?;
            let initial = xattrs::provisional_mode(mode, inherited.as_ref());
            let (node, attr, fd) = self.fs.make_node(&p, name, initial, 0, owner(req), Some(oflags))?;
            let attr = match inherited {
                None => attr,
                Some(_) => self.fs.apply_inherited(&node, inherited, mode)?,
            };
            let file = match fd {
                Some(fd) => std::fs::File::from(fd),
                None => self.fs.reopen(&node, flags)?,
            };
            let writable = access != libc::O_RDONLY;
            let open = Arc::new(OpenFile { node, file, writable });
            if !self.fs.options.open_requests {
                // The kernel sends no RELEASE for this handle once it has
                // stopped sending OPEN: the file joins the per-inode ones.
                self.fs.node_files.insert(open.node.ino, open);
                return Ok((attr, FileHandle(NO_OPEN_HANDLE)));
            }
            Ok((attr, self.fs.add_handle(Handle::File(open))))
        });
        match result {
            Ok((attr, fh)) => reply.created(&self.fs.options.ttl, &attr, GENERATION, fh, self.fs.file_open_flags()),
            Err(e) => reply.error(e),
        }
    }

    /// No ioctl is supported. ENOTTY is what a disk filesystem's file
    /// answers to a terminal's (`isatty`, which Python asks at every open),
    /// and it goes unlogged: fuser's default warns at each.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        if self.fs.options.writeback {
            // Dirty pages the kernel has not written back yet are invisible
            // here, so a hole found in the backing file may hold new data.
            // ENOSYS makes the kernel answer by itself: SEEK_DATA is the
            // offset, SEEK_HOLE the end of the file (correct, if coarse).
            reply.error(Errno::ENOSYS);
            return;
        }
        let offset = u64::try_from(offset).map_err(|_| Errno::EINVAL);
        match offset.and_then(|off| {
            self.fs
                .open_file(ino, fh, false)
                .and_then(|f| self.fs.seek_data_hole(&f, off, whence))
        }) {
            Ok(pos) => reply.offset(pos as i64),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.fs
                .open_file(ino, fh, true)
                .and_then(|f| self.fs.fallocate(&f, offset, length, mode, req.uid() == 0)),
        );
    }
}

fn layout_name_max() -> u32 {
    crate::volume::layout::NAME_MAX as u32
}
