//! Attribute changes: mode, owner, times and size (SETATTR), and the
//! set-ID bits a write by someone without CAP_FSETID clears.

use std::fs::File;

use fuser::{Errno, FileHandle, FileType, INodeNo, TimeOrNow};
use rustix::fs::{AtFlags, Mode, Timespec, Timestamps, UTIME_NOW, UTIME_OMIT};

use super::KmsFs;
use super::attr::{FsResult, errno};
use super::inodes::{Node, file_type};

/// The attributes a setattr request changes.
pub(super) struct AttrChange {
    /// A truncation by someone without CAP_FSETID: clear set-ID bits.
    pub kill_suidgid: bool,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
}

fn timespec(t: Option<TimeOrNow>) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as _,
            },
            Err(e) => {
                let d = e.duration();
                let (sec, nsec) = if d.subsec_nanos() == 0 {
                    (-(d.as_secs() as i64), 0)
                } else {
                    (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
                };
                Timespec {
                    tv_sec: sec,
                    tv_nsec: nsec as _,
                }
            }
        },
    }
}

impl KmsFs {
    pub(super) fn set_mode(&self, node: &Node, mode: u32) -> FsResult<()> {
        let st = rustix::fs::fstat(node.fd()?.as_fd()).map_err(errno)?;
        if file_type(st.st_mode as u32) == FileType::Symlink {
            return Ok(()); // Linux has no symlink permissions.
        }
        rustix::fs::chmod(node.fd()?.proc_path().as_str(), Mode::from_raw_mode(mode & 0o7777)).map_err(errno)
    }

    /// Clears set-user-ID (and set-group-ID on group-executable files), as
    /// a write or truncation by someone without CAP_FSETID must. The daemon
    /// writes as root, so the backing filesystem does not do it for us.
    /// Returns whether the mode changed.
    pub(super) fn kill_suidgid(&self, file: &File) -> FsResult<bool> {
        let st = rustix::fs::fstat(file).map_err(errno)?;
        let mode = st.st_mode as u32 & 0o7777;
        let mut kill = libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            kill |= libc::S_ISGID;
        }
        if mode & kill == 0 {
            return Ok(false);
        }
        rustix::fs::fchmod(file, Mode::from_raw_mode(mode & !kill)).map_err(errno)?;
        Ok(true)
    }

    /// Makes the kernel drop its cached attributes of `ino`, changed by a
    /// request whose reply does not carry them (a WRITE or FALLOCATE that
    /// cleared set-ID bits): otherwise it would go on using the old mode, for an
    /// `exec` too, until the attribute timeout. Attributes only (offset
    /// -1): nothing a request in progress may hold is waited for.
    pub(super) fn attributes_changed(&self, ino: u64) {
        if let Some(notifier) = self.notifier.get()
            && let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), -1, 0)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            // ENOENT: the kernel no longer holds the inode, nor its attributes.
            log::warn!("inode {ino}: the kernel's cached attributes could not be invalidated: {e}");
        }
    }

    pub(super) fn set_owner_of(&self, node: &Node, uid: Option<u32>, gid: Option<u32>) -> FsResult<()> {
        rustix::fs::chownat(
            node.fd()?.as_fd(),
            "",
            uid.map(rustix::fs::Uid::from_raw),
            gid.map(rustix::fs::Gid::from_raw),
            AtFlags::EMPTY_PATH,
        )
        .map_err(errno)
    }

    pub(super) fn set_times(&self, node: &Node, atime: Option<TimeOrNow>, mtime: Option<TimeOrNow>) -> FsResult<()> {
        let times = Timestamps {
            last_access: timespec(atime),
            last_modification: timespec(mtime),
        };
        rustix::fs::utimensat(node.fd()?.as_fd(), "", &times, AtFlags::EMPTY_PATH).map_err(errno)
    }

    pub(super) fn setattr_inner(
        &self,
        ino: INodeNo,
        change: AttrChange,
        fh: Option<FileHandle>,
    ) -> FsResult<fuser::FileAttr> {
        let AttrChange {
            kill_suidgid,
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        } = change;
        let node = self.node(ino)?;
        node.changed();
        if let Some(size) = size {
            let st = rustix::fs::fstat(node.fd()?.as_fd()).map_err(errno)?;
            match file_type(st.st_mode as u32) {
                FileType::Directory => return Err(Errno::EISDIR),
                FileType::RegularFile => {}
                _ => return Err(Errno::EINVAL),
            }
            let reopened;
            let file = match fh.map(|fh| self.open_file(ino, fh, true)) {
                Some(Ok(open)) => {
                    reopened = open;
                    &reopened.file
                }
                _ => &self.reopen(&node, libc::O_RDWR)?,
            };
            self.truncate(&node, file, size)?;
            // The reply carries the new mode.
            if kill_suidgid && mode.is_none() {
                self.kill_suidgid(file)?;
            }
        }
        if let Some(mode) = mode {
            self.chmod_acl(&node, mode)?;
            self.set_mode(&node, mode)?;
        }
        if uid.is_some() || gid.is_some() {
            self.set_owner_of(&node, uid, gid)?;
        }
        if atime.is_some() || mtime.is_some() {
            self.set_times(&node, atime, mtime)?;
        }
        self.stat_attr(&node)
    }
}
