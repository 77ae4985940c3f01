//! The audit log's state file (`<log>.state`, mode 0600): the audit key and
//! the anchor, the last record's number, MAC and end offset in the log.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::hmac;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{AuditError, GENESIS};
use crate::crypto::random_array;

const FORMAT: u32 = 1;

/// The HMAC-SHA256 key records are chained under.
pub struct AuditKey(Zeroizing<[u8; 32]>);

impl AuditKey {
    /// The MAC of `bytes`, in hex.
    pub fn mac(&self, bytes: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0[..]);
        crate::util::hex(hmac::sign(&key, bytes).as_ref())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub mac: String,
    /// Where the anchored record's line ends in the log.
    pub end: u64,
}

pub struct AuditState {
    pub key: AuditKey,
    pub anchor: Anchor,
}

#[derive(Deserialize)]
struct StateFile {
    format: u32,
    key: String,
    seq: u64,
    mac: String,
    end: u64,
}

pub fn state_path(log: &Path) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(".state");
    log.with_file_name(name)
}

fn corrupt(path: &Path, reason: impl Into<String>) -> AuditError {
    AuditError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl AuditState {
    /// Reads the state of the log at `log`.
    pub fn load(log: &Path) -> Result<Option<Self>, AuditError> {
        let path = state_path(log);
        // Never through a symlink: a planted link would hand in a key its planter knows.
        let read = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|mut f| {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut f, &mut text).map(|_| text)
            });
        let text = match read {
            Ok(text) => Zeroizing::new(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(AuditError::Io { path, source }),
        };
        let file: StateFile = serde_json::from_str(&text).map_err(|e| corrupt(&path, e.to_string()))?;
        let key = Zeroizing::new(file.key);
        if file.format != FORMAT {
            return Err(corrupt(&path, format!("unsupported state format {}", file.format)));
        }
        let key = unhex32(&key).ok_or_else(|| corrupt(&path, "the audit key is not 64 hex digits"))?;
        if unhex32(&file.mac).is_none() {
            return Err(corrupt(&path, "the anchored MAC is not 64 hex digits"));
        }
        Ok(Some(AuditState {
            key: AuditKey(Zeroizing::new(key)),
            anchor: Anchor {
                seq: file.seq,
                mac: file.mac,
                end: file.end,
            },
        }))
    }

    /// The state, created with a fresh key for a new log. A log whose state
    /// is gone cannot be verified any more: it is moved aside (its name is
    /// returned) and a new chain starts, whose first record says so.
    pub fn load_or_create(log: &Path) -> Result<(Self, Option<PathBuf>), AuditError> {
        if let Some(state) = Self::load(log)? {
            return Ok((state, None));
        }
        let orphaned = match std::fs::metadata(log) {
            Ok(m) if m.len() > 0 => {
                let mut name = log.file_name().unwrap_or_default().to_os_string();
                name.push(format!(
                    ".unverifiable-{}-{}",
                    crate::util::unix_now(),
                    crate::util::hex(&random_array::<4>())
                ));
                let aside = log.with_file_name(name);
                std::fs::rename(log, &aside).map_err(|source| AuditError::Io {
                    path: log.to_path_buf(),
                    source,
                })?;
                Some(aside)
            }
            _ => None,
        };
        let state = AuditState {
            key: AuditKey(Zeroizing::new(random_array::<32>())),
            anchor: Anchor {
                seq: 0,
                mac: GENESIS.to_string(),
                end: 0,
            },
        };
        state.save(log)?;
        Ok((state, orphaned))
    }

    pub fn save(&self, log: &Path) -> Result<(), AuditError> {
        let path = state_path(log);
        let key = Zeroizing::new(crate::util::hex(&self.key.0[..]));
        let text = Zeroizing::new(format!(
            "{{\"format\":{FORMAT},\"key\":\"{}\",\"seq\":{},\"mac\":\"{}\",\"end\":{}}}\n",
            key.as_str(),
            self.anchor.seq,
            self.anchor.mac,
            self.anchor.end
        ));
        crate::kms::locked_file::replace(&path, text.as_bytes(), 0o600, false)
            .map_err(|source| AuditError::Io { path, source })
    }
}
