//! Directory IVs read ahead. Every name in a directory is encrypted under
//! the directory's IV, kept in a small file of its own (`.kmsfs.diriv`):
//! the first request naming anything in a directory whose node is new (the
//! kernel forgot it, the caches were dropped) reads that file, two disk
//! reads after each other (its inode, then its data) when they are cold.
//! A program walking a tree (`rsync` comparing a backup, `ls -lR`, `rm -rf`,
//! `find`) pays them one directory after the other, since it enters the
//! next directory only once it is done with the last.
//!
//! When a second subdirectory of one directory is looked up (or listed)
//! since its subdirectories' IVs were last read ahead, the prefetch worker
//! reads the directory's entries, the IV files of its subdirectories and
//! those of their subdirectories (two levels: the walk, entering one, finds
//! the next read too), at most `MAX_DIRS` of them after looking at most at
//! `MAX_SCANNED` entries, on `THREADS` threads so that the disk reads
//! overlap. The walk then finds them in the page cache. The IVs are only read, never
//! kept: each directory's IV is still read and checked where it is used
//! (namespace.rs). A directory is read again once more of its
//! subdirectories were looked up than the last pass found (or than one per
//! 64 entries it looked at: a directory of many files and a few
//! subdirectories is not listed again and again), or once the kernel
//! forgot it.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rustix::fs::{Dir, FileType as DirentType, Mode, OFlags};

use super::atime;
#[cfg(test)]
use crate::volume::layout::DIR_IV_FILE;
use crate::volume::namespace;

/// Subdirectories whose IVs one pass reads, at most (over both levels).
const MAX_DIRS: usize = 16_384;
/// Directory entries one pass looks at, at most (over all it lists).
const MAX_SCANNED: usize = 262_144;
/// Threads reading IV files (each open waits for inode reads, each read
/// for the data: on threads, the disk reads overlap).
const THREADS: usize = 4;
/// Directories whose lookups are counted; beyond it all are forgotten.
const MAX_TRACKED: usize = 65_536;
/// A pass that looked at this many entries per subdirectory it found waits
/// for as many lookups more before the next.
const SCANNED_PER_LOOKUP: usize = 64;

#[derive(Default)]
struct Parent {
    /// Subdirectories looked up since the last pass was queued (or ever).
    looked_up: usize,
    /// Lookups the last pass asks for before the next: what it found, or
    /// more where it looked at many entries to find few (a directory of
    /// many files and a few subdirectories is not read again and again).
    next_after: Option<usize>,
    /// A pass is queued or running.
    busy: bool,
}

/// A pass for the worker: the directory and a descriptor of it.
pub struct Job {
    dir: u64,
    dir_fd: OwnedFd,
}

impl Job {
    pub fn dir(&self) -> u64 {
        self.dir
    }
}

/// What a pass did: subdirectories of its directory found, entries looked at.
#[derive(Default, Clone, Copy, PartialEq, Debug)]
pub struct Pass {
    pub found: usize,
    pub scanned: usize,
}

#[derive(Default)]
pub struct IvsAhead {
    parents: Mutex<HashMap<u64, Parent>>,
    jobs: Mutex<Vec<Job>>,
    has_jobs: AtomicBool,
}

impl IvsAhead {
    /// Counts a subdirectory of `dir` looked up; queues a pass when it is
    /// the second since the last one and outnumbers what that one found.
    /// `dir_fd` gives a descriptor of `dir` for the pass (called without
    /// the lock that every directory lookup takes).
    pub fn subdirectory_looked_up(&self, dir: u64, dir_fd: impl FnOnce() -> Option<OwnedFd>) {
        {
            let mut parents = crate::util::lock(&self.parents);
            if parents.len() >= MAX_TRACKED && !parents.contains_key(&dir) {
                parents.clear();
            }
            let parent = parents.entry(dir).or_default();
            parent.looked_up += 1;
            let due = parent.looked_up >= 2 && parent.next_after.is_none_or(|after| parent.looked_up > after);
            if !due || parent.busy {
                return;
            }
            parent.busy = true;
            parent.looked_up = 0;
        }
        match dir_fd() {
            Some(dir_fd) => {
                crate::util::lock(&self.jobs).push(Job { dir, dir_fd });
                self.has_jobs.store(true, Ordering::Release);
            }
            None => self.passed(dir, Pass::default()),
        }
    }

    /// The passes queued since the last call (no lock taken when there are none).
    pub fn take_jobs(&self) -> Vec<Job> {
        if !self.has_jobs.load(Ordering::Relaxed) || !self.has_jobs.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *crate::util::lock(&self.jobs))
    }

    /// Runs a pass on the worker: the IV files of the directory's
    /// subdirectories and of theirs read.
    pub fn run(&self, job: Job) -> Pass {
        let pass = read_ahead(job.dir_fd.as_fd());
        drop(job.dir_fd);
        self.passed(job.dir, pass);
        pass
    }

    /// A pass that was dropped (the worker's queue was full) or done.
    pub fn passed(&self, dir: u64, pass: Pass) {
        if let Some(parent) = crate::util::lock(&self.parents).get_mut(&dir) {
            parent.busy = false;
            parent.next_after = Some(pass.found.max(pass.scanned / SCANNED_PER_LOOKUP));
        }
    }

    /// The kernel forgot `dir`: a later walk starts over.
    pub fn forget(&self, dir: u64) {
        crate::util::lock(&self.parents).remove(&dir);
    }
}

/// Reads ahead the IV files of the subdirectories of `dir` and of theirs
/// (a walk entering one of them finds the next level read too): first each
/// subdirectory's IV, listing it at the same time, then their
/// subdirectories' IVs, each level shared among the threads. Every
/// descriptor is closed once used (a subdirectory is opened again by name
/// for its own subdirectories, from the dentry cache): a pass holds a few,
/// whatever the directory's size.
fn read_ahead(dir: BorrowedFd<'_>) -> Pass {
    let budget = Budget {
        dirs: AtomicUsize::new(MAX_DIRS),
        entries: AtomicUsize::new(MAX_SCANNED),
    };
    let Ok(mut children) = subdirectories(dir, &budget) else {
        return Pass::default();
    };
    children.sort_unstable_by_key(|(ino, _)| *ino);
    let listed: Vec<(OsString, Vec<(u64, OsString)>)> = on_threads(&children, |(_, name)| {
        let sub = open_subdirectory(dir, name)?;
        read_iv_file(sub.as_fd());
        Some((name.clone(), subdirectories(sub.as_fd(), &budget).ok()?))
    });
    let grandchildren: Vec<(&OsStr, &OsStr)> = listed
        .iter()
        .flat_map(|(child, theirs)| {
            theirs
                .iter()
                .map(move |(_, name)| (child.as_os_str(), name.as_os_str()))
        })
        .collect();
    on_threads(&grandchildren, |(child, name)| {
        let sub = open_subdirectory(dir, child)?;
        read_iv_file(open_subdirectory(sub.as_fd(), name)?.as_fd());
        None::<()>
    });
    Pass {
        found: children.len(),
        scanned: MAX_SCANNED - budget.entries.load(Ordering::Relaxed),
    }
}

/// What one pass may still look at, over all the directories it reads.
struct Budget {
    dirs: AtomicUsize,
    entries: AtomicUsize,
}

impl Budget {
    /// Takes one from `left`; false once there is none.
    fn take(left: &AtomicUsize) -> bool {
        left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// `work` on each of `items`, shared among `THREADS` threads named
/// `kmsfs-ivs-N` (their disk reads overlap); what it returns, collected.
/// A share no thread could be started for is done here.
fn on_threads<T: Sync, R: Send>(items: &[T], work: impl Fn(&T) -> Option<R> + Sync) -> Vec<R> {
    let share = items.len().div_ceil(THREADS).max(1);
    let work = &work;
    let run = move |part: &[T]| part.iter().filter_map(work).collect::<Vec<R>>();
    std::thread::scope(|scope| {
        let threads: Vec<_> = items
            .chunks(share)
            .enumerate()
            .map(|(i, part)| {
                let thread = std::thread::Builder::new().name(format!("kmsfs-ivs-{i}"));
                thread.spawn_scoped(scope, move || run(part)).map_err(|_| part)
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|thread| match thread {
                Ok(thread) => thread.join().unwrap_or_default(),
                Err(part) => run(part),
            })
            .collect()
    })
}

fn open_subdirectory(dir: BorrowedFd<'_>, name: &OsStr) -> Option<OwnedFd> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(dir, name, flags, Mode::empty()).ok()
}

/// Reads the IV of directory `dir` into the page cache: through the
/// function every IV read goes through (namespace.rs), which opens nothing
/// but a regular file for reading.
fn read_iv_file(dir: BorrowedFd<'_>) -> bool {
    namespace::read_dir_iv(dir).is_ok()
}

/// The subdirectories of `dir` (inode number, name), as its entries say,
/// while `budget` lasts.
fn subdirectories(dir: BorrowedFd<'_>, budget: &Budget) -> rustix::io::Result<Vec<(u64, OsString)>> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let fd = atime::open_with(OFlags::NOATIME, flags, |f| {
        rustix::fs::openat(dir, ".", f, Mode::empty())
    })?;
    let mut entries = Dir::new(fd)?;
    let mut found = Vec::new();
    while Budget::take(&budget.entries)
        && let Some(entry) = entries.read()
    {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." && matches!(entry.file_type(), DirentType::Directory | DirentType::Unknown) {
            if !Budget::take(&budget.dirs) {
                break;
            }
            found.push((entry.ino(), OsStr::from_bytes(name).to_os_string()));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passes are queued at the second subdirectory looked up, not while
    /// one runs, and again only once more were looked up since it was
    /// queued than it found.
    #[test]
    fn passes_follow_the_lookups() {
        let ahead = IvsAhead::default();
        let fd = || rustix::fs::open(".", OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).ok();
        ahead.subdirectory_looked_up(7, fd);
        assert!(ahead.take_jobs().is_empty());
        ahead.subdirectory_looked_up(7, fd);
        let jobs = ahead.take_jobs();
        assert_eq!(jobs.iter().map(Job::dir).collect::<Vec<_>>(), vec![7]);
        ahead.subdirectory_looked_up(7, fd);
        ahead.subdirectory_looked_up(7, fd);
        assert!(ahead.take_jobs().is_empty(), "none while one is queued");
        ahead.passed(7, Pass { found: 3, scanned: 50 });
        // Counted since the pass was queued: 2 while it ran, 1 now.
        ahead.subdirectory_looked_up(7, fd);
        assert!(ahead.take_jobs().is_empty(), "not before more than the 3 found");
        ahead.subdirectory_looked_up(7, fd);
        assert_eq!(ahead.take_jobs().len(), 1);
        // A pass that looked at many entries to find few waits longer.
        ahead.passed(
            7,
            Pass {
                found: 2,
                scanned: 6400,
            },
        );
        for _ in 0..100 {
            ahead.subdirectory_looked_up(7, fd);
        }
        assert!(ahead.take_jobs().is_empty(), "not before 100 more lookups");
        ahead.subdirectory_looked_up(7, fd);
        assert_eq!(ahead.take_jobs().len(), 1);
        ahead.forget(7);
        ahead.subdirectory_looked_up(7, fd);
        ahead.subdirectory_looked_up(7, fd);
        assert_eq!(ahead.take_jobs().len(), 1, "a forgotten directory starts over");
    }

    /// A pass finds the subdirectories; an IV file is read only where it is
    /// a regular file; a pass looks at no more than its budget.
    #[test]
    fn a_pass_reads_regular_iv_files_only_within_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5 {
            let sub = dir.path().join(format!("d{i}"));
            std::fs::create_dir_all(sub.join("below")).unwrap();
            std::fs::write(sub.join(DIR_IV_FILE), [i as u8; 16]).unwrap();
        }
        // A FIFO where an IV file should be is never opened.
        std::fs::create_dir(dir.path().join("fifo")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("fifo").join(DIR_IV_FILE).as_path(),
            DirentType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let fd = rustix::fs::open(dir.path(), OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).unwrap();
        assert_eq!(read_ahead(fd.as_fd()).found, 6, "5 directories and the one with a FIFO");
        let sub = |name: &str| open_subdirectory(fd.as_fd(), OsStr::new(name));
        assert!(read_iv_file(sub("d3").unwrap().as_fd()));
        assert!(!read_iv_file(sub("fifo").unwrap().as_fd()));
        assert!(read_iv_file(sub("d3").unwrap().as_fd()));
        assert!(sub("file").is_none(), "not a directory");
        let small = Budget {
            dirs: AtomicUsize::new(2),
            entries: AtomicUsize::new(100),
        };
        assert_eq!(subdirectories(fd.as_fd(), &small).unwrap().len(), 2);
        let few_entries = Budget {
            dirs: AtomicUsize::new(100),
            entries: AtomicUsize::new(2),
        };
        assert!(subdirectories(fd.as_fd(), &few_entries).unwrap().len() <= 2);
    }
}
