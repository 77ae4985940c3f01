//! Extended attributes and POSIX ACLs, stored as encrypted xattrs of the
//! backing inode (names sealed deterministically, values bound to the
//! file id or directory IV and to their name; see FORMAT.md).

use fuser::{Errno, FileAttr, FileType};
use rustix::fs::{Mode, XattrFlags};

use super::KmsFs;
use super::acl::Acl;
use super::attr::{FsResult, errno};
use super::inodes::{Node, file_type};
use crate::volume::xattrs::{ACL_ACCESS, ACL_DEFAULT, StoredName};

/// What a new node takes from its directory's default ACL.
pub(super) struct Inherited {
    access: Option<Acl>,
    /// A new directory's own default ACL.
    default: Option<Acl>,
}

/// The mode to create a node with until its inherited ACL is stored: no
/// group bits, so that a crash in between leaves it narrower, not wider.
pub(super) fn provisional_mode(mode: u32, inherited: Option<&Inherited>) -> u32 {
    match inherited {
        Some(Inherited { access: Some(_), .. }) => mode & !0o070,
        _ => mode,
    }
}

/// Regular files and directories keep ACLs; a fifo, socket or device node
/// keeps its mode bits only (xattrs cannot be bound to it: it has no id).
fn keeps_acls(st: &rustix::fs::Stat) -> bool {
    matches!(
        file_type(st.st_mode as u32),
        FileType::RegularFile | FileType::Directory
    )
}

impl KmsFs {
    fn acl_on(&self) -> bool {
        self.acl_on.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How an xattr the kernel names is kept; `None`: not at all.
    fn stored_name(&self, name: &[u8]) -> Option<StoredName> {
        StoredName::of(name, self.acl_on())
    }

    /// The 16 bytes xattr values are bound to: the file id or directory IV.
    fn xattr_owner(&self, node: &Node, create: bool) -> FsResult<Option<[u8; 16]>> {
        let st = rustix::fs::fstat(node.fd()?.as_fd()).map_err(errno)?;
        match file_type(st.st_mode as u32) {
            FileType::Directory => Ok(Some(self.dir_iv(node)?)),
            FileType::RegularFile => {
                let file = self.reopen(node, if create { libc::O_RDWR } else { libc::O_RDONLY })?;
                if create {
                    let _guard = crate::util::write(&node.state().content);
                    Ok(Some(*self.cipher_for_write(node, &file)?.file_id()))
                } else {
                    Ok(self.cipher(node, &file)?.map(|c| *c.file_id()))
                }
            }
            // Linux permits user.* xattrs on regular files and directories
            // only; ACLs of other special files are their mode bits.
            _ if create => Err(Errno::EPERM),
            _ => Ok(None),
        }
    }

    fn store_xattr(&self, node: &Node, stored: &StoredName, value: &[u8], flags: XattrFlags) -> FsResult<()> {
        let owner = self.xattr_owner(node, true)?.ok_or(Errno::EPERM)?;
        self.store_xattr_of(node, &owner, stored, value, flags)
    }

    fn store_xattr_of(
        &self,
        node: &Node,
        owner: &[u8; 16],
        stored: &StoredName,
        value: &[u8],
        flags: XattrFlags,
    ) -> FsResult<()> {
        let sealed = self.volume.seal_xattr(owner, stored, value);
        rustix::fs::setxattr(
            node.fd()?.proc_path().as_str(),
            self.volume.xattr_backing_name(stored).as_str(),
            &sealed,
            flags,
        )
        .map_err(errno)
    }

    /// The plaintext of a stored xattr; ENODATA when there is none.
    fn load_xattr(&self, node: &Node, stored: &StoredName) -> FsResult<Vec<u8>> {
        let owner = self.xattr_owner(node, false)?.ok_or(Errno::NO_XATTR)?;
        let backing = self.volume.xattr_backing_name(stored);
        let node_fd = node.fd()?;
        let path = node_fd.proc_path();
        let len = rustix::fs::getxattr_query(path.as_str(), backing.as_str()).map_err(errno)?;
        let mut buf = vec![0u8; len];
        let n = rustix::fs::getxattr(path.as_str(), backing.as_str(), &mut buf[..]).map_err(errno)?;
        buf.truncate(n);
        self.volume.open_xattr(&owner, stored, &buf).ok_or_else(|| {
            log::error!(
                "xattr {} of {} fails authentication; returning EIO",
                String::from_utf8_lossy(&stored.full_name()),
                self.describe(node)
            );
            Errno::EIO
        })
    }

    fn unstore_xattr(&self, node: &Node, stored: &StoredName) -> FsResult<()> {
        rustix::fs::removexattr(
            node.fd()?.proc_path().as_str(),
            self.volume.xattr_backing_name(stored).as_str(),
        )
        .map_err(errno)
    }

    /// `caller`: the (uid, gid) of the process setting it.
    pub(super) fn set_xattr(
        &self,
        node: &Node,
        name: &[u8],
        value: &[u8],
        flags: i32,
        caller: (u32, u32),
    ) -> FsResult<()> {
        let stored = self.stored_name(name).ok_or(Errno::EOPNOTSUPP)?;
        let flags = XattrFlags::from_bits(flags as u32).ok_or(Errno::EINVAL)?;
        if name == ACL_ACCESS {
            let acl = Acl::parse(value).ok_or(Errno::EINVAL)?;
            return self.set_access_acl(node, &acl, caller);
        }
        if name == ACL_DEFAULT {
            Acl::parse(value).ok_or(Errno::EINVAL)?;
        }
        self.store_xattr(node, &stored, value, flags)
    }

    /// A name outside the namespaces this mount keeps is EOPNOTSUPP, as on
    /// a disk filesystem without them (ext4 `noacl`): `ls -l` then stops
    /// asking this filesystem for SELinux labels and ACLs (coreutils
    /// remembers the device), two round trips per file.
    pub(super) fn get_xattr(&self, node: &Node, name: &[u8]) -> FsResult<Vec<u8>> {
        let stored = self.stored_name(name).ok_or(Errno::EOPNOTSUPP)?;
        self.load_xattr(node, &stored)
    }

    pub(super) fn list_xattrs(&self, node: &Node) -> FsResult<Vec<u8>> {
        let st = rustix::fs::fstat(node.fd()?.as_fd()).map_err(errno)?;
        if !matches!(
            file_type(st.st_mode as u32),
            FileType::Directory | FileType::RegularFile
        ) {
            return Ok(Vec::new());
        }
        let node_fd = node.fd()?;
        let path = node_fd.proc_path();
        let len = rustix::fs::listxattr_query(path.as_str()).map_err(errno)?;
        let mut buf = vec![0u8; len];
        let n = rustix::fs::listxattr(path.as_str(), &mut buf[..]).map_err(errno)?;
        let mut out = Vec::new();
        for backing in buf[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
            match self.volume.xattr_stored_name(backing) {
                Some(name) if self.acl_on() || !name.is_acl() => {
                    out.extend_from_slice(&name.full_name());
                    out.push(0);
                }
                _ => {}
            }
        }
        Ok(out)
    }

    pub(super) fn remove_xattr(&self, node: &Node, name: &[u8]) -> FsResult<()> {
        let stored = self.stored_name(name).ok_or(Errno::EOPNOTSUPP)?;
        if stored.is_acl() && !self.keeps_acls(node)? {
            return Ok(());
        }
        match self.unstore_xattr(node, &stored) {
            // As on a disk filesystem, removing an ACL there is none of succeeds.
            Err(e) if e == Errno::NO_XATTR && stored.is_acl() => Ok(()),
            other => other,
        }
    }

    fn stored_acl(&self, node: &Node, name: &[u8]) -> FsResult<Option<Acl>> {
        let Some(stored) = self.stored_name(name) else {
            return Ok(None);
        };
        match self.load_xattr(node, &stored) {
            Ok(value) => Acl::parse(&value).map(Some).ok_or_else(|| {
                log::error!("{} holds a malformed ACL; returning EIO", self.describe(node));
                Errno::EIO
            }),
            Err(e) if e == Errno::NO_XATTR => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn keeps_acls(&self, node: &Node) -> FsResult<bool> {
        Ok(keeps_acls(&rustix::fs::fstat(node.fd()?.as_fd()).map_err(errno)?))
    }

    /// Sets an access ACL and the mode bits that mirror it; one the mode
    /// bits say all of is not stored (as a disk filesystem does).
    /// Setting it clears set-group-ID when the caller is neither root nor
    /// of the file's group, as the kernel does for a disk filesystem (it
    /// would tell FUSE so through FUSE_SETXATTR_ACL_KILL_SGID, which the
    /// FUSE library here does not pass). Only the caller's primary group is
    /// known: a member through a supplementary group loses the bit too.
    fn set_access_acl(&self, node: &Node, acl: &Acl, caller: (u32, u32)) -> FsResult<()> {
        let stored = self.stored_name(ACL_ACCESS).ok_or(Errno::EOPNOTSUPP)?;
        let st = rustix::fs::fstat(node.fd()?.as_fd()).map_err(errno)?;
        match (acl.is_minimal(), keeps_acls(&st)) {
            (true, true) => match self.unstore_xattr(node, &stored) {
                Err(e) if e != Errno::NO_XATTR => return Err(e),
                _ => {}
            },
            // Its mode bits are all a fifo, socket or device node keeps.
            (true, false) => {}
            (false, true) => self.store_xattr(node, &stored, &acl.to_bytes(), XattrFlags::empty())?,
            (false, false) => return Err(Errno::EOPNOTSUPP),
        }
        let mut special = st.st_mode as u32 & 0o7000;
        if caller.0 != 0 && caller.1 != st.st_gid {
            special &= !libc::S_ISGID;
        }
        self.set_mode(node, special | acl.mode())
    }

    /// After a chmod: the access ACL, if any, takes the new bits.
    /// Whether or not this mount enforces ACLs (one that does, later, must
    /// not find a stale one), and before the mode itself changes. The file
    /// already has its id when it has an ACL: nothing is opened for writing
    /// (a chmod to a mode without owner write must not fail on that).
    pub(super) fn chmod_acl(&self, node: &Node, mode: u32) -> FsResult<()> {
        let Some(stored) = StoredName::of(ACL_ACCESS, true) else {
            return Ok(());
        };
        if !self.keeps_acls(node)? {
            return Ok(());
        }
        // Most files have no ACL: asked first, that costs one call where
        // finding the value's owner (the file id) reopens the file.
        let backing = self.volume.xattr_backing_name(&stored);
        match rustix::fs::getxattr_query(node.fd()?.proc_path().as_str(), backing.as_str()) {
            Err(e) if e == rustix::io::Errno::NODATA => return Ok(()),
            Err(e) => return Err(errno(e)),
            Ok(_) => {}
        }
        let Some(owner) = self.xattr_owner(node, false)? else {
            return Ok(());
        };
        let value = match self.load_xattr(node, &stored) {
            Ok(value) => value,
            Err(e) if e == Errno::NO_XATTR => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut acl = Acl::parse(&value).ok_or_else(|| {
            log::error!("{} holds a malformed ACL; returning EIO", self.describe(node));
            Errno::EIO
        })?;
        acl.chmod(mode);
        self.store_xattr_of(node, &owner, &stored, &acl.to_bytes(), XattrFlags::empty())
    }

    /// The mode a node created in `parent` gets, and what it inherits: with
    /// a default ACL on `parent` the ACL masks `mode`, else the umask does.
    pub(super) fn creation_mode(
        &self,
        parent: &Node,
        mode: u32,
        umask: u32,
        kind: u32,
    ) -> FsResult<(u32, Option<Inherited>)> {
        let default = if self.acl_on() {
            self.stored_acl(parent, ACL_DEFAULT)?
        } else {
            None
        };
        let Some(default) = default else {
            return Ok((mode & !umask, None));
        };
        let (access, mut mode) = default.inherit(mode);
        let keeps_acls = kind == libc::S_IFREG || kind == libc::S_IFDIR;
        if !keeps_acls {
            mode = (mode & !0o777) | access.narrowest_mode();
        }
        let inherited = Inherited {
            access: (!access.is_minimal() && keeps_acls).then_some(access),
            default: (kind == libc::S_IFDIR).then_some(default),
        };
        Ok((mode, Some(inherited)))
    }

    /// Stores what a new node inherited, then gives it its final mode.
    pub(super) fn apply_inherited(&self, node: &Node, inherited: Option<Inherited>, mode: u32) -> FsResult<FileAttr> {
        if let Some(inherited) = inherited {
            if let Some(default) = &inherited.default {
                let stored = self.stored_name(ACL_DEFAULT).ok_or(Errno::EOPNOTSUPP)?;
                self.store_xattr(node, &stored, &default.to_bytes(), XattrFlags::empty())?;
            }
            if let Some(access) = &inherited.access {
                let stored = self.stored_name(ACL_ACCESS).ok_or(Errno::EOPNOTSUPP)?;
                self.store_xattr(node, &stored, &access.to_bytes(), XattrFlags::empty())?;
                // Keeping the set-group-ID bit make_dir gave a directory.
                let made = rustix::fs::fstat(node.fd()?.as_fd()).map_err(errno)?.st_mode as u32;
                let mode = (mode & 0o7777) | (made & libc::S_ISGID);
                rustix::fs::chmod(node.fd()?.proc_path().as_str(), Mode::from_raw_mode(mode)).map_err(errno)?;
            }
        }
        self.stat_attr(node)
    }
}
