//! POSIX details that conformance suites check: long paths and names,
//! symlink targets near PATH_MAX, timestamps, hard-link counts and ctime,
//! fstat after unlink/replace, SEEK_HOLE/SEEK_DATA, open flags, mmap, and
//! files beyond 4 GiB.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use crate::common::{self, TestVolume, stderr};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

#[test]
fn paths_near_path_max_and_255_byte_names_everywhere() {
    let vol = TestVolume::init();
    let _m = vol.mount();
    let prefix = vol.mnt.as_os_str().len();
    let mut dir = vol.mnt.clone();
    let mut level = 0;
    // Directories of 255-byte names until the path is close to PATH_MAX.
    while dir.as_os_str().len() + 2 * 256 < 4000 {
        dir = dir.join(format!("{level:03}{}", "d".repeat(252)));
        fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("mkdir at depth {level} ({} bytes): {e}", dir.as_os_str().len()));
        level += 1;
    }
    assert!(
        dir.as_os_str().len() - prefix > 3000,
        "deep enough: {}",
        dir.as_os_str().len()
    );
    let file = dir.join("f".repeat(255));
    fs::write(&file, b"deep").unwrap();
    let renamed = dir.join("r".repeat(255));
    fs::rename(&file, &renamed).unwrap();
    let linked = dir.join("l".repeat(255));
    fs::hard_link(&renamed, &linked).unwrap();
    let sym = dir.join("s".repeat(255));
    std::os::unix::fs::symlink("r".repeat(255), &sym).unwrap();
    assert_eq!(fs::read(&sym).unwrap(), b"deep");
    assert_eq!(fs::metadata(&linked).unwrap().nlink(), 2);
    fs::remove_file(&renamed).unwrap();
    fs::remove_file(&sym).unwrap();
    assert_eq!(fs::read(&linked).unwrap(), b"deep");
    fs::remove_file(&linked).unwrap();
    assert!(fs::read_dir(&dir).unwrap().next().is_none());
}

#[test]
fn symlink_targets_near_path_max() {
    let vol = TestVolume::init();
    let m = vol.mount();
    let target: String = (0..4000)
        .map(|i| {
            if i % 50 == 0 {
                '/'
            } else {
                (b'a' + (i % 26) as u8) as char
            }
        })
        .collect();
    std::os::unix::fs::symlink(&target, vol.path("long")).unwrap();
    fs::hard_link(vol.path("long"), vol.path("long-link")).unwrap();
    assert_eq!(fs::read_link(vol.path("long")).unwrap().to_str().unwrap(), target);
    assert_eq!(fs::symlink_metadata(vol.path("long")).unwrap().len(), 4000);
    let too_long = "x".repeat(4096);
    assert_eq!(
        std::os::unix::fs::symlink(&too_long, vol.path("too-long"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENAMETOOLONG)
    );
    m.unmount();
    let m = vol.mount();
    assert_eq!(fs::read_link(vol.path("long-link")).unwrap().to_str().unwrap(), target);
    fs::remove_file(vol.path("long")).unwrap();
    assert_eq!(
        fs::read_link(vol.path("long-link")).unwrap().to_str().unwrap(),
        target,
        "the other link keeps the target"
    );
    fs::remove_file(vol.path("long-link")).unwrap();
    m.unmount();
    let db = rusqlite::Connection::open(vol.backing.join("kmsfs.db")).unwrap();
    let rows: u64 = db
        .query_row("SELECT count(*) FROM link_targets", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0, "the long target is erased with the last link");
}

#[test]
fn timestamps_links_ctime_and_fstat_after_unlink_or_replace() {
    let vol = TestVolume::init();
    let _m = vol.mount();
    let p = vol.path("t");
    fs::write(&p, b"x").unwrap();
    // UTIME_OMIT keeps a time, UTIME_NOW sets it to now.
    let set = |atime: libc::timespec, mtime: libc::timespec| {
        let times = [atime, mtime];
        assert_eq!(
            unsafe { libc::utimensat(libc::AT_FDCWD, c(&p).as_ptr(), times.as_ptr(), 0) },
            0
        );
    };
    let ts = |sec, nsec| libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    set(ts(1_000_000_000, 5), ts(1_100_000_000, 7));
    set(ts(0, libc::UTIME_OMIT), ts(1_200_000_000, 9));
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 5));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_200_000_000, 9));
    set(ts(0, libc::UTIME_NOW), ts(0, libc::UTIME_OMIT));
    let md = fs::metadata(&p).unwrap();
    assert!(md.atime() > 1_600_000_000 && md.mtime() == 1_200_000_000);
    // nlink and ctime through hard links
    let before = fs::metadata(&p).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::hard_link(&p, vol.path("t2")).unwrap();
    let after = fs::metadata(&p).unwrap();
    assert_eq!(after.nlink(), 2);
    assert!(
        (after.ctime(), after.ctime_nsec()) > (before.ctime(), before.ctime_nsec()),
        "link changes ctime"
    );
    // fstat of an open file after its last name is gone, and after being replaced
    let f = File::open(vol.path("t2")).unwrap();
    fs::remove_file(&p).unwrap();
    fs::remove_file(vol.path("t2")).unwrap();
    let md = f.metadata().unwrap();
    assert_eq!((md.nlink(), md.len()), (0, 1));
    fs::write(vol.path("a"), b"old content").unwrap();
    fs::write(vol.path("b"), b"new").unwrap();
    let old = File::open(vol.path("a")).unwrap();
    fs::rename(vol.path("b"), vol.path("a")).unwrap();
    assert_eq!(old.metadata().unwrap().len(), 11);
    let mut s = String::new();
    std::io::Read::read_to_string(&mut &old, &mut s).unwrap();
    assert_eq!(s, "old content");
    assert_eq!(fs::read(vol.path("a")).unwrap(), b"new");
}

#[test]
fn open_flags_seek_hole_data_mmap_and_files_beyond_4_gib() {
    let vol = TestVolume::init();
    // Exact holes need the daemon to see every write at once.
    let _m = vol.mount_with(&["-o", "no_writeback_cache"]);
    let p = vol.path("flags");
    fs::write(&p, b"0123456789").unwrap();
    assert_eq!(
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EEXIST)
    );
    OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(b"ab")
        .unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"0123456789ab");
    OpenOptions::new().write(true).truncate(true).open(&p).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);

    // SEEK_DATA / SEEK_HOLE
    let s = vol.path("sparse");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&s)
        .unwrap();
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    f.write_all_at(&[2u8; 4096], 1 << 20).unwrap();
    let seek = |off: i64, whence| unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    let hole = seek(0, libc::SEEK_HOLE);
    assert!(
        (4096..(1 << 20)).contains(&hole),
        "first hole after the first block: {hole}"
    );
    let data = seek(8192, libc::SEEK_DATA);
    assert!(data > 8192 && data <= 1 << 20, "next data at or before 1 MiB: {data}");
    let mut buf = vec![9u8; (data - 8192) as usize];
    f.read_exact_at(&mut buf, 8192).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "nothing but zeros is skipped");
    assert_eq!(
        seek((1 << 20) + 100, libc::SEEK_HOLE),
        (1 << 20) + 4096,
        "the end of the file is a hole"
    );
    assert_eq!(seek(2 << 20, libc::SEEK_DATA), -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ENXIO));

    // mmap: a shared writable mapping, then a read through read(2)
    let m = vol.path("mapped");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&m)
        .unwrap();
    f.set_len(3 * 4096 + 10).unwrap();
    f.write_all_at(b"hello mmap", 4096).unwrap();
    unsafe {
        let len = 3 * 4096 + 10;
        let ptr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        let bytes = std::slice::from_raw_parts_mut(ptr as *mut u8, len);
        assert_eq!(&bytes[4096..4106], b"hello mmap", "mmap read");
        bytes[2 * 4096..2 * 4096 + 5].copy_from_slice(b"WRITE");
        assert_eq!(libc::msync(ptr, len, libc::MS_SYNC), 0);
        libc::munmap(ptr, len);
    }
    drop(f);
    let got = fs::read(&m).unwrap();
    assert_eq!(
        &got[2 * 4096..2 * 4096 + 5],
        b"WRITE",
        "shared-mmap write reached the file"
    );
    assert_eq!(&got[4096..4106], b"hello mmap");

    // A sparse file beyond 4 GiB
    let big = vol.path("big");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&big)
        .unwrap();
    f.write_all_at(b"the end", 5 << 30).unwrap();
    assert_eq!(fs::metadata(&big).unwrap().len(), (5 << 30) + 7);
    let mut tail = [0u8; 7];
    f.read_exact_at(&mut tail, 5 << 30).unwrap();
    assert_eq!(&tail, b"the end");
    let mut middle = vec![1u8; 8192];
    f.read_exact_at(&mut middle, (4 << 30) + 12345).unwrap();
    assert!(middle.iter().all(|&b| b == 0));
}

#[test]
fn with_the_writeback_cache_seek_hole_never_skips_unwritten_data() {
    let vol = TestVolume::init();
    let _m = vol.mount();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(vol.path("sparse"))
        .unwrap();
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    f.write_all_at(&[2u8; 4096], 1 << 20).unwrap();
    let seek = |off: i64, whence| unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    let size = (1 << 20) + 4096;
    // Whatever the kernel has not written back yet, no data is reported as a hole.
    let hole = seek(0, libc::SEEK_HOLE);
    assert!(hole == size || (4096..(1 << 20)).contains(&hole), "hole at {hole}");
    let data = seek(8192, libc::SEEK_DATA);
    assert!((8192..=(1 << 20)).contains(&data), "data at {data}");
    assert_eq!(seek(size, libc::SEEK_DATA), -1, "ENXIO at the end");
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 2));
}

/// Runs `sh -c script` as uid 1000 with `path` as `$1`; its output.
fn as_uid_1000(script: &str, path: &Path) -> String {
    let out = common::run_as(1000, script, path);
    assert!(out.status.success(), "{script} as uid 1000: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The kernel leaves clearing set-ID bits to the daemon (FUSE_HANDLE_KILLPRIV_V2).
#[test]
fn writes_and_truncation_by_a_non_root_owner_clear_set_id_bits() {
    use std::os::unix::fs::PermissionsExt;
    let vol = TestVolume::init();
    let _m = vol.mount_shared("allow_other");
    let p = vol.path("setid");
    fs::write(&p, b"x").unwrap();
    std::os::unix::fs::chown(&p, Some(1000), Some(1000)).unwrap();
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let as_user = |script: &str| as_uid_1000(script, &p);

    fs::set_permissions(&p, fs::Permissions::from_mode(0o6755)).unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(b"root")
        .unwrap();
    assert_eq!(mode(&p), 0o6755, "root (CAP_FSETID) keeps the bits");

    as_user(r#"printf y >> "$1""#);
    // The daemon clears the bits here (FUSE_HANDLE_KILLPRIV_V2) and tells
    // the kernel: a statx asking for the mode alone, which the write's own
    // invalidation (size and times) would not send to the daemon, sees it.
    let mode_alone = rustix::fs::statx(
        rustix::fs::CWD,
        &p,
        rustix::fs::AtFlags::empty(),
        rustix::fs::StatxFlags::MODE,
    )
    .unwrap()
    .stx_mode as u32;
    assert_eq!(mode_alone & 0o7777, 0o755, "the kernel's cached mode after the write");
    assert_eq!(mode(&p), 0o755, "a write by the owner clears both bits");
    assert_eq!(fs::read(&p).unwrap(), b"xrooty");

    fs::set_permissions(&p, fs::Permissions::from_mode(0o6745)).unwrap();
    as_user(r#"truncate -s 1 "$1""#);
    assert_eq!(
        mode(&p),
        0o2745,
        "truncation clears set-user-ID; set-group-ID stays without group exec"
    );
    assert_eq!(fs::read(&p).unwrap(), b"x");

    fs::set_permissions(&p, fs::Permissions::from_mode(0o6755)).unwrap();
    as_user(r#"fallocate --punch-hole -o 0 -l 4096 "$1" 2>/dev/null || true"#);
    assert_eq!(
        mode(&p),
        0o6755,
        "an fallocate refused (punching holes) changes nothing"
    );
    as_user(r#"fallocate -l 8192 "$1""#);
    assert_eq!(mode(&p), 0o755, "an fallocate by the owner clears both bits");
    assert_eq!(fs::metadata(&p).unwrap().len(), 8192);
}

/// On a `suid` mount a set-user-ID program that another user writes to
/// loses the bit for `exec` too, not only for `stat`: the kernel clears it
/// there before the data is written, so no `exec` sees the new content
/// with the old mode (cleared by the daemon, the kernel's cached mode ran
/// the changed program as its owner until the attribute timeout).
#[test]
fn a_set_user_id_program_written_by_another_user_stops_running_as_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let vol = TestVolume::init();
    let _m = vol.mount_shared("allow_other,suid");
    let program = vol.path("id");
    fs::copy("/usr/bin/id", &program).unwrap();
    std::os::unix::fs::chown(&program, Some(1001), Some(1001)).unwrap();
    fs::set_permissions(&program, fs::Permissions::from_mode(0o4757)).unwrap();
    let as_user = |script: &str| as_uid_1000(script, &program);
    assert!(as_user(r#""$1""#).contains("euid=1001"), "runs as its owner");
    // Bytes appended to a program change nothing it runs.
    as_user(r#"printf x >> "$1""#);
    let after = as_user(r#""$1""#);
    assert!(!after.contains("euid="), "runs as its caller after the write: {after}");
    assert_eq!(fs::metadata(&program).unwrap().permissions().mode() & 0o7777, 0o757);
}

/// A new file is open for writing whatever mode it was created with, and
/// `O_EXCL` refuses existing names, both on a default mount (the root
/// daemon's: no OPEN requests, no permission checks in the kernel) and with
/// `allow_other` (the kernel checks permissions, and other users come in).
/// New entries belong to their creator, with the group of a set-group-ID
/// parent directory.
#[test]
fn new_files_open_whatever_their_mode_and_get_the_right_owner() {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let vol = TestVolume::init();
    fs::set_permissions(vol.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for options in [&[][..], &["-o", "allow_other"][..]] {
        let m = vol.mount_with(options);
        fs::set_permissions(&vol.mnt, fs::Permissions::from_mode(0o755)).unwrap();
        let dir = vol.path("new");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let p = dir.join("readonly");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&p)
            .unwrap();
        f.write_all(b"written").unwrap();
        drop(f);
        assert_eq!(fs::read(&p).unwrap(), b"written", "{options:?}");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o7777, 0o444);
        let again = fs::OpenOptions::new().write(true).create_new(true).open(&p);
        assert_eq!(again.unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
        if !options.is_empty() {
            // Another user (only allow_other lets one in).
            let q = dir.join("theirs");
            // The shell creates with O_CREAT|O_EXCL (set -C) and mode
            // 0666 & ~umask = 0444.
            let ok = common::run_as(1000, r#"umask 222; set -C; printf mine > "$1""#, &q)
                .status
                .success();
            assert!(ok, "uid 1000 creates a 0444 file and writes it");
            assert_eq!(fs::read(&q).unwrap(), b"mine");
            assert_eq!(fs::metadata(&q).unwrap().uid(), 1000);
            assert_eq!(fs::metadata(&q).unwrap().permissions().mode() & 0o7777, 0o444);
            // In a set-group-ID directory new entries take its group.
            let shared = dir.join("shared");
            fs::create_dir(&shared).unwrap();
            std::os::unix::fs::chown(&shared, None, Some(2000)).unwrap();
            fs::set_permissions(&shared, fs::Permissions::from_mode(0o2777)).unwrap();
            fs::write(shared.join("root's"), b"r").unwrap();
            let ok = common::run_as(1000, r#"printf u > "$1/user's""#, &shared)
                .status
                .success();
            assert!(ok, "uid 1000 creates in a set-group-ID directory");
            for (name, uid) in [("root's", 0), ("user's", 1000)] {
                let meta = fs::metadata(shared.join(name)).unwrap();
                assert_eq!((meta.uid(), meta.gid()), (uid, 2000), "{name}");
            }
        }
        fs::remove_dir_all(&dir).unwrap();
        m.unmount();
    }
}

/// With the kernel keeping listings (`cache_dir`, long TTLs), every change
/// made through the mount shows in the next listing: creates, renames
/// within and across directories, unlinks, mkdir/rmdir, hard links.
#[test]
fn cached_listings_follow_every_change_made_through_the_mount() {
    let vol = TestVolume::init();
    let m = vol.mount_with(&["-o", "cache_dir,attr_timeout=60"]);
    let names = |dir: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(vol.path(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    std::fs::create_dir(vol.path("d")).unwrap();
    std::fs::create_dir(vol.path("e")).unwrap();
    std::fs::write(vol.path("d/a"), b"a").unwrap();
    assert_eq!(names("d"), ["a"]);
    assert_eq!(names("d"), ["a"], "read again from the cache");
    std::fs::write(vol.path("d/b"), b"b").unwrap();
    assert_eq!(names("d"), ["a", "b"]);
    std::fs::rename(vol.path("d/a"), vol.path("d/c")).unwrap();
    assert_eq!(names("d"), ["b", "c"]);
    std::fs::rename(vol.path("d/b"), vol.path("e/b")).unwrap();
    assert_eq!((names("d"), names("e")), (vec!["c".to_string()], vec!["b".to_string()]));
    std::fs::hard_link(vol.path("d/c"), vol.path("e/link")).unwrap();
    assert_eq!(names("e"), ["b", "link"]);
    assert_eq!(std::fs::metadata(vol.path("d/c")).unwrap().nlink(), 2);
    std::fs::remove_file(vol.path("d/c")).unwrap();
    assert!(names("d").is_empty());
    assert_eq!(std::fs::metadata(vol.path("e/link")).unwrap().nlink(), 1);
    std::fs::create_dir(vol.path("d/sub")).unwrap();
    assert_eq!(names("d"), ["sub"]);
    std::fs::remove_dir(vol.path("d/sub")).unwrap();
    assert!(names("d").is_empty());
    assert_eq!(std::fs::read(vol.path("e/link")).unwrap(), b"a");
    m.unmount();
    let m = vol.mount();
    assert_eq!(names("e"), ["b", "link"]);
    m.unmount();
}

/// A terminal ioctl on a file (Python's `open` asks `isatty`) gets ENOTTY,
/// as on a disk filesystem, and leaves no line in the daemon's log.
#[test]
fn terminal_ioctls_answer_enotty_without_a_log_line() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::write(vol.path("f"), b"x").unwrap();
    let f = fs::File::open(vol.path("f")).unwrap();
    let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: TCGETS writes one termios into the buffer given.
    let asked = unsafe { libc::ioctl(f.as_raw_fd(), libc::TCGETS, termios.as_mut_ptr()) };
    assert_eq!(asked, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ENOTTY));
    drop(f);
    m.unmount();
    assert!(!vol.log_text().contains("ioctl"), "{}", vol.log_text());
}
