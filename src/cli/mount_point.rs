//! The mount point a command is given: resolved without asking a daemon
//! that may be gone or stopped, and checked before a volume is opened.

use std::path::{Path, PathBuf};

use super::{CliError, ExitCode};

pub(super) fn mount_error(message: impl Into<String>) -> CliError {
    CliError::new(ExitCode::Mount, message)
}

pub(super) fn absolute(path: &Path, what: &str) -> Result<PathBuf, CliError> {
    std::fs::canonicalize(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => mount_error(format!("{what} {} does not exist", path.display())),
        _ if e.raw_os_error() == Some(libc::ENOTCONN) => stale_mount(path),
        _ => CliError::new(ExitCode::Io, format!("{what} {}: {e}", path.display())),
    })
}

/// What the kernel says of a FUSE mount whose daemon died (kill -9, a crash).
fn stale_mount(path: &Path) -> CliError {
    let lazy = if rustix::process::geteuid().is_root() {
        "umount -l"
    } else {
        "fusermount3 -uz"
    };
    mount_error(format!(
        "{p} is a stale kmsfs mount: its daemon is gone (killed or crashed). Clear it with \
         `kmsfs umount {p}` (or `{lazy} {p}`), then mount again; files not fsynced before the \
         daemon died may be missing (`kmsfs fsck` tells)",
        p = path.display()
    ))
}

/// A mount point that may be stale or hung: its directory made canonical
/// and its own name kept, so that nothing asks its daemon (a stale mount
/// point cannot be resolved, a hung one never answers).
pub(super) fn mount_point_path(path: &Path) -> Result<PathBuf, CliError> {
    let mut path = std::path::absolute(path)?;
    // A symlink to the mount point is followed (readlink of a mount point
    // itself asks its daemon nothing).
    for _ in 0..8 {
        match std::fs::read_link(&path) {
            Ok(target) => path = path.parent().unwrap_or(Path::new("/")).join(target),
            Err(_) => break,
        }
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) if name != ".." => Ok(absolute(dir, "directory of the mount point")?.join(name)),
        _ => match std::fs::canonicalize(&path) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(path),
            _ => absolute(&path, "mount point"),
        },
    }
}

/// Refuses a mount point that is not an empty directory, or that already
/// has something mounted on it, unless `-o nonempty`.
pub(super) fn check_mount_point(mountpoint: &Path, nonempty: bool) -> Result<(), CliError> {
    match std::fs::metadata(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return Err(stale_mount(mountpoint)),
        Ok(m) if m.is_dir() => {}
        _ => {
            return Err(mount_error(format!(
                "mount point {} is not a directory",
                mountpoint.display()
            )));
        }
    }
    if nonempty {
        return Ok(());
    }
    if let Some(m) = super::mounts::mounts()?
        .into_iter()
        .find(|m| m.mountpoint == mountpoint)
    {
        if m.is_kmsfs() {
            // Mounting over it would serve the same or another volume on
            // top; what the user wants is most likely that it stays.
            return Err(mount_error(format!(
                "{} is already a kmsfs mount point (of {}); unmount it first (`kmsfs umount {}`)",
                mountpoint.display(),
                m.source.display(),
                mountpoint.display()
            )));
        }
        return Err(mount_error(format!(
            "{} is already a mount point ({} of {}); unmount it first, or mount over it with -o nonempty",
            mountpoint.display(),
            m.fstype,
            m.source.display()
        )));
    }
    if std::fs::read_dir(mountpoint)?.next().is_some() {
        return Err(mount_error(format!(
            "mount point {} is not empty: its files would be hidden while mounted; use an empty directory, \
             or -o nonempty",
            mountpoint.display()
        )));
    }
    Ok(())
}

/// The mount point may be neither in the backing directory (the volume
/// would hold itself: its DB and files reached through its own mount) nor
/// above it (the backing directory hidden under the mount).
pub(super) fn check_apart(backing: &Path, mountpoint: &Path) -> Result<(), CliError> {
    let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (backing, mountpoint) = (real(backing), real(mountpoint));
    if mountpoint.starts_with(&backing) {
        return Err(mount_error(format!(
            "mount point {} is in the backing directory {}: mount it somewhere outside",
            mountpoint.display(),
            backing.display()
        )));
    }
    if backing.starts_with(&mountpoint) {
        return Err(mount_error(format!(
            "the backing directory {} is in the mount point {}: the mount would hide it; mount it somewhere \
             else",
            backing.display(),
            mountpoint.display()
        )));
    }
    Ok(())
}
