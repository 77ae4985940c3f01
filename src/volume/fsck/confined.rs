//! The repairs' way into the backing tree once the walk is over. The
//! backing directory may have changed since the walk looked at an entry:
//! a directory on its path swapped for a symlink would lead a path-based
//! rename, write or removal anywhere outside the volume. Here every
//! directory on the way is opened from the backing directory down, never
//! through a symlink, and the entry itself is acted on relative to its
//! directory, never followed.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

use super::super::namespace;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

pub(super) struct Confined {
    root: OwnedFd,
    backing: PathBuf,
}

impl Confined {
    pub(super) fn open(backing: &Path) -> io::Result<Self> {
        // The backing directory itself as the user named it, through a
        // symlink if that is how (the user's choice); nothing below it.
        let root = rustix::fs::openat(
            rustix::fs::CWD,
            backing,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Confined {
            root,
            backing: backing.to_path_buf(),
        })
    }

    /// The directory at `path`, a path in the backing tree as the walk
    /// named it.
    pub(super) fn dir(&self, path: &Path) -> io::Result<OwnedFd> {
        let inside = path
            .strip_prefix(&self.backing)
            .map_err(|_| io::Error::other("not in the backing directory"))?;
        let mut dir = rustix::fs::openat(&self.root, ".", DIR_FLAGS, Mode::empty())?;
        for component in inside.components() {
            let Component::Normal(name) = component else {
                return Err(io::Error::other("not a plain path in the backing directory"));
            };
            dir = rustix::fs::openat(&dir, name, DIR_FLAGS, Mode::empty())?;
        }
        Ok(dir)
    }

    /// The directory holding `path`, and the entry's name in it.
    pub(super) fn parent<'p>(&self, path: &'p Path) -> io::Result<(OwnedFd, &'p OsStr)> {
        match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) => Ok((self.dir(parent)?, name)),
            _ => Err(io::Error::other("not an entry of the backing directory")),
        }
    }

    /// Regular file `path`, opened to read and write (a symlink, a FIFO or a
    /// device in its place is refused, never opened).
    pub(super) fn file(&self, path: &Path) -> io::Result<File> {
        let (dir, name) = self.parent(path)?;
        let flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let file = rustix::fs::openat(&dir, name, flags, Mode::empty())?;
        if rustix::fs::fstat(&file)?.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::other("not a regular file"));
        }
        Ok(File::from(file))
    }

    /// Removes entry `path` itself (a symlink is removed, not followed); a
    /// directory only if it holds nothing but its IV. Whether it was removed.
    pub(super) fn remove(&self, path: &Path) -> io::Result<bool> {
        let (parent, name) = self.parent(path)?;
        let stat = rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW)?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFDIR {
            rustix::fs::unlinkat(&parent, name, AtFlags::empty())?;
            return Ok(true);
        }
        let dir = rustix::fs::openat(&parent, name, DIR_FLAGS, Mode::empty())?;
        let iv = match namespace::take_dir_iv(dir.as_fd()) {
            Ok(iv) => iv,
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => return Ok(false),
            Err(e) => return Err(e),
        };
        if let Err(e) = rustix::fs::unlinkat(&parent, name, AtFlags::REMOVEDIR) {
            // Something came in meanwhile: as it was.
            let _ = namespace::restore_dir_iv(dir.as_fd(), &iv);
            return Err(e.into());
        }
        Ok(true)
    }

    /// Moves entry `from` into directory `to_dir` as `to_name`, never over
    /// an entry there.
    pub(super) fn move_into(&self, from: &Path, to_dir: &OwnedFd, to_name: &str) -> io::Result<()> {
        let (parent, name) = self.parent(from)?;
        rustix::fs::renameat_with(&parent, name, to_dir, to_name, rustix::fs::RenameFlags::NOREPLACE)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backing tree `b/d/f` whose directory `d` was swapped, after the
    /// walk, for a symlink to `outside`, which holds an `f` of its own.
    fn swapped() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let top = tempfile::tempdir().unwrap();
        let backing = top.path().join("b");
        let outside = top.path().join("outside");
        std::fs::create_dir_all(backing.join("kept")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("f"), b"not the volume's").unwrap();
        std::os::unix::fs::symlink(&outside, backing.join("d")).unwrap();
        (top, backing, outside)
    }

    #[test]
    fn nothing_is_reached_through_a_directory_swapped_for_a_symlink() {
        let (_top, backing, outside) = swapped();
        let c = Confined::open(&backing).unwrap();
        let through = backing.join("d/f");
        assert!(c.dir(&backing.join("d")).is_err());
        assert!(c.file(&through).is_err(), "opened to write");
        assert!(c.remove(&through).is_err(), "removed");
        let into = c.dir(&backing.join("kept")).unwrap();
        assert!(c.move_into(&through, &into, "moved").is_err(), "moved in");
        assert_eq!(std::fs::read(outside.join("f")).unwrap(), b"not the volume's");
        assert!(!backing.join("kept/moved").exists());
        // A path that leaves the backing directory is refused as such.
        assert!(c.dir(&outside).is_err() && c.dir(&backing.join("kept/..")).is_err());
    }

    #[test]
    fn an_entry_swapped_for_a_symlink_is_acted_on_itself() {
        let (_top, backing, outside) = swapped();
        let c = Confined::open(&backing).unwrap();
        let link = backing.join("kept/f");
        std::os::unix::fs::symlink(outside.join("f"), &link).unwrap();
        assert!(c.file(&link).is_err(), "the link was followed to write");
        assert!(c.remove(&link).unwrap(), "the link itself goes");
        assert!(std::fs::symlink_metadata(&link).is_err());
        assert_eq!(std::fs::read(outside.join("f")).unwrap(), b"not the volume's");
        // A FIFO is refused, not opened (which would wait for a writer).
        let fifo = backing.join("kept/fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(c.file(&fifo).is_err());
    }

    #[test]
    fn a_backing_directory_named_through_a_symlink_is_reached() {
        let (top, backing, _) = swapped();
        let link = top.path().join("link-to-backing");
        std::os::unix::fs::symlink(&backing, &link).unwrap();
        let c = Confined::open(&link).unwrap();
        std::fs::write(backing.join("kept/f"), b"x").unwrap();
        assert!(c.file(&link.join("kept/f")).is_ok());
        assert!(
            c.dir(&link.join("d")).is_err(),
            "but nothing below it through a symlink"
        );
    }

    #[test]
    fn a_directory_goes_only_while_it_holds_nothing_but_its_iv() {
        let top = tempfile::tempdir().unwrap();
        let backing = top.path().to_path_buf();
        let c = Confined::open(&backing).unwrap();
        let dir = backing.join("kmsfs.tmp.x");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(super::super::super::layout::DIR_IV_FILE), [0u8; 16]).unwrap();
        std::fs::write(dir.join("other"), b"x").unwrap();
        assert!(!c.remove(&dir).unwrap());
        assert!(dir.join("other").exists() && dir.join(super::super::super::layout::DIR_IV_FILE).exists());
        std::fs::remove_file(dir.join("other")).unwrap();
        assert!(c.remove(&dir).unwrap());
        assert!(!dir.exists());
    }
}
