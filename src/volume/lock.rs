//! The volume lock: held by the mount daemon for as long as it runs, so a
//! volume is never served by two daemons, and `umount` can wait for the
//! daemon to finish committing.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};

use super::layout::LOCK_FILE;

pub struct VolumeLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("volume {path} is already mounted (daemon pid {pid})")]
    Held { path: String, pid: String },
    #[error("cannot open lock file in {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

fn open(backing: &Path) -> Result<File, LockError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(backing.join(LOCK_FILE))
        .map_err(|source| LockError::Io {
            path: backing.display().to_string(),
            source,
        })
}

impl VolumeLock {
    pub fn acquire(backing: &Path) -> Result<Self, LockError> {
        let mut file = open(backing)?;
        if flock(file.as_fd(), FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(LockError::Held {
                path: backing.display().to_string(),
                pid: pid.trim().to_string(),
            });
        }
        Ok(VolumeLock { _file: file })
    }

    /// Records the daemon's pid (after it has forked into the background).
    pub fn record_pid(&mut self) {
        let pid = std::process::id().to_string();
        let f = &mut self._file;
        let _ = f
            .set_len(0)
            .and_then(|_| f.seek(SeekFrom::Start(0)))
            .and_then(|_| f.write_all(pid.as_bytes()));
    }

    /// The pid of the daemon holding the lock, if any.
    pub fn holder(backing: &Path) -> Option<String> {
        let mut file = File::open(backing.join(LOCK_FILE)).ok()?;
        if flock(file.as_fd(), FlockOperation::NonBlockingLockShared).is_ok() {
            return None;
        }
        let mut pid = String::new();
        file.read_to_string(&mut pid).ok()?;
        Some(pid.trim().to_string())
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
