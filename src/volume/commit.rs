//! Committing file keys: new and erased keys are queued in memory (see
//! db::PendingBatch) and made durable together, every 200 ms by a
//! background thread and on every fsync and unmount. Keys queued under an
//! older volume key are re-wrapped under the active one first.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{Volume, VolumeError, db, rescue};
use crate::crypto::{FileId, WrappedKey};
use crate::kms::EncryptionContext;

const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

impl Volume {
    /// Commits queued file keys every 200 ms, and takes up a new active
    /// volume key as soon as it appears (`follow_rotation`), until the
    /// volume is dropped. Call after any fork: the thread does not survive
    /// one.
    pub fn start_background_flush(self: &Arc<Self>) {
        let weak: Weak<Volume> = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("kmsfs-db-flush".into())
            .spawn(move || {
                let (mut failing, mut behind) = (false, false);
                // Tests leave keys queued longer (commits then come from
                // fsync and unmount only).
                let interval = crate::test_hooks::number("KMSFS_TEST_FLUSH_INTERVAL_MS")
                    .map_or(FLUSH_INTERVAL, Duration::from_millis);
                let mut flushed = std::time::Instant::now();
                loop {
                    std::thread::sleep(FLUSH_INTERVAL);
                    let Some(volume) = weak.upgrade() else { return };
                    if volume.keys_saved.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    // Logged when it starts and stops failing, not every 200 ms.
                    let followed = volume.follow_rotation();
                    if let (Err(e), false) = (&followed, behind) {
                        log::error!("cannot load the volume key a rotation made active (retrying): {e}");
                    }
                    behind = followed.is_err();
                    if flushed.elapsed() < interval {
                        continue;
                    }
                    flushed = std::time::Instant::now();
                    match volume.sync_keys() {
                        Err(e) if !failing => log::error!("committing file keys failed (retrying): {e}"),
                        Ok(()) if failing => log::warn!("committing file keys works again"),
                        _ => {}
                    }
                    failing = volume.commit_error().is_some();
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the key flusher thread; keys are committed on fsync and unmount only: {e}");
        }
    }

    /// Takes up a volume-key version another process made active (a
    /// `kmsfs rotate` that began): one provider call, at once, while the
    /// provider the rotation just used is likely to answer, so that new
    /// keys are wrapped under it and the rotation can retire the old one
    /// (it waits until the daemon serving the volume publishes that it
    /// holds the new version).
    pub fn follow_rotation(&self) -> Result<(), VolumeError> {
        let (active, blob) = self.db.active_volume_key()?;
        let loaded = match active > self.keys.active_version() {
            true => self.keys.adopt(active, &blob, true).map(|_| true),
            false => Ok(false),
        };
        *crate::util::lock(&self.behind) = loaded.as_ref().err().map(|e| (active, e.to_string()));
        if loaded? {
            log::info!("volume key version {active} loaded: new file keys are wrapped under it");
        }
        Ok(())
    }

    /// Makes every queued key change durable.
    pub fn sync_keys(&self) -> Result<(), VolumeError> {
        let result = self.commit_queued();
        *crate::util::lock(&self.commit_error) = result.as_ref().err().map(|e| e.to_string());
        result
    }

    fn commit_queued(&self) -> Result<(), VolumeError> {
        loop {
            let Some(mut batch) = self.db.take_batch() else {
                if self.db.has_in_flight() {
                    // Another thread is committing: wait for it, so that
                    // what was queued before this call is durable on return.
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                return Ok(());
            };
            // Keys queued under an older volume-key version (a rotation began
            // since) are re-wrapped under the active one first, with the DB
            // free: adopting a new version may ask the key provider.
            let active = match self.db.active_volume_key() {
                Ok(active) => active,
                Err(e) => {
                    self.db.give_back();
                    return Err(e.into());
                }
            };
            let rewrapped = if batch.has_inserts() {
                batch.rewrap_stale(active.0, |id, from, wrapped| {
                    self.rewrap_queued(id, from, wrapped, &active)
                })
            } else {
                Ok(())
            };
            if let Err(e) = rewrapped {
                self.db.give_back();
                return Err(e);
            }
            match self.db.commit_batch(&batch, active.0)? {
                db::Commit::Done => {
                    self.audit_shredded(&batch);
                    return Ok(());
                }
                db::Commit::ActiveChanged => {}
            }
        }
    }

    /// Crypto-shredding is a key operation: the erased keys' files (by id,
    /// never by name) go to the audit log once the erasure is durable.
    fn audit_shredded(&self, batch: &db::PendingBatch) {
        let ids: Vec<String> = batch.erased().map(|id| crate::util::hex(id)).collect();
        let context = EncryptionContext::for_volume(&self.info.volume_id);
        // Records of bounded size: a record is written whole or discarded whole after a crash.
        for chunk in ids.chunks(1000) {
            crate::audit::record(
                crate::audit::Event::new("CryptoShred")
                    .volume(&self.backing)
                    .context(context.pairs())
                    .details(serde_json::json!({ "erased_file_keys": chunk.len(), "file_ids": chunk })),
            );
        }
    }

    /// A file key queued under version `from`, wrapped again under the
    /// active volume key.
    fn rewrap_queued(
        &self,
        id: &FileId,
        from: u32,
        wrapped: &WrappedKey,
        (active, blob): &(u32, WrappedKey),
    ) -> Result<WrappedKey, VolumeError> {
        let tampered = || VolumeError::Tampered {
            volume: self.backing.clone(),
            what: format!("a new file key under volume key version {from}"),
        };
        let from_key = self.keys.key_cached_or_err(from).map_err(|_| tampered())?;
        let to_key = self.keys.adopt(*active, blob, true)?;
        self.keys
            .rewrap(id, (from, &from_key), wrapped, (*active, &to_key))
            .ok_or_else(tampered)
    }

    /// The volume-key version a rotation made active that this process
    /// could not load, and why, until it loads it.
    pub fn behind(&self) -> Option<(u32, String)> {
        crate::util::lock(&self.behind).clone()
    }

    /// Why committing file keys last failed, while it keeps failing.
    pub fn commit_error(&self) -> Option<String> {
        crate::util::lock(&self.commit_error).clone()
    }

    /// Records something wrong that the mount cannot fix (a name it said
    /// it removed but could not, see fs/removals.rs; a damaged DB):
    /// published for `status`, and `umount` fails.
    pub fn record_problem(&self, what: String) {
        let mut problems = crate::util::lock(&self.problems);
        problems.0 += 1;
        problems.1.get_or_insert(what);
    }

    /// How many problems were recorded, and the first.
    pub fn problems(&self) -> Option<String> {
        let problems = crate::util::lock(&self.problems);
        problems.1.as_ref().map(|first| match problems.0 {
            1 => first.clone(),
            n => format!("{n} problems; the first: {first}"),
        })
    }

    /// Saves the file keys that could not be committed beside the DB, else
    /// on the host (see `rescue`); the next open of the volume stores them.
    /// Returns how many and where.
    pub fn save_pending_keys(&self) -> Result<(usize, std::path::PathBuf), VolumeError> {
        self.keys_saved.store(true, std::sync::atomic::Ordering::Relaxed);
        rescue::save(&self.backing, &self.keys, &self.db)
    }
}
