//! Content blocks: 4 KiB of plaintext sealed with AES-256-GCM-SIV under the
//! file's data key, bound to the file id, the block index and whether the
//! block is the file's last one.

use rayon::prelude::*;

use super::aead::{AuthError, NONCE_LEN, SEAL_OVERHEAD, Sealer};
use super::keys::{SecretKey, random_array};

pub const BLOCK_SIZE: usize = 4096;
pub const BLOCK_OVERHEAD: usize = SEAL_OVERHEAD;
pub const CIPHER_BLOCK_SIZE: usize = BLOCK_SIZE + BLOCK_OVERHEAD;
pub const FILE_ID_LEN: usize = 16;

/// Below this many blocks the cost of handing work to rayon exceeds the
/// gain; it is also the smallest batch one rayon task gets.
const PARALLEL_MIN_BLOCKS: usize = 8;

/// Nonces for up to this many blocks are drawn into a stack buffer: a 1 MiB
/// request spans at most 257 blocks.
const MAX_STACK_BLOCKS: usize = 260;

pub type FileId = [u8; FILE_ID_LEN];

/// What a file's end promises, as the volume's format decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Format 1: a file may have no header or only a header (both empty),
    /// and its final block may be a hole. Cuts to those lengths, and zero
    /// blocks appended, are not detected.
    Lenient,
    /// Format 2: every file has a header and ends in an authenticated final
    /// block (an empty one for an empty file); a hole is never final.
    Sealed,
}

/// Seals and opens the blocks of one file.
pub struct BlockCipher {
    sealer: Sealer,
    file_id: FileId,
    layout: Layout,
}

fn block_aad(file_id: &FileId, index: u64, last: bool) -> [u8; FILE_ID_LEN + 9] {
    let mut aad = [0u8; FILE_ID_LEN + 9];
    aad[..FILE_ID_LEN].copy_from_slice(file_id);
    aad[FILE_ID_LEN..FILE_ID_LEN + 8].copy_from_slice(&index.to_be_bytes());
    aad[FILE_ID_LEN + 8] = u8::from(last);
    aad
}

/// The stored length of `plain_len` bytes of consecutive blocks.
pub fn sealed_len(plain_len: usize) -> usize {
    plain_len + plain_len.div_ceil(BLOCK_SIZE) * BLOCK_OVERHEAD
}

/// A block whose stored bytes are all zero is a hole (see docs/FORMAT.md).
pub fn is_hole(sealed: &[u8]) -> bool {
    sealed.iter().all(|&b| b == 0)
}

impl BlockCipher {
    pub fn new(data_key: &SecretKey, file_id: FileId, layout: Layout) -> Self {
        BlockCipher {
            sealer: Sealer::new(data_key),
            file_id,
            layout,
        }
    }

    pub fn file_id(&self) -> &FileId {
        &self.file_id
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Seals consecutive plaintext blocks starting at block `first_index`.
    /// `plaintext` is split into 4 KiB blocks (the final one may be shorter);
    /// `final_index` is the index of the file's last block after this write.
    /// Returns the sealed blocks back to back.
    pub fn seal_blocks(&self, first_index: u64, final_index: u64, plaintext: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; sealed_len(plaintext.len())];
        self.seal_blocks_into(first_index, final_index, plaintext, &mut out);
        out
    }

    /// As `seal_blocks`, into `out`, which must be exactly
    /// `sealed_len(plaintext.len())` bytes long, so that a caller can reuse
    /// one buffer for every write.
    pub fn seal_blocks_into(&self, first_index: u64, final_index: u64, plaintext: &[u8], out: &mut [u8]) {
        let count = plaintext.len().div_ceil(BLOCK_SIZE);
        // One request of up to 1 MiB (plus an unaligned edge) fits on the stack.
        let mut stack_nonces = [0u8; NONCE_LEN * (MAX_STACK_BLOCKS)];
        let mut heap_nonces = Vec::new();
        let nonces: &mut [u8] = if count <= MAX_STACK_BLOCKS {
            &mut stack_nonces[..count * NONCE_LEN]
        } else {
            heap_nonces.resize(count * NONCE_LEN, 0);
            &mut heap_nonces
        };
        getrandom::fill(nonces).expect("the operating system's random number generator failed");
        let nonces: &[u8] = nonces;
        self.seal_each(first_index, final_index, plaintext, out, |i, _| {
            let mut nonce = [0u8; NONCE_LEN];
            nonce.copy_from_slice(&nonces[i * NONCE_LEN..(i + 1) * NONCE_LEN]);
            nonce
        });
    }

    /// As `seal_blocks_into`, with each block's nonce given by `nonce_of`
    /// (its index): the same plaintext then seals to the same bytes, which
    /// is what a reverse view needs (AES-GCM-SIV tolerates the reuse).
    pub fn seal_blocks_with_nonces(
        &self,
        first_index: u64,
        final_index: u64,
        plaintext: &[u8],
        out: &mut [u8],
        nonce_of: impl Fn(u64) -> [u8; NONCE_LEN] + Sync,
    ) {
        self.seal_each(first_index, final_index, plaintext, out, |_, index| nonce_of(index));
    }

    fn seal_each(
        &self,
        first_index: u64,
        final_index: u64,
        plaintext: &[u8],
        out: &mut [u8],
        nonce: impl Fn(usize, u64) -> [u8; NONCE_LEN] + Sync,
    ) {
        assert_eq!(out.len(), sealed_len(plaintext.len()), "sealed buffer size");
        let count = plaintext.len().div_ceil(BLOCK_SIZE);
        let seal_one = |(i, (plain, sealed)): (usize, (&[u8], &mut [u8]))| {
            let index = first_index + i as u64;
            let aad = block_aad(&self.file_id, index, index == final_index);
            self.sealer.seal_into(nonce(i, index), &aad, plain, sealed);
        };
        if count >= PARALLEL_MIN_BLOCKS {
            plaintext
                .par_chunks(BLOCK_SIZE)
                .zip(out.par_chunks_mut(CIPHER_BLOCK_SIZE))
                .enumerate()
                .with_min_len(PARALLEL_MIN_BLOCKS)
                .for_each(seal_one);
        } else {
            plaintext
                .chunks(BLOCK_SIZE)
                .zip(out.chunks_mut(CIPHER_BLOCK_SIZE))
                .enumerate()
                .for_each(seal_one);
        }
    }

    /// Seals a single block with a fresh nonce.
    pub fn seal_block(&self, index: u64, last: bool, plaintext: &[u8]) -> Vec<u8> {
        self.seal_block_with_nonce(index, last, plaintext, random_array())
    }

    /// Seals a single block with a given nonce (a reverse view's derived one).
    pub fn seal_block_with_nonce(&self, index: u64, last: bool, plaintext: &[u8], nonce: [u8; NONCE_LEN]) -> Vec<u8> {
        let mut out = vec![0u8; plaintext.len() + BLOCK_OVERHEAD];
        self.sealer
            .seal_into(nonce, &block_aad(&self.file_id, index, last), plaintext, &mut out);
        out
    }

    /// Opens one stored block. A non-final block that was sealed as final is
    /// accepted too: that is what an append interrupted by a crash leaves
    /// behind, and it cannot be used to shorten a file (the real final block
    /// must still carry the final flag). With the sealed layout a hole is
    /// never final, so zero blocks appended to a file do not open.
    pub fn open_block(&self, index: u64, is_final: bool, sealed: &[u8], out: &mut [u8]) -> Result<(), AuthError> {
        if is_hole(sealed) && !(is_final && self.layout == Layout::Sealed) {
            out.fill(0);
            return Ok(());
        }
        let aad = block_aad(&self.file_id, index, is_final);
        match self.sealer.open_into(&aad, sealed, out) {
            Ok(()) => Ok(()),
            Err(e) if is_final => Err(e),
            Err(_) => {
                let aad = block_aad(&self.file_id, index, true);
                self.sealer.open_into(&aad, sealed, out)
            }
        }
    }

    /// Opens consecutive stored blocks starting at `first_index` into
    /// `out` (whose length must be the plaintext length). On failure returns
    /// the index of the first block that did not authenticate.
    pub fn open_blocks(&self, first_index: u64, final_index: u64, sealed: &[u8], out: &mut [u8]) -> Result<(), u64> {
        let count = sealed.len().div_ceil(CIPHER_BLOCK_SIZE);
        if out.len() + count * BLOCK_OVERHEAD != sealed.len() {
            return Err(first_index + count.saturating_sub(1) as u64);
        }
        let open_one = |(i, (sealed, plain)): (usize, (&[u8], &mut [u8]))| {
            let index = first_index + i as u64;
            self.open_block(index, index == final_index, sealed, plain)
                .map_err(|_| index)
        };
        if count >= PARALLEL_MIN_BLOCKS {
            sealed
                .par_chunks(CIPHER_BLOCK_SIZE)
                .zip(out.par_chunks_mut(BLOCK_SIZE))
                .enumerate()
                .with_min_len(PARALLEL_MIN_BLOCKS)
                .map(open_one)
                .collect::<Result<Vec<()>, u64>>()
                .map(|_| ())
        } else {
            sealed
                .chunks(CIPHER_BLOCK_SIZE)
                .zip(out.chunks_mut(BLOCK_SIZE))
                .enumerate()
                .try_for_each(open_one)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(id: u8) -> BlockCipher {
        BlockCipher::new(
            &SecretKey::from_slice(&[7u8; 32]).unwrap(),
            [id; FILE_ID_LEN],
            Layout::Lenient,
        )
    }

    #[test]
    fn blocks_round_trip_in_parallel_and_serially() {
        let c = cipher(1);
        for len in [1usize, 4096, 4097, 20 * 4096 + 5] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let count = len.div_ceil(BLOCK_SIZE) as u64;
            let sealed = c.seal_blocks(3, 3 + count - 1, &plain);
            let mut out = vec![0u8; len];
            c.open_blocks(3, 3 + count - 1, &sealed, &mut out).unwrap();
            assert_eq!(out, plain);
        }
    }

    #[test]
    fn blocks_are_bound_to_file_index_and_finality() {
        let c = cipher(1);
        let sealed = c.seal_block(5, false, &[9u8; BLOCK_SIZE]);
        let mut out = vec![0u8; BLOCK_SIZE];
        assert!(c.open_block(5, false, &sealed, &mut out).is_ok());
        assert!(
            c.open_block(6, false, &sealed, &mut out).is_err(),
            "moved within the file"
        );
        assert!(
            c.open_block(5, true, &sealed, &mut out).is_err(),
            "file cut after this block"
        );
        assert!(
            cipher(2).open_block(5, false, &sealed, &mut out).is_err(),
            "moved to another file"
        );
        assert!(out.iter().all(|&b| b == 0), "no unauthenticated plaintext leaks out");
    }

    #[test]
    fn all_zero_block_is_a_hole() {
        let c = cipher(1);
        let mut out = vec![1u8; 100];
        c.open_block(0, true, &[0u8; 100 + BLOCK_OVERHEAD], &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
    }

    #[test]
    fn sealed_layout_never_ends_in_a_hole() {
        let c = BlockCipher::new(
            &SecretKey::from_slice(&[7u8; 32]).unwrap(),
            [1; FILE_ID_LEN],
            Layout::Sealed,
        );
        let mut out = vec![1u8; BLOCK_SIZE];
        let hole = [0u8; CIPHER_BLOCK_SIZE];
        c.open_block(3, false, &hole, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0), "a hole inside the file reads as zeros");
        assert!(
            c.open_block(4, true, &hole, &mut out).is_err(),
            "a hole as the last block"
        );
        let empty_final = c.seal_block(0, true, &[]);
        assert_eq!(empty_final.len(), BLOCK_OVERHEAD);
        c.open_block(0, true, &empty_final, &mut []).unwrap();
        assert!(c.open_block(0, true, &[0u8; BLOCK_OVERHEAD], &mut []).is_err());
    }
}
