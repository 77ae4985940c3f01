//! Conversions between backing `stat` data, errno values and FUSE
//! attributes, and from results to FUSE replies.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use fuser::{Errno, FileAttr, FileType, INodeNo, ReplyEmpty, ReplyEntry, ReplyXattr};
use rustix::fs::Stat;

use super::GENERATION;
use super::inodes::{Node, file_type};
use crate::volume::content::plain_size;

pub type FsResult<T> = Result<T, Errno>;

pub fn errno(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

pub fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new(sec.unsigned_abs(), 0) + Duration::from_nanos(nsec as u64)
    }
}

/// FUSE attributes of a backing inode; `size` overrides the size for
/// symlinks (the plaintext target length), regular files derive theirs.
/// `size`: the size to show where it is not what the backing stat gives
/// (a symlink's target length, a damaged file's stand-in).
pub fn to_attr(ino: u64, st: &Stat, size: Option<u64>) -> FileAttr {
    let kind = file_type(st.st_mode as u32);
    let size = size.unwrap_or(match kind {
        FileType::RegularFile => plain_size(st.st_size as u64),
        _ => st.st_size as u64,
    });
    let mtime = time(st.st_mtime as i64, st.st_mtime_nsec as i64);
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime as i64, st.st_atime_nsec as i64),
        mtime,
        ctime: time(st.st_ctime as i64, st.st_ctime_nsec as i64),
        crtime: mtime,
        kind,
        perm: (st.st_mode as u32 & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

pub fn reply_entry(reply: ReplyEntry, ttl: &Duration, result: FsResult<(Arc<Node>, fuser::FileAttr)>) {
    match result {
        Ok((_, attr)) => reply.entry(ttl, &attr, GENERATION),
        Err(e) => reply.error(e),
    }
}

pub fn reply_empty(reply: ReplyEmpty, result: FsResult<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

pub fn reply_xattr(reply: ReplyXattr, size: u32, result: FsResult<Vec<u8>>) {
    match result {
        Ok(data) if size == 0 => reply.size(data.len() as u32),
        Ok(data) if data.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(e),
    }
}
