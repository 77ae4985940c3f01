//! Extended attributes in a reverse view: the plaintext's `user.*` xattrs
//! and POSIX ACLs of regular files and directories, under their encrypted
//! backing names and sealed with derived nonces (FORMAT.md, "Extended
//! attributes").

use std::os::fd::OwnedFd;

use fuser::Errno;
use rustix::fs::{OFlags, Stat};

use super::{FsResult, ReverseFs, VIRTUAL_BASE, reopen};

impl ReverseFs {
    /// The xattrs of a regular file or directory, under their view names.
    pub(super) fn list_xattrs(&self, ino: u64) -> FsResult<Vec<u8>> {
        let Some((fd, _)) = self.xattr_target(ino)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for name in plain_xattr_names(&fd)? {
            if let Some(stored) = crate::volume::xattrs::StoredName::of(&name, true) {
                out.extend_from_slice(self.volume.xattr_backing_name(&stored).as_bytes());
                out.push(0);
            }
        }
        Ok(out)
    }

    pub(super) fn get_xattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        if !name.starts_with(b"user.") {
            // As forward (fs/xattrs.rs): `ls -l` stops asking for labels and ACLs.
            return Err(Errno::EOPNOTSUPP);
        }
        let Some((fd, st)) = self.xattr_target(ino)? else {
            return Err(Errno::NO_XATTR);
        };
        let stored = self.volume.xattr_stored_name(name).ok_or(Errno::NO_XATTR)?;
        let value = plain_xattr(&fd, &stored.full_name())?;
        let derived = self.derived();
        let owner = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            self.dir_iv(&st)
        } else {
            derived.file_id(st.st_ino as u64).ok_or(Errno::EIO)?
        };
        let nonce = derived.nonce("xattr", &[&owner, stored.as_bytes(), &value]);
        Ok(self.volume.seal_xattr_with_nonce(&owner, &stored, &value, nonce))
    }

    /// Regular files and directories carry xattrs in the forward format;
    /// `None` for other nodes (and the view's own files).
    fn xattr_target(&self, ino: u64) -> FsResult<Option<(OwnedFd, Stat)>> {
        if ino >= VIRTUAL_BASE {
            return Ok(None);
        }
        let (fd, st) = self.open_node(ino, OFlags::PATH)?;
        if !matches!(st.st_mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFDIR) {
            return Ok(None);
        }
        // The xattr calls need a descriptor opened for real, not O_PATH.
        let real = reopen(&fd, OFlags::RDONLY | OFlags::NONBLOCK)?;
        Ok(Some((real, st)))
    }
}

fn plain_xattr_names(fd: &OwnedFd) -> FsResult<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 4096];
    loop {
        match rustix::fs::flistxattr(fd, &mut buf) {
            Ok(n) => {
                return Ok(buf[..n]
                    .split(|&b| b == 0)
                    .filter(|n| !n.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect());
            }
            Err(rustix::io::Errno::RANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            Err(rustix::io::Errno::OPNOTSUPP) => return Ok(Vec::new()),
            Err(e) => return Err(Errno::from_i32(e.raw_os_error())),
        }
    }
}

fn plain_xattr(fd: &OwnedFd, name: &[u8]) -> FsResult<Vec<u8>> {
    let name = std::ffi::CString::new(name).map_err(|_| Errno::NO_XATTR)?;
    let mut buf = vec![0u8; 4096];
    loop {
        match rustix::fs::fgetxattr(fd, name.as_c_str(), &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(Errno::from_i32(e.raw_os_error())),
        }
    }
}
