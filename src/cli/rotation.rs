//! `kmsfs rotate`, `kmsfs rewrap` and `kmsfs key …`.

use std::path::Path;

use kmsfs::volume::rotate;

use super::{CliError, KeyOptions, volumes};

pub fn rotate(backing: &Path, keys: &KeyOptions, json: bool) -> Result<(), CliError> {
    let result = rotate_volume(backing, keys, json);
    let event = volumes::volume_event("Rotate", backing);
    let event = match &result {
        Ok(report) => event.details(serde_json::json!({
            "new_version": report.new_version,
            "rewrapped_file_keys": report.rewrapped_file_keys,
            "retired_versions": report.retired_versions,
        })),
        Err(_) => event,
    };
    kmsfs::audit::record(event.outcome(&result.as_ref().map_err(|e| &e.message)));
    let report = result?;
    if json {
        outln!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else if volumes::volume_dir(backing).1 {
        outln!(
            "Rotated the reverse view of {} to volume key v{} with new derived keys: every file, name and \
             directory IV in the view has new ciphertext, so the next backup copies everything (copies \
             made before still open with the keys in their own kmsfs.db)",
            backing.display(),
            report.new_version
        );
    } else {
        let retired: Vec<String> = report.retired_versions.iter().map(|v| format!("v{v}")).collect();
        outln!(
            "{} volume key v{}: {} file keys re-wrapped in {:.2} s; retired {} (blobs erased); no file data rewritten",
            if report.resumed {
                "Resumed rotation to"
            } else {
                "Rotated to"
            },
            report.new_version,
            report.rewrapped_file_keys,
            report.seconds,
            if retired.is_empty() {
                "nothing".to_string()
            } else {
                retired.join(", ")
            },
        );
    }
    Ok(())
}

fn rotate_volume(backing: &Path, keys: &KeyOptions, json: bool) -> Result<rotate::RotationReport, CliError> {
    let (dir, reverse) = volumes::volume_dir(backing);
    if reverse {
        return rotate_reverse(&dir, keys);
    }
    // It would wait for the daemon to load the new version, then undo.
    if let Some(daemon) = kmsfs::volume::lock::VolumeLock::daemon(backing, None)
        .filter(|d| !d.finishing && kmsfs::util::process_stopped(d.pid))
    {
        return Err(CliError::new(
            super::ExitCode::Mount,
            format!(
                "the volume is mounted, but {}: a rotation needs it to load the new volume key; resume it \
                 first",
                kmsfs::util::stopped_daemon(daemon.pid)
            ),
        ));
    }
    let volume = volumes::open_volume(backing, keys)?;
    let progress = super::progress::Progress::new("re-wrapping file keys", json);
    let report = rotate::rotate(&volume, &mut |done, total| progress.update(done, total))?;
    progress.finish();
    volumes::note_use(&**volume.keys().provider(), backing);
    Ok(report)
}

/// A reverse view's volume, while no view of it is mounted (its daemon
/// would go on serving the old keys).
fn rotate_reverse(dir: &Path, keys: &KeyOptions) -> Result<rotate::RotationReport, CliError> {
    let _lock = kmsfs::volume::lock::VolumeLock::acquire(dir).map_err(|e| {
        CliError::new(
            super::ExitCode::Mount,
            format!("{e}; a reverse view is rotated while it is not mounted: unmount it first"),
        )
    })?;
    let volume = volumes::open_volume(dir, keys)?;
    let report = rotate::rotate_reverse(&volume)?;
    volumes::note_use(&**volume.keys().provider(), dir);
    Ok(report)
}

pub fn rewrap(backing: &Path, keys: &KeyOptions, json: bool) -> Result<(), CliError> {
    let (dir, _) = volumes::volume_dir(backing);
    let result = volumes::open_volume(&dir, keys).and_then(|volume| {
        let report = rotate::rewrap_volume_keys(&volume)?;
        volumes::note_use(&**volume.keys().provider(), &dir);
        Ok(report)
    });
    let event = volumes::volume_event("Rewrap", backing);
    let event = match &result {
        Ok(report) => event.details(serde_json::json!({ "rewrapped_volume_keys": report.rewrapped_volume_keys })),
        Err(_) => event,
    };
    kmsfs::audit::record(event.outcome(&result.as_ref().map_err(|e| &e.message)));
    let report = result?;
    if json {
        outln!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        outln!(
            "Re-wrapped {} volume key version(s) under the master key's newest version ({} provider calls); no file touched",
            report.rewrapped_volume_keys.len(),
            report.provider_calls
        );
    }
    Ok(())
}
