//! Opening a volume from the command line: its key provider, then its keys.

use std::path::Path;
use std::sync::Arc;

use kmsfs::kms::KeyProvider;
use kmsfs::volume::Volume;
use kmsfs::volume::db::VolumeRow;

use super::{CliError, KeyOptions, secrets};

/// The provider named in the volume (or by --kms), unlocked with the user's secret.
pub fn provider_for(row: &VolumeRow, keys: &KeyOptions) -> Result<Arc<dyn KeyProvider>, CliError> {
    let uri = keys.kms.as_deref().unwrap_or(&row.provider);
    match uri.strip_prefix("local:") {
        Some(key_id) => {
            let store = Arc::new(secrets::open_keystore(keys)?);
            Ok(Arc::new(store.provider(key_id)?))
        }
        None => Ok(kmsfs::kms::connect(uri)?),
    }
}

pub fn open_volume(backing: &Path, keys: &KeyOptions) -> Result<Volume, CliError> {
    let row = kmsfs::volume::read_info(backing)?.volume;
    let provider = provider_for(&row, keys)?;
    Ok(Volume::open(backing, provider)?)
}
