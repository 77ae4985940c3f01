//! Small files that several processes rewrite (the keystore, the host
//! configuration): an exclusive lock held across read-modify-write, and an
//! atomic, durable replace through a temp file of the writer's own.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};

use crate::crypto::random_array;

/// An exclusive advisory lock on `<file>.lock`, released on drop. The lock
/// file is never removed: removing it would let two writers lock two
/// different files of the same name.
pub struct FileLock {
    _file: File,
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

/// Waits for the exclusive lock that guards rewrites of `path`.
pub fn lock(path: &Path) -> std::io::Result<FileLock> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(lock_path(path))?;
    // Held for a moment by whoever rewrites the file; but a holder that is
    // stopped (SIGSTOP, a debugger: a mount daemon writing its audit record)
    // holds it until continued, and a command must not wait for that in
    // silence or forever.
    let start = std::time::Instant::now();
    let mut said = false;
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(FileLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) if start.elapsed() < LOCK_WAIT => {
                if !said && start.elapsed() > std::time::Duration::from_secs(2) {
                    said = true;
                    log::warn!(
                        "waiting (up to {} s) for {}, which another process holds (a stopped kmsfs daemon \
                         holds it until `kill -CONT`)",
                        LOCK_WAIT.as_secs(),
                        lock_path(path).display()
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!(
                        "{} has been held by another process for {} s (a stopped kmsfs daemon, SIGSTOP, holds it \
                         until `kill -CONT`; `kmsfs status` names a stopped daemon)",
                        lock_path(path).display(),
                        LOCK_WAIT.as_secs()
                    ),
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How long a command waits for the lock of a file another process
/// rewrites. (Short in unit tests, to reach it.)
#[cfg(not(test))]
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
#[cfg(test)]
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Replaces `path` with `contents`: written to a uniquely named temp file in
/// the same directory, synced, renamed over `path`, and the directory synced,
/// so a crash leaves the old or the new file, never a mix. With `create_new`,
/// refuses (AlreadyExists) when `path` exists; call it under [`lock`].
pub fn replace(path: &Path, contents: &[u8], mode: u32, create_new: bool) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp-{}", crate::util::hex(&random_array::<8>())));
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        if create_new && path.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} already exists", path.display()),
            ));
        }
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_held_too_long_is_an_error_that_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let held = lock(&path).unwrap();
        let e = lock(&path).err().expect("a second holder waits, then gives up");
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        assert!(
            e.to_string().contains("audit.jsonl.lock") && e.to_string().contains("kill -CONT"),
            "{e}"
        );
        drop(held);
        assert!(lock(&path).is_ok());
    }

    #[test]
    fn concurrent_locked_updates_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("counter");
        replace(&path, b"0", 0o600, true).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        let _guard = lock(&path).unwrap();
                        let n: u32 = fs::read_to_string(&path).unwrap().parse().unwrap();
                        replace(&path, (n + 1).to_string().as_bytes(), 0o600, false).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), "200");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        assert_eq!(
            replace(&path, b"x", 0o600, true).unwrap_err().kind(),
            std::io::ErrorKind::AlreadyExists
        );
    }
}
