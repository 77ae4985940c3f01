//! The on-disk format is AES-256-GCM-SIV as docs/FORMAT.md spells it, not
//! whatever one library does: blocks and wrapped keys sealed by kmsfs (with
//! AWS-LC) open with RustCrypto's `aes-gcm-siv`, and the other way round.

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use kmsfs::crypto::{BLOCK_SIZE, BlockCipher, Layout, Sealer, SecretKey, WrappedKey};

const NONCE: usize = 12;

/// The block associated data of FORMAT.md: file id || index (u64) || final (u8).
fn block_aad(file_id: &[u8; 16], index: u64, last: bool) -> Vec<u8> {
    [&file_id[..], &index.to_be_bytes(), &[u8::from(last)]].concat()
}

fn rustcrypto(key: &[u8; 32]) -> Aes256GcmSiv {
    Aes256GcmSiv::new_from_slice(key).unwrap()
}

/// nonce || ciphertext || tag, sealed by RustCrypto.
fn rustcrypto_seal(key: &[u8; 32], nonce: [u8; NONCE], aad: &[u8], msg: &[u8]) -> Vec<u8> {
    let sealed = rustcrypto(key)
        .encrypt(Nonce::from_slice(&nonce), Payload { msg, aad })
        .unwrap();
    [&nonce[..], &sealed].concat()
}

fn rustcrypto_open(key: &[u8; 32], aad: &[u8], stored: &[u8]) -> Option<Vec<u8>> {
    let (nonce, sealed) = stored.split_at(NONCE);
    rustcrypto(key)
        .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
        .ok()
}

#[test]
fn blocks_open_with_either_library() {
    let raw = [0x5au8; 32];
    let key = SecretKey::from_slice(&raw).unwrap();
    let file_id = [7u8; 16];
    let cipher = BlockCipher::new(&key, file_id, Layout::Sealed);
    let plain: Vec<u8> = (0..BLOCK_SIZE).map(|i| (i * 13) as u8).collect();
    for (index, last, len) in [(0u64, false, BLOCK_SIZE), (3, true, 100), (0, true, 0)] {
        let sealed = cipher.seal_block(index, last, &plain[..len]);
        assert_eq!(
            rustcrypto_open(&raw, &block_aad(&file_id, index, last), &sealed).as_deref(),
            Some(&plain[..len]),
            "kmsfs's block {index} opens with RustCrypto"
        );
        assert!(rustcrypto_open(&raw, &block_aad(&file_id, index, !last), &sealed).is_none());
        let theirs = rustcrypto_seal(&raw, [9u8; NONCE], &block_aad(&file_id, index, last), &plain[..len]);
        let mut out = vec![0u8; len];
        cipher.open_block(index, last, &theirs, &mut out).unwrap();
        assert_eq!(out, &plain[..len], "RustCrypto's block {index} opens in kmsfs");
    }
}

#[test]
fn wrapped_keys_open_with_either_library() {
    let raw_vk = [0x11u8; 32];
    let volume_key = Sealer::new(&SecretKey::from_slice(&raw_vk).unwrap());
    let dek = SecretKey::from_slice(&[0x22u8; 32]).unwrap();
    // FORMAT.md: "kmsfs-dek-v1" 0x00 || volume id || file id || vk version (u32)
    let aad = [
        b"kmsfs-dek-v1\0".as_slice(),
        &[1u8; 16],
        &[2u8; 16],
        &1u32.to_be_bytes(),
    ]
    .concat();
    let wrapped = volume_key.wrap_key(&aad, &dek);
    assert_eq!(wrapped.as_bytes().len(), 60);
    assert_eq!(
        rustcrypto_open(&raw_vk, &aad, wrapped.as_bytes()).unwrap(),
        dek.expose()
    );
    let theirs = WrappedKey::from_bytes(rustcrypto_seal(&raw_vk, [3u8; NONCE], &aad, dek.expose()));
    assert_eq!(volume_key.unwrap_key(&aad, &theirs).unwrap(), dek);
}
