//! The filesystem as the FUSE session sees it: `KmsFs` plus the worker
//! pools that take work off the request threads.
//!
//! fsync and fsyncdir run on a small pool of their own, so that a long
//! fsync (seconds for a large file on a slow disk) never occupies one of the
//! threads reading requests from /dev/fuse: as many concurrent fsyncs as
//! there are request threads would otherwise stall every other request,
//! `stat`s included. Reads and writes stay on the request threads: handing cold
//! ones to a pool was measured and costs a second cross-CPU wake-up per
//! request (DESIGN.md, "Request threads").

use std::ffi::OsStr;
use std::sync::Arc;

use fuser::{FileHandle, INodeNo, ReplyEmpty};

use super::KmsFs;
use super::attr::reply_empty;
use super::prefetch;
use super::workers::WorkerPool;

/// The filesystem as the FUSE session sees it: `KmsFs` plus its worker pools.
pub struct Mounted {
    pub(super) fs: Arc<KmsFs>,
    pub(super) syncs: WorkerPool,
    pub(super) prefetches: WorkerPool,
    /// Backing removals of unlinks already answered (removals.rs).
    pub(super) removals: WorkerPool,
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

    /// Removes a name, answering before the backing removal where the
    /// mount allows it (see removals.rs).
    pub(super) fn serve_unlink(&self, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let fs = &self.fs;
        let result = fs.node_unsettled(parent).and_then(|p| {
            let backing = fs.backing_name(&p, name)?;
            let ticket = match fs.defer_removals {
                true => fs.removal_ticket(&p, &backing)?,
                false => None,
            };
            let Some(ticket) = ticket else {
                return fs.remove_backing_file(&p, &backing);
            };
            let fs = Arc::clone(fs);
            self.removals.run(move || fs.finish_removal(&p, &backing, ticket));
            Ok(())
        });
        reply_empty(reply, result);
    }

    /// Hands the reading ahead that lookups decided on to the prefetch
    /// worker: empty files' final blocks (check_ahead.rs) and
    /// subdirectories' IV files (iv_ahead.rs).
    pub(super) fn start_reads_ahead(&self) {
        for job in self.fs.ivs_ahead.take_jobs() {
            let (dir, fs) = (job.dir(), Arc::clone(&self.fs));
            if !self.prefetches.offer(move || {
                fs.ivs_ahead.run(job);
            }) {
                self.fs.ivs_ahead.passed(dir, super::iv_ahead::Pass::default());
            }
        }
        for job in self.fs.checks_ahead.take_jobs() {
            let (dir, reads) = (job.dir(), job.reads());
            let fs = Arc::clone(&self.fs);
            let authenticate_ahead = move || fs.checks_ahead.run(job, &|asked| fs.authenticate_ahead(dir, asked));
            if reads {
                // A reading dropped is started over at the next check.
                if !self.prefetches.offer(authenticate_ahead) {
                    self.fs.checks_ahead.abandoned(dir);
                }
            } else {
                // A burst is never dropped: its names left the directory's
                // sweep, so a dropped one would leave its files to be read
                // on the request path for the rest of the pass (over 4,000
                // of 10,000 files when lookups outran the worker). The
                // bursts queued are bounded by the names swept.
                self.prefetches.queue(authenticate_ahead);
            }
        }
    }

    /// Called when a file's first bytes are read: if the files of its
    /// directory are being read in listing order, asks for the next ones.
    pub(super) fn prefetch_after(&self, ino: INodeNo) {
        let nodes: Vec<_> = self
            .fs
            .read_orders
            .next_after(ino.0)
            .into_iter()
            .filter_map(|next| self.fs.inodes.get(next))
            .collect();
        if !nodes.is_empty() {
            self.prefetches
                .offer(move || nodes.iter().for_each(|node| prefetch::start_reading(node)));
        }
    }
}
