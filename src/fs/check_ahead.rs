//! Empty files' final blocks read ahead. With the sealed layout an empty
//! file's size is shown only once its final block authenticated (files.rs,
//! `damaged_size`): one page read from the backing file. A program that
//! looks up many empty files one after the other (`stat` of each, a build
//! tree's marker files, a maildir's new messages) waits for one cold read
//! per file, each submitted alone; on a VM each is also a notification of
//! the hypervisor. Reads asked for together cost a tenth of that (DESIGN.md,
//! "What detecting every cut costs").
//!
//! When empty files of one directory are checked one after another, the
//! directory's entries are read once (on the prefetch worker) and its empty
//! files are asked for (`POSIX_FADV_WILLNEED`) in bursts, by inode number:
//! 256 before any check, then 4 more for each file checked. Backing names
//! are encrypted and inode numbers follow the order files were made in
//! only loosely, so nothing here guesses which file comes next: whatever
//! the order, most files are in the cache by their turn, and a program that
//! looks at a few empty files of a large directory costs at most 256 reads
//! more, plus 4 per file it looked at. Advice only: every check still reads
//! and authenticates its final block.

use std::collections::{BinaryHeap, HashMap};
use std::ffi::{OsStr, OsString};
use std::num::NonZeroU64;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Advice, AtFlags, FileType as DirentType, Mode, OFlags};

use super::atime;
use super::handles::NodeFd;
use super::inodes::Node;
use crate::volume::content::EMPTY_FILE_LEN;

/// Files asked for as soon as a directory's entries are read.
const LEAD: usize = 256;
/// Files asked for per file checked, beyond the lead.
const PER_CHECK: usize = 4;
/// The smallest burst but the last of a reading: reads asked for together
/// are what saves the time.
const MIN_BURST: usize = 128;
/// Entries kept from one reading of a directory (about 5 MB with long
/// backing names): those with the lowest inode numbers above where the
/// previous reading ended. The rest is read once these were asked for.
const MAX_SWEPT: usize = 1 << 16;
/// Directories followed at once; beyond this all are forgotten.
const MAX_DIRS: usize = 64;

/// A directory's regular entries by rising inode number, from one reading.
struct Sweep {
    entries: Vec<(u64, OsString)>,
    /// Whether entries with higher numbers were left out (`MAX_SWEPT`).
    cut: bool,
    /// Entries below this index were asked for.
    asked_until: usize,
    /// Files of the directory checked since the reading.
    checks: usize,
}

enum Progress {
    /// One empty file checked.
    Seen,
    /// A worker is reading the directory.
    Reading,
    Swept(Sweep),
}

/// What the worker should do for the directory.
#[derive(Debug, PartialEq)]
pub enum Ahead {
    Nothing,
    /// Read the directory's entries above this inode number, then `swept`.
    Read {
        above: u64,
    },
    /// Ask for these backing names.
    Ask(Vec<OsString>),
}

/// What the worker should do, and in which directory.
pub struct Job {
    pub dir: u64,
    pub dir_fd: NodeFd,
    pub ahead: Ahead,
}

/// The directories whose empty files are being checked, keyed by inode,
/// and the jobs decided on request threads that a worker has yet to take.
#[derive(Default)]
pub struct ChecksAhead {
    dirs: Mutex<HashMap<u64, Progress>>,
    jobs: Mutex<Vec<Job>>,
    has_jobs: AtomicBool,
}

impl ChecksAhead {
    /// An empty file of `parent` is about to be checked: queues what is
    /// to be read ahead, if anything.
    pub fn checking(&self, parent: &Node) {
        let ahead = self.checked(parent.ino);
        if ahead == Ahead::Nothing {
            return;
        }
        let Ok(dir_fd) = parent.fd() else {
            return self.abandoned(parent.ino);
        };
        crate::util::lock(&self.jobs).push(Job {
            dir: parent.ino,
            dir_fd,
            ahead,
        });
        self.has_jobs.store(true, Ordering::Release);
    }

    /// The jobs queued since the last call (no lock taken when there are none).
    pub fn take_jobs(&self) -> Vec<Job> {
        if !self.has_jobs.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *crate::util::lock(&self.jobs))
    }

    /// Does a job on the worker thread.
    pub fn run(&self, job: Job) {
        let names = match job.ahead {
            Ahead::Nothing => return,
            Ahead::Ask(names) => names,
            Ahead::Read { above } => match read_entries(job.dir_fd.as_fd(), above) {
                Ok((entries, cut)) => match self.swept(job.dir, entries, cut) {
                    Ahead::Ask(names) => names,
                    _ => return,
                },
                Err(_) => return self.abandoned(job.dir),
            },
        };
        start_reading(job.dir_fd.as_fd(), &names);
    }

    /// An empty file of directory `dir` was checked.
    fn checked(&self, dir: u64) -> Ahead {
        let mut dirs = crate::util::lock(&self.dirs);
        if !dirs.contains_key(&dir) && dirs.len() >= MAX_DIRS {
            dirs.clear();
        }
        let Some(progress) = dirs.get_mut(&dir) else {
            dirs.insert(dir, Progress::Seen);
            return Ahead::Nothing;
        };
        match progress {
            Progress::Seen => {
                *progress = Progress::Reading;
                Ahead::Read { above: 0 }
            }
            Progress::Reading => Ahead::Nothing,
            Progress::Swept(sweep) => {
                sweep.checks += 1;
                match sweep.entries.last() {
                    Some(&(last, _)) if sweep.cut && sweep.asked_until == sweep.entries.len() => {
                        *progress = Progress::Reading;
                        Ahead::Read { above: last }
                    }
                    _ => ask(sweep),
                }
            }
        }
    }

    /// The worker read the directory: `entries` are its regular entries
    /// above the inode number it was given, by rising number; `cut` says
    /// whether higher ones were left out.
    pub fn swept(&self, dir: u64, entries: Vec<(u64, OsString)>, cut: bool) -> Ahead {
        let mut sweep = Sweep {
            entries,
            cut,
            asked_until: 0,
            checks: 0,
        };
        let first = ask(&mut sweep);
        crate::util::lock(&self.dirs).insert(dir, Progress::Swept(sweep));
        first
    }

    /// The directory could not be read, or the worker had no room for the
    /// job: start over at the next check.
    pub fn abandoned(&self, dir: u64) {
        crate::util::lock(&self.dirs).remove(&dir);
    }
}

/// The next burst, if the checks made room for one.
fn ask(sweep: &mut Sweep) -> Ahead {
    let len = sweep.entries.len();
    let allowed = (LEAD + PER_CHECK * sweep.checks).min(len);
    if allowed <= sweep.asked_until || (allowed - sweep.asked_until < MIN_BURST && allowed < len) {
        return Ahead::Nothing;
    }
    let burst = &sweep.entries[sweep.asked_until..allowed];
    sweep.asked_until = allowed;
    Ahead::Ask(burst.iter().map(|(_, name)| name.clone()).collect())
}

/// Reads the regular entries of `dir` with inode numbers above `above`:
/// the `MAX_SWEPT` lowest of them by rising number, and whether any were
/// left out. Moves no access time.
pub fn read_entries(dir: impl AsFd, above: u64) -> rustix::io::Result<(Vec<(u64, OsString)>, bool)> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let fd = atime::open_with(OFlags::NOATIME, flags, |f| {
        rustix::fs::openat(&dir, ".", f, Mode::empty())
    })?;
    let mut lowest: BinaryHeap<(u64, OsString)> = BinaryHeap::new();
    let mut cut = false;
    let mut entries = rustix::fs::Dir::read_from(&fd)?;
    while let Some(entry) = entries.read() {
        let entry = entry?;
        let regular = matches!(entry.file_type(), DirentType::RegularFile | DirentType::Unknown);
        if !regular || entry.ino() <= above {
            continue;
        }
        let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string();
        lowest.push((entry.ino(), name));
        if lowest.len() > MAX_SWEPT {
            lowest.pop();
            cut = true;
        }
    }
    Ok((lowest.into_sorted_vec(), cut))
}

/// Asks the backing filesystem to start reading those of `names` in `dir`
/// that are empty files. Anything else, or a name that is gone, is skipped
/// before it is opened: the backing directory may hold device nodes or
/// FIFOs, whose opening can do more than read.
pub fn start_reading(dir: impl AsFd, names: &[OsString]) {
    let empty_file = |st: &rustix::fs::Stat| {
        DirentType::from_raw_mode(st.st_mode) == DirentType::RegularFile && st.st_size as u64 == EMPTY_FILE_LEN
    };
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    for name in names {
        let name = name.as_os_str();
        if !rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| empty_file(&st)) {
            continue;
        }
        let opened = atime::open_with(OFlags::NOATIME, flags, |f| {
            rustix::fs::openat(&dir, name, f, Mode::empty())
        });
        if let Ok(file) = opened {
            // Still the same kind of file once open (names can change meanwhile).
            if rustix::fs::fstat(&file).is_ok_and(|st| empty_file(&st)) {
                let _ = rustix::fs::fadvise(&file, 0, NonZeroU64::new(EMPTY_FILE_LEN), Advice::WillNeed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(inos: std::ops::Range<u64>) -> Vec<(u64, OsString)> {
        inos.map(|i| (i, OsString::from(format!("b{i}")))).collect()
    }

    fn names(inos: std::ops::Range<u64>) -> Ahead {
        Ahead::Ask(inos.map(|i| OsString::from(format!("b{i}"))).collect())
    }

    #[test]
    fn a_second_check_reads_the_directory_and_bursts_follow_the_checks() {
        let ahead = ChecksAhead::default();
        assert_eq!(ahead.checked(7), Ahead::Nothing, "one check says nothing yet");
        assert_eq!(ahead.checked(7), Ahead::Read { above: 0 });
        assert_eq!(ahead.checked(7), Ahead::Nothing, "being read");
        assert_eq!(ahead.swept(7, entries(0..1000), false), names(0..LEAD as u64));
        // Each check makes room for PER_CHECK more, asked for in bursts.
        let mut asked = LEAD;
        for check in 1..=1000 {
            match ahead.checked(7) {
                Ahead::Ask(burst) => {
                    assert!(burst.len() >= MIN_BURST || asked + burst.len() == 1000, "a trickle");
                    assert_eq!(
                        Ahead::Ask(burst.clone()),
                        names(asked as u64..(asked + burst.len()) as u64)
                    );
                    asked += burst.len();
                }
                other => assert_eq!(other, Ahead::Nothing),
            }
            assert!(asked <= LEAD + PER_CHECK * check, "more than the checks allow");
            assert!(asked + MIN_BURST > (LEAD + PER_CHECK * check).min(1000), "fell behind");
        }
        assert_eq!(asked, 1000, "every entry, once");
        assert_eq!(ahead.checked(7), Ahead::Nothing, "nothing after the last");
        assert_eq!(ahead.checked(8), Ahead::Nothing, "another directory has its own");
    }

    #[test]
    fn a_cut_reading_is_read_again_where_it_ended_and_failures_start_over() {
        let ahead = ChecksAhead::default();
        ahead.checked(3);
        ahead.checked(3);
        assert_eq!(
            ahead.swept(3, entries(12..20), true),
            names(12..20),
            "a short last burst"
        );
        assert_eq!(ahead.checked(3), Ahead::Read { above: 19 }, "past the last entry kept");
        ahead.abandoned(3);
        assert_eq!(ahead.checked(3), Ahead::Nothing, "starts over");
        assert_eq!(ahead.checked(3), Ahead::Read { above: 0 });
        assert_eq!(ahead.swept(3, Vec::new(), false), Ahead::Nothing, "an empty directory");
        assert_eq!(ahead.checked(3), Ahead::Nothing);
    }

    #[test]
    fn directories_beyond_the_bound_are_forgotten_together() {
        let ahead = ChecksAhead::default();
        for dir in 0..MAX_DIRS as u64 {
            ahead.checked(dir);
        }
        assert_eq!(ahead.checked(0), Ahead::Read { above: 0 });
        ahead.checked(MAX_DIRS as u64); // one too many: all forgotten
        assert_eq!(ahead.checked(1), Ahead::Nothing, "forgotten: a first check again");
    }
}
