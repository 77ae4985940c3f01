//! The audit log: one JSON line per key operation kmsfs performs or asks a
//! key provider for (administration and use, failures included) and per
//! volume event (mount, unmount, rotate, rewrap, rekey, crypto-shred).
//!
//! Records are chained: each carries its sequence number and the MAC of the
//! one before it, and a MAC (HMAC-SHA256) over its own bytes under the audit
//! key. The audit key and the last record's number, MAC and end offset (the
//! anchor) live in a state file beside the log, readable by its owner alone.
//! `verify` then finds an edited, inserted, reordered or removed record, and
//! a truncated log, and says where. Format: docs/FORMAT.md "Audit log".
//!
//! The log is process-wide (installed once by the command line) so that the
//! volume layer and the key providers record without being handed it; a
//! library user that installs none records nothing.

mod state;
pub mod verify;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};

use sha2::Digest;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use state::{Anchor, AuditState};

/// Domain separation for the record MAC.
const MAC_DOMAIN: &[u8] = b"kmsfs-audit-v1\0";
/// What a record's `prev` holds when it is the first.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One record, in the order its fields are written. The MAC follows as the
/// last field, over the bytes of everything before it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub seq: u64,
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub time: String,
    pub uid: u32,
    pub pid: u32,
    /// The process's name (`/proc/self/comm`).
    pub process: String,
    /// The kmsfs command (`mount`, `rotate`, `key disable`, …).
    pub command: String,
    /// What was done: `GenerateDataKey`, `Decrypt`, `DisableKey`, `Mount`, …
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    /// The encryption context the provider was asked with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<BTreeMap<String, String>>,
    /// The volume's backing directory, for volume events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Action-specific facts (versions, counts, file ids; never names or keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    /// `ok` or `error`.
    pub result: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The MAC of the record before (hex), [`GENESIS`] for the first.
    pub prev: String,
}

/// What a caller knows of an event; the log adds who, when and the chain.
#[derive(Debug, Clone, Default)]
pub struct Event {
    action: String,
    provider: Option<String>,
    key_id: Option<String>,
    key_version: Option<u32>,
    context: Option<BTreeMap<String, String>>,
    volume: Option<String>,
    details: Option<serde_json::Value>,
    error: Option<String>,
}

impl Event {
    pub fn new(action: &str) -> Self {
        Event {
            action: action.to_string(),
            ..Event::default()
        }
    }

    pub fn provider(mut self, kind: &str, key_id: &str) -> Self {
        self.provider = Some(kind.to_string());
        self.key_id = Some(key_id.to_string());
        self
    }

    pub fn key_version(mut self, version: Option<u32>) -> Self {
        self.key_version = version;
        self
    }

    pub fn context<'a>(mut self, pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Self {
        self.context = Some(pairs.map(|(k, v)| (k.to_string(), v.to_string())).collect());
        self
    }

    pub fn volume(mut self, backing: &Path) -> Self {
        self.volume = Some(backing.display().to_string());
        self
    }

    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    /// The outcome: an error's message (never a secret: kmsfs errors carry none).
    pub fn outcome<T, E: std::fmt::Display>(mut self, result: &Result<T, E>) -> Self {
        self.error = result.as_ref().err().map(|e| e.to_string());
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("audit log {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// An audit log on disk: `path` (the records) and `path.state` (key and anchor).
pub struct AuditLog {
    path: PathBuf,
    command: String,
}

static INSTALLED: OnceLock<AuditLog> = OnceLock::new();
/// The first append that failed in this process: the command reports it in
/// its exit status, since what it did went unrecorded.
static FAILED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Every action a record may name (`kmsfs audit --action` checks against it).
pub const ACTIONS: &[&str] = &[
    "GenerateDataKey",
    "Decrypt",
    "ReEncrypt",
    "DescribeKey",
    "ListKeys",
    "CreateKey",
    "DisableKey",
    "EnableKey",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "DeleteKey",
    "RotateKey",
    "RotateKeyOnDemand",
    "EnableKeyRotation",
    "DisableKeyRotation",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
    "TrimKeyVersions",
    "GetParametersForImport",
    "ImportKeyMaterial",
    "DeleteImportedKeyMaterial",
    "ChangeKeystoreProtection",
    "UnlockKeystore",
    "CreateVolume",
    "Mount",
    "Unmount",
    "Rotate",
    "Rewrap",
    "Rekey",
    "CryptoShred",
    "AuditLogRestarted",
    "DiscardedTail",
];

/// Makes `log` the process's audit log (the first call wins).
pub fn install(log: AuditLog) {
    let _ = INSTALLED.set(log);
}

/// Why an append failed in this process, if one did.
pub fn failure() -> Option<String> {
    crate::util::lock(&FAILED).clone()
}

/// Appends `event` to the process's audit log. A failure to record is
/// logged as an error and does not undo what was done (the operation has
/// happened; kmsfs says so rather than hide it).
pub fn record(event: Event) {
    if let Some(log) = INSTALLED.get()
        && let Err(e) = log.append(event)
    {
        log::error!("could not append to the audit log: {e}");
        crate::util::lock(&FAILED).get_or_insert_with(|| e.to_string());
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn process_name() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

/// A record's line: its JSON with the MAC added as the last field.
fn seal_line(key: &state::AuditKey, record: &Record) -> Result<(String, String), serde_json::Error> {
    let body = serde_json::to_string(record)?;
    let mac = key.mac(&[MAC_DOMAIN, body.as_bytes()].concat());
    let line = format!("{},\"mac\":\"{mac}\"}}", &body[..body.len() - 1]);
    Ok((line, mac))
}

/// Splits a line into the record's bytes (as they were MACed) and its MAC.
pub(crate) fn split_line(line: &str) -> Option<(String, &str)> {
    let cut = line.len().checked_sub(",\"mac\":\"\"}".len() + 64)?;
    let (body, tail) = (line.get(..cut)?, line.get(cut..)?);
    let mac = tail.strip_prefix(",\"mac\":\"")?.strip_suffix("\"}")?;
    (mac.len() == 64 && mac.bytes().all(|b| b.is_ascii_hexdigit())).then(|| (format!("{body}}}"), mac))
}

impl AuditLog {
    /// The log at `path`, for records made by `command`. Creates its
    /// directory, its key and its state file if they do not exist yet, and
    /// opens the log, so that a log that cannot be written is found before
    /// anything is done.
    pub fn open(path: &Path, command: &str) -> Result<Self, AuditError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
        let log = AuditLog {
            path: path.to_path_buf(),
            command: command.to_string(),
        };
        log.locked(|_| Ok(()))?;
        Ok(log)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record, durably, and moves the anchor to it.
    pub fn append(&self, event: Event) -> Result<(), AuditError> {
        self.locked(|writer| writer.write(event))
    }

    /// Runs `f` under the log's lock with the log open and its tail settled:
    /// a state file that vanished starts a new chain (its first record says
    /// so), and what lies after the anchor is adopted or set aside.
    fn locked<T>(&self, f: impl FnOnce(&mut Writer<'_>) -> Result<T, AuditError>) -> Result<T, AuditError> {
        let _lock = crate::kms::locked_file::lock(&self.path).map_err(io(&self.path))?;
        let (state, restarted) = AuditState::load_or_create(&self.path)?;
        let mut writer = Writer {
            log: self,
            file: self.open_for_append()?,
            state,
        };
        writer.settle_tail()?;
        if let Some(aside) = restarted {
            log::warn!(
                "audit log {}: its state file was missing, so it could not be verified; moved to {} and a new log started",
                self.path.display(),
                aside.display()
            );
            writer.write(Event::new("AuditLogRestarted").details(serde_json::json!({
                "reason": "the state file (key and anchor) was missing",
                "previous_log": aside.display().to_string(),
            })))?;
        }
        f(&mut writer)
    }

    /// The log, opened to append; never through a symbolic link (a link
    /// planted in its directory would send records into another file).
    fn open_for_append(&self) -> Result<std::fs::File, AuditError> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)
            .map_err(io(&self.path))?;
        if !file.metadata().map_err(io(&self.path))?.is_file() {
            return Err(AuditError::Corrupt {
                path: self.path.clone(),
                reason: "not a regular file".into(),
            });
        }
        Ok(file)
    }
}

/// The log under its lock: the open file and the state read for it.
struct Writer<'a> {
    log: &'a AuditLog,
    file: std::fs::File,
    state: AuditState,
}

impl Writer<'_> {
    fn len(&self) -> Result<u64, AuditError> {
        Ok(self.file.metadata().map_err(io(&self.log.path))?.len())
    }

    fn write(&mut self, event: Event) -> Result<(), AuditError> {
        let path = &self.log.path;
        let len = self.len()?;
        let record = Record {
            seq: self.state.anchor.seq + 1,
            time: crate::util::utc_date(crate::util::unix_now()),
            uid: rustix::process::getuid().as_raw(),
            pid: std::process::id(),
            process: process_name(),
            command: self.log.command.clone(),
            action: event.action,
            provider: event.provider,
            key_id: event.key_id,
            key_version: event.key_version,
            context: event.context,
            volume: event.volume,
            details: event.details,
            result: if event.error.is_some() { "error" } else { "ok" }.to_string(),
            error: event.error,
            prev: self.state.anchor.mac.clone(),
        };
        let (line, mac) = seal_line(&self.state.key, &record).map_err(|e| AuditError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        // A log cut short mid-line (it is shorter than its anchor, which
        // verify reports) gets this record on a line of its own.
        let torn = len > 0 && {
            let mut last = [0u8; 1];
            self.file
                .seek(SeekFrom::Start(len - 1))
                .and_then(|_| self.file.read_exact(&mut last))
                .map_err(io(path))?;
            last[0] != b'\n'
        };
        let text = format!("{}{line}\n", if torn { "\n" } else { "" });
        self.file.write_all(text.as_bytes()).map_err(io(path))?;
        self.file.sync_data().map_err(io(path))?;
        self.state.anchor = Anchor {
            seq: record.seq,
            mac,
            end: len + text.len() as u64,
        };
        self.state.save(path)
    }

    /// What lies after the anchor: whole records that continue the chain
    /// (written by a process that crashed before moving the anchor) join
    /// it; anything else (a line a crash cut short, bytes appended by
    /// someone else) is cut off and a DiscardedTail record keeps its size
    /// and SHA-256, so the log verifies again and the cut is on record.
    fn settle_tail(&mut self) -> Result<(), AuditError> {
        let path = &self.log.path;
        let len = self.len()?;
        if len <= self.state.anchor.end {
            return Ok(());
        }
        let mut tail = Vec::new();
        self.file
            .seek(SeekFrom::Start(self.state.anchor.end))
            .and_then(|_| self.file.read_to_end(&mut tail))
            .map_err(io(path))?;
        let mut adopted = 0usize;
        for line in tail.split_inclusive(|&b| b == b'\n') {
            let Some(text) = line.strip_suffix(b"\n").and_then(|l| std::str::from_utf8(l).ok()) else {
                break;
            };
            let Some((body, mac)) = split_line(text) else { break };
            let Ok(record) = serde_json::from_str::<Record>(&body) else {
                break;
            };
            let expected = self.state.key.mac(&[MAC_DOMAIN, body.as_bytes()].concat());
            if expected != mac || record.seq != self.state.anchor.seq + 1 || record.prev != self.state.anchor.mac {
                break;
            }
            adopted += line.len();
            self.state.anchor = Anchor {
                seq: record.seq,
                mac: mac.to_string(),
                end: self.state.anchor.end + line.len() as u64,
            };
        }
        if adopted > 0 {
            self.state.save(path)?;
        }
        let rest = &tail[adopted..];
        if rest.is_empty() {
            return Ok(());
        }
        let digest = crate::util::hex(&sha2::Sha256::digest(rest));
        let bytes = rest.len();
        self.file.set_len(self.state.anchor.end).map_err(io(path))?;
        self.file.sync_data().map_err(io(path))?;
        log::warn!(
            "audit log {}: {bytes} byte(s) after its last record were not a record (a write cut short by a crash, \
             or bytes added); removed, and recorded with their SHA-256",
            path.display()
        );
        self.write(Event::new("DiscardedTail").details(serde_json::json!({ "bytes": bytes, "sha256": digest })))
    }
}

#[cfg(test)]
mod tests;
