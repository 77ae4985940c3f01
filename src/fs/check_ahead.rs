//! Empty files' final blocks read ahead. With the sealed layout an empty
//! file's size is shown only once its final block authenticated (files.rs,
//! `damaged_size`): one page read from the backing file. A program that
//! looks up many empty files one after the other (`stat` of each, a build
//! tree's marker files, a maildir's new messages) waits for one cold read
//! per file, each submitted alone; on a VM each is also a notification of
//! the hypervisor. Reads asked for together cost a tenth of that (DESIGN.md,
//! "What detecting every cut costs").
//!
//! Files are usually made in the order they are later visited, so their
//! backing inode numbers rise in that order; backing names are encrypted and
//! say nothing. When two empty files of one directory are checked in rising
//! inode order, the directory's entries are read once (on a worker thread)
//! and its following empty files, by inode number, are asked for
//! (`POSIX_FADV_WILLNEED`) in bursts as the checks move along. Checks in any
//! other order ask for nothing. Advice only: the check itself still reads
//! and authenticates every final block.

use std::collections::{BinaryHeap, HashMap};
use std::ffi::{OsStr, OsString};
use std::num::NonZeroU64;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;

use rustix::fs::{Advice, FileType as DirentType, Mode, OFlags};

use super::atime;
use crate::volume::content::EMPTY_FILE_LEN;

/// Files asked for ahead of the one being checked.
const WINDOW: usize = 256;
/// A new burst is asked for once fewer than this many are left ahead.
const REFILL_BELOW: usize = WINDOW / 2;
/// Entries kept from one reading of a directory (about 5 MB with long
/// backing names): the ones with the next inode numbers. A larger directory
/// is read again from where the checks have got to.
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
    /// Index after the last checked file.
    at: usize,
}

enum Progress {
    /// One empty file checked, by its inode number.
    Seen(u64),
    /// A worker is reading the directory.
    Reading,
    Swept(Sweep),
}

/// What the worker should do for the directory.
#[derive(Debug, PartialEq)]
pub enum Ahead {
    Nothing,
    /// Read the directory's entries above this inode number, then `swept`.
    Read { above: u64 },
    /// Ask for these backing names.
    Ask(Vec<OsString>),
}

/// The directories whose empty files are being checked, keyed by inode.
#[derive(Default)]
pub struct ChecksAhead {
    dirs: Mutex<HashMap<u64, Progress>>,
}

impl ChecksAhead {
    /// An empty file, backing inode `file`, of directory `dir` was checked.
    pub fn checked(&self, dir: u64, file: u64) -> Ahead {
        let mut dirs = crate::util::lock(&self.dirs);
        if !dirs.contains_key(&dir) && dirs.len() >= MAX_DIRS {
            dirs.clear();
        }
        let Some(progress) = dirs.get_mut(&dir) else {
            dirs.insert(dir, Progress::Seen(file));
            return Ahead::Nothing;
        };
        match progress {
            Progress::Seen(last) if file > *last => {
                *progress = Progress::Reading;
                Ahead::Read { above: file }
            }
            Progress::Seen(last) => {
                *last = file;
                Ahead::Nothing
            }
            Progress::Reading => Ahead::Nothing,
            Progress::Swept(sweep) => {
                let next = sweep.entries.partition_point(|(ino, _)| *ino <= file);
                // In order: a little past where the checks were.
                let in_order = next > sweep.at && next <= sweep.at + WINDOW;
                sweep.at = next;
                if !in_order {
                    return Ahead::Nothing;
                }
                if next == sweep.entries.len() && sweep.cut {
                    *progress = Progress::Reading;
                    return Ahead::Read { above: file };
                }
                ask(sweep)
            }
        }
    }

    /// The worker read the directory: `entries` are its regular entries
    /// above the file that started the reading, by rising inode number;
    /// `cut` says whether higher ones were left out.
    pub fn swept(&self, dir: u64, entries: Vec<(u64, OsString)>, cut: bool) -> Ahead {
        let mut sweep = Sweep {
            entries,
            cut,
            asked_until: 0,
            at: 0,
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

/// The next burst, once fewer than `REFILL_BELOW` files are asked for ahead.
fn ask(sweep: &mut Sweep) -> Ahead {
    if sweep.asked_until.saturating_sub(sweep.at) >= REFILL_BELOW {
        return Ahead::Nothing;
    }
    let start = sweep.asked_until.max(sweep.at);
    let end = (sweep.at + WINDOW).min(sweep.entries.len());
    if start >= end {
        return Ahead::Nothing;
    }
    sweep.asked_until = end;
    Ahead::Ask(sweep.entries[start..end].iter().map(|(_, name)| name.clone()).collect())
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
/// that are empty files; anything else, or a name that is gone, is skipped.
pub fn start_reading(dir: impl AsFd, names: &[OsString]) {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    for name in names {
        let Ok(file) = atime::open_with(OFlags::NOATIME, flags, |f| {
            rustix::fs::openat(&dir, name.as_os_str(), f, Mode::empty())
        }) else {
            continue;
        };
        let empty = rustix::fs::fstat(&file).is_ok_and(|st| {
            DirentType::from_raw_mode(st.st_mode) == DirentType::RegularFile && st.st_size as u64 == EMPTY_FILE_LEN
        });
        if empty {
            let _ = rustix::fs::fadvise(&file, 0, NonZeroU64::new(EMPTY_FILE_LEN), Advice::WillNeed);
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
    fn two_checks_in_rising_order_read_the_directory_then_bursts_follow() {
        let ahead = ChecksAhead::default();
        assert_eq!(ahead.checked(7, 100), Ahead::Nothing, "one check says nothing yet");
        assert_eq!(ahead.checked(7, 101), Ahead::Read { above: 101 });
        assert_eq!(ahead.checked(7, 102), Ahead::Nothing, "being read");
        assert_eq!(ahead.swept(7, entries(102..1000), false), names(102..102 + WINDOW as u64));
        // Checks moving along ask nothing until half the window is used...
        for file in 102..102 + REFILL_BELOW as u64 {
            assert_eq!(ahead.checked(7, file), Ahead::Nothing, "file {file}");
        }
        // ...then the next burst, up to a window ahead.
        let at = 102 + REFILL_BELOW as u64;
        assert_eq!(ahead.checked(7, at), names(102 + WINDOW as u64..at + 1 + WINDOW as u64));
        // Every entry is asked for once, in order, and none after the last.
        let mut asked = match names(102..at + 1 + WINDOW as u64) {
            Ahead::Ask(names) => names,
            _ => unreachable!(),
        };
        for file in at + 1..1000 {
            if let Ahead::Ask(names) = ahead.checked(7, file) {
                assert!(names.len() > REFILL_BELOW || asked.len() + names.len() == 898, "bursts, not trickles");
                asked.extend(names);
            }
        }
        assert_eq!(Ahead::Ask(asked), names(102..1000));
        assert_eq!(ahead.checked(7, 1000), Ahead::Nothing);
    }

    #[test]
    fn falling_or_scattered_checks_ask_for_nothing() {
        let ahead = ChecksAhead::default();
        assert_eq!(ahead.checked(1, 500), Ahead::Nothing);
        assert_eq!(ahead.checked(1, 400), Ahead::Nothing, "falling");
        assert_eq!(ahead.checked(1, 300), Ahead::Nothing);
        assert_eq!(ahead.checked(1, 301), Ahead::Read { above: 301 });
        ahead.swept(1, entries(302..5000), false);
        assert_eq!(ahead.checked(1, 4000), Ahead::Nothing, "a jump past the window");
        assert_eq!(ahead.checked(1, 3000), Ahead::Nothing, "a jump back");
        assert_eq!(ahead.checked(1, 3500), Ahead::Nothing, "a jump past the window again");
        // Back in order from there: asked for again.
        assert!(matches!(ahead.checked(1, 3501), Ahead::Ask(names) if names.len() == WINDOW));
        // Another directory has its own progress.
        assert_eq!(ahead.checked(2, 3502), Ahead::Nothing);
    }

    #[test]
    fn a_cut_reading_is_read_again_where_it_ended_and_failures_start_over() {
        let ahead = ChecksAhead::default();
        ahead.checked(3, 10);
        ahead.checked(3, 11);
        ahead.swept(3, entries(12..20), true);
        for file in 12..19 {
            ahead.checked(3, file);
        }
        assert_eq!(ahead.checked(3, 19), Ahead::Read { above: 19 }, "past the last entry kept");
        ahead.abandoned(3);
        assert_eq!(ahead.checked(3, 20), Ahead::Nothing, "starts over");
        assert_eq!(ahead.checked(3, 21), Ahead::Read { above: 21 });
    }

    #[test]
    fn directories_beyond_the_bound_are_forgotten_together() {
        let ahead = ChecksAhead::default();
        for dir in 0..MAX_DIRS as u64 {
            ahead.checked(dir, 1);
        }
        assert_eq!(ahead.checked(0, 2), Ahead::Read { above: 2 });
        ahead.checked(MAX_DIRS as u64, 1); // one too many: all forgotten
        assert_eq!(ahead.checked(1, 2), Ahead::Nothing, "forgotten: a first check again");
    }
}
