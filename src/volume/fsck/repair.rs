//! `--repair` and `--salvage`: acting on what the check found, and the
//! lost+found directory that unreadable entries move into.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::super::content;
use super::super::header;
use super::super::layout::{self, DIR_IV_FILE, DirIv, LONG_NAME_PREFIX, SIDECAR_SUFFIX};
use super::super::namespace::{self, FileIdRead};
use super::super::{Volume, VolumeError, write_dir_iv};
use super::{LOST_FOUND, Rescue, Walk};
use crate::crypto::FileId;

pub(super) fn repair_volume(
    volume: &Volume,
    w: &mut Walk,
    orphan_keys: &[(FileId, usize)],
    salvage: bool,
) -> Result<(), VolumeError> {
    for (path, i) in std::mem::take(&mut w.removals) {
        // Not followed: a symlink in a temporary's place is removed itself.
        let removed = if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            // An interrupted mkdir: only its IV inside.
            let only_iv = fs::read_dir(&path)
                .map(|d| d.filter_map(|e| e.ok()).all(|e| e.file_name() == DIR_IV_FILE))
                .unwrap_or(false);
            if only_iv {
                fs::remove_dir_all(&path).map(|_| "removed")
            } else {
                Ok("left alone: not empty")
            }
        } else {
            fs::remove_file(&path).map(|_| "removed")
        };
        w.problems[i].repair = removed.ok().filter(|r| *r == "removed").map(str::to_string);
    }
    for (dir, i) in std::mem::take(&mut w.missing_ivs) {
        let _ = fs::remove_file(dir.join(DIR_IV_FILE));
        if write_dir_iv(&dir).is_ok() {
            w.problems[i].repair = Some("wrote a new IV (the directory was empty)".into());
        }
    }
    for (path, id, i) in std::mem::take(&mut w.header_fixes) {
        let fixed = fs::OpenOptions::new().write(true).open(&path).and_then(|f| {
            std::os::unix::fs::FileExt::write_all_at(&f, &header::encode(&id), 0).and_then(|_| f.sync_all())
        });
        if fixed.is_ok() {
            w.problems[i].repair =
                Some("header rewritten (its file id has a key and every block authenticates)".into());
        }
    }
    for (id, i) in orphan_keys {
        if w.inaccessible > 0 {
            // Not repaired: it stays a problem until a run that reads every file.
            let n = w.inaccessible;
            let kept = format!(
                " (kept: {n} entr{} could not be checked, and it may be a file's there)",
                if n == 1 { "y" } else { "ies" }
            );
            w.problems[*i].detail.push_str(&kept);
            continue;
        }
        volume.forget_file_key(id);
        w.problems[*i].repair = Some("key row erased".into());
    }
    for (id, i) in std::mem::take(&mut w.orphan_links) {
        if w.inaccessible > 0 {
            // As for keys: the symlink may be in what was not checked.
            w.problems[i]
                .detail
                .push_str(" (kept: not every entry could be checked)");
            continue;
        }
        volume.erase_long_link_target(&id)?;
        w.problems[i].repair = Some("row erased".into());
    }
    volume.sync_keys()?;
    let mut rescues = std::mem::take(&mut w.rescues);
    if rescues.is_empty() {
        return Ok(());
    }
    // Deepest first: an unreadable entry inside an unreadable directory is
    // moved out before its directory, whose move would take it along.
    rescues.sort_by_key(|r| std::cmp::Reverse(r.backing.components().count()));
    let lost = LostFound::open(volume)?;
    let mut lines = vec![format!("kmsfs fsck report, {} entries moved here", rescues.len())];
    for r in rescues {
        let base = r
            .plain
            .as_deref()
            .and_then(|p| p.rsplit('/').next())
            .unwrap_or("unnamed")
            .to_string();
        let mut name = format!("{}-{}", truncate(&base, 200), r.tag);
        let mut note = String::new();
        if salvage
            && !r.bad_blocks.is_empty()
            && let Some(cipher) = file_cipher_of(volume, &r.backing)
            && let Ok(file) = fs::OpenOptions::new().read(true).write(true).open(&r.backing)
            && content::zero_blocks(&file, &cipher, &r.bad_blocks).is_ok()
        {
            name.push_str(".salvaged");
            note = format!("; blocks {:?} (4 KiB each) replaced by ZEROS", r.bad_blocks);
        }
        let problem = &mut w.problems[r.problem];
        let name = match lost.move_in(volume, &r.backing, &name) {
            Ok(name) => name,
            Err(e) => {
                // Left where it is and reported: the other entries are still moved.
                lines.push(format!(
                    "{}: NOT moved ({e})",
                    r.plain.as_deref().unwrap_or("<name unknown>")
                ));
                continue;
            }
        };
        lines.push(format!(
            "{name}: was {} ({}): {}{note}",
            r.plain.as_deref().unwrap_or("<name unknown>"),
            problem.kind,
            problem.detail
        ));
        problem.repair = Some(format!("moved to {LOST_FOUND}/{name}{note}"));
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    lost.write_file(
        volume,
        &format!("fsck-report-{stamp}.txt"),
        (lines.join("\n") + "\n").as_bytes(),
    )?;
    Ok(())
}

/// Zeroes the bad blocks of a file already in lost+found and marks its name.
pub(super) fn salvage_in_place(volume: &Volume, r: &Rescue) -> Option<String> {
    let cipher = file_cipher_of(volume, &r.backing)?;
    let file = fs::OpenOptions::new().read(true).write(true).open(&r.backing).ok()?;
    content::zero_blocks(&file, &cipher, &r.bad_blocks).ok()?;
    let name = r.plain.as_deref()?.rsplit('/').next()?.to_string() + ".salvaged";
    let lost = LostFound::open(volume).ok()?;
    let name = lost.move_in(volume, &r.backing, &name).ok()?;
    Some(format!("blocks {:?} replaced by ZEROS; renamed {name}", r.bad_blocks))
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn file_cipher_of(volume: &Volume, path: &Path) -> Option<crate::crypto::BlockCipher> {
    match namespace::read_file_id_at(path) {
        Ok(FileIdRead::Id(id)) => volume.file_cipher(&id).ok(),
        _ => None,
    }
}

/// The volume's `lost+found` directory (created when first needed).
struct LostFound {
    dir: PathBuf,
    iv: DirIv,
}

impl LostFound {
    fn open(volume: &Volume) -> Result<Self, VolumeError> {
        let root = volume.backing();
        let root_iv = namespace::read_dir_iv_at(root).map_err(|e| VolumeError::Tampered {
            volume: root.to_path_buf(),
            what: format!("root IV ({e})"),
        })?;
        let name = layout::backing_name(volume.names(), &root_iv, LOST_FOUND.as_bytes());
        let dir = root.join(name.as_str());
        if std::fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
            return Err(VolumeError::Tampered {
                volume: root.to_path_buf(),
                what: format!(
                    "{LOST_FOUND} is not a directory (something else has its name); rename it through the \
                     mount, then repair again"
                ),
            });
        }
        if !dir.exists() {
            fs::create_dir(&dir).map_err(|e| VolumeError::Io {
                path: dir.clone(),
                source: e,
            })?;
            fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).map_err(|e| {
                VolumeError::Io {
                    path: dir.clone(),
                    source: e,
                }
            })?;
            write_dir_iv(&dir)?;
        }
        let iv = namespace::read_dir_iv_at(&dir).map_err(|e| VolumeError::Tampered {
            volume: dir.clone(),
            what: format!("lost+found IV ({e})"),
        })?;
        Ok(LostFound { dir, iv })
    }

    fn target(&self, volume: &Volume, name: &str) -> Result<PathBuf, VolumeError> {
        let backing = layout::backing_name(volume.names(), &self.iv, name.as_bytes());
        if backing.sidecar().is_some() {
            namespace::open_dir(&self.dir)
                .and_then(|d| namespace::write_sidecar(std::os::fd::AsFd::as_fd(&d), &backing))
                .map_err(|e| VolumeError::Io {
                    path: self.dir.clone(),
                    source: e,
                })?;
        }
        Ok(self.dir.join(backing.as_str()))
    }

    /// Moves `from` in as `name`, or `name.N` if that is taken (never over
    /// an entry); returns the name it got.
    fn move_in(&self, volume: &Volume, from: &Path, name: &str) -> Result<String, VolumeError> {
        let io = |e: std::io::Error| VolumeError::Io {
            path: from.to_path_buf(),
            source: e,
        };
        let mut taken = name.to_string();
        for n in 1.. {
            let to = self.target(volume, &taken)?;
            match rustix::fs::renameat_with(
                rustix::fs::CWD,
                from,
                rustix::fs::CWD,
                &to,
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => break,
                Err(rustix::io::Errno::EXIST) if n < 1000 => taken = format!("{name}.{n}"),
                Err(e) => return Err(io(e.into())),
            }
        }
        let from_name = from
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if from_name.starts_with(LONG_NAME_PREFIX) {
            let _ = fs::remove_file(from.with_file_name(format!("{from_name}{SIDECAR_SUFFIX}")));
        }
        Ok(taken)
    }

    /// Writes a new encrypted file (the report) into lost+found.
    fn write_file(&self, volume: &Volume, name: &str, data: &[u8]) -> Result<(), VolumeError> {
        let path = self.target(volume, name)?;
        let io = |e: std::io::Error| VolumeError::Io {
            path: path.clone(),
            source: e,
        };
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let (_, cipher) = volume.new_file_key()?;
        content::create(&file, &cipher).map_err(io)?;
        content::write(&file, &cipher, 0, data).map_err(|e| e.at(&path))?;
        file.sync_all().map_err(io)?;
        volume.sync_keys()
    }
}
