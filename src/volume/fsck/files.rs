//! fsck's check of one regular file (header, data key, every block, the
//! backing length) and of a node's xattrs.

use rustix::fs::OFlags;
use std::fs;
use std::path::Path;

use super::super::content::{self, ContentError};
use super::super::namespace::{self, FileIdRead};
use super::super::{Volume, VolumeError};
use crate::crypto::{FileId, Layout};

pub(super) enum FileOutcome {
    Fine(Option<FileId>, u64),
    /// Only the header's version field is damaged: its file id has a key and
    /// every block authenticates with it, which proves the id right.
    HeaderFixable(FileId, u64),
    /// The system refused to let fsck read it (permissions, an I/O error):
    /// nothing is known of its content, or of which key is its.
    Inaccessible(String),
    Unreadable {
        id: Option<FileId>,
        kind: &'static str,
        detail: String,
        bad_blocks: Vec<u64>,
        blocks: u64,
    },
}

pub(super) fn check_file(volume: &Volume, path: &Path, progress: &(dyn Fn(u64) + Sync)) -> FileOutcome {
    let unreadable = |id, kind, detail: String| FileOutcome::Unreadable {
        id,
        kind,
        detail,
        bad_blocks: Vec::new(),
        blocks: 0,
    };
    // Without moving the file's access time where the owner allows it: a
    // check reads, it does not use.
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file = match namespace::openat_quietly(rustix::fs::CWD, path, flags) {
        Ok(fd) => fs::File::from(fd),
        // A symlink in a file's place (O_NOFOLLOW) is damage; anything else is the system's refusal.
        Err(e) if e != rustix::io::Errno::LOOP => return FileOutcome::Inaccessible(format!("cannot open: {e}")),
        Err(e) => return unreadable(None, "damaged_header", format!("cannot open: {e}")),
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        if volume.layout() == Layout::Sealed {
            return unreadable(
                None,
                "no_header",
                "empty backing file: every file of this volume has a header and a final block \
                 (cut to 0 bytes, or its creation was interrupted)"
                    .into(),
            );
        }
        return FileOutcome::Fine(None, 0);
    }
    let id = match namespace::read_file_id(&file) {
        Ok(FileIdRead::Id(id)) => id,
        Ok(FileIdRead::Empty) => return unreadable(None, "damaged_header", "no header".into()),
        Err(e) => return FileOutcome::Inaccessible(format!("cannot read its header: {e}")),
        Ok(FileIdRead::Damaged { raw, error: e }) => {
            if let Some(id) = raw
                && let Ok(cipher) = volume.file_cipher(&id)
                && let Ok((blocks, bad)) = content::check_blocks(&file, &cipher, progress)
                && bad.is_empty()
            {
                return FileOutcome::HeaderFixable(id, blocks);
            }
            return unreadable(raw, "damaged_header", e.to_string());
        }
    };
    let cipher = match volume.file_cipher(&id) {
        Ok(c) => c,
        Err(VolumeError::MissingFileKey(_)) => {
            return unreadable(Some(id), "missing_key", "no data key row in the DB".into());
        }
        Err(e) => return unreadable(Some(id), "bad_key", e.to_string()),
    };
    match content::check_blocks(&file, &cipher, progress) {
        Ok((blocks, bad)) if bad.is_empty() => FileOutcome::Fine(Some(id), blocks),
        Ok((blocks, bad)) => {
            let mut detail = format!("{} of {blocks} blocks fail authentication: {bad:?}", bad.len());
            if bad == [blocks - 1] && len % PAGE_SIZE == 0 {
                detail.push_str(TORN_TAIL);
            }
            FileOutcome::Unreadable {
                id: Some(id),
                kind: "bad_blocks",
                detail,
                bad_blocks: bad,
                blocks,
            }
        }
        Err(ContentError::Length { len }) => unreadable(
            Some(id),
            "bad_length",
            format!("{len} bytes long, which no file of this volume is: cut short, or grown by appended bytes"),
        ),
        Err(e) => unreadable(Some(id), "damaged_header", format!("read error: {e}")),
    }
}

const PAGE_SIZE: u64 = 4096;

/// What a bad last block ending at a page boundary most likely is: Linux
/// ends a buffered write early, between pages, when the writer is killed
/// (DESIGN.md, "Write ordering and crash safety").
const TORN_TAIL: &str = "; the file ends at a page boundary inside its last block, \
    as a write cut short by a crash or kill -9 leaves it (or a truncation of the backing file)";

/// Checks the xattrs (`user.*` and ACLs) of a file or directory against their owner id.
pub(super) fn check_xattrs(volume: &Volume, path: &Path, owner: &[u8; 16]) -> Vec<String> {
    let mut bad = Vec::new();
    let len = rustix::fs::listxattr_query(path).unwrap_or(0);
    let mut names = vec![0u8; len];
    let n = rustix::fs::listxattr(path, &mut names[..]).unwrap_or(0);
    for backing in names[..n].split(|&b| b == 0).filter(|s| s.starts_with(b"user.kmsfs.")) {
        let Some(name) = volume.xattr_stored_name(backing) else {
            bad.push(String::from_utf8_lossy(backing).into_owned());
            continue;
        };
        let key = String::from_utf8_lossy(backing).into_owned();
        let size = rustix::fs::getxattr_query(path, key.as_str()).unwrap_or(0);
        let mut value = vec![0u8; size];
        let got = rustix::fs::getxattr(path, key.as_str(), &mut value[..]).unwrap_or(0);
        if volume.open_xattr(owner, &name, &value[..got]).is_none() {
            bad.push(String::from_utf8_lossy(&name.full_name()).into_owned());
        }
    }
    bad
}
