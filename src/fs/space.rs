//! Free space on the backing filesystem. With the writeback cache a write
//! lands in the page cache and a full disk only shows when the kernel writes
//! it back: at `fsync` or `close`, which most programs (and every shell
//! redirection) never check. When free space runs low, files created from
//! then on are written through instead (FOPEN_DIRECT_IO), so the `write`
//! itself fails with ENOSPC, as on a local filesystem.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often free space is looked at again (a statvfs).
const RECHECK: Duration = Duration::from_millis(500);

pub struct FreeSpace {
    backing: OwnedFd,
    /// Below this many free bytes, new files are written through.
    threshold: u64,
    started: Instant,
    /// Milliseconds since `started` of the last check.
    checked_at: AtomicU64,
    low: AtomicBool,
}

impl FreeSpace {
    pub fn new(backing: OwnedFd, threshold: u64) -> Self {
        let space = FreeSpace {
            backing,
            threshold,
            started: Instant::now(),
            checked_at: AtomicU64::new(0),
            low: AtomicBool::new(false),
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
}
