#![no_main]
//! File headers from untrusted backing files.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = kmsfs::volume::header::decode(data) {
        assert_eq!(kmsfs::volume::header::decode(&kmsfs::volume::header::encode(&id)), Ok(id));
    }
    let _ = kmsfs::volume::content::plain_size(data.len() as u64);
});
