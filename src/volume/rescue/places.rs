//! Where the pending-keys files are and who may touch them: the host's
//! file and the backing directory that saved it, the lock that keeps two
//! processes from storing and saving at once, and the files set aside.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::super::{VolumeError, io_at};
use super::PENDING_FILE;
use crate::util::hex;

/// Which backing directory saved a pending-keys file on the host: another
/// copy of the volume (a backup being checked on the same host) must not
/// take the keys of the one that saved them.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(super) struct SavedFrom {
    pub(super) path: String,
    dev: u64,
    ino: u64,
}

impl SavedFrom {
    pub(super) fn of(backing: &Path) -> Option<Self> {
        let path = std::fs::canonicalize(backing).ok()?;
        let meta = std::fs::metadata(&path).ok()?;
        Some(SavedFrom {
            path: path.to_string_lossy().into_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// The same volume: in the same place (put back from a backup there,
    /// say), or the same directory moved.
    pub(super) fn is(&self, other: &SavedFrom) -> bool {
        self.path == other.path || (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// Keeps other kmsfs processes of this volume from reading or writing its
/// pending-keys files meanwhile: a daemon saving keys as it exits beside a
/// `rotate` storing them would otherwise have its rows removed unread. An
/// exclusive `flock` of the backing directory itself: nothing to create
/// (the disk may be full), and no lock of the DB file, whose POSIX locks
/// SQLite holds and a second descriptor's close would drop.
pub(crate) struct FilesLock {
    _held: Option<std::fs::File>,
}

/// How long a process waits for another holding the pending-keys files
/// (one that stopped, SIGSTOP, would otherwise keep a daemon from exiting).
const FILES_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl FilesLock {
    pub(crate) fn take(backing: &Path) -> Self {
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(backing);
        let start = std::time::Instant::now();
        let locked = dir.and_then(|dir| {
            loop {
                match rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                    Ok(()) => return Ok(dir),
                    Err(rustix::io::Errno::WOULDBLOCK) if start.elapsed() < FILES_LOCK_WAIT => {
                        std::thread::sleep(std::time::Duration::from_millis(20))
                    }
                    Err(rustix::io::Errno::WOULDBLOCK) => {
                        log::warn!(
                            "another process has held the pending-keys files of {} for {} s; going on",
                            backing.display(),
                            FILES_LOCK_WAIT.as_secs()
                        );
                        return Err(std::io::Error::from(rustix::io::Errno::WOULDBLOCK));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        });
        match locked {
            Ok(dir) => FilesLock { _held: Some(dir) },
            Err(e) => {
                // A filesystem without flock: unguarded, as kmsfs was before.
                log::debug!("pending-keys files of {} not locked: {e}", backing.display());
                FilesLock { _held: None }
            }
        }
    }
}

/// Where the host keeps pending keys: `/var/lib/kmsfs/pending-keys` for
/// root, else under `$XDG_STATE_HOME` (default `~/.local/state`, the home
/// from the account database when `$HOME` is unset) `/kmsfs/pending-keys`.
fn host_dir() -> Option<PathBuf> {
    let dir = if rustix::process::geteuid().is_root() {
        PathBuf::from("/var/lib/kmsfs")
    } else {
        crate::util::state_dir()?.join("kmsfs")
    };
    Some(dir.join("pending-keys"))
}

/// Where the keys of volume `volume_id` that the backing directory `from`
/// could not take go on the host: `VOLUME-ID-PLACE.json`, PLACE naming the
/// directory (copies of one volume each have their own); `VOLUME-ID.json`
/// when the directory cannot be named.
pub(super) fn host_file(volume_id: &[u8; 16], from: Option<&SavedFrom>) -> Option<PathBuf> {
    let name = match from {
        Some(from) => {
            use sha2::Digest;
            let place = sha2::Sha256::digest(from.path.as_bytes());
            format!("{}-{}.json", hex(volume_id), hex(&place[..8]))
        }
        None => format!("{}.json", hex(volume_id)),
    };
    Some(host_dir()?.join(name))
}

/// Every pending-keys file of volume `volume_id` on the host, whichever
/// copy of it saved it (`VOLUME-ID.json`, `VOLUME-ID-PLACE.json`).
pub(super) fn host_files(volume_id: &[u8; 16]) -> Vec<PathBuf> {
    let Some(dir) = host_dir() else {
        return Vec::new();
    };
    let id = hex(volume_id);
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name().to_str().is_some_and(|n| {
                n.strip_prefix(id.as_str())
                    .and_then(|rest| rest.strip_suffix(".json"))
                    .is_some_and(|place| {
                        place.is_empty()
                            || place
                                .strip_prefix('-')
                                .is_some_and(|p| p.len() == 16 && p.bytes().all(|b| b.is_ascii_hexdigit()))
                    })
            })
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Moves a pending-keys file that is not one (`why`) out of the way, for a
/// person to look at: never in the way of opening or leaving the volume.
pub(super) fn set_aside(path: &Path, why: &str) -> Result<PathBuf, VolumeError> {
    // Beside any set aside before, never over it.
    let aside = (0..)
        .map(|n| match n {
            0 => PathBuf::from(format!("{}{SET_ASIDE}", path.display())),
            n => PathBuf::from(format!("{}{SET_ASIDE}.{n}", path.display())),
        })
        .find(|p| std::fs::symlink_metadata(p).is_err())
        .unwrap_or_else(|| PathBuf::from(format!("{}{SET_ASIDE}", path.display())));
    log::error!("{why}; moved to {}, its keys are not stored", aside.display());
    std::fs::rename(path, &aside).map_err(io_at(path))?;
    Ok(aside)
}

/// What `set_aside` adds to a pending-keys file's name, before a `.N` that
/// keeps it beside those set aside before.
const SET_ASIDE: &str = ".unreadable";

/// Whether `name` is that of pending-keys file `base` set aside:
/// `BASE.unreadable` or `BASE.unreadable.N`.
pub fn is_set_aside(name: &str, base: &str) -> bool {
    name.strip_prefix(base)
        .and_then(|rest| rest.strip_prefix(SET_ASIDE))
        .is_some_and(|n| {
            n.is_empty()
                || n.strip_prefix('.')
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// The pending-keys files of this volume set aside, beside the DB and on
/// the host: keys in them stay unstored until a person looks (whatever
/// they are: a FIFO is set aside as it is).
pub fn set_aside_files(backing: &Path, volume_id: &[u8; 16]) -> Vec<PathBuf> {
    let from = SavedFrom::of(backing);
    set_aside_of(
        std::iter::once(backing.join(PENDING_FILE))
            .chain(host_file(volume_id, None))
            .chain(from.and_then(|from| host_file(volume_id, Some(&from)))),
    )
}

/// The files set aside from the pending-keys files at `pending`.
fn set_aside_of(pending: impl Iterator<Item = PathBuf>) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = pending
        .filter_map(|pending| {
            let base = pending.file_name()?.to_str()?.to_string();
            let entries = std::fs::read_dir(pending.parent()?).ok()?;
            Some(
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_str().is_some_and(|n| is_set_aside(n, &base)))
                    .map(|e| e.path())
                    .collect::<Vec<_>>(),
            )
        })
        .flatten()
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only this volume's files set aside are listed, whatever they are;
    /// the pending-keys files themselves and look-alikes are not.
    #[test]
    fn the_files_set_aside_are_this_volumes_alone() {
        let dir = tempfile::tempdir().unwrap();
        let beside = dir.path().join("backing");
        let host = dir.path().join("host");
        std::fs::create_dir_all(&beside).unwrap();
        std::fs::create_dir_all(&host).unwrap();
        for name in [
            "kmsfs.pending-keys",
            "kmsfs.pending-keys.unreadable",
            "kmsfs.pending-keys.unreadable.2",
            "kmsfs.pending-keys.unreadable.x",
            "kmsfs.pending-keys.unreadable.",
            "kmsfs.pending-keys.old",
        ] {
            std::fs::write(beside.join(name), b"").unwrap();
        }
        std::fs::create_dir(beside.join("kmsfs.pending-keys.unreadable.3")).unwrap();
        for name in ["aa.json.unreadable", "bb.json.unreadable", "aa.json"] {
            std::fs::write(host.join(name), b"").unwrap();
        }
        let found = set_aside_of([beside.join(PENDING_FILE), host.join("aa.json")].into_iter());
        let expected: Vec<PathBuf> = [
            beside.join("kmsfs.pending-keys.unreadable"),
            beside.join("kmsfs.pending-keys.unreadable.2"),
            beside.join("kmsfs.pending-keys.unreadable.3"),
            host.join("aa.json.unreadable"),
        ]
        .into();
        assert_eq!(found, expected);
        // A directory that is not there holds none.
        assert!(set_aside_of([dir.path().join("gone/kmsfs.pending-keys")].into_iter()).is_empty());
    }
}
