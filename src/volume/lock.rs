//! The volume lock: held by the mount daemon for as long as it runs, so a
//! volume is never served by two daemons, and `umount` can wait for the
//! daemon to finish committing.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};

use super::layout::LOCK_FILE;

/// What the mount daemon publishes in the lock file, while it runs and (its
/// last word) after it exits.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    /// Key-provider calls since the daemon started (one per volume-key version at mount).
    pub provider_calls: u64,
    /// Why committing file keys fails, while it does (or why it failed at exit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_error: Option<String>,
    /// Something wrong the daemon cannot fix (sticky): names it said it
    /// removed but could not, a damaged DB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// Unmounted, committing its last keys and about to exit: the volume is
    /// free in a moment (whatever unmounted it: `umount`, idle, a signal).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub finishing: bool,
}

pub struct VolumeLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("volume {path} is already mounted (daemon pid {pid})")]
    Held { path: String, pid: String },
    #[error(
        "cannot open the lock file {path}/kmsfs.lock ({source}); if it is a symlink or not a regular file, remove it"
    )]
    Io { path: String, source: std::io::Error },
}

/// Opens the lock file, never through a symlink: the backing directory is
/// not trusted to pick a file for kmsfs to write.
fn open(backing: &Path) -> Result<File, LockError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(backing.join(LOCK_FILE))
        .and_then(|f| {
            if f.metadata()?.is_file() {
                Ok(f)
            } else {
                Err(std::io::Error::other("not a regular file"))
            }
        })
        .map_err(|source| LockError::Io {
            path: backing.display().to_string(),
            source,
        })
}

impl VolumeLock {
    pub fn acquire(backing: &Path) -> Result<Self, LockError> {
        let mut file = open(backing)?;
        // A daemon that is finishing (unmounted, committing) lets go soon:
        // waited for rather than called "already mounted". So is one for a
        // moment (it may not have seen its unmount yet).
        let start = Instant::now();
        while flock(file.as_fd(), FlockOperation::NonBlockingLockExclusive).is_err()
            && (start.elapsed() < Duration::from_secs(2)
                || start.elapsed() < Duration::from_secs(30) && Self::daemon(backing).is_some_and(|d| d.finishing))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        if flock(file.as_fd(), FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let pid = serde_json::from_str::<DaemonInfo>(&text)
                .map(|info| info.pid.to_string())
                .unwrap_or_else(|_| "unknown".into());
            return Err(LockError::Held {
                path: backing.display().to_string(),
                pid,
            });
        }
        Ok(VolumeLock { _file: file })
    }

    /// Publishes what the daemon holding the lock has to say (its pid once
    /// it has forked into the background, its counts, its failures).
    pub fn publish(&self, info: &DaemonInfo) {
        let text = serde_json::to_string(info).unwrap_or_default();
        let mut f = &self._file;
        let _ = f
            .set_len(0)
            .and_then(|_| f.seek(SeekFrom::Start(0)))
            .and_then(|_| f.write_all(text.as_bytes()));
    }

    /// What the last daemon published, held or not: after `umount`, its
    /// last word.
    pub fn last_published(backing: &Path) -> Option<DaemonInfo> {
        let mut text = String::new();
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(backing.join(LOCK_FILE))
            .ok()?
            .read_to_string(&mut text)
            .ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The pid of the daemon holding the lock, if any.
    pub fn holder(backing: &Path) -> Option<String> {
        Self::daemon(backing).map(|d| d.pid.to_string())
    }

    /// What the daemon holding the lock last recorded, if a daemon holds it.
    pub fn daemon(backing: &Path) -> Option<DaemonInfo> {
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(backing.join(LOCK_FILE))
            .ok()?;
        if flock(file.as_fd(), FlockOperation::NonBlockingLockShared).is_ok() {
            return None;
        }
        let mut text = String::new();
        file.read_to_string(&mut text).ok()?;
        Some(serde_json::from_str(&text).unwrap_or(DaemonInfo {
            pid: text.trim().parse().unwrap_or(0),
            ..DaemonInfo::default()
        }))
    }

    /// Waits until no daemon holds the lock.
    pub fn wait_released(backing: &Path, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if Self::holder(backing).is_none() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}
