//! The FUSE front end: a thin adapter from kernel requests to the volume.

// `stat` field types differ between architectures; the casts are for the others.
#![allow(clippy::unnecessary_cast)]

mod acl;
mod atime;
pub(crate) mod attr;
mod batch_read;
pub mod bdi;
mod bounded;
mod check_ahead;
mod dirs;
mod files;
mod handles;
pub(crate) mod inodes;
mod iv_ahead;
pub(crate) mod mount;
mod mounted;
mod open_files;
mod prefetch;
mod removals;
mod remove;
mod requests;
mod setattr;
mod shred;
mod space;
mod verified_ahead;
mod workers;
mod xattrs;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{Errno, FileHandle, Generation, INodeNo, ReplyDirectoryPlus};
use rustix::fs::{Mode, OFlags};

use attr::FsResult;
use files::OpenFile;
use inodes::{InodeTable, Node};
use open_files::Handle;

use crate::volume::Volume;
use bounded::BoundedCache;
pub use mount::{FsOptions, MountOptions, VIEW_ATTR_TIMEOUT, VOLUME_ATTR_TIMEOUT, mount};
pub use mounted::Mounted;

const GENERATION: Generation = Generation(0);
const MAX_WRITE: u32 = 1 << 20;

pub struct KmsFs {
    volume: Arc<Volume>,
    inodes: InodeTable,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    options: FsOptions,
    /// Backing files of regular files the kernel opened without an OPEN
    /// request (see `FsOptions::open_requests`), one per inode.
    node_files: BoundedCache<Arc<OpenFile>>,
    /// Erases the keys of removed files whose ids must be read first.
    shredder: shred::Shredder,
    /// The order of the files in recent directory listings (prefetch.rs).
    read_orders: prefetch::ReadOrders,
    /// Empty files whose final blocks are read ahead (check_ahead.rs).
    checks_ahead: check_ahead::ChecksAhead,
    /// And those of them found intact there (verified_ahead.rs).
    verified_ahead: verified_ahead::VerifiedAhead,
    /// Subdirectories' IV files read ahead (iv_ahead.rs).
    ivs_ahead: iv_ahead::IvsAhead,
    /// Free space on the backing filesystem (new files written through when low).
    space: space::FreeSpace,
    /// The kernel leaves clearing set-user/group-ID bits on write and
    /// truncate to us (FUSE_HANDLE_KILLPRIV_V2; not asked for on `suid`
    /// mounts, where the kernel clears them before the data). Meant to spare a
    /// `security.capability` lookup per write; the 6.18 kernel here still
    /// sends it (see DESIGN.md), but the bits must be cleared either way.
    kill_suidgid: AtomicBool,
    /// Tells the kernel of changes it cannot see in a reply (set once the
    /// session exists; see `attributes_changed`).
    notifier: std::sync::OnceLock<fuser::Notifier>,
    /// The kernel enforces POSIX ACLs (FUSE_POSIX_ACL); see acl.rs.
    acl_on: AtomicBool,
    /// When a request last named a file (`-o idle=`).
    activity: Arc<Activity>,
    /// Unlinks answered before their backing removal (removals.rs).
    removals: removals::PendingRemovals,
    /// Whether unlinks are answered before their backing removal.
    defer_removals: bool,
    /// Held from the stat to the unlink or rename of a name being removed
    /// while `defer_removals` (see `remove_backing_file`).
    removal_lock: Mutex<()>,
}

/// When the mount was last used: any request that names a file or reads a
/// directory, not the kernel's own housekeeping (FORGET, RELEASE).
pub struct Activity {
    start: std::time::Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: std::time::Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long no request has named a file.
    pub fn idle_for(&self) -> std::time::Duration {
        let last = std::time::Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Unlinks are answered before the backing removal only for a daemon run
/// as root (see removals.rs).
fn defer_removals_allowed() -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        log::warn!("deferred_unlink is off on this mount: it needs a daemon run as root");
    }
    root
}

impl KmsFs {
    pub fn new(volume: Arc<Volume>, options: FsOptions) -> io::Result<Self> {
        let root = rustix::fs::open(
            volume.backing(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&root)?;
        let space = space::FreeSpace::new(rustix::io::dup(&root)?, options.write_through_below);
        let inodes = InodeTable::new(root, &st, mount::fd_cache_capacity())?;
        Ok(KmsFs {
            shredder: shred::Shredder::new(Arc::clone(&volume), Arc::clone(&inodes.ids)),
            read_orders: prefetch::ReadOrders::new(options.prefetch_files),
            checks_ahead: check_ahead::ChecksAhead::default(),
            verified_ahead: verified_ahead::VerifiedAhead::default(),
            ivs_ahead: iv_ahead::IvsAhead::default(),
            volume,
            inodes,
            node_files: BoundedCache::new(mount::fd_cache_capacity()),

            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            options,
            space,
            kill_suidgid: AtomicBool::new(false),
            notifier: std::sync::OnceLock::new(),
            acl_on: AtomicBool::new(false),
            activity: Arc::new(Activity::new()),
            removals: removals::PendingRemovals::default(),
            defer_removals: options.deferred_removal && defer_removals_allowed(),
            removal_lock: Mutex::new(()),
        })
    }

    /// The mount's use, for idle unmounting.
    pub fn activity(&self) -> Arc<Activity> {
        Arc::clone(&self.activity)
    }

    /// The node of a request. If it is a directory with removals pending
    /// (see removals.rs), they are done first: whatever the request does
    /// with the directory or a name in it then sees them done.
    fn node(&self, ino: INodeNo) -> FsResult<Arc<Node>> {
        self.removals.settle(ino.0);
        self.node_unsettled(ino)
    }

    /// The node of a request that need not wait for pending removals.
    fn node_unsettled(&self, ino: INodeNo) -> FsResult<Arc<Node>> {
        self.activity.touch();
        self.inodes.get(ino.0).ok_or(Errno::ENOENT)
    }

    fn forget_node(&self, ino: u64, count: u64) {
        if let Some(node) = self.inodes.forget(ino, count) {
            drop(self.node_files.remove(ino)); // closed outside the cache's lock
            if node.names_resolved() {
                self.checks_ahead.abandoned(ino); // no lock taken for each file forgotten
                self.verified_ahead.forget(ino);
                self.ivs_ahead.forget(ino);
            }
            if node.is_unlinked() {
                self.erase_key_of_unlinked(&node);
            }
        }
    }

    fn readdirplus_inner(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: &mut ReplyDirectoryPlus,
    ) -> FsResult<()> {
        let dir = self.node(ino)?;
        let entries = self.dir_listing(fh)?;
        let dir_attr = self.stat_attr(&dir)?;
        let mut index = offset;
        let mut left_out = 0usize;
        let mut first_left_out = None;
        let mut failed = None;
        while (index as usize) < entries.len() + 2 {
            let next = index + 1;
            let full = match index {
                0 => reply.add(dir_attr.ino, next, ".", &self.options.ttl, &dir_attr, GENERATION),
                1 => reply.add(dir_attr.ino, next, "..", &self.options.ttl, &dir_attr, GENERATION),
                i => {
                    let entry = &entries[i as usize - 2];
                    let (node, attr) = match self.lookup_backing(&dir, &entry.backing) {
                        Ok(found) => found,
                        // Removed since opendir.
                        Err(e) if e == Errno::ENOENT => {
                            index = next;
                            continue;
                        }
                        // Damaged: looking it up by name gives EIO too.
                        Err(e) if e == Errno::EIO => {
                            left_out += 1;
                            first_left_out.get_or_insert_with(|| format!("{:?}", entry.backing));
                            index = next;
                            continue;
                        }
                        // Out of descriptors or memory, say: not the entry's
                        // fault. What was added goes; the next request
                        // starts at this entry, and fails if nothing can.
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    };
                    let full = reply.add(attr.ino, next, &entry.name, &self.options.ttl, &attr, GENERATION);
                    if full {
                        self.forget_node(node.ino, 1); // not sent: the kernel did not count it
                    }
                    full
                }
            };
            if full {
                break;
            }
            index = next;
        }
        if let Some(first) = first_left_out {
            log::warn!(
                "directory {}: entries that cannot be read (EIO), left out of the listing: {left_out} (the first: {first})",
                self.describe(&dir)
            );
        }
        match failed {
            Some(e) if index == offset => Err(e),
            _ => Ok(()),
        }
    }
}
