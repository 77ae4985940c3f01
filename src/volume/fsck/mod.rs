//! `kmsfs fsck`: checks every directory IV, name, long-name sidecar,
//! header, data key, block tag and xattr of a volume, and the metadata DB;
//! with repair, fixes what can be fixed without guessing and moves
//! unreadable entries into `lost+found` with a report.

mod confined;
mod files;
mod repair;
mod walk;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde::Serialize;

use super::content::{self, plain_size};
use super::db::DB_FILE;
use super::layout;
use super::{Volume, VolumeError};
use crate::crypto::FileId;
use crate::util::hex;
use files::{FileOutcome, check_file, check_xattrs};
use walk::{rel, walk_dir};

pub const LOST_FOUND: &str = "lost+found";

#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// missing_dir_iv, bad_dir_iv, bad_name, missing_sidecar, orphan_sidecar, leftover_temporary,
    /// damaged_header, missing_key, bad_key, bad_blocks, bad_symlink, bad_xattr, orphan_key, inaccessible,
    /// unreached, orphan_link_target, db_integrity, no_header, bad_length, duplicate_file_id,
    /// set_aside_keys
    pub kind: &'static str,
    /// Path in the backing directory (relative), or the DB row.
    pub backing: String,
    /// Plaintext path, when the names leading to it decrypt.
    pub path: Option<String>,
    pub detail: String,
    /// What --repair did about it; None if nothing (yet).
    pub repair: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct FsckReport {
    pub directories: u64,
    pub files: u64,
    pub symlinks: u64,
    pub blocks: u64,
    pub db_integrity: String,
    pub problems: Vec<Problem>,
    /// Damaged files an earlier repair already moved into lost+found; they
    /// stay there (readable parts can be copied out) and do not count as
    /// problems. So do keys no file uses while damaged files without a
    /// readable id are about (`orphan_key`, kept).
    pub quarantined: Vec<Problem>,
}

impl FsckReport {
    pub fn unrepaired(&self) -> usize {
        self.problems.iter().filter(|p| p.repair.is_none()).count()
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct FsckOptions {
    pub repair: bool,
    /// Also rewrite unreadable blocks as zeros (implies repair).
    pub salvage: bool,
}

struct FileEntry {
    backing: PathBuf,
    plain: Option<String>,
    inode: (u64, u64),
    /// Backing length when walked (for the progress total).
    len: u64,
}

/// Threads checking files: the check waits on the disk for each small
/// file's blocks, so more reads in flight than cores keep the disk busy.
const CHECK_THREADS: usize = 16;
/// The most of the DB fsck keeps in SQLite's cache (a million files' keys
/// take about 90 MiB).
const MAX_DB_CACHE_MIB: u64 = 256;

/// An entry to move into lost+found, and the index of its problem.
struct Rescue {
    backing: PathBuf,
    plain: Option<String>,
    tag: String,
    problem: usize,
    /// The entry's other problems, repaired with it (a file under a
    /// temporary's name, or whose name does not decrypt, and whose check
    /// found damage too).
    also: Vec<usize>,
    bad_blocks: Vec<u64>,
}

#[derive(Default)]
struct Walk {
    directories: u64,
    symlinks: u64,
    files: Vec<FileEntry>,
    problems: Vec<Problem>,
    rescues: Vec<Rescue>,
    /// (path, problem index) of things to delete on repair.
    removals: Vec<(PathBuf, usize)>,
    /// Empty directories without an IV: (dir, problem index).
    missing_ivs: Vec<(PathBuf, usize)>,
    /// Headers to rewrite: (file, its proven id, problem index).
    header_fixes: Vec<(PathBuf, FileId, usize)>,
    /// DB rows of long symlink targets that some symlink refers to, and
    /// the first backing symlink (inode, path) seen referring to each.
    long_links: HashMap<[u8; 16], ((u64, u64), PathBuf)>,
    /// Directory IVs, and the first directory seen with each.
    dir_ivs: HashMap<layout::DirIv, PathBuf>,
    /// Ids in the headers of files under names kmsfs does not write: their
    /// keys are kept.
    kept_ids: HashSet<FileId>,
    /// Long symlink target rows to erase: (link id, problem index).
    orphan_links: Vec<([u8; 16], usize)>,
    /// Files the system would not let fsck read, and entries it could not
    /// look at or list (a path beyond PATH_MAX): any key no file was seen
    /// to use may be theirs, so none is erased.
    inaccessible: u64,
    /// Damaged files whose id cannot be read (cut to nothing, a header
    /// destroyed): a key no file was seen to use may be theirs, for a copy
    /// of the file from a backup, so none is erased.
    idless: u64,
}

/// A file whose header names an id without a key, beside a key no file
/// names: when that key opens every block of the file, the header's id was
/// damaged (blocks are bound to their file's true id), and the repair is
/// to write the true id back, not to quarantine the file and erase its key.
fn match_damaged_ids(volume: &Volume, w: &mut Walk, orphan_keys: &mut Vec<(FileId, usize)>) {
    let keyless: Vec<(usize, PathBuf)> = w
        .rescues
        .iter()
        .filter(|r| w.problems[r.problem].kind == "missing_key")
        .map(|r| (r.problem, r.backing.clone()))
        .collect();
    for (problem, path) in keyless {
        let Ok(file) = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        else {
            continue;
        };
        let opens = |id: &FileId| {
            volume.file_cipher(id).is_ok_and(|cipher| {
                content::check_blocks(&file, &cipher, &|_| ()).is_ok_and(|(blocks, bad)| blocks > 0 && bad.is_empty())
            })
        };
        let Some(at) = orphan_keys.iter().position(|(id, _)| opens(id)) else {
            continue;
        };
        let (id, key_problem) = orphan_keys.remove(at);
        w.problems[problem].kind = "damaged_header";
        w.problems[problem].detail = format!(
            "file id damaged: its blocks open with the key of file {}, its true id",
            hex(&id)
        );
        w.problems[key_problem].detail = format!("data key of file {}, whose header names another id", hex(&id));
        w.problems[key_problem].repair = Some("kept: it is the damaged file's key".into());
        w.rescues.retain(|r| r.problem != problem);
        w.header_fixes.push((path, id, problem));
    }
}

/// Runs the check; `progress` gets (blocks checked, total blocks).
pub fn fsck(
    volume: &Volume,
    opts: FsckOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<FsckReport, VolumeError> {
    let repair = opts.repair || opts.salvage;
    let root = volume.backing().to_path_buf();
    volume.sync_keys()?;
    // The whole DB in SQLite's cache, up to a bound: every file's key is looked up.
    let db_mib = fs::symlink_metadata(root.join(DB_FILE)).map_or(0, |m| m.len() >> 20);
    volume.db().cache_for_lookups((db_mib + 2).min(MAX_DB_CACHE_MIB))?;
    let mut w = Walk::default();
    walk_dir(volume, &root, Some(String::new()), &mut w)?;

    // Regular files, once per inode (hard links share content), in parallel.
    let mut seen = HashSet::new();
    let all_files = std::mem::take(&mut w.files);
    let files: Vec<&FileEntry> = all_files.iter().filter(|f| seen.insert(f.inode)).collect();
    let total: u64 = files.iter().map(|f| plain_size(f.len).div_ceil(4096)).sum();
    let done = AtomicU64::new(0);
    let tick = |n: u64| progress(done.fetch_add(n, Ordering::Relaxed) + n, total);
    let check_all = || -> Vec<FileOutcome> {
        files
            .par_iter()
            .map(|f| check_file(volume, &f.backing, &tick))
            .collect()
    };
    let outcomes = match rayon::ThreadPoolBuilder::new()
        .num_threads(CHECK_THREADS)
        .thread_name(|i| format!("kmsfs-fsck-{i}"))
        .build()
    {
        Ok(pool) => pool.install(check_all),
        Err(_) => check_all(),
    };
    // File id -> the first backing file (inode) seen with it.
    let mut referenced: HashMap<FileId, PathBuf> = HashMap::new();
    let mut report = FsckReport {
        directories: w.directories,
        files: files.len() as u64,
        symlinks: w.symlinks,
        ..Default::default()
    };
    for (f, outcome) in files.iter().zip(outcomes) {
        let id = match &outcome {
            FileOutcome::Fine(id, _) | FileOutcome::Unreadable { id, .. } => *id,
            FileOutcome::HeaderFixable(id, _) => Some(*id),
            FileOutcome::Inaccessible(_) => None,
        };
        if let Some(id) = id {
            if let Some(first) = referenced.get(&id) {
                let detail = format!(
                    "has the same file id ({}) as {}, another backing file: one was copied over \
                     another's name; they read the same, and deleting either through a mount that has \
                     not seen both erases the key of both",
                    hex(&id),
                    first.strip_prefix(&root).unwrap_or(first).display()
                );
                w.problem(&root, "duplicate_file_id", &f.backing, f.plain.clone(), detail);
            } else {
                referenced.insert(id, f.backing.clone());
            }
        }
        match outcome {
            FileOutcome::Fine(id, blocks) => {
                report.blocks += blocks;
                if let Some(id) = id {
                    for x in check_xattrs(volume, &f.backing, &id) {
                        w.problem(
                            &root,
                            "bad_xattr",
                            &f.backing,
                            f.plain.clone(),
                            format!("{x} does not authenticate"),
                        );
                    }
                }
            }
            FileOutcome::Inaccessible(detail) => {
                // Not damage: left where it is, for whoever can read it.
                w.inaccessible += 1;
                let detail = format!("{detail}; not damage: run fsck as a user who can read it");
                w.problem(&root, "inaccessible", &f.backing, f.plain.clone(), detail);
            }
            FileOutcome::HeaderFixable(id, blocks) => {
                report.blocks += blocks;
                let i = w.problem(
                    &root,
                    "damaged_header",
                    &f.backing,
                    f.plain.clone(),
                    "header version damaged; file id intact".into(),
                );
                w.header_fixes.push((f.backing.clone(), id, i));
            }
            FileOutcome::Unreadable {
                id,
                kind,
                detail,
                bad_blocks,
                blocks,
            } => {
                report.blocks += blocks;
                w.idless += u64::from(id.is_none());
                let i = w.problem(&root, kind, &f.backing, f.plain.clone(), detail);
                let tag = id
                    .map(|id| hex(&id[..4]))
                    .unwrap_or_else(|| format!("ino{}", f.inode.1));
                match w.rescues.iter_mut().find(|r| r.backing == f.backing) {
                    Some(r) => {
                        r.also.push(i);
                        r.bad_blocks = bad_blocks;
                    }
                    None => w.rescues.push(Rescue {
                        backing: f.backing.clone(),
                        plain: f.plain.clone(),
                        tag,
                        problem: i,
                        also: Vec::new(),
                        bad_blocks,
                    }),
                }
            }
        }
    }

    // The metadata DB: integrity, and key rows no file refers to.
    report.db_integrity = volume.db().integrity_check();
    if report.db_integrity != "ok" {
        let d = report.db_integrity.clone();
        w.problem(&root, "db_integrity", &root.join(DB_FILE), None, d);
    }
    // Not repaired: what is in them is for a person to judge.
    for aside in super::rescue::set_aside_files(&root, &volume.info().volume_id) {
        let detail = "a pending-keys file set aside unstored (not one kmsfs wrote, or keys under a volume-key \
                      version this volume no longer holds; the log of the open that set it aside says which): \
                      files whose keys it held read as EIO; look at it, then remove it"
            .to_string();
        w.problem(&root, "set_aside_keys", &aside, None, detail);
    }
    let mut orphan_keys = Vec::new();
    for id in volume.db().file_key_ids()? {
        if !referenced.contains_key(&id) && !w.kept_ids.contains(&id) {
            let detail = format!("data key of file {} that no file uses", hex(&id));
            orphan_keys.push((id, w.problem(&root, "orphan_key", &root.join(DB_FILE), None, detail)));
        }
    }
    match_damaged_ids(volume, &mut w, &mut orphan_keys);
    // Keys no file uses, while damaged files without a readable id are
    // about (in lost+found too): kept, and reported with the quarantined
    // files. One may be the key of such a file, for an intact copy of it
    // put back from a backup; a repair erases them once those files are gone.
    let held_keys: Vec<usize> = if w.idless > 0 {
        orphan_keys.drain(..).map(|(_, i)| i).collect()
    } else {
        Vec::new()
    };
    for &i in &held_keys {
        w.problems[i].repair = Some(format!(
            "kept: {} damaged file(s) without a readable id may be its",
            w.idless
        ));
    }
    // Attributes are sealed under a file's id or a directory's IV, both 16
    // random bytes: one equal to the other was copied to borrow them.
    let borrowed: Vec<(PathBuf, PathBuf)> = w
        .dir_ivs
        .iter()
        .filter_map(|(iv, dir)| Some((dir.clone(), referenced.get(iv)?.clone())))
        .collect();
    for (dir, file) in borrowed {
        let detail = format!(
            "its IV is the file id of {}: copied there, it makes the directory show that file's attributes",
            rel(&root, &file)
        );
        w.problem(&root, "dir_iv_is_file_id", &dir, None, detail);
    }
    for id in volume.db().link_target_ids()? {
        if !w.long_links.contains_key(&id) {
            let detail = format!("long symlink target {} that no symlink uses", hex(&id));
            let i = w.problem(&root, "orphan_link_target", &root.join(DB_FILE), None, detail);
            w.orphan_links.push((id, i));
        }
    }

    // Already quarantined by an earlier repair: reported apart, left alone.
    let in_lost_found = |p: &Problem| {
        p.path
            .as_deref()
            .is_some_and(|p| p.starts_with(&format!("{LOST_FOUND}/")))
    };
    let quarantined: Vec<usize> = (0..w.problems.len())
        .filter(|&i| in_lost_found(&w.problems[i]))
        .collect();
    let (held, rescues): (Vec<Rescue>, Vec<Rescue>) = std::mem::take(&mut w.rescues)
        .into_iter()
        .partition(|r| quarantined.contains(&r.problem));
    w.rescues = rescues;
    if opts.salvage {
        for r in held.iter().filter(|r| !r.bad_blocks.is_empty()) {
            if let Some(note) = repair::salvage_in_place(volume, r) {
                for i in std::iter::once(r.problem).chain(r.also.iter().copied()) {
                    w.problems[i].repair = Some(note.clone());
                }
            }
        }
    }
    if repair {
        repair::repair_volume(volume, &mut w, &orphan_keys, opts.salvage)?;
    }
    for (i, p) in w.problems.into_iter().enumerate() {
        if quarantined.contains(&i) || held_keys.contains(&i) {
            report.quarantined.push(p);
        } else {
            report.problems.push(p);
        }
    }
    Ok(report)
}
