//! Finding the keystore and the secret that unlocks it.

use std::io::IsTerminal;
use std::path::PathBuf;

use kmsfs::kms::local::{KdfParams, LocalKeystore, UnlockSecret, create_key_file};
use zeroize::Zeroizing;

use super::{CliError, ExitCode, KeyOptions};

pub const PASSPHRASE_ENV: &str = "KMSFS_PASSPHRASE";

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

fn passphrase(keys: &KeyOptions, confirm: bool) -> Result<Zeroizing<String>, CliError> {
    let secret_err = |m: String| CliError::new(ExitCode::Secret, m);
    if let Some(p) = &keys.env_passphrase {
        return Ok(p.clone());
    }
    if !std::io::stdin().is_terminal() {
        return Err(secret_err(format!(
            "no passphrase: use --passphrase-file, {PASSPHRASE_ENV}, or run on a terminal"
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

fn unlock_secret(keys: &KeyOptions, confirm: bool) -> Result<UnlockSecret, CliError> {
    if let Some(k) = &keys.key_file {
        return Ok(UnlockSecret::KeyFile(k.clone()));
    }
    if let Some(f) = &keys.passphrase_file {
        let text = Zeroizing::new(std::fs::read_to_string(f).map_err(|e| {
            CliError::new(
                ExitCode::Secret,
                format!("cannot read passphrase file {}: {e}", f.display()),
            )
        })?);
        let line = text.lines().next().unwrap_or("");
        return Ok(UnlockSecret::Passphrase(Zeroizing::new(line.to_string())));
    }
    Ok(UnlockSecret::Passphrase(passphrase(keys, confirm)?))
}

pub fn open_keystore(keys: &KeyOptions) -> Result<LocalKeystore, CliError> {
    let path = keystore_path(keys)?;
    if !LocalKeystore::exists(&path) {
        return Err(kmsfs::kms::KmsError::KeystoreMissing(path).into());
    }
    Ok(LocalKeystore::open(&path, &unlock_secret(keys, false)?)?)
}

/// Opens the keystore, creating it (and a key file, if one was asked for) when missing.
pub fn open_or_create_keystore(keys: &KeyOptions, kdf: KdfParams) -> Result<(LocalKeystore, bool), CliError> {
    let path = keystore_path(keys)?;
    if LocalKeystore::exists(&path) {
        return Ok((open_keystore(keys)?, false));
    }
    if let Some(k) = &keys.key_file {
        if !k.exists() {
            create_key_file(k)?;
            eprintln!(
                "kmsfs: created key file {} (keep it safe: without it the volume is lost)",
                k.display()
            );
        }
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
