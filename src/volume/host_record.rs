//! The host's record of a mount daemon's state: a copy of what it publishes
//! in the lock file, kept where the backing directory cannot touch it. A
//! backing filesystem that fails (turned read-only, full) takes the daemon's
//! report of that failure with it, and whoever can write the backing
//! directory can forge or replace the lock file; the record can be neither.
//!
//! Records are named by the backing directory's device and inode, in
//! `/run/kmsfs` for root's daemons and, for other users', in
//! `$XDG_RUNTIME_DIR/kmsfs` (else `/run/user/UID/kmsfs`, else
//! `$XDG_STATE_HOME/kmsfs/daemons`, default `~/.local/state`): the first of
//! those that is, or can be made, a directory of its user's alone. A record counts only while the process that wrote
//! it runs (its pid, start time and boot match) as the user who owns the
//! record, and, when it is in a directory of another user than the
//! reader's and root's, only if that process is seen holding the volume
//! lock.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::layout::LOCK_FILE;
use super::lock::DaemonInfo;

const ROOT_DIR: &str = "/run/kmsfs";

/// Longer than anything a daemon publishes.
pub(super) const MAX_PUBLISHED: u64 = 64 << 10;

/// The record of the volume in `backing` in `dir`.
pub(super) fn path_in(backing: &Path, dir: &Path) -> Option<PathBuf> {
    let st = rustix::fs::stat(backing).ok()?;
    Some(dir.join(format!("daemon-{:x}-{:x}.json", st.st_dev, st.st_ino)))
}

/// A user's runtime directory under /run/user, if it is theirs alone.
fn run_user_dir(uid: u32) -> Option<PathBuf> {
    let dir = PathBuf::from(format!("/run/user/{uid}"));
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    (meta.is_dir() && meta.uid() == uid && meta.mode() & 0o077 == 0).then_some(dir)
}

/// The directories this process's records go to, the one it writes to
/// first. For a user: `/run/user/UID` (tmpfs, emptied at boot, where root
/// looks), the runtime directory, then the state directory (under the
/// home the account database gives if `$HOME` cannot hold it).
pub(super) fn own_dirs() -> Vec<PathBuf> {
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return vec![ROOT_DIR.into()];
    }
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute());
    let mut dirs: Vec<PathBuf> = [run_user_dir(uid.as_raw()), runtime]
        .into_iter()
        .flatten()
        .map(|d| d.join("kmsfs"))
        .chain(crate::util::state_dir().map(|d| d.join("kmsfs/daemons")))
        .chain(crate::util::home_of(uid.as_raw()).map(|h| h.join(".local/state/kmsfs/daemons")))
        .collect();
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// A directory of this user's alone (or root's), as one read from must be.
fn is_private(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir).is_ok_and(|m| {
        let me = rustix::process::geteuid().as_raw();
        m.is_dir() && (m.uid() == me || m.uid() == 0) && m.mode() & 0o077 == 0
    })
}

/// The directory this process publishes to: the first of its own that it
/// can make (or finds) its own alone.
pub(super) fn own_dir() -> Option<PathBuf> {
    own_dirs().into_iter().find(|dir| crate::util::private_dir(dir).is_ok())
}

/// Where this process looks for records: its own directories and root's
/// (trusted: only their owner and root write there), and as root the
/// runtime directory (`/run/user/UID/kmsfs`) and state directory of the
/// user who mounted the volume (`mount_owner`), whose records must show
/// their daemon holding the volume lock.
fn dirs(mount_owner: Option<u32>) -> Vec<(PathBuf, bool)> {
    // Another user's directory named by the environment is not trusted.
    let mut dirs: Vec<(PathBuf, bool)> = own_dirs()
        .into_iter()
        .filter(|d| is_private(d))
        .map(|d| (d, true))
        .collect();
    if !dirs.iter().any(|(d, _)| d == Path::new(ROOT_DIR)) {
        dirs.push((ROOT_DIR.into(), true));
    }
    if let Some(uid) = mount_owner.filter(|uid| *uid != 0)
        && rustix::process::geteuid().is_root()
    {
        dirs.push((PathBuf::from(format!("/run/user/{uid}/kmsfs")), false));
        if let Some(home) = crate::util::home_of(uid) {
            dirs.push((home.join(".local/state/kmsfs/daemons"), false));
        }
    }
    dirs
}

/// This boot's id: a pid and a start time name one process of one boot.
pub(super) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default()
}

/// The start time of process `pid` (clock ticks after boot, /proc/PID/stat
/// field 22), if it runs (a process that exited and was not yet reaped,
/// a zombie, does not): with the pid, it names one process, never a later
/// one given the same pid. Readable for every process, even one that is
/// not dumpable (not with `hidepid`: then no record counts).
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

/// The real user of process `pid`, if it is also its effective one.
fn process_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let ids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    (ids.len() >= 2 && ids[0] == ids[1]).then_some(ids[0])
}

/// How many of a process's descriptors `holds_lock` looks at.
const MAX_DESCRIPTORS: usize = 1024;

/// Whether process `pid` holds the exclusive `flock` of the file `lock`:
/// `/proc/PID/fdinfo` lists, with each descriptor, the locks taken through
/// it (another descriptor of the same file lists none), and the descriptor
/// is that file as `stat` sees it (the device in the lock line is not that
/// of a btrfs subvolume). None where this process may not look (another
/// user's process, or a non-dumpable one).
fn holds_lock(pid: u32, lock: &std::fs::Metadata) -> Option<bool> {
    let entries = match std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return None,
        Err(_) => return Some(false),
    };
    let locked = |text: &str| {
        text.lines()
            .any(|l| l.starts_with("lock:") && l.contains(" FLOCK ") && l.contains(" WRITE "))
    };
    // The lock is taken before the daemon opens anything else: among its
    // first descriptors (a daemon may hold one per cached inode).
    Some(entries.flatten().take(MAX_DESCRIPTORS).any(|entry| {
        std::fs::read_to_string(entry.path()).is_ok_and(|text| locked(&text))
            && std::fs::metadata(format!("/proc/{pid}/fd/{}", entry.file_name().to_string_lossy()))
                .is_ok_and(|m| m.dev() == lock.dev() && m.ino() == lock.ino())
    }))
}

/// The process `info` names (by pid and start time) still runs.
pub(super) fn still_runs(info: &DaemonInfo) -> bool {
    info.proc_start != 0 && process_start(info.pid) == Some(info.proc_start)
}

/// The process that wrote `info` still runs (on this boot).
pub(super) fn writer_runs(info: &DaemonInfo) -> bool {
    still_runs(info) && info.boot == boot_id()
}

/// A record believed, and whether it came from a trusted directory (this
/// user's own or root's).
pub(super) struct Seen {
    pub info: DaemonInfo,
    pub trusted: bool,
}

/// Whether a record is the word of a daemon that runs as the user who owns
/// the record. One in a directory not trusted must also be owned by
/// `mount_owner` (the user the kernel says mounted the volume; none: not
/// believed) and its daemon must hold the volume lock: the file `lock` if
/// given, else the lock file of the backing directory the record names.
fn believed(
    info: &DaemonInfo,
    owner: u32,
    trusted: bool,
    mount_owner: Option<u32>,
    lock: Option<&std::fs::Metadata>,
) -> bool {
    if !writer_runs(info) || process_uid(info.pid) != Some(owner) {
        return false;
    }
    if trusted {
        return true;
    }
    // Root's daemons write only to root's directory.
    if mount_owner != Some(owner) || owner == 0 {
        return false;
    }
    let named = match lock {
        Some(_) => None,
        None => match info
            .backing
            .as_ref()
            .map(|b| std::fs::symlink_metadata(b.join(LOCK_FILE)))
        {
            Some(Ok(meta)) => Some(meta),
            _ => return false,
        },
    };
    lock.or(named.as_ref())
        .is_some_and(|lock| holds_lock(info.pid, lock) == Some(true))
}

/// Whether process `pid` holds the lock file `lock` and runs as `owner`
/// (if given). None where this process may not look.
pub(super) fn lock_holder_is(pid: u32, lock: &std::fs::Metadata, owner: Option<u32>) -> Option<bool> {
    let owner = owner.unwrap_or(rustix::process::geteuid().as_raw());
    let uid = process_uid(pid);
    match holds_lock(pid, lock) {
        Some(holds) => Some(holds && uid == Some(owner)),
        // Not to be looked at (a non-dumpable daemon, as every kmsfs
        // process is): at least it must be a kmsfs process, running as the
        // owner or as root.
        None => {
            // As the binary or its mount helper (fstab) names it; comm keeps 15 bytes.
            let kmsfs = std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| {
                let c = c.trim();
                c == "kmsfs" || c == "mount.kmsfs" || c.starts_with("mount.fuse")
            });
            (!kmsfs || (uid != Some(owner) && uid != Some(0))).then_some(false)
        }
    }
}

/// The records of the daemon of `backing` that are believed (`believed`),
/// `lock` being the volume's lock file as it is now, if there is one, and
/// `mount_owner` the user who mounted the volume, if known.
pub(super) fn live(backing: &Path, lock: Option<&std::fs::Metadata>, mount_owner: Option<u32>) -> Vec<Seen> {
    dirs(mount_owner)
        .into_iter()
        .filter_map(|(dir, trusted)| Some((path_in(backing, &dir)?, trusted)))
        .filter_map(|(path, trusted)| Some((read(&path, trusted)?, trusted)))
        .filter(|((info, owner), trusted)| {
            (*trusted || lock.is_some()) && believed(info, *owner, *trusted, mount_owner, lock)
        })
        .map(|((info, _), trusted)| Seen { info, trusted })
        .collect()
}

/// More records than one directory holds for the volumes of one user.
const MAX_RECORDS: usize = 256;

/// The records believed (`believed`) of daemons serving at `mountpoint`;
/// root also looks in the directories of `mount_owner`. Each directory's
/// first MAX_RECORDS records among its first 2 × MAX_RECORDS entries only:
/// a user cannot make root read without end.
pub(super) fn serving_at(mountpoint: &Path, mount_owner: Option<u32>) -> Vec<Seen> {
    dirs(mount_owner)
        .into_iter()
        .filter_map(|(dir, trusted)| Some((std::fs::read_dir(dir).ok()?, trusted)))
        .flat_map(|(entries, trusted)| {
            entries
                .take(2 * MAX_RECORDS)
                .flatten()
                .filter(|entry| entry.file_name().to_string_lossy().starts_with("daemon-"))
                .take(MAX_RECORDS)
                .map(move |entry| (entry, trusted))
        })
        .filter_map(|(entry, trusted)| Some((read(&entry.path(), trusted)?, trusted)))
        .filter(|((info, _), _)| info.mountpoint.as_deref() == Some(mountpoint))
        .filter(|((info, owner), trusted)| believed(info, *owner, *trusted, mount_owner, None))
        .map(|((info, _), trusted)| Seen { info, trusted })
        .collect()
}

/// The last word of the process `was` (same pid, start time and boot) as
/// the daemon of `backing`: its record where `was` was read from, or in
/// whichever of the directories looked in (see `dirs`) it moved to since,
/// written by the user who wrote the record `was` came from.
pub(super) fn last_of(backing: &Path, was: &DaemonInfo, mount_owner: Option<u32>) -> Option<DaemonInfo> {
    let seen_at = was.record.as_deref()?;
    let writer = std::fs::symlink_metadata(seen_at).ok().map(|m| m.uid());
    let mut places: Vec<(PathBuf, bool)> = dirs(mount_owner)
        .into_iter()
        .filter_map(|(dir, trusted)| Some((path_in(backing, &dir)?, trusted)))
        .collect();
    if !places.iter().any(|(path, _)| path == seen_at) {
        places.push((seen_at.to_path_buf(), false));
    }
    let found = places
        .into_iter()
        .filter_map(|(path, trusted)| Some((read(&path, trusted)?, trusted)))
        .filter(|((_, owner), _)| writer.is_none_or(|w| w == *owner))
        .filter(|((info, _), _)| info.pid == was.pid && info.proc_start == was.proc_start && info.boot == was.boot)
        .map(|((info, _), trusted)| Seen { info, trusted });
    best(found.collect())
}

/// The one to believe of `seen`: a trusted record before any other (an
/// untrusted one never outranks it, whatever time it claims), then the
/// newest.
pub(super) fn best(seen: Vec<Seen>) -> Option<DaemonInfo> {
    seen.into_iter()
        .max_by_key(|s| (s.trusted, s.info.published_ms))
        .map(|s| s.info)
}

/// The record at `path` and its owner. One in a directory not trusted must
/// be in a directory of its owner's alone.
fn read(path: &Path, trusted: bool) -> Option<(DaemonInfo, u32)> {
    let (text, file) = read_small_file(path)?;
    if !trusted {
        let dir = std::fs::symlink_metadata(path.parent()?).ok()?;
        if !dir.is_dir() || dir.mode() & 0o077 != 0 || dir.uid() != file.uid() {
            return None;
        }
    }
    let info: DaemonInfo = serde_json::from_str(&text).ok()?;
    let info = DaemonInfo {
        record: Some(path.to_path_buf()),
        ..info
    };
    Some((info, file.uid()))
}

/// The text of the regular file at `path`, never through a symlink, never
/// waiting on a FIFO, never more than MAX_PUBLISHED bytes.
pub(super) fn read_small(path: &Path) -> Option<String> {
    read_small_file(path).map(|(text, _)| text)
}

/// `read_small`, and the metadata of the file read.
fn read_small_file(path: &Path) -> Option<(String, std::fs::Metadata)> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut text = String::new();
    file.take(MAX_PUBLISHED).read_to_string(&mut text).ok()?;
    Some((text, meta))
}

/// Writes `text` to `path` whole (a new file renamed over it), in a
/// directory only this user can enter.
pub(super) fn write(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("no directory"))?;
    crate::util::private_dir(dir)?;
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
            boot: boot_id(),
            ..DaemonInfo::default()
        };
        assert!(writer_runs(&info));
        assert!(!writer_runs(&DaemonInfo {
            proc_start: started + 1,
            ..info.clone()
        }));
        assert!(
            !writer_runs(&DaemonInfo {
                boot: "another boot".into(),
                ..info.clone()
            }),
            "the same pid and start time on another boot"
        );
        assert_eq!(process_uid(child.id()), Some(rustix::process::geteuid().as_raw()));
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
