//! Finding the keystore and the secret that unlocks it.

use std::io::IsTerminal;
use std::path::PathBuf;

use kmsfs::kms::local::{KdfParams, LocalKeystore, UnlockSecret, create_key_file};
use zeroize::Zeroizing;

use super::{CliError, ExitCode, KeyOptions};

pub const PASSPHRASE_ENV: &str = "KMSFS_PASSPHRASE";
/// The new passphrase for `keystore passwd`, when not prompted for.
const NEW_PASSPHRASE_ENV: &str = "KMSFS_NEW_PASSPHRASE";

pub fn keystore_path(keys: &KeyOptions) -> Result<PathBuf, CliError> {
    if let Some(p) = &keys.keystore {
        return Ok(p.clone());
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .ok_or_else(|| {
            CliError::new(
                ExitCode::Usage,
                "cannot find a data directory: set --keystore or KMSFS_KEYSTORE",
            )
        })?;
    Ok(data.join("kmsfs").join("keystore.json"))
}

/// systemd's credentials (`LoadCredential=kmsfs-passphrase:…` or
/// `kmsfs-key-file:…`), when the service has them.
const CREDENTIAL_PASSPHRASE: &str = "kmsfs-passphrase";
const CREDENTIAL_KEY_FILE: &str = "kmsfs-key-file";

fn secret_err(message: String) -> CliError {
    CliError::new(ExitCode::Secret, message)
}

/// The first line of a passphrase file.
fn first_line_of(path: &std::path::Path, what: &str) -> Result<Zeroizing<String>, CliError> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| secret_err(format!("cannot read {what} {}: {e}", path.display())))?,
    );
    Ok(Zeroizing::new(text.lines().next().unwrap_or("").to_string()))
}

/// Runs the --extpass command; its first line of output is the passphrase.
fn external_passphrase(command: &str) -> Result<Zeroizing<String>, CliError> {
    let out = std::process::Command::new("/bin/sh")
        .args(["-c", command])
        .stdin(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| secret_err(format!("--extpass: cannot run /bin/sh: {e}")))?;
    let stdout = Zeroizing::new(out.stdout);
    if !out.status.success() {
        return Err(secret_err(format!(
            "--extpass command failed ({}); no passphrase",
            out.status
        )));
    }
    let text = std::str::from_utf8(&stdout).map_err(|_| secret_err("--extpass printed no UTF-8 text".into()))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(secret_err("--extpass command printed an empty passphrase".into()));
    }
    Ok(Zeroizing::new(line.to_string()))
}

fn prompt_passphrase(confirm: bool) -> Result<Zeroizing<String>, CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(secret_err(format!(
            "no passphrase: use --passphrase-file, --extpass, {PASSPHRASE_ENV}, a systemd credential \
             ({CREDENTIAL_PASSPHRASE} or {CREDENTIAL_KEY_FILE}), or run on a terminal"
        )));
    }
    let first = Zeroizing::new(rpassword::prompt_password("Passphrase: ").map_err(|e| secret_err(e.to_string()))?);
    if confirm {
        let again =
            Zeroizing::new(rpassword::prompt_password("Repeat passphrase: ").map_err(|e| secret_err(e.to_string()))?);
        if *first != *again {
            return Err(secret_err("the passphrases do not match".into()));
        }
    }
    Ok(first)
}

/// An empty passphrase is a mistake (an unset variable, an empty file), not
/// a guess: said as such, never tried as a wrong one.
fn passphrase(text: Zeroizing<String>, from: &str) -> Result<UnlockSecret, CliError> {
    if text.is_empty() {
        return Err(secret_err(format!("the passphrase from {from} is empty")));
    }
    Ok(UnlockSecret::Passphrase(text))
}

fn unlock_secret(keys: &KeyOptions, confirm: bool) -> Result<UnlockSecret, CliError> {
    if let Some(k) = &keys.key_file {
        return Ok(UnlockSecret::KeyFile(k.clone()));
    }
    if let Some(f) = &keys.passphrase_file {
        return passphrase(first_line_of(f, "passphrase file")?, "the passphrase file");
    }
    if let Some(command) = &keys.extpass {
        return Ok(UnlockSecret::Passphrase(external_passphrase(command)?));
    }
    if let Some(p) = &keys.env_passphrase {
        return passphrase(p.clone(), PASSPHRASE_ENV);
    }
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from) {
        let key_file = dir.join(CREDENTIAL_KEY_FILE);
        if key_file.is_file() {
            return Ok(UnlockSecret::KeyFile(key_file));
        }
        let credential = dir.join(CREDENTIAL_PASSPHRASE);
        if credential.is_file() {
            return passphrase(
                first_line_of(&credential, "systemd credential")?,
                "the systemd credential",
            );
        }
    }
    passphrase(prompt_passphrase(confirm)?, "the terminal")
}

/// The secret `keystore passwd` protects the keystore with from now on.
pub fn new_secret(
    key_file: Option<&std::path::Path>,
    passphrase_file: Option<&std::path::Path>,
) -> Result<UnlockSecret, CliError> {
    if let Some(k) = key_file {
        if !k.exists() {
            create_key_file(k)?;
            log::warn!(
                "created key file {} (keep it safe: without it the keystore cannot be opened)",
                k.display()
            );
        }
        return Ok(UnlockSecret::KeyFile(k.to_path_buf()));
    }
    if let Some(f) = passphrase_file {
        return passphrase(first_line_of(f, "new passphrase file")?, "the new passphrase file");
    }
    if let Some(p) = crate::cli::harden::take_env_secret(NEW_PASSPHRASE_ENV) {
        return passphrase(p, NEW_PASSPHRASE_ENV);
    }
    passphrase(prompt_passphrase(true)?, "the terminal")
}

pub fn open_keystore(keys: &KeyOptions) -> Result<LocalKeystore, CliError> {
    let path = keystore_path(keys)?;
    if !LocalKeystore::exists(&path) {
        return Err(kmsfs::kms::KmsError::KeystoreMissing(path).into());
    }
    let opened = LocalKeystore::open(&path, &unlock_secret(keys, false)?);
    if let Err(e) = &opened {
        // A wrong passphrase is someone trying the keys: worth a record.
        let event = kmsfs::audit::Event::new("UnlockKeystore").details(serde_json::json!({ "keystore": path }));
        kmsfs::audit::record(event.outcome::<(), _>(&Err(e)));
    }
    Ok(opened?)
}

/// Opens the keystore, creating it (and a key file, if one was asked for) when missing.
pub fn open_or_create_keystore(keys: &KeyOptions, kdf: KdfParams) -> Result<(LocalKeystore, bool), CliError> {
    let path = keystore_path(keys)?;
    if LocalKeystore::exists(&path) {
        return Ok((open_keystore(keys)?, false));
    }
    if let Some(k) = &keys.key_file
        && !k.exists()
    {
        create_key_file(k)?;
        log::warn!(
            "created key file {} (keep it safe: without it the volume is lost)",
            k.display()
        );
    }
    let secret = unlock_secret(keys, true)?;
    match LocalKeystore::create(&path, &secret, kdf) {
        Ok(store) => Ok((store, true)),
        // Another command created it meanwhile: use that one.
        Err(kmsfs::kms::KmsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok((LocalKeystore::open(&path, &secret)?, false))
        }
        Err(e) => Err(e.into()),
    }
}
