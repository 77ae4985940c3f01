//! Which thread answers a request.
//!
//! Requests are answered on the FUSE thread that received them whenever that
//! will not wait for the disk. On a VM, the round trip itself dominates a
//! small request, and it is cheapest when the same thread takes request
//! after request: with several threads reading from /dev/fuse the kernel
//! wakes the one that has waited longest, on whichever CPU it last ran, and
//! a single-threaded `tar` or `ls -l` then took twice as long (DESIGN.md,
//! "request threads"). Requests that wait for the disk - reads of uncached
//! data, writes that must first read uncached pages, fsync - go to a pool of
//! I/O threads instead, so that they overlap each other and never hold up
//! the requests behind them.

use std::collections::VecDeque;
use std::fs::File;
use std::ops::Deref;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;

use rustix::event::{PollFd, PollFlags, Timespec};

use fuser::{FileHandle, INodeNo, ReplyData, ReplyEmpty, ReplyWrite};

use super::KmsFs;
use super::attr::{reply_data, reply_empty, reply_written};
use super::files::OpenFile;
use crate::crypto::{BLOCK_SIZE, CIPHER_BLOCK_SIZE};
use crate::volume::content::block_offset;
use crate::volume::header::HEADER_LEN;

const PAGE: u64 = 4096;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// A fixed set of threads running jobs in arrival order.
pub struct IoPool {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    /// Jobs queued or running.
    pending: Arc<AtomicUsize>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl IoPool {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let queue: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let pending = Arc::new(AtomicUsize::new(0));
        let handles = (0..threads.max(1))
            .map(|i| {
                let queue = Arc::clone(&queue);
                let pending = Arc::clone(&pending);
                std::thread::Builder::new()
                    .name(format!("kmsfs-io-{i}"))
                    .spawn(move || work(&queue, &pending))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(IoPool {
            queue,
            pending,
            threads: Mutex::new(handles),
        })
    }

    /// Runs `job` on a pool thread (on this one once the pool is shut down).
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let (lock, ready) = &*self.queue;
        let mut queue = lock.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.closed {
            drop(queue);
            return job();
        }
        queue.jobs.push_back(Box::new(job));
        self.pending.fetch_add(1, Ordering::Relaxed);
        drop(queue);
        ready.notify_one();
    }

    /// Whether no job is queued or running.
    pub fn idle(&self) -> bool {
        self.pending.load(Ordering::Relaxed) == 0
    }

    /// Finishes the queued jobs and stops the threads.
    pub fn shutdown(&self) {
        let (lock, ready) = &*self.queue;
        lock.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        ready.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for thread in threads {
            if thread.join().is_err() {
                log::error!("an I/O thread panicked");
            }
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn work(queue: &(Mutex<Queue>, Condvar), pending: &AtomicUsize) {
    let (lock, ready) = queue;
    loop {
        let job = {
            let mut queue = lock.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(job) = queue.jobs.pop_front() {
                    break job;
                }
                if queue.closed {
                    return;
                }
                queue = ready.wait(queue).unwrap_or_else(PoisonError::into_inner);
            }
        };
        job();
        pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The filesystem as the FUSE session sees it: `KmsFs` plus the I/O pool.
pub struct Mounted {
    pub(super) fs: Arc<KmsFs>,
    pub(super) io: IoPool,
    /// The session's /dev/fuse descriptor, set once mounted: polled to see
    /// whether requests are waiting.
    pub(super) device: Arc<OnceLock<OwnedFd>>,
}

impl Deref for Mounted {
    type Target = KmsFs;
    fn deref(&self) -> &KmsFs {
        &self.fs
    }
}

/// cachestat(2)'s number: the same on every architecture (numbers from 424
/// on are shared), but not in the libc crate for x86_64 yet.
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range` and `struct cachestat` of cachestat(2).
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Whether every backing page of bytes `start..end` (cut at the file's
/// `size`) is in the page cache. cachestat(2) looks without starting any
/// I/O: a one-byte RWF_NOWAIT read would start reading that one page, and a
/// 4 KiB block straddling two pages then took two disk reads one after the
/// other. `false` where cachestat is missing (before Linux 6.5).
fn range_cached(file: &File, size: u64, start: u64, end: u64) -> bool {
    let end = end.min(size);
    if start >= end {
        return true;
    }
    let range = CachestatRange {
        off: start,
        len: end - start,
    };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat reads `range` and writes `stat`, both live and of
    // the layout the kernel expects; the descriptor is open for the call.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    let pages = end.div_ceil(PAGE) - start / PAGE;
    rc == 0 && stat.nr_cache >= pages
}

impl Mounted {
    pub(super) fn serve_read(&self, ino: INodeNo, fh: FileHandle, offset: u64, size: u32, reply: ReplyData) {
        let open = match self.open_file(ino, fh, false) {
            Ok(open) => open,
            Err(e) => return reply.error(e),
        };
        if self.read_is_cached(&open, offset, size.into()) || !self.hand_off() {
            return reply_data(reply, self.fs.read(&open, offset, size as usize));
        }
        log::trace!(
            "read of {size} bytes at {offset} of inode {} goes to the I/O threads",
            ino.0
        );
        let fs = Arc::clone(&self.fs);
        self.io
            .run(move || reply_data(reply, fs.read(&open, offset, size as usize)));
    }

    pub(super) fn serve_write(
        &self,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        kill_suidgid: bool,
        reply: ReplyWrite,
    ) {
        let open = match self.open_file(ino, fh, true) {
            Ok(open) => open,
            Err(e) => return reply.error(e),
        };
        if self.write_is_cached(&open, offset, data.len() as u64) || !self.hand_off() {
            return reply_written(reply, data.len(), self.fs.write_file(&open, offset, data, kill_suidgid));
        }
        log::trace!(
            "write of {} bytes at {offset} of inode {} goes to the I/O threads",
            data.len(),
            ino.0
        );
        let fs = Arc::clone(&self.fs);
        let data = data.to_vec();
        self.io.run(move || {
            reply_written(reply, data.len(), fs.write_file(&open, offset, &data, kill_suidgid));
        });
    }

    /// An fsync waits for the disk, often long: always on the pool.
    pub(super) fn serve_fsync(&self, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        self.io.run(move || {
            reply_empty(
                reply,
                fs.open_file(ino, fh, false).and_then(|f| fs.sync_file(&f, datasync)),
            )
        });
    }

    pub(super) fn serve_fsyncdir(&self, ino: INodeNo, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        self.io
            .run(move || reply_empty(reply, fs.node(ino).and_then(|n| fs.sync_dir(&n))));
    }

    /// Whether a request that must wait for the disk should go to the pool:
    /// when other requests are waiting to be read (they would be held up)
    /// or the pool is busy already (a parallel workload, whose disk reads
    /// should overlap). Otherwise it is answered here: a single reader
    /// then waits no longer than for the disk.
    pub(super) fn hand_off(&self) -> bool {
        !self.io.idle() || self.requests_waiting()
    }

    fn requests_waiting(&self) -> bool {
        let Some(device) = self.device.get() else {
            return true;
        };
        let mut fds = [PollFd::new(device, PollFlags::IN)];
        let now = Timespec { tv_sec: 0, tv_nsec: 0 };
        !matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(0))
    }

    /// The backing file's size if the blocks holding `len` bytes at
    /// `offset`, and the header unless it has been read, are all cached.
    fn blocks_cached(&self, open: &OpenFile, offset: u64, len: u64) -> Option<u64> {
        let size = open.file.metadata().ok()?.len();
        let first = block_offset(offset / BLOCK_SIZE as u64);
        let end = block_offset((offset + len.max(1) - 1) / BLOCK_SIZE as u64 + 1);
        let header = self.fs.cipher_cached(&open.node) || range_cached(&open.file, size, 0, HEADER_LEN as u64);
        (header && range_cached(&open.file, size, first, end)).then_some(size)
    }

    /// Whether a read would find its backing pages cached.
    pub(super) fn read_is_cached(&self, open: &OpenFile, offset: u64, len: u64) -> bool {
        self.blocks_cached(open, offset, len).is_some()
    }

    /// Whether a write would find cached every existing backing page it
    /// covers (it may have to read those at its ends) and the old final
    /// block, which an append seals again.
    pub(super) fn write_is_cached(&self, open: &OpenFile, offset: u64, len: u64) -> bool {
        self.blocks_cached(open, offset, len)
            .is_some_and(|size| range_cached(&open.file, size, size.saturating_sub(CIPHER_BLOCK_SIZE as u64), size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;

    #[test]
    fn the_pool_runs_every_job_and_shutdown_waits_for_them() {
        let pool = IoPool::new(3).unwrap();
        let (done, results) = mpsc::channel();
        for i in 0..50u32 {
            let done = done.clone();
            pool.run(move || {
                std::thread::sleep(std::time::Duration::from_millis(1));
                done.send(i).unwrap();
            });
        }
        pool.shutdown();
        assert!(pool.idle());
        let mut got: Vec<u32> = results.try_iter().collect();
        got.sort_unstable();
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        // After shutdown a job runs on the caller's thread.
        let caller = std::thread::current().id();
        pool.run(move || done.send(u32::from(std::thread::current().id() == caller)).unwrap());
        assert_eq!(results.try_recv(), Ok(1));
    }

    #[test]
    fn cachestat_tells_cached_pages_from_dropped_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut file = File::create(&path).unwrap();
        file.write_all(&vec![7u8; 64 * 1024]).unwrap();
        file.sync_all().unwrap();
        let file = File::open(&path).unwrap();
        let size = 64 * 1024;
        assert!(range_cached(&file, size, 0, size), "just written");
        assert!(
            range_cached(&file, size, size, size + 4096),
            "past the end counts as cached"
        );
        // Clean pages are dropped on request.
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        assert!(!range_cached(&file, size, 8192, 12288), "dropped");
        let mut buf = [0u8; 100];
        std::os::unix::fs::FileExt::read_at(&file, &mut buf, 8200).unwrap();
        assert!(range_cached(&file, size, 8192, 8292), "read again");
    }
}
