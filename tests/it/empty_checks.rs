//! Empty files' final blocks read and authenticated ahead
//! (fs/check_ahead.rs, fs/verified_ahead.rs), observed in the backing page
//! cache and the daemon's log: what is read, what is never opened, and
//! that a damaged file is still caught.

use std::fs::{self, File};

use crate::cold_io::{backing_files, drop_cached_pages, eventually, ino, resident};
use crate::common::TestVolume;

/// A file of the directory `markers` made by `make_markers`.
struct Marker {
    path: std::path::PathBuf,
    backing: std::path::PathBuf,
    empty: bool,
}

const MARKERS: usize = 400;

/// Makes `markers/e0` … `e399`, empty but for every tenth (which needs no
/// check and is never read ahead), and returns them by inode number.
fn make_markers(vol: &TestVolume) -> Vec<Marker> {
    let m = vol.mount();
    let dir = vol.path("markers");
    fs::create_dir(&dir).unwrap();
    for i in 0..MARKERS {
        fs::write(dir.join(format!("e{i}")), if i % 10 == 9 { &b"x"[..] } else { b"" }).unwrap();
    }
    let backing_of = backing_files(vol, &dir);
    let mut files: Vec<(u64, Marker)> = (0..MARKERS)
        .map(|i| {
            let path = dir.join(format!("e{i}"));
            let ino = ino(&path);
            let backing = backing_of[&ino].clone();
            (
                ino,
                Marker {
                    path,
                    backing,
                    empty: i % 10 != 9,
                },
            )
        })
        .collect();
    m.unmount();
    // What else a backing directory may hold: a FIFO (opening it would
    // wait for a writer) and a symlink to an empty file's twin outside.
    let backing_dir = files[0].1.backing.parent().unwrap().to_owned();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        backing_dir.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    fs::copy(
        &files.iter().find(|f| f.1.empty).unwrap().1.backing,
        outside_target(vol),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside_target(vol), backing_dir.join("link")).unwrap();
    files.sort_by_key(|(ino, _)| *ino);
    files.into_iter().map(|(_, marker)| marker).collect()
}

/// A 46-byte file outside the backing directory, linked to from inside it.
fn outside_target(vol: &TestVolume) -> std::path::PathBuf {
    vol.dir.path().join("outside")
}

fn empties_resident(files: &[Marker]) -> bool {
    files.iter().filter(|f| f.empty).all(|f| resident(&f.backing))
}

fn resident_count(files: &[Marker]) -> usize {
    files.iter().filter(|f| resident(&f.backing)).count()
}

/// Mounts with `prefetch=N` (a fresh mount knows none of the files, so each
/// is checked when first shown) with the backing pages dropped.
fn mount_cold<'a>(vol: &'a TestVolume, files: &[Marker], prefetch: &str) -> crate::common::Mount<'a> {
    let m = vol.mount_with(&["-o", &format!("prefetch={prefetch}")]);
    drop_cached_pages(&vol.backing); // the symlink's target too
    assert_eq!(resident_count(files), 0, "run this test on a disk filesystem");
    m
}

/// Whatever was read ahead is still checked: every file reads as written.
fn read_back(files: &[Marker]) {
    for f in files {
        let expected: &[u8] = if f.empty { b"" } else { b"x" };
        assert_eq!(fs::read(&f.path).unwrap(), expected, "{}", f.path.display());
    }
}

#[test]
fn looking_up_empty_files_one_after_another_reads_their_final_blocks_ahead() {
    let vol = TestVolume::init();
    let files = make_markers(&vol);
    let stat = |some: &[Marker]| {
        // From the highest inode number down: the order is not what it follows.
        for f in some.iter().rev() {
            assert_eq!(
                fs::metadata(&f.path).unwrap().len(),
                u64::from(!f.empty),
                "{}",
                f.path.display()
            );
        }
    };
    // Two empty files checked start it.
    let two_empties = MARKERS
        - files
            .iter()
            .rev()
            .enumerate()
            .filter(|(_, f)| f.empty)
            .nth(1)
            .unwrap()
            .0
        - 1;
    for prefetch in ["8", "0"] {
        let m = mount_cold(&vol, &files, prefetch);
        stat(&files[two_empties..]);
        if prefetch == "8" {
            // The directory is read and the first burst asked for: the
            // empty files with the 256 lowest inode numbers (the directory
            // IV file is one of the entries too).
            assert!(eventually(|| empties_resident(&files[..250])), "not read ahead");
            assert!(
                files[..two_empties]
                    .iter()
                    .filter(|f| !f.empty)
                    .all(|f| !resident(&f.backing)),
                "a file with a byte was read ahead"
            );
            assert_eq!(resident_count(&files[260..two_empties]), 0, "more than the first burst");
            assert!(!resident(&outside_target(&vol)), "a backing symlink was followed");
            // Each file checked makes room for 4 more: 40 checks are
            // enough for the rest of the 401 entries.
            let mut empties = 0;
            let from = (0..two_empties)
                .rev()
                .find(|&i| {
                    empties += usize::from(files[i].empty);
                    empties == 40
                })
                .unwrap();
            stat(&files[from..two_empties]);
            assert!(
                eventually(|| empties_resident(&files)),
                "the next burst was not asked for"
            );
        } else {
            std::thread::sleep(std::time::Duration::from_millis(300));
            assert_eq!(resident_count(&files[..two_empties]), 0, "read ahead with prefetch=0");
        }
        read_back(&files);
        m.unmount();
    }
}

#[test]
fn listing_empty_files_reads_their_final_blocks_ahead() {
    let vol = TestVolume::init();
    let files = make_markers(&vol);
    for prefetch in ["8", "0"] {
        let m = mount_cold(&vol, &files, prefetch);
        // One small getdents: the kernel asks for one READDIRPLUS page of
        // entries (a few dozen, each checked as it is listed).
        let dir = File::open(vol.path("markers")).unwrap();
        let mut buf = [0u8; 256];
        // SAFETY: getdents64 writes at most `buf.len()` bytes into `buf`.
        let got = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                std::os::fd::AsRawFd::as_raw_fd(&dir),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        assert!(got > 0, "getdents64: {}", std::io::Error::last_os_error());
        if prefetch == "8" {
            // The first burst: about 256 files, nearly all empty.
            assert!(
                eventually(|| resident_count(&files) > 200),
                "not read ahead: {} files resident",
                resident_count(&files)
            );
        } else {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let listed = resident_count(&files);
            assert!(
                listed < 60,
                "{listed} files read with prefetch=0, not one READDIRPLUS page"
            );
        }
        drop(dir);
        read_back(&files);
        m.unmount();
    }
}

/// Damages the tag of a 46-byte backing file's final block.
fn flip_last_byte(path: &std::path::Path) {
    flip_byte(path, 45);
}

fn flip_byte(path: &std::path::Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let file = File::options().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 1], at).unwrap();
}

/// A backing file mapped shared and writable.
struct Mapping {
    _file: File,
    addr: *mut u8,
}

impl Mapping {
    fn of(path: &std::path::Path) -> Self {
        let file = File::options().read(true).write(true).open(path).unwrap();
        // SAFETY: a shared mapping of the file's first 46 bytes (one page),
        // unmapped on drop while `file` is still open.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                46,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        Mapping {
            _file: file,
            addr: addr.cast(),
        }
    }

    fn flip_last_byte(&self) {
        // SAFETY: byte 45 lies within the 46 bytes mapped.
        unsafe { *self.addr.add(45) ^= 1 };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `of`.
        unsafe { libc::munmap(self.addr.cast(), 46) };
    }
}

#[test]
fn files_authenticated_ahead_are_taken_and_damage_is_still_caught() {
    let vol = TestVolume::init();
    let files = make_markers(&vol);
    let empties: Vec<&Marker> = files.iter().filter(|f| f.empty).collect();
    // Before mounting: an empty file's final block damaged, and a file
    // with a byte cut to the length of an empty one.
    let damaged_before = empties[100];
    flip_last_byte(&damaged_before.backing);
    // And one whose header names a file id the volume has no key for.
    let unknown_id = empties[120];
    flip_byte(&unknown_id.backing, 10);
    let cut = files[..200].iter().find(|f| !f.empty).unwrap();
    File::options()
        .write(true)
        .open(&cut.backing)
        .unwrap()
        .set_len(46)
        .unwrap();
    let m = mount_cold(&vol, &files, "8");
    // A shared mapping written once (which moves the change time) and left
    // dirty: a second write through it moves no time at all.
    let mapped = Mapping::of(&empties[60].backing);
    mapped.flip_last_byte();
    mapped.flip_last_byte();
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    for f in empties.iter().rev().take(2) {
        assert_eq!(fs::metadata(&f.path).unwrap().len(), 0);
    }
    // The first burst (the 256 lowest inode numbers) is read, then
    // authenticated on the worker.
    assert!(eventually(|| empties_resident(&files[..250])), "not read ahead");
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Damaged after the worker authenticated it: its change time moved.
    let damaged_after = empties[50];
    flip_last_byte(&damaged_after.backing);
    mapped.flip_last_byte();
    let damaged = [damaged_before, damaged_after, empties[60], unknown_id, cut];
    for f in &files {
        let is_damaged = damaged.iter().any(|d| d.path == f.path);
        let len = if is_damaged { 1 } else { u64::from(!f.empty) };
        assert_eq!(fs::metadata(&f.path).unwrap().len(), len, "{}", f.path.display());
        if is_damaged {
            let err = fs::read(&f.path).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{}: {err}", f.path.display());
        }
    }
    // Removed, each file's key is erased, those taken from the worker too
    // (the FIFO and symlink make_markers left are no kmsfs entries).
    let backing_dir = files[0].backing.parent().unwrap();
    fs::remove_file(backing_dir.join("fifo")).unwrap();
    fs::remove_file(backing_dir.join("link")).unwrap();
    fs::remove_dir_all(vol.path("markers")).unwrap();
    m.unmount();
    let status = crate::common::json(&vol.run(&["status", "--json", crate::common::path_str(&vol.backing)]));
    // All but the key of the file whose header now names another id.
    assert_eq!(status["file_keys"], 1, "every removed file's key is erased: {status}");
    let log = vol.log_text();
    assert!(!log.contains("copied over"), "a taken file id was not let go:\n{log}");
    for d in damaged {
        let name = d.backing.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            log.lines()
                .any(|l| l.contains("ERROR") && l.contains(&name) && l.contains("authenticated block")),
            "{} not reported:\n{log}",
            d.path.display()
        );
    }
    let summary = log
        .lines()
        .find_map(|l| l.split_once("empty files authenticated ahead: "))
        .map(|(_, rest)| rest.to_owned())
        .unwrap_or_else(|| panic!("no summary at unmount:\n{log}"));
    let taken: usize = summary
        .rsplit_once("of which ")
        .and_then(|(_, n)| n.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    assert!(taken > 100, "lookups took {taken} results of the worker: {summary}");
}

/// An empty file shown damaged (one byte long, so that its read reaches the
/// daemon) reads as EIO even when its backing file reads well again by the
/// time of the read: answered with no data, the kernel, believing the size
/// it was shown, would pad the answer to one zero byte.
#[test]
fn an_empty_file_shown_damaged_never_reads_as_a_zero_byte() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::create_dir(vol.path("d")).unwrap();
    let path = vol.path("d/empty");
    fs::write(&path, b"").unwrap();
    let backing = backing_files(&vol, &vol.path("d"))[&ino(&path)].clone();
    m.unmount();
    let intact = fs::read(&backing).unwrap();
    let mut flipped = intact.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let m = vol.mount();
    fs::write(&backing, &flipped).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), 1, "shown damaged");
    fs::write(&backing, &intact).unwrap();
    let read = fs::read(&path);
    assert_eq!(
        read.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::EIO)),
        "{read:?}"
    );
    m.unmount();
    let m = vol.mount();
    assert_eq!(fs::read(&path).unwrap(), b"", "intact again on a new mount");
    m.unmount();
}
