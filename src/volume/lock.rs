//! The volume lock: held by the mount daemon for as long as it runs, so a
//! volume is never served by two daemons, and `umount` can wait for the
//! daemon to finish committing. The daemon publishes its state in the lock
//! file and in a record on the host (see `host_record`), which `status` and
//! `umount` read; the record counts over the lock file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, flock};

use super::host_record;
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
    /// When it was published (Unix milliseconds; set by `publish`): of
    /// this user's and root's host records, the later one is the daemon's word.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub published_ms: u64,
    /// Where the volume is and where it is mounted: in the host record only
    /// (the lock file travels with the backing directory), for `umount` of
    /// a mount whose source names no directory (`fsname=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<std::path::PathBuf>,
    /// The daemon's start time (`host_record::process_start`): with its
    /// pid, which process wrote this (a later one may get the same pid).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub proc_start: u64,
    /// The boot it ran in (`/proc/sys/kernel/random/boot_id`; in the host
    /// record only: the lock file travels with the backing directory).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot: String,
    /// The lock file it holds, as (device, inode) (in the host record only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_file: Option<(u64, u64)>,
    /// The volume-key version under which the daemon wraps new file keys:
    /// `kmsfs rotate` retires older versions only once the daemon serving
    /// the volume holds the new one (0: not said).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub volume_key_version: u32,
    /// The version a rotation made active that the daemon could not load,
    /// and why (`rotate` then stops waiting for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_key_error: Option<(u32, String)>,
    /// The host record this was read from, if it was (not published).
    #[serde(skip)]
    pub record: Option<PathBuf>,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

pub struct VolumeLock {
    _file: File,
    /// The lock file's (device, inode).
    lock_file: Option<(u64, u64)>,
    /// Where the daemon's state also goes (`host_record`).
    record: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// The lock file holds the last state published: the host record is
    /// not needed once the daemon is gone.
    lock_current: std::sync::atomic::AtomicBool,
    /// The last state published names a failure.
    failed: std::sync::atomic::AtomicBool,
    backing: std::path::PathBuf,
    /// Where the daemon serves the volume, once it does (`serving`).
    mountpoint: std::sync::OnceLock<std::path::PathBuf>,
}

impl Drop for VolumeLock {
    /// The host record goes once the lock file holds the daemon's last
    /// word, unless that word is a failure: the lock file can be forged, and
    /// `umount` reads a failure from the record (the next daemon of the
    /// volume replaces it).
    fn drop(&mut self) {
        if let Some(record) = crate::util::lock(&self.record).as_ref()
            && self.lock_current.load(std::sync::atomic::Ordering::Relaxed)
            && !self.failed.load(std::sync::atomic::Ordering::Relaxed)
        {
            let _ = std::fs::remove_file(record);
        }
    }
}

/// What the lock file says, if it is a daemon's JSON, and its metadata.
fn read_lock(backing: &Path) -> Option<(DaemonInfo, std::fs::Metadata)> {
    let meta = std::fs::symlink_metadata(backing.join(LOCK_FILE)).ok()?;
    Some((
        serde_json::from_str(&host_record::read_small(&backing.join(LOCK_FILE))?).ok()?,
        meta,
    ))
}

/// The record `info`, with the failures the lock file names for the same
/// process added: a record the daemon could not update (its directory on a
/// filesystem that failed too) must not hide a failure the lock file got.
/// Only from the lock file the daemon holds (the record names it): one put
/// in its place could otherwise keep a healthy volume mounted.
fn with_failures_of(info: DaemonInfo, lock: Option<(&DaemonInfo, &std::fs::Metadata)>) -> DaemonInfo {
    use std::os::unix::fs::MetadataExt;
    match lock {
        Some((lock, meta))
            if lock.pid == info.pid
                && lock.proc_start == info.proc_start
                && info.lock_file == Some((meta.dev(), meta.ino())) =>
        {
            DaemonInfo {
                commit_error: info.commit_error.or_else(|| lock.commit_error.clone()),
                problem: info.problem.or_else(|| lock.problem.clone()),
                ..info
            }
        }
        _ => info,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("volume {path} is already mounted (daemon pid {pid}){stopped}")]
    Held { path: String, pid: String, stopped: String },
    #[error(
        "cannot open the lock file {path}/kmsfs.lock ({source}); if it is a symlink, not a regular file or has other names, remove it"
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
            let meta = f.metadata()?;
            if !meta.is_file() {
                Err(std::io::Error::other("not a regular file"))
            } else if std::os::unix::fs::MetadataExt::nlink(&meta) > 1 {
                // The daemon writes its state into it: through another name,
                // into a file outside the volume.
                Err(std::io::Error::other("it has other names (hard links)"))
            } else {
                Ok(f)
            }
        })
        .map_err(|source| LockError::Io {
            path: backing.display().to_string(),
            source,
        })
}

impl VolumeLock {
    /// Whether some process holds the volume's lock now (a daemon, an
    /// offline `fsck --repair`, `rotate` or `rekey`), from the kernel's list
    /// of locks: trying it would take it for a moment, in the way of a
    /// mount starting then.
    pub fn is_held(backing: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::symlink_metadata(backing.join(LOCK_FILE)) else {
            return false;
        };
        let device = format!(
            "{:02x}:{:02x}:{}",
            libc::major(meta.dev()),
            libc::minor(meta.dev()),
            meta.ino()
        );
        std::fs::read_to_string("/proc/locks").is_ok_and(|locks| {
            locks.lines().any(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&device.as_str())
            })
        })
    }

    pub fn acquire(backing: &Path) -> Result<Self, LockError> {
        let mut file = open(backing)?;
        let lock_file = file.metadata().ok().map(|m| {
            (
                std::os::unix::fs::MetadataExt::dev(&m),
                std::os::unix::fs::MetadataExt::ino(&m),
            )
        });
        // A daemon that is finishing (unmounted, committing) lets go soon:
        // waited for rather than called "already mounted". So is one for a
        // moment (it may not have seen its unmount yet).
        let start = Instant::now();
        loop {
            let locked = flock(file.as_fd(), FlockOperation::NonBlockingLockExclusive).is_ok();
            // The lock file can be renamed away under a live daemon (by
            // anyone who can write the backing directory), and a new one
            // locked: the host records of this user's and root's daemons
            // still know it.
            // A daemon whose lock file is the one just locked holds it no
            // more (its record may outlive the lock for a moment).
            let recorded = match locked {
                true => host_record::best(host_record::live(backing, None, None))
                    .filter(|d| d.pid != std::process::id() && (lock_file.is_none() || d.lock_file != lock_file)),
                false => None,
            };
            if locked && recorded.is_none() {
                break;
            }
            let finishing = recorded
                .as_ref()
                .map(|d| d.finishing)
                .or_else(|| Self::daemon(backing, None).map(|d| d.finishing))
                .unwrap_or(false);
            let elapsed = start.elapsed();
            if elapsed < Duration::from_secs(2) || elapsed < Duration::from_secs(30) && finishing {
                if locked {
                    let _ = flock(file.as_fd(), FlockOperation::Unlock);
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let pid = match recorded {
                Some(daemon) => Some(daemon.pid),
                None => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    serde_json::from_str::<DaemonInfo>(&text).map(|info| info.pid).ok()
                }
            };
            // Its word, from a file anyone who can write the backing
            // directory can forge: a hint only.
            let stopped = match pid {
                Some(pid) if crate::util::process_stopped(pid) => format!(
                    "; {}, and holds the volume until it runs again",
                    crate::util::stopped_daemon(pid)
                ),
                _ => String::new(),
            };
            return Err(LockError::Held {
                path: backing.display().to_string(),
                pid: pid.map_or_else(|| "unknown".into(), |pid| pid.to_string()),
                stopped,
            });
        }
        let record = host_record::own_dir().and_then(|dir| host_record::path_in(backing, &dir));
        if record.is_none() {
            log::warn!(
                "no directory for the daemon's host record (no /run/user/UID, XDG_RUNTIME_DIR or home of this \
                 user's alone): `status` and `umount` read only kmsfs.lock, which the backing directory can forge"
            );
        }
        Ok(VolumeLock {
            lock_file,
            _file: file,
            record: std::sync::Mutex::new(record),
            lock_current: std::sync::atomic::AtomicBool::new(false),
            failed: std::sync::atomic::AtomicBool::new(false),
            backing: backing.to_path_buf(),
            mountpoint: std::sync::OnceLock::new(),
        })
    }

    /// Publishes what the daemon holding the lock has to say (its pid once
    /// it has forked into the background, its counts, its failures).
    pub fn publish(&self, info: &DaemonInfo) {
        let info = DaemonInfo {
            published_ms: crate::util::unix_now_ms(),
            proc_start: host_record::process_start(std::process::id()).unwrap_or(0),
            ..info.clone()
        };
        let text = serde_json::to_string(&info).unwrap_or_default();
        let mut f = &self._file;
        let in_lock = f
            .set_len(0)
            .and_then(|_| f.seek(SeekFrom::Start(0)))
            .and_then(|_| f.write_all(text.as_bytes()));
        let placed = DaemonInfo {
            backing: Some(self.backing.clone()),
            mountpoint: self.mountpoint.get().cloned(),
            boot: host_record::boot_id(),
            lock_file: self.lock_file,
            ..info
        };
        let in_record = self.write_record(&serde_json::to_string(&placed).unwrap_or_default());
        self.lock_current
            .store(in_lock.is_ok(), std::sync::atomic::Ordering::Relaxed);
        self.failed.store(
            placed.commit_error.is_some() || placed.problem.is_some(),
            std::sync::atomic::Ordering::Relaxed,
        );
        if let (Err(lock), Err(record)) = (in_lock, in_record) {
            log::error!(
                "cannot publish the daemon's state for `status` and `umount`: lock file: {lock}; host record: {record}"
            );
        }
    }

    /// Writes the host record; where its directory fails (removed at
    /// logout, its filesystem failing), in the next of this user's that
    /// works, from then on.
    fn write_record(&self, text: &str) -> std::io::Result<()> {
        let mut record = crate::util::lock(&self.record);
        let first = match record.as_ref() {
            Some(path) => host_record::write(path, text),
            None => Err(std::io::Error::other("no directory of this user's alone for it")),
        };
        let Err(first) = first else {
            return Ok(());
        };
        for dir in host_record::own_dirs() {
            let Some(path) = host_record::path_in(&self.backing, &dir) else {
                continue;
            };
            if record.as_ref() != Some(&path) && host_record::write(&path, text).is_ok() {
                log::warn!("the daemon's host record moved to {} ({first})", path.display());
                // Where it still can be, the old record goes: its word is no longer the last.
                if let Some(old) = record.replace(path) {
                    let _ = std::fs::remove_file(old);
                }
                return Ok(());
            }
        }
        Err(first)
    }

    /// Records where the daemon serves the volume (published from then on).
    pub fn serving(&self, mountpoint: &Path) {
        let _ = self.mountpoint.set(mountpoint.to_path_buf());
    }

    /// The daemon serving a volume at `mountpoint`, from its host record
    /// (believed, see `host_record`): it names the backing directory, which
    /// the mount's source may not (`fsname=`, or moved since).
    /// `owner` is the user who mounted it (mountinfo's `user_id=`).
    pub fn serving_at(mountpoint: &Path, owner: Option<u32>) -> Option<DaemonInfo> {
        host_record::best(host_record::serving_at(mountpoint, owner))
    }

    /// What the daemon `was` (as `daemon` saw it) published last: after
    /// `umount`, its last word. From its host record (where it was read
    /// from, or where it moved since, see `host_record::last_of`), else the
    /// lock file, if that holds that process's word.
    pub fn last_published(backing: &Path, was: &DaemonInfo, mount_owner: Option<u32>) -> Option<DaemonInfo> {
        let lock = read_lock(backing);
        host_record::last_of(backing, was, mount_owner)
            .map(|info| with_failures_of(info, lock.as_ref().map(|(lock, meta)| (lock, meta))))
            // The lock file's word, if it is that process's.
            .or(lock
                .map(|(lock, _)| lock)
                .filter(|lock| lock.pid == was.pid && lock.proc_start == was.proc_start))
    }

    /// What the daemon of the volume last recorded, if one runs: its host
    /// record (see `host_record`), else, if a daemon holds the lock file,
    /// what it says (root checks that the process holding it is the daemon
    /// of `mount_owner`, the user who mounted the volume, if known). A
    /// daemon with a record in this user's or root's directory is found
    /// even if the lock file was replaced or removed.
    pub fn daemon(backing: &Path, mount_owner: Option<u32>) -> Option<DaemonInfo> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(backing.join(LOCK_FILE))
            .ok()
            .and_then(|f| Some((f.metadata().ok()?, f)))
            .filter(|(meta, _)| meta.is_file());
        let lock_said = file.as_ref().and_then(|(_, f)| {
            let mut text = String::new();
            f.take(host_record::MAX_PUBLISHED).read_to_string(&mut text).ok()?;
            Some(text)
        });
        let recorded = host_record::best(host_record::live(
            backing,
            file.as_ref().map(|(meta, _)| meta),
            mount_owner,
        ));
        if let Some(info) = recorded {
            let lock = lock_said.as_deref().and_then(|t| serde_json::from_str(t).ok());
            let current = file.as_ref().map(|(meta, _)| meta);
            return Some(with_failures_of(info, lock.as_ref().zip(current)));
        }
        let (meta, file) = file?;
        if flock(file.as_fd(), FlockOperation::NonBlockingLockShared).is_ok() {
            return None;
        }
        let text = lock_said.unwrap_or_default();
        let info = serde_json::from_str(&text).unwrap_or(DaemonInfo {
            pid: text.trim().parse().unwrap_or(0),
            ..DaemonInfo::default()
        });
        // The lock file's word, if this process can check the one who
        // holds it is the daemon (root can): a file replaced and held by
        // someone else would otherwise speak for the daemon.
        match host_record::lock_holder_is(info.pid, &meta, mount_owner) {
            Some(false) => None,
            _ => Some(info),
        }
    }

    /// Waits until the daemon `was` has exited and no daemon (of
    /// `mount_owner`, if known) holds the lock.
    pub fn wait_exited(backing: &Path, was: &DaemonInfo, mount_owner: Option<u32>, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if !host_record::still_runs(was) && Self::daemon(backing, mount_owner).is_none() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held while a process holds it, seen without taking it.
    #[test]
    fn a_held_volume_lock_is_seen_from_the_kernels_list() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!VolumeLock::is_held(dir.path()), "no lock file");
        let lock = VolumeLock::acquire(dir.path()).unwrap();
        assert!(VolumeLock::is_held(dir.path()));
        drop(lock);
        assert!(!VolumeLock::is_held(dir.path()));
    }
}
