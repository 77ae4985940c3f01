//! Names in the backing directory: encrypted names, long-name sidecars, the
//! per-directory IV file and the reserved names kmsfs keeps for itself.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::crypto::{DIR_IV_LEN, NameCipher, NameError};

pub const DIR_IV_FILE: &str = ".kmsfs.diriv";
pub const LOCK_FILE: &str = "kmsfs.lock";
pub const LONG_NAME_PREFIX: &str = "kmsfs.longname.";
pub const SIDECAR_SUFFIX: &str = ".name";
pub const TEMP_PREFIX: &str = "kmsfs.tmp.";
/// Longest name the backing filesystem accepts, and longest plaintext name kmsfs accepts.
pub const NAME_MAX: usize = 255;

pub type DirIv = [u8; DIR_IV_LEN];

/// The name of an entry in the backing directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackingName {
    /// The encrypted name itself.
    Short(String),
    /// Too long for the backing filesystem: stored under a hash, with the
    /// full encrypted name in a sidecar file.
    Long { hashed: String, encrypted: String },
}

impl BackingName {
    pub fn as_str(&self) -> &str {
        match self {
            BackingName::Short(s) => s,
            BackingName::Long { hashed, .. } => hashed,
        }
    }

    /// The sidecar file's name and content, for long names.
    pub fn sidecar(&self) -> Option<(String, &str)> {
        match self {
            BackingName::Short(_) => None,
            BackingName::Long { hashed, encrypted } => Some((format!("{hashed}{SIDECAR_SUFFIX}"), encrypted)),
        }
    }
}

fn hashed_name(encrypted: &str) -> String {
    format!(
        "{LONG_NAME_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(Sha256::digest(encrypted.as_bytes()))
    )
}

pub fn backing_name(names: &NameCipher, dir_iv: &DirIv, plain: &[u8]) -> BackingName {
    let encrypted = names.encrypt(dir_iv, plain);
    if encrypted.len() <= NAME_MAX {
        BackingName::Short(encrypted)
    } else {
        BackingName::Long {
            hashed: hashed_name(&encrypted),
            encrypted,
        }
    }
}

/// What an entry of a backing directory is.
pub enum Entry<'a> {
    /// kmsfs's own files (DB, lock, IV, sidecars, temporaries): never shown.
    Internal,
    /// An entry with an encrypted name.
    Short(&'a str),
    /// A hashed long name whose sidecar must be read.
    Long { hashed: &'a str, sidecar: String },
}

pub fn classify(backing: &[u8]) -> Entry<'_> {
    let Ok(name) = std::str::from_utf8(backing) else {
        return Entry::Internal;
    };
    if name.starts_with(LONG_NAME_PREFIX) && !name.ends_with(SIDECAR_SUFFIX) {
        return Entry::Long {
            hashed: name,
            sidecar: format!("{name}{SIDECAR_SUFFIX}"),
        };
    }
    // Encrypted names are base64url: they never contain '.', every internal name does.
    if name.contains('.') {
        return Entry::Internal;
    }
    Entry::Short(name)
}

/// Decrypts a long name from its sidecar content, checking it belongs to `hashed`.
pub fn decrypt_long(names: &NameCipher, dir_iv: &DirIv, hashed: &str, sidecar: &[u8]) -> Result<Vec<u8>, NameError> {
    let encrypted = std::str::from_utf8(sidecar)
        .map_err(|_| NameError::Encoding)?
        .trim_end();
    if hashed_name(encrypted) != hashed {
        return Err(NameError::Auth);
    }
    names.decrypt(dir_iv, encrypted.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;

    #[test]
    fn long_names_hash_and_round_trip_through_sidecar() {
        let names = NameCipher::new(&SecretKey::random());
        let iv = [4u8; DIR_IV_LEN];
        let short = backing_name(&names, &iv, b"short");
        assert!(short.sidecar().is_none());
        assert!(matches!(classify(short.as_str().as_bytes()), Entry::Short(_)));
        let plain = vec![b'n'; 255];
        let long = backing_name(&names, &iv, &plain);
        let (sidecar_name, content) = long.sidecar().unwrap();
        assert!(long.as_str().len() <= NAME_MAX && sidecar_name.len() <= NAME_MAX);
        match classify(long.as_str().as_bytes()) {
            Entry::Long { hashed, sidecar } => {
                assert_eq!(sidecar, sidecar_name);
                assert_eq!(decrypt_long(&names, &iv, hashed, content.as_bytes()).unwrap(), plain);
                assert!(decrypt_long(&names, &iv, "kmsfs.longname.other", content.as_bytes()).is_err());
            }
            _ => panic!("not a long name"),
        }
        for internal in [DIR_IV_FILE, LOCK_FILE, "kmsfs.db", "kmsfs.db-wal", &sidecar_name] {
            assert!(matches!(classify(internal.as_bytes()), Entry::Internal), "{internal}");
        }
    }
}
