//! Readahead across files. The kernel reads ahead within one file only, so
//! a program reading a directory's files one after the other (`cat dir/*`,
//! `find | xargs cat`, `tar -c`, `cp -r`) waits for one cold disk read per
//! small file, each after the previous one. When the first bytes of a file
//! are read right after those of the file before it in its directory's
//! listing, the next few regular files of the listing are asked for
//! (`POSIX_FADV_WILLNEED` on their first bytes, by a worker thread), so that
//! their disk reads overlap. Files read in any other order get nothing.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use fuser::FileType;
use rustix::fs::{Advice, OFlags};

use super::dirs::DirEntry;
use super::inodes::Node;

/// Files asked for ahead of the one being read, unless the mount says
/// otherwise (`prefetch=N`).
pub const DEFAULT_WINDOW: usize = 8;
/// Backing bytes asked for per file: small files whole, large ones are
/// left to the kernel's readahead once they are read.
const PREFETCH_BYTES: u64 = 128 << 10;
/// Files remembered across all listings (at most about 7 MB). A reader can
/// be far behind the lister (`find | xargs cat`: thousands of files), so
/// listings are kept until this many files were listed, then all are
/// forgotten.
const MAX_TRACKED: usize = 1 << 17;

/// The regular files of one directory listing, in listing order.
struct ReadOrder {
    files: Vec<u64>,
    window: usize,
    progress: Mutex<Progress>,
}

#[derive(Default)]
struct Progress {
    /// Index of the file whose first bytes were read last.
    last: Option<usize>,
    /// Files below this index were asked for already.
    asked_until: usize,
}

impl ReadOrder {
    /// The files to ask for now that the first bytes of `files[index]` are
    /// being read.
    fn started(&self, index: usize) -> &[u64] {
        let mut progress = crate::util::lock(&self.progress);
        // In order: the listing's first file first, then each one shortly
        // after the previous.
        let sequential = match progress.last {
            None => index == 0,
            Some(last) => index > last && index <= last + self.window,
        };
        progress.last = Some(index);
        if !sequential {
            return &[];
        }
        let start = progress.asked_until.max(index + 1);
        let end = (index + 1 + self.window).min(self.files.len());
        if start >= end {
            return &[];
        }
        progress.asked_until = end;
        &self.files[start..end]
    }
}

/// Where each listed file stands in the latest listing of its directory.
pub struct ReadOrders {
    /// Files asked for ahead; 0 turns the readahead off.
    window: usize,
    by_file: Mutex<HashMap<u64, (Arc<ReadOrder>, usize)>>,
}

impl ReadOrders {
    pub fn new(window: usize) -> Self {
        ReadOrders {
            window,
            by_file: Mutex::default(),
        }
    }

    /// Remembers the order of the regular files in a new listing.
    pub fn listed(&self, entries: &[DirEntry]) {
        if self.window == 0 {
            return;
        }
        let files: Vec<u64> = entries
            .iter()
            .filter(|e| e.kind == FileType::RegularFile)
            .map(|e| e.ino)
            .take(MAX_TRACKED)
            .collect();
        if files.len() < 2 {
            return;
        }
        let order = Arc::new(ReadOrder {
            files,
            window: self.window,
            progress: Mutex::default(),
        });
        let mut by_file = crate::util::lock(&self.by_file);
        if by_file.len() + order.files.len() > MAX_TRACKED {
            *by_file = HashMap::new();
        }
        for (index, &ino) in order.files.iter().enumerate() {
            by_file.insert(ino, (Arc::clone(&order), index));
        }
    }

    /// The inodes to ask for now that the first bytes of `ino` are read
    /// (none unless its directory is being read in listing order).
    pub fn next_after(&self, ino: u64) -> Vec<u64> {
        if self.window == 0 {
            return Vec::new(); // off: no lock on the read path
        }
        let by_file = crate::util::lock(&self.by_file);
        match by_file.get(&ino) {
            Some((order, index)) => order.started(*index).to_vec(),
            None => Vec::new(),
        }
    }
}

/// Asks the backing filesystem to start reading a file's first bytes.
/// Advice only: a failure changes nothing but the speed.
pub fn start_reading(node: &Node) {
    if let Ok(fd) = super::atime::reopen_quietly(node, OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW) {
        let _ = rustix::fs::fadvise(&fd, 0, NonZeroU64::new(PREFETCH_BYTES), Advice::WillNeed);
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;

    const WINDOW: usize = DEFAULT_WINDOW;

    fn entry(ino: u64, kind: FileType) -> DirEntry {
        DirEntry {
            name: OsString::from(format!("e{ino}")),
            backing: format!("b{ino}"),
            ino,
            kind,
        }
    }

    fn listing(inos: std::ops::Range<u64>) -> Vec<DirEntry> {
        inos.map(|i| entry(i, FileType::RegularFile)).collect()
    }

    #[test]
    fn reading_in_listing_order_asks_for_the_next_files_once() {
        let orders = ReadOrders::new(WINDOW);
        let mut entries = listing(100..130);
        entries.insert(3, entry(999, FileType::Directory)); // skipped
        orders.listed(&entries);
        assert_eq!(
            orders.next_after(100),
            (101..109).collect::<Vec<_>>(),
            "the first file starts it"
        );
        assert_eq!(orders.next_after(101), vec![109], "the window slides by one");
        assert_eq!(orders.next_after(102), vec![110]);
        assert_eq!(orders.next_after(999), Vec::<u64>::new(), "directories are not files");
        // Near the end the window stops at the last file.
        for ino in 104..127 {
            orders.next_after(ino);
        }
        assert_eq!(orders.next_after(127), Vec::<u64>::new());
    }

    #[test]
    fn other_orders_ask_for_nothing() {
        let orders = ReadOrders::new(WINDOW);
        orders.listed(&listing(0..100));
        for ino in [50, 10, 90, 89, 30, 70] {
            assert_eq!(orders.next_after(ino), Vec::<u64>::new(), "ino {ino}");
        }
        assert_eq!(orders.next_after(5000), Vec::<u64>::new(), "not listed");
        // A skip within the window still counts as reading in order.
        assert_eq!(orders.next_after(72), (73..81).collect::<Vec<_>>());
        assert_eq!(orders.next_after(0), Vec::<u64>::new(), "the first file, but not first");
    }

    #[test]
    fn a_new_listing_starts_over_and_old_ones_are_dropped_in_bulk() {
        let orders = ReadOrders::new(WINDOW);
        orders.listed(&listing(0..20));
        orders.next_after(0);
        orders.listed(&listing(0..20));
        assert_eq!(orders.next_after(1), Vec::<u64>::new(), "progress starts over");
        assert_eq!(orders.next_after(2).len(), WINDOW);
        let big = MAX_TRACKED as u64;
        orders.listed(&listing(big..2 * big - 5));
        orders.listed(&listing(2 * big..2 * big + 10)); // over the bound: the rest is forgotten
        orders.next_after(3);
        assert_eq!(
            orders.next_after(4),
            Vec::<u64>::new(),
            "the first listing was forgotten"
        );
        orders.next_after(big);
        assert_eq!(orders.next_after(big + 1), Vec::<u64>::new(), "so was the second");
        assert_eq!(orders.next_after(2 * big).len(), WINDOW);
    }

    #[test]
    fn the_window_is_the_mounts_and_zero_turns_it_off() {
        let off = ReadOrders::new(0);
        off.listed(&listing(0..20));
        assert_eq!(off.next_after(0), Vec::<u64>::new());
        assert_eq!(off.next_after(1), Vec::<u64>::new());
        let two = ReadOrders::new(2);
        two.listed(&listing(0..20));
        assert_eq!(two.next_after(0), vec![1, 2]);
        assert_eq!(two.next_after(1), vec![3]);
        assert_eq!(two.next_after(4), Vec::<u64>::new(), "a jump beyond the window");
    }
}
