//! Empty files authenticated ahead. The read-ahead worker (check_ahead.rs)
//! asks for a directory's empty files in bursts; once a burst is read it
//! also authenticates each file's 46 bytes there, off the request path (a
//! DB key lookup and two AES-GCM-SIV opens per file), and keeps those bytes
//! and the file id by backing inode. A lookup of such a file reads its 46
//! bytes again and takes the result if they are the bytes authenticated:
//! the same check as reading and authenticating them itself, made when the
//! size is shown, at the cost of one read of a cached page instead of a
//! key lookup and two decryptions. Nothing about the inode (its times,
//! which a write through a shared mapping need not move) is trusted.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::Stat;

use super::KmsFs;
use super::check_ahead::OpenedEmpty;
use super::inodes::Node;
use crate::crypto::FileId;
use crate::volume::content::EMPTY_FILE_LEN;
use crate::volume::header::{self, HEADER_LEN};

/// Results held over all directories (about 100 bytes each); a result that
/// would make more makes all of them forgotten.
const MAX_HELD: usize = 65_536;

/// An empty file's whole backing content.
type Sealed = [u8; EMPTY_FILE_LEN as usize];

type InodeKey = (u64, u64);

fn key(st: &Stat) -> InodeKey {
    (st.st_dev as u64, st.st_ino as u64)
}

/// The backing content of an empty file: exactly `EMPTY_FILE_LEN` bytes.
fn read_sealed(file: &File) -> Option<Sealed> {
    // One byte more: a file that grew is not one.
    let mut buf = [0u8; EMPTY_FILE_LEN as usize + 1];
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    (got == EMPTY_FILE_LEN as usize).then(|| {
        let mut sealed = [0u8; EMPTY_FILE_LEN as usize];
        sealed.copy_from_slice(&buf[..got]);
        sealed
    })
}

#[derive(Default)]
struct Held {
    /// By directory (its FUSE inode), then by backing device and inode.
    by_dir: HashMap<u64, HashMap<InodeKey, (Sealed, FileId)>>,
    count: usize,
}

#[derive(Default)]
pub struct VerifiedAhead {
    held: Mutex<Held>,
    authenticated: AtomicU64,
    taken: AtomicU64,
}

impl VerifiedAhead {
    /// The worker found `sealed`, the content of the backing inode `st`
    /// describes (an empty file of directory `dir`), intact, with id `id`.
    fn insert(&self, dir: u64, st: &Stat, sealed: Sealed, id: FileId) {
        let mut held = crate::util::lock(&self.held);
        if held.count >= MAX_HELD {
            *held = Held::default();
        }
        if held
            .by_dir
            .entry(dir)
            .or_default()
            .insert(key(st), (sealed, id))
            .is_none()
        {
            held.count += 1;
            self.authenticated.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What the worker found intact in the backing inode a lookup's `st`
    /// describes, an empty file of `dir`, if anything.
    fn take(&self, dir: u64, st: &Stat) -> Option<(Sealed, FileId)> {
        if st.st_size as u64 != EMPTY_FILE_LEN {
            return None;
        }
        let mut held = crate::util::lock(&self.held);
        let files = held.by_dir.get_mut(&dir)?;
        let found = files.remove(&key(st))?;
        if files.is_empty() {
            held.by_dir.remove(&dir);
        }
        held.count -= 1;
        Some(found)
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
    /// On the read-ahead worker: authenticates empty files of directory
    /// `dir`. What fails is left to the lookup, which checks it again and
    /// says why.
    pub(super) fn authenticate_ahead(&self, dir: u64, asked: &[OpenedEmpty]) {
        let (read, ids): (Vec<(&OpenedEmpty, Sealed)>, Vec<FileId>) = asked
            .iter()
            .filter_map(|opened| {
                let sealed = read_sealed(&opened.file)?;
                let id = header::decode(&sealed[..HEADER_LEN]).ok()?;
                Some(((opened, sealed), id))
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
        for (((opened, sealed), id), cipher) in read.into_iter().zip(ids).zip(ciphers) {
            let intact = cipher.is_ok_and(|cipher| cipher.open_block(0, true, &sealed[HEADER_LEN..], &mut []).is_ok());
            if intact {
                self.verified_ahead.insert(dir, &opened.stat, sealed, id);
            }
        }
    }

    /// An empty file of `parent` was just looked up (its backing inode
    /// showing `st`): it counts as checked if its content is what the
    /// worker authenticated, and no other inode of this mount has its id.
    /// Whether it did.
    pub(super) fn take_authenticated_ahead(&self, parent: &Node, node: &Node, st: &Stat) -> bool {
        let Some((sealed, id)) = self.verified_ahead.take(parent.ino, st) else {
            return false;
        };
        let state = node.state();
        // Read again under the content lock, as in `damaged_size`: this
        // mount's writers change a file's length in steps under it.
        let _guard = crate::util::read(&state.content);
        let unchanged = self
            .reopen(node, libc::O_RDONLY)
            .ok()
            .and_then(|file| read_sealed(&file))
            .is_some_and(|now| now == sealed);
        let known_as_other = crate::util::lock(&state.cipher)
            .as_ref()
            .is_some_and(|cipher| *cipher.file_id() != id)
            || state.taken_id.get().is_some_and(|taken| *taken != id);
        let taken = unchanged && !known_as_other && self.inodes.ids.claim(id, node.ino).is_ok();
        if taken {
            let _ = state.taken_id.set(id);
            node.mark_verified_empty();
            self.verified_ahead.taken.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(ino: u64) -> Stat {
        // SAFETY: `stat` is plain old data; all zeros is a valid value.
        let mut st: Stat = unsafe { std::mem::zeroed() };
        st.st_dev = 7;
        st.st_ino = ino as _;
        st.st_size = EMPTY_FILE_LEN as _;
        st
    }

    #[test]
    fn a_result_is_taken_once_for_its_inode_and_directory() {
        let ahead = VerifiedAhead::default();
        ahead.insert(1, &stat(10), [1; 46], [1; 16]);
        ahead.insert(1, &stat(11), [2; 46], [2; 16]);
        ahead.insert(1, &stat(11), [2; 46], [2; 16]);
        assert_eq!(ahead.authenticated.load(Ordering::Relaxed), 2, "counted once");
        assert_eq!(ahead.take(1, &stat(10)), Some(([1; 46], [1; 16])));
        assert_eq!(ahead.take(1, &stat(10)), None, "taken once");
        assert_eq!(ahead.take(2, &stat(11)), None, "another directory");
        let mut elsewhere = stat(11);
        elsewhere.st_dev = 8;
        assert_eq!(ahead.take(1, &elsewhere), None, "another device");
        let mut grown = stat(11);
        grown.st_size += 1;
        assert_eq!(ahead.take(1, &grown), None, "no longer empty");
        assert_eq!(ahead.take(1, &stat(11)), Some(([2; 46], [2; 16])));
        let held = crate::util::lock(&ahead.held);
        assert_eq!((held.count, held.by_dir.len()), (0, 0));
    }

    #[test]
    fn results_are_forgotten_with_their_directory_and_bounded() {
        let ahead = VerifiedAhead::default();
        ahead.insert(1, &stat(10), [1; 46], [1; 16]);
        ahead.insert(2, &stat(20), [2; 46], [2; 16]);
        ahead.forget(1);
        assert_eq!(ahead.take(1, &stat(10)), None);
        assert_eq!(crate::util::lock(&ahead.held).count, 1);
        for ino in 0..MAX_HELD as u64 {
            ahead.insert(3, &stat(1_000 + ino), [3; 46], [3; 16]);
        }
        let held = crate::util::lock(&ahead.held);
        assert!(held.count <= MAX_HELD);
        assert_eq!(held.count, held.by_dir.values().map(HashMap::len).sum::<usize>());
    }

    #[test]
    fn only_exactly_an_empty_files_length_is_read_as_one() {
        let dir = tempfile::tempdir().unwrap();
        for (len, whole) in [(46, true), (45, false), (47, false), (0, false)] {
            let path = dir.path().join(format!("f{len}"));
            std::fs::write(&path, vec![5u8; len]).unwrap();
            let read = read_sealed(&File::open(&path).unwrap());
            assert_eq!(read.is_some(), whole, "{len} bytes");
        }
    }
}
