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
//! files are asked for (batch_read.rs) in bursts, by inode number: 256
//! before any check, then 4 more for each file checked, and all the rest
//! once the checks reach a sixteenth of the files the reading found, or
//! once 32 checks (one per 128 files of a larger directory), most of them,
//! were of files past the last one asked for.
//! Backing names are encrypted and inode numbers follow the order files
//! were made in only loosely, so nothing here guesses which file comes
//! next: whatever the order, most files are in the cache by their turn, and
//! a program that looks at a few empty files of a large directory costs at
//! most 256 reads more, plus 4 per file it looked at (16 once it looked at
//! a sixteenth of them; 128 per file once it looked at 32, or one per 128
//! files, out of inode order: a program going its own way through the
//! directory), and one reading of up to 65,536 of the directory's
//! entries (a larger directory is read on where that stopped once what it
//! found was asked for). Bursts are queued for the worker, never dropped:
//! their names have left the directory's state. A new pass through the
//! directory starts once more files were checked than the whole last pass
//! found (files made since), and all of it is forgotten with the directory.
//! Once a chunk of a burst is asked for, each of its files is handed back
//! to be authenticated on the worker (verified_ahead.rs).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, Dir, FileType as DirentType, Mode, OFlags, Stat};

use super::handles::NodeFd;
use super::inodes::Node;
use super::{atime, batch_read};
use crate::volume::content::EMPTY_FILE_LEN;

/// Files asked for as soon as a directory's entries are read.
const LEAD: usize = 256;
/// Files asked for per file checked, beyond the lead.
const PER_CHECK: usize = 4;
/// And more per file checked that the worker had authenticated already: a
/// program going through the whole directory (the worker is read from,
/// not a few files of a large directory looked at).
const PER_TAKEN: usize = 12;
/// The smallest burst but the last of a reading: reads asked for together
/// are what saves the time.
const MIN_BURST: usize = 128;
/// Once the checks since a reading reach this fraction (1/N) of the files
/// it found, the program is taken to be going through the whole directory
/// and the rest of them are asked for at once: checks in an order the
/// worker cannot follow otherwise meet unread files until the bursts
/// caught up (a fifth of them for 10,000 files).
const WHOLE_AFTER: usize = 16;
/// Checks of files past the last one asked for (by inode number) after
/// which, if they are most of the checks, the rest is asked for at once:
/// the program goes through the directory in an order of its own (names
/// made one after another get inode numbers all over), and bursts in inode
/// order would meet almost none of its next files. At least this many, and
/// one per `OUT_OF_ORDER_SHARE` files of the reading, so that a program
/// looking at a few files of a large directory costs at most that many
/// reads per file looked at.
const OUT_OF_ORDER_AFTER: usize = 32;
const OUT_OF_ORDER_SHARE: usize = 128;
/// Regular entries kept from one reading of a directory.
const MAX_SWEPT: usize = 16_384;
/// Entries of any kind looked at in one reading.
const MAX_SCANNED: usize = 4 * MAX_SWEPT;
/// Names held for all directories and not yet asked for (about 18 MB with
/// 255-byte names); a reading that would hold more makes the others
/// forgotten.
const MAX_HELD: usize = 65_536;
/// Directories followed at once; beyond this all are forgotten.
const MAX_DIRS: usize = 64;
/// Files opened at once: a burst is asked for and authenticated in chunks.
const CHUNK: usize = 256;

/// A regular entry of a directory: its inode number and name.
type Entry = (u64, OsString);

/// What one reading of a directory found.
struct Sweep {
    /// Its regular entries by rising inode number, each taken out when it
    /// is asked for.
    names: Vec<OsString>,
    /// Their inode numbers.
    inos: Vec<u64>,
    /// Where the reading stopped, if it did before the end.
    more_at: Option<i64>,
    /// Entries below this index were asked for.
    asked_until: usize,
    /// Files of the directory checked since the reading.
    checks: usize,
    /// Of those, the ones the worker had authenticated.
    taken: usize,
    /// Of those, the ones past the last file asked for.
    beyond: usize,
    pass: Pass,
}

/// One pass through the directory, from its start, over one reading or
/// several (each stops after `MAX_SWEPT` files).
#[derive(Clone, Copy, Default)]
struct Pass {
    /// Regular entries found.
    names: usize,
    /// Files of the directory checked.
    checks: usize,
}

enum Progress {
    /// One empty file checked.
    Seen,
    /// A worker is reading the directory.
    Reading(Pass),
    Swept(Sweep),
}

/// What the worker should do for the directory.
#[derive(Debug, PartialEq)]
pub enum Ahead {
    Nothing,
    /// Read the directory's entries from this offset (0: its start), then
    /// hand them to `swept`.
    Read {
        from: i64,
    },
    /// Ask for these backing names.
    Ask(Vec<OsString>),
}

/// An empty file the worker opened, and what `fstat` showed of it.
pub struct OpenedEmpty {
    pub file: File,
    pub stat: Stat,
}

/// What the worker should do, and in which directory.
pub struct Job {
    dir: u64,
    dir_fd: NodeFd,
    ahead: Ahead,
}

impl Job {
    /// A job that reads a directory, which must be started over if it is
    /// dropped; asking is only advice.
    pub fn reads(&self) -> bool {
        matches!(self.ahead, Ahead::Read { .. })
    }

    pub fn dir(&self) -> u64 {
        self.dir
    }
}

#[derive(Default)]
struct Dirs {
    by_ino: HashMap<u64, Progress>,
    /// Names in `Swept` states not yet asked for.
    held: usize,
}

impl Dirs {
    fn forget_all(&mut self) {
        self.by_ino.clear();
        self.held = 0;
    }

    fn remove(&mut self, dir: u64) {
        if let Some(Progress::Swept(sweep)) = self.by_ino.remove(&dir) {
            self.held -= sweep.names.len() - sweep.asked_until;
        }
    }
}

/// The directories whose empty files are being checked, keyed by inode,
/// and the jobs decided on request threads that a worker has yet to take.
#[derive(Default)]
pub struct ChecksAhead {
    dirs: Mutex<Dirs>,
    jobs: Mutex<Vec<Job>>,
    has_jobs: AtomicBool,
}

impl ChecksAhead {
    /// An empty file of `parent`, backing inode `ino`, is about to be
    /// checked (`taken`: it was authenticated ahead): queues what is to be
    /// read ahead, if anything.
    pub fn checking(&self, parent: &Node, ino: u64, taken: bool) {
        let ahead = self.checked(parent.ino, ino, taken);
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

    /// The jobs queued since the last call (no lock taken, and no cache
    /// line written, when there are none).
    pub fn take_jobs(&self) -> Vec<Job> {
        if !self.has_jobs.load(Ordering::Relaxed) || !self.has_jobs.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *crate::util::lock(&self.jobs))
    }

    /// Does a job on the worker thread; `authenticate` gets the empty files
    /// asked for, a chunk at a time once all their reads were asked for,
    /// each with what `fstat` showed of it before.
    pub fn run(&self, job: Job, authenticate: &dyn Fn(&[OpenedEmpty])) {
        let dir_fd = job.dir_fd.as_fd();
        match job.ahead {
            Ahead::Nothing => {}
            // A burst for a directory forgotten or read again since is left.
            Ahead::Ask(names) if self.follows(job.dir) => start_reading(dir_fd, &names, authenticate),
            Ahead::Ask(_) => {}
            Ahead::Read { from } => match read_entries(dir_fd, from) {
                Ok((names, more_at)) => {
                    if let Ahead::Ask(names) = self.swept(job.dir, names, more_at) {
                        start_reading(dir_fd, &names, authenticate);
                    }
                }
                Err(_) => self.abandoned(job.dir),
            },
        }
    }

    /// An empty file of directory `dir`, inode `ino`, was checked.
    fn checked(&self, dir: u64, ino: u64, taken: bool) -> Ahead {
        let mut dirs = crate::util::lock(&self.dirs);
        if !dirs.by_ino.contains_key(&dir) && dirs.by_ino.len() >= MAX_DIRS {
            dirs.forget_all();
        }
        let Dirs { by_ino, held } = &mut *dirs;
        let Some(progress) = by_ino.get_mut(&dir) else {
            by_ino.insert(dir, Progress::Seen);
            return Ahead::Nothing;
        };
        match progress {
            Progress::Seen => {
                *progress = Progress::Reading(Pass::default());
                Ahead::Read { from: 0 }
            }
            Progress::Reading(pass) => {
                pass.checks += 1;
                Ahead::Nothing
            }
            Progress::Swept(sweep) => {
                sweep.checks += 1;
                sweep.taken += usize::from(taken);
                let last_asked = sweep.asked_until.checked_sub(1).map(|i| sweep.inos[i]);
                sweep.beyond += usize::from(last_asked.is_some_and(|last| ino > last));
                sweep.pass.checks += 1;
                let all_asked = sweep.asked_until == sweep.names.len();
                let (from, pass) = match sweep.more_at {
                    Some(offset) if all_asked => (offset, sweep.pass),
                    // A whole pass, and more checks than it found files:
                    // files were made since.
                    None if all_asked && sweep.pass.checks > sweep.pass.names => (0, Pass::default()),
                    _ => return ask(sweep, held),
                };
                *progress = Progress::Reading(pass); // nothing of the sweep was held
                Ahead::Read { from }
            }
        }
    }

    /// The worker read the directory: `entries` are its regular entries
    /// (inode number, name) by rising inode number, and `more_at` is where
    /// the reading stopped, if it did. Dropped if the directory was
    /// forgotten meanwhile.
    fn swept(&self, dir: u64, entries: Vec<Entry>, more_at: Option<i64>) -> Ahead {
        let (inos, names): (Vec<u64>, Vec<OsString>) = entries.into_iter().unzip();
        let mut dirs = crate::util::lock(&self.dirs);
        let Some(&Progress::Reading(mut pass)) = dirs.by_ino.get(&dir) else {
            return Ahead::Nothing;
        };
        pass.names += names.len();
        if dirs.held + names.len() > MAX_HELD {
            dirs.forget_all();
        }
        dirs.held += names.len();
        let mut sweep = Sweep {
            names,
            inos,
            more_at,
            asked_until: 0,
            checks: 0,
            taken: 0,
            beyond: 0,
            pass,
        };
        let first = ask(&mut sweep, &mut dirs.held);
        dirs.by_ino.insert(dir, Progress::Swept(sweep));
        first
    }

    /// Whether the directory's files are being read ahead (it was not
    /// forgotten since).
    pub fn follows(&self, dir: u64) -> bool {
        matches!(crate::util::lock(&self.dirs).by_ino.get(&dir), Some(Progress::Swept(_)))
    }

    /// The directory could not be read, the worker had no room for the
    /// job, or the kernel forgot the directory (its number may come back
    /// as another one's): start over at the next check.
    pub fn abandoned(&self, dir: u64) {
        crate::util::lock(&self.dirs).remove(dir);
    }
}

/// The next burst, if the checks made room for one.
fn ask(sweep: &mut Sweep, held: &mut usize) -> Ahead {
    let len = sweep.names.len();
    let out_of_order_after = (len / OUT_OF_ORDER_SHARE).max(OUT_OF_ORDER_AFTER);
    let out_of_order = sweep.beyond >= out_of_order_after && 2 * sweep.beyond > sweep.checks;
    let allowed = if sweep.checks * WHOLE_AFTER >= len || out_of_order {
        len
    } else {
        (LEAD + PER_CHECK * sweep.checks + PER_TAKEN * sweep.taken).min(len)
    };
    if allowed <= sweep.asked_until || (allowed - sweep.asked_until < MIN_BURST && allowed < len) {
        return Ahead::Nothing;
    }
    let burst: Vec<OsString> = sweep.names[sweep.asked_until..allowed]
        .iter_mut()
        .map(std::mem::take)
        .collect();
    *held -= burst.len();
    sweep.asked_until = allowed;
    Ahead::Ask(burst)
}

/// Reads the directory's entries from offset `from`: its regular entries
/// (inode number, name) by rising inode number (at most `MAX_SWEPT`, among
/// at most `MAX_SCANNED` entries), and the offset to go on from if it
/// stopped before the end. Moves no access time.
fn read_entries(dir: BorrowedFd<'_>, from: i64) -> rustix::io::Result<(Vec<Entry>, Option<i64>)> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let fd = atime::open_with(OFlags::NOATIME, flags, |f| {
        rustix::fs::openat(dir, ".", f, Mode::empty())
    })?;
    let mut entries = Dir::new(fd)?;
    if from != 0 {
        entries.seek(from)?;
    }
    let (mut found, mut scanned, mut more_at) = (Vec::new(), 0, None);
    while let Some(entry) = entries.read() {
        let entry = entry?;
        if matches!(entry.file_type(), DirentType::RegularFile | DirentType::Unknown) {
            found.push((
                entry.ino(),
                OsStr::from_bytes(entry.file_name().to_bytes()).to_os_string(),
            ));
        }
        scanned += 1;
        if found.len() == MAX_SWEPT || scanned == MAX_SCANNED {
            more_at = Some(entry.offset());
            break;
        }
    }
    found.sort_unstable_by_key(|(ino, _)| *ino);
    Ok((found, more_at))
}

/// Asks the backing filesystem to start reading those of `names` in `dir`
/// that are empty files, `CHUNK` at a time, then hands those of a chunk to
/// `authenticate`, each with what `fstat` showed of it before it was read.
fn start_reading(dir: BorrowedFd<'_>, names: &[OsString], authenticate: &dyn Fn(&[OpenedEmpty])) {
    for chunk in names.chunks(CHUNK) {
        let asked: Vec<OpenedEmpty> = chunk.iter().filter_map(|name| open_empty_file(dir, name)).collect();
        let files: Vec<&File> = asked.iter().map(|opened| &opened.file).collect();
        batch_read::ask_for(&files, EMPTY_FILE_LEN as usize);
        authenticate(&asked);
    }
}

/// Opens `name` in `dir` for reading, if it is an empty file. Anything
/// else (a device node, a FIFO, a symlink), or a name that is gone, is
/// never opened for reading: the inode is looked at through an `O_PATH`
/// descriptor first and reopened through it, so a name swapped meanwhile
/// changes nothing.
fn open_empty_file(dir: BorrowedFd<'_>, name: &OsStr) -> Option<OpenedEmpty> {
    let empty_file = |st: &Stat| {
        DirentType::from_raw_mode(st.st_mode) == DirentType::RegularFile && st.st_size as u64 == EMPTY_FILE_LEN
    };
    // A cheap look first: most entries of most directories are not empty files.
    if !rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| empty_file(&st)) {
        return None;
    }
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let inode = rustix::fs::openat(dir, name, flags, Mode::empty()).ok()?;
    let st = rustix::fs::fstat(&inode).ok().filter(empty_file)?;
    let reopen = OFlags::RDONLY | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let path = format!("/proc/self/fd/{}", inode.as_raw_fd());
    let file = atime::open_with(OFlags::NOATIME, reopen, |f| {
        rustix::fs::open(path.as_str(), f, Mode::empty())
    })
    .ok()?;
    Some(OpenedEmpty {
        file: File::from(file),
        stat: st,
    })
}

#[cfg(test)]
mod tests;
