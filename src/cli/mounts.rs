//! The mount table, as /proc/self/mountinfo tells it.

use std::path::{Path, PathBuf};

use super::CliError;

pub struct MountEntry {
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: PathBuf,
    /// A FUSE mount's user and group (`user_id=`, `group_id=`): only they
    /// may reach it, unless it allows others.
    pub owner: Option<(u32, u32)>,
}

impl MountEntry {
    /// Without the mount helper the kernel records plain "fuse"; the source
    /// (the backing directory, holding the metadata DB) then tells it is ours.
    pub fn is_kmsfs(&self) -> bool {
        self.fstype == "fuse.kmsfs" || (self.fstype == "fuse" && self.source.join(kmsfs::volume::db::DB_FILE).exists())
    }

    /// Its daemon is gone: the mount point answers ENOTCONN. Root looks as
    /// the mount's owner, since to everyone else a FUSE mount that does
    /// not allow others answers EACCES, live or not.
    pub fn is_stale(&self) -> bool {
        let gone = |path: &Path| std::fs::metadata(path).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN));
        if gone(&self.mountpoint) {
            return true;
        }
        let Some((uid, gid)) = self.owner.filter(|(uid, _)| *uid != 0) else {
            return false;
        };
        if !rustix::process::geteuid().is_root() {
            return false;
        }
        // Credentials are per thread in Linux: this thread alone takes the
        // owner's, and ends.
        let path = self.mountpoint.clone();
        std::thread::spawn(move || {
            let as_owner = rustix::thread::set_thread_res_gid(
                rustix::process::Gid::from_raw(gid),
                rustix::process::Gid::from_raw(gid),
                rustix::process::Gid::from_raw(gid),
            )
            .and_then(|_| {
                rustix::thread::set_thread_res_uid(
                    rustix::process::Uid::from_raw(uid),
                    rustix::process::Uid::from_raw(uid),
                    rustix::process::Uid::from_raw(uid),
                )
            });
            as_owner.is_ok() && gone(&path)
        })
        .join()
        .unwrap_or(false)
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
        let option = |name: &str| {
            fields
                .get(dash + 3)?
                .split(',')
                .find_map(|o| o.strip_prefix(name))?
                .parse::<u32>()
                .ok()
        };
        out.push(MountEntry {
            mountpoint: PathBuf::from(unescape(fields[4])),
            fstype: fields[dash + 1].to_string(),
            source: PathBuf::from(unescape(fields[dash + 2])),
            owner: option("user_id=").zip(option("group_id=")),
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
