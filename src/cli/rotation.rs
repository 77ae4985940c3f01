//! `kmsfs rotate`, `kmsfs rewrap` and `kmsfs key …`.

use std::path::Path;

use kmsfs::volume::rotate;

use super::{CliError, KeyOptions, volumes};

pub fn rotate(backing: &Path, keys: &KeyOptions, json: bool) -> Result<(), CliError> {
    let volume = volumes::open_volume(backing, keys)?;
    let progress = super::progress::Progress::new("re-wrapping file keys", json);
    let report = rotate::rotate(&volume, &mut |done, total| progress.update(done, total))?;
    progress.finish();
    volumes::note_use(&**volume.keys().provider(), backing);
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

pub fn rewrap(backing: &Path, keys: &KeyOptions, json: bool) -> Result<(), CliError> {
    let volume = volumes::open_volume(backing, keys)?;
    let report = rotate::rewrap_volume_keys(&volume)?;
    volumes::note_use(&**volume.keys().provider(), backing);
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
