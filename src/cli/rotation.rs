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
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        let retired: Vec<String> = report.retired_versions.iter().map(|v| format!("v{v}")).collect();
        println!(
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
    let volume = volumes::open_volume(backing, keys)?;
    let progress = super::progress::Progress::new("re-wrapping file keys", json);
    let report = rotate::rotate(&volume, &mut |done, total| progress.update(done, total))?;
    progress.finish();
    volumes::note_use(&**volume.keys().provider(), backing);
    Ok(report)
}

pub fn rewrap(backing: &Path, keys: &KeyOptions, json: bool) -> Result<(), CliError> {
    let result = volumes::open_volume(backing, keys).and_then(|volume| {
        let report = rotate::rewrap_volume_keys(&volume)?;
        volumes::note_use(&**volume.keys().provider(), backing);
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
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        println!(
            "Re-wrapped {} volume key version(s) under the master key's newest version ({} provider calls); no file touched",
            report.rewrapped_volume_keys.len(),
            report.provider_calls
        );
    }
    Ok(())
}
