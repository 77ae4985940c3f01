//! Reads and writes whose backing pages are not cached, alone and from many
//! threads at once, and fsyncs (which run on the daemon's sync threads)
//! racing with them: every byte must come back as written. Also the
//! readahead across files (prefetch.rs), observed in the backing page cache
//! (empty files' checks ahead: empty_checks.rs).

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::common::{Rng, TestVolume, path_str};

const FILES: usize = 12;
const FILE_LEN: usize = 1 << 20;

/// Drops the clean cached pages of every file under `dir`, so that the next
/// read of them goes to the disk (for the mount: to the daemon).
pub(crate) fn drop_cached_pages(dir: &Path) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let file = File::open(&path).unwrap();
            file.sync_all().unwrap();
            rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        } else if path.is_dir() {
            drop_cached_pages(&path);
        }
    }
}

fn contents(seed: u64) -> Vec<u8> {
    Rng::new(seed).bytes(FILE_LEN)
}

/// Writes `f0`..`f{FILES-1}` through the mount.
fn write_every_file(vol: &TestVolume) {
    for i in 0..FILES {
        fs::write(vol.path(&format!("f{i}")), contents(i as u64)).unwrap();
    }
}

fn check_every_file_in_parallel(vol: &TestVolume, threads: usize, chunk: usize) {
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in (t..FILES).step_by(threads) {
                    let want = contents(i as u64);
                    let file = File::open(vol.path(&format!("f{i}"))).unwrap();
                    let mut got = vec![0u8; FILE_LEN];
                    // Out of order, so the kernel's readahead does not turn
                    // the reads into one sequential stream.
                    let chunks = FILE_LEN / chunk;
                    for k in (0..chunks).rev() {
                        file.read_exact_at(&mut got[k * chunk..(k + 1) * chunk], (k * chunk) as u64)
                            .unwrap();
                    }
                    assert!(
                        got == want,
                        "f{i} read back wrong ({threads} threads, {chunk}-byte reads)"
                    );
                }
            });
        }
    });
}

#[test]
fn cold_reads_alone_and_in_parallel_return_what_was_written() {
    let vol = TestVolume::init();
    let m = vol.mount();
    write_every_file(&vol);
    for (threads, chunk) in [(1, 4096), (6, 4096), (6, 256 * 1024), (1, 256 * 1024)] {
        drop_cached_pages(&vol.mnt);
        drop_cached_pages(&vol.backing);
        check_every_file_in_parallel(&vol, threads, chunk);
    }
    m.unmount();
    let m = vol.mount();
    check_every_file_in_parallel(&vol, 4, 64 * 1024);
    m.unmount();
}

#[test]
fn cold_partial_writes_and_fsyncs_from_many_threads_keep_every_byte() {
    let vol = TestVolume::init();
    let m = vol.mount();
    write_every_file(&vol);
    drop_cached_pages(&vol.mnt);
    drop_cached_pages(&vol.backing);
    // Each thread overwrites unaligned pieces of its files (every block
    // they touch must be read back first, from the disk) and fsyncs.
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let vol = &vol;
                s.spawn(move || {
                    let mut rng = Rng::new(100 + t as u64);
                    let mut models = Vec::new();
                    for i in (t..FILES).step_by(4) {
                        let mut model = contents(i as u64);
                        let file = fs::OpenOptions::new()
                            .write(true)
                            .open(vol.path(&format!("f{i}")))
                            .unwrap();
                        for _ in 0..20 {
                            let len = 1 + rng.below(9000) as usize;
                            let at = rng.below((FILE_LEN - len) as u64) as usize;
                            let piece = rng.bytes(len);
                            file.write_all_at(&piece, at as u64).unwrap();
                            model[at..at + len].copy_from_slice(&piece);
                        }
                        file.sync_all().unwrap();
                        models.push((i, model));
                    }
                    models
                })
            })
            .collect();
        let mut all: Vec<(usize, Vec<u8>)> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
        all.sort_by_key(|(i, _)| *i);
        all.into_iter().map(|(_, model)| model).collect()
    });
    m.unmount();
    let _m = vol.mount();
    for (i, model) in models.iter().enumerate() {
        let got = fs::read(vol.path(&format!("f{i}"))).unwrap();
        assert!(&got == model, "f{i} differs from its model after remount");
    }
}

#[test]
fn thread_and_prefetch_counts_are_checked() {
    let vol = TestVolume::init();
    for bad in [
        "sync_threads=0",
        "sync_threads=65",
        "sync_threads=x",
        "threads=0",
        "prefetch=65",
        "prefetch=-1",
    ] {
        let out = vol.run(&["mount", path_str(&vol.backing), path_str(&vol.mnt), "-o", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(bad.split('=').next().unwrap()), "{bad}: {err}");
    }
    for (options, threads) in [(None, 16), (Some("threads=3,sync_threads=2"), 3)] {
        let m = match options {
            Some(o) => vol.mount_with(&["-o", o]),
            None => vol.mount(),
        };
        fs::write(vol.path("x"), b"ok").unwrap();
        assert_eq!(fs::read(vol.path("x")).unwrap(), b"ok");
        // Started one after the other: a loaded machine may still be at it.
        assert!(
            eventually(|| daemon_threads(&vol, "fuser-") == threads),
            "request threads with {options:?}: {} of {threads}",
            daemon_threads(&vol, "fuser-")
        );
        // 1 MiB sealed at once goes to the block crypto pool.
        {
            let mut f = File::create(vol.path("big")).unwrap();
            f.write_all(&[7u8; 1 << 20]).unwrap();
            f.sync_all().unwrap();
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(daemon_threads(&vol, "kmsfs-crypto-"), cores, "named crypto threads");
        m.unmount();
    }
}

/// The number of distinct names starting with `prefix` among the mounted
/// daemon's threads (request threads are `fuser-N`).
fn daemon_threads(vol: &TestVolume, prefix: &str) -> usize {
    let out = vol.run(&["status", "--json", path_str(&vol.backing)]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pid = status["daemon_pid"].as_u64().expect("daemon pid");
    let names: std::collections::BTreeSet<String> = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| fs::read_to_string(task.unwrap().path().join("comm")).unwrap())
        .filter(|comm| comm.starts_with(prefix))
        .collect();
    names.len()
}

/// Whether every page of `path` is in the page cache.
pub(crate) fn resident(path: &Path) -> bool {
    let file = File::open(path).unwrap();
    kmsfs::test_hooks::resident_pages(&file)
        .unwrap()
        .iter()
        .all(|&page| page)
}

pub(crate) fn ino(p: &std::path::Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap())
}

/// The backing files of a mounted directory's entries, by inode number
/// (the same through the mount).
pub(crate) fn backing_files(
    vol: &TestVolume,
    dir: &std::path::Path,
) -> std::collections::HashMap<u64, std::path::PathBuf> {
    let wanted = ino(dir);
    let mut stack = vec![vol.backing.clone()];
    while let Some(d) = stack.pop() {
        if ino(&d) == wanted {
            return fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().path())
                .map(|p| (ino(&p), p))
                .collect();
        }
        stack.extend(
            fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.is_dir()),
        );
    }
    panic!("no backing directory for {}", dir.display());
}

#[test]
fn reading_a_directory_in_listing_order_prefetches_the_next_files() {
    const SMALL: usize = 20;
    let vol = TestVolume::init();
    let m = vol.mount();
    let dir = vol.path("small");
    fs::create_dir(&dir).unwrap();
    for i in 0..SMALL {
        fs::write(dir.join(format!("s{i}")), Rng::new(100 + i as u64).bytes(8192)).unwrap();
    }
    // A second directory, read in order later: its prefetch shows that the
    // (single, first-come first-served) prefetch worker is done with
    // whatever was asked before it.
    let other = vol.path("other");
    fs::create_dir(&other).unwrap();
    for i in 0..4 {
        fs::write(other.join(format!("o{i}")), b"other").unwrap();
    }
    drop_cached_pages(&vol.mnt);
    drop_cached_pages(&vol.backing);
    // Backing files by inode number (a file's inode number is the same
    // through the mount), in the mount's listing order.
    let backing_of = backing_files(&vol, &dir);
    let listing: Vec<(std::path::PathBuf, std::path::PathBuf)> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let ino = std::os::unix::fs::DirEntryExt::ino(&e);
            (e.path(), backing_of[&ino].clone())
        })
        .collect();
    assert_eq!(listing.len(), SMALL);
    assert!(
        !listing.iter().any(|(_, backing)| resident(backing)),
        "the backing filesystem keeps its pages after drop_caches (tmpfs?): run this test on a disk filesystem"
    );
    // Reading the listing's first file asks for the next 8.
    let started = std::time::Instant::now();
    fs::read(&listing[0].0).unwrap();
    let deadline = started + std::time::Duration::from_secs(5);
    while !listing[1..9].iter().all(|(_, b)| resident(b)) {
        assert!(
            std::time::Instant::now() < deadline,
            "files 1-8 were not prefetched: {:?}",
            listing[1..9].iter().map(|(_, b)| resident(b)).collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // How long a prefetch took here: what "nothing happened" waits for below.
    let prefetch_time = started.elapsed();
    assert!(
        listing[9..].iter().all(|(_, b)| !resident(b)),
        "only the window is prefetched"
    );
    // Reading in another order asks for nothing more: once a prefetch
    // asked for after it (in order, in the other directory) is done,
    // nothing beyond the window is there.
    fs::read(&listing[15].0).unwrap();
    let other_backing = backing_files(&vol, &other);
    let other_listing: Vec<_> = fs::read_dir(&other).unwrap().map(|e| e.unwrap().path()).collect();
    fs::read(&other_listing[0]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !other_listing[1..].iter().all(|p| resident(&other_backing[&ino(p)])) {
        assert!(
            std::time::Instant::now() < deadline,
            "the other directory was not prefetched"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(!resident(&listing[16].1) && !resident(&listing[10].1));
    // Whatever was prefetched reads back as written.
    for (path, _) in &listing {
        let i: u64 = path.file_name().unwrap().to_str().unwrap()[1..].parse().unwrap();
        assert_eq!(fs::read(path).unwrap(), Rng::new(100 + i).bytes(8192));
    }
    m.unmount();
    // `prefetch=0` turns it off; a listing is taken at opendir, so list again.
    let m = vol.mount_with(&["-o", "prefetch=0"]);
    drop_cached_pages(&vol.mnt);
    drop_cached_pages(&vol.backing);
    assert_eq!(fs::read_dir(&dir).unwrap().count(), SMALL);
    for (path, _) in &listing[..3] {
        fs::read(path).unwrap();
    }
    std::thread::sleep((prefetch_time * 4).max(std::time::Duration::from_millis(300)));
    assert!(
        listing[3..].iter().all(|(_, b)| !resident(b)),
        "nothing read ahead with prefetch=0"
    );
    m.unmount();
}

/// Waits until `done` holds, for at most 30 s (a loaded machine); false if
/// it never did.
pub(crate) fn eventually(done: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    true
}

/// Looking up a second subdirectory of a directory whose nodes are new
/// reads the IV files of its subdirectories and of theirs into the page
/// cache (iv_ahead.rs); `prefetch=0` reads none.
#[test]
fn a_walk_finds_the_next_directories_ivs_read_ahead() {
    let vol = TestVolume::init();
    let m = vol.mount();
    let top = vol.path("top");
    let children: Vec<_> = (0..6).map(|i| top.join(format!("d{i}"))).collect();
    for child in &children {
        for j in 0..3 {
            fs::create_dir_all(child.join(format!("e{j}"))).unwrap();
        }
    }
    m.unmount();
    // Every IV file below `top`, in the backing directory.
    let ivs = {
        let m = vol.mount();
        let mut ivs = Vec::new();
        for child in &children {
            let of_top = backing_files(&vol, &top);
            ivs.push(of_top[&ino(child)].join(".kmsfs.diriv"));
            for backing in backing_files(&vol, child).values().filter(|p| p.is_dir()) {
                ivs.push(backing.join(".kmsfs.diriv"));
            }
        }
        m.unmount();
        ivs
    };
    assert_eq!(ivs.len(), 6 + 18);
    for options in [&[][..], &["-o", "prefetch=0"][..]] {
        let m = vol.mount_with(options);
        drop_cached_pages(&vol.backing);
        assert!(!ivs.iter().any(|iv| resident(iv)), "dropped");
        fs::metadata(&children[0]).unwrap();
        fs::metadata(&children[1]).unwrap();
        if options.is_empty() {
            assert!(
                eventually(|| ivs.iter().all(|iv| resident(iv))),
                "IV files read ahead: {:?}",
                ivs.iter().map(|iv| resident(iv)).collect::<Vec<_>>()
            );
        } else {
            std::thread::sleep(std::time::Duration::from_millis(500));
            // Only what the two lookups and `top` needed.
            let read = ivs.iter().filter(|iv| resident(iv)).count();
            assert!(read <= 2, "{read} IV files read with prefetch=0");
        }
        m.unmount();
    }
}
