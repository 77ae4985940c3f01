//! The encrypted namespace of a backing directory, for everything that
//! walks one (the FUSE front end, fsck, rekey): directory IVs (created,
//! read, taken away before an `rmdir` and put back), entry names (plain →
//! backing, backing → plain through long-name sidecars) and the header
//! that names a file's id. Every read here opens with O_NOATIME: these are
//! the daemon's reads, never the user's (fs/atime.rs).

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags};

use super::header::{self, HEADER_LEN, HeaderError};
use super::layout::{self, BackingName, DIR_IV_FILE, DirIv, Entry};
use crate::crypto::{FileId, NameCipher, NameError, random_array};

/// A long name's sidecar is one encrypted name: never longer than this.
const SIDECAR_MAX: usize = 4096;

/// `openat` with O_NOATIME, or without where the backing filesystem refuses
/// it (only an owner or CAP_FOWNER may ask: a non-root daemon on files it
/// did not create).
pub fn openat_quietly<P: rustix::path::Arg + Copy>(
    dir: BorrowedFd<'_>,
    path: P,
    flags: OFlags,
) -> rustix::io::Result<OwnedFd> {
    match rustix::fs::openat(dir, path, flags | OFlags::NOATIME, Mode::empty()) {
        Err(rustix::io::Errno::PERM) => rustix::fs::openat(dir, path, flags, Mode::empty()),
        other => other,
    }
}

/// Opens directory `dir` of the backing tree (never through a symlink).
pub fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(openat_quietly(rustix::fs::CWD, dir, flags)?)
}

/// Up to `max` bytes of regular file `path` in `dir` (never through a symlink).
/// Nothing else is opened for reading: a device node placed there (opening
/// one can act) or a FIFO is looked at through an `O_PATH` descriptor only.
fn read_small(dir: BorrowedFd<'_>, path: &str, max: usize) -> io::Result<Vec<u8>> {
    let inode = rustix::fs::openat(
        dir,
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if rustix::fs::fstat(&inode)?.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(io::Error::other("not a regular file"));
    }
    let reopen = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
    let again = format!("/proc/self/fd/{}", inode.as_raw_fd());
    // Through /proc, never by name again: the name may have been swapped
    // since the look (kmsfs needs /proc anyway).
    let file = openat_quietly(rustix::fs::CWD, again.as_str(), reopen)?;
    let mut buf = vec![0u8; max];
    let mut len = 0;
    while len < max {
        let n = rustix::io::read(&file, &mut buf[len..])?;
        if n == 0 {
            break;
        }
        len += n;
    }
    buf.truncate(len);
    Ok(buf)
}

/// Writes read-only file `name` in `dir`, replacing one there unless
/// `exclusive`; `durable`: fsynced.
fn write_small(dir: BorrowedFd<'_>, name: &str, content: &[u8], exclusive: bool, durable: bool) -> io::Result<()> {
    let create = if exclusive { OFlags::EXCL } else { OFlags::TRUNC };
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | create | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o444),
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(content)?;
    if durable {
        file.sync_all()?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum IvError {
    #[error("no readable IV file: {0}")]
    Unreadable(io::Error),
    #[error("IV file is {0} bytes, expected 16")]
    Length(usize),
}

pub fn read_dir_iv(dir: BorrowedFd<'_>) -> Result<DirIv, IvError> {
    // Read a little more than an IV, so that a longer file is told apart.
    let bytes = read_small(dir, DIR_IV_FILE, 64).map_err(IvError::Unreadable)?;
    bytes.as_slice().try_into().map_err(|_| IvError::Length(bytes.len()))
}

/// The IV of directory `dir` of the backing tree.
pub fn read_dir_iv_at(dir: &Path) -> Result<DirIv, IvError> {
    read_dir_iv(open_dir(dir).map_err(IvError::Unreadable)?.as_fd())
}

/// Gives a new directory its IV, durably (a directory is never named
/// before it has one).
pub fn create_dir_iv(dir: BorrowedFd<'_>) -> io::Result<DirIv> {
    let iv: DirIv = random_array();
    write_small(dir, DIR_IV_FILE, &iv, true, true)?;
    Ok(iv)
}

/// Takes an empty directory's IV away so that `rmdir` can remove it;
/// ENOTEMPTY if it holds anything else. Returns what was there, to put back
/// with `restore_dir_iv` if the removal fails.
pub fn take_dir_iv(dir: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut entries = rustix::fs::Dir::read_from(dir)?;
    while let Some(entry) = entries.read() {
        let entry = entry?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." && n != DIR_IV_FILE.as_bytes() {
            return Err(rustix::io::Errno::NOTEMPTY.into());
        }
    }
    // An IV that cannot be read now (out of descriptors, say) is not taken:
    // it could not be put back if the removal failed.
    let iv = match read_small(dir, DIR_IV_FILE, 16) {
        Ok(iv) => iv,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    match rustix::fs::unlinkat(dir, DIR_IV_FILE, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(iv),
        Err(e) => Err(e.into()),
    }
}

pub fn restore_dir_iv(dir: BorrowedFd<'_>, iv: &[u8]) -> io::Result<()> {
    if iv.is_empty() {
        return Ok(());
    }
    write_small(dir, DIR_IV_FILE, iv, true, true)
}

/// Writes the sidecar of a long name (nothing for a short one). One that
/// exists already is left as it is: its content follows from its name
/// (the name is a hash of it), and it is read-only.
pub fn write_sidecar(dir: BorrowedFd<'_>, name: &BackingName) -> io::Result<()> {
    match name.sidecar() {
        Some((sidecar, content)) => match write_small(dir, &sidecar, content.as_bytes(), true, false) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        },
        None => Ok(()),
    }
}

pub fn remove_sidecar(dir: BorrowedFd<'_>, name: &BackingName) -> io::Result<()> {
    match name.sidecar() {
        Some((sidecar, _)) => Ok(rustix::fs::unlinkat(dir, sidecar.as_str(), AtFlags::empty())?),
        None => Ok(()),
    }
}

/// Why an entry has no plain name.
#[derive(Debug, thiserror::Error)]
pub enum NameProblem {
    #[error("sidecar unreadable: {0}")]
    Sidecar(io::Error),
    #[error("{0}")]
    Name(#[from] NameError),
}

/// The plain name of backing entry `raw` of `dir` (whose IV is `iv`);
/// `None` for kmsfs's own files, which are never shown.
pub fn plain_name(
    names: &NameCipher,
    dir: BorrowedFd<'_>,
    iv: &DirIv,
    raw: &[u8],
) -> Option<Result<Vec<u8>, NameProblem>> {
    Some(match layout::classify(raw) {
        Entry::Internal => return None,
        Entry::Short(enc) => names.decrypt(iv, enc.as_bytes()).map_err(NameProblem::from),
        Entry::Long { hashed, sidecar } => match read_small(dir, &sidecar, SIDECAR_MAX) {
            Ok(content) => layout::decrypt_long(names, iv, hashed, &content).map_err(NameProblem::from),
            Err(e) => Err(NameProblem::Sidecar(e)),
        },
    })
}

/// What the start of a backing file says about its id.
#[derive(Debug, PartialEq, Eq)]
pub enum FileIdRead {
    /// Nothing there: an empty file (format 1 only: format 2 files always
    /// have a header).
    Empty,
    Id(FileId),
    /// A header that does not decode; `raw` is the id field if the header
    /// is whole (a damaged version field leaves the id readable).
    Damaged {
        raw: Option<FileId>,
        error: HeaderError,
    },
}

/// Reads the header of backing file `path` (a regular file, never through a
/// symlink, never blocking on a fifo: the backing directory does not get
/// to choose what is read).
pub fn read_file_id_at(path: &Path) -> io::Result<FileIdRead> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file = openat_quietly(rustix::fs::CWD, path, flags)?;
    if rustix::fs::fstat(&file)?.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(io::Error::other("not a regular file"));
    }
    read_file_id(&file)
}

/// Reads the header of an open backing file.
pub fn read_file_id(file: impl AsFd) -> io::Result<FileIdRead> {
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = rustix::io::pread(&file, &mut head[got..], got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got == 0 {
        return Ok(FileIdRead::Empty);
    }
    Ok(match header::decode(&head[..got]) {
        Ok(id) => FileIdRead::Id(id),
        Err(error) => FileIdRead::Damaged {
            raw: (got == HEADER_LEN).then(|| head[2..].try_into().ok()).flatten(),
            error,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SecretKey;

    fn dir() -> (tempfile::TempDir, OwnedFd) {
        let t = tempfile::tempdir().unwrap();
        let fd = rustix::fs::open(t.path(), OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        (t, fd)
    }

    #[test]
    fn dir_ivs_are_created_read_taken_and_restored() {
        let (_t, d) = dir();
        assert!(matches!(read_dir_iv(d.as_fd()), Err(IvError::Unreadable(_))));
        let iv = create_dir_iv(d.as_fd()).unwrap();
        assert_eq!(read_dir_iv(d.as_fd()).unwrap(), iv);
        let taken = take_dir_iv(d.as_fd()).unwrap();
        assert_eq!(taken, iv);
        assert!(read_dir_iv(d.as_fd()).is_err());
        restore_dir_iv(d.as_fd(), &taken).unwrap();
        assert_eq!(read_dir_iv(d.as_fd()).unwrap(), iv);
        write_small(d.as_fd(), "other", b"x", true, false).unwrap();
        let busy = take_dir_iv(d.as_fd()).unwrap_err();
        assert_eq!(busy.raw_os_error(), Some(libc::ENOTEMPTY));
        assert_eq!(read_dir_iv(d.as_fd()).unwrap(), iv, "a busy directory keeps its IV");
        rustix::fs::unlinkat(&d, DIR_IV_FILE, AtFlags::empty()).unwrap();
        write_small(d.as_fd(), DIR_IV_FILE, &[1u8; 17], true, false).unwrap();
        assert!(matches!(read_dir_iv(d.as_fd()), Err(IvError::Length(17))));
    }

    #[test]
    fn long_and_short_names_read_back_through_their_sidecars() {
        let (_t, d) = dir();
        let names = NameCipher::new(&SecretKey::random());
        let iv = create_dir_iv(d.as_fd()).unwrap();
        for plain in [b"short".to_vec(), vec![b'l'; 255]] {
            let backing = layout::backing_name(&names, &iv, &plain);
            write_sidecar(d.as_fd(), &backing).unwrap();
            let got = plain_name(&names, d.as_fd(), &iv, backing.as_str().as_bytes());
            assert_eq!(got.unwrap().unwrap(), plain);
            remove_sidecar(d.as_fd(), &backing).unwrap();
            let gone = plain_name(&names, d.as_fd(), &iv, backing.as_str().as_bytes()).unwrap();
            assert_eq!(gone.is_err(), backing.sidecar().is_some());
        }
        assert!(plain_name(&names, d.as_fd(), &iv, DIR_IV_FILE.as_bytes()).is_none());
    }

    #[test]
    fn headers_read_as_id_empty_or_damaged() {
        let (_t, d) = dir();
        let id = [7u8; 16];
        let mut bad_version = header::encode(&id);
        bad_version[1] = 9;
        for (content, want) in [
            (Vec::new(), FileIdRead::Empty),
            (header::encode(&id).to_vec(), FileIdRead::Id(id)),
            (
                bad_version.to_vec(),
                FileIdRead::Damaged {
                    raw: Some(id),
                    error: HeaderError::Version(9),
                },
            ),
            (
                vec![0, 1, 2],
                FileIdRead::Damaged {
                    raw: None,
                    error: HeaderError::Truncated(3),
                },
            ),
        ] {
            write_small(d.as_fd(), "f", &content, true, false).unwrap();
            let f = openat_quietly(d.as_fd(), "f", OFlags::RDONLY).unwrap();
            assert_eq!(read_file_id(&f).unwrap(), want);
            rustix::fs::unlinkat(&d, "f", AtFlags::empty()).unwrap();
        }
    }

    /// An IV file that is not a regular file is never opened for reading
    /// (opening a device node can act): a writer waiting for a reader of a
    /// FIFO put there is still waiting after the IV was asked for.
    #[test]
    fn an_iv_file_that_is_a_fifo_is_never_opened() {
        use std::os::unix::fs::OpenOptionsExt;
        let (tmp, fd) = dir();
        let fifo = tmp.path().join(DIR_IV_FILE);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            fifo.as_path(),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let opened = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (fifo, opened) = (fifo.clone(), opened.clone());
            std::thread::spawn(move || {
                let _w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
                opened.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(matches!(read_dir_iv(fd.as_fd()), Err(IvError::Unreadable(_))));
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!opened.load(std::sync::atomic::Ordering::SeqCst), "the FIFO was opened");
        // Let the writer go.
        let _r = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        writer.join().unwrap();
    }
}
