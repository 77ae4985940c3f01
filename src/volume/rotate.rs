//! Volume-key rotation and master-key re-wrapping. Both touch only wrapped
//! keys in the metadata DB: zero bytes of file data are rewritten.

use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::db::MetadataDb;
use super::db::rotation::FileKeyRow;
use super::keyring::secret_aad;
use super::{Volume, VolumeError};
use crate::crypto::{FileId, WrappedKey};

/// Rows re-wrapped per transaction.
const BATCH: usize = 5000;
/// Test hook: a smaller batch, so that crashes can be placed between batches.
pub const BATCH_ENV: &str = "KMSFS_TEST_ROTATE_BATCH";
/// Test hook: the process kills itself (SIGKILL) once this many file keys
/// have been re-wrapped and committed, to exercise crash recovery; or,
/// when it is `daemon-failed`, once the mounted daemon said it could not
/// load the new volume key (before the rotation is undone).
pub const KILL_AFTER_ENV: &str = "KMSFS_TEST_ROTATE_KILL_AFTER";

#[derive(Debug, Clone, serde::Serialize)]
pub struct RotationReport {
    pub new_version: u32,
    pub retired_versions: Vec<u32>,
    pub rewrapped_file_keys: u64,
    pub resumed: bool,
    pub seconds: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RewrapReport {
    /// The volume-key versions whose blobs were wrapped again.
    pub rewrapped_volume_keys: Vec<u32>,
    pub provider_calls: u64,
}

fn retiring_versions(db: &MetadataDb) -> Result<Vec<u32>, VolumeError> {
    Ok(db
        .volume_keys()?
        .into_iter()
        .filter(|k| k.state == "retiring")
        .map(|k| k.version)
        .collect())
}

fn active_version(db: &MetadataDb) -> Result<u32, VolumeError> {
    db.volume_keys()?
        .into_iter()
        .find(|k| k.state == "active")
        .map(|k| k.version)
        .ok_or_else(|| VolumeError::Tampered {
            volume: db.path().to_path_buf(),
            what: "the active volume key".into(),
        })
}

/// Starts a rotation: a new version from the provider becomes active and
/// the old one is marked retiring, in one transaction.
fn begin(volume: &Volume) -> Result<u32, VolumeError> {
    let keys = volume.keys();
    let (key, blob) = keys.provider().generate_data_key(keys.context())?;
    keys.check_new(&key)?;
    let version = volume.db().begin_rotation(&blob, crate::util::unix_now() as i64)?;
    keys.install(version, &key, true);
    Ok(version)
}

/// Moves the volume's secrets under version `to`: the same secrets
/// re-wrapped, or (`fresh`) new ones.
fn rewrap_secrets(volume: &Volume, to: u32, fresh: bool) -> Result<(), VolumeError> {
    let db = volume.db();
    let keys = volume.keys();
    let format = volume.info().format_version;
    let new_key = keys.key(db, to)?;
    for (kind, version, wrapped) in db.secrets()? {
        if version == to {
            continue;
        }
        if fresh {
            let secret = crate::crypto::SecretKey::random();
            db.set_secret(
                &kind,
                to,
                &new_key.wrap_key(&secret_aad(keys.volume_id(), &kind, to, format), &secret),
            )?;
            continue;
        }
        let old_key = keys.key(db, version)?;
        let secret = old_key
            .unwrap_key(&secret_aad(keys.volume_id(), &kind, version, format), &wrapped)
            .map_err(|_| VolumeError::Tampered {
                volume: volume.backing().to_path_buf(),
                what: format!("the {kind} key"),
            })?;
        let rewrapped = new_key.wrap_key(&secret_aad(keys.volume_id(), &kind, to, format), &secret);
        db.set_secret(&kind, to, &rewrapped)?;
    }
    Ok(())
}

fn next_batch(db: &MetadataDb, to: u32, after: Option<&FileId>) -> Result<Vec<FileKeyRow>, VolumeError> {
    let batch = crate::test_hooks::number(BATCH_ENV).map_or(BATCH as i64, |b| b as i64);
    Ok(db.file_keys_not_under(to, after, batch)?)
}

fn kill_hook(done: u64) {
    crate::test_hooks::kill_if(KILL_AFTER_ENV, |limit| {
        limit.parse::<u64>().is_ok_and(|limit| done >= limit)
    });
}

/// Rotates the volume key, or resumes an interrupted rotation. `progress`
/// receives (re-wrapped, total) after every batch.
pub fn rotate(volume: &Volume, progress: &mut dyn FnMut(u64, u64)) -> Result<RotationReport, VolumeError> {
    rotate_secrets(volume, progress, false)
}

/// Rotates the volume of a reverse view. Its files have no stored keys:
/// their keys, ids, directory IVs and nonces derive from the volume's
/// secrets, so these are made anew under the new version, and every file,
/// name and directory IV of the view gets new ciphertext (the next backup
/// copies everything). The view must not be mounted meanwhile.
pub fn rotate_reverse(volume: &Volume) -> Result<RotationReport, VolumeError> {
    rotate_secrets(volume, &mut |_, _| (), true)
}

fn rotate_secrets(
    volume: &Volume,
    progress: &mut dyn FnMut(u64, u64),
    fresh_secrets: bool,
) -> Result<RotationReport, VolumeError> {
    let start = Instant::now();
    volume.sync_keys()?;
    let db = volume.db();
    let resumed = !retiring_versions(db)?.is_empty();
    let to = if resumed { active_version(db)? } else { begin(volume)? };
    if let Some(pid) = daemon_behind(volume, to) {
        // Nothing is under the new version yet: the volume is left as it was.
        let undone = db.abandon_rotation(to)?;
        return Err(VolumeError::DaemonBehind {
            volume: volume.backing().to_path_buf(),
            pid,
            version: to,
            undone,
        });
    }
    let keys = volume.keys();
    rewrap_secrets(volume, to, fresh_secrets)?;
    let new_key = keys.key(db, to)?;
    let total = db.count_file_keys_not_under(to)?;
    let mut done = 0u64;
    // Where this pass over the file keys is (the last id of the last batch).
    let mut after: Option<FileId> = None;
    loop {
        let batch = next_batch(db, to, after.as_ref())?;
        if batch.is_empty() {
            if after.take().is_some() {
                continue; // the end of a pass: another finds keys committed meanwhile
            }
            overtaken(volume, to)?;
            // Before the old versions go: a daemon that stopped serving
            // meanwhile (unmounted, killed) may have saved keys under them
            // that it could not commit; they are stored now, under `to`. A
            // daemon still serving holds `to`, so any it saves later are
            // under `to` too.
            if let Some(pid) = daemon_behind(volume, to) {
                return Err(VolumeError::DaemonBehind {
                    volume: volume.backing().to_path_buf(),
                    pid,
                    version: to,
                    undone: false,
                });
            }
            // A file that was not one is set aside, and status and fsck name
            // it until it is removed: no reason to keep the old versions.
            let unstored = super::rescue::restore(volume.backing(), keys, db)?;
            if let Some(kept) = unstored.iter().find(|u| matches!(u, super::rescue::Unstored::Keys(_))) {
                return Err(VolumeError::PendingKept(format!(
                    "{kept}: the old volume-key versions are kept; run `kmsfs rotate` again once they are stored"
                )));
            }
            // A whole pass found nothing to re-wrap, and triggers refuse keys
            // under a version that is not active: any row left is one no
            // query by id reaches (an edited DB).
            let Some(retired_versions) = db.retire_if_done(to)? else {
                overtaken(volume, to)?;
                return Err(VolumeError::Tampered {
                    volume: volume.backing().to_path_buf(),
                    what: "file keys that no pass over them reaches".into(),
                });
            };
            erase_old_bytes(db);
            return Ok(RotationReport {
                new_version: to,
                retired_versions,
                rewrapped_file_keys: done,
                resumed,
                seconds: start.elapsed().as_secs_f64(),
            });
        }
        after = batch.last().map(|(id, _, _)| *id);
        let mut old_keys = std::collections::HashMap::new();
        for (_, version, _) in &batch {
            if !old_keys.contains_key(version) {
                old_keys.insert(*version, keys.key(db, *version)?);
            }
        }
        let rewrapped: Vec<(FileId, u32, Option<WrappedKey>)> = batch
            .par_iter()
            .map(|(id, version, wrapped)| {
                (
                    *id,
                    *version,
                    keys.rewrap(id, (*version, &old_keys[version]), wrapped, (to, &new_key)),
                )
            })
            .collect();
        if let Some((id, version, _)) = rewrapped.iter().find(|(_, _, w)| w.is_none()) {
            return Err(VolumeError::Tampered {
                volume: volume.backing().to_path_buf(),
                what: format!("the data key of file {} (version {version})", crate::util::hex(id)),
            });
        }
        let rewrapped: Vec<FileKeyRow> = rewrapped
            .into_iter()
            .filter_map(|(id, from, wrapped)| Some((id, from, wrapped?)))
            .collect();
        if let Err(e) = db.store_rewrapped(to, &rewrapped) {
            overtaken(volume, to)?;
            return Err(e.into());
        }
        done += rewrapped.len() as u64;
        progress(done, total.max(done));
        kill_hook(done);
    }
}

/// Fails when version `to` is no longer the active one: another `kmsfs
/// rotate` of the volume began a newer rotation meanwhile, and finishes it.
fn overtaken(volume: &Volume, to: u32) -> Result<(), VolumeError> {
    match active_version(volume.db())? {
        now if now != to => Err(VolumeError::RotationOvertaken {
            volume: volume.backing().to_path_buf(),
            version: to,
            now,
        }),
        _ => Ok(()),
    }
}

/// How long a rotation waits for the daemon serving the volume to hold the
/// new version before it gives up (`DAEMON_WAIT_ENV`: milliseconds, tests).
const DAEMON_WAIT: Duration = Duration::from_secs(45);
pub const DAEMON_WAIT_ENV: &str = "KMSFS_TEST_ROTATE_DAEMON_WAIT_MS";

/// The pid of the daemon serving the volume if it does not hold version
/// `to` within DAEMON_WAIT. A daemon wraps new file keys under the version
/// it holds and keeps those it could not commit yet under it, and a file
/// whose key was moved to a version it cannot load reads as EIO: it must
/// hold `to` before any key moves there and before older versions are
/// retired. It takes a new version up within a moment
/// (`Volume::follow_rotation`), unless its key provider fails it.
fn daemon_behind(volume: &Volume, to: u32) -> Option<u32> {
    let wait = crate::test_hooks::number(DAEMON_WAIT_ENV).map_or(DAEMON_WAIT, Duration::from_millis);
    let started = Instant::now();
    let mut said = false;
    loop {
        let daemon = super::lock::VolumeLock::daemon(volume.backing(), None).filter(|d| d.pid != std::process::id())?;
        // 0: a daemon that does not say (an older kmsfs).
        if !daemon.finishing && (daemon.volume_key_version == 0 || daemon.volume_key_version >= to) {
            return None;
        }
        // It tried and failed (it retries, but a provider that refused it will again).
        let failed = daemon.volume_key_error.as_ref().is_some_and(|(v, _)| *v == to);
        if failed || started.elapsed() > wait {
            if failed {
                crate::test_hooks::kill_if(KILL_AFTER_ENV, |when| when == "daemon-failed");
            }
            if let Some((_, why)) = &daemon.volume_key_error {
                log::error!(
                    "the daemon (pid {}) could not load volume key version {to}: {why}",
                    daemon.pid
                );
            }
            return Some(daemon.pid);
        }
        // A silent wait of up to `wait` would look like a hang.
        if !said && started.elapsed() > Duration::from_secs(2) {
            said = true;
            log::warn!(
                "waiting (up to {} s) for the mounted daemon (pid {}) to load volume key version {to}",
                wait.as_secs(),
                daemon.pid
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checkpoints and truncates the WAL so replaced and erased bytes are gone
/// from the DB files (secure_delete has already zeroed them in the pages).
fn erase_old_bytes(db: &MetadataDb) {
    for attempt in 0..50 {
        match db.checkpoint() {
            Ok(()) => return,
            Err(e) if attempt == 49 => {
                log::warn!("WAL checkpoint failed; old key bytes stay in the WAL until the next checkpoint: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// After the master key was rotated in the provider: every live volume-key
/// blob wrapped again under its newest version (ReEncrypt). One provider
/// call per volume-key version; no file is touched.
/// Re-wraps the volume-key blobs that are under an older master-key version
/// than the newest (after an automatic rotation of a local key): one
/// ReEncrypt per such blob, nothing else rewritten. Returns the volume-key
/// versions moved forward.
pub fn rewrap_if_behind(volume: &Volume) -> Result<Vec<u32>, VolumeError> {
    let db = volume.db();
    let keys = volume.keys();
    let mut moved = Vec::new();
    for row in db.volume_keys()? {
        let Some(blob) = row.wrapped else { continue };
        if keys.provider().is_behind(&blob) {
            let new_blob = keys.provider().re_encrypt(&blob, keys.context())?;
            db.set_volume_key_blob(row.version, &new_blob)?;
            moved.push(row.version);
        }
    }
    if !moved.is_empty() {
        erase_old_bytes(db);
    }
    Ok(moved)
}

pub fn rewrap_volume_keys(volume: &Volume) -> Result<RewrapReport, VolumeError> {
    let db = volume.db();
    let keys = volume.keys();
    let calls_before = keys.provider().call_count();
    let mut rewrapped = Vec::new();
    for row in db.volume_keys()? {
        let Some(blob) = row.wrapped else { continue };
        let new_blob = keys.provider().re_encrypt(&blob, keys.context())?;
        db.set_volume_key_blob(row.version, &new_blob)?;
        rewrapped.push(row.version);
    }
    erase_old_bytes(db);
    Ok(RewrapReport {
        rewrapped_volume_keys: rewrapped,
        provider_calls: keys.provider().call_count() - calls_before,
    })
}
