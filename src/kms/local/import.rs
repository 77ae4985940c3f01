//! Bring your own key, as AWS KMS's GetParametersForImport and
//! ImportKeyMaterial: a key created with origin `external` has no material
//! until the user imports 256 bits of it, wrapped with RSAES-OAEP SHA-256
//! under a one-time RSA-3072 public key kmsfs hands out with an import
//! token. Imported material may carry an expiry, after which the key is
//! unusable (PendingImport) until the same material is imported again.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeySize, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, PrivateDecryptingKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{KeyInfo, KeyState, KeyVersion, LocalKeystore, MasterKeyRecord, Origin, material_aad};
use crate::crypto::{Sealer, random_array};
use crate::kms::KmsError;

/// How long import parameters stay valid (as AWS KMS: 24 hours).
const PARAMS_LIFETIME: u64 = 24 * 3600;
pub const WRAPPING_ALGORITHM: &str = "RSAES_OAEP_SHA_256";
pub const WRAPPING_KEY_SPEC: &str = "RSA_3072";

#[derive(Clone, Default, Serialize, Deserialize)]
pub struct ImportState {
    /// The latest import parameters; used once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    params: Option<PendingParams>,
    /// When the imported material expires (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub material_valid_to: Option<u64>,
    /// SHA-256 of the imported material, sealed under the key-encryption
    /// key: a re-import must bring the same material.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    material_check: Option<String>,
}

impl ImportState {
    /// Seals what this state keeps under `old` again under `new` (the
    /// keystore's secret changes).
    pub(super) fn reseal(&mut self, id: &str, old: &Sealer, new: &Sealer) -> Result<(), KmsError> {
        let reseal = |aad: &[u8], text: &str| -> Result<String, KmsError> {
            let sealed = B64
                .decode(text)
                .map_err(|_| rejected(id, "stored import state is not base64"))?;
            let plain = old
                .open(aad, &sealed)
                .map_err(|_| rejected(id, "stored import state fails authentication"))?;
            Ok(B64.encode(new.seal(aad, &plain)))
        };
        if let Some(p) = &mut self.params {
            p.wrapping_key = reseal(&wrapping_key_aad(id, &p.token), &p.wrapping_key)?;
        }
        if let Some(check) = &mut self.material_check {
            *check = reseal(&check_aad(id), check)?;
        }
        Ok(())
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct PendingParams {
    token: String,
    /// The RSA private key (PKCS#8), sealed under the key-encryption key.
    wrapping_key: String,
    valid_to: u64,
}

/// What `key import-params` hands out.
#[derive(Debug, Serialize)]
pub struct ImportParameters {
    pub key_id: String,
    pub wrapping_algorithm: &'static str,
    pub wrapping_key_spec: &'static str,
    pub public_key_pem: String,
    pub import_token: String,
    pub parameters_valid_to: u64,
}

fn wrapping_key_aad(key_id: &str, token: &str) -> Vec<u8> {
    [
        b"kmsfs-keystore-import-wrapping-key-v1\0",
        key_id.as_bytes(),
        b"\0",
        token.as_bytes(),
    ]
    .concat()
}

fn check_aad(key_id: &str) -> Vec<u8> {
    [b"kmsfs-keystore-import-check-v1\0".as_slice(), key_id.as_bytes()].concat()
}

fn rejected(key: &str, reason: impl Into<String>) -> KmsError {
    KmsError::ImportRejected {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn pem(der: &[u8]) -> String {
    let body = B64.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        lines.join("\n")
    )
}

impl MasterKeyRecord {
    /// Imported material whose expiry has passed (the key then waits for a re-import).
    pub(super) fn import_has_expired(&self) -> bool {
        self.origin == Origin::External
            && !self.versions.is_empty()
            && self
                .import
                .as_ref()
                .and_then(|i| i.material_valid_to)
                .is_some_and(|to| crate::util::unix_now() >= to)
    }

    /// Imported keys keep the one material their owner brought.
    pub(super) fn refuse_if_imported(&self, action: &str) -> Result<(), KmsError> {
        if self.origin == Origin::External {
            return Err(KmsError::ImportedKey {
                key: self.id.clone(),
                action: action.to_string(),
            });
        }
        Ok(())
    }

    /// Destroys expired imported material; the key waits for a re-import.
    pub(super) fn expire_import(&mut self) {
        self.versions.clear();
        if self.state != KeyState::PendingDeletion {
            self.state = KeyState::PendingImport;
        }
    }

    fn check_importable(&self) -> Result<(), KmsError> {
        if self.origin != Origin::External {
            return Err(rejected(
                &self.id,
                "it was created with its own material (origin generated)",
            ));
        }
        if matches!(self.state, KeyState::PendingDeletion | KeyState::Deleted) {
            return Err(KmsError::KeyNotUsable {
                key: self.id.clone(),
                state: format!("{:?} (importing is not possible in that state)", self.state),
            });
        }
        Ok(())
    }
}

impl LocalKeystore {
    /// GetParametersForImport: a fresh RSA-3072 wrapping key and a token,
    /// valid 24 hours; they replace any earlier ones.
    pub fn import_params(&self, id_or_alias: &str) -> Result<ImportParameters, KmsError> {
        self.audited("GetParametersForImport", id_or_alias, None, || {
            self.update(|kek, file| {
                let record = file.key_mut(id_or_alias)?;
                record.check_importable()?;
                let private = PrivateDecryptingKey::generate(KeySize::Rsa3072)
                    .map_err(|_| rejected(&record.id, "could not generate an RSA key"))?;
                let pkcs8 = private
                    .as_der()
                    .map_err(|_| rejected(&record.id, "could not encode the RSA key"))?;
                let public = private
                    .public_key()
                    .as_der()
                    .map_err(|_| rejected(&record.id, "could not encode the RSA public key"))?;
                let token = crate::util::hex(&random_array::<16>());
                let valid_to = crate::util::unix_now() + PARAMS_LIFETIME;
                let sealed = kek.seal(&wrapping_key_aad(&record.id, &token), pkcs8.as_ref());
                record.import.get_or_insert_with(ImportState::default).params = Some(PendingParams {
                    token: token.clone(),
                    wrapping_key: B64.encode(sealed),
                    valid_to,
                });
                Ok(ImportParameters {
                    key_id: record.id.clone(),
                    wrapping_algorithm: WRAPPING_ALGORITHM,
                    wrapping_key_spec: WRAPPING_KEY_SPEC,
                    public_key_pem: pem(public.as_ref()),
                    import_token: token,
                    parameters_valid_to: valid_to,
                })
            })
        })
    }

    /// ImportKeyMaterial: `wrapped` is 32 bytes of key material encrypted
    /// with the latest parameters' public key (RSAES-OAEP, SHA-256 and
    /// MGF1 SHA-256). The parameters are used up. `valid_to` makes the
    /// material expire; a re-import must bring the same material.
    pub fn import_material(
        &self,
        id_or_alias: &str,
        wrapped: &[u8],
        valid_to: Option<u64>,
        token: Option<&str>,
    ) -> Result<KeyInfo, KmsError> {
        let details = serde_json::json!({ "valid_to": valid_to.map(crate::util::utc_date) });
        self.audited("ImportKeyMaterial", id_or_alias, Some(details), || {
            if let Some(to) = valid_to.filter(|&to| to <= crate::util::unix_now()) {
                return Err(KmsError::BadSetting {
                    name: "--valid-to",
                    message: format!("{} is not in the future", crate::util::utc_date(to)),
                });
            }
            self.update(|kek, file| {
                let record = file.key_mut(id_or_alias)?;
                record.check_importable()?;
                let id = record.id.clone();
                let state = record.import.get_or_insert_with(ImportState::default);
                let params = state
                    .params
                    .clone()
                    .filter(|p| crate::util::unix_now() < p.valid_to)
                    .ok_or_else(|| {
                        rejected(&id, "no valid import parameters (they last 24 hours and are used once): run `kmsfs key import-params` and wrap the material again")
                    })?;
                if token.is_some_and(|t| t != params.token) {
                    return Err(rejected(&id, "the import token is not the one of the latest import parameters"));
                }
                let material = unwrap_material(kek, &id, &params, wrapped)?;
                let digest = Sha256::digest(material.as_slice());
                match &state.material_check {
                    Some(check) => {
                        let sealed = B64.decode(check).map_err(|_| rejected(&id, "stored material check is not base64"))?;
                        let known = kek.open(&check_aad(&id), &sealed).map_err(|_| rejected(&id, "stored material check fails authentication"))?;
                        if known.as_slice() != digest.as_slice() {
                            return Err(rejected(&id, "this is not the material the key had: an imported key only ever takes the same material (create a new key for new material)"));
                        }
                    }
                    None => state.material_check = Some(B64.encode(kek.seal(&check_aad(&id), &digest))),
                }
                state.params = None;
                state.material_valid_to = valid_to;
                record.versions = vec![KeyVersion {
                    version: 1,
                    created: crate::util::unix_now(),
                    material: B64.encode(kek.seal(&material_aad(&id, 1), &material)),
                }];
                if record.state == KeyState::PendingImport {
                    record.state = KeyState::Enabled;
                }
                Ok(record.info())
            })
        })
    }
}

fn unwrap_material(
    kek: &Sealer,
    id: &str,
    params: &PendingParams,
    wrapped: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KmsError> {
    let sealed = B64
        .decode(&params.wrapping_key)
        .map_err(|_| rejected(id, "stored wrapping key is not base64"))?;
    let pkcs8 = kek
        .open(&wrapping_key_aad(id, &params.token), &sealed)
        .map_err(|_| rejected(id, "stored wrapping key fails authentication"))?;
    let private = PrivateDecryptingKey::from_pkcs8(&pkcs8)
        .ok()
        .and_then(|k| OaepPrivateDecryptingKey::new(k).ok())
        .ok_or_else(|| rejected(id, "stored wrapping key is not an RSA key"))?;
    let mut out = Zeroizing::new(vec![0u8; private.min_output_size()]);
    let len = private
        .decrypt(&OAEP_SHA256_MGF1SHA256, wrapped, &mut out, None)
        .map_err(|_| {
            rejected(
                id,
                "the material does not decrypt with these parameters' wrapping key: wrap it with RSAES-OAEP \
                 (SHA-256, MGF1 SHA-256) under the public key `key import-params` gave, unchanged",
            )
        })?
        .len();
    if len != 32 {
        return Err(rejected(
            id,
            format!("the material is {len} bytes; a 256-bit (32-byte) symmetric key is needed"),
        ));
    }
    out.truncate(32);
    Ok(out)
}
