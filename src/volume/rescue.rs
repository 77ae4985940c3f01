//! File keys a mount daemon could not commit to the metadata DB (a full
//! disk, a provider that stayed away) are not dropped when it exits: they go
//! to `kmsfs.pending-keys` beside the DB, wrapped as in the DB, and the next
//! open of the volume (mount, fsck, rotate) stores them and removes the file.
//!
//! The file sits in the backing directory, so it is as hostile as the DB: a
//! row only ever fills a gap (never replaces a stored key), must be under
//! the active volume-key version, and still has to unwrap under it.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::db::{MetadataDb, decode_id};
use super::{VolumeError, io_at};
use crate::crypto::{FileId, WrappedKey};
use crate::util::hex;

pub const PENDING_FILE: &str = "kmsfs.pending-keys";

#[derive(Serialize, Deserialize)]
struct PendingFile {
    volume_id: String,
    /// (file id, volume-key version, wrapped key)
    inserts: Vec<(String, u32, String)>,
    deletes: Vec<String>,
}

/// Writes the DB's queued changes to the pending file (merged with one a
/// previous daemon left). Returns how many rows it holds.
pub fn save(backing: &Path, volume_id: &[u8; 16], db: &MetadataDb) -> Result<usize, VolumeError> {
    let path = backing.join(PENDING_FILE);
    let (inserts, deletes) = db.take_pending();
    let mut file = match read(backing, volume_id) {
        Ok(Some((old_inserts, old_deletes))) => encode(volume_id, &old_inserts, &old_deletes),
        Ok(None) => encode(volume_id, &[], &[]),
        Err(e @ VolumeError::PendingDamaged { .. }) => {
            set_aside(backing, &e)?;
            encode(volume_id, &[], &[])
        }
        Err(e) => return Err(e),
    };
    let new = encode(volume_id, &inserts, &deletes);
    file.inserts.extend(new.inserts);
    file.deletes.extend(new.deletes);
    let text = serde_json::to_vec(&file).map_err(|e| VolumeError::Io {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    crate::kms::locked_file::replace(&path, &text, 0o600, false).map_err(io_at(&path))?;
    Ok(file.inserts.len() + file.deletes.len())
}

fn encode(volume_id: &[u8; 16], inserts: &[(FileId, u32, WrappedKey)], deletes: &[FileId]) -> PendingFile {
    PendingFile {
        volume_id: hex(volume_id),
        inserts: inserts
            .iter()
            .map(|(id, v, w)| (hex(id), *v, B64.encode(w.as_bytes())))
            .collect(),
        deletes: deletes.iter().map(|id| hex(id)).collect(),
    }
}

type Rows = (Vec<(FileId, u32, WrappedKey)>, Vec<FileId>);

fn unhex(s: &str) -> Option<FileId> {
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect();
    decode_id(&bytes?)
}

/// Larger than any pending-keys file kmsfs writes (about 1.8 million keys).
const MAX_PENDING_BYTES: u64 = 256 << 20;

/// The rows of the pending file, if there is one for this volume.
fn read(backing: &Path, volume_id: &[u8; 16]) -> Result<Option<Rows>, VolumeError> {
    let path = backing.join(PENDING_FILE);
    let damaged = |reason: &str| VolumeError::PendingDamaged {
        path: path.clone(),
        reason: reason.to_string(),
    };
    // Never through a symlink, never a FIFO or device: the backing directory
    // is not trusted to pick a file, or to make kmsfs wait or read forever.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path);
    let file = match opened {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(damaged("a symlink")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_at(&path)(e)),
    };
    let meta = file.metadata().map_err(io_at(&path))?;
    if !meta.is_file() {
        return Err(damaged("not a regular file"));
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
    Ok(Some((inserts, deletes)))
}

/// Moves a pending-keys file that is not one (`why`) out of the way, for a
/// person to look at: never in the way of opening or leaving the volume.
fn set_aside(backing: &Path, why: &VolumeError) -> Result<(), VolumeError> {
    log::error!("{why}; moved to {PENDING_FILE}.unreadable, its keys are not stored");
    let path = backing.join(PENDING_FILE);
    std::fs::rename(&path, backing.join(format!("{PENDING_FILE}.unreadable"))).map_err(io_at(&path))
}

/// Stores what a previous daemon saved, then removes the file.
pub fn restore(backing: &Path, volume_id: &[u8; 16], db: &MetadataDb) -> Result<(), VolumeError> {
    let (inserts, deletes) = match read(backing, volume_id) {
        Ok(Some(rows)) => rows,
        Ok(None) => return Ok(()),
        // Unreadable: set aside (for a person to look at), never in the way of opening the volume.
        Err(e @ VolumeError::PendingDamaged { .. }) => return set_aside(backing, &e),
        Err(e) => return Err(e),
    };
    let (stored, skipped) = db.restore_rows(&inserts, &deletes)?;
    if skipped > 0 {
        log::error!(
            "{skipped} file key(s) saved by an earlier daemon are under a volume key that is no longer \
             active and could not be stored; their files read as EIO (fsck lists them)"
        );
    }
    log::warn!(
        "stored {stored} file key(s) and {} deletion(s) an earlier daemon could not commit",
        deletes.len()
    );
    let path = backing.join(PENDING_FILE);
    std::fs::remove_file(&path).map_err(io_at(&path))?;
    std::fs::File::open(backing)
        .and_then(|d| d.sync_all())
        .map_err(io_at(backing))
}

/// Whether a daemon left keys waiting in the backing directory.
pub fn waiting(backing: &Path) -> bool {
    backing.join(PENDING_FILE).exists()
}
