//! Reading the audit log back: every record with its line, and the check of
//! the chain against the key and the anchor.

use std::path::Path;

use serde::Serialize;

use super::state::AuditState;
use super::{AuditError, GENESIS, MAC_DOMAIN, Record, split_line};

/// One thing wrong with the log, and where.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line of the log (0: the log as a whole).
    pub line: usize,
    pub what: String,
}

#[derive(Debug, Serialize)]
pub struct Verification {
    /// Records whose MAC and place in the chain are right.
    pub valid_records: u64,
    /// The anchor: how many records the state file says were written.
    pub anchored_records: u64,
    pub problems: Vec<Problem>,
}

impl Verification {
    pub fn intact(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A record as read back, with its MAC.
#[derive(Debug, Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub record: Record,
    pub mac: String,
}

/// The log's records as written; lines that are not records are skipped
/// (`verify` reports them).
pub fn read(log: &Path) -> Result<Vec<Listed>, AuditError> {
    Ok(lines(log)?
        .iter()
        .filter_map(|line| {
            let (body, mac) = split_line(line)?;
            Some(Listed {
                record: serde_json::from_str(&body).ok()?,
                mac: mac.to_string(),
            })
        })
        .collect())
}

fn lines(log: &Path) -> Result<Vec<String>, AuditError> {
    let bytes = match std::fs::read(log) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(AuditError::Io {
                path: log.to_path_buf(),
                source,
            });
        }
    };
    // Split on \n alone: a \r added to a line is a change like any other.
    let text = String::from_utf8_lossy(&bytes);
    let text = text.strip_suffix('\n').unwrap_or(&text);
    if text.is_empty() {
        return Ok(Vec::new());
    }
    Ok(text.split('\n').map(str::to_string).collect())
}

/// Checks every record's MAC, that numbers run 1, 2, 3… with each record
/// naming its predecessor's MAC, and that the log reaches the anchor.
pub fn verify(log: &Path) -> Result<Verification, AuditError> {
    let state = AuditState::load(log)?.ok_or_else(|| AuditError::Corrupt {
        path: super::state::state_path(log),
        reason: "missing: without the audit key and anchor the log cannot be verified".into(),
    })?;
    let mut problems = Vec::new();
    let mut expected_seq = 1u64;
    let mut prev_mac = GENESIS.to_string();
    let mut valid = 0u64;
    let mut anchor_seen = state.anchor.seq == 0;
    for (i, line) in lines(log)?.iter().enumerate() {
        let at = i + 1;
        let problem = |what: String| Problem { line: at, what };
        let Some((body, mac)) = split_line(line) else {
            problems.push(problem(
                "not a record (inserted, edited, or cut short by a crash)".into(),
            ));
            continue;
        };
        if state.key.mac(&[MAC_DOMAIN, body.as_bytes()].concat()) != mac {
            problems.push(problem("MAC mismatch: the record was edited or forged".into()));
            // An edited record still holds its place in the chain: the
            // records after it are not reported as out of place for it.
            if serde_json::from_str::<Record>(&body).is_ok_and(|r| r.seq == expected_seq) {
                expected_seq += 1;
                prev_mac = mac.to_string();
            }
            continue;
        }
        let Ok(record) = serde_json::from_str::<Record>(&body) else {
            problems.push(problem("authenticated, but not a record of this format".into()));
            continue;
        };
        if record.seq > expected_seq {
            problems.push(problem(format!(
                "record {} follows record {}: {} removed before it",
                record.seq,
                expected_seq - 1,
                if record.seq - expected_seq == 1 {
                    format!("record {expected_seq} was")
                } else {
                    format!("records {expected_seq}-{} were", record.seq - 1)
                }
            )));
        } else if record.seq < expected_seq {
            problems.push(problem(format!(
                "record {} comes after record {}: reordered or repeated",
                record.seq,
                expected_seq - 1
            )));
        } else if record.prev != prev_mac {
            problems.push(problem(format!(
                "record {} does not follow the record before it (the chain is broken: reordered or replaced)",
                record.seq
            )));
        } else {
            valid += 1;
        }
        if record.seq == state.anchor.seq {
            anchor_seen = anchor_seen || mac == state.anchor.mac;
            if mac != state.anchor.mac {
                problems.push(problem(format!(
                    "record {} is not the one the anchor names",
                    record.seq
                )));
            }
        }
        expected_seq = record.seq + 1;
        prev_mac = mac.to_string();
    }
    if expected_seq <= state.anchor.seq || !anchor_seen {
        problems.push(Problem {
            line: 0,
            what: format!(
                "the log ends at record {} but {} were written: truncated, or records removed from its end",
                expected_seq - 1,
                state.anchor.seq
            ),
        });
    }
    Ok(Verification {
        valid_records: valid,
        anchored_records: state.anchor.seq,
        problems,
    })
}
