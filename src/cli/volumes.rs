//! Opening a volume from the command line: its key provider, then its keys.
//!
//! The volume records which key it uses ([`ProviderId`]); how to reach that
//! key comes from the user's side only, in this order: `--kms` (or
//! `KMSFS_KMS`), the host configuration's entry for the volume, the
//! environment. A configured provider that names another key than the
//! volume records is refused.

use std::path::Path;
use std::sync::Arc;

use kmsfs::kms::uri::ProviderUri;
use kmsfs::kms::{KeyProvider, ProviderId};
use kmsfs::volume::Volume;
use kmsfs::volume::db::VolumeRow;

use super::host_config::{self, HostConfig};
use super::{CliError, ExitCode, KeyOptions, secrets};

/// The key provider a volume records, read as identifiers only.
pub fn recorded_provider(backing: &Path, row: &VolumeRow) -> Result<ProviderId, CliError> {
    ProviderId::parse_recorded(&row.provider).map_err(|e| {
        CliError::new(
            ExitCode::Volume,
            format!(
                "{}: the metadata DB records no usable key provider ({e}); the volume is damaged",
                backing.display()
            ),
        )
    })
}

/// The URI the user configured for this volume, and where it came from.
fn configured_uri(row: &VolumeRow, keys: &KeyOptions) -> Result<Option<(ProviderUri, String)>, CliError> {
    if let Some(raw) = &keys.kms {
        return Ok(Some((ProviderUri::parse(raw)?, "--kms".to_string())));
    }
    let path = host_config::path(keys.config.as_deref())?;
    let config = HostConfig::load(&path)?;
    match config.volume(&kmsfs::kms::hex(&row.volume_id)) {
        Some(entry) => {
            let uri = ProviderUri::parse(&entry.kms).map_err(|e| {
                CliError::new(
                    ExitCode::Usage,
                    format!("host configuration {}: {e}", config.path().display()),
                )
            })?;
            Ok(Some((uri, format!("host configuration {}", config.path().display()))))
        }
        None => Ok(None),
    }
}

fn mismatch(backing: &Path, recorded: &ProviderId, given: &ProviderId, source: &str) -> CliError {
    CliError::new(
        ExitCode::Provider,
        format!(
            "volume {} records key provider {recorded}, but {source} names {given}; \
             if the volume was moved or its metadata DB edited, check it before trusting it",
            backing.display()
        ),
    )
}

/// The volume's key provider, reached through the user's own settings and
/// unlocked with the user's secret.
pub fn provider_for(backing: &Path, row: &VolumeRow, keys: &KeyOptions) -> Result<Arc<dyn KeyProvider>, CliError> {
    let recorded = recorded_provider(backing, row)?;
    let configured = configured_uri(row, keys)?;
    let uri = match configured {
        // `local:` alone means the local keystore with the recorded key; an
        // alias is checked once the keystore is open.
        Some((ProviderUri::Local { key }, source)) => {
            let ProviderId::Local { key: recorded_key } = &recorded else {
                return Err(mismatch(backing, &recorded, &ProviderId::Local { key }, &source));
            };
            let store = Arc::new(secrets::open_keystore(keys)?);
            if !key.is_empty() && store.key_id(&key)? != *recorded_key {
                return Err(mismatch(backing, &recorded, &ProviderId::Local { key }, &source));
            }
            return Ok(Arc::new(store.provider(recorded_key)?));
        }
        Some((uri, source)) => {
            if uri.id() != recorded {
                return Err(mismatch(backing, &recorded, &uri.id(), &source));
            }
            uri
        }
        None => recorded.bare_uri(),
    };
    match uri {
        ProviderUri::Local { key } => {
            let store = Arc::new(secrets::open_keystore(keys)?);
            Ok(Arc::new(store.provider(&key)?))
        }
        remote => Ok(kmsfs::kms::connect(&remote)?),
    }
}

pub fn open_volume(backing: &Path, keys: &KeyOptions) -> Result<Volume, CliError> {
    let row = kmsfs::volume::read_info(backing)?.volume;
    let provider = provider_for(backing, &row, keys)?;
    Ok(Volume::open(backing, provider)?)
}
