//! `kmsfs audit`: the audit log, listed and verified; and where it is.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use kmsfs::audit::{AuditLog, Record, verify};

use super::{CliError, ExitCode, KeyOptions, secrets};

const JSON_HELP: &str = "Machine-readable output: JSON on stdout, and errors as JSON on stderr (log lines too)";

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    verify: Option<AuditCommand>,
    /// Only records about this key, as recorded: a local key's id (aliases are not resolved),
    /// an AWS key id/alias/ARN as the volume names it, Vault's MOUNT/KEY, PKCS#11's token=…;object=…
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// Only this action (GenerateDataKey, Decrypt, ReEncrypt, DescribeKey, CreateKey, DisableKey,
    /// ScheduleKeyDeletion, Mount, Unmount, Rotate, CryptoShred, …)
    #[arg(long, value_name = "ACTION")]
    action: Option<String>,
    /// Only records from this time on (UTC: YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ (the T may be a
    /// space, the Z left out) or @SECONDS)
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Only records before this time (same forms as --since)
    #[arg(long, value_name = "TIME")]
    until: Option<String>,
    /// Only operations that failed
    #[arg(long)]
    failed: bool,
    #[arg(long, help = JSON_HELP)]
    json: bool,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check every record's MAC, the chain of records, and that the log reaches its anchor.
    /// Exit 0: intact; 9: edited, inserted, reordered, removed or truncated records (each
    /// reported with its line), or the state file with the key and anchor is missing
    Verify {
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
}

/// The audit log's path: --audit-log / KMSFS_AUDIT_LOG, else `audit.jsonl`
/// beside the keystore (whether or not a keystore exists there).
pub fn log_path(keys: &KeyOptions) -> Result<PathBuf, CliError> {
    if let Some(path) = &keys.audit_log {
        return Ok(path.clone());
    }
    let keystore = secrets::keystore_path(keys)?;
    Ok(keystore.with_file_name("audit.jsonl"))
}

/// Makes the audit log this process records to; a log that cannot be
/// written stops the command before it does anything.
pub fn install(keys: &KeyOptions, command: &str) -> Result<(), CliError> {
    let path = log_path(keys)?;
    let log = AuditLog::open(&path, command).map_err(|e| {
        CliError::new(
            ExitCode::Io,
            format!("{e}; give a writable place with --audit-log or KMSFS_AUDIT_LOG"),
        )
    })?;
    kmsfs::audit::install(log);
    Ok(())
}

fn time_bound(text: &Option<String>, flag: &str) -> Result<Option<u64>, CliError> {
    text.as_deref()
        .map(|t| {
            kmsfs::util::parse_utc_date(t).ok_or_else(|| {
                CliError::new(
                    ExitCode::Usage,
                    format!("{flag} {t:?}: use YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ (UTC) or @SECONDS"),
                )
            })
        })
        .transpose()
}

fn line(r: &Record) -> String {
    let key = match (&r.provider, &r.key_id) {
        (Some(p), Some(k)) => format!(
            " {p}:{k}{}",
            r.key_version.map(|v| format!(" v{v}")).unwrap_or_default()
        ),
        _ => String::new(),
    };
    let volume = r.volume.as_deref().map(|v| format!(" volume {v}")).unwrap_or_default();
    let details = r.details.as_ref().map(|d| format!(" {d}")).unwrap_or_default();
    let error = r.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
    super::printable(&format!(
        "{:>6} {} {} {}{key}{volume} [{} uid {} pid {} {}]{details}{error}",
        r.seq, r.time, r.action, r.result, r.command, r.uid, r.pid, r.process
    ))
}

pub fn audit(args: AuditArgs, keys: &KeyOptions) -> Result<(), CliError> {
    let path = log_path(keys)?;
    if let Some(AuditCommand::Verify { json }) = args.verify {
        return verify_log(&path, json);
    }
    let (since, until) = (time_bound(&args.since, "--since")?, time_bound(&args.until, "--until")?);
    if let Some(action) = args.action.as_deref()
        && !kmsfs::audit::ACTIONS.iter().any(|a| a.eq_ignore_ascii_case(action))
    {
        return Err(CliError::new(
            ExitCode::Usage,
            format!(
                "--action {action:?}: no such action (known: {})",
                kmsfs::audit::ACTIONS.join(", ")
            ),
        ));
    }
    let records = verify::read(&path)?;
    // The listing shows records as they read now: say so when they fail verification.
    match verify::verify(&path) {
        Ok(report) if report.intact() => {}
        Ok(report) => log::warn!(
            "audit log {} fails verification ({} problem(s)); what follows may have been \
             changed: run `kmsfs audit verify`",
            path.display(),
            report.problems.len()
        ),
        Err(e) if records.is_empty() => log::debug!("audit log not verified: {e}"),
        Err(e) => log::warn!("audit log {} cannot be verified: {e}", path.display()),
    }
    let mut wanted = records.iter().filter(|listed| {
        let r = &listed.record;
        let at = kmsfs::util::parse_utc_date(&r.time);
        args.key.as_ref().is_none_or(|k| r.key_id.as_ref() == Some(k))
            && args.action.as_ref().is_none_or(|a| r.action.eq_ignore_ascii_case(a))
            && (!args.failed || r.result != "ok")
            && since.is_none_or(|s| at.is_some_and(|t| t >= s))
            && until.is_none_or(|u| at.is_some_and(|t| t < u))
    });
    // Written so that a reader that stops early (`| head`) ends the listing quietly.
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        let list: Vec<&verify::Listed> = wanted.collect();
        writeln!(out, "{}", serde_json::to_string(&list).unwrap_or_default())
    } else {
        wanted.try_for_each(|listed| writeln!(out, "{}", line(&listed.record)))
    };
    match written.and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            super::output::reader_gone();
            Ok(())
        }
        Err(e) => Err(CliError::new(
            ExitCode::Io,
            format!("the listing could not be written: {e}"),
        )),
        Ok(()) => Ok(()),
    }
}

fn verify_log(path: &std::path::Path, json: bool) -> Result<(), CliError> {
    let report = verify::verify(path).map_err(|e| CliError::new(ExitCode::AuditFailed, e.to_string()))?;
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "log": path,
                "intact": report.intact(),
                "valid_records": report.valid_records,
                "anchored_records": report.anchored_records,
                "problems": report.problems,
            })
        );
    } else if report.intact() {
        outln!(
            "Audit log {} is intact: {} records, chained and anchored",
            path.display(),
            report.valid_records
        );
    } else {
        for p in &report.problems {
            match p.line {
                0 => outln!("{}: {}", path.display(), p.what),
                line => outln!("{}:{line}: {}", path.display(), p.what),
            }
        }
    }
    if report.intact() {
        Ok(())
    } else {
        Err(CliError::new(
            ExitCode::AuditFailed,
            format!(
                "audit log {} fails verification: {} problem(s)",
                path.display(),
                report.problems.len()
            ),
        ))
    }
}
