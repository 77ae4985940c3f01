//! `kmsfs rekey`: fresh data keys for files whose key may have leaked.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kmsfs::crypto::random_array;
use kmsfs::util::hex;
use kmsfs::volume::Volume;
use kmsfs::volume::lock::VolumeLock;
use kmsfs::volume::rekey::{finish_copy, kill_hook, rekey_backing_file};

use super::{CliError, ExitCode, KeyOptions, mounts, volumes};

enum Location {
    /// On a mounted kmsfs volume: re-key through the mount.
    Mounted,
    /// In the backing directory rooted here.
    Backing(PathBuf),
}

fn locate(path: &Path) -> Result<Location, CliError> {
    if mounts::mount_containing(path)?.is_some_and(|m| m.is_kmsfs()) {
        return Ok(Location::Mounted);
    }
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d.join(kmsfs::volume::db::DB_FILE).is_file() {
            return Ok(Location::Backing(d.to_path_buf()));
        }
        dir = d.parent();
    }
    Err(CliError::new(
        ExitCode::Volume,
        format!("{} is not on a kmsfs volume or in a backing directory", path.display()),
    ))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CliError + '_ {
    move |e| CliError::new(ExitCode::Io, format!("{}: {e}", path.display()))
}

/// The processes (pid, name) that have `path` open or mapped, among those
/// this user may look at: their writes after a rename over it would go to
/// the old copy, and be lost.
fn openers(path: &Path) -> Vec<(u32, String)> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    // A mapping is named by device and inode in /proc/PID/maps.
    let mapped_as = fs::metadata(path).ok().map(|m| {
        (
            format!("{:02x}:{:02x}", libc::major(m.dev()), libc::minor(m.dev())),
            m.ino().to_string(),
        )
    });
    let me = std::process::id();
    let holds = |pid: u32| {
        // readlink only: a stat through another process's descriptor could
        // wait on a filesystem that hangs.
        let open = fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|target| target == path));
        open || mapped_as.as_ref().is_some_and(|(dev, ino)| {
            fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|maps| {
                maps.lines().any(|l| {
                    let fields: Vec<&str> = l.split_whitespace().collect();
                    fields.get(3) == Some(&dev.as_str()) && fields.get(4) == Some(&ino.as_str())
                })
            })
        })
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && holds(pid))
        .map(|pid| {
            let name = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, name.trim().to_string())
        })
        .collect()
}

/// What says a file changed: (size, mtime, ctime).
fn version_of(meta: &fs::Metadata) -> (u64, i64, i64, i64, i64) {
    (
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

/// Copies the file under a temporary name (the daemon gives the copy a new
/// data key), then renames it over the original: atomic per file. A file
/// another process has open is refused (it would go on writing to the old
/// copy), and one that changes during the copy is left as it is.
fn rekey_through_mount(path: &Path) -> Result<u64, CliError> {
    let meta = fs::symlink_metadata(path).map_err(io(path))?;
    if !meta.file_type().is_file() {
        return Err(CliError::new(
            ExitCode::Usage,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.nlink() > 1 {
        return Err(CliError::new(
            ExitCode::Usage,
            format!(
                "{} has {} hard links; re-keying one name would split them",
                path.display(),
                meta.nlink()
            ),
        ));
    }
    let refuse_open = || {
        let open = openers(path);
        if open.is_empty() {
            return Ok(());
        }
        let who: Vec<String> = open.iter().map(|(pid, name)| format!("{name} (pid {pid})")).collect();
        Err(CliError::new(
            ExitCode::Mount,
            format!(
                "{} is open in {}: re-keying replaces the file, and writes through a descriptor opened \
                 before would go to the old copy and be lost; re-key it once they have closed it",
                super::printable(&path.display().to_string()),
                who.join(", ")
            ),
        ))
    };
    refuse_open()?;
    let parent = path
        .parent()
        .ok_or_else(|| CliError::new(ExitCode::Usage, "no parent directory"))?;
    let tmp = parent.join(format!(".kmsfs-rekey-{}", hex(&random_array::<8>())));
    let result = (|| {
        let mut src = File::open(path).map_err(io(path))?;
        let mut dst = OpenOptions::new()
            .write(true)
            .create_new(true)
            // Owner-only until done: a read-only mode would refuse the
            // xattrs copied onto it; finish_copy gives it the original's.
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        let bytes = std::io::copy(&mut src, &mut dst).map_err(io(path))?;
        let len = rustix::fs::listxattr_query(path).unwrap_or(0);
        let mut names = vec![0u8; len];
        let n = rustix::fs::listxattr(path, &mut names[..]).unwrap_or(0);
        let kept = |name: &&[u8]| name.starts_with(b"user.") || *name == kmsfs::volume::xattrs::ACL_ACCESS;
        for name in names[..n].split(|&b| b == 0).filter(kept) {
            let name = String::from_utf8_lossy(name).into_owned();
            let size = rustix::fs::getxattr_query(path, name.as_str()).map_err(|e| io(path)(e.into()))?;
            let mut value = vec![0u8; size];
            let got = rustix::fs::getxattr(path, name.as_str(), &mut value[..]).map_err(|e| io(path)(e.into()))?;
            rustix::fs::setxattr(&tmp, name.as_str(), &value[..got], rustix::fs::XattrFlags::empty())
                .map_err(|e| io(&tmp)(e.into()))?;
        }
        finish_copy(&meta, &dst).map_err(io(&tmp))?;
        kill_hook("before-rename");
        // Written or opened meanwhile: the copy may lack what was written.
        let now = fs::symlink_metadata(path).map_err(io(path))?;
        if version_of(&now) != version_of(&meta) {
            return Err(CliError::new(
                ExitCode::Mount,
                format!(
                    "{} changed while it was copied: left as it was; re-key it when nothing writes it",
                    super::printable(&path.display().to_string())
                ),
            ));
        }
        refuse_open()?;
        fs::rename(&tmp, path).map_err(io(path))?;
        File::open(parent).and_then(|d| d.sync_all()).map_err(io(parent))?;
        Ok(bytes)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A volume open for offline re-keying, with its lock (it cannot be mounted meanwhile).
type OpenVolume = Option<(PathBuf, Volume, VolumeLock)>;

/// Re-keys each path in turn; one that fails does not stop the others
/// (each is named), and the exit status is the first failure's.
pub fn rekey(paths: &[PathBuf], keys: &KeyOptions, json: bool) -> Result<(), CliError> {
    let mut open: OpenVolume = None;
    let mut report = Vec::new();
    let mut failures: Vec<CliError> = Vec::new();
    for path in paths {
        let outcome = rekey_one(path, &mut open, keys);
        audit_rekey(&outcome, &open);
        match outcome {
            Ok(outcome) => {
                if !json {
                    outln!("re-keyed {} ({} bytes)", path.display(), outcome["bytes"]);
                }
                report.push(outcome);
            }
            Err(e) => {
                if json {
                    report.push(serde_json::json!({"path": path, "error": {
                        "code": e.code.name(), "exit_status": e.code as i32, "message": e.message}}));
                } else if paths.len() > 1 {
                    log::error!("{}", e.message);
                }
                failures.push(e);
            }
        }
    }
    if json {
        outln!("{}", serde_json::Value::Array(report));
    }
    match failures.len() {
        0 => Ok(()),
        1 if paths.len() == 1 => Err(failures.remove(0)),
        n => Err(CliError::new(
            failures[0].code,
            format!("{n} of {} paths were not re-keyed (each is named above)", paths.len()),
        )),
    }
}

/// One Rekey record per path: the volume and file ids when known, and for
/// a failure its kind only (error messages name the file, which the audit
/// log never does).
fn audit_rekey(outcome: &Result<serde_json::Value, CliError>, open: &OpenVolume) {
    // The volume is named only when this path was re-keyed in it (offline).
    let offline = outcome.as_ref().is_ok_and(|o| o["via"] == "backing");
    let event = match open {
        Some((root, _, _)) if offline => volumes::volume_event("Rekey", root),
        _ => kmsfs::audit::Event::new("Rekey"),
    };
    let event = match outcome {
        Ok(o) => {
            let mut details = o.clone();
            if let Some(map) = details.as_object_mut() {
                map.remove("path");
            }
            event.details(details)
        }
        Err(_) => event,
    };
    let result: Result<(), String> = match outcome {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("failed: {} error (exit {})", e.code.name(), e.code as i32)),
    };
    kmsfs::audit::record(event.outcome(&result));
}

fn rekey_one(path: &Path, open: &mut OpenVolume, keys: &KeyOptions) -> Result<serde_json::Value, CliError> {
    let abs = fs::canonicalize(path).map_err(io(path))?;
    let location = locate(&abs)?;
    if abs.is_dir() {
        // Each file is re-keyed alone (atomically): which ones is the caller's choice.
        let how = match location {
            Location::Mounted => format!(
                "for every file under it: find {} -type f -exec kmsfs rekey {{}} +",
                super::shell_quoted(path)
            ),
            // Not in a backing directory, which holds the DB and the IV files too.
            Location::Backing(_) => "name its files through the volume's mount".into(),
        };
        return Err(CliError::new(
            ExitCode::Usage,
            format!(
                "{} is a directory: rekey takes files ({how})",
                super::printable(&path.display().to_string())
            ),
        ));
    }
    Ok(match location {
        Location::Mounted => {
            let bytes = rekey_through_mount(&abs)?;
            serde_json::json!({"path": path, "via": "mount", "bytes": bytes})
        }
        Location::Backing(root) => {
            if open.as_ref().is_none_or(|(r, _, _)| *r != root) {
                let lock = VolumeLock::acquire(&root).map_err(|e| {
                    CliError::new(ExitCode::Mount, format!("{e}; re-key through its mount point instead"))
                })?;
                let volume = volumes::open_volume(&root, keys)?;
                *open = Some((root, volume, lock));
            }
            let (_, volume, _) = open
                .as_ref()
                .ok_or_else(|| CliError::new(ExitCode::Internal, "no volume"))?;
            let outcome = rekey_backing_file(volume, &abs)?;
            serde_json::json!({"path": path, "via": "backing", "bytes": outcome.bytes,
                "old_file_id": outcome.old_file_id, "new_file_id": outcome.new_file_id})
        }
    })
}
