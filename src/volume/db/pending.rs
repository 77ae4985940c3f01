//! The queue of file-key changes: new keys and erasures wait in memory and
//! are committed in batches (every 200 ms, at fsync, at unmount). A batch
//! taken for a commit stays readable until the commit is done, and goes
//! back to the queue if it fails.

use std::collections::{HashMap, HashSet};

use rusqlite::params;

use super::rotation::FileKeyRow;
use super::{DbError, MAX_PENDING, MetadataDb, checkpoint_truncate};
use crate::crypto::{FileId, WrappedKey};
use crate::util::lock;

#[derive(Default)]
pub(super) struct PendingKeys {
    pub(super) inserts: HashMap<FileId, (u32, WrappedKey)>,
    pub(super) deletes: HashSet<FileId>,
    /// Taken for a commit that has not finished: still what `file_key`
    /// answers, and put back if the commit fails.
    pub(super) in_flight: PendingBatch,
}

/// Queued changes to `file_keys`, taken together for one commit.
#[derive(Default, Clone)]
pub struct PendingBatch {
    pub(super) inserts: HashMap<FileId, (u32, WrappedKey)>,
    pub(super) deletes: HashSet<FileId>,
}

impl PendingBatch {
    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.deletes.is_empty()
    }

    pub fn has_inserts(&self) -> bool {
        !self.inserts.is_empty()
    }

    /// The files whose keys this batch erases.
    pub fn erased(&self) -> impl Iterator<Item = &FileId> {
        self.deletes.iter()
    }

    /// Re-wraps every key queued under another version than `active` (a
    /// rotation began after it was queued) with `rewrap`.
    pub fn rewrap_stale<E>(
        &mut self,
        active: u32,
        mut rewrap: impl FnMut(&FileId, u32, &WrappedKey) -> Result<WrappedKey, E>,
    ) -> Result<(), E> {
        for (id, (version, wrapped)) in self.inserts.iter_mut() {
            if *version != active {
                *wrapped = rewrap(id, *version, wrapped)?;
                *version = active;
            }
        }
        Ok(())
    }
}

/// How a commit of a batch ended.
pub enum Commit {
    Done,
    /// The active volume-key version changed after the batch was re-wrapped
    /// (a rotation began meanwhile): re-wrap and commit again.
    ActiveChanged,
}

impl MetadataDb {
    /// Queues a new file key; it is committed by the next `flush`. Returns
    /// true when the queue is long enough that the caller should flush now.
    pub fn queue_file_key(&self, file_id: FileId, vk_version: u32, wrapped: WrappedKey) -> bool {
        let mut pending = lock(&self.pending);
        pending.deletes.remove(&file_id);
        pending.inserts.insert(file_id, (vk_version, wrapped));
        pending.inserts.len() >= MAX_PENDING
    }

    /// Queues the erasure of a file key (crypto-shredding of a deleted file).
    pub fn queue_file_key_delete(&self, file_id: FileId) {
        let mut pending = lock(&self.pending);
        if pending.inserts.remove(&file_id).is_none() {
            pending.deletes.insert(file_id);
        }
    }

    /// Takes the queued changes for a commit (they stay visible to
    /// `file_key` until it finishes); None when nothing is queued or
    /// another commit is under way.
    pub fn take_batch(&self) -> Option<PendingBatch> {
        let mut pending = lock(&self.pending);
        if !pending.in_flight.is_empty() || (pending.inserts.is_empty() && pending.deletes.is_empty()) {
            return None;
        }
        let batch = PendingBatch {
            inserts: std::mem::take(&mut pending.inserts),
            deletes: std::mem::take(&mut pending.deletes),
        };
        pending.in_flight = batch.clone();
        Some(batch)
    }

    /// Whether a commit taken by `take_batch` has not finished.
    pub fn has_in_flight(&self) -> bool {
        !lock(&self.pending).in_flight.is_empty()
    }

    /// Puts an uncommitted batch back in the queue (newer changes win).
    pub fn give_back(&self) {
        let mut pending = lock(&self.pending);
        let batch = std::mem::take(&mut pending.in_flight);
        for (id, row) in batch.inserts {
            if !pending.deletes.contains(&id) {
                pending.inserts.entry(id).or_insert(row);
            }
        }
        for id in batch.deletes {
            if !pending.inserts.contains_key(&id) {
                pending.deletes.insert(id);
            }
        }
    }

    /// The active volume key's version and provider blob.
    pub fn active_volume_key(&self) -> Result<(u32, WrappedKey), DbError> {
        let mut guard = lock(&self.conn);
        let conn = self.connected(&mut guard)?;
        conn.query_row(
            "SELECT version, wrapped FROM volume_keys WHERE state = 'active'",
            [],
            |r| {
                Ok((
                    r.get(0)?,
                    WrappedKey::from_bytes(r.get::<_, Option<Vec<u8>>>(1)?.unwrap_or_default()),
                ))
            },
        )
        .map_err(self.sqlite())
    }

    /// Commits a batch from `take_batch` in one transaction; its inserts
    /// must be wrapped under `active`. When this returns Done, every key in
    /// it is durable. On failure (and ActiveChanged) the batch goes back to
    /// the queue. No provider is called here: the caller re-wraps first,
    /// without holding the DB.
    pub fn commit_batch(&self, batch: &PendingBatch, active: u32) -> Result<Commit, DbError> {
        let mut guard = lock(&self.conn);
        let conn = match self.connected(&mut guard) {
            Ok(conn) => conn,
            Err(e) => {
                self.give_back();
                return Err(e);
            }
        };
        let result = (|| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if !batch.inserts.is_empty() {
                let now_active: u32 =
                    tx.query_row("SELECT version FROM volume_keys WHERE state = 'active'", [], |r| {
                        r.get(0)
                    })?;
                if now_active != active {
                    return Ok(Commit::ActiveChanged);
                }
            }
            {
                let mut insert = tx.prepare_cached(
                    "INSERT OR REPLACE INTO file_keys (file_id, vk_version, wrapped) VALUES (?1, ?2, ?3)",
                )?;
                for (id, (version, wrapped)) in &batch.inserts {
                    insert.execute(params![&id[..], version, wrapped.as_bytes()])?;
                }
                let mut delete = tx.prepare_cached("DELETE FROM file_keys WHERE file_id = ?1")?;
                for id in &batch.deletes {
                    delete.execute([&id[..]])?;
                }
            }
            tx.commit()?;
            Ok(Commit::Done)
        })();
        match result {
            Ok(Commit::Done) => {
                lock(&self.pending).in_flight = PendingBatch::default();
                if !batch.deletes.is_empty() {
                    // Crypto-shredding: the erased rows' bytes must leave the WAL too.
                    if let Err(e) = checkpoint_truncate(conn) {
                        log::warn!("WAL checkpoint after erasing file keys failed (retried at the next one): {e}");
                    }
                }
                Ok(Commit::Done)
            }
            Ok(Commit::ActiveChanged) => {
                self.give_back();
                Ok(Commit::ActiveChanged)
            }
            Err(source) => {
                // Back in the queue, so that nothing is lost; a later commit retries it.
                self.give_back();
                Err(DbError::Sqlite {
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }

    /// Takes every queued change out of the queue: (inserts, deletes).
    pub fn take_pending(&self) -> (Vec<(FileId, u32, WrappedKey)>, Vec<FileId>) {
        self.give_back();
        let mut pending = lock(&self.pending);
        let inserts = pending.inserts.drain().map(|(id, (v, w))| (id, v, w)).collect();
        (inserts, pending.deletes.drain().collect())
    }

    /// Stores rows saved by a daemon that could not commit them: a row never
    /// replaces one the DB already has. `unusable` rows (under a version the
    /// caller holds no key of) are never stored, only checked for a key
    /// their file has already.
    pub fn restore_rows(
        &self,
        inserts: &[FileKeyRow],
        unusable: &[FileKeyRow],
        deletes: &[FileId],
    ) -> Result<Restored, DbError> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut restored = Restored::default();
            {
                let mut has_key = tx.prepare("SELECT 1 FROM file_keys WHERE file_id = ?1")?;
                let mut insert = tx.prepare(
                    "INSERT INTO file_keys (file_id, vk_version, wrapped) \
                     SELECT ?1, ?2, ?3 WHERE EXISTS \
                     (SELECT 1 FROM volume_keys WHERE version = ?2 AND state = 'active')",
                )?;
                for row @ (id, version, wrapped) in inserts {
                    if has_key.exists([&id[..]])? {
                        restored.already += 1;
                    } else if insert.execute(params![&id[..], version, wrapped.as_bytes()])? == 1 {
                        restored.stored += 1;
                    } else {
                        restored.not_active.push(row.clone());
                    }
                }
                for row @ (id, _, _) in unusable {
                    if has_key.exists([&id[..]])? {
                        restored.already += 1;
                    } else {
                        restored.unusable.push(row.clone());
                    }
                }
                let mut delete = tx.prepare("DELETE FROM file_keys WHERE file_id = ?1")?;
                for id in deletes {
                    delete.execute([&id[..]])?;
                }
            }
            tx.commit()?;
            Ok(restored)
        })
    }
}

/// What `restore_rows` did with saved rows.
#[derive(Default)]
pub struct Restored {
    pub stored: usize,
    /// Rows whose file has a key already (stored by another process, or
    /// from an older copy of the same file): nothing to do.
    pub already: usize,
    /// Rows under a version that is no longer the active one (a rotation
    /// began since the caller loaded its keys): to be stored by a later open.
    pub not_active: Vec<FileKeyRow>,
    /// Unusable rows whose file has no key.
    pub unusable: Vec<FileKeyRow>,
}
