//! `kmsfs rotate`, `kmsfs rewrap` and `kmsfs key …`.

use std::path::Path;

use clap::Subcommand;
use kmsfs::volume::rotate;

use super::{CliError, KeyOptions, secrets, volumes};

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Give a master key a new version (old versions stay for decryption); then run `kmsfs rewrap`
    Rotate {
        /// Key id or alias
        key: String,
        /// Machine-readable output: JSON on stdout, and errors as JSON on stderr
        #[arg(long)]
        json: bool,
    },
    /// List the keystore's master keys
    List {
        /// Machine-readable output: JSON on stdout, and errors as JSON on stderr
        #[arg(long)]
        json: bool,
    },
}

pub fn rotate(backing: &Path, keys: &KeyOptions, json: bool) -> Result<(), CliError> {
    let volume = volumes::open_volume(backing, keys)?;
    let progress = super::progress::Progress::new("re-wrapping file keys", json);
    let report = rotate::rotate(&volume, &mut |done, total| progress.update(done, total))?;
    progress.finish();
    if json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        let retired: Vec<String> = report.retired_versions.iter().map(|v| format!("v{v}")).collect();
        println!(
            "{} volume key v{}: {} file keys re-wrapped in {:.2} s; retired {} (blobs erased); no file data rewritten",
            if report.resumed {
                "Resumed rotation to"
            } else {
                "Rotated to"
            },
            report.new_version,
            report.rewrapped_file_keys,
            report.seconds,
            if retired.is_empty() {
                "nothing".to_string()
            } else {
                retired.join(", ")
            },
        );
    }
    Ok(())
}

pub fn rewrap(backing: &Path, keys: &KeyOptions, json: bool) -> Result<(), CliError> {
    let volume = volumes::open_volume(backing, keys)?;
    let report = rotate::rewrap_volume_keys(&volume)?;
    if json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        println!(
            "Re-wrapped {} volume key version(s) under the master key's newest version ({} provider calls); no file touched",
            report.rewrapped_volume_keys.len(),
            report.provider_calls
        );
    }
    Ok(())
}

pub fn key(command: KeyCommand, keys: &KeyOptions) -> Result<(), CliError> {
    let mut store = secrets::open_keystore(keys)?;
    match command {
        KeyCommand::Rotate { key, json } => {
            let version = store.rotate_key(&key)?;
            let id = store.key_id(&key)?;
            if json {
                println!("{}", serde_json::json!({ "key_id": id, "new_version": version }));
            } else {
                println!("Master key {id} is now at version {version}; run `kmsfs rewrap BACKING` for its volumes");
            }
        }
        KeyCommand::List { json } => {
            let list = store.list();
            if json {
                println!("{}", serde_json::to_string(&list).unwrap_or_default());
            } else {
                for k in list {
                    let alias = k.alias.map(|a| format!(" ({a})")).unwrap_or_default();
                    println!(
                        "{}{alias}  {:?}  versions {:?}  {}",
                        k.id, k.state, k.versions, k.description
                    );
                }
            }
        }
    }
    Ok(())
}
