//! What unlocks a keystore: a passphrase through Argon2id, or a 32-byte key
//! file through HKDF-SHA256; either gives the key-encryption key.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{LocalKeystore, VERIFIER_AAD, VERIFIER_PLAINTEXT, corrupt, io_err, material_aad, unusable};
use crate::crypto::{KEY_LEN, Sealer, SecretKey, random_array};
use crate::kms::KmsError;

/// What unlocks the keystore.
pub enum UnlockSecret {
    Passphrase(Zeroizing<String>),
    KeyFile(PathBuf),
}

/// Argon2id cost parameters, stored in the keystore so they can be raised later.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

/// The weakest Argon2id setting a new keystore accepts: OWASP's minimum
/// for Argon2id (19 MiB of memory, 2 passes).
pub const MIN_KDF: KdfParams = KdfParams {
    memory_kib: 19 * 1024,
    iterations: 2,
    parallelism: 1,
};

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub(super) enum Protection {
    Argon2id { params: KdfParams, salt: String },
    KeyFile { salt: String },
}

impl Protection {
    /// How a new secret protects the keystore: a fresh salt, and for a
    /// passphrase Argon2id no weaker than MIN_KDF.
    pub(super) fn new(secret: &UnlockSecret, kdf: KdfParams) -> Result<Self, KmsError> {
        let salt = B64.encode(random_array::<16>());
        Ok(match secret {
            UnlockSecret::Passphrase(p) => {
                if p.is_empty() {
                    return Err(KmsError::BadSecret("the passphrase must not be empty".into()));
                }
                if kdf.memory_kib < MIN_KDF.memory_kib || kdf.iterations < MIN_KDF.iterations || kdf.parallelism < 1 {
                    return Err(KmsError::WeakKdf {
                        memory_mib: kdf.memory_kib / 1024,
                        iterations: kdf.iterations,
                    });
                }
                Protection::Argon2id { params: kdf, salt }
            }
            UnlockSecret::KeyFile(_) => Protection::KeyFile { salt },
        })
    }
}

impl LocalKeystore {
    /// Protects the keystore with another secret (a new passphrase, a key
    /// file instead of one or the other way round, a higher Argon2id
    /// cost): every key's material is sealed again under the new
    /// key-encryption key, in one atomic rewrite. Volumes are not touched:
    /// their keys are wrapped by the master keys, which do not change.
    pub fn change_secret(&mut self, secret: &UnlockSecret, kdf: KdfParams) -> Result<(), KmsError> {
        let protection = Protection::new(secret, kdf)?;
        let new_kek = Sealer::new(&derive_kek(&protection, secret, &self.path)?);
        let _lock = super::super::locked_file::lock(&self.path).map_err(io_err(&self.path))?;
        let mut file = self.reread()?;
        for key in &mut file.keys {
            if let Some(import) = &mut key.import {
                import.reseal(&key.id, &self.kek, &new_kek)?;
            }
            for version in &mut key.versions {
                let aad = material_aad(&key.id, version.version);
                let sealed = B64
                    .decode(&version.material)
                    .map_err(|_| corrupt(&self.path, "key material is not base64"))?;
                let plain = Zeroizing::new(self.kek.open(&aad, &sealed).map_err(|_| {
                    corrupt(
                        &self.path,
                        format!("material of key {} v{} fails authentication", key.id, version.version),
                    )
                })?);
                version.material = B64.encode(new_kek.seal(&aad, &plain));
            }
        }
        file.protection = protection;
        file.verifier = B64.encode(new_kek.seal(VERIFIER_AAD, VERIFIER_PLAINTEXT));
        Self::write(&self.path, &new_kek, &mut file, false)?;
        self.kek = new_kek;
        *crate::util::write(&self.file) = file;
        Ok(())
    }
}

fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, KmsError> {
    let bytes = Zeroizing::new(fs::read(path).map_err(io_err(path))?);
    if bytes.len() != KEY_LEN {
        return Err(KmsError::BadSecret(format!(
            "key file {} must hold exactly {KEY_LEN} bytes, it holds {}",
            path.display(),
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Creates a key file with 32 random bytes, readable only by its owner.
pub fn create_key_file(path: &Path) -> Result<(), KmsError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    let bytes = Zeroizing::new(random_array::<KEY_LEN>());
    file.write_all(bytes.as_slice()).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

pub(super) fn derive_kek(protection: &Protection, secret: &UnlockSecret, path: &Path) -> Result<SecretKey, KmsError> {
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    match (protection, secret) {
        (Protection::Argon2id { params, salt }, UnlockSecret::Passphrase(pass)) => {
            let salt = B64.decode(salt).map_err(|_| corrupt(path, "salt is not base64"))?;
            let params = Params::new(params.memory_kib, params.iterations, params.parallelism, Some(KEY_LEN))
                .map_err(|e| corrupt(path, format!("bad Argon2id parameters: {e}")))?;
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password_into(pass.as_bytes(), &salt, out.as_mut_slice())
                .map_err(|e| unusable(path, format!("Argon2id failed: {e}")))?;
        }
        (Protection::KeyFile { salt }, UnlockSecret::KeyFile(key_path)) => {
            let salt = B64.decode(salt).map_err(|_| corrupt(path, "salt is not base64"))?;
            let ikm = read_key_file(key_path)?;
            hkdf::Hkdf::<sha2::Sha256>::new(Some(&salt), &ikm)
                .expand(b"kmsfs-keyfile-kek-v1", out.as_mut_slice())
                .map_err(|_| corrupt(path, "HKDF output length"))?;
        }
        (Protection::Argon2id { .. }, UnlockSecret::KeyFile(_)) => {
            return Err(KmsError::BadSecret(format!(
                "keystore {} is protected by a passphrase, not a key file",
                path.display()
            )));
        }
        (Protection::KeyFile { .. }, UnlockSecret::Passphrase(_)) => {
            return Err(KmsError::BadSecret(format!(
                "keystore {} is protected by a key file: pass --key-file",
                path.display()
            )));
        }
    }
    SecretKey::from_slice(out.as_slice()).ok_or_else(|| corrupt(path, "key length"))
}
