//! Key types. A plaintext key (`SecretKey`) and a wrapped key (`WrappedKey`)
//! are different types so that one can never be stored where the other belongs.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

pub const KEY_LEN: usize = 32;

/// Fills an array from the operating system's CSPRNG.
pub fn random_array<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    // The kernel CSPRNG does not fail once the system is booted; if it does,
    // continuing with predictable keys or nonces would be far worse than a panic.
    getrandom::fill(&mut out).expect("the operating system's random number generator failed");
    out
}

/// 256 bits of key material, wiped from memory when dropped and never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct SecretKey([u8; KEY_LEN]);

impl SecretKey {
    pub fn random() -> Self {
        let mut bytes = random_array::<KEY_LEN>();
        let key = SecretKey(bytes);
        bytes.zeroize();
        key
    }

    /// Copies key material out of a buffer the caller is responsible for wiping.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let array: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(SecretKey(array))
    }

    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A key for one purpose only, derived from this one with HKDF-SHA256
    /// (no salt, `info` naming the purpose): keys for different purposes
    /// never meet in one cipher.
    pub fn derive(&self, info: &[u8]) -> SecretKey {
        let mut out = [0u8; KEY_LEN];
        hkdf::Hkdf::<sha2::Sha256>::new(None, &self.0)
            .expand(info, &mut out)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let key = SecretKey(out);
        out.zeroize();
        key
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// A key sealed under another key (or by a key provider). Safe to store.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey(Vec<u8>);

impl WrappedKey {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        WrappedKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedKey({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_are_fixed_per_purpose_and_differ_between_purposes() {
        let key = SecretKey::from_slice(&[5u8; KEY_LEN]).unwrap();
        assert!(key.derive(b"kmsfs-names-v2") == key.derive(b"kmsfs-names-v2"));
        assert!(key.derive(b"kmsfs-names-v2") != key.derive(b"kmsfs-symlink-targets-v2"));
        assert!(key.derive(b"kmsfs-names-v2") != key);
        // RFC 5869 A.3 (no salt, no info), cut to our 32-byte output.
        let ikm = [0x0bu8; 22];
        let mut okm = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(None, &ikm)
            .expand(b"", &mut okm)
            .unwrap();
        assert_eq!(okm[..4], [0x8d, 0xa4, 0xe7, 0x75]);
    }
}
