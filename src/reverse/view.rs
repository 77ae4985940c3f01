//! The bytes of a file in a reverse view: the header and the sealed blocks
//! of the forward format (docs/FORMAT.md), made from the plaintext file on
//! every read, with derived nonces so that they are the same every time.

// `stat` field types differ between architectures; the casts are for the others.
#![allow(clippy::unnecessary_cast)]

use std::os::fd::{AsFd, OwnedFd};

use rustix::fs::SeekFrom;
use rustix::io::Errno;

use crate::crypto::{BLOCK_SIZE, BlockCipher, CIPHER_BLOCK_SIZE, DerivedKeys, FileId, sealed_len};
use crate::volume::header::{self, HEADER_LEN};

/// The view size of a plaintext file of `plain` bytes: the header and its
/// blocks (an empty file has one empty final block).
pub fn view_size(plain: u64) -> u64 {
    HEADER_LEN as u64 + sealed_len(plain.max(1) as usize) as u64 - u64::from(plain == 0)
}

/// A plaintext file opened for its view. The size is taken once, at open:
/// a file that grows meanwhile is served as it was, one that shrinks reads
/// as EIO where its blocks went, so that every block served is sealed from
/// one read of the plaintext and the last block always carries the final
/// flag.
pub struct ViewFile {
    file: OwnedFd,
    size: u64,
    cipher: BlockCipher,
    keys_id: FileId,
}

impl ViewFile {
    pub fn new(file: OwnedFd, size: u64, file_id: FileId, cipher: BlockCipher) -> Self {
        ViewFile {
            file,
            size,
            cipher,
            keys_id: file_id,
        }
    }

    pub fn view_size(&self) -> u64 {
        view_size(self.size)
    }

    /// Bytes `offset .. offset + len` of the view (fewer at its end).
    pub fn read(&self, derived: &DerivedKeys, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let end = (offset + len as u64).min(self.view_size());
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        if offset >= end {
            return Ok(out);
        }
        let header_len = HEADER_LEN as u64;
        if offset < header_len {
            out.extend_from_slice(&header::encode(&self.keys_id)[offset as usize..end.min(header_len) as usize]);
        }
        if end <= header_len {
            return Ok(out);
        }
        let body_start = offset.max(header_len) - header_len;
        let body_end = end - header_len;
        let first = body_start / CIPHER_BLOCK_SIZE as u64;
        let last = (body_end - 1) / CIPHER_BLOCK_SIZE as u64;
        let sealed = self.seal_range(derived, first, last)?;
        let skip = (body_start - first * CIPHER_BLOCK_SIZE as u64) as usize;
        let take = (body_end - body_start) as usize;
        out.extend_from_slice(&sealed[skip..skip + take]);
        Ok(out)
    }

    /// Blocks `first ..= last`, sealed back to back.
    fn seal_range(&self, derived: &DerivedKeys, first: u64, last: u64) -> Result<Vec<u8>, Errno> {
        let block = BLOCK_SIZE as u64;
        let final_index = self.size.saturating_sub(1) / block;
        let plain_start = first * block;
        let plain_end = ((last + 1) * block).min(self.size);
        let mut plain = vec![0u8; (plain_end - plain_start) as usize];
        read_exact_at(&self.file, &mut plain, plain_start)?;
        let nonce = |index| derived.block_nonce(&self.keys_id, index);
        if plain.is_empty() {
            // An empty file: its one empty final block.
            return Ok(self.cipher.seal_block_with_nonce(0, true, &[], nonce(0)));
        }
        let mut holes = self.holes(first, last, final_index);
        // What the hole map says is checked against what was read: a block
        // written between the read and the map, or a filesystem whose map is
        // wrong, must not go into the backup as zeros.
        for (hole, plain) in holes.iter_mut().zip(plain.chunks(BLOCK_SIZE)) {
            *hole = *hole && plain.iter().all(|&b| b == 0);
        }
        let mut sealed = vec![0u8; sealed_len(plain.len())];
        // Runs of blocks that are not holes, sealed together (in parallel when long).
        let mut run_start = first;
        for index in first..=last + 1 {
            if index <= last && !holes[(index - first) as usize] {
                continue;
            }
            if run_start < index {
                let plain_from = ((run_start - first) * block) as usize;
                let plain_to = (((index - first) * block) as usize).min(plain.len());
                let sealed_from = (run_start - first) as usize * CIPHER_BLOCK_SIZE;
                let sealed_to = sealed_from + sealed_len(plain_to - plain_from);
                self.cipher.seal_blocks_with_nonces(
                    run_start,
                    final_index,
                    &plain[plain_from..plain_to],
                    &mut sealed[sealed_from..sealed_to],
                    nonce,
                );
            }
            run_start = index + 1;
        }
        Ok(sealed)
    }

    /// Which of blocks `first ..= last` are holes of the plaintext file
    /// (whole blocks only, never the final one): they are served as
    /// all-zero blocks, which the forward format reads as zeros.
    fn holes(&self, first: u64, last: u64, final_index: u64) -> Vec<bool> {
        let block = BLOCK_SIZE as u64;
        let mut holes = vec![false; (last - first + 1) as usize];
        let (start, end) = (first * block, ((last + 1) * block).min(self.size));
        let mut mark = |from: u64, to: u64| {
            for index in from.div_ceil(block)..=last {
                let (block_start, block_end) = (index * block, ((index + 1) * block).min(self.size));
                if block_end > to || index == final_index {
                    break;
                }
                if index >= first && block_start >= from {
                    holes[(index - first) as usize] = true;
                }
            }
        };
        let mut at = start;
        while at < end {
            match rustix::fs::seek(&self.file, SeekFrom::Data(at)) {
                Ok(data) => {
                    mark(at, data.min(end));
                    match rustix::fs::seek(&self.file, SeekFrom::Hole(data)) {
                        Ok(hole) if hole > data => at = hole,
                        _ => break,
                    }
                }
                Err(Errno::NXIO) => {
                    mark(at, end);
                    break;
                }
                // No hole information (the filesystem does not say): none.
                Err(_) => break,
            }
        }
        holes
    }
}

fn read_exact_at(file: &impl AsFd, mut buf: &mut [u8], mut offset: u64) -> Result<(), Errno> {
    while !buf.is_empty() {
        match rustix::io::pread(file, &mut *buf, offset) {
            // Shorter than at open: the blocks it had are gone.
            Ok(0) => return Err(Errno::IO),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;

    /// Read in one piece or in odd pieces, the view is the same, and the
    /// forward reader opens it to the plaintext (a hole in the middle included).
    #[test]
    fn reads_at_any_offset_agree_and_open_to_the_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let plain: Vec<u8> = (0..5 * 4096 + 123).map(|i| (i % 253) as u8 + 1).collect();
        let mut sparse = plain.clone();
        sparse[4096..2 * 4096].fill(0);
        let file = std::fs::File::create(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &plain[..4096], 0).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &plain[2 * 4096..], 2 * 4096).unwrap();
        let derived = DerivedKeys::new(&SecretKey::random());
        let id = derived.file_id(7).unwrap();
        let key = derived.data_key(&id);
        let view = || {
            let fd = rustix::fs::open(&path, rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty()).unwrap();
            ViewFile::new(
                fd,
                sparse.len() as u64,
                id,
                BlockCipher::new(&key, id, crate::crypto::Layout::Sealed),
            )
        };
        let whole = view().read(&derived, 0, 1 << 20).unwrap();
        assert_eq!(whole.len() as u64, view_size(sparse.len() as u64));
        for step in [1usize, 7, 1000, 4124, 5000] {
            let v = view();
            let mut pieces = Vec::new();
            while pieces.len() < whole.len() {
                pieces.extend(v.read(&derived, pieces.len() as u64, step).unwrap());
            }
            assert_eq!(pieces, whole, "pieces of {step}");
        }
        assert_eq!(&whole[..HEADER_LEN], &header::encode(&id));
        let blocks = sparse.len().div_ceil(BLOCK_SIZE) as u64;
        let mut opened = vec![0u8; sparse.len()];
        BlockCipher::new(&key, id, crate::crypto::Layout::Sealed)
            .open_blocks(0, blocks - 1, &whole[HEADER_LEN..], &mut opened)
            .unwrap();
        assert_eq!(opened, sparse);
        assert!(
            whole[HEADER_LEN + CIPHER_BLOCK_SIZE..HEADER_LEN + 2 * CIPHER_BLOCK_SIZE]
                .iter()
                .all(|&b| b == 0),
            "the hole is served as a hole"
        );
    }

    #[test]
    fn view_sizes_match_the_forward_format() {
        assert_eq!(view_size(0), 46);
        assert_eq!(view_size(1), 18 + 1 + 28);
        assert_eq!(view_size(4096), 18 + 4124);
        assert_eq!(view_size(4097), 18 + 4124 + 29);
        for plain in [0u64, 1, 4095, 4096, 4097, 1 << 20] {
            if plain > 0 {
                assert_eq!(crate::volume::content::plain_size(view_size(plain)), plain);
            }
        }
    }
}
