#![no_main]
//! Opening stored blocks: arbitrary (tampered) ciphertext never panics and
//! never yields plaintext for bytes that were not sealed.
use kmsfs::crypto::{BlockCipher, Layout, SecretKey, BLOCK_OVERHEAD, CIPHER_BLOCK_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let layout = if data.first().is_some_and(|b| b & 1 == 1) { Layout::Sealed } else { Layout::Lenient };
    let cipher = BlockCipher::new(&SecretKey::from_slice(&[9u8; 32]).expect("key"), [4u8; 16], layout);
    let count = data.len().div_ceil(CIPHER_BLOCK_SIZE);
    let Some(plain_len) = data.len().checked_sub(count * BLOCK_OVERHEAD) else { return };
    let mut out = vec![0u8; plain_len];
    let final_index = count.saturating_sub(1) as u64;
    if cipher.open_blocks(0, final_index, data, &mut out).is_ok() {
        // Only all-zero holes open without a valid tag, and with the sealed
        // layout never as the final block.
        for (i, (sealed, plain)) in data.chunks(CIPHER_BLOCK_SIZE).zip(out.chunks(4096)).enumerate() {
            if sealed.iter().all(|&b| b == 0) {
                assert!(plain.iter().all(|&b| b == 0));
                assert!(!(layout == Layout::Sealed && i as u64 == final_index));
            }
        }
    }
});
