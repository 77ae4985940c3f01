//! Requests that wait for the disk for long: fsync and fsyncdir.
//!
//! They run on a small pool of their own, so that a long fsync (seconds
//! for a large file on a slow disk) never occupies one of the threads
//! reading requests from /dev/fuse: with four request threads, four
//! concurrent fsyncs would otherwise stall every other request, `stat`s
//! included. Reads and writes stay on the request threads: handing cold
//! ones to a pool was measured and costs a second cross-CPU wake-up per
//! request (DESIGN.md, "Request threads").

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use fuser::{FileHandle, INodeNo, ReplyEmpty};

use super::KmsFs;
use super::attr::reply_empty;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// A fixed set of threads running jobs in arrival order.
pub struct SyncPool {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl SyncPool {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let queue: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let handles = (0..threads.max(1))
            .map(|i| {
                let queue = Arc::clone(&queue);
                std::thread::Builder::new()
                    .name(format!("kmsfs-sync-{i}"))
                    .spawn(move || work(&queue))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SyncPool {
            queue,
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
        drop(queue);
        ready.notify_one();
    }

    /// Finishes the queued jobs and stops the threads.
    pub fn shutdown(&self) {
        let (lock, ready) = &*self.queue;
        lock.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        ready.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for thread in threads {
            if thread.join().is_err() {
                log::error!("a sync thread panicked");
            }
        }
    }
}

impl Drop for SyncPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn work(queue: &(Mutex<Queue>, Condvar)) {
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
    }
}

/// The filesystem as the FUSE session sees it: `KmsFs` plus the sync pool.
pub struct Mounted {
    pub(super) fs: Arc<KmsFs>,
    pub(super) syncs: SyncPool,
}

impl Deref for Mounted {
    type Target = KmsFs;
    fn deref(&self) -> &KmsFs {
        &self.fs
    }
}

impl Mounted {
    pub(super) fn serve_fsync(&self, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        self.syncs.run(move || {
            reply_empty(
                reply,
                fs.open_file(ino, fh, false).and_then(|f| fs.sync_file(&f, datasync)),
            )
        });
    }

    pub(super) fn serve_fsyncdir(&self, ino: INodeNo, reply: ReplyEmpty) {
        let fs = Arc::clone(&self.fs);
        self.syncs
            .run(move || reply_empty(reply, fs.node(ino).and_then(|n| fs.sync_dir(&n))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn the_pool_runs_every_job_and_shutdown_waits_for_them() {
        let pool = SyncPool::new(3).unwrap();
        let (done, results) = mpsc::channel();
        for i in 0..50u32 {
            let done = done.clone();
            pool.run(move || {
                std::thread::sleep(std::time::Duration::from_millis(1));
                done.send(i).unwrap();
            });
        }
        pool.shutdown();
        let mut got: Vec<u32> = results.try_iter().collect();
        got.sort_unstable();
        assert_eq!(got, (0..50).collect::<Vec<_>>());
        // After shutdown a job runs on the caller's thread.
        let caller = std::thread::current().id();
        pool.run(move || done.send(u32::from(std::thread::current().id() == caller)).unwrap());
        assert_eq!(results.try_recv(), Ok(1));
    }
}
