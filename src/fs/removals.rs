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
//!   rmdir of it …), waits for them first (`settle`, called from
//!   `KmsFs::node`), and `statfs`, `fsyncdir` and unmount wait for all;
//! * a removal that fails once the kernel was told it worked (the backing
//!   filesystem failed, or something changed the backing directory behind
//!   the mount) is logged, reported by the next `fsyncdir` of its directory,
//!   published for `status`, and makes `umount` exit non-zero;
//! * a crash loses only removals that no `fsync` of their directory made
//!   durable, as on any filesystem: the names are back after a remount, with
//!   their keys (a key is erased only after its file's backing unlink).
//!
//! Only a daemon running as root defers (root's unlinks fail only when the
//! backing filesystem does); a daemon of a normal user, and mounts with
//! `sync_unlink`, `dirsync` or `sync`, remove before replying.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

use fuser::Errno;

/// Removals waiting at most; beyond that the unlink removes before replying
/// (memory stays bounded however fast names are removed).
const MAX_PENDING: usize = 4096;

#[derive(Default)]
struct State {
    /// Pending removals per parent directory (FUSE inode number).
    by_dir: HashMap<u64, usize>,
    /// Directories with a removal that failed after its reply, and why, until
    /// an fsyncdir of the directory reports it.
    failed: HashMap<u64, Errno>,
}

#[derive(Default)]
pub struct PendingRemovals {
    /// All pending removals: the fast path of `settle` when there are none.
    total: AtomicUsize,
    state: Mutex<State>,
    done: Condvar,
}

impl PendingRemovals {
    /// Counts a removal in `dir` as pending; false if too many are (the
    /// caller then removes before replying).
    pub fn begin(&self, dir: u64) -> bool {
        let mut state = crate::util::lock(&self.state);
        if self.total.load(Ordering::Relaxed) >= MAX_PENDING {
            return false;
        }
        *state.by_dir.entry(dir).or_insert(0) += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// A pending removal in `dir` is done (`failed`: with this error).
    pub fn end(&self, dir: u64, failed: Option<Errno>) {
        let mut state = crate::util::lock(&self.state);
        if let Some(e) = failed {
            state.failed.insert(dir, e);
        }
        if let Some(count) = state.by_dir.get_mut(&dir) {
            *count -= 1;
            if *count == 0 {
                state.by_dir.remove(&dir);
            }
        }
        self.total.fetch_sub(1, Ordering::Relaxed);
        drop(state);
        self.done.notify_all();
    }

    /// Whether any removal is pending.
    pub fn any(&self) -> bool {
        self.total.load(Ordering::Acquire) != 0
    }

    /// Waits until no removal in `dir` is pending.
    pub fn settle(&self, dir: u64) {
        if !self.any() {
            return;
        }
        let state = crate::util::lock(&self.state);
        let _settled = self
            .done
            .wait_while(state, |s| s.by_dir.contains_key(&dir))
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }

    /// Waits until no removal is pending anywhere.
    pub fn settle_all(&self) {
        let state = crate::util::lock(&self.state);
        let _settled = self
            .done
            .wait_while(state, |s| !s.by_dir.is_empty())
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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

    #[test]
    fn settle_waits_for_its_directory_only() {
        let pending = Arc::new(PendingRemovals::default());
        assert!(pending.begin(7));
        assert!(pending.begin(7));
        assert!(pending.begin(9));
        pending.settle(8); // nothing pending there: returns at once
        let waiter = {
            let pending = Arc::clone(&pending);
            std::thread::spawn(move || pending.settle(7))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "settled with two removals pending");
        pending.end(7, None);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "settled with one removal pending");
        pending.end(7, Some(Errno::EROFS));
        waiter.join().unwrap();
        assert_eq!(pending.take_failure(7), Some(Errno::EROFS));
        assert_eq!(pending.take_failure(7), None, "reported once");
        pending.end(9, None);
        pending.settle_all();
        assert_eq!(pending.total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn beyond_the_limit_removals_are_not_deferred() {
        let pending = PendingRemovals::default();
        for _ in 0..MAX_PENDING {
            assert!(pending.begin(1));
        }
        assert!(!pending.begin(2));
    }
}
