//! The inode table: one entry per backing inode the kernel knows about,
//! reached through its file handle (see handles.rs), so that renames never
//! invalidate it and descriptor use stays bounded.
//! FUSE inode numbers are the backing inode numbers (the backing root is
//! swapped with 1), so they are stable for as long as the volume is mounted.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use fuser::FileType;
use rustix::fs::{OFlags, Stat};

use super::handles::{Locator, NodeFd, Opener, handle_of};
use crate::crypto::{BlockCipher, FileId};
use crate::volume::layout::DirIv;

pub const ROOT_INO: u64 = 1;

pub struct Node {
    pub ino: u64,
    locator: Locator,
    opener: Arc<Opener>,
    lookups: AtomicU64,
    /// UNLINKED, VERIFIED_EMPTY and SHOWN_DAMAGED.
    flags: AtomicU8,
    /// Made when first needed: `ls -lR` of a million files makes a million
    /// nodes and needs none of it.
    state: OnceLock<Box<NodeState>>,
}

/// Its last name is gone while the kernel still knows it (open files): its
/// key is erased once the kernel forgets it.
const UNLINKED: u8 = 1;
/// An empty file whose final block authenticated (sealed layout).
const VERIFIED_EMPTY: u8 = 2;
/// Shown to the kernel with a size its backing file does not have, because
/// that file is damaged (`KmsFs::damaged_size`): its reads answer EIO.
const SHOWN_DAMAGED: u8 = 4;

/// What a node needs once it is read or written, lists its entries (a
/// directory) or loses its last name.
#[derive(Default)]
pub struct NodeState {
    /// Directory IV, read once.
    pub dir_iv: OnceLock<DirIv>,
    /// Serialises writers of a regular file against each other and readers.
    pub content: RwLock<()>,
    /// The file's block cipher once its header has been read or written.
    pub cipher: Mutex<Option<Arc<BlockCipher>>>,
    /// The file id claimed when the lookup took the reading ahead's result
    /// (verified_ahead.rs), before any cipher: released with the node.
    pub taken_id: OnceLock<FileId>,
    /// A descriptor held once the inode's last name is gone, while the kernel
    /// still knows the node: it keeps the backing inode (and so its number,
    /// which is this node's id) from being freed and reused.
    pinned: OnceLock<NodeFd>,
    /// When a read last moved the access time (atime.rs; 0: not since the
    /// node was looked up or last changed).
    pub atime_moved: AtomicU64,
}

impl Node {
    fn new(ino: u64, locator: Locator, opener: Arc<Opener>, lookups: u64) -> Self {
        Node {
            ino,
            locator,
            opener,
            lookups: AtomicU64::new(lookups),
            flags: AtomicU8::new(0),
            state: OnceLock::new(),
        }
    }

    pub fn state(&self) -> &NodeState {
        self.state.get_or_init(Box::default)
    }

    fn pinned(&self) -> Option<&NodeFd> {
        self.state.get().and_then(|state| state.pinned.get())
    }

    /// An `O_PATH` descriptor of the backing inode.
    pub fn fd(&self) -> Result<NodeFd, fuser::Errno> {
        if let Some(fd) = self.pinned() {
            return Ok(fd.clone());
        }
        self.opener.open(self.ino, &self.locator)
    }

    /// A new descriptor of the backing inode opened with `flags` (which must
    /// not create). From the file handle directly when there is one: a single
    /// syscall, where reopening an `O_PATH` descriptor through /proc walks a
    /// path. A pinned (unlinked) inode is reopened through its descriptor,
    /// since a handle to an inode without names is not reliably reopened.
    pub fn reopen(&self, flags: OFlags) -> Result<OwnedFd, fuser::Errno> {
        let errno = |e: rustix::io::Errno| fuser::Errno::from_i32(e.raw_os_error());
        match (&self.locator, self.pinned()) {
            (Locator::Handle(handle), None) => self.opener.open_handle(handle.bytes(), flags.bits() as libc::c_int),
            _ => {
                // The node's descriptor must stay open while its /proc path is used.
                let node_fd = self.fd()?;
                rustix::fs::open(node_fd.proc_path().as_str(), flags, rustix::fs::Mode::empty()).map_err(errno)
            }
        }
    }

    /// Whether names in this directory were looked up or listed (its IV
    /// was read): only then can per-directory state have been kept for it.
    pub fn names_resolved(&self) -> bool {
        self.state.get().is_some_and(|state| state.dir_iv.get().is_some())
    }

    /// The file id, once its header was read or written.
    pub fn file_id(&self) -> Option<FileId> {
        let state = self.state.get()?;
        let cipher_id = crate::util::lock(&state.cipher).as_ref().map(|c| *c.file_id());
        cipher_id.or_else(|| state.taken_id.get().copied())
    }

    /// The ids this node holds in `LiveIds`.
    fn held_ids(&self) -> Vec<FileId> {
        let Some(state) = self.state.get() else {
            return Vec::new();
        };
        let cipher_id = crate::util::lock(&state.cipher).as_ref().map(|c| *c.file_id());
        let taken = state.taken_id.get().copied().filter(|id| Some(*id) != cipher_id);
        cipher_id.into_iter().chain(taken).collect()
    }

    /// Marks the node as having lost its last name; see `UNLINKED`.
    pub fn mark_unlinked(&self) {
        self.flags.fetch_or(UNLINKED, Ordering::Relaxed);
    }

    pub fn is_unlinked(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & UNLINKED != 0
    }

    pub fn mark_verified_empty(&self) {
        self.flags.fetch_or(VERIFIED_EMPTY, Ordering::Relaxed);
    }

    pub fn is_verified_empty(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & VERIFIED_EMPTY != 0
    }

    /// Records whether the size last shown for this file was the one of a
    /// damaged file (see SHOWN_DAMAGED).
    pub fn set_shown_damaged(&self, damaged: bool) {
        if damaged {
            self.flags.fetch_or(SHOWN_DAMAGED, Ordering::Relaxed);
        } else if self.is_shown_damaged() {
            self.flags.fetch_and(!SHOWN_DAMAGED, Ordering::Relaxed);
        }
    }

    pub fn is_shown_damaged(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & SHOWN_DAMAGED != 0
    }

    /// Its data or attributes changed: the next read moves the access time
    /// again (relatime moves it once it is not newer than the mtime/ctime).
    pub fn changed(&self) {
        if let Some(state) = self.state.get() {
            state.atime_moved.store(0, Ordering::Relaxed);
        }
    }

    /// Holds the inode open until the kernel forgets the node.
    pub fn pin(&self) {
        let state = self.state();
        if state.pinned.get().is_none()
            && let Ok(fd) = self.opener.open(self.ino, &self.locator)
        {
            let _ = state.pinned.set(fd);
        }
    }
}

pub fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// The file ids of the nodes whose headers this mount has read. Two backing
/// inodes with one id (a backing file copied over another's name) are
/// caught here, and deleting either never erases the key the other still
/// uses: the node refused an id stays on record beside the one holding it.
#[derive(Default)]
pub struct LiveIds(Mutex<Claims>);

#[derive(Default)]
struct Claims {
    holders: HashMap<FileId, u64>,
    /// Nodes that were refused an id another node holds (tampering only),
    /// until their backing file is removed: a key is kept while any may use it.
    refused: HashMap<FileId, std::collections::HashSet<u64>>,
}

impl LiveIds {
    fn claims(&self) -> std::sync::MutexGuard<'_, Claims> {
        crate::util::lock(&self.0)
    }

    /// Records that node `ino` has file id `id`; Err(other node) if another
    /// node already has it.
    pub fn claim(&self, id: FileId, ino: u64) -> Result<(), u64> {
        let mut claims = self.claims();
        match *claims.holders.entry(id).or_insert(ino) {
            holder if holder == ino => Ok(()),
            other => {
                claims.refused.entry(id).or_default().insert(ino);
                Err(other)
            }
        }
    }

    pub fn release(&self, id: &FileId, ino: u64) {
        let mut claims = self.claims();
        if claims.holders.get(id) == Some(&ino) {
            claims.holders.remove(id);
        }
    }

    /// A node other than `ino` that has file id `id`, or was refused it,
    /// if this mount knows one.
    pub fn other_holder(&self, id: &FileId, ino: Option<u64>) -> Option<u64> {
        let claims = self.claims();
        let other = |node: &u64| Some(*node) != ino;
        claims
            .holders
            .get(id)
            .filter(|node| other(node))
            .or_else(|| claims.refused.get(id)?.iter().find(|node| other(node)))
            .copied()
    }

    /// The backing file of node `ino`, with id `id`, is gone: it uses the
    /// id no more.
    pub fn removed(&self, id: &FileId, ino: u64) {
        let mut claims = self.claims();
        if claims.holders.get(id) == Some(&ino) {
            claims.holders.remove(id);
        }
        if let Some(refused) = claims.refused.get_mut(id) {
            refused.remove(&ino);
            if refused.is_empty() {
                claims.refused.remove(id);
            }
        }
    }
}

/// A node in the table, found by its inode number: a set of these costs a
/// pointer per slot where a map from number to node would cost two.
struct ByIno(Arc<Node>);

impl std::borrow::Borrow<u64> for ByIno {
    fn borrow(&self) -> &u64 {
        &self.0.ino
    }
}

impl std::hash::Hash for ByIno {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.ino.hash(state);
    }
}

impl PartialEq for ByIno {
    fn eq(&self, other: &Self) -> bool {
        self.0.ino == other.0.ino
    }
}

impl Eq for ByIno {}

pub struct InodeTable {
    nodes: RwLock<HashSet<ByIno>>,
    root_backing_ino: u64,
    opener: Arc<Opener>,
    /// `open_by_handle_at` needs CAP_DAC_READ_SEARCH: without it (a daemon
    /// run by a normal user) every node keeps a descriptor instead.
    handles_open: bool,
    pub ids: Arc<LiveIds>,
}

impl InodeTable {
    /// `fd_cache` bounds the descriptors kept open for nodes.
    // ByIno hashes and compares only the node's number, which never changes.
    #[allow(clippy::mutable_key_type)]
    pub fn new(root_fd: OwnedFd, root_stat: &Stat, fd_cache: usize) -> std::io::Result<Self> {
        // open_by_handle_at refuses an O_PATH descriptor as its mount fd.
        let mount_fd: OwnedFd = rustix::fs::openat(
            &root_fd,
            ".",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        let opener = Arc::new(Opener::new(mount_fd, fd_cache));
        let handles_open = handle_of(root_fd.as_fd())
            .is_some_and(|h| opener.open_handle(h.bytes(), libc::O_PATH | libc::O_CLOEXEC).is_ok());
        if !handles_open {
            log::info!("file handles cannot be opened here (no CAP_DAC_READ_SEARCH): one descriptor per known inode");
        }
        let root = Arc::new(Node::new(
            ROOT_INO,
            Locator::Pinned(Arc::new(root_fd)),
            Arc::clone(&opener),
            1,
        ));
        let mut nodes = HashSet::new();
        nodes.insert(ByIno(root));
        Ok(InodeTable {
            nodes: RwLock::new(nodes),
            root_backing_ino: root_stat.st_ino as u64,
            opener,
            handles_open,
            ids: Arc::default(),
        })
    }

    /// The FUSE inode number of a backing inode number.
    pub fn fuse_ino(&self, backing_ino: u64) -> u64 {
        if backing_ino == self.root_backing_ino {
            ROOT_INO
        } else if backing_ino == ROOT_INO {
            self.root_backing_ino
        } else {
            backing_ino
        }
    }

    pub fn get(&self, ino: u64) -> Option<Arc<Node>> {
        crate::util::read(&self.nodes).get(&ino).map(|n| Arc::clone(&n.0))
    }

    /// Registers a lookup of the inode behind `fd` (counted once), reusing
    /// the existing node for hard links and repeated lookups.
    pub fn remember(&self, fd: OwnedFd, stat: &Stat) -> Arc<Node> {
        let ino = self.fuse_ino(stat.st_ino as u64);
        let mut nodes = crate::util::write(&self.nodes);
        let mut to_cache = None;
        let node = match nodes.get(&ino) {
            Some(known) => Arc::clone(&known.0),
            None => {
                let fd = Arc::new(fd);
                let locator = match handle_of(fd.as_fd()).filter(|_| self.handles_open) {
                    Some(handle) => {
                        to_cache = Some(fd);
                        Locator::Handle(handle)
                    }
                    None => Locator::Pinned(fd),
                };
                let node = Arc::new(Node::new(ino, locator, Arc::clone(&self.opener), 0));
                nodes.insert(ByIno(Arc::clone(&node)));
                node
            }
        };
        node.lookups.fetch_add(1, Ordering::Relaxed);
        drop(nodes);
        // Caching may close others' descriptors (see `forget`): not under the lock.
        if let Some(fd) = to_cache {
            self.opener.remember(ino, &fd);
        }
        node
    }

    /// Gives back the cached descriptors (on EMFILE).
    pub fn release_descriptors(&self) {
        self.opener.clear();
    }

    /// Counts one more lookup of a node the table already holds.
    pub fn add_lookup(&self, node: &Node) {
        node.lookups.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts down a node's lookups; returns the node once it is gone.
    pub fn forget(&self, ino: u64, count: u64) -> Option<Arc<Node>> {
        if ino == ROOT_INO {
            return None;
        }
        let mut nodes = crate::util::write(&self.nodes);
        let node = &nodes.get(&ino)?.0;
        let before = node
            .lookups
            .fetch_sub(count.min(node.lookups.load(Ordering::Relaxed)), Ordering::Relaxed);
        if before > count {
            return None;
        }
        let ByIno(node) = nodes.take(&ino)?;
        let cached_fd = self.opener.forget(ino);
        for id in node.held_ids() {
            self.ids.release(&id, ino);
        }
        drop(nodes);
        // The last descriptor of an unlinked inode frees its blocks when it
        // closes (a discard on some disks): never under the table's lock,
        // which every lookup takes.
        drop(cached_fd);
        Some(node)
    }

    /// Every node that lost its last name and is still held (at unmount).
    pub fn unlinked_nodes(&self) -> Vec<Arc<Node>> {
        let nodes = crate::util::read(&self.nodes);
        nodes
            .iter()
            .filter(|n| n.0.is_unlinked())
            .map(|n| Arc::clone(&n.0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node per inode the kernel knows: `ls -lR` of a million files keeps a
    /// million. Its allocation (with Arc's counts) stays in glibc's 96-byte
    /// chunks; what only some nodes need goes in `NodeState`.
    #[test]
    fn a_node_stays_small() {
        assert!(std::mem::size_of::<Node>() <= 72, "{}", std::mem::size_of::<Node>());
        assert_eq!(std::mem::size_of::<Locator>(), 24);
    }

    /// A key is kept while any node this mount saw with its id (held or
    /// refused) still has its backing file, and only then.
    #[test]
    fn a_file_id_is_free_once_every_copy_is_removed() {
        let ids = LiveIds::default();
        let id = [7u8; 16];
        ids.claim(id, 1).unwrap();
        assert_eq!(ids.claim(id, 2), Err(1));
        assert_eq!(ids.claim(id, 3), Err(1));
        assert!(
            matches!(ids.other_holder(&id, Some(1)), Some(2 | 3)),
            "the copies use it"
        );
        ids.removed(&id, 1);
        let left = ids.other_holder(&id, Some(2));
        assert_eq!(left, Some(3), "the third copy still uses it");
        ids.removed(&id, 2);
        assert_eq!(ids.other_holder(&id, Some(3)), None, "only the last copy is left");
        ids.removed(&id, 3);
        assert_eq!(ids.other_holder(&id, None), None);
    }
}
