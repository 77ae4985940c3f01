//! The host configuration: how this machine reaches the key provider of each
//! volume it set up. `init --kms URI` records the URI (without secrets) here,
//! keyed by the volume's id, so that `kmsfs mount B M` needs nothing more;
//! a volume itself only records which key it uses.
//!
//! `/etc/kmsfs/providers.toml` for root, `$XDG_CONFIG_HOME/kmsfs/providers.toml`
//! otherwise; `--config`/`KMSFS_CONFIG` names another file.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kmsfs::kms::locked_file;
use serde::{Deserialize, Serialize};

use super::{CliError, ExitCode};

const FILE_NAME: &str = "providers.toml";
const HEADER: &str = "\
# kmsfs: how this host reaches the key provider of each volume, by volume id.
# Written by `kmsfs init --kms URI`; edit freely. Connection settings
# (addresses, module paths, CA and token files) are read only from here,
# --kms and the environment, never from a volume's backing directory.
# Secrets (pin-value=) are never written here: use pin-source=file:PATH.

";

/// One volume's provider on this host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeEntry {
    /// The provider URI with its connection settings.
    pub kms: String,
    /// Where the backing directory was when the entry was written (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    volumes: BTreeMap<String, VolumeEntry>,
}

pub struct HostConfig {
    path: PathBuf,
    file: ConfigFile,
}

fn usage(message: String) -> CliError {
    CliError::new(ExitCode::Usage, message)
}

/// The configuration file this process uses.
pub fn path(explicit: Option<&Path>) -> Result<PathBuf, CliError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if rustix::process::geteuid().is_root() {
        return Ok(PathBuf::from("/etc/kmsfs").join(FILE_NAME));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .ok_or_else(|| usage("cannot find a configuration directory: set --config or KMSFS_CONFIG".into()))?;
    Ok(base.join("kmsfs").join(FILE_NAME))
}

/// A configuration another user could have written decides where this
/// user's credentials go: refuse it, as ssh refuses such a config.
fn check_ownership(path: &Path, meta: &std::fs::Metadata) -> Result<(), CliError> {
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(usage(format!(
            "host configuration {} belongs to uid {}, not to you or root; refusing to use it",
            path.display(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(usage(format!(
            "host configuration {} is writable by others (mode {:o}); run `chmod go-w {}`",
            path.display(),
            meta.mode() & 0o777,
            path.display()
        )));
    }
    Ok(())
}

impl HostConfig {
    /// Reads the configuration; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<Self, CliError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(HostConfig {
                    path: path.to_path_buf(),
                    file: ConfigFile::default(),
                });
            }
            Err(e) => {
                return Err(CliError::new(
                    ExitCode::Io,
                    format!("cannot read host configuration {}: {e}", path.display()),
                ));
            }
        };
        let meta =
            std::fs::metadata(path).map_err(|e| CliError::new(ExitCode::Io, format!("{}: {e}", path.display())))?;
        check_ownership(path, &meta)?;
        let file = toml::from_str(&text)
            .map_err(|e| usage(format!("host configuration {} is not valid: {e}", path.display())))?;
        Ok(HostConfig {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn volume(&self, volume_id: &str) -> Option<&VolumeEntry> {
        self.file.volumes.get(volume_id)
    }

    /// Records (or replaces) a volume's entry, under the file's lock so
    /// that concurrent `init`s all keep theirs.
    pub fn record(path: &Path, volume_id: &str, entry: VolumeEntry) -> Result<(), CliError> {
        let io = |e: std::io::Error| {
            CliError::new(
                ExitCode::Io,
                format!("cannot write host configuration {}: {e}", path.display()),
            )
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let _lock = locked_file::lock(path).map_err(io)?;
        let mut config = Self::load(path)?;
        config.file.volumes.insert(volume_id.to_string(), entry);
        let body = toml::to_string(&config.file).map_err(|e| CliError::new(ExitCode::Internal, e.to_string()))?;
        locked_file::replace(path, format!("{HEADER}{body}").as_bytes(), 0o600, false).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn records_survive_concurrent_writers_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(FILE_NAME);
        assert!(HostConfig::load(&path).unwrap().volume("a").is_none());
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let entry = VolumeEntry {
                        kms: format!("vault-transit:https://vault{i}:8200/transit/k"),
                        backing: Some(PathBuf::from(format!("/srv/v{i}"))),
                    };
                    HostConfig::record(&path, &format!("{i:032x}"), entry).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let config = HostConfig::load(&path).unwrap();
        for i in 0..6 {
            assert_eq!(
                config.volume(&format!("{i:032x}")).unwrap().kms,
                format!("vault-transit:https://vault{i}:8200/transit/k")
            );
        }
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn refuses_unparsable_and_group_writable_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, "[volumes.x]\nkms = 3\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = HostConfig::load(&path).err().unwrap();
        assert_eq!(err.code, ExitCode::Usage);
        assert!(err.message.contains("not valid"), "{}", err.message);
        std::fs::write(&path, "[volumes.x]\nkms = \"local:k\"\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = HostConfig::load(&path).err().unwrap();
        assert!(err.message.contains("writable by others"), "{}", err.message);
    }
}
