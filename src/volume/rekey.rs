//! Per-file re-keying in the backing directory: the file's data sealed
//! again under a fresh data key, atomically (a crash leaves the old file or
//! the new one, whole). For a mounted volume the CLI re-keys through the
//! mount instead, so the daemon's view stays coherent.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::content::{self, plain_size};
use super::header::HEADER_LEN;
use super::layout::TEMP_PREFIX;
use super::namespace::{self, FileIdRead};
use super::{Volume, VolumeError};
use crate::crypto::{FileId, random_array};
use crate::util::hex;

/// Test hook: SIGKILL the process at this stage ("before-rename" or "after-rename").
const KILL_AT_ENV: &str = "KMSFS_TEST_REKEY_KILL_AT";
const CHUNK: usize = 1 << 20;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RekeyOutcome {
    pub old_file_id: Option<String>,
    pub new_file_id: Option<String>,
    pub bytes: u64,
}

/// Gives a re-keyed copy the original's owner and times, and makes it durable.
pub fn finish_copy(original: &fs::Metadata, copy: &File) -> std::io::Result<()> {
    std::os::unix::fs::fchown(copy, Some(original.uid()), Some(original.gid()))?;
    copy.set_permissions(fs::Permissions::from_mode(original.mode() & 0o7777))?;
    copy.set_times(
        fs::FileTimes::new()
            .set_accessed(original.accessed()?)
            .set_modified(original.modified()?),
    )?;
    copy.sync_all()
}

/// Test hook: SIGKILL this process when `KMSFS_TEST_REKEY_KILL_AT` names `stage`.
pub fn kill_hook(stage: &str) {
    crate::test_hooks::kill_if(KILL_AT_ENV, |v| v == stage);
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file that cannot be re-keyed as it is (`kmsfs fsck` says more).
fn damaged(path: &Path, why: &str) -> VolumeError {
    VolumeError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string()),
    }
}

fn refuse(path: &Path, why: &str) -> VolumeError {
    VolumeError::NotTaken {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Re-keys the backing file at `path`. The volume must not be mounted.
pub fn rekey_backing_file(volume: &Volume, path: &Path) -> Result<RekeyOutcome, VolumeError> {
    let meta = fs::symlink_metadata(path).map_err(io(path))?;
    // The DB, the lock, IV files, sidecars: the volume's own, not a file of it.
    let name = path.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default();
    if matches!(super::layout::classify(name), super::layout::Entry::Internal) {
        return Err(refuse(
            path,
            "not a file of the volume but one kmsfs keeps beside them (the DB, the lock, an IV or a long name)",
        ));
    }
    if !meta.file_type().is_file() {
        return Err(refuse(path, "not a regular file"));
    }
    if meta.nlink() > 1 {
        return Err(refuse(path, "has hard links; re-keying one name would split them"));
    }
    if meta.len() < HEADER_LEN as u64 {
        return Ok(RekeyOutcome {
            old_file_id: None,
            new_file_id: None,
            bytes: 0,
        });
    }
    let src = File::open(path).map_err(io(path))?;
    let old_id = match namespace::read_file_id(&src).map_err(io(path))? {
        FileIdRead::Id(id) => id,
        FileIdRead::Damaged { error, .. } => return Err(damaged(path, &format!("damaged header: {error}"))),
        FileIdRead::Empty => return Err(damaged(path, "damaged header: the file is empty")),
    };
    let old = volume.file_cipher(&old_id)?;
    let parent = path.parent().ok_or_else(|| refuse(path, "no parent directory"))?;
    let tmp = parent.join(format!("{TEMP_PREFIX}{}", hex(&random_array::<8>())));
    let (new_id, new) = volume.new_file_key()?;
    let result = (|| {
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            // Owner-only until done: a read-only mode would refuse the
            // xattrs copied onto it; finish_copy gives it the original's.
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        content::create(&dst, &new).map_err(io(&tmp))?;
        let size = plain_size(meta.len());
        let mut offset = 0u64;
        while offset < size {
            let data = content::read(&src, &old, offset, CHUNK).map_err(|e| e.at(path))?;
            if data.is_empty() {
                break;
            }
            // Holes stay holes.
            if data.iter().any(|&b| b != 0) {
                content::write(&dst, &new, offset, &data).map_err(|e| e.at(&tmp))?;
            }
            offset += data.len() as u64;
        }
        content::truncate(&dst, &new, size).map_err(|e| e.at(&tmp))?;
        copy_xattrs(volume, path, &tmp, &old_id, &new_id)?;
        finish_copy(&meta, &dst).map_err(io(&tmp))?;
        volume.sync_keys()?; // the new key is durable before the new file takes the name
        kill_hook("before-rename");
        fs::rename(&tmp, path).map_err(io(path))?;
        File::open(parent).and_then(|d| d.sync_all()).map_err(io(parent))?;
        Ok(size)
    })();
    match result {
        Ok(bytes) => {
            kill_hook("after-rename");
            volume.forget_file_key(&old_id);
            volume.sync_keys()?;
            Ok(RekeyOutcome {
                old_file_id: Some(hex(&old_id)),
                new_file_id: Some(hex(&new_id)),
                bytes,
            })
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            volume.forget_file_key(&new_id);
            Err(e)
        }
    }
}

/// Copies the xattrs (`user.*` and ACLs), sealing their values again for the new file id.
fn copy_xattrs(volume: &Volume, from: &Path, to: &Path, old_id: &FileId, new_id: &FileId) -> Result<(), VolumeError> {
    let len = rustix::fs::listxattr_query(from).unwrap_or(0);
    let mut names = vec![0u8; len];
    let n = rustix::fs::listxattr(from, &mut names[..]).unwrap_or(0);
    for backing in names[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let Some(name) = volume.xattr_stored_name(backing) else {
            continue;
        };
        let backing = std::str::from_utf8(backing).unwrap_or_default();
        let size = rustix::fs::getxattr_query(from, backing).map_err(|e| io(from)(e.into()))?;
        let mut sealed = vec![0u8; size];
        let got = rustix::fs::getxattr(from, backing, &mut sealed[..]).map_err(|e| io(from)(e.into()))?;
        let value = volume
            .open_xattr(old_id, &name, &sealed[..got])
            .ok_or_else(|| VolumeError::Tampered {
                volume: from.to_path_buf(),
                what: format!("xattr {}", String::from_utf8_lossy(&name.full_name())),
            })?;
        let resealed = volume.seal_xattr(new_id, &name, &value);
        rustix::fs::setxattr(to, backing, &resealed, rustix::fs::XattrFlags::empty()).map_err(|e| io(to)(e.into()))?;
    }
    Ok(())
}
