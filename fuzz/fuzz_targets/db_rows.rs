#![no_main]
//! Rows of a tampered metadata DB and provider blobs stored in it.
use kmsfs::crypto::{Sealer, SecretKey};
use kmsfs::kms::local::LocalProvider;
use kmsfs::volume::db::decode_file_key_row;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map(|&b| b as usize).unwrap_or(0).min(data.len());
    let (id, rest) = data.split_at(split);
    let version = rest.iter().take(8).fold(0i64, |acc, &b| (acc << 8) | i64::from(b));
    if let Some((_, _, wrapped)) = decode_file_key_row(id, version, rest.to_vec()) {
        let vk = Sealer::new(&SecretKey::from_slice(&[5u8; 32]).expect("key"));
        assert!(vk.unwrap_key(b"aad", &wrapped).is_err(), "random bytes never unwrap");
        let _ = LocalProvider::blob_version(&wrapped);
    }
});
