//! `kmsfs fsck`: the report, the progress bar and fsck's exit codes.

use std::path::Path;

use kmsfs::volume::fsck::{FsckOptions, fsck as check};
use kmsfs::volume::lock::VolumeLock;

use super::{CliError, ExitCode, KeyOptions, volumes};

/// fsck's own exit codes (other failures use the usual ones).
pub const CLEAN: i32 = 0;
pub const PROBLEMS_FOUND: i32 = 10;
pub const ALL_REPAIRED: i32 = 11;
pub const PROBLEMS_REMAIN: i32 = 12;

pub fn fsck(backing: &Path, keys: &KeyOptions, opts: FsckOptions, json: bool) -> Result<i32, CliError> {
    // Not a volume: said before a lock file is left in someone's directory.
    if !backing.is_dir() {
        return Err(CliError::new(
            ExitCode::Volume,
            format!(
                "{} is not a directory: fsck takes a volume's backing directory",
                backing.display()
            ),
        ));
    }
    if std::fs::symlink_metadata(backing.join("kmsfs.db")).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
        return Err(kmsfs::volume::not_a_volume(backing).into());
    }
    let _lock = VolumeLock::acquire(backing).map_err(|e| match e {
        held @ kmsfs::volume::lock::LockError::Held { .. } => {
            CliError::new(ExitCode::Mount, format!("{held}; unmount it before fsck"))
        }
        other => CliError::from(other),
    })?;
    let volume = volumes::open_volume(backing, keys)?;
    let progress = super::progress::Progress::new("checking blocks", json);
    let report = check(&volume, opts, &|done, total| progress.update(done, total))?;
    progress.finish();
    let repair = opts.repair || opts.salvage;
    let code = if report.problems.is_empty() {
        CLEAN
    } else if !repair {
        PROBLEMS_FOUND
    } else if report.unrepaired() == 0 {
        ALL_REPAIRED
    } else {
        PROBLEMS_REMAIN
    };
    if json {
        let mut value = serde_json::to_value(&report).unwrap_or_default();
        value["exit_code"] = code.into();
        outln!("{value}");
        return Ok(code);
    }
    outln!(
        "checked {} directories, {} files ({} blocks), {} symlinks; metadata DB: {}",
        report.directories,
        report.files,
        report.blocks,
        report.symlinks,
        super::printable(&report.db_integrity)
    );
    for p in &report.problems {
        // The backing directory itself is the volume's root.
        let path = p
            .path
            .as_deref()
            .map(|p| format!(" ({})", if p.is_empty() { "/" } else { p }))
            .unwrap_or_default();
        let repair = match &p.repair {
            Some(r) => format!(" -> {r}"),
            None if repair => " -> not repaired".to_string(),
            None => String::new(),
        };
        // Names and details come from the backing directory: shown escaped.
        outln!(
            "{}: {}{}: {}{repair}",
            p.kind,
            super::printable(&p.backing),
            super::printable(&path),
            super::printable(&p.detail)
        );
    }
    // Files in lost+found this run salvaged (`--salvage`): said, not counted as problems.
    for p in report.quarantined.iter().filter(|p| p.kind != "orphan_key") {
        if let Some(done) = &p.repair {
            let path = p.path.as_deref().map(|p| format!(" ({p})")).unwrap_or_default();
            outln!(
                "in lost+found: {}{}: {} -> {}",
                super::printable(&p.backing),
                super::printable(&path),
                super::printable(&p.detail),
                super::printable(done)
            );
        }
    }
    let kept_keys = report.quarantined.iter().filter(|p| p.kind == "orphan_key").count();
    let kept_files = report.quarantined.len() - kept_keys;
    if kept_files > 0 {
        outln!("{kept_files} damaged file(s) kept in lost+found from an earlier repair");
    }
    if kept_keys > 0 {
        outln!(
            "{kept_keys} key(s) no file uses kept: damaged files without a readable id may be theirs (a repair \
             erases them once those files are gone)"
        );
    }
    match code {
        CLEAN => outln!("no problems"),
        PROBLEMS_FOUND => outln!(
            "{} problem(s); run with --repair to fix what can be fixed",
            report.problems.len()
        ),
        ALL_REPAIRED => outln!("{} problem(s), all repaired", report.problems.len()),
        _ => outln!(
            "{} problem(s), {} not repairable",
            report.problems.len(),
            report.unrepaired()
        ),
    }
    Ok(code)
}
