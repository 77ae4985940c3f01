//! The embedded `local` provider: a keystore file with KMS semantics. Master
//! key material is sealed under a key-encryption key derived from a
//! passphrase (Argon2id) or a key file (HKDF-SHA256).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{EncryptionContext, KeyProvider, KeyStatus, KmsError, ProviderId};
use crate::crypto::{Sealer, SecretKey, WrappedKey, random_array};
use crate::util::hex;

/// Format 2 authenticates the whole file (states, aliases, dates), not only
/// the key material; format 1 keystores are read and written back as 2.
const FORMAT: u32 = 2;
const VERIFIER_AAD_V1: &[u8] = b"kmsfs-keystore-verifier-v1";
const VERIFIER_AAD: &[u8] = b"kmsfs-keystore-verifier-v2";
const VERIFIER_PLAINTEXT: &[u8] = b"kmsfs keystore";
const INTEGRITY_AAD: &[u8] = b"kmsfs-keystore-integrity-v1\0";
const DATA_KEY_BLOB_VERSION: u8 = 1;

mod import;
mod lifecycle;
mod unlock;

pub use unlock::{KdfParams, MIN_KDF, UnlockSecret, create_key_file};
use unlock::{Protection, derive_kek};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum KeyState {
    Enabled,
    Disabled,
    PendingDeletion,
    /// Its material is destroyed; the record stays so that volumes that used
    /// it say so instead of "not found".
    Deleted,
    /// An imported key without material: never imported, or its import expired.
    PendingImport,
}

/// Where a master key's material comes from (AWS KMS's Origin).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Made by kmsfs.
    #[default]
    Generated,
    /// Brought by the user (`key import-params`, then `key import`).
    External,
}

/// What `kmsfs key list` shows of a master key.
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub alias: Option<String>,
    pub description: String,
    pub state: KeyState,
    pub created: u64,
    pub versions: Vec<u32>,
    /// When a key pending deletion is destroyed (seconds since the epoch).
    pub deletion_date: Option<u64>,
    /// Automatic rotation's period, when it is on.
    pub rotation_period_days: Option<u32>,
    /// When the newest version was made (seconds since the epoch).
    pub newest_version_created: Option<u64>,
    pub origin: Origin,
    /// When imported material expires (seconds since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub material_valid_to: Option<u64>,
}

#[derive(Clone, Serialize, Deserialize)]
struct KeyVersion {
    version: u32,
    created: u64,
    /// The key material sealed under the keystore's key-encryption key.
    material: String,
}

#[derive(Clone, Serialize, Deserialize)]
struct MasterKeyRecord {
    id: String,
    alias: Option<String>,
    description: String,
    state: KeyState,
    created: u64,
    versions: Vec<KeyVersion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deletion_date: Option<u64>,
    /// Automatic rotation: a new version when the newest is this many days old.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rotation_period_days: Option<u32>,
    /// The volumes this keystore saw use the key (by volume id, hex): where
    /// they were and which versions wrap their keys. `key trim` consults it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    volumes: std::collections::BTreeMap<String, KnownVolume>,
    #[serde(default, skip_serializing_if = "is_generated")]
    origin: Origin,
    /// Imported keys: what `key import` needs (see `import.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    import: Option<import::ImportState>,
}

fn is_generated(origin: &Origin) -> bool {
    *origin == Origin::Generated
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KnownVolume {
    pub backing: PathBuf,
    pub versions: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
struct KeystoreFile {
    format: u32,
    protection: Protection,
    verifier: String,
    keys: Vec<MasterKeyRecord>,
    /// A tag over everything above, under the key-encryption key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    integrity: Option<String>,
}

impl MasterKeyRecord {
    /// A key without material: enabled once it has some (generated keys at
    /// once, imported ones at their import).
    fn new(id: String, description: &str, origin: Origin) -> Self {
        MasterKeyRecord {
            id,
            alias: None,
            description: description.to_string(),
            state: match origin {
                Origin::Generated => KeyState::Enabled,
                Origin::External => KeyState::PendingImport,
            },
            created: crate::util::unix_now(),
            versions: Vec::new(),
            deletion_date: None,
            rotation_period_days: None,
            volumes: Default::default(),
            origin,
            import: (origin == Origin::External).then(import::ImportState::default),
        }
    }

    fn info(&self) -> KeyInfo {
        KeyInfo {
            id: self.id.clone(),
            alias: self.alias.clone(),
            description: self.description.clone(),
            state: self.state,
            created: self.created,
            versions: self.versions.iter().map(|v| v.version).collect(),
            deletion_date: self.deletion_date,
            rotation_period_days: self.rotation_period_days,
            newest_version_created: self.versions.iter().map(|v| v.created).max(),
            origin: self.origin,
            material_valid_to: self.import.as_ref().and_then(|i| i.material_valid_to),
        }
    }

    /// A new version with fresh material sealed under `kek`; returns its number.
    fn add_version(&mut self, kek: &Sealer) -> u32 {
        let material = SecretKey::random();
        let version = self.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        let sealed = kek.seal(&material_aad(&self.id, version), material.expose());
        self.versions.push(KeyVersion {
            version,
            created: crate::util::unix_now(),
            material: B64.encode(sealed),
        });
        version
    }

    fn named(&self, id_or_alias: &str) -> bool {
        self.id == id_or_alias || self.alias.as_deref() == Some(id_or_alias)
    }
}

impl KeystoreFile {
    fn key_mut(&mut self, id_or_alias: &str) -> Result<&mut MasterKeyRecord, KmsError> {
        self.keys
            .iter_mut()
            .find(|k| k.named(id_or_alias))
            .ok_or_else(|| KmsError::KeyNotFound(id_or_alias.to_string()))
    }

    /// The bytes the integrity tag covers: the file as JSON without the tag.
    fn authenticated_bytes(&self, path: &Path) -> Result<Vec<u8>, KmsError> {
        let mut value = serde_json::to_value(self).map_err(|e| unusable(path, e.to_string()))?;
        if let Some(map) = value.as_object_mut() {
            map.remove("integrity");
        }
        Ok([
            INTEGRITY_AAD,
            &serde_json::to_vec(&value).map_err(|e| unusable(path, e.to_string()))?,
        ]
        .concat())
    }

    /// Checks the verifier (is this the key-encryption key?) and, from
    /// format 2 on, that nothing in the file was changed without it.
    fn check(&self, kek: &Sealer, path: &Path) -> Result<(), VerifyError> {
        let aad = match self.format {
            1 => VERIFIER_AAD_V1,
            FORMAT => VERIFIER_AAD,
            other => {
                return Err(VerifyError::Corrupt(unusable(
                    path,
                    format!("unsupported keystore format {other}: a newer kmsfs wrote it; use that version"),
                )));
            }
        };
        let verifier = B64
            .decode(&self.verifier)
            .map_err(|_| VerifyError::Corrupt(corrupt(path, "verifier is not base64")))?;
        if kek.open(aad, &verifier).is_err() {
            return Err(VerifyError::WrongKey);
        }
        if self.format == 1 {
            return Ok(());
        }
        let tag = self
            .integrity
            .as_deref()
            .and_then(|t| B64.decode(t).ok())
            .ok_or_else(|| VerifyError::Corrupt(corrupt(path, "integrity tag missing")))?;
        let aad = self.authenticated_bytes(path).map_err(VerifyError::Corrupt)?;
        kek.open(&aad, &tag).map(|_| ()).map_err(|_| {
            VerifyError::Corrupt(corrupt(
                path,
                "its contents (key states, aliases, versions) were changed outside kmsfs",
            ))
        })
    }

    /// Brings the file to the current format and seals verifier and tag.
    fn seal(&mut self, kek: &Sealer, path: &Path) -> Result<(), KmsError> {
        if self.format != FORMAT {
            self.format = FORMAT;
            self.verifier = B64.encode(kek.seal(VERIFIER_AAD, VERIFIER_PLAINTEXT));
        }
        self.integrity = None;
        let aad = self.authenticated_bytes(path)?;
        self.integrity = Some(B64.encode(kek.seal(&aad, b"")));
        Ok(())
    }
}

enum VerifyError {
    WrongKey,
    Corrupt(KmsError),
}

/// An unlocked keystore.
pub struct LocalKeystore {
    path: PathBuf,
    kek: Sealer,
    /// The file as last read or written; read again when a key version is
    /// missing (another command rotated the key after this one opened it).
    file: RwLock<KeystoreFile>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KmsError + '_ {
    move |source| KmsError::Io {
        path: path.to_path_buf(),
        source: match source.kind() {
            std::io::ErrorKind::PermissionDenied => {
                let hint = denied_hint(path);
                std::io::Error::new(source.kind(), format!("{source}; {hint}"))
            }
            _ => source,
        },
    }
}

/// What to do about a keystore this process may not read or write.
fn denied_hint(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(meta) if meta.uid() != rustix::process::geteuid().as_raw() => format!(
            "it belongs to user {} (a keystore is its owner's alone, mode 0600): run kmsfs as that user",
            meta.uid()
        ),
        Ok(meta) if meta.mode() & 0o600 != 0o600 => format!(
            "its mode ({:o}) denies even its owner: `chmod 600 {}`",
            meta.mode() & 0o7777,
            path.display()
        ),
        // The file is fine: its directory, where its lock file and each new
        // version are written, is not.
        _ => format!(
            "this user may not enter or write {}, where the keystore's lock and new versions are written",
            path.parent().unwrap_or(Path::new(".")).display()
        ),
    }
}

/// A keystore this kmsfs cannot use, for a reason a backup does not mend.
fn unusable(path: &Path, reason: impl Into<String>) -> KmsError {
    KmsError::KeystoreCorrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A keystore kmsfs did not write as it is: only its backup helps.
fn corrupt(path: &Path, reason: impl Into<String>) -> KmsError {
    KmsError::KeystoreCorrupt {
        path: path.to_path_buf(),
        reason: format!(
            "{}; restore it from your backup of the keystore (kmsfs writes it whole or not at all)",
            reason.into()
        ),
    }
}

fn material_aad(key_id: &str, version: u32) -> Vec<u8> {
    [
        b"kmsfs-keystore-material-v1\0".as_slice(),
        key_id.as_bytes(),
        b"\0",
        &version.to_be_bytes(),
    ]
    .concat()
}

fn data_key_aad(key_id: &str, version: u32, context: &EncryptionContext) -> Vec<u8> {
    [
        b"kmsfs-local-datakey-v1\0".as_slice(),
        key_id.as_bytes(),
        b"\0",
        &version.to_be_bytes(),
        &context.canonical_bytes(),
    ]
    .concat()
}

impl LocalKeystore {
    pub fn exists(path: &Path) -> bool {
        path.exists()
    }

    /// Creates a new, empty keystore. Refuses to overwrite an existing one.
    pub fn create(path: &Path, secret: &UnlockSecret, kdf: KdfParams) -> Result<Self, KmsError> {
        let protection = Protection::new(secret, kdf)?;
        let kek = Sealer::new(&derive_kek(&protection, secret, path)?);
        let verifier = B64.encode(kek.seal(VERIFIER_AAD, VERIFIER_PLAINTEXT));
        let mut file = KeystoreFile {
            format: FORMAT,
            protection,
            verifier,
            keys: Vec::new(),
            integrity: None,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let _lock = super::locked_file::lock(path).map_err(io_err(path))?;
        Self::write(path, &kek, &mut file, true)?;
        Ok(LocalKeystore {
            path: path.to_path_buf(),
            kek,
            file: RwLock::new(file),
        })
    }

    /// Opens and unlocks a keystore; a wrong secret is detected, never turned into keys.
    pub fn open(path: &Path, secret: &UnlockSecret) -> Result<Self, KmsError> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KmsError::KeystoreMissing(path.to_path_buf()));
            }
            Err(e) => return Err(io_err(path)(e)),
        };
        let file: KeystoreFile = serde_json::from_str(&text).map_err(|e| corrupt(path, e.to_string()))?;
        if file.format != 1 && file.format != FORMAT {
            return Err(unusable(
                path,
                format!(
                    "unsupported keystore format {}: a newer kmsfs wrote it; use that version",
                    file.format
                ),
            ));
        }
        let kek = Sealer::new(&derive_kek(&file.protection, secret, path)?);
        match file.check(&kek, path) {
            Ok(()) => {}
            Err(VerifyError::WrongKey) => {
                return Err(match secret {
                    UnlockSecret::Passphrase(_) => KmsError::WrongPassphrase(path.to_path_buf()),
                    UnlockSecret::KeyFile(_) => KmsError::WrongKeyFile(path.to_path_buf()),
                });
            }
            Err(VerifyError::Corrupt(e)) => return Err(e),
        }
        if let Protection::Argon2id { params, .. } = &file.protection
            && (params.memory_kib < MIN_KDF.memory_kib || params.iterations < MIN_KDF.iterations)
        {
            log::warn!(
                "keystore {} uses Argon2id below the minimum (19 MiB, 2 passes); re-create it with stronger settings",
                path.display()
            );
        }
        let due = file
            .keys
            .iter()
            .any(|k| k.deletion_is_due() || k.rotation_is_due() || k.import_has_expired());
        let mut store = LocalKeystore {
            path: path.to_path_buf(),
            kek,
            file: RwLock::new(file),
        };
        if due {
            store.run_schedules()?;
        }
        Ok(store)
    }

    fn file(&self) -> RwLockReadGuard<'_, KeystoreFile> {
        crate::util::read(&self.file)
    }

    /// Reads the file again (after another command changed it).
    fn refresh(&self) -> Result<(), KmsError> {
        let file = self.reread()?;
        *crate::util::write(&self.file) = file;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(path: &Path, kek: &Sealer, file: &mut KeystoreFile, create_new: bool) -> Result<(), KmsError> {
        file.seal(kek, path)?;
        let text = Zeroizing::new(serde_json::to_string_pretty(file).map_err(|e| unusable(path, e.to_string()))?);
        super::locked_file::replace(path, text.as_bytes(), 0o600, create_new).map_err(io_err(path))
    }

    /// Reads the keystore as it is on disk now, checking it is still the
    /// one this handle unlocked (same key-encryption key).
    fn reread(&self) -> Result<KeystoreFile, KmsError> {
        let text = fs::read_to_string(&self.path).map_err(io_err(&self.path))?;
        let file: KeystoreFile = serde_json::from_str(&text).map_err(|e| corrupt(&self.path, e.to_string()))?;
        match file.check(&self.kek, &self.path) {
            Ok(()) => Ok(file),
            Err(VerifyError::WrongKey) => Err(KmsError::KeystoreCorrupt {
                path: self.path.clone(),
                reason: "the keystore was replaced or re-protected while this command ran; run it again".into(),
            }),
            Err(VerifyError::Corrupt(e)) => Err(e),
        }
    }

    /// Read-modify-write under the keystore's lock: concurrent `init`s and
    /// `key rotate`s each see the others' keys and none is lost.
    fn update<T>(&self, change: impl FnOnce(&Sealer, &mut KeystoreFile) -> Result<T, KmsError>) -> Result<T, KmsError> {
        let _lock = super::locked_file::lock(&self.path).map_err(io_err(&self.path))?;
        let mut file = self.reread()?;
        let out = change(&self.kek, &mut file)?;
        Self::write(&self.path, &self.kek, &mut file, false)?;
        *crate::util::write(&self.file) = file;
        Ok(out)
    }

    /// Runs an administrative action on `key` and records it, with its
    /// outcome, in the audit log.
    pub fn audited<T>(
        &self,
        action: &str,
        key: &str,
        details: Option<serde_json::Value>,
        run: impl FnOnce() -> Result<T, KmsError>,
    ) -> Result<T, KmsError> {
        let result = run();
        let id = self.record(key).map(|r| r.id).unwrap_or_else(|_| key.to_string());
        let event = super::audited::key_event(action, &ProviderId::Local { key: id });
        let event = match details {
            Some(d) => event.details(d),
            None => event,
        };
        crate::audit::record(event.outcome(&result));
        result
    }

    /// CreateKey: a new enabled master key with one version. Returns its id.
    pub fn create_key(&self, description: &str) -> Result<String, KmsError> {
        let id = format!("mk-{}", hex(&random_array::<12>()));
        let material = SecretKey::random();
        self.audited("CreateKey", &id.clone(), None, || {
            self.update(|kek, file| {
                let sealed = kek.seal(&material_aad(&id, 1), material.expose());
                let mut record = MasterKeyRecord::new(id.clone(), description, Origin::Generated);
                record.versions = vec![KeyVersion {
                    version: 1,
                    created: crate::util::unix_now(),
                    material: B64.encode(sealed),
                }];
                file.keys.push(record);
                Ok(())
            })
        })?;
        Ok(id)
    }

    /// On-demand rotation: a new version of the master key's material. Old
    /// versions stay, so everything they wrapped still decrypts.
    pub fn rotate_key(&self, id_or_alias: &str) -> Result<u32, KmsError> {
        self.audited("RotateKeyOnDemand", id_or_alias, None, || {
            self.update(|kek, file| {
                let record = file.key_mut(id_or_alias)?;
                record.refuse_if_imported("rotating it")?;
                if record.state != KeyState::Enabled {
                    return Err(KmsError::KeyNotUsable {
                        key: record.id.clone(),
                        state: format!("{:?}", record.state),
                    });
                }
                Ok(record.add_version(kek))
            })
        })
    }

    /// Every master key, without its material.
    pub fn list(&self) -> Vec<KeyInfo> {
        self.file().keys.iter().map(MasterKeyRecord::info).collect()
    }

    fn record(&self, id_or_alias: &str) -> Result<MasterKeyRecord, KmsError> {
        self.file()
            .keys
            .iter()
            .find(|k| k.id == id_or_alias || k.alias.as_deref() == Some(id_or_alias))
            .cloned()
            .ok_or_else(|| KmsError::KeyNotFound(id_or_alias.to_string()))
    }

    /// Resolves an id or alias to the key's id.
    pub fn key_id(&self, id_or_alias: &str) -> Result<String, KmsError> {
        Ok(self.record(id_or_alias)?.id)
    }

    fn usable_record(&self, key_id: &str) -> Result<MasterKeyRecord, KmsError> {
        let record = self.record(key_id)?;
        // Expired imported material: deleted already (PendingImport), or due
        // to be at the next open of the keystore.
        let expired_on = record.import.as_ref().and_then(|i| i.material_valid_to);
        if let (true, Some(date)) = (
            record.state == KeyState::PendingImport || record.import_has_expired(),
            expired_on,
        ) {
            return Err(KmsError::KeyNotUsable {
                key: key_id.to_string(),
                state: format!(
                    "PendingImport (its imported material expired on {}; import the same material again)",
                    crate::util::utc_date(date)
                ),
            });
        }
        if record.state != KeyState::Enabled {
            return Err(KmsError::KeyNotUsable {
                key: key_id.to_string(),
                state: format!("{:?}", record.state),
            });
        }
        Ok(record)
    }

    /// The material of one version of a usable key. A version this handle
    /// has not seen may have been made since it was opened (`key rotate` by
    /// another command while a volume is mounted): the file is read again.
    fn material(&self, key_id: &str, version: u32) -> Result<SecretKey, KmsError> {
        let mut record = self.usable_record(key_id)?;
        if !record.versions.iter().any(|v| v.version == version) {
            self.refresh()?;
            record = self.usable_record(key_id)?;
        }
        let v = record
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| KmsError::UnknownKeyVersion {
                key: record.id.clone(),
                version,
                path: self.path.clone(),
                newest: record.versions.iter().map(|v| v.version).max(),
                oldest: record.versions.iter().map(|v| v.version).min(),
            })?;
        let sealed = B64
            .decode(&v.material)
            .map_err(|_| corrupt(&self.path, "key material is not base64"))?;
        let plain = self
            .kek
            .open(&material_aad(&record.id, version), &sealed)
            .map_err(|_| {
                corrupt(
                    &self.path,
                    format!("material of key {} v{version} fails authentication", record.id),
                )
            })?;
        SecretKey::from_slice(&plain).ok_or_else(|| corrupt(&self.path, "key material length"))
    }

    /// The newest version of a usable key, after reading the file again:
    /// new data keys go under what another command may just have made.
    fn newest_version(&self, key_id: &str) -> Result<u32, KmsError> {
        self.refresh()?;
        let record = self.usable_record(key_id)?;
        record
            .versions
            .iter()
            .map(|v| v.version)
            .max()
            .ok_or_else(|| corrupt(&self.path, format!("key {} has no versions", record.id)))
    }

    /// A provider handle bound to one master key.
    pub fn provider(self: &Arc<Self>, id_or_alias: &str) -> Result<LocalProvider, KmsError> {
        let key_id = self.key_id(id_or_alias)?;
        Ok(LocalProvider {
            store: Arc::clone(self),
            key_id,
            calls: AtomicU64::new(0),
        })
    }
}

impl LocalProvider {
    /// Seals a data key under the newest version of the master key.
    fn encrypt_newest(&self, data_key: &SecretKey, context: &EncryptionContext) -> Result<WrappedKey, KmsError> {
        let version = self.store.newest_version(&self.key_id)?;
        let master = Sealer::new(&self.store.material(&self.key_id, version)?);
        let sealed = master.seal(&data_key_aad(&self.key_id, version, context), data_key.expose());
        Ok(WrappedKey::from_bytes(
            [&[DATA_KEY_BLOB_VERSION][..], &version.to_be_bytes(), &sealed].concat(),
        ))
    }

    /// The master-key version a blob was wrapped under.
    pub fn blob_version(wrapped: &WrappedKey) -> Option<u32> {
        let b = wrapped.as_bytes();
        (b.len() > 5 && b[0] == DATA_KEY_BLOB_VERSION).then(|| u32::from_be_bytes([b[1], b[2], b[3], b[4]]))
    }
}

/// The `local` provider bound to one master key of an unlocked keystore.
pub struct LocalProvider {
    store: Arc<LocalKeystore>,
    key_id: String,
    calls: AtomicU64,
}

impl KeyProvider for LocalProvider {
    fn id(&self) -> ProviderId {
        ProviderId::Local {
            key: self.key_id.clone(),
        }
    }

    fn generate_data_key(&self, context: &EncryptionContext) -> Result<(SecretKey, WrappedKey), KmsError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let data_key = SecretKey::random();
        let blob = self.encrypt_newest(&data_key, context)?;
        Ok((data_key, blob))
    }

    fn re_encrypt(&self, wrapped: &WrappedKey, context: &EncryptionContext) -> Result<WrappedKey, KmsError> {
        let data_key = self.decrypt(wrapped, context)?;
        self.encrypt_newest(&data_key, context)
    }

    fn decrypt(&self, wrapped: &WrappedKey, context: &EncryptionContext) -> Result<SecretKey, KmsError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let bytes = wrapped.as_bytes();
        if bytes.len() < 5 || bytes[0] != DATA_KEY_BLOB_VERSION {
            return Err(KmsError::InvalidCiphertext(self.key_id.clone()));
        }
        let version = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let master = Sealer::new(&self.store.material(&self.key_id, version)?);
        master
            .unwrap_key(
                &data_key_aad(&self.key_id, version, context),
                &WrappedKey::from_bytes(bytes[5..].to_vec()),
            )
            .map_err(|_| KmsError::InvalidCiphertext(self.key_id.clone()))
    }

    fn is_behind(&self, wrapped: &WrappedKey) -> bool {
        match (
            LocalProvider::blob_version(wrapped),
            self.store.newest_version(&self.key_id),
        ) {
            (Some(version), Ok(newest)) => version < newest,
            _ => false,
        }
    }

    fn note_volume(&self, volume_id: &[u8; 16], backing: &Path, blobs: &[WrappedKey]) {
        let mut versions: Vec<u32> = blobs.iter().filter_map(LocalProvider::blob_version).collect();
        versions.sort_unstable();
        versions.dedup();
        if let Err(e) = self.store.note_volume(&self.key_id, &hex(volume_id), backing, versions) {
            log::warn!("could not record in the keystore which key versions this volume uses: {e}");
        }
    }

    fn call_count(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn key_state(&self) -> Result<KeyStatus, KmsError> {
        let record = self.store.record(&self.key_id)?;
        let state = if record.import_has_expired() {
            KeyState::PendingImport
        } else {
            record.state
        };
        Ok(KeyStatus {
            state: format!("{state:?}"),
            deletion_date: record.deletion_date,
            material_valid_to: record.import.as_ref().and_then(|i| i.material_valid_to),
            decrypts_from: None,
            versions_held: record
                .versions
                .iter()
                .map(|v| v.version)
                .min()
                .zip(record.versions.iter().map(|v| v.version).max()),
        })
    }
}

#[cfg(test)]
mod tests;
