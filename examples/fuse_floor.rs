//! The FUSE floor: an in-memory filesystem with no disk and no crypto,
//! built on the same fuser and asking the kernel for the same settings as
//! kmsfs (1 MiB requests, readdirplus, writeback cache, no OPEN, a volume's TTLs,
//! 16 request threads, 1 MiB readahead). Whatever it takes for a workload is
//! what the kernel's FUSE round trips alone cost on this machine, a lower
//! bound for kmsfs and for any FUSE filesystem: `scripts/bench.sh` runs it
//! as the target `floor` (see DESIGN.md "What FUSE itself costs").
//!
//!   cargo run --release --example fuse_floor -- MOUNTPOINT [--threads N] [--no-writeback-cache]
//!
//! It runs in the foreground until unmounted (`umount MOUNTPOINT`). Data
//! lives in memory: it is a measuring instrument, not a place for files.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::SystemTime;

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use kmsfs::fs::VOLUME_ATTR_TIMEOUT as TTL;
use kmsfs::fs::bdi::{BdiTuning, tune};

const MAX_REQUEST: u32 = 1 << 20;
/// File data is kept in chunks of this size; a missing chunk reads as zeros.
const CHUNK: u64 = 64 * 1024;

enum Content {
    File(BTreeMap<u64, Box<[u8]>>),
    Dir(BTreeMap<OsString, u64>),
    Symlink(OsString),
}

struct Node {
    attr: FileAttr,
    /// Lookups the kernel holds; an unlinked node is dropped when they reach 0.
    lookups: AtomicU64,
    content: Content,
    xattrs: HashMap<OsString, Vec<u8>>,
}

struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
}

struct Floor {
    state: RwLock<State>,
    writeback_cache: bool,
}

fn new_attr(ino: u64, kind: FileType, mode: u32, (uid, gid): (u32, u32)) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm: (mode & 0o7777) as u16,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid,
        gid,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl State {
    fn dir(&self, ino: INodeNo) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.nodes.get(&ino.0).ok_or(Errno::ENOENT)?.content {
            Content::Dir(entries) => Ok(entries),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: INodeNo) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)?.content {
            Content::Dir(entries) => Ok(entries),
            _ => Err(Errno::ENOTDIR),
        }
    }

    /// The attributes of `ino`, counted as one more kernel lookup.
    fn looked_up(&self, ino: u64) -> Result<FileAttr, Errno> {
        let node = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        node.lookups.fetch_add(1, Ordering::Relaxed);
        Ok(node.attr)
    }

    fn add(
        &mut self,
        parent: INodeNo,
        name: &OsStr,
        kind: FileType,
        mode: u32,
        req: &Request,
        content: Content,
    ) -> Result<FileAttr, Errno> {
        if self.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let attr = new_attr(ino, kind, mode, (req.uid(), req.gid()));
        self.dir_mut(parent)?.insert(name.to_owned(), ino);
        self.touch_dir(parent, i32::from(kind == FileType::Directory));
        let lookups = AtomicU64::new(1);
        self.nodes.insert(
            ino,
            Node {
                attr,
                lookups,
                content,
                xattrs: HashMap::new(),
            },
        );
        Ok(attr)
    }

    fn touch_dir(&mut self, dir: INodeNo, link_change: i32) {
        if let Some(node) = self.nodes.get_mut(&dir.0) {
            let now = SystemTime::now();
            node.attr.mtime = now;
            node.attr.ctime = now;
            node.attr.nlink = node.attr.nlink.saturating_add_signed(link_change);
        }
    }

    /// Drops one name of `ino`; the node goes once it has no name and no kernel lookup.
    fn unlinked(&mut self, ino: u64) {
        let Some(node) = self.nodes.get_mut(&ino) else { return };
        node.attr.nlink = if node.attr.kind == FileType::Directory {
            0
        } else {
            node.attr.nlink.saturating_sub(1)
        };
        node.attr.ctime = SystemTime::now();
        if node.attr.nlink == 0 && node.lookups.load(Ordering::Relaxed) == 0 {
            self.nodes.remove(&ino);
        }
    }

    fn remove(&mut self, parent: INodeNo, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = *self.dir(parent)?.get(name).ok_or(Errno::ENOENT)?;
        let node = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        match (&node.content, dir) {
            (Content::Dir(entries), true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
            (Content::Dir(_), true) => {}
            (Content::Dir(_), false) => return Err(Errno::EISDIR),
            (_, true) => return Err(Errno::ENOTDIR),
            (_, false) => {}
        }
        self.dir_mut(parent)?.remove(name);
        self.touch_dir(parent, if dir { -1 } else { 0 });
        self.unlinked(ino);
        Ok(())
    }
}

impl Floor {
    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

fn reply_entry(reply: ReplyEntry, result: Result<FileAttr, Errno>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn write_chunks(chunks: &mut BTreeMap<u64, Box<[u8]>>, offset: u64, data: &[u8]) {
    let mut done = 0usize;
    while done < data.len() {
        let at = offset + done as u64;
        let (index, within) = (at / CHUNK, (at % CHUNK) as usize);
        let n = (CHUNK as usize - within).min(data.len() - done);
        let chunk = chunks
            .entry(index)
            .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
        chunk[within..within + n].copy_from_slice(&data[done..done + n]);
        done += n;
    }
}

fn read_chunks(chunks: &BTreeMap<u64, Box<[u8]>>, offset: u64, out: &mut [u8]) {
    let mut done = 0usize;
    while done < out.len() {
        let at = offset + done as u64;
        let (index, within) = (at / CHUNK, (at % CHUNK) as usize);
        let n = (CHUNK as usize - within).min(out.len() - done);
        match chunks.get(&index) {
            Some(chunk) => out[done..done + n].copy_from_slice(&chunk[within..within + n]),
            None => out[done..done + n].fill(0),
        }
        done += n;
    }
}

fn truncate_chunks(chunks: &mut BTreeMap<u64, Box<[u8]>>, size: u64) {
    chunks.retain(|&index, _| index * CHUNK < size);
    if let Some(last) = chunks.get_mut(&(size / CHUNK)) {
        last[(size % CHUNK) as usize..].fill(0);
    }
}

impl Filesystem for Floor {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_REQUEST);
        let _ = config.set_max_readahead(MAX_REQUEST);
        let _ = config.set_max_background(64);
        let mut wanted =
            InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_PARALLEL_DIROPS | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        if self.writeback_cache {
            wanted |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        let _ = config.add_capabilities(wanted);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let state = self.read_state();
        reply_entry(
            reply,
            state
                .dir(parent)
                .and_then(|d| d.get(name).copied().ok_or(Errno::ENOENT))
                .and_then(|ino| state.looked_up(ino)),
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut state = self.write_state();
        if let Some(node) = state.nodes.get(&ino.0) {
            let left = node.lookups.load(Ordering::Relaxed).saturating_sub(nlookup);
            node.lookups.store(left, Ordering::Relaxed);
            if left == 0 && node.attr.nlink == 0 {
                state.nodes.remove(&ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.read_state().nodes.get(&ino.0) {
            Some(node) => reply.attr(&TTL, &node.attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut state = self.write_state();
        let Some(node) = state.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let attr = &mut node.attr;
        if let Some(mode) = mode {
            attr.perm = (mode & 0o7777) as u16;
        }
        attr.uid = uid.unwrap_or(attr.uid);
        attr.gid = gid.unwrap_or(attr.gid);
        if let Some(size) = size {
            let Content::File(chunks) = &mut node.content else {
                return reply.error(Errno::EISDIR);
            };
            truncate_chunks(chunks, size);
            attr.size = size;
            attr.blocks = size.div_ceil(512);
            // As kmsfs under FUSE_HANDLE_KILLPRIV_V2: a non-root truncation clears set-ID bits.
            if mode.is_none() && req.uid() != 0 {
                attr.perm &= !0o6000;
            }
        }
        attr.atime = atime.map(time).unwrap_or(attr.atime);
        attr.mtime = mtime.map(time).unwrap_or(attr.mtime);
        attr.ctime = ctime.unwrap_or_else(SystemTime::now);
        reply.attr(&TTL, attr);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.read_state().nodes.get(&ino.0).map(|n| &n.content) {
            Some(Content::Symlink(target)) => reply.data(target.as_encoded_bytes()),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let content = Content::Dir(BTreeMap::new());
        reply_entry(
            reply,
            self.write_state()
                .add(parent, name, FileType::Directory, mode & !umask, req, content),
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.write_state().remove(parent, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.write_state().remove(parent, name, true));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let content = Content::Symlink(target.as_os_str().to_owned());
        let mut state = self.write_state();
        let result = state
            .add(parent, link_name, FileType::Symlink, 0o777, req, content)
            .map(|mut attr| {
                attr.size = target.as_os_str().len() as u64;
                if let Some(node) = state.nodes.get_mut(&attr.ino.0) {
                    node.attr = attr;
                }
                attr
            });
        reply_entry(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            return reply.error(Errno::EINVAL);
        }
        let mut state = self.write_state();
        let result = (|| {
            let ino = *state.dir(parent)?.get(name).ok_or(Errno::ENOENT)?;
            if let Some(&old) = state.dir(newparent)?.get(newname) {
                if old == ino {
                    return Ok(());
                }
                let is_dir = state
                    .nodes
                    .get(&old)
                    .is_some_and(|n| n.attr.kind == FileType::Directory);
                state.remove(newparent, newname, is_dir)?;
            }
            state.dir_mut(parent)?.remove(name);
            state.dir_mut(newparent)?.insert(newname.to_owned(), ino);
            let is_dir = state
                .nodes
                .get(&ino)
                .is_some_and(|n| n.attr.kind == FileType::Directory);
            state.touch_dir(parent, if is_dir { -1 } else { 0 });
            state.touch_dir(newparent, if is_dir { 1 } else { 0 });
            Ok(())
        })();
        reply_empty(reply, result);
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // As kmsfs: the kernel then opens files by itself and sends no OPEN or RELEASE.
        reply.error(Errno::ENOSYS);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let state = self.read_state();
        let Some(node) = state.nodes.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Content::File(chunks) = &node.content else {
            return reply.error(Errno::EISDIR);
        };
        let end = node.attr.size.min(offset.saturating_add(u64::from(size)));
        let mut out = vec![0u8; end.saturating_sub(offset) as usize];
        read_chunks(chunks, offset, &mut out);
        drop(state);
        reply.data(&out);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        flags: WriteFlags,
        _open: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut state = self.write_state();
        let Some(node) = state.nodes.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let Content::File(chunks) = &mut node.content else {
            return reply.error(Errno::EISDIR);
        };
        write_chunks(chunks, offset, data);
        let attr = &mut node.attr;
        attr.size = attr.size.max(offset + data.len() as u64);
        attr.blocks = attr.size.div_ceil(512);
        if !self.writeback_cache {
            attr.mtime = SystemTime::now();
            attr.ctime = attr.mtime;
        }
        if flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            attr.perm &= !0o6000;
        }
        reply.written(data.len() as u32);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let state = self.read_state();
        let entries = match state.dir(ino) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        let dots = [
            (ino.0, FileType::Directory, OsStr::new(".")),
            (ino.0, FileType::Directory, OsStr::new("..")),
        ];
        let listed = entries
            .iter()
            .filter_map(|(name, &i)| state.nodes.get(&i).map(|n| (i, n.attr.kind, name.as_os_str())));
        for (index, (i, kind, name)) in dots.into_iter().chain(listed).enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), index as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let state = self.read_state();
        let Some(dir_attr) = state.nodes.get(&ino.0).map(|n| n.attr) else {
            return reply.error(Errno::ENOENT);
        };
        let entries = match state.dir(ino) {
            Ok(e) => e,
            Err(e) => return reply.error(e),
        };
        let dots = [(OsStr::new("."), dir_attr), (OsStr::new(".."), dir_attr)];
        for (index, (name, attr)) in dots.into_iter().enumerate().skip(offset as usize) {
            if reply.add(attr.ino, index as u64 + 1, name, &TTL, &attr, Generation(0)) {
                return reply.ok();
            }
        }
        for (index, (name, &i)) in entries.iter().enumerate().skip((offset as usize).saturating_sub(2)) {
            let Some(node) = state.nodes.get(&i) else { continue };
            if reply.add(INodeNo(i), index as u64 + 3, name, &TTL, &node.attr, Generation(0)) {
                break;
            }
            // The kernel holds a lookup for every entry but . and .. it was given.
            node.lookups.fetch_add(1, Ordering::Relaxed);
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.read_state().nodes.len() as u64;
        reply.statfs(1 << 30, 1 << 29, 1 << 29, files + (1 << 20), 1 << 20, 4096, 255, 4096);
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let mut state = self.write_state();
        let result = state.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT).map(|n| {
            n.xattrs.insert(name.to_owned(), value.to_vec());
        });
        reply_empty(reply, result);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let state = self.read_state();
        let Some(node) = state.nodes.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        match node.xattrs.get(name) {
            None => reply.error(Errno::ENODATA),
            Some(v) if size == 0 => reply.size(v.len() as u32),
            Some(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Some(v) => reply.data(v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let state = self.read_state();
        let Some(node) = state.nodes.get(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let mut list = Vec::new();
        for name in node.xattrs.keys() {
            list.extend_from_slice(name.as_encoded_bytes());
            list.push(0);
        }
        match size {
            0 => reply.size(list.len() as u32),
            s if list.len() > s as usize => reply.error(Errno::ERANGE),
            _ => reply.data(&list),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut state = self.write_state();
        let result = match state.nodes.get_mut(&ino.0) {
            Some(n) => n.xattrs.remove(name).map(|_| ()).ok_or(Errno::ENODATA),
            None => Err(Errno::ENOENT),
        };
        reply_empty(reply, result);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let content = Content::File(BTreeMap::new());
        match self
            .write_state()
            .add(parent, name, FileType::RegularFile, mode & !umask, req, content)
        {
            Ok(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }
}

struct Args {
    mountpoint: std::path::PathBuf,
    threads: usize,
    writeback_cache: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args_os().skip(1);
    let mut parsed = Args {
        mountpoint: Default::default(),
        threads: 16,
        writeback_cache: true,
    };
    let mut mountpoint = None;
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--threads") => {
                parsed.threads = args
                    .next()
                    .and_then(|n| n.to_str()?.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or("--threads needs a positive number")?;
            }
            Some("--no-writeback-cache") => parsed.writeback_cache = false,
            Some(flag) if flag.starts_with('-') => return Err(format!("unknown option {flag}")),
            _ if mountpoint.is_none() => mountpoint = Some(arg.into()),
            _ => return Err("only one mountpoint".into()),
        }
    }
    parsed.mountpoint = mountpoint.ok_or("usage: fuse_floor MOUNTPOINT [--threads N] [--no-writeback-cache]")?;
    Ok(parsed)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fuse_floor: {e}");
            std::process::exit(2);
        }
    };
    let mut nodes = HashMap::new();
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let root = new_attr(INodeNo::ROOT.0, FileType::Directory, 0o755, (uid, gid));
    nodes.insert(
        1,
        Node {
            attr: root,
            lookups: AtomicU64::new(1),
            content: Content::Dir(BTreeMap::new()),
            xattrs: HashMap::new(),
        },
    );
    let floor = Floor {
        state: RwLock::new(State { nodes, next_ino: 2 }),
        writeback_cache: args.writeback_cache,
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("fuse_floor".into()),
        MountOption::Subtype("floor".into()),
    ];
    config.n_threads = Some(args.threads);
    config.clone_fd = true;
    let session = match fuser::Session::new(floor, &args.mountpoint, &config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fuse_floor: cannot mount {}: {e}", args.mountpoint.display());
            std::process::exit(1);
        }
    };
    tune(&args.mountpoint, &BdiTuning::default());
    if let Err(e) = session.run() {
        eprintln!("fuse_floor: {e}");
        std::process::exit(1);
    }
}
