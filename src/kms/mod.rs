//! Key providers: where the master key (CMK) lives. Every provider offers the
//! same two KMS operations on data keys, bound to an encryption context.

pub mod audited;
pub mod aws;
mod aws_credentials;
mod http;
pub mod identity;
pub mod local;
pub mod locked_file;
pub mod pkcs11;
pub mod uri;
pub mod vault;

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::crypto::{SecretKey, WrappedKey};
pub use identity::ProviderId;
use uri::ProviderUri;

/// Key/value pairs bound to a wrapped key as authenticated data, as in AWS KMS:
/// a blob only decrypts with exactly the context it was created with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl EncryptionContext {
    pub fn for_volume(volume_id: &[u8; 16]) -> Self {
        let mut map = BTreeMap::new();
        map.insert("kmsfs:volume-id".to_string(), crate::util::hex(volume_id));
        EncryptionContext(map)
    }

    /// Unambiguous byte encoding: length-prefixed keys and values in sorted order.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in &self.0 {
            for part in [k, v] {
                out.extend_from_slice(&(part.len() as u32).to_be_bytes());
                out.extend_from_slice(part.as_bytes());
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("wrong passphrase for keystore {0}")]
    WrongPassphrase(PathBuf),
    #[error("wrong key file for keystore {0}")]
    WrongKeyFile(PathBuf),
    #[error(
        "keystore {0} does not exist: pass --keystore (or set KMSFS_KEYSTORE) naming the one that \
         holds the master key, or restore it from a backup; `kmsfs init` makes a new keystore for a \
         new volume only, with keys no existing volume uses"
    )]
    KeystoreMissing(PathBuf),
    #[error("keystore {path} is unreadable: {reason}")]
    KeystoreCorrupt { path: PathBuf, reason: String },
    #[error("key {0} not found in the keystore")]
    KeyNotFound(String),
    #[error(
        "the wrapped key names version {version} of master key {key}, which keystore {path} does not \
         hold: {}",
        match (newest, oldest) {
            (Some(newest), _) if version > newest =>
                "the keystore is older than the one that wrapped it (restore its newest backup), or what holds \
                 the wrapped key (the volume's metadata DB) was altered",
            (_, Some(oldest)) if version < oldest =>
                "that version was destroyed (`kmsfs key trim`): a volume, or a backup of one, still wrapped \
                 under it opens only with a copy of the keystore from before the trim",
            _ => "what holds the wrapped key (the volume's metadata DB) was altered",
        }
    )]
    UnknownKeyVersion {
        key: String,
        version: u32,
        path: PathBuf,
        /// The versions the keystore holds, newest and oldest.
        newest: Option<u32>,
        oldest: Option<u32>,
    },
    #[error("key {key} is {state} and cannot be used")]
    KeyNotUsable { key: String, state: String },
    #[error("the wrapped volume key does not decrypt under key {0} with this volume's encryption context")]
    InvalidCiphertext(String),
    #[error("{0}")]
    BadSecret(String),
    #[error("key provider {provider} is unreachable: {cause}")]
    Unreachable { provider: String, cause: String },
    #[error("key provider {provider} refused: {code}: {message}")]
    Refused {
        provider: String,
        code: String,
        message: String,
    },
    #[error("key provider {provider}: refusing {url}: {reason}")]
    InsecureTransport {
        provider: String,
        url: String,
        reason: &'static str,
    },
    #[error(
        "Argon2id with {memory_mib} MiB and {iterations} pass(es) is too weak for a keystore: \
         at least 19 MiB and 2 passes (--kdf-memory-mib, --kdf-iterations)"
    )]
    WeakKdf { memory_mib: u32, iterations: u32 },
    #[error("bad key provider URI {uri}: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("key provider {provider}: {message}")]
    Config { provider: String, message: String },
    #[error(
        "key {key}: versions below {min_version} still wrap the keys of {users}; run `kmsfs rewrap BACKING` on each first"
    )]
    VersionsInUse {
        key: String,
        min_version: u32,
        users: String,
    },
    #[error(
        "key {key} holds imported material: {action} is not possible for it; create a new key and import new material"
    )]
    ImportedKey { key: String, action: String },
    #[error("key {key}: import refused: {reason}")]
    ImportRejected { key: String, reason: String },
    #[error("bad setting {name}: {message}")]
    BadSetting { name: &'static str, message: String },
    #[error("keystore I/O on {path}: {source} (the keystore's place is set with --keystore or KMSFS_KEYSTORE)")]
    Io { path: PathBuf, source: std::io::Error },
}

/// What DescribeKey says of a master key.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct KeyStatus {
    /// The provider's word for it: Enabled, Disabled, PendingDeletion, …
    pub state: String,
    /// When a key pending deletion is destroyed (seconds since the epoch).
    pub deletion_date: Option<u64>,
    /// When imported key material expires (seconds since the epoch).
    pub material_valid_to: Option<u64>,
    /// The oldest master-key version the provider still decrypts with
    /// (Vault's `min_decryption_version`), where it has such a floor.
    pub decrypts_from: Option<u32>,
    /// The oldest and newest master-key versions the provider holds, where
    /// it knows them all (the local keystore: `key trim` destroys the oldest).
    pub versions_held: Option<(u32, u32)>,
}

impl KeyStatus {
    pub fn of(state: impl Into<String>) -> Self {
        KeyStatus {
            state: state.into(),
            ..KeyStatus::default()
        }
    }
}

/// A master key in some key provider. Implementations count their calls so
/// that `status` can show that file operations never reach the provider.
pub trait KeyProvider: Send + Sync {
    /// The key's identifiers, as the volume records them (never how to reach it).
    fn id(&self) -> ProviderId;

    /// GenerateDataKey: a fresh 256-bit key, and the same key wrapped by the master key.
    fn generate_data_key(&self, context: &EncryptionContext) -> Result<(SecretKey, WrappedKey), KmsError>;

    /// Decrypt: unwraps a key produced by `generate_data_key` with the same context.
    fn decrypt(&self, wrapped: &WrappedKey, context: &EncryptionContext) -> Result<SecretKey, KmsError>;

    /// ReEncrypt: the same data key, wrapped again under the master key's
    /// newest version (after the master key was rotated in the provider).
    fn re_encrypt(&self, wrapped: &WrappedKey, context: &EncryptionContext) -> Result<WrappedKey, KmsError>;

    /// How many provider operations this instance has performed.
    fn call_count(&self) -> u64;

    /// The master key's state as the provider reports it (DescribeKey).
    fn key_state(&self) -> Result<KeyStatus, KmsError>;

    /// Whether `wrapped` is under an older version of the master key than
    /// the newest (so a ReEncrypt would move it forward). Only the local
    /// provider can tell without a call; the others say no.
    fn is_behind(&self, _wrapped: &WrappedKey) -> bool {
        false
    }

    /// Remembers that volume `volume_id` at `backing` holds `blobs` wrapped
    /// by this key, so that old versions are never trimmed from under it.
    /// Only the local keystore keeps such a record; best effort.
    fn note_volume(&self, _volume_id: &[u8; 16], _backing: &std::path::Path, _blobs: &[WrappedKey]) {}

    /// Lets go of what a fork would leave half-usable in the child (a
    /// PKCS#11 library's sessions and threads): the next call sets it up
    /// again, in whichever process makes it.
    fn before_fork(&self) {}
}

/// Connects to a remote provider named by a URI the user gave (`local:`
/// needs the keystore and its secret, which the caller handles). What the
/// URI leaves out comes from the environment.
pub fn connect(uri: &ProviderUri) -> Result<std::sync::Arc<dyn KeyProvider>, KmsError> {
    Ok(match uri {
        ProviderUri::AwsKms { key, query } => std::sync::Arc::new(aws::AwsKmsProvider::new(key, query)?),
        ProviderUri::VaultTransit {
            address,
            mount,
            key,
            query,
        } => std::sync::Arc::new(vault::VaultTransitProvider::new(address.as_deref(), mount, key, query)?),
        ProviderUri::Pkcs11 { path, query } => std::sync::Arc::new(pkcs11::Pkcs11Provider::new(path, query)?),
        ProviderUri::Local { key } => {
            return Err(KmsError::BadUri {
                uri: format!("local:{key}"),
                reason: "local: is opened with its keystore".into(),
            });
        }
    })
}
