//! Opening a volume from the command line: its key provider, then its keys.
//!
//! The volume records which key it uses ([`ProviderId`]); how to reach that
//! key comes from the user's side only: `--kms` (or `KMSFS_KMS`) or the host
//! configuration's entry for the volume, with the environment filling in
//! what they leave out. A configured provider that names another key than
//! the volume records is refused, and so is a remote provider this host
//! names nowhere: an edited DB must not make a host contact any provider.

use std::path::{Path, PathBuf};
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

/// The URI the user configured for this volume and where it came from, or
/// the configuration file that has no entry for it.
fn configured_uri(row: &VolumeRow, keys: &KeyOptions) -> Result<Result<(ProviderUri, String), PathBuf>, CliError> {
    if let Some(raw) = &keys.kms {
        return Ok(Ok((ProviderUri::parse(raw)?, "--kms".to_string())));
    }
    let path = host_config::path(keys.config.as_deref())?;
    let config = HostConfig::load(&path)?;
    match config.volume(&kmsfs::util::hex(&row.volume_id)) {
        Some(entry) => {
            let uri = ProviderUri::parse(&entry.kms).map_err(|e| {
                CliError::new(
                    ExitCode::Usage,
                    format!("host configuration {}: {e}", config.path().display()),
                )
            })?;
            Ok(Ok((uri, format!("host configuration {}", config.path().display()))))
        }
        None => Ok(Err(path)),
    }
}

fn mismatch(backing: &Path, recorded: &ProviderId, given: &ProviderId, source: &str) -> CliError {
    CliError::new(
        ExitCode::Provider,
        format!(
            "volume {} records key provider {}, but {source} names {}; \
             if the volume was moved or its metadata DB edited, check it before trusting it",
            backing.display(),
            super::printable(&recorded.to_string()),
            super::printable(&given.to_string())
        ),
    )
}

/// The volume's key provider, reached through the user's own settings and
/// unlocked with the user's secret; every call it makes is audited.
pub fn provider_for(backing: &Path, row: &VolumeRow, keys: &KeyOptions) -> Result<Arc<dyn KeyProvider>, CliError> {
    Ok(kmsfs::kms::audited::audited(reach_provider(backing, row, keys)?))
}

fn reach_provider(backing: &Path, row: &VolumeRow, keys: &KeyOptions) -> Result<Arc<dyn KeyProvider>, CliError> {
    let recorded = recorded_provider(backing, row)?;
    let configured = configured_uri(row, keys)?;
    let uri = match configured {
        // `local:` alone means the local keystore with the recorded key; an
        // alias is checked once the keystore is open.
        Ok((ProviderUri::Local { key }, source)) => {
            let ProviderId::Local { key: recorded_key } = &recorded else {
                return Err(mismatch(backing, &recorded, &ProviderId::Local { key }, &source));
            };
            let store = Arc::new(secrets::open_keystore(keys)?);
            if !key.is_empty() && store.key_id(&key)? != *recorded_key {
                return Err(mismatch(backing, &recorded, &ProviderId::Local { key }, &source));
            }
            return Ok(Arc::new(store.provider(recorded_key)?));
        }
        Ok((uri, source)) => {
            if uri.id() != recorded {
                return Err(mismatch(backing, &recorded, &uri.id(), &source));
            }
            uri
        }
        Err(_) if matches!(recorded, ProviderId::Local { .. }) => recorded.bare_uri(),
        Err(config) => {
            return Err(CliError::new(
                ExitCode::Provider,
                format!(
                    "volume {} records key provider {}, which this host does not name for it: pass \
                     --kms URI (or KMSFS_KMS), or add an entry for volume {} to {} (`kmsfs init --kms` \
                     writes one); kmsfs contacts no provider a volume alone names",
                    backing.display(),
                    super::printable(&recorded.to_string()),
                    kmsfs::util::hex(&row.volume_id),
                    config.display()
                ),
            ));
        }
    };
    match uri {
        ProviderUri::Local { key } => {
            let store = Arc::new(secrets::open_keystore(keys)?);
            Ok(Arc::new(store.provider(&key)?))
        }
        remote => Ok(kmsfs::kms::connect(&remote)?),
    }
}

/// Tells the provider which of its key versions the volume's keys are
/// wrapped by now (the local keystore remembers it for `key trim`).
pub fn note_use(provider: &dyn KeyProvider, backing: &Path) {
    let Ok(summary) = kmsfs::volume::read_info(backing) else {
        return;
    };
    let blobs: Vec<_> = summary.volume_keys.into_iter().filter_map(|k| k.wrapped).collect();
    let place = std::fs::canonicalize(backing).unwrap_or_else(|_| backing.to_path_buf());
    provider.note_volume(&summary.volume.volume_id, &place, &blobs);
}

pub fn open_volume(backing: &Path, keys: &KeyOptions) -> Result<Volume, CliError> {
    let row = kmsfs::volume::read_info(backing)?.volume;
    let provider = provider_for(backing, &row, keys)?;
    let volume = Volume::open(backing, provider)?;
    // What opening found and could not fix (keys saved by an earlier daemon
    // that it could not store): a mount reports it at unmount, a command now.
    if let Some(problem) = volume.problems() {
        log::warn!("{problem}");
    }
    Ok(volume)
}

/// The directory of the volume `path` names: `path` itself, or, for the
/// plaintext directory of a reverse view, its `.kmsfs-reverse` (then
/// `true`).
pub fn volume_dir(path: &Path) -> (PathBuf, bool) {
    let db = kmsfs::volume::db::DB_FILE;
    let reverse = kmsfs::reverse::volume_dir(path);
    // A forward backing directory never holds `.kmsfs-reverse` (its
    // entries' names are encrypted), whatever else a plaintext one holds.
    if reverse.join(db).exists() {
        return (reverse, true);
    }
    let named_itself = path.file_name() == Some(std::ffi::OsStr::new(kmsfs::reverse::VOLUME_DIR));
    (path.to_path_buf(), named_itself && path.join(db).exists())
}

/// An audit event about the volume at `backing` (or the reverse view of
/// that plaintext directory), with its id as the context (when the volume
/// can be read).
pub fn volume_event(action: &str, backing: &Path) -> kmsfs::audit::Event {
    let place = std::fs::canonicalize(backing).unwrap_or_else(|_| backing.to_path_buf());
    let id = kmsfs::volume::read_info(&volume_dir(backing).0)
        .ok()
        .map(|info| info.volume.volume_id);
    event_for(action, &place, id.as_ref())
}

/// An audit event about the volume at `backing` whose id is known (or
/// not), read from nothing on disk: what a daemon records once the backing
/// directory is no longer its own.
pub fn event_for(action: &str, backing: &Path, volume_id: Option<&[u8; 16]>) -> kmsfs::audit::Event {
    let place = std::path::absolute(backing).unwrap_or_else(|_| backing.to_path_buf());
    let event = kmsfs::audit::Event::new(action).volume(&place);
    match volume_id {
        Some(id) => event.context(kmsfs::kms::EncryptionContext::for_volume(id).pairs()),
        None => event,
    }
}

/// The backing directory `path` names: itself (or, for the plaintext
/// directory of a reverse view, that directory), or the volume mounted at it.
pub fn backing_of(path: &Path) -> Result<PathBuf, CliError> {
    resolve(path).map(|(backing, _)| backing)
}

/// The backing directory a command that takes one is given: the path
/// itself, or, for a kmsfs mount point, the volume mounted there.
pub fn volume_arg(path: &Path) -> Result<PathBuf, CliError> {
    Ok(match resolve(path)? {
        (resolved, Named::Itself) => {
            // As given (relative stays relative) when it is that directory.
            if std::fs::canonicalize(path).is_ok_and(|p| p == resolved) {
                path.to_path_buf()
            } else {
                resolved
            }
        }
        (resolved, Named::Mount) => resolved,
    })
}

enum Named {
    Itself,
    Mount,
}

fn resolve(path: &Path) -> Result<(PathBuf, Named), CliError> {
    // The mount table first: the top of a reverse view holds a kmsfs.db
    // too. And before anything looks at the path: with its daemon stopped
    // (SIGSTOP), a look at a mount point waits until it runs again.
    if let Some(mount) = kmsfs_mount_named(path)? {
        return mounted_volume(path, mount).map(|backing| (backing, Named::Mount));
    }
    let at = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => std::path::absolute(path)?,
        Err(_) => return Ok((path.to_path_buf(), Named::Itself)), // read_info names what is wrong
    };
    // A path that reaches a mount point through a symlink.
    let mounted = super::mounts::mounts()?
        .into_iter()
        .find(|m| m.mountpoint == at && m.is_kmsfs());
    match mounted {
        Some(mount) => mounted_volume(path, mount).map(|backing| (backing, Named::Mount)),
        None => Ok((at, Named::Itself)),
    }
}

/// The kmsfs mount whose mount point `path` names without a symlink in its
/// last component, found without looking at that component.
fn kmsfs_mount_named(path: &Path) -> Result<Option<super::mounts::MountEntry>, CliError> {
    let Ok(lexical) = std::path::absolute(path) else {
        return Ok(None);
    };
    let through_parent = match (lexical.parent(), lexical.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent).ok().map(|p| p.join(name)),
        _ => None,
    };
    Ok(super::mounts::mounts()?
        .into_iter()
        .find(|m| m.is_kmsfs() && (m.mountpoint == lexical || Some(&m.mountpoint) == through_parent.as_ref())))
}

fn mounted_volume(path: &Path, mount: super::mounts::MountEntry) -> Result<PathBuf, CliError> {
    if volume_dir(&mount.source).0.join(kmsfs::volume::db::DB_FILE).exists() {
        return Ok(mount.source);
    }
    Err(CliError::new(
        ExitCode::Usage,
        format!(
            "{} is a kmsfs mount point mounted with fsname=: give its backing directory",
            path.display()
        ),
    ))
}
