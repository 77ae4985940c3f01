//! Small pools of threads for work that must not occupy the threads
//! reading requests from /dev/fuse: fsync and fsyncdir (long waits for the
//! disk) and cross-file prefetching (see prefetch.rs).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// A fixed set of threads running jobs in arrival order.
pub struct WorkerPool {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// `offer` refuses jobs beyond this many waiting.
    max_waiting: usize,
}

impl WorkerPool {
    /// `threads` threads named `kmsfs-{name}-N`.
    pub fn new(name: &str, threads: usize, max_waiting: usize) -> std::io::Result<Self> {
        let queue: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let handles = (0..threads.max(1))
            .map(|i| {
                let queue = Arc::clone(&queue);
                std::thread::Builder::new()
                    .name(format!("kmsfs-{name}-{i}"))
                    .spawn(move || work(&queue))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(WorkerPool {
            queue,
            threads: Mutex::new(handles),
            max_waiting,
        })
    }

    /// Queues `job` unless `max_waiting` jobs are waiting already or the
    /// pool is shut down (for work that may be skipped, such as advice).
    pub fn offer(&self, job: impl FnOnce() + Send + 'static) -> bool {
        self.push(Box::new(job), self.max_waiting).is_ok()
    }

    /// Queues `job` however many jobs are waiting, unless the pool is shut
    /// down (for work that may be skipped but whose amount is bounded elsewhere).
    pub fn queue(&self, job: impl FnOnce() + Send + 'static) {
        let _ = self.push(Box::new(job), usize::MAX);
    }

    /// Runs `job` on a pool thread (on this one once the pool is shut down),
    /// however many jobs are waiting.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        if let Err(job) = self.push(Box::new(job), usize::MAX) {
            job();
        }
    }

    /// Queues `job` if fewer than `limit` are waiting and the pool runs;
    /// gives it back otherwise.
    fn push(&self, job: Job, limit: usize) -> Result<(), Job> {
        let (lock, ready) = &*self.queue;
        let mut queue = crate::util::lock(lock);
        if queue.closed || queue.jobs.len() >= limit {
            return Err(job);
        }
        queue.jobs.push_back(job);
        drop(queue);
        ready.notify_one();
        Ok(())
    }

    /// Finishes the queued jobs and stops the threads.
    pub fn shutdown(&self) {
        let (lock, ready) = &*self.queue;
        crate::util::lock(lock).closed = true;
        ready.notify_all();
        let threads = std::mem::take(&mut *crate::util::lock(&self.threads));
        for thread in threads {
            if thread.join().is_err() {
                log::error!("a worker thread panicked");
            }
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn work(queue: &(Mutex<Queue>, Condvar)) {
    let (lock, ready) = queue;
    loop {
        let job = {
            let mut queue = crate::util::lock(lock);
            loop {
                if let Some(job) = queue.jobs.pop_front() {
                    break job;
                }
                if queue.closed {
                    return;
                }
                queue = ready.wait(queue).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        };
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn the_pool_runs_every_job_and_shutdown_waits_for_them() {
        let pool = WorkerPool::new("test", 3, usize::MAX).unwrap();
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

    #[test]
    fn offer_refuses_jobs_beyond_the_limit_queue_does_not_and_neither_after_shutdown() {
        let pool = WorkerPool::new("test", 1, 2).unwrap();
        let (started, wait_started) = mpsc::channel();
        let (release, blocked) = mpsc::channel::<()>();
        assert!(pool.offer(move || {
            started.send(()).unwrap();
            blocked.recv().unwrap();
        }));
        wait_started.recv().unwrap(); // the thread is busy; nothing waits
        let ran = Arc::new(Mutex::new(0));
        let offered: Vec<bool> = (0..3)
            .map(|_| {
                let ran = Arc::clone(&ran);
                pool.offer(move || *ran.lock().unwrap() += 1)
            })
            .collect();
        assert_eq!(offered, [true, true, false]);
        let queued = Arc::clone(&ran);
        pool.queue(move || *queued.lock().unwrap() += 1); // beyond the limit: queued all the same
        release.send(()).unwrap();
        pool.shutdown();
        assert_eq!(*ran.lock().unwrap(), 3);
        assert!(!pool.offer(|| {}));
        let late = Arc::clone(&ran);
        pool.queue(move || *late.lock().unwrap() += 1);
        assert_eq!(*ran.lock().unwrap(), 3, "nothing queued after shutdown runs");
    }
}
