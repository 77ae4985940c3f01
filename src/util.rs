//! Helpers every layer uses: hex, the wall clock, and locks that survive a
//! panicked holder (a request thread that panicked must not take the whole
//! mount down with a poisoned lock; the data behind each lock stays
//! consistent because no holder leaves it half-changed).

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Seconds since the Unix epoch (0 for a clock set before it). Test builds
/// read `KMSFS_TEST_NOW` instead when it is set (scheduled key deletion).
pub fn unix_now() -> u64 {
    if let Some(now) = crate::test_hooks::number("KMSFS_TEST_NOW") {
        return now;
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
