//! The metadata DB: one SQLite file in the backing directory. File data keys
//! are queued in memory and committed in batches (see docs/DESIGN.md); an
//! fsync of any file commits the queue first.

use crate::util::lock;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::crypto::{FileId, WrappedKey};

pub mod links;
mod pending;
pub mod rotation;

use pending::PendingKeys;
pub use pending::{Commit, PendingBatch};

pub const DB_FILE: &str = "kmsfs.db";
/// The format new volumes get. Format 1 (files may end after their header
/// or in a hole) is still read; see docs/FORMAT.md.
pub const FORMAT_VERSION: u32 = 2;
/// Commit the queue once it holds this many rows, without waiting for the timer.
const MAX_PENDING: usize = 4096;

const SCHEMA: &str = "
CREATE TABLE volume (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    volume_id BLOB NOT NULL CHECK (length(volume_id) = 16),
    format_version INTEGER NOT NULL,
    provider TEXT NOT NULL,
    master_key_id TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE volume_keys (
    version INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('active', 'retiring', 'retired')),
    wrapped BLOB,
    created_at INTEGER NOT NULL
);
CREATE TABLE volume_secrets (
    kind TEXT PRIMARY KEY,
    vk_version INTEGER NOT NULL REFERENCES volume_keys(version),
    wrapped BLOB NOT NULL
);
CREATE TABLE file_keys (
    file_id BLOB PRIMARY KEY CHECK (length(file_id) = 16),
    vk_version INTEGER NOT NULL REFERENCES volume_keys(version),
    wrapped BLOB NOT NULL
) WITHOUT ROWID;
-- Symlink targets too long to be stored (encrypted) in the backing symlink itself.
CREATE TABLE link_targets (
    link_id BLOB PRIMARY KEY CHECK (length(link_id) = 16),
    sealed BLOB NOT NULL
) WITHOUT ROWID;
-- A key wrapped under a version that is being retired would be lost with it.
CREATE TRIGGER file_keys_insert_active BEFORE INSERT ON file_keys
WHEN (SELECT state FROM volume_keys WHERE version = NEW.vk_version) IS NOT 'active'
BEGIN SELECT RAISE(ABORT, 'file key wrapped under a volume key that is not active'); END;
CREATE TRIGGER file_keys_update_active BEFORE UPDATE OF vk_version ON file_keys
WHEN (SELECT state FROM volume_keys WHERE version = NEW.vk_version) IS NOT 'active'
BEGIN SELECT RAISE(ABORT, 'file key wrapped under a volume key that is not active'); END;
";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("metadata DB {path} is damaged or unreadable: {reason}")]
    Damaged { path: PathBuf, reason: String },
    /// Whole, perhaps, but not to be opened as it is (a symlink, a hard link).
    #[error("metadata DB file {path} is refused: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("metadata DB {path} has format version {found}; this kmsfs supports 1 to {FORMAT_VERSION}")]
    UnsupportedFormat { path: PathBuf, found: u32 },
    #[error("metadata DB {path}: {source}{}", full_hint(source))]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error(
        "metadata DB {path} cannot be opened: the filesystem holding it is full ({reason}); \
         free space there and try again (the DB itself is not damaged)"
    )]
    Full { path: PathBuf, reason: String },
}

/// What a person can do about SQLite's SQLITE_FULL, said beside it.
fn full_hint(e: &rusqlite::Error) -> &'static str {
    match e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull => {
            " (the filesystem holding it is full: free space there and try again; the DB itself is not damaged)"
        }
        _ => "",
    }
}

/// What SQLite's failure to open or read the DB at `path` means: a full
/// filesystem, or damage.
fn unreadable(path: &Path) -> impl Fn(rusqlite::Error) -> DbError + Copy + '_ {
    move |e| {
        if full_filesystem(path, &e) {
            DbError::Full {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        } else {
            DbError::Damaged {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        }
    }
}

/// Whether SQLite's failure `e` to open or set up the DB at `path` comes
/// from a full filesystem, which it reports as a disk I/O error, not as
/// damage to the DB.
fn full_filesystem(path: &Path, e: &rusqlite::Error) -> bool {
    let rusqlite::Error::SqliteFailure(failure, _) = e else {
        return false;
    };
    if failure.code == rusqlite::ErrorCode::DiskFull {
        return true;
    }
    if failure.code != rusqlite::ErrorCode::SystemIoFailure {
        return false;
    }
    let Some(st) = path.parent().and_then(|dir| rustix::fs::statvfs(dir).ok()) else {
        return false;
    };
    if st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY) {
        return false;
    }
    // Blocks available to normal users, for root too: ext4 counts as free
    // a reserve (`reserved_clusters`) no one may use, so a disk that is
    // full for root still shows free blocks. Filesystems that count no
    // inodes (btrfs, vfat) report none free.
    (st.f_blocks > 0 && st.f_bavail == 0) || (st.f_files > 0 && st.f_favail == 0)
}

#[derive(Debug, Clone)]
pub struct VolumeRow {
    pub volume_id: [u8; 16],
    pub format_version: u32,
    pub provider: String,
    pub master_key_id: String,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct VolumeKeyRow {
    pub version: u32,
    pub state: String,
    pub wrapped: Option<WrappedKey>,
    pub created_at: i64,
}

pub struct MetadataDb {
    path: PathBuf,
    /// None between `disconnect` and `reconnect` (across a fork: SQLite's
    /// POSIX locks do not survive one, so no connection may cross it).
    conn: Mutex<Option<Connection>>,
    /// A second connection for the lookups of first opens (`file_key`): in
    /// WAL mode it reads while `conn` commits, so an open never waits for a
    /// flush and its fsync. Reconnected with `conn`.
    reader: Mutex<Option<Connection>>,
    pending: Mutex<PendingKeys>,
    /// `PRAGMA user_version`; the volume row must say the same.
    format: u32,
}

/// How much of a DB `MetadataDb::open` checks before it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The schema only (reads of a few rows that choose nothing secret).
    Schema,
    /// Every page too (`PRAGMA quick_check`), before any key is read from it.
    Whole,
}

/// Every page of the DB behind `conn` (`PRAGMA quick_check`).
///
/// The file is read through SQLite only: opening and closing another
/// descriptor of it in this process would drop every POSIX lock SQLite
/// holds on it, and another process could then reset the WAL under this
/// one's connections.
fn check_whole(conn: &Connection, path: &Path) -> Result<(), DbError> {
    let damaged = |reason: String| DbError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(unreadable(path))?;
    if check != "ok" {
        return Err(damaged(check));
    }
    Ok(())
}

const READ_WRITE: OpenFlags = OpenFlags::SQLITE_OPEN_READ_WRITE.union(OpenFlags::SQLITE_OPEN_NO_MUTEX);

impl MetadataDb {
    fn sqlite(&self) -> impl FnOnce(rusqlite::Error) -> DbError + '_ {
        move |source| DbError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn connect(path: &Path, flags: OpenFlags) -> Result<Connection, DbError> {
        // SQLite's advice for database files that cannot be trusted: check
        // each b-tree cell's size as pages are read, and refuse changes to
        // the schema's internals.
        let hardened = |conn: &Connection| -> rusqlite::Result<()> {
            conn.pragma_update(None, "cell_size_check", "ON")?;
            conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
            Ok(())
        };
        // The backing directory may not pick a file for kmsfs to open (a
        // symlink to another volume's DB, a device, a FIFO). SQLite's
        // NOFOLLOW refuses a symlink anywhere in the path, so the path up
        // to the DB's own name (the user's to choose) is resolved first.
        let resolved;
        let path = match (path.parent().map(std::fs::canonicalize), path.file_name()) {
            (Some(Ok(dir)), Some(name)) => {
                resolved = dir.join(name);
                resolved.as_path()
            }
            _ => path,
        };
        let damaged = unreadable(path);
        // SQLite writes the DB and its companions in place: one that has
        // another name (a hard link) would have kmsfs write a file outside
        // the volume. SQLite refuses a companion that is not a regular file
        // with "unable to open database file", naming no file: named here.
        for companion in ["", "-wal", "-shm", "-journal"] {
            let mut file = path.as_os_str().to_owned();
            file.push(companion);
            let file = PathBuf::from(file);
            let Ok(meta) = std::fs::symlink_metadata(&file) else {
                continue;
            };
            if !meta.file_type().is_file() {
                let remedy = if companion.is_empty() {
                    ""
                } else {
                    "; if it links to this volume's own file, put a copy of that in its place, else remove it \
                     (the DB opens without it)"
                };
                return Err(DbError::Refused {
                    path: file,
                    reason: format!(
                        "not a regular file (a symlink, directory, device or FIFO in its place is refused){remedy}"
                    ),
                });
            }
            if meta.nlink() > 1 {
                return Err(DbError::Refused {
                    path: file,
                    reason: "it has other names (hard links), so writing it would change a file outside the \
                             volume; remove its other names, or make a copy of it in its place"
                        .into(),
                });
            }
        }
        let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NOFOLLOW).map_err(damaged)?;
        hardened(&conn).map_err(damaged)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(damaged)?;
        // WAL: readers never block the writer; FULL: a commit is durable when it returns.
        conn.pragma_update(None, "journal_mode", "WAL").map_err(damaged)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(damaged)?;
        conn.pragma_update(None, "secure_delete", "ON").map_err(damaged)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(damaged)?;
        // Schema objects may not call functions with side effects.
        conn.pragma_update(None, "trusted_schema", "OFF").map_err(damaged)?;
        Ok(conn)
    }

    pub fn create(
        path: &Path,
        volume: &VolumeRow,
        volume_key: (u32, &WrappedKey),
        secrets: &[(&str, &WrappedKey)],
    ) -> Result<Self, DbError> {
        // SQLite gives the -wal and -shm files the main file's mode: 0600 for all three.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| DbError::Damaged {
                path: path.to_path_buf(),
                reason: format!("cannot create: {e}"),
            })?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Self::connect(path, flags)?;
        let err = |source| DbError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(SCHEMA).map_err(err)?;
        tx.execute(
            "INSERT INTO volume (id, volume_id, format_version, provider, master_key_id, created_at) VALUES (1, ?1, ?2, ?3, ?4, ?5)",
            params![&volume.volume_id[..], volume.format_version, volume.provider, volume.master_key_id, volume.created_at],
        )
        .map_err(err)?;
        tx.execute(
            "INSERT INTO volume_keys (version, state, wrapped, created_at) VALUES (?1, 'active', ?2, ?3)",
            params![volume_key.0, volume_key.1.as_bytes(), volume.created_at],
        )
        .map_err(err)?;
        for (kind, wrapped) in secrets {
            tx.execute(
                "INSERT INTO volume_secrets (kind, vk_version, wrapped) VALUES (?1, ?2, ?3)",
                params![kind, volume_key.0, wrapped.as_bytes()],
            )
            .map_err(err)?;
        }
        tx.pragma_update(None, "user_version", volume.format_version)
            .map_err(err)?;
        tx.commit().map_err(err)?;
        Self::serving(path, conn, volume.format_version)
    }

    pub fn open(path: &Path, check: Check) -> Result<Self, DbError> {
        let conn = Self::connect(path, READ_WRITE)?;
        if check == Check::Whole {
            check_whole(&conn, path)?;
        }
        let version: u32 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(unreadable(path))?;
        check_schema(&conn).map_err(|reason| DbError::Damaged {
            path: path.to_path_buf(),
            reason,
        })?;
        if !(1..=FORMAT_VERSION).contains(&version) {
            return Err(DbError::UnsupportedFormat {
                path: path.to_path_buf(),
                found: version,
            });
        }
        Self::serving(path, conn, version)
    }

    /// Checks every page of the DB file at `path` on a connection of its own
    /// (for a DB opened with `Check::Schema` and in use meanwhile).
    pub fn check_file(path: &Path) -> Result<(), DbError> {
        // Read-write but changing nothing: on a read-only connection SQLite's
        // check passes over CHECK constraints, which a row edited with
        // `ignore_check_constraints` breaks.
        let conn = Self::connect(path, READ_WRITE)?;
        conn.pragma_update(None, "query_only", true).map_err(unreadable(path))?;
        check_whole(&conn, path)
    }

    /// The DB over `conn`, with its second connection for first-open lookups.
    fn serving(path: &Path, conn: Connection, format: u32) -> Result<Self, DbError> {
        Ok(MetadataDb {
            path: path.to_path_buf(),
            conn: Mutex::new(Some(conn)),
            reader: Mutex::new(Some(Self::connect(path, READ_WRITE)?)),
            pending: Mutex::default(),
            format,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn connected<'a>(&self, guard: &'a mut MutexGuard<'_, Option<Connection>>) -> Result<&'a mut Connection, DbError> {
        guard.as_mut().ok_or_else(|| DbError::Damaged {
            path: self.path.clone(),
            reason: "not connected".into(),
        })
    }

    /// Closes the connection (before a fork). Queued keys must be flushed first.
    pub fn disconnect(&self) {
        lock(&self.conn).take();
        lock(&self.reader).take();
    }

    /// Opens a fresh connection (after a fork).
    pub fn reconnect(&self) -> Result<(), DbError> {
        let conn = Self::connect(&self.path, READ_WRITE)?;
        let reader = Self::connect(&self.path, READ_WRITE)?;
        *lock(&self.conn) = Some(conn);
        *lock(&self.reader) = Some(reader);
        Ok(())
    }

    pub fn volume(&self) -> Result<VolumeRow, DbError> {
        let row = self.volume_row()?;
        if row.format_version != self.format {
            return Err(DbError::Damaged {
                path: self.path.clone(),
                reason: format!(
                    "the volume row says format {} but the DB is format {}",
                    row.format_version, self.format
                ),
            });
        }
        Ok(row)
    }

    fn volume_row(&self) -> Result<VolumeRow, DbError> {
        let mut guard = lock(&self.conn);
        let conn = self.connected(&mut guard)?;
        conn.query_row(
            "SELECT volume_id, format_version, provider, master_key_id, created_at FROM volume WHERE id = 1",
            [],
            |r| {
                let id: Vec<u8> = r.get(0)?;
                let volume_id = decode_id(&id).ok_or_else(|| {
                    rusqlite::Error::FromSqlConversionFailure(
                        0,
                        rusqlite::types::Type::Blob,
                        "volume id is not 16 bytes".into(),
                    )
                })?;
                Ok(VolumeRow {
                    volume_id,
                    format_version: r.get(1)?,
                    provider: r.get(2)?,
                    master_key_id: r.get(3)?,
                    created_at: r.get(4)?,
                })
            },
        )
        .map_err(|e| DbError::Damaged {
            path: self.path.clone(),
            reason: format!("volume row: {e}"),
        })
    }

    pub fn volume_keys(&self) -> Result<Vec<VolumeKeyRow>, DbError> {
        let mut guard = lock(&self.conn);
        let conn = self.connected(&mut guard)?;
        let mut stmt = conn
            .prepare("SELECT version, state, wrapped, created_at FROM volume_keys ORDER BY version")
            .map_err(self.sqlite())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(VolumeKeyRow {
                    version: r.get(0)?,
                    state: r.get(1)?,
                    wrapped: r.get::<_, Option<Vec<u8>>>(2)?.map(WrappedKey::from_bytes),
                    created_at: r.get(3)?,
                })
            })
            .map_err(self.sqlite())?;
        rows.collect::<Result<_, _>>().map_err(self.sqlite())
    }

    pub fn secrets(&self) -> Result<Vec<(String, u32, WrappedKey)>, DbError> {
        let mut guard = lock(&self.conn);
        let conn = self.connected(&mut guard)?;
        let mut stmt = conn
            .prepare("SELECT kind, vk_version, wrapped FROM volume_secrets")
            .map_err(self.sqlite())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, WrappedKey::from_bytes(r.get(2)?))))
            .map_err(self.sqlite())?;
        rows.collect::<Result<_, _>>().map_err(self.sqlite())
    }

    pub fn file_key(&self, file_id: &FileId) -> Result<Option<(u32, WrappedKey)>, DbError> {
        if let Some(queued) = self.queued_file_key(file_id) {
            return Ok(queued);
        }
        // Not found queued: then it was committed before it left the queue,
        // and the reader's snapshot (taken now) has it.
        let mut guard = lock(&self.reader);
        let conn = self.connected(&mut guard)?;
        read_file_key(conn, file_id).map_err(self.sqlite())
    }

    /// `file_key` of each of `file_ids`, those not queued read a few dozen
    /// to a transaction (one lock of the DB instead of one per key, and
    /// the reader not held long from the files being opened).
    pub fn file_keys(&self, file_ids: &[FileId]) -> Result<Vec<Option<(u32, WrappedKey)>>, DbError> {
        let mut keys = Vec::with_capacity(file_ids.len());
        for some in file_ids.chunks(32) {
            keys.extend(self.file_keys_at_once(some)?);
        }
        Ok(keys)
    }

    fn file_keys_at_once(&self, file_ids: &[FileId]) -> Result<Vec<Option<(u32, WrappedKey)>>, DbError> {
        let queued: Vec<_> = file_ids.iter().map(|id| self.queued_file_key(id)).collect();
        let mut guard = lock(&self.reader);
        let conn = self.connected(&mut guard)?;
        let read = || -> rusqlite::Result<Vec<_>> {
            let tx = conn.transaction()?;
            let keys = file_ids
                .iter()
                .zip(queued)
                .map(|(id, queued)| queued.map_or_else(|| read_file_key(&tx, id), Ok))
                .collect::<rusqlite::Result<_>>()?;
            tx.finish()?;
            Ok(keys)
        };
        read().map_err(self.sqlite())
    }

    /// A key still queued (or being committed): `Some(None)` if queued for deletion.
    fn queued_file_key(&self, file_id: &FileId) -> Option<Option<(u32, WrappedKey)>> {
        let pending = lock(&self.pending);
        for queued in [
            (&pending.inserts, &pending.deletes),
            (&pending.in_flight.inserts, &pending.in_flight.deletes),
        ] {
            if let Some((v, w)) = queued.0.get(file_id) {
                return Some(Some((*v, w.clone())));
            }
            if queued.1.contains(file_id) {
                return Some(None);
            }
        }
        None
    }

    /// Lets the connection that looks up file keys cache up to `mib` MiB of
    /// the DB's pages (SQLite's default is 2 MiB). For fsck, which looks up
    /// every file's key in the order of the walk: once the key b-tree
    /// outgrows the cache (tens of thousands of files), every lookup reads
    /// pages again.
    pub fn cache_for_lookups(&self, mib: u64) -> Result<(), DbError> {
        let mut guard = lock(&self.reader);
        let conn = self.connected(&mut guard)?;
        let kib = i64::try_from(mib.saturating_mul(1024)).unwrap_or(i64::MAX);
        conn.pragma_update(None, "cache_size", -kib).map_err(self.sqlite())
    }

    /// Runs `f` on the connection (the one place SQL meets it).
    fn with_conn<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T, DbError> {
        let mut guard = lock(&self.conn);
        let conn = self.connected(&mut guard)?;
        f(conn).map_err(self.sqlite())
    }

    /// The wrapped blob of one volume-key version.
    pub fn volume_key(&self, version: u32) -> Result<Option<VolumeKeyRow>, DbError> {
        Ok(self.volume_keys()?.into_iter().find(|k| k.version == version))
    }

    /// Number of file keys wrapped under each volume-key version.
    pub fn file_key_counts(&self) -> Result<Vec<(u32, u64)>, DbError> {
        let mut guard = lock(&self.conn);
        let conn = self.connected(&mut guard)?;
        let mut stmt = conn
            .prepare("SELECT vk_version, count(*) FROM file_keys GROUP BY vk_version ORDER BY vk_version")
            .map_err(self.sqlite())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.sqlite())?;
        rows.collect::<Result<_, _>>().map_err(self.sqlite())
    }
}

/// A 16-byte id (volume id, file id) from a DB blob; None if the length is wrong.
/// A schema object: (type, name, table, SQL).
type SchemaObject = (String, String, String, Option<String>);

/// The schema objects of a connection's DB.
fn schema_objects(conn: &Connection) -> rusqlite::Result<Vec<SchemaObject>> {
    let mut stmt = conn.prepare("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
    rows.collect()
}

/// The DB holds exactly kmsfs's tables, indexes and triggers: the backing
/// directory is not trusted, and a trigger of someone else's could keep
/// erased keys, copy them aside, or change what kmsfs reads.
fn check_schema(conn: &Connection) -> Result<(), String> {
    let expected = Connection::open_in_memory()
        .and_then(|m| m.execute_batch(SCHEMA).map(|()| m))
        .and_then(|m| schema_objects(&m))
        .map_err(|e| e.to_string())?;
    let found = schema_objects(conn).map_err(|e| e.to_string())?;
    if found == expected {
        return Ok(());
    }
    let differs = found
        .iter()
        .find(|o| !expected.contains(o))
        .map(|(kind, name, ..)| format!("{kind} {name} is not kmsfs's (the DB was edited)"))
        .or_else(|| {
            expected
                .iter()
                .find(|o| !found.contains(o))
                .map(|(kind, name, ..)| format!("{kind} {name} is missing or altered"))
        })
        .unwrap_or_else(|| "its schema differs from kmsfs's".into());
    Err(differs)
}

pub fn decode_id(bytes: &[u8]) -> Option<[u8; 16]> {
    bytes.try_into().ok()
}

/// A `file_keys` row as read from the DB, validated: (file id, volume-key version, wrapped key).
pub fn decode_file_key_row(file_id: &[u8], vk_version: i64, wrapped: Vec<u8>) -> Option<(FileId, u32, WrappedKey)> {
    let id = decode_id(file_id)?;
    let version = u32::try_from(vk_version).ok().filter(|&v| v > 0)?;
    // nonce (12) + key (32) + tag (16)
    (wrapped.len() == 60).then(|| (id, version, WrappedKey::from_bytes(wrapped)))
}

/// Checkpoints the WAL into the DB file and truncates it to zero bytes, so
/// that erased or replaced rows leave no copy in the WAL.
pub fn checkpoint_truncate(conn: &Connection) -> rusqlite::Result<()> {
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
    if busy != 0 {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("WAL checkpoint blocked by a reader".into()),
        ));
    }
    Ok(())
}

fn read_file_key(conn: &Connection, file_id: &FileId) -> rusqlite::Result<Option<(u32, WrappedKey)>> {
    // Cached: this runs on every first open of a file, where parsing the SQL showed in profiles.
    let mut stmt = conn.prepare_cached("SELECT vk_version, wrapped FROM file_keys WHERE file_id = ?1")?;
    stmt.query_row([&file_id[..]], |r| Ok((r.get(0)?, WrappedKey::from_bytes(r.get(1)?))))
        .optional()
}

#[cfg(test)]
mod tests;
