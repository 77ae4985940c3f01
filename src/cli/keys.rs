//! `kmsfs key …`: the life of the local keystore's master keys, as AWS KMS
//! users know it (create, describe, list, aliases, disable/enable,
//! scheduled deletion, rotation). Every command takes `--json`.

use clap::Subcommand;
use kmsfs::kms::local::{KeyInfo, LocalKeystore, UnlockSecret};

use super::{CliError, KeyOptions, secrets};

const JSON_HELP: &str = "Machine-readable output: JSON on stdout, and errors as JSON on stderr";

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create a master key (CreateKey), enabled, with one version
    Create {
        /// An alias to name it by (letters, digits, '/', '_', '-')
        #[arg(long)]
        alias: Option<String>,
        /// What it is for
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Show one master key (DescribeKey): state, alias, versions, deletion date
    Describe {
        /// Key id or alias
        key: String,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// List the keystore's master keys
    List {
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Give a master key a new version (old versions stay for decryption); then run `kmsfs rewrap`
    Rotate {
        /// Key id or alias
        key: String,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Destroy the versions below MIN (as Vault's min_decryption_version); refused while a
    /// volume this keystore knows of still has keys wrapped by one (it names them)
    Trim {
        /// Key id or alias
        key: String,
        /// The oldest version to keep
        #[arg(long)]
        min_version: u32,
        /// Stop counting this volume (id, as the refusal names it): one that is gone for good.
        /// Its copies and backups need the old versions too
        #[arg(long, value_name = "VOLUME_ID")]
        forget: Vec<String>,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Create, move or delete an alias
    #[command(subcommand)]
    Alias(AliasCommand),
    /// Automatic rotation: a new version when the newest is PERIOD days old (made when the
    /// keystore is next opened; `mount` then re-wraps its volume's key under it)
    #[command(subcommand)]
    Rotation(RotationCommand),
    /// Disable a master key (DisableKey): `init`, `mount`, `rotate` and `rewrap` of its volumes
    /// fail with exit 5; volumes mounted before keep working
    Disable {
        /// Key id or alias
        key: String,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Enable a disabled master key (EnableKey)
    Enable {
        /// Key id or alias
        key: String,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Schedule a master key's deletion (ScheduleKeyDeletion): unusable at once, its material
    /// destroyed for good when the keystore is opened after the waiting period
    ScheduleDeletion {
        /// Key id or alias
        key: String,
        /// Waiting period in days (7-30)
        #[arg(long, default_value_t = 30)]
        days: u32,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Cancel a scheduled deletion (CancelKeyDeletion); the key comes back disabled
    CancelDeletion {
        /// Key id or alias
        key: String,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum KeystoreCommand {
    /// Protect the keystore with another secret: a new passphrase, a key file instead of a
    /// passphrase or the other way round, or a higher Argon2id cost. The current secret is
    /// given as for any command (--passphrase-file, --key-file, --extpass, KMSFS_PASSPHRASE);
    /// no volume is touched
    Passwd {
        /// Protect it with this 32-byte key file from now on (created if missing)
        #[arg(long, value_name = "FILE", conflicts_with = "new_passphrase_file")]
        new_key_file: Option<std::path::PathBuf>,
        /// The new passphrase: first line of FILE (else KMSFS_NEW_PASSPHRASE, else a prompt)
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<std::path::PathBuf>,
        /// Argon2id memory cost in MiB for the new passphrase
        #[arg(long, default_value_t = 64, value_name = "MIB")]
        kdf_memory_mib: u32,
        /// Argon2id iterations for the new passphrase
        #[arg(long, default_value_t = 3, value_name = "N")]
        kdf_iterations: u32,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
}

pub fn keystore(command: KeystoreCommand, keys: &KeyOptions) -> Result<(), CliError> {
    let KeystoreCommand::Passwd {
        new_key_file,
        new_passphrase_file,
        kdf_memory_mib,
        kdf_iterations,
        json,
    } = command;
    let mut store: LocalKeystore = secrets::open_keystore(keys)?;
    let kdf = kmsfs::kms::local::KdfParams {
        memory_kib: kdf_memory_mib.saturating_mul(1024),
        iterations: kdf_iterations,
        parallelism: 1,
    };
    let secret = secrets::new_secret(new_key_file.as_deref(), new_passphrase_file.as_deref())?;
    let protection = match secret {
        UnlockSecret::KeyFile(_) => "key file",
        UnlockSecret::Passphrase(_) => "passphrase",
    };
    let changed = store.change_secret(&secret, kdf);
    let event = kmsfs::audit::Event::new("ChangeKeystoreProtection")
        .details(serde_json::json!({ "keystore": store.path(), "protected_by": protection }));
    kmsfs::audit::record(event.outcome(&changed));
    changed?;
    if json {
        println!(
            "{}",
            serde_json::json!({"keystore": store.path(), "protected_by": protection})
        );
    } else {
        println!(
            "Keystore {} is now protected by the new {protection}; volumes unchanged",
            store.path().display()
        );
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum RotationCommand {
    /// Turn automatic rotation on (EnableKeyRotation)
    Enable {
        /// Key id or alias
        key: String,
        /// Days between versions (90-2560)
        #[arg(long, default_value_t = 365)]
        period_days: u32,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Turn automatic rotation off (DisableKeyRotation)
    Disable {
        /// Key id or alias
        key: String,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum AliasCommand {
    /// Name a key (it has at most one alias)
    Create {
        alias: String,
        /// Key id or alias
        key: String,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Point an existing alias at another key
    Update {
        alias: String,
        /// Key id or alias
        key: String,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Remove an alias (the key stays)
    Delete {
        alias: String,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
}

/// One line for a person.
fn line(k: &KeyInfo) -> String {
    let alias = k.alias.as_deref().map(|a| format!(" ({a})")).unwrap_or_default();
    let deletion = k
        .deletion_date
        .map(|d| format!("  deleted on {}", kmsfs::util::utc_date(d)))
        .unwrap_or_default();
    let rotation = k
        .rotation_period_days
        .map(|d| format!("  rotates every {d} days"))
        .unwrap_or_default();
    format!(
        "{}{alias}  {:?}  versions {:?}{rotation}{deletion}  {}",
        k.id, k.state, k.versions, k.description
    )
}

fn show(k: &KeyInfo, json: bool, what: &str) {
    if json {
        println!("{}", serde_json::to_string(k).unwrap_or_default());
    } else {
        println!("{what}: {}", line(k));
    }
}

pub fn key(command: KeyCommand, keys: &KeyOptions) -> Result<(), CliError> {
    let store: LocalKeystore = secrets::open_keystore(keys)?;
    match command {
        KeyCommand::Create {
            alias,
            description,
            json,
        } => {
            let id = store.create_named_key(alias.as_deref(), &description)?;
            show(&store.describe(&id)?, json, "Created");
        }
        KeyCommand::Describe { key, json } => show(
            &store.audited("DescribeKey", &key, None, || store.describe(&key))?,
            json,
            "Key",
        ),
        KeyCommand::List { json } => {
            let list = store.list();
            kmsfs::audit::record(kmsfs::audit::Event::new("ListKeys"));
            if json {
                println!("{}", serde_json::to_string(&list).unwrap_or_default());
            } else {
                list.iter().for_each(|k| println!("{}", line(k)));
            }
        }
        KeyCommand::Rotate { key, json } => {
            let version = store.rotate_key(&key)?;
            let id = store.key_id(&key)?;
            if json {
                println!("{}", serde_json::json!({ "key_id": id, "new_version": version }));
            } else {
                println!(
                    "Master key {id} is now at version {version}; each of its volumes moves to it at its next mount, or with `kmsfs rewrap BACKING`"
                );
            }
        }
        KeyCommand::Alias(alias) => {
            let (name, json) = match alias {
                AliasCommand::Create { alias, key, json } => {
                    store.set_alias(&alias, &key, false)?;
                    (alias, json)
                }
                AliasCommand::Update { alias, key, json } => {
                    store.set_alias(&alias, &key, true)?;
                    (alias, json)
                }
                AliasCommand::Delete { alias, json } => {
                    store.delete_alias(&alias)?;
                    if json {
                        println!("{}", serde_json::json!({ "alias": alias, "deleted": true }));
                    } else {
                        println!("Alias {alias} deleted");
                    }
                    return Ok(());
                }
            };
            show(&store.describe(&name)?, json, "Alias set");
        }
        KeyCommand::Rotation(RotationCommand::Enable { key, period_days, json }) => show(
            &store.set_rotation(&key, Some(period_days))?,
            json,
            "Automatic rotation on",
        ),
        KeyCommand::Rotation(RotationCommand::Disable { key, json }) => {
            show(&store.set_rotation(&key, None)?, json, "Automatic rotation off")
        }
        KeyCommand::Trim {
            key,
            min_version,
            forget,
            json,
        } => {
            let trimmed = store.trim(&key, min_version, &forget)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "key_id": store.key_id(&key)?, "destroyed_versions": trimmed })
                );
            } else {
                println!("Destroyed versions {trimmed:?} of {}", store.key_id(&key)?);
            }
        }
        KeyCommand::Disable { key, json } => show(&store.set_enabled(&key, false)?, json, "Disabled"),
        KeyCommand::Enable { key, json } => show(&store.set_enabled(&key, true)?, json, "Enabled"),
        KeyCommand::ScheduleDeletion { key, days, json } => {
            show(&store.schedule_deletion(&key, days)?, json, "Scheduled for deletion")
        }
        KeyCommand::CancelDeletion { key, json } => show(&store.cancel_deletion(&key)?, json, "Deletion cancelled"),
    }
    Ok(())
}
