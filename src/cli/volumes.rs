//! Opening a volume from the command line: its key provider, then its keys.

use std::path::Path;
use std::sync::Arc;

use kmsfs::kms::KeyProvider;
use kmsfs::volume::Volume;
use kmsfs::volume::db::VolumeRow;

use super::{CliError, ExitCode, KeyOptions, secrets};

/// The provider named in the volume, unlocked with the user's secret.
pub fn provider_for(row: &VolumeRow, keys: &KeyOptions) -> Result<Arc<dyn KeyProvider>, CliError> {
    let key_id = row
        .provider
        .strip_prefix("local:")
        .ok_or_else(|| CliError::new(ExitCode::Provider, format!("unsupported key provider {}", row.provider)))?;
    let store = Arc::new(secrets::open_keystore(keys)?);
    Ok(Arc::new(store.provider(key_id)?))
}

pub fn open_volume(backing: &Path, keys: &KeyOptions) -> Result<Volume, CliError> {
    let row = kmsfs::volume::read_info(backing)?.volume;
    let provider = provider_for(&row, keys)?;
    Ok(Volume::open(backing, provider)?)
}
