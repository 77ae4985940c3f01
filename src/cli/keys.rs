//! `kmsfs key …`: the life of the local keystore's master keys, as AWS KMS
//! users know it (create, describe, list, aliases, disable/enable,
//! scheduled deletion, rotation). Every command takes `--json`.

use clap::Subcommand;
use kmsfs::kms::local::{KeyInfo, LocalKeystore, Origin, UnlockSecret};

use super::{CliError, ExitCode, KeyOptions, secrets};

const JSON_HELP: &str = "Machine-readable output: JSON on stdout, and errors as JSON on stderr (log lines too)";

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
        /// generated: kmsfs makes the material; external: you bring it (`key import-params`,
        /// then `key import`); the key is PendingImport until then
        #[arg(long, value_enum, default_value_t = Origin::Generated)]
        origin: Origin,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Get what wraps key material for import into an external key (GetParametersForImport): a
    /// one-time RSA-3072 public key for RSAES-OAEP SHA-256 and an import token, valid 24 hours.
    /// Wrap 32 bytes of material with it, e.g.
    /// `openssl pkeyutl -encrypt -pubin -inkey wrapping.pem -pkeyopt rsa_padding_mode:oaep
    /// -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256 -in material.bin -out material.enc`
    ImportParams {
        /// Key id or alias
        key: String,
        /// Write the public key (PEM) to FILE instead of printing it
        #[arg(long, value_name = "FILE")]
        public_key_out: Option<std::path::PathBuf>,
        #[arg(long, help = JSON_HELP)]
        json: bool,
    },
    /// Import wrapped key material into an external key (ImportKeyMaterial); the key becomes
    /// Enabled. Re-importing (after an expiry) takes the same material only
    Import {
        /// Key id or alias
        key: String,
        /// The material, wrapped with the public key of `key import-params` (raw or base64)
        #[arg(long, value_name = "FILE")]
        material: std::path::PathBuf,
        /// The material expires then (UTC: YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or @SECONDS): the key
        /// is unusable (PendingImport) after it until imported again. Default: never
        #[arg(long, value_name = "DATE")]
        valid_to: Option<String>,
        /// The token `key import-params` gave; checked when given
        #[arg(long, value_name = "TOKEN")]
        import_token: Option<String>,
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
        outln!(
            "{}",
            serde_json::json!({"keystore": store.path(), "protected_by": protection})
        );
    } else {
        outln!(
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
    let origin = match (k.origin, k.material_valid_to) {
        (Origin::Generated, _) => String::new(),
        (Origin::External, Some(to)) => format!("  imported, expires {}", kmsfs::util::utc_date(to)),
        (Origin::External, None) => "  imported".to_string(),
    };
    format!(
        "{}{alias}  {:?}  versions {:?}{origin}{rotation}{deletion}  {}",
        k.id, k.state, k.versions, k.description
    )
}

fn show(k: &KeyInfo, json: bool, what: &str) {
    if json {
        outln!("{}", serde_json::to_string(k).unwrap_or_default());
    } else {
        outln!("{what}: {}", line(k));
    }
}

fn import_params(
    store: &LocalKeystore,
    key: &str,
    public_key_out: Option<&std::path::Path>,
    json: bool,
) -> Result<(), CliError> {
    let params = store.import_params(key)?;
    if let Some(path) = public_key_out {
        std::fs::write(path, &params.public_key_pem)
            .map_err(|e| CliError::new(ExitCode::Io, format!("cannot write {}: {e}", path.display())))?;
    }
    if json {
        outln!("{}", serde_json::to_string(&params).unwrap_or_default());
        return Ok(());
    }
    if public_key_out.is_none() {
        out!("{}", params.public_key_pem);
    }
    outln!(
        "Import token {} for key {}, valid until {}: wrap 32 bytes of material with {} ({}), then run\n  \
         kmsfs key import {} --material FILE --import-token {}",
        params.import_token,
        params.key_id,
        kmsfs::util::utc_date(params.parameters_valid_to),
        public_key_out.map_or("the public key above".to_string(), |p| p.display().to_string()),
        params.wrapping_algorithm,
        params.key_id,
        params.import_token
    );
    Ok(())
}

/// Wrapped material as openssl writes it (raw), or base64 of it.
fn read_wrapped_material(path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    use base64::Engine;
    let bytes = std::fs::read(path)
        .map_err(|e| CliError::new(ExitCode::Io, format!("cannot read --material {}: {e}", path.display())))?;
    let text: Vec<u8> = bytes.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    Ok(match base64::engine::general_purpose::STANDARD.decode(&text) {
        Ok(decoded) if bytes.len() != 384 => decoded,
        _ => bytes,
    })
}

pub fn key(command: KeyCommand, keys: &KeyOptions) -> Result<(), CliError> {
    let store: LocalKeystore = secrets::open_keystore(keys)?;
    match command {
        KeyCommand::Create {
            alias,
            description,
            origin,
            json,
        } => {
            let id = store.create_named_key(alias.as_deref(), &description, origin)?;
            show(&store.describe(&id)?, json, "Created");
        }
        KeyCommand::ImportParams {
            key,
            public_key_out,
            json,
        } => import_params(&store, &key, public_key_out.as_deref(), json)?,
        KeyCommand::Import {
            key,
            material,
            valid_to,
            import_token,
            json,
        } => {
            let valid_to = valid_to
                .map(|d| {
                    kmsfs::util::parse_utc_date(&d).ok_or_else(|| {
                        CliError::new(
                            ExitCode::Usage,
                            format!("--valid-to {d:?}: use YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ (UTC) or @SECONDS"),
                        )
                    })
                })
                .transpose()?;
            let wrapped = read_wrapped_material(&material)?;
            let info = store.import_material(&key, &wrapped, valid_to, import_token.as_deref())?;
            show(&info, json, "Imported");
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
                outln!("{}", serde_json::to_string(&list).unwrap_or_default());
            } else {
                list.iter().for_each(|k| outln!("{}", line(k)));
            }
        }
        KeyCommand::Rotate { key, json } => {
            let version = store.rotate_key(&key)?;
            let id = store.key_id(&key)?;
            if json {
                outln!("{}", serde_json::json!({ "key_id": id, "new_version": version }));
            } else {
                outln!(
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
                        outln!("{}", serde_json::json!({ "alias": alias, "deleted": true }));
                    } else {
                        outln!("Alias {alias} deleted");
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
            if !trimmed.is_empty() {
                // The keystore knows the volumes, not their copies.
                log::warn!(
                    "backups of volumes made before their last `kmsfs rewrap` still have volume keys wrapped \
                     under versions {trimmed:?}: they open only with a copy of this keystore from before the trim"
                );
            }
            if json {
                outln!(
                    "{}",
                    serde_json::json!({ "key_id": store.key_id(&key)?, "destroyed_versions": trimmed })
                );
            } else {
                outln!("Destroyed versions {trimmed:?} of {}", store.key_id(&key)?);
            }
        }
        KeyCommand::Disable { key, json } => show(&store.set_enabled(&key, false)?, json, "Disabled"),
        KeyCommand::Enable { key, json } => show(&store.set_enabled(&key, true)?, json, "Enabled"),
        KeyCommand::ScheduleDeletion { key, days, json } => {
            let info = store.schedule_deletion(&key, days)?;
            let users = store.known_volumes(&key)?;
            if !users.is_empty() {
                log::warn!(
                    "volumes this keystore knows use key {}: {}; once it is deleted they, and their backups, \
                     cannot be opened (`kmsfs key cancel-deletion {}` stops it before then)",
                    info.id,
                    users.join(", "),
                    info.id
                );
            }
            show(&info, json, "Scheduled for deletion")
        }
        KeyCommand::CancelDeletion { key, json } => show(&store.cancel_deletion(&key)?, json, "Deletion cancelled"),
    }
    Ok(())
}
