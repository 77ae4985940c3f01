//! `kmsfs umount`, and the unmount the daemon itself does on a signal or
//! when idle: umount2 as root, fusermount3 for a normal user.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kmsfs::volume::lock::{DaemonInfo, VolumeLock};

use super::mount_point::{mount_error, mount_point_path};
use super::{CliError, ExitCode};

/// Unmounts `mountpoint` now, or fails (EBUSY while in use): umount2 as
/// root, fusermount3 otherwise.
pub(super) fn unmount_now(mountpoint: &Path) -> std::io::Result<()> {
    unmount(mountpoint, false)
}

/// Unmounts `mountpoint`; `lazy`: detached even while in use (MNT_DETACH),
/// the daemon serving its open files until the last one closes.
pub(super) fn unmount(mountpoint: &Path, lazy: bool) -> std::io::Result<()> {
    // Never through a symlink swapped in for the mount point since it was
    // resolved: that would unmount something else.
    let flags = rustix::mount::UnmountFlags::NOFOLLOW
        | if lazy {
            rustix::mount::UnmountFlags::DETACH
        } else {
            rustix::mount::UnmountFlags::empty()
        };
    match rustix::mount::unmount(mountpoint, flags) {
        Ok(()) => return Ok(()),
        Err(rustix::io::Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    let out = std::process::Command::new("fusermount3")
        .arg(if lazy { "-uz" } else { "-u" })
        .arg(mountpoint)
        .stderr(std::process::Stdio::piped())
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&out.stderr);
    Err(if said.contains("busy") {
        std::io::Error::from_raw_os_error(libc::EBUSY)
    } else {
        std::io::Error::other(said.trim().to_string())
    })
}

/// Keeps a daemon that cannot commit file keys mounted: it holds them and
/// retries, and they would be lost if it had to save them to a backing
/// filesystem that is failing (full, read-only) on its way out.
fn refuse_while_keys_uncommitted(mountpoint: &Path, daemon: Option<&DaemonInfo>) -> Result<(), CliError> {
    match daemon.and_then(|daemon| daemon.commit_error.clone()) {
        Some(error) => Err(CliError::new(
            ExitCode::Io,
            format!(
                "not unmounting {}: its daemon cannot commit the keys of files written since its last \
                 commit ({}); it keeps them and retries. Fix the cause it names (a key provider it \
                 cannot reach; a backing filesystem that is full or read-only) and run `kmsfs umount` \
                 again once `kmsfs status` shows no failure; `kmsfs umount --force` unmounts now, and the files whose keys cannot be \
                 saved are lost",
                mountpoint.display(),
                super::printable(&error)
            ),
        )),
        None => Ok(()),
    }
}

/// The kmsfs mount at exactly `mountpoint`.
fn mounted(mountpoint: &Path) -> Result<Option<super::mounts::MountEntry>, CliError> {
    let Some(mount) = super::mounts::mounts()?
        .into_iter()
        .find(|m| m.mountpoint == mountpoint)
    else {
        return Ok(None);
    };
    if !mount.is_kmsfs() {
        return Err(mount_error(format!(
            "{} is not a kmsfs mount ({})",
            mountpoint.display(),
            mount.fstype
        )));
    }
    Ok(Some(mount))
}

/// The one kmsfs mount of backing directory `backing` (a path that is no
/// mount point), as `status`, `rotate` and `fsck` take either.
fn mounted_from(backing: &Path) -> Result<(PathBuf, super::mounts::MountEntry), CliError> {
    let source = std::fs::canonicalize(backing).unwrap_or_else(|_| backing.to_path_buf());
    // Another user's mount can claim any source (`fsname=`): only the
    // caller's own count, unless root.
    let me = rustix::process::geteuid();
    let mut of_it: Vec<_> = super::mounts::mounts()?
        .into_iter()
        .filter(|m| m.is_kmsfs() && m.source == source)
        .filter(|m| me.is_root() || m.owner.is_none_or(|(uid, _)| uid == me.as_raw()))
        .collect();
    match of_it.len() {
        0 => Err(mount_error(format!("{} is not mounted", backing.display()))),
        1 => {
            let mount = of_it.remove(0);
            Ok((mount.mountpoint.clone(), mount))
        }
        _ => Err(mount_error(format!(
            "{} is mounted at {}: name the mount point to unmount",
            backing.display(),
            of_it
                .iter()
                .map(|m| m.mountpoint.display().to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        ))),
    }
}

pub fn umount(mountpoint: &Path, force: bool) -> Result<(), CliError> {
    let given = mount_point_path(mountpoint)?;
    let (mountpoint, mount) = match mounted(&given) {
        Ok(Some(mount)) => (given, mount),
        Ok(None) => mounted_from(&given)?,
        // A backing directory that is itself the top of another filesystem.
        Err(e) => mounted_from(&given).map_err(|_| e)?,
    };
    let me = rustix::process::geteuid();
    if let Some((owner, _)) = mount.owner
        && !me.is_root()
        && owner != me.as_raw()
    {
        return Err(mount_error(format!(
            "{} was mounted by user {owner}: only they or root can unmount it",
            mountpoint.display()
        )));
    }
    // A stale mount (its daemon died) has no daemon to wait for; the volume
    // may meanwhile be mounted elsewhere by another.
    let stale = mount.is_stale();
    let owner = mount.owner.map(|(uid, _)| uid);
    let backing = mount.source;
    let serving = if stale {
        None
    } else {
        VolumeLock::serving_at(&mountpoint, owner)
    };
    let (mut volume, _) = super::volumes::volume_dir(&backing);
    if !volume.join(kmsfs::volume::db::DB_FILE).exists()
        && let Some(found) = serving.as_ref().and_then(|daemon| daemon.backing.as_ref())
    {
        // The source names no volume (`fsname=`, moved): the daemon's record does.
        volume = super::volumes::volume_dir(found).0;
    }
    // The daemon as it is now, to wait for it and find its last word.
    let daemon = if stale {
        None
    } else {
        // The record of the daemon serving this very mount point first: the
        // directory at the mount's source may have been swapped since.
        serving.clone().or_else(|| VolumeLock::daemon(&volume, owner))
    };
    if !force {
        if !stale && daemon.is_none() {
            return Err(CliError::new(
                ExitCode::Io,
                format!(
                    "not unmounting {}: its daemon cannot be found from here (no record of it that this \
                     user can read, and no daemon holds the lock file of {}), so whether its file keys are \
                     committed is unknown; run `kmsfs umount` as the user who mounted it, or \
                     `kmsfs umount --force`",
                    mountpoint.display(),
                    volume.display()
                ),
            ));
        }
        refuse_while_keys_uncommitted(&mountpoint, daemon.as_ref())?;
    }
    if let Err(err) = unmount_now(&mountpoint) {
        let hint = if err.raw_os_error() == Some(libc::EBUSY) {
            " (a process is using it: see `fuser -m`)"
        } else {
            ""
        };
        return Err(mount_error(format!(
            "cannot unmount {}: {err}{hint}",
            mountpoint.display()
        )));
    }
    if stale {
        return Ok(());
    }
    let Some(daemon) = daemon else {
        return Ok(());
    };
    if kmsfs::util::process_stopped(daemon.pid) {
        log::warn!(
            "unmounted {}, but {}; waiting up to 60 s for it to exit",
            mountpoint.display(),
            kmsfs::util::stopped_daemon(daemon.pid)
        );
    }
    if !VolumeLock::wait_exited(&volume, &daemon, owner, Duration::from_secs(60)) {
        if kmsfs::util::process_stopped(daemon.pid) {
            return Err(mount_error(format!(
                "unmounted {}, but {}; it commits its last file keys and exits once continued",
                mountpoint.display(),
                kmsfs::util::stopped_daemon(daemon.pid)
            )));
        }
        // Its last keys are not known to be committed: say where to look
        // once it is done (it may be waiting for a slow key provider).
        return Err(mount_error(format!(
            "unmounted {}, but its daemon (pid {}) has not exited after 60 s: it may still be committing its \
             last file keys or waiting for the key provider; once it has exited, `kmsfs status {}` says \
             whether keys were left in kmsfs.pending-keys for the next mount",
            mountpoint.display(),
            daemon.pid,
            volume.display()
        )));
    }
    let last = VolumeLock::last_published(&volume, &daemon, owner);
    if let Some(error) = last.as_ref().and_then(|info| info.problem.clone()) {
        return Err(CliError::new(
            ExitCode::Io,
            format!("unmounted {}, but: {}", mountpoint.display(), super::printable(&error)),
        ));
    }
    if let Some(error) = last.and_then(|info| info.commit_error) {
        return Err(CliError::new(
            ExitCode::Io,
            format!("unmounted {}, but: {}", mountpoint.display(), super::printable(&error)),
        ));
    }
    Ok(())
}
