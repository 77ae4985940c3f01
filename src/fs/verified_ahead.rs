//! Empty files authenticated ahead. The read-ahead worker (check_ahead.rs)
//! asks for a directory's empty files in bursts; once a burst is read it
//! also authenticates each file's final block there, off the request path
//! (one DB key lookup and two AES-GCM-SIV opens per file), and remembers the
//! file id by backing inode, with the inode's change and modification times
//! as `fstat` showed them before the file was read. A lookup whose own
//! `fstat` shows the same inode with the same times and length takes that
//! result instead of reading and authenticating the file itself: a backing
//! file written, cut or replaced since the worker looked at it has another
//! change time (or inode), and is checked on the request path as before.
//! Only where the change time is the kernel's own: on a local filesystem
//! (a network or FUSE backing reports what its server says, and sshfs's
//! change time is the settable modification time), on the backing
//! directory's own device, and for inodes last changed at least a second
//! before the worker looked (a change within the same timestamp tick, or
//! the same second on a filesystem that keeps only seconds, would keep the
//! time: git's "racily clean" rule).

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::Stat;

use super::KmsFs;
use super::check_ahead::OpenedEmpty;
use super::inodes::Node;
use crate::crypto::FileId;
use crate::volume::content::{self, EMPTY_FILE_LEN};
use crate::volume::namespace::{self, FileIdRead};

/// Results held over all directories (about 80 bytes each); a result that
/// would make more makes all of them forgotten.
const MAX_HELD: usize = 65_536;

/// Local filesystems whose inodes' change times only their kernel sets
/// (`statfs` magic numbers): ext2/3/4, XFS, Btrfs, F2FS, tmpfs.
const KERNEL_TIMES: [i64; 5] = [0xEF53, 0x5846_5342, 0x9123_683E, 0xF2F5_2010, 0x0102_1994];

/// How long before the worker looked an inode must have last changed.
const SETTLED: std::time::Duration = std::time::Duration::from_secs(1);

/// What `fstat` showed of a backing inode before it was read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Seen {
    ctime: (i64, i64),
    mtime: (i64, i64),
    size: i64,
}

impl Seen {
    fn of(st: &Stat) -> Self {
        Seen {
            ctime: (st.st_ctime as i64, st.st_ctime_nsec as i64),
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
            size: st.st_size as i64,
        }
    }
}

type InodeKey = (u64, u64);

fn key(st: &Stat) -> InodeKey {
    (st.st_dev as u64, st.st_ino as u64)
}

#[derive(Default)]
struct Held {
    /// By directory (its FUSE inode), then by backing device and inode.
    by_dir: HashMap<u64, HashMap<InodeKey, (Seen, FileId)>>,
    count: usize,
}

#[derive(Default)]
pub struct VerifiedAhead {
    /// The backing directory's device, if its filesystem is one of
    /// `KERNEL_TIMES`; otherwise nothing is authenticated ahead.
    device: Option<u64>,
    held: Mutex<Held>,
    authenticated: AtomicU64,
    taken: AtomicU64,
}

impl VerifiedAhead {
    pub fn new(backing_root: BorrowedFd<'_>) -> Self {
        let kernel_times = rustix::fs::fstatfs(backing_root).is_ok_and(|fs| KERNEL_TIMES.contains(&(fs.f_type as i64)));
        VerifiedAhead {
            device: rustix::fs::fstat(backing_root)
                .ok()
                .filter(|_| kernel_times)
                .map(|st| st.st_dev as u64),
            ..VerifiedAhead::default()
        }
    }

    /// Whether results can be trusted on this backing filesystem.
    pub fn enabled(&self) -> bool {
        self.device.is_some()
    }

    /// The worker found the empty file of directory `dir` that `st`
    /// describes intact, with id `id`; `stat_after` is the time just
    /// before `st` was taken (and so before the file was read).
    pub fn insert(&self, dir: u64, st: &Stat, stat_after: SystemTime, id: FileId) {
        let changed = UNIX_EPOCH + Duration::new(st.st_ctime as u64, st.st_ctime_nsec as u32);
        let settled = changed + SETTLED <= stat_after;
        if self.device != Some(st.st_dev as u64) || !settled || st.st_ctime < 0 {
            return;
        }
        let mut held = crate::util::lock(&self.held);
        if held.count >= MAX_HELD {
            *held = Held::default();
        }
        if held
            .by_dir
            .entry(dir)
            .or_default()
            .insert(key(st), (Seen::of(st), id))
            .is_none()
        {
            held.count += 1;
        }
        self.authenticated.fetch_add(1, Ordering::Relaxed);
    }

    /// The id of the empty file of `dir` that a lookup's `st` describes, if
    /// the worker authenticated it and the inode is as the worker saw it.
    pub fn take(&self, dir: u64, st: &Stat) -> Option<FileId> {
        if st.st_size as u64 != EMPTY_FILE_LEN {
            return None;
        }
        let mut held = crate::util::lock(&self.held);
        let files = held.by_dir.get_mut(&dir)?;
        let (seen, id) = files.remove(&key(st))?;
        if files.is_empty() {
            held.by_dir.remove(&dir);
        }
        held.count -= 1;
        if seen != Seen::of(st) {
            return None;
        }
        self.taken.fetch_add(1, Ordering::Relaxed);
        Some(id)
    }

    /// The kernel forgot directory `dir`.
    pub fn forget(&self, dir: u64) {
        let mut held = crate::util::lock(&self.held);
        if let Some(files) = held.by_dir.remove(&dir) {
            held.count -= files.len();
        }
    }

    /// One line at unmount, for tuning `prefetch`.
    pub fn log_summary(&self) {
        let authenticated = self.authenticated.load(Ordering::Relaxed);
        if authenticated > 0 {
            log::info!(
                "empty files authenticated ahead: {authenticated}, of which {} were looked up",
                self.taken.load(Ordering::Relaxed)
            );
        }
    }
}

impl KmsFs {
    /// On the read-ahead worker: authenticates the final blocks of empty
    /// files of directory `dir`. What fails is left to the lookup, which
    /// checks it again and says why.
    pub(super) fn authenticate_ahead(&self, dir: u64, asked: &[OpenedEmpty]) {
        if !self.verified_ahead.enabled() {
            return;
        }
        let (read, ids): (Vec<&OpenedEmpty>, Vec<FileId>) = asked
            .iter()
            .filter_map(|opened| match namespace::read_file_id(&opened.file) {
                Ok(FileIdRead::Id(id)) => Some((opened, id)),
                _ => None,
            })
            .unzip();
        let ciphers = match self.volume.file_ciphers(&ids) {
            Ok(ciphers) => ciphers,
            Err(e) => {
                // Each lookup reads the key again, and says what fails.
                log::debug!("authenticating empty files ahead: {e}");
                return;
            }
        };
        // Results for a directory forgotten meanwhile would only be held.
        if !self.checks_ahead.follows(dir) {
            return;
        }
        for ((opened, id), cipher) in read.into_iter().zip(ids).zip(ciphers) {
            if cipher.is_ok_and(|cipher| content::check_empty_final(&opened.file, &cipher).is_ok()) {
                self.verified_ahead.insert(dir, &opened.stat, opened.stat_after, id);
            }
        }
    }

    /// An empty file of `parent` was just looked up: it counts as checked
    /// if the worker authenticated it as it still is, and no other inode
    /// of this mount has its id. Whether it did.
    pub(super) fn take_authenticated_ahead(&self, parent: &Node, node: &Node) -> bool {
        let state = node.state();
        // Under the content lock, as in `damaged_size`: this mount's
        // writers change a file's length in steps under it.
        let _guard = crate::util::read(&state.content);
        let Some(st) = node.fd().ok().and_then(|fd| rustix::fs::fstat(fd.as_fd()).ok()) else {
            return false;
        };
        let Some(id) = self.verified_ahead.take(parent.ino, &st) else {
            return false;
        };
        let known_as_other = crate::util::lock(&state.cipher)
            .as_ref()
            .is_some_and(|cipher| *cipher.file_id() != id)
            || state.taken_id.get().is_some_and(|taken| *taken != id);
        let taken = !known_as_other && self.inodes.ids.claim(id, node.ino).is_ok();
        if taken {
            let _ = state.taken_id.set(id);
            node.mark_verified_empty();
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(ino: u64, ctime: i64) -> Stat {
        // SAFETY: `stat` is plain old data; all zeros is a valid value.
        let mut st: Stat = unsafe { std::mem::zeroed() };
        st.st_dev = 7;
        st.st_ino = ino as _;
        st.st_size = EMPTY_FILE_LEN as _;
        st.st_ctime = ctime as _;
        st.st_mtime = 5;
        st
    }

    fn on_device_7() -> VerifiedAhead {
        VerifiedAhead {
            device: Some(7),
            ..VerifiedAhead::default()
        }
    }

    /// Long after the inodes of `stat` last changed.
    fn later() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000)
    }

    #[test]
    fn only_inodes_settled_on_the_backing_device_are_kept() {
        let ahead = on_device_7();
        ahead.insert(1, &stat(10, 100), UNIX_EPOCH + Duration::from_millis(100_999), [1; 16]);
        assert_eq!(ahead.take(1, &stat(10, 100)), None, "changed less than a second before");
        ahead.insert(1, &stat(10, 100), UNIX_EPOCH + Duration::from_secs(101), [1; 16]);
        assert_eq!(ahead.take(1, &stat(10, 100)), Some([1; 16]));
        let mut elsewhere = stat(11, 100);
        elsewhere.st_dev = 8;
        ahead.insert(1, &elsewhere, later(), [2; 16]);
        assert_eq!(ahead.take(1, &elsewhere), None, "another device");
        let off = VerifiedAhead::default();
        assert!(!off.enabled());
        off.insert(1, &stat(10, 100), later(), [1; 16]);
        assert_eq!(
            off.take(1, &stat(10, 100)),
            None,
            "a filesystem whose times are not the kernel's"
        );
    }

    #[test]
    fn a_result_is_taken_once_and_only_for_the_inode_as_it_was() {
        let ahead = on_device_7();
        ahead.insert(1, &stat(10, 100), later(), [1; 16]);
        ahead.insert(1, &stat(11, 100), later(), [2; 16]);
        ahead.insert(1, &stat(12, 100), later(), [3; 16]);
        assert_eq!(ahead.take(1, &stat(10, 100)), Some([1; 16]));
        assert_eq!(ahead.take(1, &stat(10, 100)), None, "taken once");
        assert_eq!(ahead.take(2, &stat(11, 100)), None, "another directory");
        assert_eq!(ahead.take(1, &stat(11, 101)), None, "changed since");
        assert_eq!(
            ahead.take(1, &stat(11, 100)),
            None,
            "a changed inode's result is dropped"
        );
        let mut grown = stat(12, 100);
        grown.st_size += 1;
        assert_eq!(ahead.take(1, &grown), None, "no longer empty");
        let mut touched = stat(12, 100);
        touched.st_mtime_nsec = 1;
        assert_eq!(ahead.take(1, &touched), None, "modified since");
        assert_eq!(crate::util::lock(&ahead.held).count, 0);
        assert_eq!(ahead.taken.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn results_are_forgotten_with_their_directory_and_bounded() {
        let ahead = on_device_7();
        ahead.insert(1, &stat(10, 100), later(), [1; 16]);
        ahead.insert(2, &stat(20, 100), later(), [2; 16]);
        ahead.forget(1);
        assert_eq!(ahead.take(1, &stat(10, 100)), None);
        assert_eq!(crate::util::lock(&ahead.held).count, 1);
        for ino in 0..MAX_HELD as u64 {
            ahead.insert(3, &stat(1_000 + ino, 100), later(), [3; 16]);
        }
        let held = crate::util::lock(&ahead.held);
        assert!(held.count <= MAX_HELD);
        assert_eq!(held.count, held.by_dir.values().map(HashMap::len).sum::<usize>());
    }
}
