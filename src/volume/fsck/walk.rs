//! The walk of the backing directory: every entry's name, IV, sidecar and
//! kind, the files to check, and what could not be reached.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::super::db::DB_FILE;
use super::super::layout::{self, DIR_IV_FILE, Entry, LOCK_FILE, LONG_NAME_PREFIX, SIDECAR_SUFFIX, TEMP_PREFIX};
use super::super::namespace;
use super::super::rescue::PENDING_FILE;
use super::super::{Volume, VolumeError};
use super::files::check_xattrs;
use super::{FileEntry, Problem, Rescue, Walk};
use crate::util::hex;
use std::os::fd::AsFd;

/// `p` relative to the backing directory; `.` for the backing directory itself.
pub(super) fn rel(root: &Path, p: &Path) -> String {
    match p.strip_prefix(root) {
        Ok(rel) if rel.as_os_str().is_empty() => ".".into(),
        Ok(rel) => rel.display().to_string(),
        Err(_) => p.display().to_string(),
    }
}

fn join_plain(parent: &Option<String>, name: &str) -> Option<String> {
    parent.as_ref().map(|p| {
        if p.is_empty() {
            name.to_string()
        } else {
            format!("{p}/{name}")
        }
    })
}

impl Walk {
    /// An entry fsck could not check: it may hold files whose keys look unused.
    pub(super) fn unreached(&mut self, root: &Path, backing: &Path, why: String) {
        self.inaccessible += 1;
        let detail = format!("{why}: nothing in it was checked, and no key that no file was seen to use is erased");
        self.problem(root, "unreached", backing, None, detail);
    }

    pub(super) fn problem(
        &mut self,
        root: &Path,
        kind: &'static str,
        backing: &Path,
        path: Option<String>,
        detail: String,
    ) -> usize {
        self.problems.push(Problem {
            kind,
            backing: rel(root, backing),
            path,
            detail,
            repair: None,
        });
        self.problems.len() - 1
    }
}

/// Walks a directory below the root; one that cannot be listed is reported
/// and passed over, not the end of the check.
fn walk_subdir(volume: &Volume, dir: &Path, plain: Option<String>, w: &mut Walk) {
    if let Err(e) = walk_dir(volume, dir, plain, w) {
        w.unreached(volume.backing(), dir, format!("cannot be listed ({e})"));
    }
}

/// The files of the backing directory's top that are the volume's own:
/// exact names, so that nothing else hides behind their prefixes.
fn is_volume_file(name: &str) -> bool {
    let db_companion = name
        .strip_prefix(DB_FILE)
        .is_some_and(|rest| matches!(rest, "" | "-wal" | "-shm" | "-journal"));
    let set_aside = crate::volume::rescue::is_set_aside(name, PENDING_FILE);
    // One being written when the writer was killed (`locked_file::replace`).
    let being_written = name
        .strip_prefix(PENDING_FILE)
        .and_then(|rest| rest.strip_prefix(".tmp-"))
        .is_some_and(|n| n.len() == 16 && n.bytes().all(|b| b.is_ascii_hexdigit()));
    db_companion || name == LOCK_FILE || name == PENDING_FILE || set_aside || being_written
}

/// Whether directory `dir` (a real one, not a symlink) holds anything but
/// its IV; one that cannot be listed counts as holding something.
fn holds_more_than_an_iv(dir: &Path) -> bool {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .into_iter()
            .any(|e| e.map_or(true, |e| e.file_name() != DIR_IV_FILE)),
        Err(_) => true,
    }
}

pub(super) fn walk_dir(volume: &Volume, dir: &Path, plain: Option<String>, w: &mut Walk) -> Result<(), VolumeError> {
    let root = volume.backing();
    w.directories += 1;
    let io = |e: std::io::Error| VolumeError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    let mut unlisted = 0;
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.inspect_err(|_| unlisted += 1).ok())
        .map(|e| e.file_name())
        .collect();
    if unlisted > 0 {
        w.unreached(root, dir, format!("{unlisted} of its entries could not be listed"));
    }
    names.sort();
    let dir_fd = fs::File::open(dir).map_err(io)?;
    let user_entries = names
        .iter()
        .filter(|n| !matches!(layout::classify(n.as_encoded_bytes()), Entry::Internal))
        .count();
    let iv = match namespace::read_dir_iv(dir_fd.as_fd()) {
        Ok(iv) => Some(iv),
        Err(e) if user_entries == 0 => {
            let i = w.problem(
                root,
                "missing_dir_iv",
                dir,
                plain.clone(),
                format!("empty directory without a usable IV ({e})"),
            );
            w.missing_ivs.push((dir.to_path_buf(), i));
            None
        }
        Err(e) => {
            w.problem(
                root,
                "missing_dir_iv",
                dir,
                plain.clone(),
                format!("IV unusable ({e}); {user_entries} entries cannot be named"),
            );
            None
        }
    };
    if let Some(iv) = &iv {
        match w.dir_ivs.get(iv) {
            Some(first) => {
                let detail = format!(
                    "has the same IV as {}, another directory: one IV was copied, so the names and \
                     attributes of one can be read in the other",
                    rel(root, first)
                );
                w.problem(root, "duplicate_dir_iv", dir, plain.clone(), detail);
            }
            None => {
                w.dir_ivs.insert(*iv, dir.to_path_buf());
            }
        }
        for x in check_xattrs(volume, dir, iv) {
            w.problem(
                root,
                "bad_xattr",
                dir,
                plain.clone(),
                format!("{x} does not authenticate"),
            );
        }
    }
    let is_root = dir == root;
    for name in names {
        let raw = name.as_encoded_bytes();
        let path = dir.join(&name);
        let text = name.to_string_lossy();
        // A directory under one of those names is not the volume's own: it
        // is looked at below (as unreached), never passed over.
        let own_file = || fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir());
        if text == DIR_IV_FILE || (is_root && is_volume_file(&text) && own_file()) {
            continue;
        }
        if text.starts_with(TEMP_PREFIX) {
            // Looked at, never followed: a symlink in its place is removed,
            // not walked (it could lead anywhere outside the volume).
            let meta = fs::symlink_metadata(&path);
            let i = w.problem(
                root,
                "leftover_temporary",
                &path,
                None,
                "left by an interrupted mkdir or rekey".into(),
            );
            let shown = Some(format!("<{text}>"));
            match meta {
                // An interrupted mkdir leaves only the IV inside. Anything
                // else (a directory renamed so) is checked like any other,
                // so that the keys of its files count as used; the repair
                // leaves it.
                Ok(m) if m.is_dir() && holds_more_than_an_iv(&path) => {
                    w.problems[i]
                        .detail
                        .push_str("; not empty: its entries are checked and it is left alone");
                    walk_subdir(volume, &path, shown, w);
                }
                // An interrupted rekey's copy, or a file renamed so: checked
                // (its key counts as used) and moved to lost+found, never
                // deleted unseen.
                Ok(m) if m.is_file() => {
                    w.problems[i]
                        .detail
                        .push_str("; a file: checked, and moved to lost+found by --repair");
                    w.rescues.push(Rescue {
                        backing: path.clone(),
                        plain: shown.clone(),
                        tag: format!("ino{}", m.ino()),
                        problem: i,
                        also: Vec::new(),
                        bad_blocks: Vec::new(),
                    });
                    w.files.push(FileEntry {
                        backing: path,
                        plain: shown,
                        inode: (m.dev(), m.ino()),
                        len: m.len(),
                    });
                }
                _ => w.removals.push((path, i)),
            }
            continue;
        }
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Gone since the listing: nothing to check.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                w.unreached(root, &path, format!("cannot be looked at ({e})"));
                continue;
            }
        };
        let decrypted = match layout::classify(raw) {
            Entry::Internal => {
                if text.starts_with(LONG_NAME_PREFIX) && text.ends_with(SIDECAR_SUFFIX) {
                    let owner = dir.join(&text[..text.len() - SIDECAR_SUFFIX.len()]);
                    if fs::symlink_metadata(&owner).is_err() {
                        let i = w.problem(
                            root,
                            "orphan_sidecar",
                            &path,
                            None,
                            "long-name sidecar without its entry".into(),
                        );
                        w.removals.push((path, i));
                    }
                } else if meta.is_dir() {
                    // Perhaps a directory renamed by hand: what it holds may
                    // use keys no checked file uses.
                    w.unreached(
                        root,
                        &path,
                        "a directory under a name kmsfs does not write; left alone".into(),
                    );
                } else {
                    let i = w.problem(
                        root,
                        "unknown_entry",
                        &path,
                        None,
                        "not a name kmsfs writes; left alone".into(),
                    );
                    // A kmsfs file renamed by hand (a copy kept aside, a
                    // sync tool's conflict copy): its key is still used.
                    if meta.is_file()
                        && let Ok(namespace::FileIdRead::Id(id)) = namespace::read_file_id_at(&path)
                    {
                        w.problems[i].detail.push_str(&format!(
                            "; it holds the header of a kmsfs file (id {}), whose key is kept",
                            hex(&id)
                        ));
                        w.kept_ids.insert(id);
                    }
                }
                continue;
            }
            _ => match &iv {
                Some(iv) => match namespace::plain_name(volume.names(), dir_fd.as_fd(), iv, raw) {
                    Some(named) => named.map_err(|e| e.to_string()),
                    None => continue,
                },
                None => Err("directory IV unusable".into()),
            },
        };
        let child_plain = match &decrypted {
            Ok(n) => join_plain(&plain, &String::from_utf8_lossy(n)),
            Err(_) => None,
        };
        // Names are encrypted the same way every time: an entry under
        // another form of its name (a long form of a short one) is a copy
        // the listing would show twice, one of them unreachable by name.
        if let (Ok(n), Some(iv)) = (&decrypted, &iv)
            && layout::backing_name(volume.names(), iv, n).as_str().as_bytes() != raw
        {
            w.problem(
                root,
                "non_canonical_name",
                &path,
                child_plain.clone(),
                "its name is stored in another form than kmsfs writes (a long form of a short name, made \
                 by hand): the mount lists it but opens the other entry of that name, if any"
                    .into(),
            );
        }
        if let Err(e) = &decrypted {
            let kind = if e.starts_with("sidecar") {
                "missing_sidecar"
            } else {
                "bad_name"
            };
            let i = w.problem(
                root,
                kind,
                &path,
                None,
                format!("name does not decrypt ({e}); invisible through the mount"),
            );
            w.rescues.push(Rescue {
                backing: path.clone(),
                plain: None,
                tag: format!("ino{}", meta.ino()),
                problem: i,
                also: Vec::new(),
                bad_blocks: Vec::new(),
            });
        }
        let ft = meta.file_type();
        if ft.is_dir() {
            walk_subdir(
                volume,
                &path,
                child_plain.or_else(|| Some(format!("<unnamed {}>", meta.ino()))),
                w,
            );
        } else if ft.is_file() {
            w.files.push(FileEntry {
                backing: path,
                plain: child_plain,
                inode: (meta.dev(), meta.ino()),
                len: meta.len(),
            });
        } else if ft.is_symlink() {
            w.symlinks += 1;
            let target = match fs::read_link(&path) {
                Ok(t) => t.into_os_string().into_encoded_bytes(),
                Err(e) => {
                    w.unreached(root, &path, format!("symlink cannot be read ({e})"));
                    continue;
                }
            };
            if let Some(id) = super::super::long_link_id(&target) {
                let inode = (meta.dev(), meta.ino());
                match w.long_links.get(&id) {
                    // Another name of the same symlink (a hard link) is fine.
                    Some((first_inode, first)) if *first_inode != inode => {
                        let detail = format!(
                            "names the same long target ({}) as {}, another backing symlink: one was copied; \
                             removing either through a mount erases the target of both",
                            hex(&id),
                            rel(root, first)
                        );
                        w.problem(root, "duplicate_long_link", &path, child_plain.clone(), detail);
                    }
                    Some(_) => {}
                    None => {
                        w.long_links.insert(id, (inode, path.clone()));
                    }
                }
            }
            if let Err(e) = volume.decrypt_link_target(&target) {
                w.problem(
                    root,
                    "bad_symlink",
                    &path,
                    child_plain,
                    format!("target does not decrypt ({e})"),
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_exact_names_of_the_volume_files_are_its_own() {
        use super::is_volume_file;
        for own in [
            "kmsfs.db",
            "kmsfs.db-wal",
            "kmsfs.db-shm",
            "kmsfs.db-journal",
            "kmsfs.lock",
            "kmsfs.pending-keys",
            "kmsfs.pending-keys.unreadable",
            "kmsfs.pending-keys.unreadable.12",
            "kmsfs.pending-keys.tmp-0123456789abcdef",
        ] {
            assert!(is_volume_file(own), "{own}");
        }
        for other in [
            "kmsfs.db.old",
            "kmsfs.db-walx",
            "kmsfs.lock.moved",
            "kmsfs.pending-keys.unreadable.x",
            "kmsfs.pending-keys.unreadable.",
            "kmsfs.pending-keys.tmp-0123",
            "kmsfs.pending-keys.bak",
        ] {
            assert!(!is_volume_file(other), "{other}");
        }
    }
}
