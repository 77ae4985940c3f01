//! The view's own files, which have no plaintext counterpart: each
//! directory's `.kmsfs.diriv`, long-name sidecars and the top's `kmsfs.db`.
//! Their node numbers are derived from what they are, so that they are the
//! same on every mount.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use fuser::{Errno, FileAttr, FileType, INodeNo};

use super::{FsResult, ReverseFs, VIRTUAL_BASE};
use crate::fs::attr::to_attr;

/// A file of the view that has no plaintext counterpart.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) enum Virtual {
    Descriptor,
    DirIv { dir: u64 },
    Sidecar { dir: u64, hashed: String },
}

pub(super) struct VirtualNode {
    content: Arc<[u8]>,
    /// Owner and times: the directory's owner, and the time the volume's
    /// keys were made (so that a rotation, which changes every IV and
    /// sidecar, changes their times too and `rsync` copies them again).
    owner: (u32, u32),
    mode: u16,
    time: SystemTime,
    lookups: u64,
}

/// The view's own files the kernel holds, by node id.
pub(super) type Virtuals = HashMap<u64, (Virtual, VirtualNode)>;

impl ReverseFs {
    pub(super) fn virtual_attr(&self, ino: u64) -> FsResult<FileAttr> {
        let virtuals = crate::util::lock(&self.virtuals);
        let (what, node) = virtuals.get(&ino).ok_or(Errno::ENOENT)?;
        if *what == Virtual::Descriptor {
            let mut attr = to_attr(ino, &self.descriptor.1, Some(node.content.len() as u64));
            attr.ino = INodeNo(ino);
            return Ok(attr);
        }
        Ok(FileAttr {
            ino: INodeNo(ino),
            size: node.content.len() as u64,
            blocks: (node.content.len() as u64).div_ceil(512),
            atime: node.time,
            mtime: node.time,
            ctime: node.time,
            crtime: node.time,
            kind: FileType::RegularFile,
            perm: node.mode,
            nlink: 1,
            uid: node.owner.0,
            gid: node.owner.1,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// The node id of one of the view's own files: derived from what it is,
    /// so that it is the same on every mount (restic, for one, records it).
    pub(super) fn virtual_id(&self, what: &Virtual) -> u64 {
        let number = match what {
            Virtual::Descriptor => self.derived().number("descriptor", &[]),
            Virtual::DirIv { dir } => self.derived().number("diriv", &[&dir.to_be_bytes()]),
            Virtual::Sidecar { dir, hashed } => self
                .derived()
                .number("sidecar", &[&dir.to_be_bytes(), hashed.as_bytes()]),
        };
        VIRTUAL_BASE | number
    }

    /// Looks a virtual file up: its node, made if the kernel holds none.
    pub(super) fn virtual_lookup(&self, what: Virtual, content: Arc<[u8]>, owner: (u32, u32)) -> FsResult<FileAttr> {
        let id = self.virtual_id(&what);
        {
            let mut virtuals = crate::util::lock(&self.virtuals);
            let mode = if what == Virtual::Descriptor {
                (self.descriptor.1.st_mode & 0o7777) as u16
            } else {
                0o444
            };
            let (_, node) = virtuals.entry(id).or_insert_with(|| {
                let node = VirtualNode {
                    content,
                    owner,
                    mode,
                    time: self.keys_made,
                    lookups: 0,
                };
                (what, node)
            });
            node.lookups += 1;
        }
        self.virtual_attr(id)
    }

    pub(super) fn virtual_content(&self, ino: u64) -> FsResult<Arc<[u8]>> {
        crate::util::lock(&self.virtuals)
            .get(&ino)
            .map(|(_, node)| Arc::clone(&node.content))
            .ok_or(Errno::ENOENT)
    }

    pub(super) fn forget_virtual(&self, ino: u64, count: u64) {
        let mut virtuals = crate::util::lock(&self.virtuals);
        let gone = virtuals.get_mut(&ino).is_some_and(|(_, node)| {
            node.lookups = node.lookups.saturating_sub(count);
            node.lookups == 0
        });
        if gone {
            virtuals.remove(&ino);
        }
    }
}
