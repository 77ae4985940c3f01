//! File content on top of a backing file: the header, then sealed 4 KiB
//! blocks. Plaintext size is a function of the backing size alone.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::num::NonZeroU64;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{RwLock, RwLockWriteGuard, TryLockError};

use crate::crypto::{BLOCK_OVERHEAD, BLOCK_SIZE, BlockCipher, CIPHER_BLOCK_SIZE, Layout, sealed_len};

use super::header::{self, HEADER_LEN};

const BS: u64 = BLOCK_SIZE as u64;

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("block {block} fails authentication")]
    Corrupt { block: u64 },
    #[error("backing file is {len} bytes long, which no file of this format is (cut short or grown)")]
    Length { len: u64 },
}

impl ContentError {
    /// The error as the volume layer reports it, naming the backing file.
    pub fn at(self, path: &std::path::Path) -> super::VolumeError {
        match self {
            ContentError::Io(source) => super::VolumeError::Io {
                path: path.to_path_buf(),
                source,
            },
            other => super::VolumeError::Tampered {
                volume: path.to_path_buf(),
                what: other.to_string(),
            },
        }
    }
}

/// Backing length of an empty file of the sealed layout.
pub const EMPTY_FILE_LEN: u64 = (HEADER_LEN + BLOCK_OVERHEAD) as u64;

/// Whether a file of the sealed layout can be `len` bytes long: a header and
/// an empty final block, or a header and blocks whose last holds 1–4096 bytes.
pub fn sealed_length_ok(len: u64) -> bool {
    let Some(body) = len.checked_sub(HEADER_LEN as u64) else {
        return false;
    };
    let rest = body % CIPHER_BLOCK_SIZE as u64;
    body == BLOCK_OVERHEAD as u64 || (body > 0 && (rest == 0 || rest > BLOCK_OVERHEAD as u64))
}

/// A new file's content: its header and, with the sealed layout, the empty
/// final block that an empty file ends in. `file` was just created (empty).
pub fn create(file: &File, cipher: &BlockCipher) -> io::Result<()> {
    let mut content = header::encode(cipher.file_id()).to_vec();
    if cipher.layout() == Layout::Sealed {
        content.extend_from_slice(&cipher.seal_block(0, true, &[]));
    }
    file.write_all_at(&content, 0)
}

/// With the sealed layout an empty file still ends in an authenticated
/// (empty) final block: a file cut to its header and a few bytes is caught.
fn check_empty_final(file: &File, cipher: &BlockCipher) -> Result<(), ContentError> {
    let mut sealed = [0u8; BLOCK_OVERHEAD];
    read_exact_at(file, &mut sealed, HEADER_LEN as u64)?;
    cipher
        .open_block(0, true, &sealed, &mut [])
        .map_err(|_| ContentError::Corrupt { block: 0 })
}

/// Plaintext size of a backing file of `backing` bytes.
pub fn plain_size(backing: u64) -> u64 {
    let Some(body) = backing.checked_sub(HEADER_LEN as u64) else {
        return 0;
    };
    let full = body / CIPHER_BLOCK_SIZE as u64;
    let rest = body % CIPHER_BLOCK_SIZE as u64;
    full * BS + rest.saturating_sub(BLOCK_OVERHEAD as u64)
}

/// Backing size that holds `plain` bytes (a header is always present).
pub fn backing_size(plain: u64) -> u64 {
    let full = plain / BS;
    let rest = plain % BS;
    let tail = if rest > 0 { rest + BLOCK_OVERHEAD as u64 } else { 0 };
    HEADER_LEN as u64 + full * CIPHER_BLOCK_SIZE as u64 + tail
}

/// Offset of block `index` in the backing file.
pub fn block_offset(index: u64) -> u64 {
    HEADER_LEN as u64 + index * CIPHER_BLOCK_SIZE as u64
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> Result<(), ContentError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO).into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The plaintext size, once the backing length is one the file's layout allows.
fn current_plain_size(file: &File, cipher: &BlockCipher) -> Result<u64, ContentError> {
    let len = file.metadata()?.len();
    if cipher.layout() == Layout::Sealed && !sealed_length_ok(len) {
        return Err(ContentError::Length { len });
    }
    Ok(plain_size(len))
}

/// Buffers a request thread reuses, so that reads and writes of up to a
/// FUSE request's size allocate nothing.
#[derive(Default)]
struct Scratch {
    sealed: Vec<u8>,
    plain: Vec<u8>,
}

/// Larger buffers are given back after use rather than kept per thread.
const SCRATCH_KEEP: usize = 4 << 20;

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch buffers (fresh ones in a nested call).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => {
            let scratch = &mut *scratch;
            let result = f(scratch);
            for buf in [&mut scratch.sealed, &mut scratch.plain] {
                if buf.capacity() > SCRATCH_KEEP {
                    *buf = Vec::new();
                }
            }
            result
        }
        Err(_) => f(&mut Scratch::default()),
    })
}

/// The first `len` bytes of a reused buffer. The buffer only grows, so the
/// bytes are cleared once rather than on every request; callers overwrite
/// all `len` bytes.
fn scratch_slice(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// Decrypts blocks `first..=last` of a file of plaintext size `size` into
/// the scratch buffers and returns the plaintext.
fn read_blocks_into<'s>(
    file: &File,
    cipher: &BlockCipher,
    size: u64,
    first: u64,
    last: u64,
    scratch: &'s mut Scratch,
) -> Result<&'s [u8], ContentError> {
    let plain_end = size.min((last + 1) * BS);
    let plain_len = (plain_end - first * BS) as usize;
    let sealed = scratch_slice(&mut scratch.sealed, sealed_len(plain_len));
    let plain = scratch_slice(&mut scratch.plain, plain_len);
    read_exact_at(file, sealed, block_offset(first))?;
    let final_index = (size - 1) / BS;
    cipher
        .open_blocks(first, final_index, sealed, plain)
        .map_err(|block| ContentError::Corrupt { block })?;
    Ok(plain)
}

/// Decrypts blocks `first..=last` into a buffer of their own (edge blocks
/// of a write or truncation, which are then changed).
fn read_blocks(file: &File, cipher: &BlockCipher, size: u64, first: u64, last: u64) -> Result<Vec<u8>, ContentError> {
    with_scratch(|scratch| Ok(read_blocks_into(file, cipher, size, first, last, scratch)?.to_vec()))
}

/// Reads up to `len` bytes at `offset` and hands them to `consume` (empty
/// at or past the end of the file). The bytes live in this thread's scratch
/// buffer: a read allocates nothing and copies nothing after decryption.
pub fn read_with<R>(
    file: &File,
    cipher: &BlockCipher,
    offset: u64,
    len: usize,
    consume: impl FnOnce(&[u8]) -> R,
) -> Result<R, ContentError> {
    let size = current_plain_size(file, cipher)?;
    if size == 0 && cipher.layout() == Layout::Sealed {
        check_empty_final(file, cipher)?;
    }
    if offset >= size || len == 0 {
        return Ok(consume(&[]));
    }
    let end = size.min(offset + len as u64);
    let first = offset / BS;
    let last = (end - 1) / BS;
    with_scratch(|scratch| {
        let plain = read_blocks_into(file, cipher, size, first, last, scratch)?;
        let start = (offset - first * BS) as usize;
        Ok(consume(&plain[start..(end - first * BS) as usize]))
    })
}

/// Reads up to `len` bytes at `offset` into a new buffer.
pub fn read(file: &File, cipher: &BlockCipher, offset: u64, len: usize) -> Result<Vec<u8>, ContentError> {
    read_with(file, cipher, offset, len, <[u8]>::to_vec)
}

/// Checks every block's tag. Returns (blocks checked, indexes of bad blocks);
/// `progress` is called with the number of blocks checked in each chunk. A
/// backing length the layout does not allow is an error of its own.
pub fn check_blocks(
    file: &File,
    cipher: &BlockCipher,
    progress: &dyn Fn(u64),
) -> Result<(u64, Vec<u64>), ContentError> {
    const CHUNK: u64 = 256;
    let size = current_plain_size(file, cipher)?;
    if size == 0 {
        if cipher.layout() == Layout::Sealed {
            return match check_empty_final(file, cipher) {
                Ok(()) => Ok((1, Vec::new())),
                Err(ContentError::Corrupt { block }) => Ok((1, vec![block])),
                Err(e) => Err(e),
            };
        }
        return Ok((0, Vec::new()));
    }
    let blocks = size.div_ceil(BS);
    let mut bad = Vec::new();
    let mut first = 0;
    while first < blocks {
        let data = next_data_block(file, first, blocks);
        if data > first {
            progress(data - first);
            first = data;
        }
        let last = (first + CHUNK - 1).min(blocks - 1);
        match with_scratch(|scratch| read_blocks_into(file, cipher, size, first, last, scratch).map(|_| ())) {
            Ok(()) => {}
            // Some block in the chunk is bad: find every one of them.
            Err(ContentError::Corrupt { .. }) => {
                for b in first..=last {
                    if let Err(ContentError::Corrupt { .. }) = read_blocks(file, cipher, size, b, b) {
                        bad.push(b);
                    }
                }
            }
            Err(e) => return Err(e),
        }
        progress(last - first + 1);
        first = last + 1;
    }
    Ok((blocks, bad))
}

/// The first block from `block` on that is not wholly inside a hole of the
/// backing file (`SEEK_DATA`), the final block at the latest. A block
/// lying in a backing hole reads as zeros, which is a hole of the plaintext
/// (FORMAT.md): there is nothing in it to authenticate, so fsck of a large
/// sparse file reads only its data. The final block is always checked,
/// since with the sealed layout it may not be a hole. Where the backing
/// filesystem cannot say, every block is read.
fn next_data_block(file: &File, block: u64, blocks: u64) -> u64 {
    let offset = block_offset(block);
    match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(offset)) {
        Ok(data) if data > offset => {
            let containing = (data - HEADER_LEN as u64) / CIPHER_BLOCK_SIZE as u64;
            containing.min(blocks - 1)
        }
        Ok(_) => block,
        Err(rustix::io::Errno::NXIO) => blocks - 1,
        Err(_) => block,
    }
}

/// Replaces unreadable blocks with sealed zeros (fsck --salvage).
pub fn zero_blocks(file: &File, cipher: &BlockCipher, bad: &[u64]) -> Result<(), io::Error> {
    let size = plain_size(file.metadata()?.len());
    let final_index = size.saturating_sub(1) / BS;
    for &b in bad {
        let len = (size - b * BS).min(BS) as usize;
        let sealed = cipher.seal_block(b, b == final_index, &vec![0u8; len]);
        file.write_all_at(&sealed, block_offset(b))?;
    }
    file.sync_all()
}

/// Sealed blocks are not page-aligned in the backing file, so a write
/// usually covers its first and last backing pages in part, and the backing
/// filesystem reads such a page (if not cached) before writing into it, one
/// page after the other. Asking for both pages first lets the reads overlap:
/// measured on 4 KiB random writes to a cold file, see DESIGN.md. With only
/// one page to read (appends, new files: pages at or past `backing_len`,
/// the size before the write, hold nothing) there is nothing to overlap,
/// and no call is made.
fn prefetch_partial_pages(file: &File, start: u64, len: u64, backing_len: u64) {
    const PAGE: u64 = 4096;
    let end = start + len;
    let head = (!start.is_multiple_of(PAGE)).then_some(start - start % PAGE);
    let tail = (!end.is_multiple_of(PAGE)).then_some(end - end % PAGE);
    let (Some(head), Some(tail)) = (head, tail) else { return };
    if tail == head || tail >= backing_len {
        return;
    }
    // Advice only: a failure changes nothing but the speed.
    let advise = |offset: u64, len: u64| {
        let _ = rustix::fs::fadvise(file, offset, NonZeroU64::new(len), rustix::fs::Advice::WillNeed);
    };
    if tail - head == PAGE {
        advise(head, 2 * PAGE); // adjacent: one call
    } else {
        advise(head, PAGE);
        advise(tail, PAGE);
    }
}

/// Writes at least this large (what the kernel's writeback sends for
/// sequential data) start the backing filesystem's writeback at once.
const WRITEBACK_KICK: usize = 256 << 10;

/// Starts writing a range of the backing file to disk without waiting for
/// it. The backing filesystem would otherwise keep the data dirty until an
/// fsync (or its own flusher, seconds later) and then write it all at once,
/// after the FUSE writeback has finished instead of alongside it.
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: the descriptor is open for the duration of the call.
    // Advice only: a failure changes nothing but the speed.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Writes `data` at `offset`, extending the file if needed (one writer at
/// a time: see `write_under`).
pub fn write(file: &File, cipher: &BlockCipher, offset: u64, data: &[u8]) -> Result<(), ContentError> {
    write_under(file, cipher, offset, data, &RwLock::new(()))
}

/// A file's final block before a write: its index and its plaintext.
type FinalBlock = (u64, Vec<u8>);

/// Block index no block has: sealing with it as the final index marks no
/// block as the file's last.
const NO_FINAL_BLOCK: u64 = u64::MAX;

/// Writes `data` at `offset`, extending the file if needed, taking `lock`
/// (which keeps other writers of the file out) once the work that needs no
/// lock is done and holding it to the end. Whole blocks at a block boundary
/// need nothing from the file, so they are sealed before the lock: the
/// kernel's writeback sends several writes to one file at once, and they
/// then seal in parallel and queue only for the backing write. Such a write
/// that has to queue asks for its partly covered backing pages before it waits,
/// so that their reads overlap the writes ahead of it instead of following
/// them. Which block is the file's last is known only under the lock; if
/// it is one of these, that block alone is sealed again.
pub fn write_under(
    file: &File,
    cipher: &BlockCipher,
    offset: u64,
    data: &[u8],
    lock: &RwLock<()>,
) -> Result<(), ContentError> {
    if data.is_empty() {
        return Ok(());
    }
    let end = offset + data.len() as u64;
    let first = offset / BS;
    let last = (end - 1) / BS;
    let whole_blocks = offset.is_multiple_of(BS) && (data.len() as u64).is_multiple_of(BS);
    let (_guard, old_final) = with_scratch(
        |scratch| -> Result<(RwLockWriteGuard<'_, ()>, Option<FinalBlock>), ContentError> {
            if whole_blocks {
                let sealed = scratch_slice(&mut scratch.sealed, sealed_len(data.len()));
                cipher.seal_blocks_into(first, NO_FINAL_BLOCK, data, sealed);
            }
            let mut prefetched = false;
            let guard = match lock.try_write() {
                Ok(guard) => guard,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    // The size read here may be stale by the time the lock is
                    // held: advice only, and the pages are the same unless the
                    // file was cut or grown meanwhile.
                    if whole_blocks && let Ok(meta) = file.metadata() {
                        prefetch_partial_pages(file, block_offset(first), sealed_len(data.len()) as u64, meta.len());
                        prefetched = true;
                    }
                    lock.write().unwrap_or_else(|p| p.into_inner())
                }
            };
            let old_size = current_plain_size(file, cipher)?;
            // The file's final block is authenticated (as final) before anything
            // is written when this write covers it or goes past it: a file cut at
            // a block boundary ends in a block sealed as not final, and a write
            // that made it a middle block, or replaced it, would hide the cut.
            // (Format 1 cannot tell a cut at a block boundary: its final
            // block is read only to be sealed again when it stops being last.)
            let mut old_final = old_size
                .checked_sub(1)
                .map(|s| s / BS)
                .filter(|&f| f < first || (f <= last && cipher.layout() == Layout::Sealed))
                .map(|f| read_blocks(file, cipher, old_size, f, f).map(|plain| (f, plain)))
                .transpose()?;
            if old_size == 0 && first > 0 && cipher.layout() == Layout::Sealed {
                // The empty final block goes: block 0 becomes a hole.
                file.set_len(HEADER_LEN as u64)?;
            }
            let new_size = old_size.max(end);
            let new_final = (new_size - 1) / BS;
            // What puts the file back should this write fail part way (a
            // full disk): the old final block, when the write covers it.
            let grows = new_size > old_size;
            let old_final_index = old_size.checked_sub(1).map(|s| s / BS);
            let covers_old_final = grows && old_final_index.is_some_and(|f| f >= first);
            let covered_final = match &old_final {
                Some((f, _)) if covers_old_final && *f >= first => old_final.clone(),
                // Format 1 reads its final block only to seal it again: here
                // it is read for the undo, and without it there is no undo.
                _ if covers_old_final => {
                    old_final_index.and_then(|f| read_blocks(file, cipher, old_size, f, f).ok().map(|plain| (f, plain)))
                }
                _ => None,
            };
            let sealed: &[u8] = if whole_blocks {
                let sealed = &mut scratch.sealed[..sealed_len(data.len())];
                if new_final == last {
                    let at = (last - first) as usize;
                    let plain = &data[at * BLOCK_SIZE..];
                    cipher.seal_blocks_into(last, last, plain, &mut sealed[at * CIPHER_BLOCK_SIZE..]);
                }
                sealed
            } else {
                let span_start = first * BS;
                let span_end = new_size.min((last + 1) * BS);
                // Partially covered edge blocks keep their existing bytes.
                let edges = [
                    (offset > span_start).then_some(first),
                    (end < span_end && (last != first || offset == span_start)).then_some(last),
                ];
                let plain: &[u8] = if edges == [None, None] {
                    data // Up to the end of the file: sealed as it is.
                } else {
                    let plain = &mut scratch.plain;
                    plain.clear();
                    plain.resize((span_end - span_start) as usize, 0);
                    for block in edges.into_iter().flatten() {
                        if block * BS < old_size {
                            let existing = match old_final.take_if(|(f, _)| *f == block) {
                                Some((_, plain)) => plain,
                                None => read_blocks(file, cipher, old_size, block, block)?,
                            };
                            let at = ((block - first) * BS) as usize;
                            let n = existing.len().min(plain.len() - at);
                            plain[at..at + n].copy_from_slice(&existing[..n]);
                        }
                    }
                    let at = (offset - span_start) as usize;
                    plain[at..at + data.len()].copy_from_slice(data);
                    plain
                };
                let sealed = scratch_slice(&mut scratch.sealed, sealed_len(plain.len()));
                cipher.seal_blocks_into(first, new_final, plain, sealed);
                sealed
            };
            if !prefetched {
                let backing_len = if old_size == 0 { 0 } else { backing_size(old_size) };
                prefetch_partial_pages(file, block_offset(first), sealed.len() as u64, backing_len);
            }
            if let Err(e) = file.write_all_at(sealed, block_offset(first)) {
                if grows && (!covers_old_final || covered_final.is_some()) {
                    undo_growth(file, cipher, old_size, covered_final.as_ref());
                }
                return Err(e.into());
            }
            if sealed.len() >= WRITEBACK_KICK {
                start_writeback(file, block_offset(first), sealed.len() as u64);
            }
            Ok((guard, old_final))
        },
    )?;

    // The old final block is no longer final: seal it again, padded to a full
    // block. Done after the new blocks so a crash in between leaves a readable
    // file (see BlockCipher::open_block).
    if let Some((old_final, mut block)) = old_final.filter(|&(f, _)| f < first) {
        let old_len = block.len();
        block.resize(BLOCK_SIZE, 0);
        let sealed = cipher.seal_block(old_final, false, &block);
        if let Err(e) = file.write_all_at(&sealed, block_offset(old_final)) {
            // Padded, the block may need room the disk no longer has.
            block.truncate(old_len);
            let old_size = old_final * BS + old_len as u64;
            undo_growth(file, cipher, old_size, Some(&(old_final, block)));
            return Err(e.into());
        }
    }
    Ok(())
}

/// Puts back a file a write that grew it left part written (the backing
/// filesystem filled up): cut to its old length, and its final block, which
/// the write may have overwritten in part, sealed again. Without this the
/// file would end inside a block, a length no file has, and read as EIO
/// from then on. Cutting frees room, and the final block's room was held
/// before, so on a filesystem that overwrites in place this does not meet
/// the same full disk (on a copy-on-write one it can: then it is logged).
fn undo_growth(file: &File, cipher: &BlockCipher, old_size: u64, old_final: Option<&FinalBlock>) {
    let restored = file.set_len(backing_size(old_size)).and_then(|()| match old_final {
        Some((index, plain)) => file.write_all_at(&cipher.seal_block(*index, true, plain), block_offset(*index)),
        None if old_size == 0 && cipher.layout() == Layout::Sealed => {
            file.write_all_at(&cipher.seal_block(0, true, &[]), HEADER_LEN as u64)
        }
        None => Ok(()),
    });
    if let Err(e) = restored {
        log::error!("a failed write could not be undone ({e}): the file reads as damaged from its old end");
    }
}

/// Sets the plaintext size to `new_size`. Growing leaves holes, but with
/// the sealed layout the new final block is sealed (zeros), never a hole.
pub fn truncate(file: &File, cipher: &BlockCipher, new_size: u64) -> Result<(), ContentError> {
    let sealed = cipher.layout() == Layout::Sealed;
    if new_size == 0 {
        // Whatever the file held (damaged or not) goes, so nothing is checked.
        file.set_len(HEADER_LEN as u64)?;
        if sealed {
            file.write_all_at(&cipher.seal_block(0, true, &[]), HEADER_LEN as u64)?;
        }
        return Ok(());
    }
    let old_size = current_plain_size(file, cipher)?;
    if new_size == old_size {
        return Ok(());
    }
    let new_final = (new_size - 1) / BS;
    if new_size < old_size {
        let keep = (new_size - new_final * BS) as usize;
        let block = read_blocks(file, cipher, old_size, new_final, new_final)?;
        let sealed = cipher.seal_block(new_final, true, &block[..keep]);
        file.set_len(block_offset(new_final))?;
        file.write_all_at(&sealed, block_offset(new_final))?;
        return Ok(());
    }
    let old_final = old_size.checked_sub(1).map(|s| s / BS);
    let old_block = match old_final {
        Some(f) => Some(read_blocks(file, cipher, old_size, f, f)?),
        None => None,
    };
    if sealed && old_final != Some(new_final) {
        if old_size == 0 {
            file.set_len(HEADER_LEN as u64)?;
        }
        // The new final block first: a crash before the old one is resealed
        // leaves it final at a non-final position, which still opens.
        let tail = vec![0u8; (new_size - new_final * BS) as usize];
        file.write_all_at(&cipher.seal_block(new_final, true, &tail), block_offset(new_final))?;
    }
    if let (Some(old_final), Some(mut block)) = (old_final, old_block) {
        let is_final = old_final == new_final;
        let len = if is_final {
            (new_size - old_final * BS) as usize
        } else {
            BLOCK_SIZE
        };
        block.resize(len, 0);
        let sealed = cipher.seal_block(old_final, is_final, &block);
        file.write_all_at(&sealed, block_offset(old_final))?;
    }
    file.set_len(backing_size(new_size))?;
    Ok(())
}

#[cfg(test)]
mod tests;
