//! Derived keys: what a reverse view needs to be deterministic. From one
//! volume secret come each file's id and data key, each directory's IV and
//! every nonce, as functions of a stable identity (an inode number) and the
//! content, so that the same plaintext always gives the same ciphertext
//! (docs/FORMAT.md, "Derived keys").

use aws_lc_rs::hmac;

use super::aead::NONCE_LEN;
use super::block::{FILE_ID_LEN, FileId};
use super::keys::SecretKey;
use super::names::DIR_IV_LEN;

pub struct DerivedKeys {
    ids: hmac::Key,
    nonces: hmac::Key,
    data_keys: SecretKey,
}

impl DerivedKeys {
    pub fn new(secret: &SecretKey) -> Self {
        let hmac_key = |info: &[u8]| hmac::Key::new(hmac::HMAC_SHA256, secret.derive(info).expose());
        DerivedKeys {
            ids: hmac_key(b"kmsfs-derived-ids-v1"),
            nonces: hmac_key(b"kmsfs-derived-nonces-v1"),
            data_keys: secret.derive(b"kmsfs-derived-data-keys-v1"),
        }
    }

    /// The file id of the regular file with this identity; `None` in the
    /// (2^-128) case that it comes out all zero, which no header may hold.
    pub fn file_id(&self, identity: u64) -> Option<FileId> {
        let id: FileId = truncated(&self.ids, &[b"file\0", &identity.to_be_bytes()]);
        (id != [0u8; FILE_ID_LEN]).then_some(id)
    }

    /// The IV of the directory with this identity.
    pub fn dir_iv(&self, identity: u64) -> [u8; DIR_IV_LEN] {
        truncated(&self.ids, &[b"dir\0", &identity.to_be_bytes()])
    }

    /// The data key of a file whose id has no row in the metadata DB.
    pub fn data_key(&self, file_id: &FileId) -> SecretKey {
        self.data_keys
            .derive(&[b"kmsfs-derived-dek-v1\0".as_slice(), file_id].concat())
    }

    /// The nonce of block `index` of a file.
    pub fn block_nonce(&self, file_id: &FileId, index: u64) -> [u8; NONCE_LEN] {
        truncated(&self.nonces, &[b"block\0", file_id, &index.to_be_bytes()])
    }

    /// A stable number for something of the view that has no inode of its
    /// own (a directory IV file, a sidecar): `purpose` and `parts` as for
    /// `nonce`, under the ids key.
    pub fn number(&self, purpose: &str, parts: &[&[u8]]) -> u64 {
        u64::from_be_bytes(truncated(&self.ids, &[&labelled(purpose, parts)]))
    }

    /// The nonce of a sealed symlink target or xattr value: `purpose`, then
    /// each part with its length in front (so that parts cannot run into
    /// each other).
    pub fn nonce(&self, purpose: &str, parts: &[&[u8]]) -> [u8; NONCE_LEN] {
        truncated(&self.nonces, &[&labelled(purpose, parts)])
    }
}

/// `purpose || 0x00`, then each part as `len (u64) || part`.
fn labelled(purpose: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut input = [purpose.as_bytes(), b"\0"].concat();
    for part in parts {
        input.extend_from_slice(&(part.len() as u64).to_be_bytes());
        input.extend_from_slice(part);
    }
    input
}

fn truncated<const N: usize>(key: &hmac::Key, parts: &[&[u8]]) -> [u8; N] {
    let mut context = hmac::Context::with_key(key);
    for part in parts {
        context.update(part);
    }
    let tag = context.sign();
    let mut out = [0u8; N];
    out.copy_from_slice(&tag.as_ref()[..N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivations_are_fixed_and_separated_by_purpose() {
        let secret = SecretKey::from_slice(&[3u8; 32]).unwrap();
        let (a, b) = (DerivedKeys::new(&secret), DerivedKeys::new(&secret));
        let id = a.file_id(42).unwrap();
        assert_eq!(Some(id), b.file_id(42));
        assert_ne!(Some(id), a.file_id(43));
        assert_ne!(id, a.dir_iv(42), "a file and a directory of one identity");
        assert!(a.data_key(&id) == b.data_key(&id));
        assert!(a.data_key(&id) != a.data_key(&a.file_id(43).unwrap()));
        assert_eq!(a.block_nonce(&id, 0), b.block_nonce(&id, 0));
        assert_ne!(a.block_nonce(&id, 0), a.block_nonce(&id, 1));
        assert_ne!(a.nonce("x", &[b"ab", b"c"]), a.nonce("x", &[b"a", b"bc"]));
        let other = DerivedKeys::new(&SecretKey::from_slice(&[4u8; 32]).unwrap());
        assert_ne!(Some(id), other.file_id(42), "another volume");
    }
}
