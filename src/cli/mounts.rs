//! The mount table, as /proc/self/mountinfo tells it.

use std::path::{Path, PathBuf};

use super::CliError;

pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: PathBuf,
}

impl MountEntry {
    /// Without the mount helper the kernel records plain "fuse"; the source
    /// (the backing directory, holding the metadata DB) then tells it is ours.
    pub fn is_kmsfs(&self) -> bool {
        self.fstype == "fuse.kmsfs" || (self.fstype == "fuse" && self.source.join(kmsfs::volume::db::DB_FILE).exists())
    }
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

pub fn mounts() -> Result<Vec<MountEntry>, CliError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut out = Vec::new();
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < dash + 3 || fields.len() < 5 {
            continue;
        }
        out.push(MountEntry {
            mountpoint: PathBuf::from(unescape(fields[4])),
            fstype: fields[dash + 1].to_string(),
            source: PathBuf::from(unescape(fields[dash + 2])),
        });
    }
    Ok(out)
}

/// The innermost mount containing `path` (which must be absolute and canonical).
pub fn mount_containing(path: &Path) -> Result<Option<MountEntry>, CliError> {
    Ok(mounts()?
        .into_iter()
        .filter(|m| path.starts_with(&m.mountpoint))
        .max_by_key(|m| m.mountpoint.as_os_str().len()))
}
