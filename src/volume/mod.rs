//! The volume: the backing directory, its metadata DB and the unwrapped key
//! hierarchy. Testable without mounting; the FUSE layer is built on it.

mod commit;
pub mod content;
pub mod db;
pub mod fsck;
pub mod header;
mod host_record;
pub mod keyring;
pub mod layout;
pub mod lock;
pub mod namespace;
pub mod rekey;
pub mod rescue;
pub mod rotate;
#[cfg(test)]
mod tests;
pub mod xattrs;

use std::collections::HashMap;
use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::crypto::{BlockCipher, DerivedKeys, FileId, Layout, NameCipher, NameError, Sealer, SecretKey, random_array};
use crate::kms::{EncryptionContext, KeyProvider, KmsError};
use db::{Check, DB_FILE, DbError, FORMAT_VERSION, MetadataDb, VolumeKeyRow, VolumeRow};
use keyring::{KeyRing, secret_aad};
use layout::{DIR_IV_FILE, DirIv};

const SECRET_NAMES: &str = "name";
const SECRET_XATTRS: &str = "xattr";
/// The secret of a volume whose files' keys are derived (a reverse view,
/// and copies of it): see docs/FORMAT.md, "Derived keys".
const SECRET_DERIVED: &str = "derived";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{0} is not a kmsfs volume (no {DB_FILE}); run `kmsfs init` first")]
    NotAVolume(PathBuf),
    #[error(
        "{0} is the plaintext directory of a reverse view: mount its view with `kmsfs mount --reverse`; \
         check and restore the copies of the view, which are volumes"
    )]
    ReversePlain(PathBuf),
    #[error(
        "{0} holds a kmsfs volume whose metadata DB ({DB_FILE}) is gone: restore it from a backup \
         (without it no file's key exists; do not run `kmsfs init` here)"
    )]
    DbMissing(PathBuf),
    #[error("{0} already holds a kmsfs volume")]
    AlreadyInitialized(PathBuf),
    #[error("{0} is not empty; kmsfs init needs an empty (or new) backing directory")]
    NotEmpty(PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{0} does not exist")]
    Missing(PathBuf),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Kms(#[from] KmsError),
    #[error("{what} in {volume} fails authentication: the metadata DB does not belong to this key or was altered")]
    Tampered { volume: PathBuf, what: String },
    #[error(
        "the daemon serving {volume} (pid {pid}) has not loaded the new volume key (version {version}) \
         (its log and `kmsfs status` say why: its key provider may fail it, or it may be stopped): {}",
        if *undone {
            "the rotation was undone, nothing changed; run `kmsfs rotate` again once it can reach the key provider"
        } else {
            "the older versions stay, so no key under them is lost; run `kmsfs rotate` again to finish the \
             rotation"
        }
    )]
    DaemonBehind {
        volume: PathBuf,
        pid: u32,
        version: u32,
        undone: bool,
    },
    #[error("{0}")]
    PendingKept(String),
    #[error(
        "another `kmsfs rotate` of {volume} began a newer rotation (volume key version {now}) while this one \
         moved keys to version {version}: that one finishes the work; run `kmsfs rotate` again if it fails"
    )]
    RotationOvertaken { volume: PathBuf, version: u32, now: u32 },
    #[error("volume key version {version}: the key provider failed to give it {seconds_ago} s ago ({reason})")]
    KeyUnavailable {
        version: u32,
        reason: String,
        seconds_ago: u64,
    },
    #[error("{path} is not a pending-keys file kmsfs wrote: {reason}")]
    PendingDamaged { path: PathBuf, reason: String },
    #[error("no data key for file {0} in the metadata DB")]
    MissingFileKey(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A path the operation does not take (`rekey` of a hard-linked file).
    #[error("{path}: {why}")]
    NotTaken { path: PathBuf, why: String },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a fresh directory IV into `dir` and makes it durable.
pub fn write_dir_iv(dir: &Path) -> Result<DirIv, VolumeError> {
    namespace::open_dir(dir)
        .and_then(|fd| namespace::create_dir_iv(fd.as_fd()))
        .map_err(io_at(&dir.join(DIR_IV_FILE)))
}

/// What can be known of a volume without unlocking anything.
pub struct VolumeSummary {
    pub volume: VolumeRow,
    pub volume_keys: Vec<VolumeKeyRow>,
}

/// Reads the volume's rows (for `status`, and to choose the key provider
/// before mounting). Only the schema is checked: these are a few rows of
/// small tables, and `Volume::open` checks the whole DB before any key is
/// used.
pub fn read_info(backing: &Path) -> Result<VolumeSummary, VolumeError> {
    let db = open_db(backing, Check::Schema)?;
    Ok(VolumeSummary {
        volume: db.volume()?,
        volume_keys: db.volume_keys()?,
    })
}

/// (volume-key version, number of file keys wrapped under it), for
/// `status`: a pass over every file key.
pub fn file_key_counts(backing: &Path) -> Result<Vec<(u32, u64)>, VolumeError> {
    Ok(open_db(backing, Check::Schema)?.file_key_counts()?)
}

/// Why `backing`, which has no metadata DB, is not a volume.
pub fn not_a_volume(backing: &Path) -> VolumeError {
    if crate::reverse::volume_dir(backing).join(DB_FILE).exists() {
        VolumeError::ReversePlain(backing.to_path_buf())
    } else if backing.join(DIR_IV_FILE).exists() {
        // Its root directory IV is there: a volume that lost its DB.
        VolumeError::DbMissing(backing.to_path_buf())
    } else {
        VolumeError::NotAVolume(backing.to_path_buf())
    }
}

fn open_db(backing: &Path, check: Check) -> Result<MetadataDb, VolumeError> {
    if !backing.is_dir() {
        return Err(if backing.exists() {
            VolumeError::NotADirectory(backing.to_path_buf())
        } else {
            VolumeError::Missing(backing.to_path_buf())
        });
    }
    let path = backing.join(DB_FILE);
    // Looked at, not opened: SQLite is the only opener of the DB file.
    match fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not_a_volume(backing)),
        Err(source) => return Err(VolumeError::Io { path, source }),
        // A FIFO or device would have SQLite wait on it or read what it is not.
        Ok(meta) if !meta.is_file() && !meta.is_symlink() => {
            return Err(DbError::Damaged {
                path,
                reason: "not a regular file; restore the DB from a backup".into(),
            }
            .into());
        }
        // SQLite would make an empty file a new DB, writing to it.
        Ok(meta) if meta.len() == 0 => {
            return Err(DbError::Damaged {
                path,
                reason: "the file is empty (cut to 0 bytes); restore it from a backup".into(),
            }
            .into());
        }
        Ok(_) => {}
    }
    Ok(MetadataDb::open(&path, check)?)
}

/// An open volume with its keys unwrapped.
pub struct Volume {
    backing: PathBuf,
    info: VolumeRow,
    db: MetadataDb,
    keys: KeyRing,
    names: NameCipher,
    xattr_names: NameCipher,
    xattr_values: Sealer,
    link_targets: Sealer,
    /// Keys derived per file instead of stored (volumes of reverse views).
    derived: Option<DerivedKeys>,
    provider_calls: u64,
    /// Why the last commit of file keys failed, until one succeeds.
    commit_error: std::sync::Mutex<Option<String>>,
    /// Problems the mount cannot fix (`record_problem`): how many, the first.
    problems: std::sync::Mutex<(u64, Option<String>)>,
    /// Why the volume-key version a rotation made active could not be
    /// loaded (`follow_rotation`), until it is.
    behind: std::sync::Mutex<Option<(u32, String)>>,
    /// Set once the keys not committed were saved for the next mount: the
    /// flusher stops.
    keys_saved: std::sync::atomic::AtomicBool,
}

impl Volume {
    /// Whether `backing` can receive a new volume (missing, or an empty
    /// directory): checked before a master key is made for it.
    pub fn check_new_backing(backing: &Path) -> Result<(), VolumeError> {
        if backing.join(DB_FILE).exists() {
            return Err(VolumeError::AlreadyInitialized(backing.to_path_buf()));
        }
        if backing.exists() {
            if !backing.is_dir() {
                return Err(VolumeError::NotADirectory(backing.to_path_buf()));
            }
            if fs::read_dir(backing).map_err(io_at(backing))?.next().is_some() {
                return Err(VolumeError::NotEmpty(backing.to_path_buf()));
            }
        }
        Ok(())
    }

    /// `kmsfs init`: a new volume in an empty (or missing) directory.
    pub fn create(backing: &Path, provider: &dyn KeyProvider) -> Result<VolumeRow, VolumeError> {
        Self::create_kind(backing, provider, false)
    }

    /// `kmsfs init --reverse`: the volume of a reverse view, in an empty (or
    /// missing) directory that holds only its metadata DB. Its files' keys,
    /// ids, directory IVs and nonces are derived from one more secret.
    pub fn create_reverse(dir: &Path, provider: &dyn KeyProvider) -> Result<VolumeRow, VolumeError> {
        Self::create_kind(dir, provider, true)
    }

    fn create_kind(backing: &Path, provider: &dyn KeyProvider, derived: bool) -> Result<VolumeRow, VolumeError> {
        Self::check_new_backing(backing)?;
        let made_dir = !backing.exists();
        if made_dir {
            // Only its owner may list, read or replace what it holds.
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(backing)
                .map_err(io_at(backing))?;
        }
        let created = Self::create_in(backing, provider, derived);
        if created.is_err() && made_dir {
            // A refused or failed init (a disabled key, a provider down, a
            // full disk) leaves nothing behind in the directory it made.
            let _ = fs::remove_dir_all(backing);
        }
        created
    }

    fn create_in(backing: &Path, provider: &dyn KeyProvider, derived: bool) -> Result<VolumeRow, VolumeError> {
        let volume_id: [u8; 16] = random_array();
        let context = EncryptionContext::for_volume(&volume_id);
        let (volume_key, wrapped_vk) = provider.generate_data_key(&context)?;
        let vk = Sealer::new(&volume_key);
        let version = 1;
        let aad = |kind| secret_aad(&volume_id, kind, version, FORMAT_VERSION);
        let name_key = vk.wrap_key(&aad(SECRET_NAMES), &SecretKey::random());
        let xattr_key = vk.wrap_key(&aad(SECRET_XATTRS), &SecretKey::random());
        let mut secrets = vec![(SECRET_NAMES, &name_key), (SECRET_XATTRS, &xattr_key)];
        let derived_key = vk.wrap_key(&aad(SECRET_DERIVED), &SecretKey::random());
        if derived {
            secrets.push((SECRET_DERIVED, &derived_key));
        }
        let provider_id = provider.id();
        let row = VolumeRow {
            volume_id,
            format_version: FORMAT_VERSION,
            master_key_id: provider_id.key_label().to_string(),
            provider: provider_id.to_string(),
            created_at: crate::util::unix_now() as i64,
        };
        let db_path = backing.join(DB_FILE);
        let created = MetadataDb::create(&db_path, &row, (version, &wrapped_vk), &secrets);
        if let Err(e) = created {
            // A half-made DB would make the next `init` say "already a volume".
            for suffix in ["", "-wal", "-shm"] {
                let mut name = db_path.clone().into_os_string();
                name.push(suffix);
                let _ = fs::remove_file(name);
            }
            return Err(e.into());
        }
        if !derived {
            write_dir_iv(backing)?;
        }
        fs::File::open(backing)
            .and_then(|d| d.sync_all())
            .map_err(io_at(backing))?;
        Ok(row)
    }

    /// Opens a volume: one provider call per volume-key version, none after.
    pub fn open(backing: &Path, provider: Arc<dyn KeyProvider>) -> Result<Self, VolumeError> {
        Self::open_checking(backing, provider, Check::Whole)
    }

    /// Opens a volume to serve it: every page of the DB is checked by
    /// `check_db_in_background` once the mount is up, not before (the check
    /// of a million files' DB reads its 96 MB in b-tree order: 4.1 s from a
    /// cold cache on this VM, 0.24 s warm).
    pub fn open_to_serve(backing: &Path, provider: Arc<dyn KeyProvider>) -> Result<Self, VolumeError> {
        Self::open_checking(backing, provider, Check::Schema)
    }

    /// Checks every page of the DB on a thread of its own; damage found is
    /// logged and recorded as a problem (`problems`).
    pub fn check_db_in_background(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let path = self.backing.join(DB_FILE);
        let spawned = std::thread::Builder::new()
            .name("kmsfs-db-check".into())
            .spawn(move || {
                if let Err(e) = MetadataDb::check_file(&path) {
                    let what = format!("{e}; unmount and run kmsfs fsck");
                    log::error!("{what}");
                    if let Some(volume) = weak.upgrade() {
                        volume.record_problem(what);
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the thread checking the metadata DB: {e}");
        }
    }

    fn open_checking(backing: &Path, provider: Arc<dyn KeyProvider>, check: Check) -> Result<Self, VolumeError> {
        let db = open_db(backing, check)?;
        let info = db.volume()?;
        let calls_before = provider.call_count();
        let keys = KeyRing::load(&db, info.volume_id, Arc::clone(&provider))?;
        let tampered = |what: &str| VolumeError::Tampered {
            volume: backing.to_path_buf(),
            what: what.to_string(),
        };
        let mut secrets = HashMap::new();
        for (kind, version, wrapped) in db.secrets()? {
            // A provider that fails (a version a rotation made since the
            // keys were loaded) is the provider's failure, not tampering.
            let vk = keys.key(&db, version).map_err(|e| match e {
                VolumeError::Kms(_) | VolumeError::KeyUnavailable { .. } => e,
                _ => tampered(&format!("the {kind} key")),
            })?;
            let key = vk
                .unwrap_key(
                    &secret_aad(&info.volume_id, &kind, version, info.format_version),
                    &wrapped,
                )
                .map_err(|_| tampered(&format!("the {kind} key")))?;
            secrets.insert(kind, key);
        }
        let name_key = secrets.get(SECRET_NAMES).ok_or_else(|| tampered("the name key"))?;
        let xattr_key = secrets.get(SECRET_XATTRS).ok_or_else(|| tampered("the xattr key"))?;
        let unrestored = rescue::restore(backing, &keys, &db)?;
        // Format 1 used the name key for names and symlink targets, and the
        // xattr key for xattr names and values; from format 2 each purpose
        // has its own subkey.
        let subkey = |key: &SecretKey, purpose: &str| {
            if info.format_version >= 2 {
                key.derive(format!("kmsfs-{purpose}-v2").as_bytes())
            } else {
                key.clone()
            }
        };
        let volume = Volume {
            backing: backing.to_path_buf(),
            db,
            names: NameCipher::new(&subkey(name_key, "names")),
            xattr_names: NameCipher::new(&subkey(xattr_key, "xattr-names")),
            xattr_values: Sealer::new(&subkey(xattr_key, "xattr-values")),
            link_targets: Sealer::new(&subkey(name_key, "symlink-targets")),
            derived: secrets.get(SECRET_DERIVED).map(DerivedKeys::new),
            provider_calls: provider.call_count() - calls_before,
            commit_error: std::sync::Mutex::default(),
            problems: std::sync::Mutex::default(),
            behind: std::sync::Mutex::default(),
            keys_saved: std::sync::atomic::AtomicBool::new(false),
            keys,
            info,
        };
        for unstored in unrestored {
            match unstored {
                // The mount's own: its files whose keys these are read as EIO while it serves.
                rescue::Unstored::Keys(what) => volume.record_problem(what),
                // Logged (`set_aside`); `status` and `fsck` report the file while it is there.
                rescue::Unstored::NotAPendingFile(_) => {}
            }
        }
        Ok(volume)
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    pub fn info(&self) -> &VolumeRow {
        &self.info
    }

    pub fn db(&self) -> &MetadataDb {
        &self.db
    }

    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    /// Provider calls made while opening; file operations make none.
    pub fn provider_calls(&self) -> u64 {
        self.provider_calls
    }

    /// Provider calls made by this process so far.
    pub fn total_provider_calls(&self) -> u64 {
        self.keys.provider().call_count()
    }

    /// What the volume's format promises about the end of every file.
    pub fn layout(&self) -> Layout {
        if self.info.format_version >= 2 {
            Layout::Sealed
        } else {
            Layout::Lenient
        }
    }

    pub fn names(&self) -> &NameCipher {
        &self.names
    }

    /// A new file: a random id and data key, the wrapped key queued for the DB.
    pub fn new_file_key(&self) -> Result<(FileId, BlockCipher), VolumeError> {
        let file_id: FileId = random_array();
        let dek = SecretKey::random();
        let (version, wrapped) = self.keys.wrap_file_key(&file_id, &dek);
        if self.db.queue_file_key(file_id, version, wrapped) {
            self.sync_keys()?;
        }
        Ok((file_id, BlockCipher::new(&dek, file_id, self.layout())))
    }

    /// The derived keys of a volume made for a reverse view (and of its copies).
    pub fn derived(&self) -> Option<&DerivedKeys> {
        self.derived.as_ref()
    }

    /// The cipher of an existing file, from its wrapped key in the DB, or,
    /// in a volume with derived keys, derived from its id when it has no row.
    pub fn file_cipher(&self, file_id: &FileId) -> Result<BlockCipher, VolumeError> {
        let row = self.db.file_key(file_id)?;
        self.cipher_from_row(file_id, row)
    }

    /// `file_cipher` of each of `file_ids`, their keys read from the DB at once.
    pub fn file_ciphers(&self, file_ids: &[FileId]) -> Result<Vec<Result<BlockCipher, VolumeError>>, VolumeError> {
        let rows = self.db.file_keys(file_ids)?;
        Ok(file_ids
            .iter()
            .zip(rows)
            .map(|(id, row)| self.cipher_from_row(id, row))
            .collect())
    }

    fn cipher_from_row(
        &self,
        file_id: &FileId,
        row: Option<(u32, crate::crypto::WrappedKey)>,
    ) -> Result<BlockCipher, VolumeError> {
        // Formatted only for an error: this runs for every file a mount opens.
        let id_hex = || crate::util::hex(file_id);
        let Some((version, wrapped)) = row else {
            return match &self.derived {
                Some(derived) => Ok(BlockCipher::new(&derived.data_key(file_id), *file_id, self.layout())),
                None => Err(VolumeError::MissingFileKey(id_hex())),
            };
        };
        let tampered = || VolumeError::Tampered {
            volume: self.backing.clone(),
            what: format!("the data key of file {}", id_hex()),
        };
        let vk = self.keys.key(&self.db, version)?;
        let dek = self
            .keys
            .unwrap_with(&vk, file_id, version, &wrapped)
            .map_err(|_| tampered())?;
        Ok(BlockCipher::new(&dek, *file_id, self.layout()))
    }

    /// Crypto-shredding: the file's last link is gone, so is its key.
    pub fn forget_file_key(&self, file_id: &FileId) {
        self.db.queue_file_key_delete(*file_id);
    }

    /// What to store as a backing symlink's target: the sealed target itself,
    /// or, when that would not fit in a symlink, a reference to a DB row.
    pub fn encrypt_link_target(&self, target: &[u8]) -> Result<String, VolumeError> {
        let inline = URL_SAFE_NO_PAD.encode(self.link_targets.seal(&self.link_aad(None), target));
        if inline.len() < INLINE_LINK_MAX {
            return Ok(inline);
        }
        let id: [u8; 16] = random_array();
        let sealed = self.link_targets.seal(&self.link_aad(Some(&id)), target);
        self.db.insert_link_target(&id, &sealed)?;
        Ok(format!("{LONG_LINK_PREFIX}{}", crate::util::hex(&id)))
    }

    /// A symlink target sealed with a given nonce (a reverse view's derived
    /// one), inline only: `None` when it is too long for a symlink, since a
    /// reverse view cannot add rows to the DB.
    pub fn encrypt_link_target_with_nonce(&self, target: &[u8], nonce: [u8; 12]) -> Option<String> {
        let mut sealed = vec![0u8; target.len() + crate::crypto::SEAL_OVERHEAD];
        self.link_targets
            .seal_into(nonce, &self.link_aad(None), target, &mut sealed);
        let inline = URL_SAFE_NO_PAD.encode(sealed);
        (inline.len() < INLINE_LINK_MAX).then_some(inline)
    }

    pub fn decrypt_link_target(&self, stored: &[u8]) -> Result<Vec<u8>, NameError> {
        if let Some(id) = long_link_id(stored) {
            let sealed = self
                .db
                .link_target(&id)
                .ok()
                .flatten()
                .ok_or(NameError::MissingLinkTarget)?;
            let plain = self
                .link_targets
                .open(&self.link_aad(Some(&id)), &sealed)
                .map_err(|_| NameError::LinkAuth)?;
            return Ok(plain.to_vec());
        }
        let sealed = URL_SAFE_NO_PAD.decode(stored).map_err(|_| NameError::Encoding)?;
        let plain = self
            .link_targets
            .open(&self.link_aad(None), &sealed)
            .map_err(|_| NameError::LinkAuth)?;
        Ok(plain.to_vec())
    }

    /// The symlink's last name is gone: erase its long target, if it has one.
    pub fn forget_link_target(&self, stored: &[u8]) {
        if let Some(id) = long_link_id(stored)
            && let Err(e) = self.erase_long_link_target(&id)
        {
            log::warn!("erasing a long symlink target failed: {e}");
        }
    }

    pub(crate) fn erase_long_link_target(&self, id: &[u8; 16]) -> Result<(), VolumeError> {
        self.db.delete_link_target(id)?;
        Ok(())
    }

    fn link_aad(&self, long_id: Option<&[u8; 16]>) -> Vec<u8> {
        let mut aad = [b"kmsfs-symlink-v1\0".as_slice(), &self.info.volume_id].concat();
        if let Some(id) = long_id {
            aad.extend_from_slice(id);
        }
        aad
    }
}

/// Sealed targets at least this long go to the DB (a symlink target must be
/// shorter than PATH_MAX, 4096 bytes).
const INLINE_LINK_MAX: usize = 4000;
pub const LONG_LINK_PREFIX: &str = "kmsfs.longlink.";

pub(crate) fn long_link_id(stored: &[u8]) -> Option<[u8; 16]> {
    let hex = stored.strip_prefix(LONG_LINK_PREFIX.as_bytes())?;
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        id[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(id)
}

impl Drop for Volume {
    fn drop(&mut self) {
        if let Err(e) = self.sync_keys() {
            log::error!("committing file keys at close failed: {e}");
        }
    }
}
