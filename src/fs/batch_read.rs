//! The first bytes of many backing files asked for in one system call.
//! `POSIX_FADV_WILLNEED` asks for one file at a time: each call submits its
//! own read to the disk (on a VM, a notification of the hypervisor each) and
//! each read completes alone. Submitted together under one block-layer plug,
//! reads of neighbouring blocks (small files made one after another, asked
//! for by rising inode number) are merged into a few large ones. Linux AIO
//! gives that plug: `io_submit` of more than two requests holds one, and a
//! buffered read with `RWF_NOWAIT` starts the read of a page not yet cached
//! and returns `EAGAIN` without waiting for it. Where AIO is unavailable
//! (no context to be had, a seccomp filter, a filesystem without `NOWAIT`
//! reads) each file falls back to `POSIX_FADV_WILLNEED`.

use std::cell::Cell;
use std::fs::File;
use std::num::NonZeroU64;
use std::os::fd::AsRawFd;

use rustix::fs::Advice;

const IOCB_CMD_PREAD: u16 = 0;

/// `struct iocb` of `<linux/aio_abi.h>`.
#[repr(C)]
#[derive(Default)]
struct Iocb {
    aio_data: u64,
    #[cfg(target_endian = "little")]
    aio_key: u32,
    aio_rw_flags: i32,
    #[cfg(target_endian = "big")]
    aio_key: u32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// `struct io_event` of `<linux/aio_abi.h>`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

/// An AIO context, destroyed on drop.
struct Context {
    id: libc::c_ulong,
    /// Not to be used again: waiting for events failed (requests may be
    /// left in it), or the backing filesystem refuses `RWF_NOWAIT` reads.
    unusable: Cell<bool>,
}

impl Context {
    fn new(nr: usize) -> Option<Self> {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the context id to `ctx`, which outlives the call.
        let r = unsafe { libc::syscall(libc::SYS_io_setup, nr as libc::c_long, &mut ctx as *mut libc::c_ulong) };
        (r == 0).then_some(Context {
            id: ctx,
            unusable: Cell::new(false),
        })
    }

    /// Submits `iocbs`; the number submitted, or why the first was refused.
    fn submit(&self, iocbs: &mut [*mut Iocb]) -> Result<usize, i32> {
        // SAFETY: every pointer is to an `Iocb` whose buffer stays alive until
        // `reap` returned its event (see `ask_for_at_once`).
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_submit,
                self.id,
                iocbs.len() as libc::c_long,
                iocbs.as_mut_ptr(),
            )
        };
        usize::try_from(r).map_err(|_| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// Waits for `n` events; `None` if waiting failed.
    fn reap(&self, n: usize) -> Option<Vec<IoEvent>> {
        let mut events = vec![IoEvent::default(); n];
        let mut got = 0;
        while got < n {
            // SAFETY: `events[got..]` holds room for `n - got` events; no timeout.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.id,
                    (n - got) as libc::c_long,
                    (n - got) as libc::c_long,
                    events[got..].as_mut_ptr(),
                    std::ptr::null_mut::<libc::timespec>(),
                )
            };
            match usize::try_from(r) {
                Ok(more) => got += more.min(n - got),
                Err(_) if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => return None,
            }
        }
        Some(events)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: the context is ours; io_destroy waits for requests in flight.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.id) };
    }
}

/// Requests one context holds at once.
const AT_ONCE: usize = 256;

thread_local! {
    /// One context per thread, made at its first use and kept: destroying
    /// one waits for an RCU grace period (milliseconds).
    static CONTEXT: Option<Context> = Context::new(AT_ONCE);
}

/// Asks for the first `len` bytes of each of `files`, without waiting;
/// returns how many were asked for together (the others one by one).
pub fn ask_for(files: &[&File], len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    files
        .chunks(AT_ONCE)
        .map(|files| CONTEXT.with(|ctx| ask_for_at_once(ctx.as_ref(), files, len)))
        .sum()
}

fn ask_for_at_once(ctx: Option<&Context>, files: &[&File], len: usize) -> usize {
    let fallback = |files: &[&File]| {
        for file in files {
            let _ = rustix::fs::fadvise(file, 0, NonZeroU64::new(len as u64), Advice::WillNeed);
        }
    };
    // Plugged and merged only when more than two are submitted at once.
    let Some(ctx) = ctx.filter(|ctx| files.len() > 2 && !ctx.unusable.get()) else {
        fallback(files);
        return 0;
    };
    // Pages already cached are copied here; the bytes are not used.
    let mut scratch = vec![0u8; len * files.len()];
    let mut iocbs: Vec<Iocb> = files
        .iter()
        .zip(scratch.chunks_mut(len))
        .enumerate()
        .map(|(index, (file, buf))| Iocb {
            aio_data: index as u64,
            aio_lio_opcode: IOCB_CMD_PREAD,
            aio_fildes: file.as_raw_fd() as u32,
            aio_buf: buf.as_mut_ptr() as u64,
            aio_nbytes: len as u64,
            aio_rw_flags: libc::RWF_NOWAIT,
            ..Iocb::default()
        })
        .collect();
    let mut pointers: Vec<*mut Iocb> = iocbs.iter_mut().map(|iocb| iocb as *mut Iocb).collect();
    let (mut next, mut submitted) = (0, 0);
    while next < files.len() {
        match ctx.submit(&mut pointers[next..]) {
            Ok(0) => break,
            Ok(n) => {
                next += n;
                submitted += n;
            }
            Err(errno) => {
                // What one request is refused for, the next would be too.
                if matches!(errno, libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS | libc::EBADF) {
                    ctx.unusable.set(true);
                }
                break;
            }
        }
    }
    fallback(&files[next..]);
    // A request's buffer and iocb go only once it is over; reads with
    // RWF_NOWAIT end within io_submit, so waiting does not fail in practice.
    let Some(events) = ctx.reap(submitted) else {
        ctx.unusable.set(true);
        std::mem::forget(iocbs);
        std::mem::forget(scratch);
        return submitted;
    };
    // EAGAIN: the read was started and not waited for; a page already
    // cached was copied. Any other error started nothing.
    for event in events {
        if event.res < 0
            && event.res != -i64::from(libc::EAGAIN)
            && let Some(file) = usize::try_from(event.data).ok().and_then(|i| files.get(i))
        {
            fallback(&[file]);
        }
    }
    submitted
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn cached(file: &File) -> bool {
        let mut page = [0u8; 1];
        // SAFETY: a read-only shared mapping of one page of an open file,
        // unmapped before returning; mincore writes one byte into `page`.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            assert_eq!(libc::mincore(addr, 4096, page.as_mut_ptr()), 0);
            libc::munmap(addr, 4096);
        }
        page[0] & 1 == 1
    }

    fn written_and_dropped(path: &std::path::Path, byte: u8) -> File {
        let mut file = File::create(path).unwrap();
        file.write_all(&[byte; 46]).unwrap();
        file.sync_all().unwrap();
        let file = File::open(path).unwrap();
        rustix::fs::fadvise(&file, 0, None, Advice::DontNeed).unwrap();
        file
    }

    #[test]
    fn files_asked_for_together_are_read_into_the_cache_unchanged() {
        // Not tmpfs, whose pages cannot be dropped.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let probe = written_and_dropped(&dir.path().join("probe"), 0);
        let nowait_reads = !matches!(
            rustix::io::preadv2(
                &probe,
                &mut [std::io::IoSliceMut::new(&mut [0u8; 1])],
                0,
                rustix::io::ReadWriteFlags::NOWAIT
            ),
            Err(rustix::io::Errno::OPNOTSUPP)
        );
        let files: Vec<File> = (1..=8)
            .map(|i| written_and_dropped(&dir.path().join(format!("f{i}")), i))
            .collect();
        if files.iter().any(cached) {
            return; // pages that cannot be dropped here: nothing to see
        }
        let refs: Vec<&File> = files.iter().collect();
        let together = ask_for(&refs, 46);
        if nowait_reads {
            assert_eq!(together, files.len());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !files.iter().all(cached) {
            assert!(std::time::Instant::now() < deadline, "the reads asked for never came");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(ask_for(&refs[..1], 46), 0, "one file is asked for alone");
        for (i, file) in files.iter().enumerate() {
            let mut buf = [0u8; 46];
            file.read_exact_at(&mut buf, 0).unwrap();
            assert_eq!(buf, [i as u8 + 1; 46]);
        }
    }
}
