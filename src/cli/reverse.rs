//! `kmsfs mount --reverse PLAIN MOUNTPOINT`: the daemon serving a reverse
//! view. It shares the forward daemon's life cycle (daemonizing, signals,
//! audit records, the volume lock) but has no keys to commit.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use kmsfs::fs::MountOptions;
use kmsfs::reverse::exclude::Excludes;
use kmsfs::reverse::{ReverseFs, ReverseOptions};
use kmsfs::volume::Volume;
use kmsfs::volume::lock::{DaemonInfo, VolumeLock};

use super::daemon::{self, MountArgs};
use super::mount_point::mount_error;
use super::{CliError, ExitCode, KeyOptions};

pub fn serve(
    args: &MountArgs,
    keys: &KeyOptions,
    options: &MountOptions,
    plain: &Path,
    mountpoint: &Path,
) -> Result<(), CliError> {
    if mountpoint.starts_with(plain) {
        return Err(mount_error(format!(
            "mount point {} is inside the plaintext directory {}: the view would contain itself; \
             mount it elsewhere",
            mountpoint.display(),
            plain.display()
        )));
    }
    if options.idle.is_some() {
        return Err(CliError::new(
            ExitCode::Usage,
            "-o idle= is not supported with --reverse",
        ));
    }
    let dir = kmsfs::reverse::volume_dir(plain);
    if !plain.is_dir() {
        return Err(mount_error(format!("{} is not a directory", plain.display())));
    }
    if plain.join(kmsfs::volume::db::DB_FILE).exists() && !dir.exists() {
        return Err(CliError::new(
            ExitCode::Usage,
            format!(
                "{} is a volume (a copy of a reverse view, or a backing directory): mount it without --reverse",
                plain.display()
            ),
        ));
    }
    if !dir.join(kmsfs::volume::db::DB_FILE).exists() {
        return Err(CliError::new(
            ExitCode::Volume,
            format!(
                "{} has no reverse-view volume (no {}): run `kmsfs init --reverse {}` first",
                plain.display(),
                dir.display(),
                plain.display()
            ),
        ));
    }
    let excludes =
        Excludes::new(&args.exclude, &args.exclude_from).map_err(|e| CliError::new(ExitCode::Usage, e.to_string()))?;
    let row = kmsfs::volume::read_info(&dir)?.volume;
    let _ = daemon::MOUNTING.set(row.volume_id);
    let provider = super::volumes::provider_for(&dir, &row, keys)?;
    let lock = VolumeLock::acquire(&dir)?;
    lock.serving(mountpoint);
    let volume = Arc::new(Volume::open(&dir, provider)?);
    if volume.derived().is_none() {
        return Err(CliError::new(
            ExitCode::Volume,
            format!(
                "{}: the metadata DB has no derived keys; the volume is damaged",
                dir.display()
            ),
        ));
    }
    if let Err(e) = kmsfs::volume::rotate::rewrap_if_behind(&volume) {
        log::warn!("re-wrapping the volume key under the master key's newest version failed: {e}");
    }
    super::volumes::note_use(&**volume.keys().provider(), &dir);

    // No SQLite connection or PKCS#11 session may cross the fork.
    volume.db().disconnect();
    volume.keys().provider().before_fork();
    let sink = if args.foreground || args.log_file.is_some() {
        None
    } else {
        super::logging::daemon_sink(&row.volume_id)
    };
    let mut ready_pipe = if args.foreground {
        None
    } else {
        Some(daemon::daemonize()?)
    };
    if let Some(sink) = sink {
        super::logging::to(sink);
    }
    let report = daemon::report_to_parent;
    volume
        .db()
        .reconnect()
        .map_err(|e| report(&mut ready_pipe, kmsfs::volume::VolumeError::from(e).into()))?;
    lock.publish(&DaemonInfo {
        pid: std::process::id(),
        provider_calls: volume.total_provider_calls(),
        commit_error: None,
        problem: None,
        finishing: false,
        ..DaemonInfo::default()
    });
    let view = ReverseFs::new(
        Arc::clone(&volume),
        plain,
        ReverseOptions {
            ttl: options.fs.ttl,
            excludes,
        },
    )
    .map_err(|e| report(&mut ready_pipe, CliError::new(ExitCode::Io, e.to_string())))?;
    let session = kmsfs::reverse::mount(view, plain, mountpoint, options).map_err(|e| {
        report(
            &mut ready_pipe,
            mount_error(format!("cannot mount on {}: {e}", mountpoint.display())),
        )
    })?;
    let signals = daemon::stop_signals().map_err(|e| report(&mut ready_pipe, e))?;
    let detached = daemon::unmount_on_signal(signals, mountpoint, daemon::lazy_after(options)).map_err(|e| {
        report(
            &mut ready_pipe,
            CliError::new(ExitCode::Internal, format!("signal thread: {e}")),
        )
    })?;
    log::info!(
        "mounted the reverse view of {} on {}",
        plain.display(),
        mountpoint.display()
    );
    daemon::SERVING.store(true, Ordering::Relaxed);
    kmsfs::audit::record(
        super::volumes::event_for("Mount", plain, Some(&row.volume_id))
            .details(serde_json::json!({ "mountpoint": mountpoint, "reverse": true })),
    );
    if let Some(mut pipe) = ready_pipe.take() {
        let _ = pipe.write_all(daemon::READY);
    }
    super::systemd::ready(&format!(
        "serving the reverse view of {} on {}",
        plain.display(),
        mountpoint.display()
    ));
    let served = session.run();
    let outcome = match served {
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) && detached.load(Ordering::Relaxed) => Ok(()),
        other => other.map_err(|e| mount_error(format!("serving {}: {e}", mountpoint.display()))),
    };
    kmsfs::audit::record(
        super::volumes::event_for("Unmount", plain, Some(&row.volume_id))
            .outcome(&outcome.as_ref().map_err(|e| &e.message)),
    );
    lock.publish(&DaemonInfo {
        pid: std::process::id(),
        provider_calls: volume.total_provider_calls(),
        commit_error: None,
        problem: None,
        finishing: true,
        ..DaemonInfo::default()
    });
    volume.db().disconnect();
    // Released last: `kmsfs umount` returns once it is free.
    drop(lock);
    outcome
}
