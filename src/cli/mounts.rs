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

    /// Its daemon is gone: the mount point answers ENOTCONN. Asked by a
    /// child process given 2 s (a daemon that is stopped or hung never
    /// answers, and is not gone), which root has take the mount owner's
    /// credentials: to everyone else a FUSE mount that does not allow
    /// others answers EACCES, live or not.
    pub fn is_stale(&self) -> bool {
        let owner = self
            .owner
            .filter(|(uid, _)| *uid != 0 && rustix::process::geteuid().is_root());
        gone_as(&self.mountpoint, owner)
    }
}

/// Whether `path` answers ENOTCONN, to user `uid` (group `gid`, no others)
/// if given: asked by a child process that does nothing else (its memory
/// is a copy of ours: it makes itself non-dumpable right after taking
/// their ids, so that user cannot read it), given 2 s, then killed.
fn gone_as(path: &Path, creds: Option<(u32, u32)>) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: the child makes only system calls (no allocation, no locks)
    // and leaves with _exit; `path` was made before the fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            let failed = match creds {
                Some((uid, gid)) => {
                    libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                        || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                        || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
                        || libc::prctl(libc::PR_SET_DUMPABLE, 0) != 0
                }
                None => false,
            };
            if failed {
                libc::_exit(2);
            }
            let mut st: libc::stat = std::mem::zeroed();
            let gone = libc::stat(path.as_ptr(), &mut st) != 0 && *libc::__errno_location() == libc::ENOTCONN;
            libc::_exit(if gone { 0 } else { 1 });
        }
    }
    if pid < 0 {
        return false;
    }
    let start = std::time::Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child, writing its status into `status`.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if done == pid {
            return libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        }
        if done < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        if done < 0 {
            return false;
        }
        if start.elapsed() > std::time::Duration::from_secs(2) {
            // SAFETY: our child (not reaped yet, so its pid is still ours),
            // killed; reaped once it died (its FUSE request wait is
            // killable), up to 2 s: until then it holds the mount, and an
            // unmount right after this look would fail busy. One that cannot
            // die is left to init.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            for _ in 0..400 {
                if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != 0 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
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
