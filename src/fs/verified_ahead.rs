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
//! A change within the same timestamp tick as the one before it, on a
//! filesystem or kernel without fine-grained change times, keeps the time:
//! that takes a writer racing the worker on the live backing directory,
//! which could as well change the file after its check (SECURITY.md).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

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
    held: Mutex<Held>,
    authenticated: AtomicU64,
    taken: AtomicU64,
}

impl VerifiedAhead {
    /// The worker found the empty file of directory `dir` that `st`
    /// describes (taken before the file was read) intact, with id `id`.
    pub fn insert(&self, dir: u64, st: &Stat, id: FileId) {
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
        let (read, ids): (Vec<&OpenedEmpty>, Vec<FileId>) = asked
            .iter()
            .filter_map(|opened| match namespace::read_file_id(&opened.file) {
                Ok(FileIdRead::Id(id)) => Some((opened, id)),
                _ => None,
            })
            .unzip();
        let Ok(ciphers) = self.volume.file_ciphers(&ids) else {
            return;
        };
        for ((opened, id), cipher) in read.into_iter().zip(ids).zip(ciphers) {
            if cipher.is_ok_and(|cipher| content::check_empty_final(&opened.file, &cipher).is_ok()) {
                self.verified_ahead.insert(dir, &opened.stat, id);
            }
        }
    }

    /// An empty file of `parent` was just looked up, its backing inode
    /// showing `st`: it counts as checked if the worker authenticated it as
    /// it still is, and no other inode of this mount has its id.
    pub(super) fn take_authenticated_ahead(&self, parent: &Node, node: &Node, st: &Stat) {
        let Some(id) = self.verified_ahead.take(parent.ino, st) else {
            return;
        };
        let _guard = crate::util::read(&node.state().content);
        let known_as_other = crate::util::lock(&node.state().cipher)
            .as_ref()
            .is_some_and(|cipher| *cipher.file_id() != id);
        if !known_as_other && self.inodes.ids.claim(id, node.ino).is_ok() {
            node.mark_verified_empty();
        }
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

    #[test]
    fn a_result_is_taken_once_and_only_for_the_inode_as_it_was() {
        let ahead = VerifiedAhead::default();
        ahead.insert(1, &stat(10, 100), [1; 16]);
        ahead.insert(1, &stat(11, 100), [2; 16]);
        ahead.insert(1, &stat(12, 100), [3; 16]);
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
        let ahead = VerifiedAhead::default();
        ahead.insert(1, &stat(10, 100), [1; 16]);
        ahead.insert(2, &stat(20, 100), [2; 16]);
        ahead.forget(1);
        assert_eq!(ahead.take(1, &stat(10, 100)), None);
        assert_eq!(crate::util::lock(&ahead.held).count, 1);
        for ino in 0..MAX_HELD as u64 {
            ahead.insert(3, &stat(1_000 + ino, 100), [3; 16]);
        }
        let held = crate::util::lock(&ahead.held);
        assert!(held.count <= MAX_HELD);
        assert_eq!(held.count, held.by_dir.values().map(HashMap::len).sum::<usize>());
    }
}
