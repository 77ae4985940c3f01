#![no_main]
//! Long-name entries and their sidecar files from an untrusted backing directory.
use kmsfs::crypto::{NameCipher, SecretKey};
use kmsfs::volume::layout::{self, Entry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let names = NameCipher::new(&SecretKey::from_slice(&[3u8; 32]).expect("key"));
    let split = data.first().map(|&b| b as usize).unwrap_or(0).min(data.len());
    let (entry, sidecar) = data.split_at(split);
    if let Entry::Long { hashed, .. } = layout::classify(entry) {
        let _ = layout::decrypt_long(&names, &[2u8; 16], hashed, sidecar);
    }
    let _ = layout::decrypt_long(&names, &[2u8; 16], "kmsfs.longname.x", data);
});
