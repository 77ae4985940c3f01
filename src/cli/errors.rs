//! Every failure a user can act on gets a message and a distinct exit code.

use kmsfs::kms::KmsError;
use kmsfs::volume::VolumeError;
use kmsfs::volume::db::DbError;
use kmsfs::volume::lock::LockError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Internal = 1,
    Usage = 2,
    Secret = 3,
    Volume = 4,
    Provider = 5,
    Mount = 6,
    Io = 7,
    ProviderUnreachable = 8,
    /// `audit verify` found the log tampered with, or cannot check it.
    AuditFailed = 9,
}

impl ExitCode {
    /// The name `--json` errors give the code.
    pub fn name(self) -> &'static str {
        match self {
            ExitCode::Internal => "internal",
            ExitCode::Usage => "usage",
            ExitCode::Secret => "secret",
            ExitCode::Volume => "volume",
            ExitCode::Provider => "provider",
            ExitCode::Mount => "mount",
            ExitCode::Io => "io",
            ExitCode::ProviderUnreachable => "provider_unreachable",
            ExitCode::AuditFailed => "audit_failed",
        }
    }
}

#[derive(Debug)]
pub struct CliError {
    pub code: ExitCode,
    pub message: String,
}

impl CliError {
    pub fn new(code: ExitCode, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }
}

impl From<KmsError> for CliError {
    fn from(e: KmsError) -> Self {
        let code = match &e {
            KmsError::WrongPassphrase(_) | KmsError::WrongKeyFile(_) | KmsError::BadSecret(_) => ExitCode::Secret,
            KmsError::Io { .. } => ExitCode::Io,
            KmsError::Unreachable { .. } => ExitCode::ProviderUnreachable,
            KmsError::BadUri { .. }
            | KmsError::BadSetting { .. }
            | KmsError::InsecureTransport { .. }
            | KmsError::WeakKdf { .. } => ExitCode::Usage,
            _ => ExitCode::Provider,
        };
        CliError::new(code, e.to_string())
    }
}

impl From<VolumeError> for CliError {
    fn from(e: VolumeError) -> Self {
        match e {
            VolumeError::Kms(k) => k.into(),
            VolumeError::KeyUnavailable { .. } | VolumeError::DaemonBehind { .. } => {
                CliError::new(ExitCode::ProviderUnreachable, e.to_string())
            }
            VolumeError::RotationOvertaken { .. } => CliError::new(ExitCode::Mount, e.to_string()),
            VolumeError::Io { .. } => CliError::new(ExitCode::Io, e.to_string()),
            VolumeError::NotTaken { .. } => CliError::new(ExitCode::Usage, e.to_string()),
            // A value of the wrong type or range is a damaged DB, not an I/O failure.
            VolumeError::Db(DbError::Sqlite {
                source:
                    rusqlite::Error::InvalidColumnType(..)
                    | rusqlite::Error::FromSqlConversionFailure(..)
                    | rusqlite::Error::IntegralValueOutOfRange(..),
                ..
            }) => CliError::new(ExitCode::Volume, e.to_string()),
            // So is a page SQLite finds malformed (the schema check before cannot see every page).
            VolumeError::Db(DbError::Sqlite {
                source:
                    rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error {
                            code: rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase,
                            ..
                        },
                        _,
                    ),
                ..
            }) => CliError::new(ExitCode::Volume, e.to_string()),
            VolumeError::Db(DbError::Sqlite { .. } | DbError::Full { .. }) => {
                CliError::new(ExitCode::Io, e.to_string())
            }
            _ => CliError::new(ExitCode::Volume, e.to_string()),
        }
    }
}

impl From<LockError> for CliError {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Held { .. } => CliError::new(ExitCode::Mount, e.to_string()),
            LockError::Io { .. } => CliError::new(ExitCode::Io, e.to_string()),
        }
    }
}

impl From<kmsfs::audit::AuditError> for CliError {
    fn from(e: kmsfs::audit::AuditError) -> Self {
        CliError::new(ExitCode::Io, e.to_string())
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::new(ExitCode::Io, e.to_string())
    }
}
