//! Command-line interface: argument parsing, exit codes and the commands.

#[macro_use]
mod output;
mod text;

pub use text::{printable, shell_quoted};

mod audit;
mod daemon;
mod errors;
mod fsck;
mod generate;
mod harden;
mod host_config;
mod keys;
mod logging;
mod mount_options;
mod mount_point;
mod mounts;
mod progress;
mod rekey;
mod reverse;
mod rotation;
mod secrets;
mod status;
mod systemd;
mod umount;
mod volumes;

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use errors::{CliError, ExitCode};

#[derive(Parser)]
#[command(name = "kmsfs", version, about = "Transparent encrypted filesystem with KMS-style envelope encryption", long_about = None)]
#[command(
    after_help = "Exit codes: 0 ok, 1 internal error, 2 usage, 3 wrong or missing passphrase/key file,\n\
4 not a volume or damaged volume, 5 key provider refused (or missing key, disabled key, bad credentials),\n\
6 mount problem, 7 I/O error, 8 key provider unreachable, 9 audit log fails `audit verify`.\n\
Every key operation and volume event is recorded in the audit log (see `kmsfs audit --help`).\n\
Logging: set RUST_LOG (e.g. RUST_LOG=info or RUST_LOG=kmsfs=debug).\n\
With --json, errors are one JSON object on stderr: {\"error\": {\"code\", \"exit_status\", \"message\"}}."
)]
struct Cli {
    #[command(flatten)]
    keys: KeyOptions,
    #[command(subcommand)]
    command: Command,
}

/// Where the local keystore is and what unlocks it.
#[derive(Args, Clone)]
pub struct KeyOptions {
    /// Keystore of the embedded `local` key provider [default: $XDG_DATA_HOME/kmsfs/keystore.json]
    #[arg(long, global = true, env = "KMSFS_KEYSTORE", value_name = "PATH")]
    keystore: Option<PathBuf>,
    /// Read the keystore passphrase from this file (first line). Otherwise KMSFS_PASSPHRASE, then a prompt.
    #[arg(long, global = true, value_name = "FILE", conflicts_with = "key_file")]
    passphrase_file: Option<PathBuf>,
    /// Unlock the keystore with a 32-byte key file instead of a passphrase (created by `init` if missing)
    #[arg(long, global = true, value_name = "FILE")]
    key_file: Option<PathBuf>,
    /// Run CMD (with sh -c) and take the passphrase from the first line it prints, as gocryptfs's
    /// -extpass (e.g. "systemd-ask-password kmsfs", "pass show kmsfs/backup", "secret-tool lookup kmsfs backup")
    #[arg(long, global = true, value_name = "CMD", conflicts_with_all = ["key_file", "passphrase_file"])]
    extpass: Option<String>,
    /// Key provider URI: with `init`, where the master key lives (the volume records only the key's
    /// identifiers; the rest goes to the host configuration). Otherwise how to reach the key the volume
    /// records (refused with exit 5 if it names another key). local:[KEY],
    /// aws-kms:KEY[?region=…&endpoint=…&profile=…&ca_cert=…],
    /// vault-transit:[http(s)://HOST:PORT/]MOUNT/KEY[?token_file=…&ca_cert=…],
    /// pkcs11:[token=LABEL;]object=LABEL[?module-path=…&pin-source=file:…|env:…]
    #[arg(long, global = true, value_name = "URI", env = "KMSFS_KMS")]
    kms: Option<String>,
    /// Host configuration: how this host reaches each volume's key provider
    /// [default: /etc/kmsfs/providers.toml for root, else $XDG_CONFIG_HOME/kmsfs/providers.toml]
    #[arg(long, global = true, value_name = "PATH", env = "KMSFS_CONFIG")]
    config: Option<PathBuf>,
    /// Audit log: every key operation (provider calls and key administration, failures too) and
    /// volume event is appended here, HMAC-chained; its key and anchor go to PATH.state
    /// [default: audit.jsonl beside the keystore]
    #[arg(long, global = true, value_name = "PATH", env = "KMSFS_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
    /// KMSFS_PASSPHRASE, taken out of the environment at start.
    #[arg(skip)]
    env_passphrase: Option<zeroize::Zeroizing<String>>,
}

#[derive(Subcommand)]
enum Command {
    /// Create a new encrypted volume in an empty or new backing directory
    Init(InitArgs),
    /// Mount a volume (goes to the background once the mount is ready, unless -f)
    Mount(daemon::MountArgs),
    /// Unmount a kmsfs mount point and wait for its daemon to finish (refused, exit 7, while
    /// the daemon cannot commit file keys, so that they are not lost: fix the cause, or --force)
    #[command(alias = "unmount")]
    Umount {
        /// The mount point
        mountpoint: PathBuf,
        /// Unmount even while file keys cannot be committed: the daemon saves them to
        /// kmsfs.pending-keys if it can, and the files whose keys it cannot save are lost
        #[arg(long)]
        force: bool,
    },
    /// Rotate the volume key: re-wrap every file key under a new version, retire the old one
    /// (no file data is rewritten; works mounted or not; resumes an interrupted rotation)
    Rotate {
        /// The backing directory, or a mount point of one
        backing: PathBuf,
        /// Machine-readable output: JSON on stdout, and errors as JSON on stderr (log lines too)
        #[arg(long)]
        json: bool,
    },
    /// Re-wrap the volume-key blobs under the master key's newest version (after `kmsfs key rotate`)
    Rewrap {
        /// The backing directory, or a mount point of one
        backing: PathBuf,
        /// Machine-readable output: JSON on stdout, and errors as JSON on stderr (log lines too)
        #[arg(long)]
        json: bool,
    },
    /// Re-encrypt files under fresh data keys (for a data key that may have leaked);
    /// PATH is on a mounted volume, or a file in an unmounted volume's backing directory
    Rekey {
        /// Files to re-key
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Machine-readable output: JSON on stdout, and errors as JSON on stderr (log lines too)
        #[arg(long)]
        json: bool,
    },
    /// Check a volume (unmounted): every directory IV, name, header, data key and block tag,
    /// and the metadata DB. Exit codes: 0 clean, 10 problems found, 11 all repaired, 12 some remain
    Fsck {
        /// The backing directory, or a mount point of one (fsck checks unmounted volumes only)
        backing: PathBuf,
        /// Fix what can be fixed without guessing; move unreadable entries into lost+found
        #[arg(long)]
        repair: bool,
        /// With --repair: rewrite unreadable blocks as zeros (reported) so the rest of a file reads
        #[arg(long)]
        salvage: bool,
        /// Machine-readable output: JSON on stdout, and errors as JSON on stderr (log lines too)
        #[arg(long)]
        json: bool,
    },
    /// Master keys in the local keystore
    #[command(subcommand)]
    Key(keys::KeyCommand),
    /// The local keystore itself
    #[command(subcommand)]
    Keystore(keys::KeystoreCommand),
    /// List the audit log's records (filtered), or check it with `audit verify`
    Audit(audit::AuditArgs),
    /// Print a shell completion script (bash: `kmsfs completions bash >
    /// /etc/bash_completion.d/kmsfs`; zsh: into a directory of $fpath as `_kmsfs`;
    /// fish: ~/.config/fish/completions/kmsfs.fish)
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Write man pages (kmsfs.1 and one per command) into DIR, e.g. /usr/share/man/man1
    Manpages {
        /// Where to write them (created if missing)
        dir: PathBuf,
    },
    /// Show a volume's id, key provider, volume-key versions and mount state
    Status {
        /// The backing directory, or a mount point of one
        backing: PathBuf,
        /// Machine-readable output: JSON on stdout, and errors as JSON on stderr (log lines too)
        #[arg(long)]
        json: bool,
        /// Also ask the key provider for the master key's state (DescribeKey; needs its credentials)
        #[arg(long)]
        check_key: bool,
    },
}

#[derive(Args)]
struct InitArgs {
    /// The backing directory (created if missing; must be empty); with --reverse, the plaintext directory
    backing: PathBuf,
    /// Make a volume for an encrypted, read-only view of the plaintext directory BACKING (for backups):
    /// kept in BACKING/.kmsfs-reverse, mounted with `kmsfs mount --reverse BACKING MOUNTPOINT`
    #[arg(long)]
    reverse: bool,
    /// Use this existing master key (id or alias) instead of creating one
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
    /// Argon2id memory cost in MiB when a new keystore is created
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    kdf_memory_mib: u32,
    /// Argon2id iterations when a new keystore is created
    #[arg(long, default_value_t = 3, value_name = "N")]
    kdf_iterations: u32,
    /// Machine-readable output: JSON on stdout, and errors as JSON on stderr (log lines too)
    #[arg(long)]
    json: bool,
}

fn init(args: InitArgs, keys: &KeyOptions) -> Result<(), CliError> {
    let backing = args.backing.clone();
    let result = create_volume(args, keys);
    let event = volumes::volume_event("CreateVolume", &backing);
    kmsfs::audit::record(event.outcome(&result.as_ref().map_err(|e| &e.message)));
    result
}

fn create_volume(args: InitArgs, keys: &KeyOptions) -> Result<(), CliError> {
    let dir = if args.reverse {
        reverse_volume_dir(&args.backing)?
    } else {
        args.backing.clone()
    };
    let make = |provider: &dyn kmsfs::kms::KeyProvider| {
        if args.reverse {
            kmsfs::volume::Volume::create_reverse(&dir, provider)
        } else {
            kmsfs::volume::Volume::create(&dir, provider)
        }
    };
    let remote = keys.kms.as_deref().filter(|u| !u.starts_with("local:"));
    let (row, keystore) = match remote {
        Some(raw) => {
            let uri = kmsfs::kms::uri::ProviderUri::parse(raw)?;
            kmsfs::volume::Volume::check_new_backing(&dir)?;
            let config_path = host_config::path(keys.config.as_deref())?;
            // Fail on a bad configuration before a volume exists.
            host_config::HostConfig::load(&config_path)?;
            let provider = kmsfs::kms::audited::audited(kmsfs::kms::connect(&uri)?);
            let row = make(&*provider)?;
            let entry = host_config::VolumeEntry {
                kms: kmsfs::kms::uri::without_secrets(raw),
                backing: Some(std::fs::canonicalize(&dir).unwrap_or(dir.clone())),
            };
            host_config::HostConfig::record(&config_path, &kmsfs::util::hex(&row.volume_id), entry).map_err(|e| {
                CliError::new(
                    e.code,
                    format!(
                        "volume created in {}, but {}; mount it with --kms",
                        args.backing.display(),
                        e.message
                    ),
                )
            })?;
            if uri.has_secret() {
                log::warn!(
                    "the PIN given with pin-value= is not saved; at mount give it with \
                     pin-source=, KMSFS_PKCS11_PIN or --kms"
                );
            }
            (row, None)
        }
        None => {
            // Before a master key is made for it, so a refused init leaves none behind.
            kmsfs::volume::Volume::check_new_backing(&dir)?;
            let kdf = kmsfs::kms::local::KdfParams {
                memory_kib: args.kdf_memory_mib.saturating_mul(1024),
                iterations: args.kdf_iterations,
                parallelism: 1,
            };
            let (store, created) = secrets::open_or_create_keystore(keys, kdf)?;
            let named = keys
                .kms
                .as_deref()
                .and_then(|u| u.strip_prefix("local:"))
                .filter(|k| !k.is_empty());
            let key_id = match named.or(args.key.as_deref()) {
                Some(k) => store.key_id(k)?,
                None => {
                    let at = std::path::absolute(&args.backing).unwrap_or(args.backing.clone());
                    store.create_key(&format!("kmsfs volume at {}", at.display()))?
                }
            };
            let store = std::sync::Arc::new(store);
            let provider = kmsfs::kms::audited::audited(std::sync::Arc::new(store.provider(&key_id)?));
            let row = make(&*provider)?;
            volumes::note_use(&*provider, &dir);
            (row, Some((store.path().to_path_buf(), created)))
        }
    };
    let volume_id = kmsfs::util::hex(&row.volume_id);
    if args.json {
        let out = serde_json::json!({
            "volume_id": volume_id,
            "backing": args.backing,
            "reverse": args.reverse,
            "volume_dir": dir,
            "provider": row.provider,
            "master_key_id": row.master_key_id,
            "keystore": keystore.as_ref().map(|(p, _)| p),
            "keystore_created": keystore.as_ref().map(|(_, c)| c),
        });
        outln!("{out}");
    } else {
        if args.reverse {
            outln!(
                "Created volume {volume_id} for a reverse view of {} (kept in {})",
                args.backing.display(),
                dir.display()
            );
        } else {
            outln!("Created volume {volume_id} in {}", args.backing.display());
        }
        match &keystore {
            Some((path, _)) => outln!("Master key {} in keystore {}", row.master_key_id, path.display()),
            None => outln!("Master key {} with provider {}", row.master_key_id, row.provider),
        }
        outln!(
            "Mount it with: {}",
            mount_hint(&args.backing, args.reverse, keys, keystore.is_some())
        );
    }
    Ok(())
}

/// Where the volume of a reverse view of `plain` goes: `plain` must be an
/// existing directory (a reverse view encrypts what is there).
fn reverse_volume_dir(plain: &std::path::Path) -> Result<PathBuf, CliError> {
    match std::fs::metadata(plain) {
        Ok(m) if m.is_dir() => Ok(kmsfs::reverse::volume_dir(plain)),
        Ok(_) => Err(CliError::new(
            ExitCode::Usage,
            format!("{} is not a directory", plain.display()),
        )),
        Err(e) => Err(CliError::new(
            ExitCode::Usage,
            format!("plaintext directory {}: {e}", plain.display()),
        )),
    }
}

/// The command that mounts a new volume, with the options `init` was given
/// that mounting needs too.
/// `local`: the volume's master key is in the keystore (whose options then
/// matter for mounting; for another provider they do not).
fn mount_hint(backing: &std::path::Path, reverse: bool, keys: &KeyOptions, local: bool) -> String {
    let mut hint = String::from("kmsfs");
    let options = [
        ("--keystore", &keys.keystore),
        ("--key-file", &keys.key_file),
        ("--passphrase-file", &keys.passphrase_file),
        ("--config", &keys.config),
    ];
    for (flag, value) in options {
        // A host configuration init did not write is no use for mounting,
        // nor a keystore that holds no key of the volume.
        let unused =
            (flag == "--config" && value.as_ref().is_some_and(|p| !p.exists())) || (flag != "--config" && !local);
        if let Some(path) = value.as_ref().filter(|_| !unused) {
            hint.push_str(&format!(" {flag} {}", shell_quoted(path)));
        }
    }
    let reverse = if reverse { " --reverse" } else { "" };
    format!("{hint} mount{reverse} {} MOUNTPOINT", shell_quoted(backing))
}

/// `mount.kmsfs BACKING MOUNTPOINT [-o OPTS] [-n] [-s] [-v]`, as mount(8)
/// calls helpers, becomes `kmsfs mount BACKING MOUNTPOINT [-o OPTS]`.
fn arguments() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as = args.first().map(std::path::PathBuf::from);
    let name = invoked_as
        .as_deref()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str());
    // mount(8) runs mount.kmsfs for `-t kmsfs`, mount.fuse.kmsfs for `-t fuse.kmsfs`.
    if matches!(name, Some("mount.kmsfs" | "mount.fuse.kmsfs")) {
        args.retain(|a| !matches!(a.to_str(), Some("-n" | "-s" | "-v" | "-f")));
        args.insert(1, "mount".into());
    }
    args
}

pub fn run() -> i32 {
    harden::harden_process();
    let env_passphrase = harden::take_env_secret(secrets::PASSPHRASE_ENV);
    let args = arguments();
    // With --json a script reads errors too: as JSON, on stderr.
    let json_errors = args.iter().any(|a| a == "--json");
    let mut cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() && json_errors => {
            let message = e.render().to_string();
            return report(
                &CliError::new(ExitCode::Usage, message.trim().trim_start_matches("error: ")),
                true,
            );
        }
        Err(e) => {
            // --help and --version print to stdout: a failed write is not a success.
            return match e.print() {
                Err(w) if w.kind() == std::io::ErrorKind::BrokenPipe => output::BROKEN_PIPE_STATUS,
                Err(_) => ExitCode::Io as i32,
                Ok(()) if e.use_stderr() => ExitCode::Usage as i32,
                Ok(()) => 0,
            };
        }
    };
    cli.keys.env_passphrase = env_passphrase;
    let log_file = match &cli.command {
        Command::Mount(m) => m.log_file.clone(),
        _ => None,
    };
    if let Err(e) = logging::init(log_file.as_deref(), json_errors) {
        return report(&e, json_errors);
    }
    // `mount` installs its log once its -o options (keystore=, audit_log=) are read.
    if let Some(name) = audited_command(&args).filter(|name| name != "mount")
        && let Err(e) = audit::install(&cli.keys, &name)
    {
        return report(&e, json_errors);
    }
    // fsck's own exit status (0 clean, 10, 11, 12), when it ran to the end.
    let mut fsck_exit = None;
    let result = match cli.command {
        Command::Audit(args) => audit::audit(args, &cli.keys),
        Command::Init(args) => init(args, &cli.keys),
        Command::Mount(args) => daemon::mount(args, &cli.keys),
        Command::Umount { mountpoint, force } => umount::umount(&mountpoint, force),
        Command::Status {
            backing,
            json,
            check_key,
        } => status::status(&backing, json, check_key, &cli.keys),
        Command::Rotate { backing, json } => {
            volumes::volume_arg(&backing).and_then(|b| rotation::rotate(&b, &cli.keys, json))
        }
        Command::Rewrap { backing, json } => {
            volumes::volume_arg(&backing).and_then(|b| rotation::rewrap(&b, &cli.keys, json))
        }
        Command::Key(command) => keys::key(command, &cli.keys),
        Command::Keystore(command) => keys::keystore(command, &cli.keys),
        Command::Rekey { paths, json } => rekey::rekey(&paths, &cli.keys, json),
        Command::Completions { shell } => generate::completions(shell),
        Command::Manpages { dir } => generate::man_pages(&dir),
        Command::Fsck {
            backing,
            repair,
            salvage,
            json,
        } => volumes::volume_arg(&backing)
            .and_then(|backing| {
                fsck::fsck(
                    &backing,
                    &cli.keys,
                    kmsfs::volume::fsck::FsckOptions { repair, salvage },
                    json,
                )
            })
            .map(|code| fsck_exit = Some(code)),
    };
    // Done, but unrecorded: the exit status says so (the failure is not hidden behind a 0).
    let result = result.and_then(|()| match (kmsfs::audit::failure(), fsck_exit) {
        (Some(e), Some(code)) => Err(CliError::new(
            ExitCode::Io,
            format!("fsck ran (exit {code}), but its audit record could not be written: {e}"),
        )),
        (Some(e), None) => Err(CliError::new(
            ExitCode::Io,
            format!("the command was carried out, but its audit record could not be written: {e}"),
        )),
        (None, _) => Ok(()),
    });
    // The output goes out once the work and its record are done: a reader
    // that went away can cost only output.
    let written = output::flush();
    match (result, written) {
        (Err(e), _) => report(&e, json_errors),
        (Ok(()), Ok(())) => fsck_exit.unwrap_or(0),
        (Ok(()), Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => output::BROKEN_PIPE_STATUS,
        (Ok(()), Err(e)) => report(
            &CliError::new(
                ExitCode::Io,
                format!("the command was carried out, but its output could not be written: {e}"),
            ),
            json_errors,
        ),
    }
}

/// The command's name as the audit log records it (`mount`, `key disable`,
/// `key alias create`), or None for commands that use no key and change no
/// volume (`audit`, `umount` (its daemon records), completions, man pages).
fn audited_command(args: &[std::ffi::OsString]) -> Option<String> {
    use clap::CommandFactory;
    let matches = Cli::command().try_get_matches_from(args).ok()?;
    let mut names = Vec::new();
    let mut at = matches.subcommand();
    while let Some((name, sub)) = at {
        names.push(name.to_string());
        at = sub.subcommand();
    }
    let first = names.first()?.as_str();
    // `status` asks the key provider for nothing unless told to check the key.
    let keyless_status = matches
        .subcommand_matches("status")
        .is_some_and(|m| !m.get_flag("check_key"));
    (!keyless_status && !matches!(first, "audit" | "umount" | "completions" | "manpages")).then(|| names.join(" "))
}

/// Prints a failure on stderr (a line, or with --json one JSON object) and
/// returns the exit status.
fn report(e: &CliError, json: bool) -> i32 {
    if json {
        let error = serde_json::json!({"error": {
            "code": e.code.name(),
            "exit_status": e.code as i32,
            "message": e.message,
        }});
        // Ignored if stderr is gone too: the exit status still says it.
        let _ = writeln!(std::io::stderr(), "{error}");
    } else {
        let _ = writeln!(std::io::stderr(), "kmsfs: {}", printable(&e.message));
    }
    e.code as i32
}
