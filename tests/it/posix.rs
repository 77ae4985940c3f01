//! POSIX behaviour through the mount: concurrency, rename and link semantics,
//! xattrs, fifos, permissions, times, fallocate and name limits.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;

use crate::common::{Rng, TestVolume, xattr_get, xattr_list, xattr_remove, xattr_set};

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, c(from).as_ptr(), libc::AT_FDCWD, c(to).as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

#[test]
fn concurrent_writers_on_different_files_and_on_one_file() {
    let vol = TestVolume::init();
    let _m = vol.mount();
    let shared = vol.path("shared.bin");
    File::create(&shared).unwrap();
    const CHUNK: usize = 10_000; // deliberately not block aligned: neighbours share blocks
    std::thread::scope(|s| {
        for t in 0..6u64 {
            let own = vol.path(&format!("own-{t}"));
            let shared = shared.clone();
            s.spawn(move || {
                let mut rng = Rng::new(100 + t);
                let data = rng.bytes(300_000);
                fs::write(&own, &data).unwrap();
                let f = OpenOptions::new().write(true).open(&shared).unwrap();
                for round in 0..20u64 {
                    let slot = round * 6 + t;
                    f.write_all_at(&vec![(slot % 251) as u8 + 1; CHUNK], slot * CHUNK as u64)
                        .unwrap();
                }
                assert!(fs::read(&own).unwrap() == data, "private file of thread {t}");
            });
        }
    });
    let content = fs::read(&shared).unwrap();
    assert_eq!(content.len(), 120 * CHUNK);
    for slot in 0..120usize {
        assert!(
            content[slot * CHUNK..(slot + 1) * CHUNK]
                .iter()
                .all(|&b| b == (slot % 251) as u8 + 1),
            "slot {slot}"
        );
    }
}

#[test]
fn rename_semantics() {
    let vol = TestVolume::init();
    let _m = vol.mount();
    fs::create_dir_all(vol.path("a/b")).unwrap();
    fs::create_dir(vol.path("c")).unwrap();
    fs::write(vol.path("a/one"), b"one").unwrap();
    fs::write(vol.path("c/two"), b"two").unwrap();
    // across directories
    fs::rename(vol.path("a/one"), vol.path("c/one-moved")).unwrap();
    assert_eq!(fs::read(vol.path("c/one-moved")).unwrap(), b"one");
    assert!(!vol.path("a/one").exists());
    // replacing an existing file
    fs::rename(vol.path("c/one-moved"), vol.path("c/two")).unwrap();
    assert_eq!(fs::read(vol.path("c/two")).unwrap(), b"one");
    // a directory keeps its content when moved
    fs::write(vol.path("a/b/inner"), b"inner").unwrap();
    fs::rename(vol.path("a/b"), vol.path("c/b2")).unwrap();
    assert_eq!(fs::read(vol.path("c/b2/inner")).unwrap(), b"inner");
    // onto an empty directory works, onto a non-empty one does not
    fs::create_dir(vol.path("empty")).unwrap();
    fs::rename(vol.path("c/b2"), vol.path("empty")).unwrap();
    assert_eq!(fs::read(vol.path("empty/inner")).unwrap(), b"inner");
    fs::create_dir(vol.path("d")).unwrap();
    assert_eq!(errno_of(fs::rename(vol.path("d"), vol.path("empty"))), libc::ENOTEMPTY);
    assert!(vol.path("empty/inner").exists() && vol.path("d").is_dir());
    // file onto directory and directory onto file
    assert_eq!(errno_of(fs::rename(vol.path("c/two"), vol.path("d"))), libc::EISDIR);
    assert_eq!(errno_of(fs::rename(vol.path("d"), vol.path("c/two"))), libc::ENOTDIR);
    // RENAME_NOREPLACE
    fs::write(vol.path("x"), b"x").unwrap();
    fs::write(vol.path("y"), b"y").unwrap();
    assert_eq!(
        errno_of(renameat2(&vol.path("x"), &vol.path("y"), libc::RENAME_NOREPLACE)),
        libc::EEXIST
    );
    renameat2(&vol.path("x"), &vol.path("z"), libc::RENAME_NOREPLACE).unwrap();
    // RENAME_EXCHANGE, between a file and a directory in different parents
    renameat2(&vol.path("z"), &vol.path("d"), libc::RENAME_EXCHANGE).unwrap();
    assert!(vol.path("z").is_dir());
    assert_eq!(fs::read(vol.path("d")).unwrap(), b"x");
    // a missing source
    assert_eq!(errno_of(fs::rename(vol.path("nope"), vol.path("nope2"))), libc::ENOENT);
    // long names on both sides
    let long = "R".repeat(255);
    fs::rename(vol.path("y"), vol.path(&long)).unwrap();
    fs::rename(vol.path(&long), vol.path(&format!("c/{long}"))).unwrap();
    assert_eq!(fs::read(vol.path(&format!("c/{long}"))).unwrap(), b"y");
    let mut names: Vec<_> = fs::read_dir(vol.path("c"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, vec![std::ffi::OsString::from(&long), "two".into()]);
}

#[test]
fn hard_links_share_content_and_count() {
    let vol = TestVolume::init();
    let _m = vol.mount();
    fs::create_dir(vol.path("sub")).unwrap();
    fs::write(vol.path("orig"), b"shared content").unwrap();
    fs::hard_link(vol.path("orig"), vol.path("sub/link")).unwrap();
    let long = "H".repeat(255);
    fs::hard_link(vol.path("orig"), vol.path(&long)).unwrap();
    assert_eq!(fs::metadata(vol.path("orig")).unwrap().nlink(), 3);
    assert_eq!(
        fs::metadata(vol.path("orig")).unwrap().ino(),
        fs::metadata(vol.path("sub/link")).unwrap().ino()
    );
    OpenOptions::new()
        .append(true)
        .open(vol.path("sub/link"))
        .unwrap()
        .write_all(b" and more")
        .unwrap();
    assert_eq!(fs::read(vol.path("orig")).unwrap(), b"shared content and more");
    fs::remove_file(vol.path("orig")).unwrap();
    assert_eq!(fs::read(vol.path(&long)).unwrap(), b"shared content and more");
    assert_eq!(fs::metadata(vol.path("sub/link")).unwrap().nlink(), 2);
    assert_eq!(
        errno_of(fs::hard_link(vol.path("sub/link"), vol.path(&long))),
        libc::EEXIST
    );
    // an unlinked file that is still open stays readable and writable
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(vol.path("sub/link"))
        .unwrap();
    fs::remove_file(vol.path("sub/link")).unwrap();
    fs::remove_file(vol.path(&long)).unwrap();
    f.write_all_at(b"XX", 0).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "XXared content and more");
}

#[test]
fn xattrs_on_files_and_directories() {
    let vol = TestVolume::init();
    let _m = vol.mount();
    let f = vol.path("file");
    fs::write(&f, b"").unwrap();
    fs::create_dir(vol.path("dir")).unwrap();
    for p in [f.clone(), vol.path("dir")] {
        xattr_set(&p, "user.color", b"blue", 0).unwrap();
        xattr_set(&p, "user.big", &vec![7u8; 3000], 0).unwrap();
        assert_eq!(xattr_get(&p, b"user.color").unwrap(), b"blue");
        let mut names = xattr_list(&p).unwrap();
        names.sort();
        assert_eq!(names, vec![b"user.big".to_vec(), b"user.color".to_vec()]);
        assert_eq!(
            errno_of(xattr_set(&p, "user.color", b"x", libc::XATTR_CREATE)),
            libc::EEXIST
        );
        assert_eq!(
            errno_of(xattr_set(&p, "user.none", b"x", libc::XATTR_REPLACE)),
            libc::ENODATA
        );
        xattr_set(&p, "user.color", b"red", libc::XATTR_REPLACE).unwrap();
        assert_eq!(xattr_get(&p, b"user.color").unwrap(), b"red");
        xattr_remove(&p, "user.color").unwrap();
        assert_eq!(errno_of(xattr_get(&p, b"user.color")), libc::ENODATA);
        assert_eq!(errno_of(xattr_remove(&p, "user.color")), libc::ENODATA);
        // The kernel itself refuses trusted.* to a caller without CAP_SYS_ADMIN.
        let refused = if unsafe { libc::geteuid() } == 0 {
            libc::EOPNOTSUPP
        } else {
            libc::EPERM
        };
        assert_eq!(errno_of(xattr_set(&p, "trusted.x", b"v", 0)), refused);
        // A namespace kmsfs does not keep is unsupported, not merely empty:
        // `ls -l` then stops asking for the SELinux label of every file.
        assert_eq!(errno_of(xattr_get(&p, b"security.selinux")), libc::EOPNOTSUPP);
        assert_eq!(errno_of(xattr_remove(&p, "security.selinux")), libc::EOPNOTSUPP);
    }
    // a too-small buffer is ERANGE
    let cpath = c(&f);
    let name = CString::new("user.big").unwrap();
    let mut small = [0u8; 10];
    let rc = unsafe { libc::getxattr(cpath.as_ptr(), name.as_ptr(), small.as_mut_ptr().cast(), small.len()) };
    assert_eq!(rc, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ERANGE));
    // xattrs survive writes, renames and a remount
    fs::write(&f, b"content now").unwrap();
    fs::rename(&f, vol.path("dir/moved")).unwrap();
    assert_eq!(xattr_get(&vol.path("dir/moved"), b"user.big").unwrap(), vec![7u8; 3000]);
}

/// `-o noxattr`: every xattr call fails with EOPNOTSUPP (the kernel stops
/// asking after the first), files work as before, and the attributes stored
/// earlier are back after a remount without the option.
#[test]
fn noxattr_refuses_extended_attributes_and_keeps_the_stored_ones() {
    let vol = TestVolume::init();
    let f = vol.path("file");
    let m = vol.mount();
    fs::write(&f, b"data").unwrap();
    xattr_set(&f, "user.kept", b"yes", 0).unwrap();
    m.unmount();

    let m = vol.mount_with(&["-o", "noxattr"]);
    for _ in 0..2 {
        assert_eq!(errno_of(xattr_get(&f, b"user.kept")), libc::EOPNOTSUPP);
        assert_eq!(errno_of(xattr_list(&f)), libc::EOPNOTSUPP);
        assert_eq!(errno_of(xattr_set(&f, "user.new", b"v", 0)), libc::EOPNOTSUPP);
        assert_eq!(errno_of(xattr_remove(&f, "user.kept")), libc::EOPNOTSUPP);
    }
    let mut file = OpenOptions::new().append(true).open(&f).unwrap();
    file.write_all(b" more").unwrap();
    drop(file);
    std::os::unix::fs::chown(&f, Some(1234), Some(1234)).unwrap();
    assert_eq!(fs::metadata(&f).unwrap().uid(), 1234);
    assert_eq!(fs::read(&f).unwrap(), b"data more");
    m.unmount();

    let _m = vol.mount();
    assert_eq!(xattr_get(&f, b"user.kept").unwrap(), b"yes");
    assert_eq!(xattr_list(&f).unwrap(), vec![b"user.kept".to_vec()]);
}

#[test]
fn fifos_symlinks_and_mknod() {
    let vol = TestVolume::init();
    let _m = vol.mount();
    let fifo = vol.path("pipe");
    let rc = unsafe { libc::mkfifo(c(&fifo).as_ptr(), 0o644) };
    assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::metadata(&fifo).unwrap().file_type()
    ));
    let writer = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::write(fifo, b"through the pipe").unwrap())
    };
    assert_eq!(fs::read(&fifo).unwrap(), b"through the pipe");
    writer.join().unwrap();
    // mknod of a regular file
    let reg = vol.path("mknod-reg");
    assert_eq!(unsafe { libc::mknod(c(&reg).as_ptr(), libc::S_IFREG | 0o600, 0) }, 0);
    assert_eq!(fs::metadata(&reg).unwrap().len(), 0);
    assert_eq!(fs::metadata(&reg).unwrap().permissions().mode() & 0o777, 0o600);
    // symlinks: relative, absolute, long target, dangling
    fs::write(vol.path("target"), b"t").unwrap();
    std::os::unix::fs::symlink("target", vol.path("rel")).unwrap();
    assert_eq!(fs::read(vol.path("rel")).unwrap(), b"t");
    let long_target = format!("/{}", "segment/".repeat(300));
    std::os::unix::fs::symlink(&long_target, vol.path("long")).unwrap();
    assert_eq!(fs::read_link(vol.path("long")).unwrap().to_str().unwrap(), long_target);
    assert_eq!(
        fs::symlink_metadata(vol.path("long")).unwrap().len(),
        long_target.len() as u64
    );
    std::os::unix::fs::symlink("does/not/exist", vol.path("dangling")).unwrap();
    assert_eq!(errno_of(fs::read(vol.path("dangling"))), libc::ENOENT);
    assert_eq!(errno_of(std::os::unix::fs::symlink("x", vol.path("rel"))), libc::EEXIST);
}

/// Device nodes are kept as what they are (root only: the backing mknod
/// needs CAP_MKNOD); the mount is nodev unless `-o dev`.
#[test]
fn device_nodes_with_and_without_dev() {
    if unsafe { libc::geteuid() } != 0 {
        return; // making device nodes needs root, here as on any filesystem
    }
    use std::os::unix::fs::FileTypeExt;
    let vol = TestVolume::init();
    let null = vol.path("null");
    let disk = vol.path("disk");
    let m = vol.mount();
    let dev_null = libc::makedev(1, 3);
    assert_eq!(
        unsafe { libc::mknod(c(&null).as_ptr(), libc::S_IFCHR | 0o666, dev_null) },
        0
    );
    assert_eq!(
        unsafe { libc::mknod(c(&disk).as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(7, 200)) },
        0
    );
    let meta = fs::metadata(&null).unwrap();
    assert!(meta.file_type().is_char_device());
    assert_eq!(std::os::unix::fs::MetadataExt::rdev(&meta), dev_null);
    assert!(fs::metadata(&disk).unwrap().file_type().is_block_device());
    assert_eq!(errno_of(fs::write(&null, b"x")), libc::EACCES, "nodev by default");
    m.unmount();
    let _m = vol.mount_with(&["-o", "dev,suid"]);
    fs::write(&null, b"into /dev/null").unwrap();
    assert_eq!(fs::read(&null).unwrap(), b"");
}

#[test]
fn permissions_owners_times_and_limits() {
    let vol = TestVolume::init();
    let _m = vol.mount_with(&["-o", "allow_other"]);
    // A new volume's root is its owner's alone (0700); open it to others.
    fs::set_permissions(&vol.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    let secret = vol.path("secret");
    fs::write(&secret, b"private").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::metadata(&secret).unwrap().permissions().mode() & 0o7777, 0o600);
    let as_nobody = |args: &[&str]| {
        std::process::Command::new(args[0])
            .args(&args[1..])
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let denied = as_nobody(&["cat", secret.to_str().unwrap()]);
    assert!(!denied.status.success(), "nobody read a 0600 root file");
    std::os::unix::fs::chown(&secret, Some(65534), Some(65534)).unwrap();
    assert_eq!(fs::metadata(&secret).unwrap().uid(), 65534);
    let allowed = as_nobody(&["cat", secret.to_str().unwrap()]);
    assert_eq!(allowed.stdout, b"private");
    // files created by another user belong to that user
    fs::set_permissions(&vol.mnt, fs::Permissions::from_mode(0o777)).unwrap();
    let made = as_nobody(&["touch", vol.path("by-nobody").to_str().unwrap()]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    assert_eq!(fs::metadata(vol.path("by-nobody")).unwrap().uid(), 65534);
    // mkdir mode is reported at once
    let d = vol.path("odd-mode");
    assert_eq!(unsafe { libc::mkdir(c(&d).as_ptr(), 0o151) }, 0);
    assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o7777, 0o151);
    // times
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_000_000_000, 123_456_789);
    let f = File::options().write(true).open(&secret).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
    let md = fs::metadata(&secret).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_000_000_000, 123_456_789));
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 123_456_789));
    // names: 255 bytes work, 256 are refused with ENAMETOOLONG
    fs::write(vol.path(&"n".repeat(255)), b"ok").unwrap();
    assert_eq!(
        errno_of(fs::write(vol.path(&"n".repeat(256)), b"no")),
        libc::ENAMETOOLONG
    );
    assert_eq!(errno_of(fs::create_dir(vol.path(&"d".repeat(256)))), libc::ENAMETOOLONG);
    // rmdir of a non-empty directory
    fs::create_dir(vol.path("full")).unwrap();
    fs::write(vol.path("full/x"), b"").unwrap();
    assert_eq!(errno_of(fs::remove_dir(vol.path("full"))), libc::ENOTEMPTY);
    fs::remove_file(vol.path("full/x")).unwrap();
    fs::remove_dir(vol.path("full")).unwrap();
    // statfs answers
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c(&vol.mnt).as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > 0 && st.f_namemax == 255);
}

#[test]
fn fallocate_and_sparse_files() {
    let vol = TestVolume::init();
    let _m = vol.mount();
    let p = vol.path("alloc");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.write_all_at(b"head", 0).unwrap();
    use std::os::fd::AsRawFd;
    assert_eq!(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 100_000) }, 0);
    assert_eq!(fs::metadata(&p).unwrap().len(), 100_000);
    assert_eq!(
        unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, 500_000) },
        0
    );
    assert_eq!(fs::metadata(&p).unwrap().len(), 100_000);
    let punch = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        )
    };
    assert_eq!(punch, -1, "hole punching is not supported");
    let data = fs::read(&p).unwrap();
    assert_eq!(&data[..4], b"head");
    assert!(data[4..].iter().all(|&b| b == 0));
    // a sparse file: a write far beyond the end leaves a hole that reads as zeros
    let s = vol.path("sparse");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&s)
        .unwrap();
    f.write_all_at(b"end", 50 << 20).unwrap();
    let md = fs::metadata(&s).unwrap();
    assert_eq!(md.len(), (50 << 20) + 3);
    assert!(
        md.blocks() * 512 < 1 << 20,
        "the hole takes no space: {} blocks",
        md.blocks()
    );
    let mut buf = vec![1u8; 8192];
    f.read_exact_at(&mut buf, 20 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}
