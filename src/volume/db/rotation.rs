//! The DB side of volume-key rotation and master-key re-wrapping: one
//! method per step, each a transaction of its own (see volume::rotate).

use rusqlite::{TransactionBehavior, params};

use super::{DbError, MetadataDb, checkpoint_truncate, decode_file_key_row};
use crate::crypto::{FileId, WrappedKey};
use crate::util::lock;

/// A `file_keys` row: (file id, volume-key version, wrapped key).
pub type FileKeyRow = (FileId, u32, WrappedKey);

/// One batch of a rotation pass: ?1 the new version, ?2 the batch size, ?3
/// the last id of the batch before.
const FILE_KEYS_NOT_UNDER: &str = "SELECT file_id, vk_version, wrapped FROM file_keys \
     WHERE file_id > ?3 AND vk_version != ?1 ORDER BY file_id LIMIT ?2";

impl MetadataDb {
    /// Starts a rotation: version max+1 with `blob` becomes active, the
    /// active one retiring, in one transaction. Returns the new version.
    pub fn begin_rotation(&self, blob: &WrappedKey, created_at: i64) -> Result<u32, DbError> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let last: i64 = tx.query_row("SELECT max(version) FROM volume_keys", [], |r| r.get(0))?;
            let Some(version) = last.checked_add(1).and_then(|v| u32::try_from(v).ok()) else {
                return Ok(Err(last));
            };
            tx.execute("UPDATE volume_keys SET state = 'retiring' WHERE state = 'active'", [])?;
            tx.execute(
                "INSERT INTO volume_keys (version, state, wrapped, created_at) VALUES (?1, 'active', ?2, ?3)",
                params![version, blob.as_bytes(), created_at],
            )?;
            tx.commit()?;
            Ok(Ok(version))
        })?
        // Four billion rotations are not made: a DB edited to hold the last
        // version there can be.
        .map_err(|last| DbError::Damaged {
            path: self.path.clone(),
            reason: format!("it records volume key version {last}, after which no version can follow"),
        })
    }

    /// Undoes `begin_rotation` of `version` while no key is under it: the
    /// version before it is active again, and `version` retired without its
    /// blob (never reused: a process that loaded it keeps it under that
    /// number). Returns whether it was undone.
    pub fn abandon_rotation(&self, version: u32) -> Result<bool, DbError> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let used: i64 = tx.query_row(
                "SELECT (SELECT count(*) FROM file_keys WHERE vk_version = ?1) \
                      + (SELECT count(*) FROM volume_secrets WHERE vk_version = ?1)",
                [version],
                |r| r.get(0),
            )?;
            let retiring: Vec<u32> = tx
                .prepare("SELECT version FROM volume_keys WHERE state = 'retiring'")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let [before] = retiring[..] else { return Ok(false) };
            if used > 0 {
                return Ok(false);
            }
            tx.execute(
                "UPDATE volume_keys SET state = 'retired', wrapped = NULL WHERE version = ?1 AND state = 'active'",
                [version],
            )?;
            tx.execute("UPDATE volume_keys SET state = 'active' WHERE version = ?1", [before])?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Replaces a volume secret's wrapping (name or xattr key).
    pub fn set_secret(&self, kind: &str, vk_version: u32, wrapped: &WrappedKey) -> Result<(), DbError> {
        self.with_conn(|conn| {
            conn.execute(
                "UPDATE volume_secrets SET vk_version = ?1, wrapped = ?2 WHERE kind = ?3",
                params![vk_version, wrapped.as_bytes(), kind],
            )
            .map(|_| ())
        })
    }

    /// Up to `limit` file keys not yet under version `to`, in file-id order
    /// from the first id after `after`. Each batch starts where the last
    /// ended, so a pass over a million keys reads each row once (starting
    /// every batch from the first row read the rows already re-wrapped again:
    /// quadratic).
    pub fn file_keys_not_under(&self, to: u32, after: Option<&FileId>, limit: i64) -> Result<Vec<FileKeyRow>, DbError> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(FILE_KEYS_NOT_UNDER)?;
            // A range on the primary key, so SQLite seeks to it: the empty
            // blob sorts before every id. (`?3 IS NULL OR file_id > ?3` made
            // it scan from the first row again for every batch.)
            let after: &[u8] = after.map_or(&[], |id| &id[..]);
            let rows = stmt.query_map(params![to, limit, after], |r| {
                let (id, version, wrapped): (Vec<u8>, i64, Vec<u8>) = (r.get(0)?, r.get(1)?, r.get(2)?);
                decode_file_key_row(&id, version, wrapped).ok_or_else(|| {
                    rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Blob,
                        "malformed file_keys row".into(),
                    )
                })
            })?;
            rows.collect()
        })
    }

    pub fn count_file_keys_not_under(&self, to: u32) -> Result<u64, DbError> {
        self.with_conn(|c| {
            c.query_row("SELECT count(*) FROM file_keys WHERE vk_version != ?1", [to], |r| {
                r.get(0)
            })
        })
    }

    /// Stores re-wrapped keys, each only if its row is still under the
    /// version it was read with (a newer change wins).
    pub fn store_rewrapped(&self, to: u32, rows: &[FileKeyRow]) -> Result<(), DbError> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut update = tx.prepare_cached(
                    "UPDATE file_keys SET vk_version = ?1, wrapped = ?2 WHERE file_id = ?3 AND vk_version = ?4",
                )?;
                for (id, from, wrapped) in rows {
                    update.execute(params![to, wrapped.as_bytes(), &id[..], from])?;
                }
            }
            tx.commit()
        })
    }

    /// Ends a rotation once no file key is left under another version than
    /// `active`: the retiring versions become retired and lose their blobs.
    /// Returns them, or None if keys under an old version remain or
    /// `active` is no longer the active version.
    pub fn retire_if_done(&self, active: u32) -> Result<Option<Vec<u32>>, DbError> {
        self.with_conn(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Another rotation that began meanwhile made `active` retiring:
            // erasing it would take the keys just moved to it.
            let still_active: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM volume_keys WHERE version = ?1 AND state = 'active')",
                [active],
                |r| r.get(0),
            )?;
            let left: u64 = tx.query_row("SELECT count(*) FROM file_keys WHERE vk_version != ?1", [active], |r| {
                r.get(0)
            })?;
            if left > 0 || !still_active {
                return Ok(None);
            }
            let retired: Vec<u32> = {
                let mut stmt = tx.prepare("SELECT version FROM volume_keys WHERE state = 'retiring'")?;
                stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
            };
            tx.execute(
                "UPDATE volume_keys SET state = 'retired', wrapped = NULL WHERE state = 'retiring'",
                [],
            )?;
            tx.commit()?;
            Ok(Some(retired))
        })
    }

    /// Replaces a volume-key version's provider blob (master-key re-wrap).
    pub fn set_volume_key_blob(&self, version: u32, blob: &WrappedKey) -> Result<(), DbError> {
        self.with_conn(|conn| {
            conn.execute(
                "UPDATE volume_keys SET wrapped = ?1 WHERE version = ?2",
                params![blob.as_bytes(), version],
            )
            .map(|_| ())
        })
    }

    /// Checkpoints and truncates the WAL (see `checkpoint_truncate`).
    pub fn checkpoint(&self) -> Result<(), DbError> {
        let mut guard = lock(&self.conn);
        let conn = self.connected(&mut guard)?;
        checkpoint_truncate(conn).map_err(self.sqlite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each batch must seek to where the last one ended: a plan that scans
    /// the table re-reads every row before it, for every batch.
    #[test]
    fn a_rotation_batch_seeks_by_file_id() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(super::super::SCHEMA).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {FILE_KEYS_NOT_UNDER}"))
            .unwrap()
            .query_map(params![2, 5000, &[0u8; 16][..]], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|step| step.contains("SEARCH file_keys USING PRIMARY KEY (file_id>?)")),
            "{plan:?}"
        );
    }
}
