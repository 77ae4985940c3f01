#![no_main]
//! Encrypted names from untrusted directory listings; round trips of plaintext names.
use kmsfs::crypto::{NameCipher, SecretKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = SecretKey::from_slice(&[7u8; 32]).expect("key");
    let names = NameCipher::new(&key);
    let iv = [1u8; 16];
    let _ = names.decrypt(&iv, data);
    if !data.is_empty() && data.len() <= 255 && !data.contains(&b'/') && !data.contains(&0) {
        let enc = names.encrypt(&iv, data);
        assert_eq!(names.decrypt(&iv, enc.as_bytes()).as_deref(), Ok(data));
    }
});
