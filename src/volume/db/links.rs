//! Long symlink targets, and what fsck asks of the DB as a whole.

use rusqlite::OptionalExtension;

use super::{DbError, MetadataDb, decode_id};
use crate::crypto::FileId;

impl MetadataDb {
    pub fn insert_link_target(&self, link_id: &[u8; 16], sealed: &[u8]) -> Result<(), DbError> {
        self.with_conn(|c| {
            c.execute(
                "INSERT INTO link_targets (link_id, sealed) VALUES (?1, ?2)",
                rusqlite::params![&link_id[..], sealed],
            )
            .map(|_| ())
        })
    }

    pub fn link_target(&self, link_id: &[u8; 16]) -> Result<Option<Vec<u8>>, DbError> {
        self.with_conn(|c| {
            c.query_row(
                "SELECT sealed FROM link_targets WHERE link_id = ?1",
                [&link_id[..]],
                |r| r.get(0),
            )
            .optional()
        })
    }

    pub fn delete_link_target(&self, link_id: &[u8; 16]) -> Result<(), DbError> {
        self.with_conn(|c| {
            c.execute("DELETE FROM link_targets WHERE link_id = ?1", [&link_id[..]])
                .map(|_| ())
        })
    }

    /// Every long symlink target's id (malformed ones skipped: the schema's
    /// CHECK and `integrity_check` cover those).
    pub fn link_target_ids(&self) -> Result<Vec<[u8; 16]>, DbError> {
        self.ids("SELECT link_id FROM link_targets")
    }

    /// Every file id with a committed data key.
    pub fn file_key_ids(&self) -> Result<Vec<FileId>, DbError> {
        self.ids("SELECT file_id FROM file_keys")
    }

    fn ids(&self, sql: &str) -> Result<Vec<[u8; 16]>, DbError> {
        let raw: Vec<Vec<u8>> = self.with_conn(|c| {
            let mut stmt = c.prepare(sql)?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        })?;
        Ok(raw.iter().filter_map(|id| decode_id(id)).collect())
    }

    /// SQLite's `PRAGMA integrity_check`: "ok", or what is wrong.
    pub fn integrity_check(&self) -> String {
        self.with_conn(|c| c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0)))
            .unwrap_or_else(|e| e.to_string())
    }
}
