//! The life of a master key, as AWS KMS runs it: CreateKey with an alias
//! and description, DescribeKey, aliases, DisableKey/EnableKey, and
//! ScheduleKeyDeletion with its waiting period (7–30 days) after which the
//! material is destroyed the next time the keystore is opened.

use std::path::Path;

use super::{KeyInfo, KeyState, KeystoreFile, KnownVolume, LocalKeystore, MasterKeyRecord, Origin};
use crate::kms::audited::key_event;
use crate::kms::{KmsError, ProviderId};

const DAY: u64 = 24 * 3600;
/// AWS KMS's bounds for the waiting period of a scheduled deletion.
pub const DELETION_DAYS: std::ops::RangeInclusive<u32> = 7..=30;

fn invalid_state(record: &MasterKeyRecord, action: &str) -> KmsError {
    KmsError::KeyNotUsable {
        key: record.id.clone(),
        state: format!("{:?} ({action} is not possible in that state)", record.state),
    }
}

/// An alias: 1–256 characters of letters, digits, `/`, `_` and `-`, not
/// shaped like a key id.
fn check_alias(alias: &str) -> Result<(), KmsError> {
    let ok = !alias.is_empty()
        && alias.len() <= 256
        && !alias.starts_with("mk-")
        && alias.chars().all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(KmsError::BadSetting {
            name: "alias",
            message: format!("{alias:?}: use 1-256 letters, digits, '/', '_' or '-', not starting with mk-"),
        })
    }
}

enum VolumeAt {
    /// A volume, with this id (hex).
    Volume(String),
    /// Nothing readable: the volume may be on a disk not mounted now.
    Unknown,
}

/// What is at a recorded volume's place now.
fn volume_at(backing: &Path) -> VolumeAt {
    match crate::volume::read_info(backing) {
        Ok(info) => VolumeAt::Volume(crate::util::hex(&info.volume.volume_id)),
        Err(_) => VolumeAt::Unknown,
    }
}

/// AWS KMS's bounds for a rotation period (days).
pub const ROTATION_DAYS: std::ops::RangeInclusive<u32> = 90..=2560;

impl MasterKeyRecord {
    pub(super) fn deletion_is_due(&self) -> bool {
        self.state == KeyState::PendingDeletion
            && self.deletion_date.is_some_and(|date| crate::util::unix_now() >= date)
    }

    pub(super) fn rotation_is_due(&self) -> bool {
        let newest = self.versions.iter().map(|v| v.created).max();
        match (self.state, self.rotation_period_days, newest) {
            (KeyState::Enabled, Some(days), Some(created)) => {
                crate::util::unix_now() >= created + u64::from(days) * DAY
            }
            _ => false,
        }
    }
}

impl KeystoreFile {
    fn alias_free(&self, alias: &str) -> Result<(), KmsError> {
        match self.keys.iter().find(|k| k.alias.as_deref() == Some(alias)) {
            Some(k) => Err(KmsError::BadSetting {
                name: "alias",
                message: format!("{alias} already names key {}", k.id),
            }),
            None => Ok(()),
        }
    }
}

impl LocalKeystore {
    /// CreateKey with an alias and a description; an `External` key has no
    /// material until it is imported.
    pub fn create_named_key(&self, alias: Option<&str>, description: &str, origin: Origin) -> Result<String, KmsError> {
        if let Some(alias) = alias {
            check_alias(alias)?;
            self.file().alias_free(alias)?;
        }
        let id = match origin {
            Origin::Generated => self.create_key(description)?,
            Origin::External => {
                let id = format!("mk-{}", crate::util::hex(&crate::crypto::random_array::<12>()));
                let details = Some(serde_json::json!({ "origin": "external" }));
                self.audited("CreateKey", &id.clone(), details, || {
                    self.update(|_, file| {
                        file.keys
                            .push(MasterKeyRecord::new(id.clone(), description, Origin::External));
                        Ok(())
                    })
                })?;
                id
            }
        };
        if let Some(alias) = alias {
            self.set_alias(alias, &id, false)?;
        }
        Ok(id)
    }

    /// DescribeKey.
    pub fn describe(&self, id_or_alias: &str) -> Result<KeyInfo, KmsError> {
        Ok(self.record(id_or_alias)?.info())
    }

    /// CreateAlias (`moving`: false) or UpdateAlias (`moving`: true, the
    /// alias must exist and moves to `key`). A key has at most one alias.
    pub fn set_alias(&self, alias: &str, key: &str, moving: bool) -> Result<(), KmsError> {
        check_alias(alias)?;
        self.audited(
            if moving { "UpdateAlias" } else { "CreateAlias" },
            key,
            Some(serde_json::json!({ "alias": alias })),
            || {
                self.update(|_, file| {
                    let exists = file.keys.iter().any(|k| k.alias.as_deref() == Some(alias));
                    match (moving, exists) {
                        (false, true) => file.alias_free(alias)?,
                        (true, false) => return Err(KmsError::KeyNotFound(format!("alias {alias}"))),
                        _ => {}
                    }
                    let target = file.key_mut(key)?;
                    if target.state == KeyState::Deleted {
                        return Err(invalid_state(target, "naming it"));
                    }
                    if let Some(other) = target.alias.as_deref().filter(|a| *a != alias) {
                        return Err(KmsError::BadSetting {
                            name: "alias",
                            message: format!("key {} already has alias {other}; delete that first", target.id),
                        });
                    }
                    let target_id = target.id.clone();
                    for k in &mut file.keys {
                        if k.alias.as_deref() == Some(alias) {
                            k.alias = None;
                        }
                    }
                    file.key_mut(&target_id)?.alias = Some(alias.to_string());
                    Ok(())
                })
            },
        )
    }

    /// DeleteAlias.
    pub fn delete_alias(&self, alias: &str) -> Result<(), KmsError> {
        let key = self.record(alias).map(|r| r.id).unwrap_or_else(|_| alias.to_string());
        self.audited("DeleteAlias", &key, Some(serde_json::json!({ "alias": alias })), || {
            self.update(|_, file| {
                let k = file
                    .keys
                    .iter_mut()
                    .find(|k| k.alias.as_deref() == Some(alias))
                    .ok_or_else(|| KmsError::KeyNotFound(format!("alias {alias}")))?;
                k.alias = None;
                Ok(())
            })
        })
    }

    /// EnableKey (`true`) or DisableKey: a disabled key neither makes nor
    /// opens data keys; volumes mounted before keep their keys in memory.
    pub fn set_enabled(&self, id_or_alias: &str, enabled: bool) -> Result<KeyInfo, KmsError> {
        self.audited(
            if enabled { "EnableKey" } else { "DisableKey" },
            id_or_alias,
            None,
            || {
                self.update(|_, file| {
                    let k = file.key_mut(id_or_alias)?;
                    match k.state {
                        KeyState::Enabled | KeyState::Disabled if enabled && k.versions.is_empty() => {
                            Err(invalid_state(k, "it has no key material: import it first; enabling it"))
                        }
                        KeyState::Enabled | KeyState::Disabled => {
                            k.state = if enabled { KeyState::Enabled } else { KeyState::Disabled };
                            Ok(k.info())
                        }
                        KeyState::PendingDeletion => Err(invalid_state(k, "cancel the deletion first; changing it")),
                        KeyState::Deleted => Err(invalid_state(k, "changing it")),
                        KeyState::PendingImport => Err(invalid_state(k, "import its material first; changing it")),
                    }
                })
            },
        )
    }

    /// ScheduleKeyDeletion: unusable at once, destroyed after `days`.
    pub fn schedule_deletion(&self, id_or_alias: &str, days: u32) -> Result<KeyInfo, KmsError> {
        if !DELETION_DAYS.contains(&days) {
            return Err(KmsError::BadSetting {
                name: "--days",
                message: format!("{days}: the waiting period is 7 to 30 days"),
            });
        }
        self.audited(
            "ScheduleKeyDeletion",
            id_or_alias,
            Some(serde_json::json!({ "pending_window_days": days })),
            || {
                self.update(|_, file| {
                    let k = file.key_mut(id_or_alias)?;
                    if matches!(k.state, KeyState::PendingDeletion | KeyState::Deleted) {
                        return Err(invalid_state(k, "scheduling its deletion"));
                    }
                    k.state = KeyState::PendingDeletion;
                    k.deletion_date = Some(crate::util::unix_now() + u64::from(days) * DAY);
                    Ok(k.info())
                })
            },
        )
    }

    /// CancelKeyDeletion: the key comes back disabled, as in AWS KMS.
    pub fn cancel_deletion(&self, id_or_alias: &str) -> Result<KeyInfo, KmsError> {
        self.audited("CancelKeyDeletion", id_or_alias, None, || {
            self.update(|_, file| {
                let k = file.key_mut(id_or_alias)?;
                if k.state != KeyState::PendingDeletion {
                    return Err(invalid_state(k, "cancelling a deletion"));
                }
                // As AWS KMS: back disabled, or waiting for material if it has none.
                k.state = if k.origin == Origin::External && k.versions.is_empty() {
                    KeyState::PendingImport
                } else {
                    KeyState::Disabled
                };
                k.deletion_date = None;
                Ok(k.info())
            })
        })
    }

    /// Records which versions of `key` volume `volume_id` (at `backing`) uses.
    pub fn note_volume(&self, key: &str, volume_id: &str, backing: &Path, versions: Vec<u32>) -> Result<(), KmsError> {
        let known = KnownVolume {
            backing: backing.to_path_buf(),
            versions,
        };
        if self.record(key)?.volumes.get(volume_id) == Some(&known) {
            return Ok(());
        }
        self.update(|_, file| {
            file.key_mut(key)?.volumes.insert(volume_id.to_string(), known);
            Ok(())
        })
    }

    /// Retires the versions of `key` below `min_version` for good (as
    /// Vault's `min_decryption_version`, but their material is destroyed),
    /// refused while a volume the keystore knows of may still use one: it
    /// names them. Only a volume whose recorded place now holds another
    /// volume stops counting; one that cannot be read (a disk not mounted,
    /// a path gone) still counts unless `forget` names its id. Checked and
    /// done in one locked read-modify-write. Returns the versions destroyed.
    pub fn trim(&self, key: &str, min_version: u32, forget: &[String]) -> Result<Vec<u32>, KmsError> {
        let key_id = self.record(key)?.id;
        self.audited(
            "TrimKeyVersions",
            key,
            Some(serde_json::json!({ "min_version": min_version, "forget": forget })),
            || {
                self.update(|_, file| {
                    let k = file.key_mut(&key_id)?;
                    let newest = k.versions.iter().map(|v| v.version).max().unwrap_or(0);
                    if min_version == 0 || min_version > newest {
                        return Err(KmsError::BadSetting {
                            name: "--min-version",
                            message: format!("{min_version}: key {} has versions up to {newest}", k.id),
                        });
                    }
                    k.volumes.retain(|id, v| {
                        !forget.contains(id)
                            && match volume_at(&v.backing) {
                                VolumeAt::Volume(found) => &found == id,
                                VolumeAt::Unknown => true,
                            }
                    });
                    let needing: Vec<String> = k
                        .volumes
                        .iter()
                        .filter(|(_, v)| v.versions.iter().any(|&n| n < min_version))
                        .map(|(id, v)| format!("{} (volume {id}, versions {:?})", v.backing.display(), v.versions))
                        .collect();
                    if !needing.is_empty() {
                        return Err(KmsError::VersionsInUse {
                            key: k.id.clone(),
                            min_version,
                            users: needing.join(", "),
                        });
                    }
                    let trimmed: Vec<u32> = k
                        .versions
                        .iter()
                        .map(|v| v.version)
                        .filter(|&n| n < min_version)
                        .collect();
                    k.versions.retain(|v| v.version >= min_version);
                    Ok(trimmed)
                })
            },
        )
    }

    /// The volumes this keystore knows to use `key` ("PATH (volume ID)"):
    /// what deleting it would make unreadable, as far as it knows.
    pub fn known_volumes(&self, key: &str) -> Result<Vec<String>, KmsError> {
        Ok(self
            .record(key)?
            .volumes
            .iter()
            .map(|(id, v)| format!("{} (volume {id})", v.backing.display()))
            .collect())
    }

    /// EnableKeyRotation (`Some(days)`, 90–2560) or DisableKeyRotation.
    pub fn set_rotation(&self, id_or_alias: &str, period_days: Option<u32>) -> Result<KeyInfo, KmsError> {
        if let Some(days) = period_days.filter(|d| !ROTATION_DAYS.contains(d)) {
            return Err(KmsError::BadSetting {
                name: "--period-days",
                message: format!("{days}: the rotation period is 90 to 2560 days"),
            });
        }
        self.audited(
            if period_days.is_some() {
                "EnableKeyRotation"
            } else {
                "DisableKeyRotation"
            },
            id_or_alias,
            Some(serde_json::json!({ "rotation_period_days": period_days })),
            || {
                self.update(|_, file| {
                    let k = file.key_mut(id_or_alias)?;
                    k.refuse_if_imported("automatic rotation")?;
                    if k.state != KeyState::Enabled {
                        return Err(invalid_state(k, "changing its rotation"));
                    }
                    k.rotation_period_days = period_days;
                    Ok(k.info())
                })
            },
        )
    }

    /// What is due when the keystore is opened: scheduled deletions whose
    /// date has passed destroy their key's material; keys whose rotation
    /// period has run out get a new version (old versions keep decrypting;
    /// `mount` moves its volume's key forward).
    pub(super) fn run_schedules(&mut self) -> Result<(), KmsError> {
        let (destroyed, rotated, expired) = self.update(|kek, file| {
            let mut destroyed = Vec::new();
            for k in file.keys.iter_mut().filter(|k| k.deletion_is_due()) {
                k.versions.clear();
                k.state = KeyState::Deleted;
                destroyed.push(k.id.clone());
            }
            let mut expired = Vec::new();
            for k in file.keys.iter_mut().filter(|k| k.import_has_expired()) {
                k.expire_import();
                expired.push(k.id.clone());
            }
            let mut rotated = Vec::new();
            for k in file.keys.iter_mut().filter(|k| k.rotation_is_due()) {
                let version = k.add_version(kek);
                rotated.push((k.id.clone(), version));
            }
            Ok((destroyed, rotated, expired))
        })?;
        for id in expired {
            log::warn!("master key {id}: its imported material expired and is deleted; import it again to use the key");
            let event = key_event("DeleteImportedKeyMaterial", &ProviderId::Local { key: id });
            crate::audit::record(event.details(serde_json::json!({ "reason": "the imported material expired" })));
        }
        for (id, version) in rotated {
            log::info!("master key {id}: its rotation period has run out; version {version} made");
            let event = key_event("RotateKey", &ProviderId::Local { key: id }).key_version(Some(version));
            crate::audit::record(event.details(serde_json::json!({ "automatic": true })));
        }
        for id in destroyed {
            let event = key_event("DeleteKey", &ProviderId::Local { key: id.clone() });
            crate::audit::record(
                event
                    .details(serde_json::json!({ "reason": "the scheduled deletion date passed; material destroyed" })),
            );
            log::warn!(
                "master key {id}: its scheduled deletion date has passed; its material is destroyed, \
                 and volumes it protected can no longer be opened"
            );
        }
        Ok(())
    }
}
