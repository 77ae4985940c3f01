//! The kernel's per-mount writeback and readahead limits (the mount's
//! "backing device info" under /sys/class/bdi). FUSE starts every mount with
//! a strict 1% share of the dirty-page budget and 128 KiB of readahead,
//! which throttles a writer long before the disk is busy and cuts cold
//! sequential reads into small requests. Only root may change them; for
//! anyone else the defaults stay and the daemon says so in its log.

use std::path::Path;

/// What to set; `None` leaves the kernel's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BdiTuning {
    /// Percentage of the system's dirty-page budget this mount may use.
    pub max_ratio: Option<u32>,
    /// Whether this mount is throttled on its own share even when the
    /// system as a whole is below its dirty limits.
    pub strict_limit: Option<bool>,
    pub read_ahead_kb: Option<u32>,
}

/// Only readahead is raised by default: a larger dirty-page share made
/// sequential writes with a final fsync slower here (more dirty data left
/// for the fsync, less writeback overlapped with writing; see DESIGN.md).
impl Default for BdiTuning {
    fn default() -> Self {
        BdiTuning {
            max_ratio: None,
            strict_limit: None,
            read_ahead_kb: Some(1024),
        }
    }
}

/// Applies `tuning` to the mount at `mountpoint` (which must be mounted).
pub fn tune(mountpoint: &Path, tuning: &BdiTuning) {
    let Some(device) = mount_device(mountpoint) else {
        log::info!(
            "no mountinfo entry for {}; kernel limits left alone",
            mountpoint.display()
        );
        return;
    };
    let settings = [
        ("max_ratio", tuning.max_ratio),
        ("strict_limit", tuning.strict_limit.map(u32::from)),
        ("read_ahead_kb", tuning.read_ahead_kb),
    ];
    for (name, value) in settings {
        let Some(value) = value else { continue };
        let path = format!("/sys/class/bdi/{device}/{name}");
        match std::fs::write(&path, value.to_string()) {
            Ok(()) => log::debug!("{path} = {value}"),
            Err(e) => log::info!("cannot set {path} to {value} ({e}); keeping the kernel's value"),
        }
    }
}

/// The `major:minor` of the newest mount at `mountpoint`, from
/// /proc/self/mountinfo (reading it needs no request to this daemon, unlike
/// a stat of the mount point).
fn mount_device(mountpoint: &Path) -> Option<String> {
    let wanted = escape_mountinfo(mountpoint.to_str()?);
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .rev()
        .find(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
        .and_then(|line| line.split(' ').nth(2))
        .map(str::to_string)
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn escape_mountinfo(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            ' ' => out.push_str("\\040"),
            '\t' => out.push_str("\\011"),
            '\n' => out.push_str("\\012"),
            '\\' => out.push_str("\\134"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(escape_mountinfo("/mnt/a b\\c"), "/mnt/a\\040b\\134c");
    }

    #[test]
    fn finds_the_root_mount() {
        let device = mount_device(Path::new("/")).expect("/ is mounted");
        let (major, minor) = device.split_once(':').expect("major:minor");
        assert!(major.parse::<u32>().is_ok() && minor.parse::<u32>().is_ok(), "{device}");
    }
}
