//! Unlinks answered before the backing file is removed. Each unlink costs
//! the backing filesystem's unlink (a journal update) on top of the FUSE
//! round trip; the kernel also sends a SETATTR right after every UNLINK of
//! a regular file (the ctime it keeps under the writeback cache). Replying
//! first lets the backing work of one unlink overlap the round trips of the
//! next. The kernel's own dentries say what is gone meanwhile; the daemon
//! must only never show a removed name again, nor refuse a name for
//! being taken:
//!
//! * every request that names a directory with removals pending, as itself
//!   or as the parent of a name (lookup, create, rename, listing, getattr,
//!   rmdir of it …), waits for those answered before it (`settle`, called
//!   from `KmsFs::node`), and `statfs`, `fsyncdir`, LINK and unmount wait
//!   for all; link counts leave out the names answered removed;
//! * a removal that fails once the kernel was told it worked (the backing
//!   filesystem failed, or something changed the backing directory behind
//!   the mount) is logged, reported by the next `fsyncdir` of its directory,
//!   published for `status`, and makes `umount` exit non-zero;
//! * a crash loses only removals that no `fsync` of their directory made
//!   durable, as on any filesystem: the names are back after a remount, with
//!   their keys (a key is erased only after its file's backing unlink).
//!
//! Off by default (`deferred_unlink` turns it on): on this VM's disk it
//! bought no measurable time (DESIGN.md). Only a daemon running as root
//! defers (root's unlinks fail only when the backing filesystem does); a
//! daemon of a normal user, and mounts with `dirsync` or `sync`, remove
//! before replying.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use fuser::Errno;

/// Removals waiting at most; beyond that the unlink removes before replying
/// (memory stays bounded however fast names are removed).
const MAX_PENDING: usize = 4096;

/// One pending removal, from its unlink's reply to the end of its backing work.
pub struct Ticket {
    seq: u64,
    dir: u64,
    ino: u64,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    /// Removals answered and not yet done, by the order of their answers.
    outstanding: BTreeSet<u64>,
    /// Per parent directory (FUSE inode number): its latest removal still outstanding.
    latest_in_dir: HashMap<u64, u64>,
    /// Per inode: how many of its names are answered removed and still exist.
    names_going: HashMap<u64, u32>,
    /// Directories with a removal that failed after its reply, and why, until
    /// an fsyncdir of the directory reports it.
    failed: HashMap<u64, Errno>,
}

impl State {
    /// Whether every removal up to `seq` is done.
    fn done_up_to(&self, seq: u64) -> bool {
        self.outstanding.first().is_none_or(|&first| first > seq)
    }
}

#[derive(Default)]
pub struct PendingRemovals {
    /// Outstanding removals: the fast path of `settle` when there are none.
    total: AtomicUsize,
    state: Mutex<State>,
    done: Condvar,
}

impl PendingRemovals {
    /// Counts a removal of a name of inode `ino` in `dir` as pending; None
    /// if too many are (the caller then removes before replying).
    pub fn begin(&self, dir: u64, ino: u64) -> Option<Ticket> {
        let mut state = crate::util::lock(&self.state);
        if state.outstanding.len() >= MAX_PENDING {
            return None;
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.outstanding.insert(seq);
        state.latest_in_dir.insert(dir, seq);
        *state.names_going.entry(ino).or_insert(0) += 1;
        self.total.store(state.outstanding.len(), Ordering::Release);
        Some(Ticket { seq, dir, ino })
    }

    /// A pending removal is done (`failed`: with this error).
    pub fn end(&self, ticket: Ticket, failed: Option<Errno>) {
        let mut state = crate::util::lock(&self.state);
        if let Some(e) = failed {
            state.failed.insert(ticket.dir, e);
        }
        state.outstanding.remove(&ticket.seq);
        if state.latest_in_dir.get(&ticket.dir) == Some(&ticket.seq) {
            state.latest_in_dir.remove(&ticket.dir);
        }
        if let Some(going) = state.names_going.get_mut(&ticket.ino) {
            *going -= 1;
            if *going == 0 {
                state.names_going.remove(&ticket.ino);
            }
        }
        self.total.store(state.outstanding.len(), Ordering::Release);
        drop(state);
        self.done.notify_all();
    }

    /// Whether any removal is pending.
    pub fn any(&self) -> bool {
        self.total.load(Ordering::Acquire) != 0
    }

    /// Waits until every removal in `dir` answered so far is done (not for
    /// those answered meanwhile: a reader never waits for a whole bulk delete).
    pub fn settle(&self, dir: u64) {
        if !self.any() {
            return;
        }
        let state = crate::util::lock(&self.state);
        let Some(&target) = state.latest_in_dir.get(&dir) else {
            return;
        };
        self.wait_up_to(state, target);
    }

    /// Waits until every removal answered so far is done.
    pub fn settle_all(&self) {
        let state = crate::util::lock(&self.state);
        let Some(target) = state.next_seq.checked_sub(1) else {
            return;
        };
        self.wait_up_to(state, target);
    }

    fn wait_up_to(&self, state: std::sync::MutexGuard<'_, State>, seq: u64) {
        let _done = self
            .done
            .wait_while(state, |s| !s.done_up_to(seq))
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }

    /// How many names of inode `ino` are answered removed but still exist in
    /// the backing directory (its link count, as shown, leaves them out).
    pub fn names_going(&self, ino: u64) -> u32 {
        if !self.any() {
            return 0;
        }
        crate::util::lock(&self.state)
            .names_going
            .get(&ino)
            .copied()
            .unwrap_or(0)
    }

    /// The error of a removal in `dir` that failed after its reply, once.
    pub fn take_failure(&self, dir: u64) -> Option<Errno> {
        crate::util::lock(&self.state).failed.remove(&dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn waiting(
        pending: &Arc<PendingRemovals>,
        wait: impl FnOnce(&PendingRemovals) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let pending = Arc::clone(pending);
        let waiter = std::thread::spawn(move || wait(&pending));
        std::thread::sleep(Duration::from_millis(50));
        waiter
    }

    #[test]
    fn settle_waits_for_the_removals_of_its_directory_answered_before() {
        let pending = Arc::new(PendingRemovals::default());
        let a = pending.begin(7, 100).unwrap();
        let b = pending.begin(7, 101).unwrap();
        let other = pending.begin(9, 102).unwrap();
        pending.settle(8); // nothing pending there: returns at once
        let waiter = waiting(&pending, |p| p.settle(7));
        assert!(!waiter.is_finished(), "settled with two removals pending");
        // Removals answered after the wait began are not waited for.
        let later = pending.begin(7, 103).unwrap();
        pending.end(a, None);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "settled with one removal pending");
        pending.end(b, Some(Errno::EROFS));
        waiter.join().unwrap();
        assert_eq!(pending.take_failure(7), Some(Errno::EROFS));
        assert_eq!(pending.take_failure(7), None, "reported once");
        let all = waiting(&pending, PendingRemovals::settle_all);
        pending.end(later, None);
        assert!(!all.is_finished(), "settled all with one pending");
        pending.end(other, None);
        all.join().unwrap();
        assert!(!pending.any());
    }

    #[test]
    fn an_inode_counts_its_names_going() {
        let pending = PendingRemovals::default();
        let a = pending.begin(1, 50).unwrap();
        let b = pending.begin(2, 50).unwrap();
        assert_eq!(pending.names_going(50), 2);
        assert_eq!(pending.names_going(51), 0);
        pending.end(a, None);
        assert_eq!(pending.names_going(50), 1);
        pending.end(b, None);
        assert_eq!(pending.names_going(50), 0);
    }

    #[test]
    fn beyond_the_limit_removals_are_not_deferred() {
        let pending = PendingRemovals::default();
        let tickets: Vec<_> = (0..MAX_PENDING).map(|i| pending.begin(1, i as u64).unwrap()).collect();
        assert!(pending.begin(2, 0).is_none());
        drop(tickets);
    }
}
