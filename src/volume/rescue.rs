//! File keys a mount daemon could not commit to the metadata DB (a full
//! disk, a provider that stayed away) are not dropped when it exits: they go
//! to `kmsfs.pending-keys` beside the DB, wrapped as in the DB, or, when
//! that cannot be written either (the same full or read-only disk), to the
//! host (`host_file`); the next open of the volume (mount, fsck, rotate)
//! stores them and removes the file.
//!
//! The file sits in the backing directory, so it is as hostile as the DB: a
//! row only ever fills a gap (never replaces a stored key), must be under
//! the active volume-key version, and still has to unwrap under it.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::db::rotation::FileKeyRow;
use super::db::{MetadataDb, decode_id};
use super::keyring::KeyRing;
use super::{VolumeError, io_at};
use crate::crypto::{FileId, WrappedKey};
use crate::util::hex;
pub(super) use places::FilesLock;
use places::{SavedFrom, host_file, host_files, set_aside};
pub use places::{is_set_aside, set_aside_files};

mod places;

pub const PENDING_FILE: &str = "kmsfs.pending-keys";

#[derive(Serialize, Deserialize)]
struct PendingFile {
    volume_id: String,
    /// (file id, volume-key version, wrapped key)
    inserts: Vec<(String, u32, String)>,
    deletes: Vec<String>,
    /// On the host only: the backing directory that saved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    saved_from: Option<SavedFrom>,
}

/// A pending-keys file as read: its rows, which file it was, who saved it.
struct Saved {
    rows: Rows,
    identity: Identity,
    from: Option<SavedFrom>,
}

/// Writes the DB's queued changes to the pending file (merged with one a
/// previous daemon left) beside the DB, else on the host. Returns how many
/// rows it holds and where it is.
pub fn save(backing: &Path, keys: &KeyRing, db: &MetadataDb) -> Result<(usize, PathBuf), VolumeError> {
    let volume_id = keys.volume_id();
    let _files = FilesLock::take(backing);
    let (inserts, deletes) = db.take_pending();
    // Under the active version where this process holds the key they are
    // under: a rotation that finished meanwhile erased that version for
    // anyone else.
    let (mut inserts, left) = keys.rows_to_active(inserts);
    inserts.extend(left);
    let beside = write_merged(&backing.join(PENDING_FILE), volume_id, &inserts, &deletes, None);
    let Err(beside_error) = beside else {
        return beside;
    };
    let from = SavedFrom::of(backing);
    let Some(host) = host_file(volume_id, from.as_ref()) else {
        return Err(beside_error);
    };
    write_merged(&host, volume_id, &inserts, &deletes, from).map_err(|host_error| VolumeError::Io {
        path: backing.join(PENDING_FILE),
        source: std::io::Error::other(format!("{beside_error}; and on the host: {host_error}")),
    })
}

/// Writes `inserts` and `deletes`, after the rows the file at `path` holds
/// already, to `path`; on the host, with the backing directory that saved
/// them (`from`).
fn write_merged(
    path: &Path,
    volume_id: &[u8; 16],
    inserts: &[(FileId, u32, WrappedKey)],
    deletes: &[FileId],
    from: Option<SavedFrom>,
) -> Result<(usize, PathBuf), VolumeError> {
    let mut file = match read(path, volume_id) {
        Ok(Some(saved)) => {
            let (old_inserts, old_deletes) = saved.rows;
            encode(volume_id, &old_inserts, &old_deletes)
        }
        Ok(None) => encode(volume_id, &[], &[]),
        Err(e @ VolumeError::PendingDamaged { .. }) => {
            set_aside(path, &e.to_string())?;
            encode(volume_id, &[], &[])
        }
        Err(e) => return Err(e),
    };
    file.saved_from = from;
    let new = encode(volume_id, inserts, deletes);
    file.inserts.extend(new.inserts);
    file.deletes.extend(new.deletes);
    let text = serde_json::to_vec(&file).map_err(|e| VolumeError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    if text.len() as u64 > MAX_PENDING_BYTES {
        return Err(VolumeError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!(
                "{} keys and deletions would take more than {} bytes, the most a pending-keys file may hold",
                file.inserts.len() + file.deletes.len(),
                MAX_PENDING_BYTES
            )),
        });
    }
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_at(dir))?;
        // On the host, keys go only where no one else may move them: the
        // directories down from the state directory must be this user's,
        // writable by no one else (a $HOME set to another user's home must
        // not receive them).
        if path.file_name() != Some(std::ffi::OsStr::new(PENDING_FILE)) {
            let me = rustix::process::geteuid().as_raw();
            let real = std::fs::canonicalize(dir).map_err(io_at(dir))?;
            for ancestor in [
                Some(real.as_path()),
                real.parent(),
                real.parent().and_then(Path::parent),
            ]
            .into_iter()
            .flatten()
            {
                // This user's or root's; others may write it only if it is
                // sticky (they cannot move this user's entries then).
                let meta = std::fs::metadata(ancestor).map_err(io_at(ancestor))?;
                let others_write = meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0;
                if (meta.uid() != me && meta.uid() != 0) || others_write {
                    return Err(io_at(ancestor)(std::io::Error::other(
                        "not a directory of this user's that others cannot change",
                    )));
                }
            }
        }
    }
    crate::kms::locked_file::replace(path, &text, 0o600, false).map_err(io_at(path))?;
    Ok((file.inserts.len() + file.deletes.len(), path.to_path_buf()))
}

fn encode(volume_id: &[u8; 16], inserts: &[(FileId, u32, WrappedKey)], deletes: &[FileId]) -> PendingFile {
    PendingFile {
        volume_id: hex(volume_id),
        inserts: inserts
            .iter()
            .map(|(id, v, w)| (hex(id), *v, B64.encode(w.as_bytes())))
            .collect(),
        deletes: deletes.iter().map(|id| hex(id)).collect(),
        saved_from: None,
    }
}

type Rows = (Vec<(FileId, u32, WrappedKey)>, Vec<FileId>);

/// Which file was read (device, inode): a file replaced since (another
/// process saved keys into it) is not removed or rewritten.
type Identity = (u64, u64);

fn identity(path: &Path) -> Option<Identity> {
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn unhex(s: &str) -> Option<FileId> {
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect();
    decode_id(&bytes?)
}

/// The largest pending-keys file kmsfs writes or reads (about 1.8 million
/// keys): one that would be larger is not written, as it would not be read
/// back. (Small in unit tests, to reach it.)
#[cfg(not(test))]
const MAX_PENDING_BYTES: u64 = 256 << 20;
#[cfg(test)]
const MAX_PENDING_BYTES: u64 = 4 << 10;

/// The rows of the pending file at `path`, if there is one, for this volume.
fn read(path: &Path, volume_id: &[u8; 16]) -> Result<Option<Saved>, VolumeError> {
    let path = path.to_path_buf();
    let damaged = |reason: &str| VolumeError::PendingDamaged {
        path: path.clone(),
        reason: reason.to_string(),
    };
    // Never through a symlink, never a FIFO or device (not even opened: a
    // device's open can act): the backing directory is not trusted to pick
    // a file, or to make kmsfs wait or read forever.
    // Nothing there, also where a directory on the way is not one (a home
    // that cannot hold files, say).
    let absent =
        |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if !meta.is_file() => return Err(damaged("not a regular file")),
        Err(e) if absent(&e) => return Ok(None),
        _ => {}
    }
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(damaged("a symlink")),
        Err(e) if absent(&e) => return Ok(None),
        Err(e) => return Err(io_at(&path)(e)),
    };
    let meta = file.metadata().map_err(io_at(&path))?;
    if !meta.is_file() {
        return Err(damaged("not a regular file"));
    }
    // One on the host is this user's own: any other could delete key rows.
    let on_host = path.file_name() != Some(std::ffi::OsStr::new(PENDING_FILE));
    if on_host && meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(damaged("it is not this user's"));
    }
    if meta.len() > MAX_PENDING_BYTES {
        return Err(damaged("larger than any kmsfs writes"));
    }
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_PENDING_BYTES), &mut text).map_err(io_at(&path))?;
    let file: PendingFile = serde_json::from_slice(&text).map_err(|_| damaged("not its JSON"))?;
    if file.volume_id != hex(volume_id) {
        return Err(damaged("it belongs to another volume"));
    }
    let inserts = file
        .inserts
        .iter()
        .map(|(id, v, w)| Some((unhex(id)?, *v, WrappedKey::from_bytes(B64.decode(w).ok()?))))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| damaged("a row is not a file id, version and wrapped key"))?;
    let deletes = file
        .deletes
        .iter()
        .map(|id| unhex(id))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| damaged("a row is not a file id"))?;
    Ok(Some(Saved {
        rows: (inserts, deletes),
        identity: (meta.dev(), meta.ino()),
        from: file.saved_from,
    }))
}

/// Replaces the rows of the pending-keys file at `path` with `rows`.
/// The new file keeps the old one's owner (a root `fsck` or `rotate` must
/// not leave a user's volume a file that user cannot read).
fn rewrite(path: &Path, volume_id: &[u8; 16], rows: &[FileKeyRow], from: Option<SavedFrom>) -> Result<(), VolumeError> {
    let file = PendingFile {
        saved_from: from,
        ..encode(volume_id, rows, &[])
    };
    let text = serde_json::to_vec(&file).map_err(|e| VolumeError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    let owner = std::fs::symlink_metadata(path).map_err(io_at(path))?;
    crate::kms::locked_file::replace(path, &text, 0o600, false).map_err(io_at(path))?;
    let me = rustix::process::geteuid().as_raw();
    if me == 0 && (owner.uid(), owner.gid()) != (0, rustix::process::getegid().as_raw()) {
        std::os::unix::fs::lchown(path, Some(owner.uid()), Some(owner.gid())).map_err(io_at(path))?;
    }
    Ok(())
}

/// What an open could not store of the keys earlier daemons saved.
#[derive(Debug)]
pub enum Unstored {
    /// Rows kept for a later open (a rotation began meanwhile), or set
    /// aside because no volume-key version held opens them: the versions
    /// they may be under must stay.
    Keys(String),
    /// A file that is not a pending-keys file kmsfs wrote, set aside unread
    /// (and logged): `status` and `fsck` report it while it is there.
    NotAPendingFile(String),
}

impl std::fmt::Display for Unstored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unstored::Keys(what) | Unstored::NotAPendingFile(what) => f.write_str(what),
        }
    }
}

/// Stores what a previous daemon saved, beside the DB and on the host,
/// then removes the files. Keys it cannot store (under a volume-key version
/// `keys` does not hold, or that do not authenticate) are not dropped: their
/// file is set aside, and what to say of them is returned.
pub fn restore(backing: &Path, keys: &KeyRing, db: &MetadataDb) -> Result<Vec<Unstored>, VolumeError> {
    let _files = FilesLock::take(backing);
    let mut unstored: Vec<Unstored> = restore_from(&backing.join(PENDING_FILE), keys, db, None)?
        .into_iter()
        .collect();
    let opener = SavedFrom::of(backing);
    for host in host_files(keys.volume_id()) {
        unstored.extend(restore_from(&host, keys, db, opener.as_ref())?);
    }
    Ok(unstored)
}

/// Stores the rows of the pending-keys file at `path`. One on the host that
/// another copy of the volume saved (not `opener`) gives its new keys only
/// (the files it wrote may be in this copy too): its deletions, which may
/// be of files this copy still has, are not applied, and the file stays
/// for that copy.
fn restore_from(
    path: &Path,
    keys: &KeyRing,
    db: &MetadataDb,
    opener: Option<&SavedFrom>,
) -> Result<Option<Unstored>, VolumeError> {
    let Saved {
        rows: (inserts, deletes),
        identity: was,
        from,
    } = match read(path, keys.volume_id()) {
        Ok(Some(read)) => read,
        Ok(None) => return Ok(None),
        // Unreadable: set aside (for a person to look at), never in the way of opening the volume.
        Err(e @ VolumeError::PendingDamaged { .. }) => {
            let aside = set_aside(path, &e.to_string())?;
            return Ok(Some(Unstored::NotAPendingFile(format!(
                "{e}: it is kept as {} and any file keys in it are not stored; look at it, then remove it",
                aside.display()
            ))));
        }
        Err(e) => return Err(e),
    };
    if let (Some(theirs), Some(ours)) = (&from, opener)
        && !theirs.is(ours)
    {
        let (ready, _) = keys.rows_to_active(inserts);
        let restored = db.restore_rows(&ready, &[], &[])?;
        log::warn!(
            "{} holds file keys that another copy of this volume ({}) saved: {} of them stored here too; the \
             file stays for that copy (remove it once that copy is gone)",
            path.display(),
            theirs.path,
            restored.stored
        );
        return Ok(None);
    }
    // A rotation may have begun or ended since they were saved.
    let (ready, left) = keys.rows_to_active(inserts);
    let restored = db.restore_rows(&ready, &left, &deletes)?;
    if restored.stored > 0 || !deletes.is_empty() {
        log::warn!(
            "stored {} file key(s) and {} deletion(s) an earlier daemon could not commit (from {})",
            restored.stored,
            deletes.len(),
            path.display()
        );
    }
    if restored.already > 0 {
        log::info!(
            "{} file key(s) in {} were stored already",
            restored.already,
            path.display()
        );
    }
    if identity(path) != Some(was) {
        // Another process saved keys into it meanwhile (it waited for the
        // lock longer than it would): left whole for the next open, which
        // finds the rows stored now stored already.
        log::info!("{} changed since it was read; left for the next open", path.display());
        return Ok(None);
    }
    // What was stored or applied leaves the file: left there, a deletion
    // done since (a file removed, its key erased) would be undone by a
    // later restore of its old row.
    let kept: Vec<FileKeyRow> = restored.not_active.iter().chain(&restored.unusable).cloned().collect();
    if !kept.is_empty()
        && let Err(e) = rewrite(path, keys.volume_id(), &kept, from)
    {
        // The keys are stored; never in the way of opening the volume.
        let why = format!("it could not be rewritten without the keys stored from it ({e})");
        return Ok(Some(Unstored::Keys(match set_aside(path, &why) {
            Ok(aside) => format!(
                "{} of the file keys saved in {} were not stored, and {why}: it is kept as {}",
                kept.len(),
                path.display(),
                aside.display()
            ),
            Err(moving) => format!(
                "{} of the file keys saved in {} were not stored, and {why} or moved ({moving}): the next open \
                 reads it again",
                kept.len(),
                path.display()
            ),
        })));
    }
    if !restored.not_active.is_empty() {
        // Kept in place: the next open, under the new version, stores them.
        return Ok(Some(Unstored::Keys(format!(
            "{} of the file keys saved in {} were not stored: a rotation began meanwhile; the next mount, \
             fsck or rotate stores them",
            restored.not_active.len(),
            path.display()
        ))));
    }
    if !restored.unusable.is_empty() {
        let mut versions: Vec<u32> = restored.unusable.iter().map(|(_, v, _)| *v).collect();
        versions.sort_unstable();
        versions.dedup();
        let why = format!(
            "{} of the file keys saved in {} are under volume key version(s) {versions:?}, which this volume \
             no longer holds, or do not authenticate: their files read as EIO",
            restored.unusable.len(),
            path.display()
        );
        let aside = set_aside(path, &why)?;
        return Ok(Some(Unstored::Keys(format!(
            "{why}; the file is kept as {}",
            aside.display()
        ))));
    }
    match std::fs::remove_file(path) {
        // Stored at the same time by another process (a mount beside a rotation).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        other => other.map_err(io_at(path))?,
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))?;
    Ok(None)
}

/// Where a daemon left keys of this volume waiting: beside the DB, on the host.
pub fn waiting(backing: &Path, volume_id: &[u8; 16]) -> Vec<PathBuf> {
    let opener = SavedFrom::of(backing);
    std::iter::once(backing.join(PENDING_FILE))
        .chain(host_files(volume_id).into_iter().filter(|host| {
            // Not one another copy of the volume saved (it waits for that copy).
            !matches!(read(host, volume_id), Ok(Some(Saved { from: Some(theirs), .. }))
                if opener.as_ref().is_some_and(|ours| !theirs.is(ours)))
        }))
        // A regular file only: anything else there is set aside unread.
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: u8) -> Vec<(FileId, u32, WrappedKey)> {
        (0..n)
            .map(|i| ([i; crate::crypto::FILE_ID_LEN], 1, WrappedKey::from_bytes(vec![i; 60])))
            .collect()
    }

    /// Every file save writes, read can read back: one that would be too
    /// large for read is refused (an error the daemon reports) instead of
    /// written and set aside, keys and all, at the next open.
    #[test]
    fn never_writes_a_file_too_large_to_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PENDING_FILE);
        let volume = [7u8; 16];
        let first = rows(20);
        write_merged(&path, &volume, &first, &[], None).unwrap();
        let (read_back, _) = read(&path, &volume).unwrap().unwrap().rows;
        assert_eq!(read_back.len(), 20);

        // Merged with what is there, the file would pass the limit.
        let more = rows(60);
        let err = write_merged(&path, &volume, &more, &[], None).unwrap_err().to_string();
        assert!(err.contains("the most a pending-keys file may hold"), "{err}");
        let (kept, _) = read(&path, &volume).unwrap().unwrap().rows;
        assert_eq!(kept.len(), 20, "the earlier rows are untouched");
        assert!(std::fs::metadata(&path).unwrap().len() <= MAX_PENDING_BYTES);
    }
}
