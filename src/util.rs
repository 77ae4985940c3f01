//! Helpers every layer uses: hex, the wall clock, and locks that survive a
//! panicked holder (a request thread that panicked must not take the whole
//! mount down with a poisoned lock; the data behind each lock stays
//! consistent because no holder leaves it half-changed).

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Milliseconds since the Unix epoch, from the real clock (orders records).
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

/// This user's home: `$HOME` if absolute, else the account database's.
pub fn home() -> Option<std::path::PathBuf> {
    std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .filter(|h| h.is_absolute())
        .or_else(|| home_of(rustix::process::geteuid().as_raw()))
}

/// Makes `dir` if it is not there; it must be this user's alone (a record
/// or log kept there must not be one someone else chose).
pub fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != rustix::process::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "{} is not a directory of this user's alone",
            dir.display()
        )));
    }
    Ok(())
}

/// This user's state directory: `$XDG_STATE_HOME`, else `~/.local/state`.
pub fn state_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("XDG_STATE_HOME")
        .map(std::path::PathBuf::from)
        .filter(|d| d.is_absolute())
        .or_else(|| home().map(|home| home.join(".local/state")))
}

/// The home directory the account database gives user `uid`.
pub fn home_of(uid: u32) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0u8; 16 << 10];
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes the entry into `entry` and its strings into
    // `buf` (whose length it is given), and sets `found` to `&entry` or null.
    let rc = unsafe { libc::getpwuid_r(uid, &mut entry, buf.as_mut_ptr().cast(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() || entry.pw_dir.is_null() {
        return None;
    }
    // SAFETY: pw_dir points to a NUL-terminated string inside `buf`.
    let dir = unsafe { std::ffi::CStr::from_ptr(entry.pw_dir) };
    let dir = std::path::PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes()));
    dir.is_absolute().then_some(dir)
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

/// A UTC date and time, as `date -u +%FT%TZ` prints it.
pub fn utc_date(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Seconds since the epoch of a UTC date: `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SSZ`
/// (the `T` may be a space, the `Z` left out) or `@SECONDS`.
pub fn parse_utc_date(text: &str) -> Option<u64> {
    if let Some(secs) = text.strip_prefix('@') {
        return secs.parse().ok();
    }
    let text = text.strip_suffix('Z').unwrap_or(text);
    let (date, time) = match text.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let number = |s: &str, len: usize| {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<i64>().ok())
            .flatten()
    };
    let mut parts = date.split('-');
    let (y, m, d) = (
        number(parts.next()?, 4)?,
        number(parts.next()?, 2)?,
        number(parts.next()?, 2)?,
    );
    if parts.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let (hh, mm, ss) = match time {
        None => (0, 0, 0),
        Some(t) => {
            let mut t = t.split(':');
            let hms = (number(t.next()?, 2)?, number(t.next()?, 2)?, number(t.next()?, 2)?);
            if t.next().is_some() || hms.0 > 23 || hms.1 > 59 || hms.2 > 60 {
                return None;
            }
            hms
        }
    };
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    let secs = u64::try_from(secs).ok()?;
    (utc_date(secs).get(..10) == Some(&format!("{:04}-{:02}-{:02}", if m <= 2 { y + 1 } else { y }, m, d)))
        .then_some(secs)
}

/// Whether process `pid` is stopped (SIGSTOP, or a debugger): everything
/// its mount serves waits, though the process is alive.
pub fn process_stopped(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE …": COMM may hold spaces and parentheses.
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .is_some_and(|state| matches!(state, 'T' | 't'))
}

/// What to tell about a stopped daemon `pid`.
pub fn stopped_daemon(pid: u32) -> String {
    format!("its daemon (pid {pid}) is stopped (SIGSTOP; `kill -CONT {pid}` resumes it)")
}

#[cfg(test)]
mod tests {
    use super::{parse_utc_date, utc_date};

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(utc_date(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_date(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_date(1_796_165_400), "2026-12-01T22:50:00Z");
    }

    #[test]
    fn dates_parse_back() {
        for secs in [0, 951_782_400, 1_796_165_400, 4_102_444_799] {
            assert_eq!(parse_utc_date(&utc_date(secs)), Some(secs));
        }
        assert_eq!(parse_utc_date("2000-02-29"), Some(951_782_400));
        assert_eq!(parse_utc_date("2026-12-01 22:50:00"), Some(1_796_165_400));
        assert_eq!(parse_utc_date("@12"), Some(12));
        for bad in [
            "2001-02-29",
            "2026-13-01",
            "26-12-01",
            "2026-12-01T25:00:00Z",
            "yesterday",
            "",
        ] {
            assert_eq!(parse_utc_date(bad), None, "{bad}");
        }
    }
}
