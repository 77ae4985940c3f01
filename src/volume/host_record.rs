//! The host's record of a mount daemon's state: a copy of what it publishes
//! in the lock file, kept where the backing directory cannot touch it. A
//! backing filesystem that fails (turned read-only, full) takes the daemon's
//! report of that failure with it, and whoever can write the backing
//! directory can forge the lock file; the record can be neither.
//!
//! Records are named by the backing directory's device and inode, in
//! `/run/kmsfs` for root's daemons and, for other users', in
//! `$XDG_RUNTIME_DIR/kmsfs` (else `$XDG_STATE_HOME/kmsfs/daemons`, default
//! `~/.local/state`), a directory of its user's alone. A record counts only
//! while the process that wrote it runs (its pid and start time match) and,
//! when it is in a directory of another user than the reader's and root's,
//! only if that process is seen holding the volume lock.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::lock::DaemonInfo;

const ROOT_DIR: &str = "/run/kmsfs";

/// Longer than anything a daemon publishes.
pub(super) const MAX_PUBLISHED: u64 = 64 << 10;

/// The record of the volume in `backing` in `dir`.
pub(super) fn path_in(backing: &Path, dir: &Path) -> Option<PathBuf> {
    let st = rustix::fs::stat(backing).ok()?;
    Some(dir.join(format!("daemon-{:x}-{:x}.json", st.st_dev, st.st_ino)))
}

/// The directory this process publishes to.
pub(super) fn own_dir() -> Option<PathBuf> {
    if rustix::process::geteuid().is_root() {
        return Some(ROOT_DIR.into());
    }
    let absolute = |name: &str| std::env::var_os(name).map(PathBuf::from).filter(|d| d.is_absolute());
    absolute("XDG_RUNTIME_DIR")
        .map(|d| d.join("kmsfs"))
        .or_else(|| absolute("XDG_STATE_HOME").map(|d| d.join("kmsfs/daemons")))
        .or_else(|| absolute("HOME").map(|d| d.join(".local/state/kmsfs/daemons")))
}

/// Where this process looks for records: its own directory and root's, and
/// as root every user's runtime directory (`/run/user/UID/kmsfs`), whose
/// records must prove their daemon holds the lock.
fn dirs() -> Vec<(PathBuf, bool)> {
    let mut dirs: Vec<(PathBuf, bool)> = own_dir().into_iter().map(|d| (d, true)).collect();
    if !dirs.iter().any(|(d, _)| d == Path::new(ROOT_DIR)) {
        dirs.push((ROOT_DIR.into(), true));
    }
    if rustix::process::geteuid().is_root()
        && let Ok(users) = std::fs::read_dir("/run/user")
    {
        dirs.extend(users.flatten().map(|u| (u.path().join("kmsfs"), false)));
    }
    dirs
}

/// The start time of process `pid` (clock ticks after boot, /proc/PID/stat
/// field 22), if it runs (a process that exited and was not yet reaped,
/// a zombie, does not): with the pid, it names one process, never a later
/// one given the same pid. Readable for every process, even one that is
/// not dumpable.
pub(super) fn process_start(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: the
    // fields after it start past the last ')'.
    let mut fields = text[text.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Whether process `pid` holds the exclusive `flock` of the file `lock`:
/// `/proc/PID/fdinfo` lists, with each descriptor, the locks taken through
/// it (another descriptor of the same file lists none). None where this
/// process may not look (another user's, or a non-dumpable process).
fn holds_lock(pid: u32, lock: &std::fs::Metadata) -> Option<bool> {
    let entries = match std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return None,
        Err(_) => return Some(false),
    };
    let dev = lock.dev();
    let id = format!(
        "{:02x}:{:02x}:{} ",
        rustix::fs::major(dev),
        rustix::fs::minor(dev),
        lock.ino()
    );
    Some(entries.flatten().any(|entry| {
        std::fs::read_to_string(entry.path()).is_ok_and(|text| {
            text.lines()
                .any(|l| l.starts_with("lock:") && l.contains(" FLOCK ") && l.contains(" WRITE ") && l.contains(&id))
        })
    }))
}

/// The process that wrote `info` still runs.
pub(super) fn writer_runs(info: &DaemonInfo) -> bool {
    info.proc_start != 0 && process_start(info.pid) == Some(info.proc_start)
}

/// The records of the daemon of `backing` whose writer still runs; the
/// lock file is `lock` (the records of a directory this process does not
/// trust must show their writer holding it).
pub(super) fn live(backing: &Path, lock: Option<&std::fs::Metadata>) -> Vec<DaemonInfo> {
    dirs()
        .into_iter()
        .filter_map(|(dir, trusted)| Some((path_in(backing, &dir)?, trusted)))
        .filter_map(|(path, trusted)| Some((read(&path, trusted)?, trusted)))
        .filter(|(info, _)| writer_runs(info))
        .filter(|(info, trusted)| *trusted || lock.is_some_and(|lock| holds_lock(info.pid, lock) == Some(true)))
        .map(|(info, _)| info)
        .collect()
}

/// Every record of a daemon of this process's directories that still runs.
pub(super) fn all_live() -> Vec<DaemonInfo> {
    dirs()
        .into_iter()
        .filter(|(_, trusted)| *trusted)
        .filter_map(|(dir, _)| std::fs::read_dir(dir).ok())
        .flatten()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("daemon-"))
        .filter_map(|entry| read(&entry.path(), true))
        .filter(writer_runs)
        .collect()
}

/// The record at `path`. One in a directory not trusted must be in a
/// directory of its owner's alone, owned by them.
fn read(path: &Path, trusted: bool) -> Option<DaemonInfo> {
    if !trusted {
        let dir = std::fs::symlink_metadata(path.parent()?).ok()?;
        let file = std::fs::symlink_metadata(path).ok()?;
        if !dir.is_dir() || dir.mode() & 0o077 != 0 || dir.uid() != file.uid() {
            return None;
        }
    }
    let info: DaemonInfo = serde_json::from_str(&read_small(path)?).ok()?;
    Some(DaemonInfo {
        record: Some(path.to_path_buf()),
        ..info
    })
}

/// The text of the regular file at `path`, never through a symlink, never
/// waiting on a FIFO, never more than MAX_PUBLISHED bytes.
pub(super) fn read_small(path: &Path) -> Option<String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(MAX_PUBLISHED).read_to_string(&mut text).ok()?;
    Some(text)
}

/// Writes `text` to `path` whole (a new file renamed over it), in a
/// directory only this user can enter.
pub(super) fn write(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("no directory"))?;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != rustix::process::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "{} is not a directory of this user's alone",
            dir.display()
        )));
    }
    let tmp = dir.join(format!(
        ".{}.{}",
        std::process::id(),
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_named_by_its_pid_and_start_time() {
        let me = process_start(std::process::id()).expect("own start time");
        assert!(me > 0);
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let started = process_start(child.id()).unwrap();
        assert!(started >= me);
        let info = DaemonInfo {
            pid: child.id(),
            proc_start: started,
            ..DaemonInfo::default()
        };
        assert!(writer_runs(&info));
        assert!(!writer_runs(&DaemonInfo {
            proc_start: started + 1,
            ..info.clone()
        }));
        child.kill().unwrap();
        // Not reaped yet: a zombie, which runs no more.
        let zombie = || {
            std::fs::read_to_string(format!("/proc/{}/stat", info.pid)).is_ok_and(|t| {
                t.rsplit(')')
                    .next()
                    .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            })
        };
        while !zombie() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!writer_runs(&info), "a zombie");
        child.wait().unwrap();
        assert!(!writer_runs(&info), "gone once it exited");
    }

    #[test]
    fn the_holder_of_a_flock_is_seen_in_fdinfo() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsfs.lock");
        let held = std::fs::File::create(&path).unwrap();
        let meta = held.metadata().unwrap();
        let me = std::process::id();
        assert_eq!(holds_lock(me, &meta), Some(false), "open, not locked");
        rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
        assert_eq!(holds_lock(me, &meta), Some(true));
        let other = std::fs::File::create(dir.path().join("other")).unwrap();
        assert_eq!(holds_lock(me, &other.metadata().unwrap()), Some(false), "another file");
    }
}
