//! `--repair` and `--salvage`: acting on what the check found, and the
//! lost+found directory that unreadable entries move into.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags};

use super::super::content;
use super::super::header;
use super::super::layout::{self, DIR_IV_FILE, DirIv, LONG_NAME_PREFIX, SIDECAR_SUFFIX};
use super::super::namespace::{self, FileIdRead};
use super::super::{Volume, VolumeError};
use super::confined::Confined;
use super::{LOST_FOUND, Rescue, Walk};
use crate::crypto::FileId;

pub(super) fn repair_volume(
    volume: &Volume,
    w: &mut Walk,
    orphan_keys: &[(FileId, usize)],
    salvage: bool,
) -> Result<(), VolumeError> {
    let backing = volume.backing();
    let confined = Confined::open(backing).map_err(|e| VolumeError::Io {
        path: backing.to_path_buf(),
        source: e,
    })?;
    for (path, i) in std::mem::take(&mut w.removals) {
        // An interrupted mkdir's directory goes only if its IV is all it holds.
        if confined.remove(&path).unwrap_or(false) {
            w.problems[i].repair = Some("removed".into());
        }
    }
    for (dir, i) in std::mem::take(&mut w.missing_ivs) {
        let written = confined.dir(&dir).and_then(|dir| {
            let _ = rustix::fs::unlinkat(&dir, DIR_IV_FILE, AtFlags::empty());
            namespace::create_dir_iv(dir.as_fd())
        });
        if written.is_ok() {
            w.problems[i].repair = Some("wrote a new IV (the directory was empty)".into());
        }
    }
    for (path, id, i) in std::mem::take(&mut w.header_fixes) {
        let fixed = confined.file(&path).and_then(|f| {
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
    let lost = LostFound::open(volume, &confined)?;
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
            && let Ok(file) = confined.file(&r.backing)
            && let Some(cipher) = file_cipher_of(volume, &file)
            && content::zero_blocks(&file, &cipher, &r.bad_blocks).is_ok()
        {
            name.push_str(".salvaged");
            note = format!("; blocks {:?} (4 KiB each) replaced by ZEROS", r.bad_blocks);
        }
        let name = match lost.move_in(volume, &confined, &r.backing, &name) {
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
        for i in std::iter::once(r.problem).chain(r.also.iter().copied()) {
            let problem = &mut w.problems[i];
            lines.push(format!(
                "{name}: was {} ({}): {}{note}",
                r.plain.as_deref().unwrap_or("<name unknown>"),
                problem.kind,
                problem.detail
            ));
            problem.repair = Some(format!("moved to {LOST_FOUND}/{name}{note}"));
        }
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
    let confined = Confined::open(volume.backing()).ok()?;
    let file = confined.file(&r.backing).ok()?;
    let cipher = file_cipher_of(volume, &file)?;
    content::zero_blocks(&file, &cipher, &r.bad_blocks).ok()?;
    let name = r.plain.as_deref()?.rsplit('/').next()?.to_string() + ".salvaged";
    let lost = LostFound::open(volume, &confined).ok()?;
    let name = lost.move_in(volume, &confined, &r.backing, &name).ok()?;
    Some(format!("blocks {:?} replaced by ZEROS; renamed {name}", r.bad_blocks))
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn file_cipher_of(volume: &Volume, file: &File) -> Option<crate::crypto::BlockCipher> {
    match namespace::read_file_id(file) {
        Ok(FileIdRead::Id(id)) => volume.file_cipher(&id).ok(),
        _ => None,
    }
}

/// The volume's `lost+found` directory (created when first needed), held
/// open: what moves in and what is written there goes by its descriptor.
struct LostFound {
    dir: OwnedFd,
    iv: DirIv,
}

impl LostFound {
    fn open(volume: &Volume, confined: &Confined) -> Result<Self, VolumeError> {
        let root = volume.backing();
        let tampered = |what: String| VolumeError::Tampered {
            volume: root.to_path_buf(),
            what,
        };
        let io = |e: std::io::Error| VolumeError::Io {
            path: root.join(LOST_FOUND),
            source: e,
        };
        let root_dir = confined.dir(root).map_err(io)?;
        let root_iv = namespace::read_dir_iv(root_dir.as_fd()).map_err(|e| VolumeError::Io {
            path: root.join(DIR_IV_FILE),
            source: std::io::Error::other(format!(
                "the backing directory's own IV is unusable ({e}), so {LOST_FOUND} cannot be named and nothing \
                 is moved there; restore this file from a backup of the backing directory, then repair again"
            )),
        })?;
        let name = layout::backing_name(volume.names(), &root_iv, LOST_FOUND.as_bytes());
        let made = match rustix::fs::mkdirat(&root_dir, name.as_str(), Mode::from_raw_mode(0o700)) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => false,
            Err(e) => return Err(io(e.into())),
        };
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let dir = match rustix::fs::openat(&root_dir, name.as_str(), flags, Mode::empty()) {
            Ok(dir) => dir,
            Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
                return Err(tampered(format!(
                    "{LOST_FOUND} is not a directory (something else has its name); rename it through the \
                     mount, then repair again"
                )));
            }
            Err(e) => return Err(io(e.into())),
        };
        if made {
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o700)).map_err(|e| io(e.into()))?;
            namespace::create_dir_iv(dir.as_fd()).map_err(io)?;
        }
        let iv = namespace::read_dir_iv(dir.as_fd()).map_err(|e| tampered(format!("lost+found IV ({e})")))?;
        Ok(LostFound { dir, iv })
    }

    /// The backing name of `name` in lost+found, its sidecar written if long.
    fn target(&self, volume: &Volume, name: &str) -> Result<String, VolumeError> {
        let backing = layout::backing_name(volume.names(), &self.iv, name.as_bytes());
        if backing.sidecar().is_some() {
            namespace::write_sidecar(self.dir.as_fd(), &backing).map_err(|e| VolumeError::Io {
                path: Path::new(LOST_FOUND).join(backing.as_str()),
                source: e,
            })?;
        }
        Ok(backing.as_str().to_string())
    }

    /// Moves `from` in as `name`, or `name.N` if that is taken (never over
    /// an entry); returns the name it got.
    fn move_in(&self, volume: &Volume, confined: &Confined, from: &Path, name: &str) -> Result<String, VolumeError> {
        let io = |e: std::io::Error| VolumeError::Io {
            path: from.to_path_buf(),
            source: e,
        };
        let mut taken = name.to_string();
        for n in 1.. {
            let to = self.target(volume, &taken)?;
            match confined.move_into(from, &self.dir, &to) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && n < 1000 => taken = format!("{name}.{n}"),
                Err(e) => return Err(io(e)),
            }
        }
        if let Ok((parent, from_name)) = confined.parent(from)
            && from_name.to_string_lossy().starts_with(LONG_NAME_PREFIX)
        {
            let sidecar = format!("{}{SIDECAR_SUFFIX}", from_name.to_string_lossy());
            let _ = rustix::fs::unlinkat(&parent, sidecar.as_str(), AtFlags::empty());
        }
        Ok(taken)
    }

    /// Writes a new encrypted file (the report) into lost+found.
    fn write_file(&self, volume: &Volume, name: &str, data: &[u8]) -> Result<(), VolumeError> {
        let backing_name = self.target(volume, name)?;
        let path = Path::new(LOST_FOUND).join(&backing_name);
        let io = |e: std::io::Error| VolumeError::Io {
            path: path.clone(),
            source: e,
        };
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let file = rustix::fs::openat(&self.dir, backing_name.as_str(), flags, Mode::from_raw_mode(0o600))
            .map(File::from)
            .map_err(|e| io(e.into()))?;
        let (_, cipher) = volume.new_file_key()?;
        content::create(&file, &cipher).map_err(io)?;
        content::write(&file, &cipher, 0, data).map_err(|e| e.at(&path))?;
        file.sync_all().map_err(io)?;
        volume.sync_keys()
    }
}
