//! Reverse mode: a read-only, encrypted view of a plaintext directory, laid
//! out as a forward volume's backing directory (docs/FORMAT.md), so that a
//! copy of it mounts in normal mode. Everything in the view is derived
//! (crypto::DerivedKeys) from the volume kept in `PLAIN/.kmsfs-reverse`:
//! the same plaintext gives the same bytes on every mount, and a backup
//! tool copies only what changed.
//!
//! The view holds, in every directory, the entries of the plaintext
//! directory under encrypted names (long ones with their sidecars) and a
//! `.kmsfs.diriv`; at its top also `kmsfs.db`, the volume's metadata DB
//! (wrapped keys only). It leaves out `.kmsfs-reverse`, excluded entries,
//! and whatever lies on another filesystem (mount points inside PLAIN).

// `stat` field types differ between architectures; the casts are for the others.
#![allow(clippy::unnecessary_cast)]

pub mod exclude;
mod names;
mod requests;
mod view;
mod virtuals;
mod xattrs;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Stat, StatxAttributes, StatxFlags};

use crate::crypto::DerivedKeys;
use crate::fs::attr::to_attr;
use crate::volume::Volume;
use exclude::Excludes;
use view::{ViewFile, view_size};
use virtuals::{Virtual, Virtuals};

pub use requests::mount;

/// Where `kmsfs init --reverse PLAIN` keeps the volume: `PLAIN/.kmsfs-reverse`.
pub const VOLUME_DIR: &str = ".kmsfs-reverse";
/// The view's copy of the volume's metadata DB, at its top.
const DESCRIPTOR: &str = "kmsfs.db";

type FsResult<T> = Result<T, Errno>;

pub fn volume_dir(plain: &Path) -> PathBuf {
    plain.join(VOLUME_DIR)
}

/// Node ids at and above this are the view's own files (directory IVs,
/// sidecars, the DB); below it, a node id is the plaintext inode number
/// (the top directory's swapped with 1, which FUSE reserves for it).
const VIRTUAL_BASE: u64 = 1 << 63;

/// A directory of the view, opened: its node, plaintext path and inode.
struct OpenDir {
    ino: u64,
    path: PathBuf,
    fd: OwnedFd,
    st: Stat,
}

pub struct ReverseOptions {
    pub ttl: Duration,
    pub excludes: Excludes,
}

pub struct ReverseFs {
    volume: Arc<Volume>,
    root: OwnedFd,
    root_ino: u64,
    root_dev: u64,
    options: ReverseOptions,
    /// The plaintext path (from the top) each node was last looked up by.
    paths: Mutex<HashMap<u64, (PathBuf, u64)>>,
    virtuals: Mutex<Virtuals>,
    descriptor: (Arc<[u8]>, Stat),
    keys_made: SystemTime,
    files: Mutex<HashMap<u64, Arc<ViewFile>>>,
    next_handle: AtomicU64,
    long_names: names::LongNames,
}

#[derive(Debug, thiserror::Error)]
pub enum ReverseError {
    #[error("{0} is not a volume of a reverse view: its metadata DB has no derived keys")]
    NotReverse(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl ReverseFs {
    /// The view of `plain`, whose volume (`plain/.kmsfs-reverse`) is open.
    pub fn new(volume: Arc<Volume>, plain: &Path, options: ReverseOptions) -> Result<Self, ReverseError> {
        if volume.derived().is_none() {
            return Err(ReverseError::NotReverse(volume.backing().to_path_buf()));
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |e: std::io::Error| ReverseError::Io { path, source: e }
        };
        let root = rustix::fs::open(plain, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| io(plain)(e.into()))?;
        let st = rustix::fs::fstat(&root).map_err(|e| io(plain)(e.into()))?;
        // Whatever the DB's WAL holds goes into the file served as the descriptor.
        volume
            .db()
            .checkpoint()
            .map_err(|e| io(volume.backing())(std::io::Error::other(e.to_string())))?;
        let db_path = volume.backing().join(crate::volume::db::DB_FILE);
        let db_bytes = std::fs::read(&db_path).map_err(io(&db_path))?;
        let db_stat = rustix::fs::stat(&db_path).map_err(|e| io(&db_path)(e.into()))?;
        let keys = volume
            .db()
            .volume_keys()
            .map_err(|e| io(volume.backing())(std::io::Error::other(e.to_string())))?;
        let active = keys.into_iter().find(|k| k.state == "active").map(|k| k.created_at);
        let keys_made = UNIX_EPOCH + Duration::from_secs(active.unwrap_or(0).max(0) as u64);
        // Every request resolves paths with openat2 (Linux 5.6).
        let probe = rustix::fs::openat2(
            &root,
            ".",
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV,
        );
        if let Err(e) = probe {
            let why = std::io::Error::other(format!("openat2 ({e}): reverse views need Linux 5.6 or later"));
            return Err(io(plain)(why));
        }
        Ok(ReverseFs {
            root_ino: st.st_ino as u64,
            root_dev: st.st_dev as u64,
            root,
            volume,
            options,
            paths: Mutex::new(HashMap::from([(1, (PathBuf::new(), 1))])),
            virtuals: Mutex::new(Virtuals::new()),
            descriptor: (db_bytes.into(), db_stat),
            keys_made,
            files: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            long_names: names::LongNames::default(),
        })
    }

    fn derived(&self) -> &DerivedKeys {
        self.volume.derived().expect("checked when the view was made")
    }

    /// Node id of a plaintext inode, and back (the map is its own inverse).
    fn node_id(&self, plain_ino: u64) -> u64 {
        match plain_ino {
            i if i == self.root_ino => 1,
            1 => self.root_ino,
            i => i,
        }
    }

    /// Opens a plaintext path below the top, never through a symlink and
    /// never onto another filesystem.
    fn open_plain(&self, relative: &Path, flags: OFlags) -> FsResult<OwnedFd> {
        let path = if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative
        };
        rustix::fs::openat2(
            &self.root,
            path,
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV,
        )
        .map_err(|e| match e {
            rustix::io::Errno::XDEV | rustix::io::Errno::LOOP => Errno::ENOENT,
            e => Errno::from_i32(e.raw_os_error()),
        })
    }

    /// The plaintext path of a node, and that it is still the same inode.
    fn path_of(&self, ino: u64) -> FsResult<PathBuf> {
        crate::util::lock(&self.paths)
            .get(&ino)
            .map(|(path, _)| path.clone())
            .ok_or(Errno::ENOENT)
    }

    /// Opens a node's plaintext inode; ESTALE if its path now names another.
    fn open_node(&self, ino: u64, flags: OFlags) -> FsResult<(OwnedFd, Stat)> {
        let fd = self.open_plain(&self.path_of(ino)?, flags)?;
        let st = rustix::fs::fstat(&fd).map_err(|e| Errno::from_i32(e.raw_os_error()))?;
        if self.node_id(st.st_ino as u64) != ino {
            return Err(Errno::ESTALE);
        }
        Ok((fd, st))
    }

    fn remember(&self, ino: u64, path: PathBuf) {
        let mut paths = crate::util::lock(&self.paths);
        let entry = paths.entry(ino).or_insert((PathBuf::new(), 0));
        entry.0 = path;
        entry.1 += 1;
    }

    fn forget(&self, ino: u64, count: u64) {
        if ino >= VIRTUAL_BASE {
            return self.forget_virtual(ino, count);
        }
        let mut paths = crate::util::lock(&self.paths);
        let gone = paths.get_mut(&ino).is_some_and(|(_, lookups)| {
            *lookups = lookups.saturating_sub(count);
            *lookups == 0 && ino != 1
        });
        if gone {
            paths.remove(&ino);
        }
    }

    /// The attributes the view shows for a plaintext inode (`fd` opened on it).
    fn plain_attr(&self, fd: &OwnedFd, st: &Stat) -> FsResult<FileAttr> {
        let ino = self.node_id(st.st_ino as u64);
        if ino >= VIRTUAL_BASE {
            log::error!("an inode number of the plaintext directory is too large for the view");
            return Err(Errno::EIO);
        }
        let mut attr = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => {
                let size = view_size(st.st_size as u64);
                let mut attr = to_attr(ino, st, Some(size));
                // As much more as the blocks' overhead adds (holes stay holes).
                attr.blocks = (st.st_blocks as u64 * size).div_ceil((st.st_size as u64).max(1)).max(1);
                attr
            }
            libc::S_IFLNK => {
                // A target too long to show still leaves the entry listed:
                // its readlink fails, which the backup tool reports.
                let shown = match self.link_target(fd, st) {
                    Ok(target) => target.len() as u64,
                    Err(e) if e == Errno::ENAMETOOLONG => 0,
                    Err(e) => return Err(e),
                };
                to_attr(ino, st, Some(shown))
            }
            _ => to_attr(ino, st, None),
        };
        attr.ino = INodeNo(ino);
        Ok(attr)
    }

    /// A symlink's target as the view shows it: sealed with a derived nonce.
    fn link_target(&self, fd: &OwnedFd, st: &Stat) -> FsResult<String> {
        let target = rustix::fs::readlinkat(fd, "", Vec::new()).map_err(|e| Errno::from_i32(e.raw_os_error()))?;
        let nonce = self
            .derived()
            .nonce("symlink", &[&(st.st_ino as u64).to_be_bytes(), target.as_bytes()]);
        self.volume
            .encrypt_link_target_with_nonce(target.as_bytes(), nonce)
            .ok_or_else(|| {
                log::error!(
                    "a symlink target of {} bytes is too long for a reverse view (inode {})",
                    target.as_bytes().len(),
                    st.st_ino
                );
                Errno::ENAMETOOLONG
            })
    }

    /// Whether an entry of the plaintext directory `dir` (on the top's
    /// filesystem) is in the view.
    fn shown(&self, dir: &Path, name: &OsStr, is_dir: bool) -> bool {
        if dir.as_os_str().is_empty() && name == VOLUME_DIR {
            return false;
        }
        !self.options.excludes.excludes(&dir.join(name), is_dir)
    }

    fn dir_iv(&self, dir_st: &Stat) -> [u8; 16] {
        self.derived().dir_iv(dir_st.st_ino as u64)
    }

    /// LOOKUP: an encrypted name (or a name of the view's own) in a directory.
    fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<FileAttr> {
        self.lookup_in(&self.open_dir_node(parent)?, name)
    }

    /// A directory node opened for lookups in it.
    fn open_dir_node(&self, ino: u64) -> FsResult<OpenDir> {
        let (fd, st) = self.open_node(ino, OFlags::PATH | OFlags::DIRECTORY)?;
        Ok(OpenDir {
            ino,
            path: self.path_of(ino)?,
            fd,
            st,
        })
    }

    /// LOOKUP in a directory already opened (READDIRPLUS looks up every
    /// entry of one directory).
    fn lookup_in(&self, dir: &OpenDir, name: &OsStr) -> FsResult<FileAttr> {
        let OpenDir {
            ino: parent,
            path: dir_path,
            fd: dir_fd,
            st: dir_st,
        } = dir;
        let (parent, dir_st) = (*parent, *dir_st);
        let name = name.as_bytes();
        let owner = (dir_st.st_uid, dir_st.st_gid);
        if name == crate::volume::layout::DIR_IV_FILE.as_bytes() {
            let iv = self.dir_iv(&dir_st);
            let what = Virtual::DirIv {
                dir: dir_st.st_ino as u64,
            };
            return self.virtual_lookup(what, Arc::from(&iv[..]), owner);
        }
        if parent == 1 && name == DESCRIPTOR.as_bytes() {
            return self.virtual_lookup(Virtual::Descriptor, Arc::clone(&self.descriptor.0), owner);
        }
        let iv = self.dir_iv(&dir_st);
        let plain_name = match names::parse(name) {
            names::ViewName::Sidecar(hashed) => {
                let (plain_name, encrypted) = self.find_long(dir_fd, &dir_st, &iv, hashed)?;
                // Only the sidecar of an entry the view shows.
                let fd = self.open_child(dir_fd, &plain_name)?;
                let st = rustix::fs::fstat(&fd).map_err(|e| Errno::from_i32(e.raw_os_error()))?;
                if !self.shown(dir_path, &plain_name, is_dir(&st)) {
                    return Err(Errno::ENOENT);
                }
                let what = Virtual::Sidecar {
                    dir: dir_st.st_ino as u64,
                    hashed: hashed.to_string(),
                };
                return self.virtual_lookup(what, Arc::from(encrypted.as_bytes()), owner);
            }
            names::ViewName::Long(hashed) => self.find_long(dir_fd, &dir_st, &iv, hashed)?.0,
            names::ViewName::Short(encrypted) => names::decrypt_short(self.volume.names(), &iv, encrypted)?,
            names::ViewName::Other => return Err(Errno::ENOENT),
        };
        let path = dir_path.join(&plain_name);
        let fd = self.open_child(dir_fd, &plain_name)?;
        let st = rustix::fs::fstat(&fd).map_err(|e| Errno::from_i32(e.raw_os_error()))?;
        if st.st_dev as u64 != self.root_dev || !self.shown(dir_path, &plain_name, is_dir(&st)) {
            return Err(Errno::ENOENT);
        }
        let attr = self.plain_attr(&fd, &st)?;
        self.remember(attr.ino.0, path);
        Ok(attr)
    }

    /// An entry of an opened directory (a single name, never `..`: names
    /// come decrypted and checked), opened `O_PATH` as `open_plain` would.
    fn open_child(&self, dir_fd: &OwnedFd, name: &OsStr) -> FsResult<OwnedFd> {
        rustix::fs::openat2(
            dir_fd,
            name,
            OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV,
        )
        .map_err(|e| match e {
            rustix::io::Errno::XDEV | rustix::io::Errno::LOOP => Errno::ENOENT,
            e => Errno::from_i32(e.raw_os_error()),
        })
    }

    fn find_long(&self, dir_fd: &OwnedFd, dir_st: &Stat, iv: &[u8; 16], hashed: &str) -> FsResult<(OsString, String)> {
        let dir = self.open_plain_dir_at(dir_fd)?;
        self.long_names
            .find(self.volume.names(), dir, dir_st, iv, hashed)
            .ok_or(Errno::ENOENT)
    }

    fn open_plain_dir_at(&self, dir_fd: &OwnedFd) -> FsResult<OwnedFd> {
        rustix::fs::openat(
            dir_fd,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Errno::from_i32(e.raw_os_error()))
    }

    fn getattr(&self, ino: u64) -> FsResult<FileAttr> {
        if ino >= VIRTUAL_BASE {
            return self.virtual_attr(ino);
        }
        let (fd, st) = self.open_node(ino, OFlags::PATH)?;
        self.plain_attr(&fd, &st)
    }

    fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let (fd, st) = self.open_node(ino, OFlags::PATH)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            return Err(Errno::EINVAL);
        }
        Ok(self.link_target(&fd, &st)?.into_bytes())
    }

    /// OPEN of a regular file: the plaintext opened, its size taken.
    fn open(&self, ino: u64) -> FsResult<u64> {
        if ino >= VIRTUAL_BASE {
            self.virtual_content(ino)?;
            return Ok(0);
        }
        // Checked to be a regular file before it is opened for reading: a
        // fifo or device put in its place must not be opened.
        let (path_fd, st) = self.open_node(ino, OFlags::PATH)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Errno::EINVAL);
        }
        let fd = reopen(&path_fd, OFlags::RDONLY)?;
        let derived = self.derived();
        let Some(file_id) = derived.file_id(st.st_ino as u64) else {
            return Err(Errno::EIO);
        };
        let cipher = crate::crypto::BlockCipher::new(&derived.data_key(&file_id), file_id, self.volume.layout());
        let file = Arc::new(ViewFile::new(fd, st.st_size as u64, file_id, cipher));
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        crate::util::lock(&self.files).insert(fh, file);
        Ok(fh)
    }

    fn read(&self, ino: u64, fh: u64, offset: u64, size: usize) -> FsResult<Vec<u8>> {
        if ino >= VIRTUAL_BASE {
            let content = self.virtual_content(ino)?;
            let start = (offset as usize).min(content.len());
            let end = start.saturating_add(size).min(content.len());
            return Ok(content[start..end].to_vec());
        }
        let file = crate::util::lock(&self.files).get(&fh).cloned().ok_or(Errno::EBADF)?;
        file.read(self.derived(), offset, size)
            .map_err(|e| Errno::from_i32(e.raw_os_error()))
    }

    fn release(&self, fh: u64) {
        crate::util::lock(&self.files).remove(&fh);
    }

    /// The entries of a directory as the view lists them: name, node id, type.
    fn list(&self, ino: u64) -> FsResult<Vec<(OsString, u64, FileType)>> {
        let (path_fd, dir_st) = self.open_node(ino, OFlags::PATH | OFlags::DIRECTORY)?;
        if !is_dir(&dir_st) {
            return Err(Errno::ENOTDIR);
        }
        let dir_fd = reopen(&path_fd, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let dir_path = self.path_of(ino)?;
        let iv = self.dir_iv(&dir_st);
        let mut entries = Vec::new();
        let diriv = Virtual::DirIv {
            dir: dir_st.st_ino as u64,
        };
        entries.push((
            crate::volume::layout::DIR_IV_FILE.into(),
            self.virtual_id(&diriv),
            FileType::RegularFile,
        ));
        if ino == 1 {
            entries.push((
                DESCRIPTOR.into(),
                self.virtual_id(&Virtual::Descriptor),
                FileType::RegularFile,
            ));
        }
        let dir = rustix::fs::Dir::read_from(&dir_fd).map_err(|e| Errno::from_i32(e.raw_os_error()))?;
        for entry in dir {
            let entry = entry.map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let wanted = StatxFlags::TYPE | StatxFlags::INO;
            let st = match rustix::fs::statx(&dir_fd, name, AtFlags::SYMLINK_NOFOLLOW, wanted) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => continue, // removed meanwhile
                Err(e) => return Err(Errno::from_i32(e.raw_os_error())),
            };
            // Mount points (bind mounts of the same filesystem too) are left
            // out, as LOOKUP's RESOLVE_NO_XDEV refuses them.
            let root_dev = (rustix::fs::major(self.root_dev), rustix::fs::minor(self.root_dev));
            let mount_root = st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT);
            let mode = u32::from(st.stx_mode);
            if mount_root
                || (st.stx_dev_major, st.stx_dev_minor) != root_dev
                || !self.shown(&dir_path, name, mode & libc::S_IFMT == libc::S_IFDIR)
            {
                continue;
            }
            let kind = crate::fs::inodes::file_type(mode);
            let node = self.node_id(st.stx_ino);
            if node >= VIRTUAL_BASE {
                log::error!("an inode number of the plaintext directory is too large for the view");
                return Err(Errno::EIO);
            }
            match crate::volume::layout::backing_name(self.volume.names(), &iv, name.as_bytes()) {
                crate::volume::layout::BackingName::Short(encrypted) => entries.push((encrypted.into(), node, kind)),
                crate::volume::layout::BackingName::Long { hashed, .. } => {
                    let sidecar = Virtual::Sidecar {
                        dir: dir_st.st_ino as u64,
                        hashed: hashed.clone(),
                    };
                    let sidecar_name = format!("{hashed}{}", crate::volume::layout::SIDECAR_SUFFIX);
                    entries.push((hashed.into(), node, kind));
                    entries.push((sidecar_name.into(), self.virtual_id(&sidecar), FileType::RegularFile));
                }
            }
        }
        Ok(entries)
    }

    fn statfs(&self) -> FsResult<rustix::fs::StatVfs> {
        rustix::fs::fstatvfs(&self.root).map_err(|e| Errno::from_i32(e.raw_os_error()))
    }
}

fn is_dir(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// The inode an `O_PATH` descriptor names, opened for real (through
/// /proc: the same inode, whatever its path names now), without moving its
/// access time where the daemon may say so.
fn reopen(fd: &OwnedFd, flags: OFlags) -> FsResult<OwnedFd> {
    use std::os::fd::AsRawFd;
    let again = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    let flags = flags | OFlags::CLOEXEC;
    match rustix::fs::open(&again, flags | OFlags::NOATIME, Mode::empty()) {
        Err(rustix::io::Errno::PERM) => rustix::fs::open(&again, flags, Mode::empty()),
        other => other,
    }
    .map_err(|e| Errno::from_i32(e.raw_os_error()))
}
