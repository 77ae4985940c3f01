//! The files kmsfs itself keeps in the backing directory (the metadata DB,
//! the lock, the pending keys) as an attacker may leave them: symlinks out
//! of the directory, FIFOs, devices, huge or garbage files are refused or
//! set aside, never followed, waited on or read without end.

use crate::common;

use std::fs;
use std::time::{Duration, Instant};

use crate::common::{TestVolume, path_str, said};

#[test]
fn files_kmsfs_writes_in_the_backing_directory_are_never_followed_through_symlinks() {
    let vol = TestVolume::init();
    let outside = vol.dir.path().join("victim");
    fs::write(&outside, b"precious").unwrap();
    let lock = vol.backing.join("kmsfs.lock");
    let _ = fs::remove_file(&lock);
    std::os::unix::fs::symlink(&outside, &lock).unwrap();
    let pending = vol.backing.join("kmsfs.pending-keys");
    std::os::unix::fs::symlink(&outside, &pending).unwrap();
    for args in [
        vec!["mount", path_str(&vol.backing), path_str(&vol.mnt)],
        vec!["fsck", path_str(&vol.backing)],
        vec!["status", path_str(&vol.backing)],
    ] {
        let out = vol.run(&args);
        if args[0] != "status" {
            assert!(!out.status.success(), "{args:?} went through the symlinked lock file");
            assert!(String::from_utf8_lossy(&out.stderr).contains("kmsfs.lock"), "{args:?}");
        }
    }
    assert_eq!(fs::read(&outside).unwrap(), b"precious", "a file outside was written");
    assert!(!common::is_mounted(&vol.mnt));
}

/// A `kmsfs.db` that is a symlink (here to another volume's DB on the same
/// keystore, which the mount would otherwise write keys into) is refused.
#[test]
fn a_db_symlinked_out_of_the_backing_directory_is_refused() {
    let vol = TestVolume::init();
    let other = TestVolume::init();
    let db = vol.backing.join("kmsfs.db");
    fs::remove_file(&db).unwrap();
    std::os::unix::fs::symlink(other.backing.join("kmsfs.db"), &db).unwrap();
    let before = fs::read(other.backing.join("kmsfs.db")).unwrap();
    for args in [
        vec!["mount", path_str(&vol.backing), path_str(&vol.mnt)],
        vec!["fsck", path_str(&vol.backing)],
        vec!["status", path_str(&vol.backing)],
    ] {
        let out = vol.run(&args);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {}", common::stderr(&out));
        assert!(
            common::stderr(&out).contains("not a regular file"),
            "{args:?}: {}",
            common::stderr(&out)
        );
    }
    assert!(!common::is_mounted(&vol.mnt));
    assert_eq!(
        fs::read(other.backing.join("kmsfs.db")).unwrap(),
        before,
        "the other DB is untouched"
    );
    // A FIFO (size 0) is named for what it is, not as a DB cut to 0 bytes.
    fs::remove_file(&db).unwrap();
    let c = std::ffi::CString::new(path_str(&db)).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let out = vol.run(&["status", path_str(&vol.backing)]);
    assert_eq!(out.status.code(), Some(4), "{}", common::stderr(&out));
    assert!(
        common::stderr(&out).contains("not a regular file"),
        "{}",
        common::stderr(&out)
    );
}

/// A `kmsfs.pending-keys` that is not one (a FIFO a reader would wait on
/// forever, a device or a huge file it would read without end, garbage) is
/// set aside with a log line, and the volume mounts at once. Keys in it
/// are not stored: `status` and `fsck` say so until it is removed.
#[test]
fn a_pending_keys_file_that_is_not_one_is_set_aside() {
    let vol = TestVolume::init();
    let pending = vol.backing.join("kmsfs.pending-keys");
    let aside = vol.backing.join("kmsfs.pending-keys.unreadable");
    let fifo = |p: &std::path::Path| {
        let c = std::ffi::CString::new(path_str(p)).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    };
    let device = |p: &std::path::Path| {
        let c = std::ffi::CString::new(path_str(p)).unwrap();
        assert_eq!(
            unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 5)) },
            0
        );
    };
    let huge = |p: &std::path::Path| fs::File::create(p).unwrap().set_len(4 << 30).unwrap();
    let garbage = |p: &std::path::Path| fs::write(p, b"{not json").unwrap();
    type Maker<'a> = &'a dyn Fn(&std::path::Path);
    let makers: [(&str, Maker); 4] = [
        ("a FIFO", &fifo),
        ("a device", &device),
        ("a 4 GiB file", &huge),
        ("garbage", &garbage),
    ];
    for (what, make) in makers {
        make(&pending);
        let start = Instant::now();
        let m = vol.mount();
        assert!(start.elapsed() < Duration::from_secs(20), "{what}: mounted at once");
        assert!(!pending.exists() && aside.exists(), "{what}: set aside");
        let out = vol.run(&["status", "--json", path_str(&vol.backing)]);
        assert_eq!(out.status.code(), Some(7), "{what}: {}", said(&out));
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            status["set_aside_keys_files"],
            serde_json::json!([aside]),
            "{what}: {status}"
        );
        assert_eq!(status["safe_to_copy"], false, "{what}: {status}");
        assert!(
            status["failing"]
                .as_str()
                .is_some_and(|f| f.contains("set aside unstored")),
            "{what}: {status}"
        );
        m.unmount();
        assert!(
            vol.log_text().contains("is not a pending-keys file kmsfs wrote"),
            "{what}"
        );
        let out = vol.run(&["status", path_str(&vol.backing)]);
        assert_eq!(out.status.code(), Some(7), "{what}: {}", said(&out));
        assert!(said(&out).contains("set aside unstored"), "{what}: {}", said(&out));
        let out = vol.run(&["fsck", "--repair", "--json", path_str(&vol.backing)]);
        assert_eq!(out.status.code(), Some(12), "{what}: {}", said(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let problem = &report["problems"][0];
        assert_eq!(
            (&problem["kind"], &problem["backing"]),
            (&"set_aside_keys".into(), &"kmsfs.pending-keys.unreadable".into()),
            "{what}: {report}"
        );
        assert!(aside.exists(), "{what}: left for a person to look at");
        fs::remove_file(&aside).unwrap();
        let out = vol.run(&["status", "--json", path_str(&vol.backing)]);
        assert!(out.status.success(), "{what}: {}", said(&out));
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["safe_to_copy"], true, "{what}: {status}");
    }
}

/// Only the DB's own name may not be a symlink: a volume reached through a
/// symlinked path (the user's choice) opens.
#[test]
fn a_volume_reached_through_a_symlinked_path_opens() {
    let vol = TestVolume::init();
    let link = vol.dir.path().join("link");
    std::os::unix::fs::symlink(&vol.backing, &link).unwrap();
    for args in [
        vec!["status", path_str(&link)],
        vec!["fsck", path_str(&link)],
        vec!["fsck", "--repair", path_str(&link)],
    ] {
        let out = vol.run(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", common::stderr(&out));
    }
    // A repair to make through it works too: a leftover temporary goes.
    let leftover = vol.backing.join("kmsfs.tmp.0123456789abcdef");
    fs::create_dir(&leftover).unwrap();
    let out = vol.run(&["fsck", "--repair", path_str(&link)]);
    assert_eq!(out.status.code(), Some(11), "{}", common::stderr(&out));
    assert!(!leftover.exists());
}

/// A file kmsfs writes in place (the lock file, the DB's `-shm`, `-wal`)
/// that also has a name outside the volume (a hard link) is refused: the
/// outside file is never written.
#[test]
fn files_kmsfs_writes_with_other_names_are_refused() {
    let vol = TestVolume::init();
    let outside = vol.dir.path().join("victim");
    for name in ["kmsfs.lock", "kmsfs.db-shm", "kmsfs.db-wal"] {
        fs::write(&outside, b"precious").unwrap();
        let inside = vol.backing.join(name);
        let _ = fs::remove_file(&inside);
        fs::hard_link(&outside, &inside).unwrap();
        let out = vol.run(&["mount", path_str(&vol.backing), path_str(&vol.mnt)]);
        let fsck = vol.run(&["fsck", path_str(&vol.backing)]);
        fs::remove_file(&inside).unwrap();
        assert!(!common::is_mounted(&vol.mnt));
        assert!(!out.status.success(), "{name}: mounted");
        assert!(
            common::stderr(&out).contains(name) && common::stderr(&out).contains("other names"),
            "{name}: {}",
            common::stderr(&out)
        );
        assert!(!fsck.status.success(), "{name}: fsck went ahead");
        assert_eq!(
            fs::read(&outside).unwrap(),
            b"precious",
            "{name}: the outside file was written"
        );
    }
    let m = vol.mount();
    m.unmount();
}

/// A DB companion (`-wal`, `-shm`) that is a symlink (or anything but a
/// regular file) is refused
/// by name, status, mount and fsck alike (SQLite's own message names no
/// file), and the volume opens once it is removed.
#[test]
fn a_db_companion_that_is_not_a_regular_file_is_named() {
    let vol = TestVolume::init();
    for name in ["kmsfs.db-wal", "kmsfs.db-shm"] {
        let inside = vol.backing.join(name);
        let _ = fs::remove_file(&inside);
        std::os::unix::fs::symlink("/etc/passwd", &inside).unwrap();
        for args in [&["status"][..], &["fsck"], &["mount"]] {
            let mut args = args.to_vec();
            args.push(path_str(&vol.backing));
            if args[0] == "mount" {
                args.push(path_str(&vol.mnt));
            }
            let out = vol.run(&args);
            assert!(!common::is_mounted(&vol.mnt));
            assert_eq!(out.status.code(), Some(4), "{name} {args:?}: {}", common::stderr(&out));
            assert!(
                common::stderr(&out).contains(&format!("{name} is refused: not a regular file"))
                    && common::stderr(&out).contains("else remove it (the DB opens without it)"),
                "{name} {args:?}: {}",
                common::stderr(&out)
            );
        }
        fs::remove_file(&inside).unwrap();
    }
    let m = vol.mount();
    m.unmount();
}
