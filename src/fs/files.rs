//! File content operations: open, read, write, truncate, fallocate,
//! seeking and syncing (attribute changes: setattr.rs).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fuser::Errno;
use rustix::fs::{AtFlags, FallocateFlags, Mode, OFlags};

use super::KmsFs;
use super::atime;
use super::attr::{FsResult, errno, io_errno};
use super::inodes::Node;
use crate::crypto::{BLOCK_SIZE, BlockCipher, Layout};
use crate::util::lock;
use crate::volume::content::{self, ContentError, block_offset};
use crate::volume::header::{self, HEADER_LEN};
use crate::volume::namespace::{self, FileIdRead};

/// An open regular file.
pub struct OpenFile {
    pub node: Arc<Node>,
    pub file: File,
    /// Opened for writing (a read-only one cannot serve writes).
    pub writable: bool,
}

/// Gives the unnamed (`O_TMPFILE`) `file` the name `name` in `dir`: by its
/// descriptor (`AT_EMPTY_PATH`, no `/proc` path to resolve) where allowed
/// (CAP_DAC_READ_SEARCH, or since Linux 6.10 the opener's credentials; else
/// ENOENT), else, from the first such refusal on, by its `/proc` path.
fn link_unnamed(file: &File, dir: BorrowedFd<'_>, name: &str) -> rustix::io::Result<()> {
    static BY_PROC_PATH: AtomicBool = AtomicBool::new(false);
    let by_proc_path = || {
        let unnamed = format!("/proc/self/fd/{}", file.as_raw_fd());
        rustix::fs::linkat(rustix::fs::CWD, unnamed.as_str(), dir, name, AtFlags::SYMLINK_FOLLOW)
    };
    if BY_PROC_PATH.load(Ordering::Relaxed) {
        return by_proc_path();
    }
    match rustix::fs::linkat(file, "", dir, name, AtFlags::EMPTY_PATH) {
        Err(rustix::io::Errno::NOENT) => {
            let linked = by_proc_path();
            if linked.is_ok() {
                BY_PROC_PATH.store(true, Ordering::Relaxed);
            }
            linked
        }
        linked => linked,
    }
}

impl KmsFs {
    /// Opens the backing inode of `node` for I/O (which never moves its
    /// access time: see atime.rs). Writers always get read access too:
    /// partial blocks are read, modified and sealed again.
    pub(super) fn reopen(&self, node: &Node, flags: i32) -> FsResult<File> {
        let mut oflags = if flags & libc::O_ACCMODE == libc::O_RDONLY {
            OFlags::RDONLY
        } else {
            OFlags::RDWR
        };
        oflags |= OFlags::CLOEXEC | (OFlags::from_bits_retain(flags as u32) & (OFlags::SYNC | OFlags::DSYNC));
        let fd: OwnedFd = match atime::reopen_quietly(node, oflags) {
            Err(e) if e.code() == libc::EMFILE => {
                // Out of descriptors: give back the cached ones and try once more.
                self.inodes.release_descriptors();
                self.node_files.clear();
                atime::reopen_quietly(node, oflags)?
            }
            other => other?,
        };
        Ok(File::from(fd))
    }

    /// The cipher of a file that has a header, loading it on first use.
    pub(super) fn cipher(&self, node: &Node, file: &File) -> FsResult<Option<Arc<BlockCipher>>> {
        let mut cached = lock(&node.state().cipher);
        if let Some(c) = cached.as_ref() {
            return Ok(Some(Arc::clone(c)));
        }
        let id = match namespace::read_file_id(file).map_err(|e| io_errno(&e))? {
            FileIdRead::Id(id) => id,
            FileIdRead::Empty if self.volume.layout() != Layout::Sealed => return Ok(None),
            FileIdRead::Empty => {
                log::error!(
                    "file {}: backing file is empty, but every file of this volume has a header \
                     (cut to 0 bytes, or its creation was interrupted); returning EIO",
                    self.describe(node)
                );
                return Err(Errno::EIO);
            }
            FileIdRead::Damaged { error, .. } => {
                log::error!("file {}: damaged header ({error})", self.describe(node));
                return Err(Errno::EIO);
            }
        };
        self.claim_id(node, &id)?;
        let cipher = Arc::new(self.volume.file_cipher(&id).map_err(|e| {
            // Not held without a cipher: its removal would take it for a copy's.
            if node.state().taken_id.get() != Some(&id) {
                self.inodes.ids.release(&id, node.ino);
            }
            log::error!("file {}: {e}", self.describe(node));
            Errno::EIO
        })?);
        *cached = Some(Arc::clone(&cipher));
        Ok(Some(cipher))
    }

    /// With the sealed layout a backing length that no file has is damage,
    /// and so is an empty file whose final block does not authenticate. The
    /// kernel reads nothing from a file it believes empty, so such a file is
    /// shown one byte long: it stays in listings (a backup meets it) and its
    /// first read reaches the daemon, which answers EIO. Returns the size to
    /// show instead of the stored one, if any. Checked when the size is
    /// reported (once per inode and mount for intact empty files).
    pub(super) fn damaged_size(&self, node: &Node, len: u64) -> Option<u64> {
        let shown = self.damaged_size_of(node, len);
        node.set_shown_damaged(shown.is_some());
        shown
    }

    fn damaged_size_of(&self, node: &Node, len: u64) -> Option<u64> {
        if self.volume.layout() != Layout::Sealed {
            return None;
        }
        let ok_or_empty =
            |len| content::sealed_length_ok(len) && (len != content::EMPTY_FILE_LEN || node.is_verified_empty());
        if ok_or_empty(len) {
            return None;
        }
        // Writers change the length in steps under the content lock: look again under it.
        let _guard = crate::util::read(&node.state().content);
        let len = rustix::fs::fstat(node.fd().ok()?.as_fd()).ok()?.st_size as u64;
        if ok_or_empty(len) {
            return None;
        }
        let intact = content::sealed_length_ok(len)
            && self.reopen(node, libc::O_RDONLY).is_ok_and(|file| {
                self.cipher(node, &file)
                    .ok()
                    .flatten()
                    .is_some_and(|cipher| content::read(&file, &cipher, 0, 0).is_ok())
            });
        if intact {
            node.mark_verified_empty();
            return None;
        }
        log::error!(
            "file {}: backing file is {len} bytes long and does not end in an authenticated block \
             (cut short or grown by someone else); its reads return EIO",
            self.describe(node)
        );
        Some(content::plain_size(len).max(1))
    }

    /// Records the node's file id; a second backing inode with the same id
    /// (one backing file copied over another's name) reads as EIO.
    pub(super) fn claim_id(&self, node: &Node, id: &crate::crypto::FileId) -> FsResult<()> {
        self.inodes.ids.claim(*id, node.ino).map_err(|other| {
            log::error!(
                "file {}: backing inode has the same file id ({}) as inode {other}: one backing file \
                 was copied over another's name; returning EIO (run fsck)",
                self.describe(node),
                crate::util::hex(id)
            );
            Errno::EIO
        })
    }

    /// Creates regular file `name` in `dir`, open with `access` (a new
    /// file's descriptor may write whatever its mode). With the sealed layout
    /// it gets its key, header and empty final block before its name: an
    /// `O_TMPFILE` linked in once complete, so no crash leaves a file
    /// without them (a format-1 file, at its first write). Its descriptor is
    /// O_NOATIME where allowed: its reads are the daemon's (see atime.rs).
    pub(super) fn create_regular(
        &self,
        dir: BorrowedFd<'_>,
        name: &str,
        perm: Mode,
        access: OFlags,
    ) -> FsResult<(OwnedFd, Option<Arc<BlockCipher>>)> {
        // Named at once, so O_NOATIME comes after the open (a refusal at open leaves the file).
        let create = |access| {
            let fd = rustix::fs::openat(
                dir,
                name,
                access | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                perm,
            )?;
            let _ = rustix::fs::fcntl_getfl(&fd).and_then(|f| rustix::fs::fcntl_setfl(&fd, f | OFlags::NOATIME));
            Ok(fd)
        };
        if self.volume.layout() != Layout::Sealed {
            return Ok((create(access).map_err(errno)?, None));
        }
        let new_content = |file: &File| -> FsResult<Arc<BlockCipher>> {
            let (_, cipher) = self.volume.new_file_key().map_err(|e| {
                log::error!("cannot create a data key: {e}");
                Errno::EIO
            })?;
            if let Err(e) = content::create(file, &cipher) {
                self.volume.forget_file_key(cipher.file_id());
                return Err(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO)));
            }
            Ok(Arc::new(cipher))
        };
        let unnamed =
            |flags| rustix::fs::openat(dir, ".", flags | OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC, perm);
        match atime::open_with(OFlags::NOATIME, OFlags::empty(), unnamed) {
            Ok(fd) => {
                let file = File::from(fd);
                let cipher = new_content(&file)?;
                if let Err(e) = link_unnamed(&file, dir, name) {
                    self.volume.forget_file_key(cipher.file_id()); // the file never got a name
                    return Err(errno(e));
                }
                Ok((file.into(), Some(cipher)))
            }
            // No O_TMPFILE on this backing filesystem: made in place. A
            // crash before the header is written leaves an empty file,
            // which fsck reports.
            Err(e)
                if [
                    rustix::io::Errno::OPNOTSUPP,
                    rustix::io::Errno::ISDIR,
                    rustix::io::Errno::INVAL,
                ]
                .contains(&e) =>
            {
                let file = File::from(create(OFlags::RDWR).map_err(errno)?);
                match new_content(&file) {
                    Ok(cipher) => Ok((file.into(), Some(cipher))),
                    Err(e) => {
                        // No half-made file stays behind: the creator sees the error.
                        let _ = rustix::fs::unlinkat(dir, name, AtFlags::empty());
                        Err(e)
                    }
                }
            }
            Err(e) => Err(errno(e)),
        }
    }

    /// The cipher of a file about to be written: a header-less (empty,
    /// format 1) file gets its id and data key now.
    pub(super) fn cipher_for_write(&self, node: &Node, file: &File) -> FsResult<Arc<BlockCipher>> {
        if let Some(c) = self.cipher(node, file)? {
            return Ok(c);
        }
        let (id, cipher) = self.volume.new_file_key().map_err(|e| {
            log::error!("cannot create a data key: {e}");
            Errno::EIO
        })?;
        rustix::io::pwrite(file, &header::encode(&id), 0).map_err(errno)?;
        self.claim_id(node, &id)?;
        let cipher = Arc::new(cipher);
        *lock(&node.state().cipher) = Some(Arc::clone(&cipher));
        Ok(cipher)
    }

    pub(super) fn content_error(&self, node: &Node, e: ContentError) -> Errno {
        match e {
            ContentError::Corrupt { block } => {
                log::error!(
                    "file {}: block {block} fails authentication (tampered or damaged); returning EIO",
                    self.describe(node)
                );
                Errno::EIO
            }
            ContentError::Length { len } => {
                log::error!(
                    "file {}: backing file is {len} bytes long, which no file of this volume is \
                     (cut short or grown by someone else); returning EIO",
                    self.describe(node)
                );
                Errno::EIO
            }
            ContentError::Io(e) => self.io_error(node, "content I/O", &e),
        }
    }

    /// Reads up to `size` bytes at `offset` and hands them to `reply`
    /// (straight from the thread's decryption buffer).
    pub(super) fn read<R>(
        &self,
        open: &OpenFile,
        offset: u64,
        size: usize,
        reply: impl FnOnce(&[u8]) -> R,
    ) -> FsResult<R> {
        let _guard = crate::util::read(&open.node.state().content);
        if open.node.is_shown_damaged() {
            // Even should it read well now (a DB read that failed once): the
            // kernel believes the size shown, and would pad a shorter answer
            // with zeros.
            log::error!(
                "file {}: read of a file shown as damaged; returning EIO",
                self.describe(&open.node)
            );
            return Err(Errno::EIO);
        }
        let Some(cipher) = self.cipher(&open.node, &open.file)? else {
            return Ok(reply(&[]));
        };
        content::read_with(&open.file, &cipher, offset, size, reply).map_err(|e| self.content_error(&open.node, e))
    }

    pub(super) fn write(&self, open: &OpenFile, offset: u64, data: &[u8]) -> FsResult<()> {
        open.node.changed();
        if self.space.is_low() {
            self.reserve(open, offset, data.len() as u64)?;
        }
        let content_lock = &open.node.state().content;
        // A node's cipher never changes once known, so with it at hand the
        // sealing can start before the content lock (see `content::write_under`).
        let known = lock(&open.node.state().cipher).as_ref().map(Arc::clone);
        let result = match known {
            Some(cipher) => content::write_under(&open.file, &cipher, offset, data, content_lock),
            None => {
                let _guard = crate::util::write(content_lock);
                let cipher = self.cipher_for_write(&open.node, &open.file)?;
                content::write(&open.file, &cipher, offset, data)
            }
        };
        result.map_err(|e| self.content_error(&open.node, e))
    }

    /// With little space left, the backing blocks a write needs are
    /// allocated first: a full disk then fails the write before any of it
    /// lands, instead of leaving a half-written block behind.
    fn reserve(&self, open: &OpenFile, offset: u64, len: u64) -> FsResult<()> {
        let start = block_offset(offset / BLOCK_SIZE as u64);
        let end = content::backing_size((offset + len).div_ceil(BLOCK_SIZE as u64) * BLOCK_SIZE as u64);
        match rustix::fs::fallocate(&open.file, FallocateFlags::KEEP_SIZE, start, end - start) {
            Err(rustix::io::Errno::OPNOTSUPP) | Ok(()) => Ok(()),
            Err(e) => Err(errno(e)),
        }
    }

    pub(super) fn truncate(&self, node: &Node, file: &File, size: u64) -> FsResult<()> {
        node.changed();
        let _guard = crate::util::write(&node.state().content);
        let cipher = if size == 0 {
            match self.cipher(node, file)? {
                Some(c) => c,
                None => return Ok(()),
            }
        } else {
            self.cipher_for_write(node, file)?
        };
        content::truncate(file, &cipher, size).map_err(|e| self.content_error(node, e))
    }

    /// `fallocate` by a caller that is root (`by_root`) or not: the kernel
    /// leaves clearing set-ID bits to the daemon here too, and sends no flag
    /// for it; root stands for CAP_FSETID, as in SETATTR.
    pub(super) fn fallocate(
        &self,
        open: &OpenFile,
        offset: u64,
        length: u64,
        mode: i32,
        by_root: bool,
    ) -> FsResult<()> {
        open.node.changed();
        let keep_size = match mode {
            0 => false,
            libc::FALLOC_FL_KEEP_SIZE => true,
            _ => return Err(Errno::EOPNOTSUPP),
        };
        if !by_root && self.kill_suidgid.load(Ordering::Relaxed) && self.kill_suidgid(&open.file)? {
            self.attributes_changed(open.node.ino);
        }
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        if !keep_size {
            let size = content::plain_size(
                open.file
                    .metadata()
                    .map_err(|e| self.io_error(&open.node, "stat", &e))?
                    .len(),
            );
            if end > size {
                self.truncate(&open.node, &open.file, end)?;
            }
        }
        // Reserve the ciphertext range without changing the backing size,
        // which would change the plaintext size.
        let start = block_offset(offset / 4096);
        let stop = content::backing_size(end.div_ceil(4096) * 4096);
        rustix::fs::fallocate(&open.file, FallocateFlags::KEEP_SIZE, start, stop - start).map_err(errno)
    }

    /// SEEK_DATA / SEEK_HOLE in plaintext offsets. A plaintext hole is a
    /// block whose stored bytes are all zero; SEEK_DATA may report a hole as
    /// data (allowed), SEEK_HOLE only reports verified holes.
    pub(super) fn seek_data_hole(&self, open: &OpenFile, offset: u64, whence: i32) -> FsResult<u64> {
        use crate::crypto::CIPHER_BLOCK_SIZE;
        let (bs, cbs, head) = (BLOCK_SIZE as u64, CIPHER_BLOCK_SIZE as u64, HEADER_LEN as u64);
        let len = open
            .file
            .metadata()
            .map_err(|e| self.io_error(&open.node, "stat", &e))?
            .len();
        let size = content::plain_size(len);
        if offset >= size {
            return Err(Errno::from_i32(libc::ENXIO));
        }
        let blocks = size.div_ceil(bs);
        let lseek = |from: rustix::fs::SeekFrom| -> Result<Option<u64>, Errno> {
            match rustix::fs::seek(&open.file, from) {
                Ok(pos) => Ok(Some(pos)),
                Err(rustix::io::Errno::NXIO) => Ok(None),
                Err(e) => Err(errno(e)),
            }
        };
        if whence == libc::SEEK_DATA {
            return match lseek(rustix::fs::SeekFrom::Data(block_offset(offset / bs)))? {
                Some(pos) => {
                    let index = pos.saturating_sub(head) / cbs;
                    let plain = (index * bs).max(offset);
                    if plain >= size {
                        Err(Errno::from_i32(libc::ENXIO))
                    } else {
                        Ok(plain)
                    }
                }
                None => Err(Errno::from_i32(libc::ENXIO)),
            };
        }
        if whence != libc::SEEK_HOLE {
            return Err(Errno::EINVAL);
        }
        let mut block = offset / bs;
        while block < blocks {
            let Some(pos) = lseek(rustix::fs::SeekFrom::Hole(block_offset(block)))? else {
                return Ok(size);
            };
            if pos >= len {
                return Ok(size);
            }
            let index = pos.saturating_sub(head).div_ceil(cbs).max(block);
            if index >= blocks {
                return Ok(size);
            }
            let stored = (len - block_offset(index)).min(cbs) as usize;
            let mut buf = vec![0u8; stored];
            std::os::unix::fs::FileExt::read_exact_at(&open.file, &mut buf, block_offset(index))
                .map_err(|e| self.io_error(&open.node, "read", &e))?;
            if buf.iter().all(|&b| b == 0) {
                return Ok((index * bs).max(offset));
            }
            block = index + 1;
        }
        Ok(size)
    }

    pub(super) fn sync_file(&self, open: &OpenFile, datasync: bool) -> FsResult<()> {
        let synced = if datasync {
            open.file.sync_data()
        } else {
            open.file.sync_all()
        };
        synced.map_err(|e| self.io_error(&open.node, "fsync", &e))?;
        self.sync_keys()
    }

    pub(super) fn sync_keys(&self) -> FsResult<()> {
        self.volume.sync_keys().map_err(|e| {
            log::error!("committing file keys failed: {e}");
            Errno::EIO
        })
    }

    pub(super) fn sync_dir(&self, node: &Node) -> FsResult<()> {
        let dir = rustix::fs::openat(
            node.fd()?.as_fd(),
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        rustix::fs::fsync(dir.as_fd()).map_err(errno)?;
        if let Some(e) = self.removals.take_failure(node.ino) {
            return Err(e);
        }
        self.sync_keys()
    }
}
