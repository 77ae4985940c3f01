//! Free space on the backing filesystem. With the writeback cache a write
//! lands in the page cache and a full disk only shows when the kernel writes
//! it back: at `fsync` or `close`, which most programs (and every shell
//! redirection) never check. When free space runs low, files created from
//! then on are written through instead (FOPEN_DIRECT_IO), so the `write`
//! itself fails with ENOSPC, as on a local filesystem.

use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often free space is looked at again (a statvfs).
const RECHECK: Duration = Duration::from_millis(500);

/// How long after a logged lack-of-space error the next ones are only counted.
const FULL_LOG_QUIET: Duration = Duration::from_secs(10);

pub struct FreeSpace {
    backing: OwnedFd,
    /// Below this many free bytes, new files are written through.
    threshold: u64,
    started: Instant,
    /// Milliseconds since `started` of the last check.
    checked_at: AtomicU64,
    low: AtomicBool,
    /// When a lack-of-space error was last logged, and how many were not
    /// logged since.
    full_errors: Mutex<(Option<Instant>, u64)>,
}

impl FreeSpace {
    pub fn new(backing: OwnedFd, threshold: u64) -> Self {
        let space = FreeSpace {
            backing,
            threshold,
            started: Instant::now(),
            checked_at: AtomicU64::new(0),
            low: AtomicBool::new(false),
            full_errors: Mutex::new((None, 0)),
        };
        space.check();
        space
    }

    fn check(&self) {
        // Bytes an unprivileged writer may still use (root's reserve aside).
        let free = rustix::fs::fstatvfs(&self.backing).map(|s| s.f_bavail.saturating_mul(s.f_frsize));
        let low = free.is_ok_and(|free| free < self.threshold);
        if low != self.low.swap(low, Ordering::Relaxed) {
            if low {
                log::warn!(
                    "backing filesystem has less than {} MiB free: new files are written through",
                    self.threshold >> 20
                );
            } else {
                log::info!("backing filesystem has space again: new files use the writeback cache");
            }
        }
    }

    /// Whether free space is below the threshold (looked at again when the
    /// last look is older than half a second).
    pub fn is_low(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.checked_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= RECHECK.as_millis() as u64
            && self
                .checked_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.check();
        }
        self.low.load(Ordering::Relaxed)
    }

    /// Whether a lack-of-space error (ENOSPC, EDQUOT) is to be logged now:
    /// with the writeback cache every WRITE the kernel writes back to a full
    /// disk fails alike, so after one is logged the next ones within
    /// `FULL_LOG_QUIET` are only counted. Returns how many were not logged
    /// before this one.
    pub fn log_full_error(&self) -> Option<u64> {
        let mut state = crate::util::lock(&self.full_errors);
        let (last, unlogged) = &mut *state;
        if last.is_some_and(|at| at.elapsed() < FULL_LOG_QUIET) {
            *unlogged += 1;
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(unlogged))
    }

    /// How many lack-of-space errors were counted and not logged (for the
    /// summary at unmount).
    pub fn unlogged_full_errors(&self) -> u64 {
        std::mem::take(&mut crate::util::lock(&self.full_errors).1)
    }
}

/// Whether an error is the backing filesystem's lack of space.
pub fn is_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lack_of_space_errors_are_logged_once_then_counted() {
        let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
        let space = FreeSpace::new(dir.into(), 0);
        assert_eq!(space.log_full_error(), Some(0));
        assert_eq!(space.log_full_error(), None);
        assert_eq!(space.log_full_error(), None);
        assert_eq!(space.unlogged_full_errors(), 2);
        assert_eq!(space.unlogged_full_errors(), 0);
        // Once the quiet time is over the next one is logged with the count.
        space.log_full_error();
        crate::util::lock(&space.full_errors).0 = Instant::now().checked_sub(FULL_LOG_QUIET);
        assert_eq!(space.log_full_error(), Some(1));
    }
}
