//! Finding the key to erase off the unlink path. Erasing a removed file's
//! data key needs the file's id, which sits in its header; reading it while
//! answering UNLINK costs a disk read per file when the file is not cached
//! (a cold `rm -rf`). The unlink instead hands a descriptor of the removed
//! inode to one worker thread, which reads the id and queues the key's
//! deletion. The descriptor keeps the inode, and so its header, alive until
//! then; the queue is bounded, so descriptors cannot pile up. The headers
//! of the files waiting are asked for together (`batch_read`) before the
//! thread reads them one by one: read one at a time, each cold header is
//! a disk read waited for alone, and an `rm -rf` of 20,000 small files
//! took a third longer (docs/DESIGN.md).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::batch_read;
use super::inodes::LiveIds;
use crate::crypto::FileId;
use crate::volume::Volume;
use crate::volume::header::HEADER_LEN;
use crate::volume::namespace::{self, FileIdRead};

/// Files waiting for their id to be read.
const QUEUE: usize = 256;

enum State {
    Idle,
    Running(SyncSender<File>, JoinHandle<()>),
    /// Unmounting: whatever still comes is handled at once.
    Drained,
}

pub struct Shredder {
    volume: Arc<Volume>,
    ids: Arc<LiveIds>,
    state: Mutex<State>,
}

/// Queues the deletion of a removed file's key, unless another backing
/// inode this mount has seen uses the same id (one was copied over another's name).
fn erase(volume: &Volume, ids: &LiveIds, id: &FileId, ino: Option<u64>) {
    if let Some(ino) = ino {
        ids.removed(id, ino);
    }
    match ids.other_holder(id, ino) {
        Some(other) => log::warn!(
            "removed file's id {} is also the id of inode {other} (a backing file copied over \
             another's name; fsck reports both): its key is kept",
            crate::util::hex(id)
        ),
        None => volume.forget_file_key(id),
    }
}

/// Reads the id of a removed file and queues the deletion of its key.
fn erase_key_of(volume: &Volume, ids: &LiveIds, file: File) {
    match namespace::read_file_id(&file) {
        Ok(FileIdRead::Id(id)) => erase(volume, ids, &id, None),
        // Not a kmsfs file (or a damaged one): there is no key to erase.
        Ok(FileIdRead::Empty) => {}
        Ok(FileIdRead::Damaged { error, .. }) => {
            log::warn!("removed file without a readable header ({error}); no key erased")
        }
        Err(e) => log::error!("reading the header of a removed file failed ({e}); its key stays until fsck"),
    }
}

/// Starts the reads of the headers of `files` at once, by rising inode
/// number (so that the reads of small neighbouring files merge).
fn ask_for_headers(files: &[File]) {
    let mut by_inode: Vec<(u64, &File)> = files
        .iter()
        .map(|file| (rustix::fs::fstat(file).map_or(0, |st| st.st_ino), file))
        .collect();
    by_inode.sort_unstable_by_key(|(ino, _)| *ino);
    let files: Vec<&File> = by_inode.into_iter().map(|(_, file)| file).collect();
    batch_read::ask_for(&files, HEADER_LEN);
}

impl Shredder {
    pub fn new(volume: Arc<Volume>, ids: Arc<LiveIds>) -> Self {
        Shredder {
            volume,
            ids,
            state: Mutex::new(State::Idle),
        }
    }

    /// Erases the key of file `id`, whose node `ino` (if the mount knew
    /// it) is gone.
    pub fn erase(&self, id: &FileId, ino: Option<u64>) {
        erase(&self.volume, &self.ids, id, ino);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        crate::util::lock(&self.state)
    }

    /// Erases the key of the file behind `file`, a descriptor of an inode
    /// whose last name is gone. The thread starts with the first removal.
    pub fn shred(&self, file: OwnedFd) {
        let file = File::from(file);
        let sender = {
            let mut state = self.state();
            if let State::Idle = *state {
                let (sender, receiver) = sync_channel::<File>(QUEUE);
                let (volume, ids) = (Arc::clone(&self.volume), Arc::clone(&self.ids));
                let spawned = std::thread::Builder::new().name("kmsfs-shred".into()).spawn(move || {
                    while let Ok(first) = receiver.recv() {
                        let mut waiting = vec![first];
                        waiting.extend(receiver.try_iter().take(QUEUE));
                        ask_for_headers(&waiting);
                        for file in waiting {
                            erase_key_of(&volume, &ids, file);
                        }
                    }
                });
                match spawned {
                    Ok(worker) => *state = State::Running(sender, worker),
                    Err(e) => log::warn!("cannot start the key-erasing thread, erasing keys inline: {e}"),
                }
            }
            match &*state {
                State::Running(sender, _) => Some(sender.clone()),
                State::Idle | State::Drained => None,
            }
        };
        match sender {
            // Blocks while the queue is full, which bounds the descriptors held.
            Some(sender) => {
                if let Err(unsent) = sender.send(file) {
                    erase_key_of(&self.volume, &self.ids, unsent.0);
                }
            }
            None => erase_key_of(&self.volume, &self.ids, file),
        }
    }

    /// Waits until every handed-over file's key deletion is queued in the
    /// DB; called at unmount, before the last commit.
    pub fn drain(&self) {
        let previous = std::mem::replace(&mut *self.state(), State::Drained);
        if let State::Running(sender, worker) = previous {
            drop(sender);
            if worker.join().is_err() {
                log::error!("the key-erasing thread panicked; fsck reports keys left behind");
            }
        }
    }
}
