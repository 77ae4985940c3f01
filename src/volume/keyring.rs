//! The volume keys a process holds: every live version, unwrapped once by
//! the key provider, and which one is active. A version created by a
//! rotation in another process is loaded on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::crypto::{FileId, Sealer, SecretKey, WrappedKey};
use crate::kms::{EncryptionContext, KeyProvider};

use super::VolumeError;
use super::db::MetadataDb;
use super::db::rotation::FileKeyRow;

struct Ring {
    keys: HashMap<u32, Arc<Sealer>>,
    /// A value derived from each version's key (`fingerprint`): two
    /// versions with one key are an old key put back in the DB.
    fingerprints: HashMap<u32, [u8; 32]>,
    active: u32,
}

/// What a version that has the key of another is.
fn same_key(version: u32, other: u32) -> String {
    format!("volume key version {version}, which is the key of version {other} (an old volume key put back in the DB)")
}

/// A one-way value of a volume key, to tell two versions' keys apart.
fn fingerprint(key: &SecretKey) -> [u8; 32] {
    *key.derive(b"kmsfs-volume-key-fingerprint-v1").expose()
}

impl Ring {
    /// Adds version `version` with `key`, unless another version has it.
    fn insert(&mut self, version: u32, key: &SecretKey) -> Result<Arc<Sealer>, u32> {
        let print = fingerprint(key);
        if let Some((&other, _)) = self.fingerprints.iter().find(|(v, p)| **v != version && **p == print) {
            return Err(other);
        }
        let sealer = Arc::new(Sealer::new(key));
        self.keys.insert(version, Arc::clone(&sealer));
        self.fingerprints.insert(version, print);
        Ok(sealer)
    }
}

/// After the provider failed to unwrap a version, how long others asking for
/// it get that failure at once instead of a call of their own: longer than
/// a daemon's retries at exit (about 11 s), so that a provider that does not
/// answer costs an unmount one call's timeout, not one per retry.
const RETRY_AFTER: Duration = Duration::from_secs(15);

/// The last failure to unwrap a version not loaded.
struct Failed {
    version: u32,
    at: Instant,
    reason: String,
}

pub struct KeyRing {
    volume_id: [u8; 16],
    /// The metadata DB, named in errors.
    db_path: std::path::PathBuf,
    context: EncryptionContext,
    provider: Arc<dyn KeyProvider>,
    ring: RwLock<Ring>,
    /// Held during a provider call for a version not loaded: one at a time,
    /// so that a provider that does not answer holds one thread (the
    /// flusher, an fsync, an open), not every one that needs the key.
    calling: Mutex<()>,
    failed: Mutex<Option<Failed>>,
}

pub fn file_key_aad(volume_id: &[u8; 16], file_id: &FileId, vk_version: u32) -> Vec<u8> {
    [
        b"kmsfs-dek-v1\0".as_slice(),
        volume_id,
        file_id,
        &vk_version.to_be_bytes(),
    ]
    .concat()
}

/// From format 2 on the volume's format is bound here too: a DB edited to
/// claim an older format (with laxer rules for files) no longer opens.
pub fn secret_aad(volume_id: &[u8; 16], kind: &str, vk_version: u32, format: u32) -> Vec<u8> {
    let mut aad = [
        b"kmsfs-volume-secret-v1\0".as_slice(),
        volume_id,
        kind.as_bytes(),
        b"\0",
        &vk_version.to_be_bytes(),
    ]
    .concat();
    if format >= 2 {
        aad.extend_from_slice(b"\0format\0");
        aad.extend_from_slice(&format.to_be_bytes());
    }
    aad
}

impl KeyRing {
    /// Unwraps every version that still has a blob: one provider call each.
    pub fn load(db: &MetadataDb, volume_id: [u8; 16], provider: Arc<dyn KeyProvider>) -> Result<Self, VolumeError> {
        let context = EncryptionContext::for_volume(&volume_id);
        let tampered = |what: String| VolumeError::Tampered {
            volume: db.path().to_path_buf(),
            what,
        };
        let mut ring = Ring {
            keys: HashMap::new(),
            fingerprints: HashMap::new(),
            active: 0,
        };
        let mut active = None;
        for row in db.volume_keys()? {
            if row.state == "active" && active.replace(row.version).is_some() {
                return Err(tampered("the volume keys (more than one is active)".into()));
            }
            let Some(wrapped) = row.wrapped else { continue };
            let key = provider.decrypt(&wrapped, &context)?;
            ring.insert(row.version, &key)
                .map_err(|other| tampered(same_key(row.version, other)))?;
        }
        ring.active = active
            .filter(|active| ring.keys.contains_key(active))
            .ok_or_else(|| tampered("the active volume key".into()))?;
        Ok(KeyRing {
            volume_id,
            db_path: db.path().to_path_buf(),
            context,
            provider,
            ring: RwLock::new(ring),
            calling: Mutex::new(()),
            failed: Mutex::new(None),
        })
    }

    pub fn provider(&self) -> &Arc<dyn KeyProvider> {
        &self.provider
    }

    pub fn context(&self) -> &EncryptionContext {
        &self.context
    }

    pub fn active_version(&self) -> u32 {
        crate::util::read(&self.ring).active
    }

    fn cached(&self, version: u32) -> Option<Arc<Sealer>> {
        crate::util::read(&self.ring).keys.get(&version).cloned()
    }

    /// A loaded key, for re-wrapping queued keys (which were wrapped by it).
    pub fn key_cached_or_err(&self, version: u32) -> Result<Arc<Sealer>, String> {
        self.cached(version)
            .ok_or_else(|| format!("volume key version {version} is not loaded"))
    }

    /// Refuses a key the provider just generated that a loaded version
    /// already has (a broken provider), before any row is written for it.
    pub fn check_new(&self, key: &SecretKey) -> Result<(), VolumeError> {
        let print = fingerprint(key);
        match crate::util::read(&self.ring)
            .fingerprints
            .iter()
            .find(|(_, p)| **p == print)
        {
            Some((other, _)) => Err(VolumeError::Tampered {
                volume: self.db_path.clone(),
                what: format!("the new volume key (the provider returned the key of version {other})"),
            }),
            None => Ok(()),
        }
    }

    /// Adds a version whose plaintext key this process just generated.
    pub fn install(&self, version: u32, key: &SecretKey, make_active: bool) {
        let mut ring = crate::util::write(&self.ring);
        // A key the provider just generated is new: were it not, the
        // provider would be broken, and a rotation to it must not finish.
        if let Err(other) = ring.insert(version, key) {
            log::error!("the provider returned for volume key version {version} the key of version {other}");
            return;
        }
        if make_active && version > ring.active {
            ring.active = version;
        }
    }

    pub fn volume_id(&self) -> &[u8; 16] {
        &self.volume_id
    }

    /// Adds a version from its provider blob (no DB access), optionally making it active.
    pub fn adopt(&self, version: u32, blob: &WrappedKey, make_active: bool) -> Result<Arc<Sealer>, VolumeError> {
        let sealer = match self.cached(version) {
            Some(s) => s,
            None => self.unwrap_version(version, blob)?,
        };
        if make_active {
            let mut ring = crate::util::write(&self.ring);
            if version > ring.active {
                ring.active = version;
            }
        }
        Ok(sealer)
    }

    /// Asks the provider for version `version`, unless it failed to give it
    /// less than RETRY_AFTER ago, or failed before and is being asked again
    /// by another thread: then that failure at once.
    fn unwrap_version(&self, version: u32, blob: &WrappedKey) -> Result<Arc<Sealer>, VolumeError> {
        let recent = |failed: &Option<Failed>, any_age: bool| {
            failed
                .as_ref()
                .filter(|f| f.version == version && (any_age || f.at.elapsed() < RETRY_AFTER))
                .map(|f| VolumeError::KeyUnavailable {
                    version,
                    reason: f.reason.clone(),
                    seconds_ago: f.at.elapsed().as_secs(),
                })
        };
        if let Some(e) = recent(&crate::util::lock(&self.failed), false) {
            return Err(e);
        }
        let _calling = match self.calling.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                if let Some(e) = recent(&crate::util::lock(&self.failed), true) {
                    return Err(e);
                }
                let guard = crate::util::lock(&self.calling);
                // The call waited for failed meanwhile: that answer, not another call.
                if let Some(e) = recent(&crate::util::lock(&self.failed), false) {
                    return Err(e);
                }
                guard
            }
        };
        if let Some(s) = self.cached(version) {
            return Ok(s);
        }
        let key = match self.provider.decrypt(blob, &self.context) {
            Ok(key) => key,
            Err(e) => {
                *crate::util::lock(&self.failed) = Some(Failed {
                    version,
                    at: Instant::now(),
                    reason: e.to_string(),
                });
                return Err(e.into());
            }
        };
        *crate::util::lock(&self.failed) = None;
        crate::util::write(&self.ring)
            .insert(version, &key)
            .map_err(|other| VolumeError::Tampered {
                volume: self.db_path.clone(),
                what: same_key(version, other),
            })
    }

    /// The key of `version`, loaded from the DB if another process created it.
    pub fn key(&self, db: &MetadataDb, version: u32) -> Result<Arc<Sealer>, VolumeError> {
        if let Some(s) = self.cached(version) {
            return Ok(s);
        }
        let row = db.volume_key(version)?.ok_or_else(|| VolumeError::Tampered {
            volume: db.path().to_path_buf(),
            what: format!("volume key version {version} (missing)"),
        })?;
        let blob = row.wrapped.ok_or_else(|| VolumeError::Tampered {
            volume: db.path().to_path_buf(),
            what: format!("volume key version {version} (retired, yet still referenced)"),
        })?;
        self.adopt(version, &blob, row.state == "active")
    }

    /// Wraps a new file key under the active version.
    pub fn wrap_file_key(&self, file_id: &FileId, dek: &SecretKey) -> (u32, WrappedKey) {
        let (version, sealer) = {
            let ring = crate::util::read(&self.ring);
            (ring.active, Arc::clone(&ring.keys[&ring.active]))
        };
        (
            version,
            sealer.wrap_key(&file_key_aad(&self.volume_id, file_id, version), dek),
        )
    }

    pub fn unwrap_with(
        &self,
        sealer: &Sealer,
        file_id: &FileId,
        version: u32,
        wrapped: &WrappedKey,
    ) -> Result<SecretKey, crate::crypto::AuthError> {
        sealer.unwrap_key(&file_key_aad(&self.volume_id, file_id, version), wrapped)
    }

    /// File-key rows under the active version: those under it, and those
    /// this ring can move to it (it holds the key they are under), that
    /// authenticate, no provider asked; then the others, as they are.
    pub fn rows_to_active(&self, rows: Vec<FileKeyRow>) -> (Vec<FileKeyRow>, Vec<FileKeyRow>) {
        let ring = crate::util::read(&self.ring);
        let (active, to) = (ring.active, &ring.keys[&ring.active]);
        let (mut ready, mut left) = (Vec::new(), Vec::new());
        for (id, version, wrapped) in rows {
            // Rows come from a file in the backing directory: even one under
            // the active version must unwrap before it is stored (a forged
            // row would otherwise fill the gap a genuine one saved on the
            // host was to fill).
            let moved = match ring.keys.get(&version) {
                _ if version == active => self
                    .unwrap_with(to, &id, active, &wrapped)
                    .ok()
                    .map(|_| wrapped.clone()),
                Some(from) => self.rewrap(&id, (version, from), &wrapped, (active, to)),
                None => None,
            };
            match moved {
                Some(moved) => ready.push((id, active, moved)),
                None => left.push((id, version, wrapped)),
            }
        }
        (ready, left)
    }

    /// Re-wraps a file key from one version to another; both keys must be loaded.
    pub fn rewrap(
        &self,
        file_id: &FileId,
        from: (u32, &Sealer),
        wrapped: &WrappedKey,
        to: (u32, &Sealer),
    ) -> Option<WrappedKey> {
        let dek = self.unwrap_with(from.1, file_id, from.0, wrapped).ok()?;
        Some(to.1.wrap_key(&file_key_aad(&self.volume_id, file_id, to.0), &dek))
    }
}
