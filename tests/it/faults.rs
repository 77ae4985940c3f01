//! Resource faults: a backing filesystem that fills up, a read-only backing
//! filesystem, and a daemon that runs out of file descriptors.

use crate::common;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::process::Command;

use crate::common::{Rng, TestVolume, path_str};

/// A mount made by the test (tmpfs, bind), unmounted on drop.
struct TestMount(PathBuf);

impl Drop for TestMount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.0).status();
        if !unmounted.is_ok_and(|s| s.success()) {
            // Still in use (a daemon finishing): detached, never left behind.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn sh(cmd: &[&str]) {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_full_backing_filesystem_gives_enospc_and_corrupts_nothing() {
    let outer = tempfile::tempdir().unwrap();
    let small = outer.path().join("small");
    fs::create_dir(&small).unwrap();
    sh(&["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", path_str(&small)]);
    let _tmpfs = TestMount(small.clone());
    let keystore = outer.path().join("ks.json");
    let mnt = outer.path().join("plain");
    fs::create_dir(&mnt).unwrap();
    let backing = small.join("cipher");
    let kmsfs = |args: &[&str]| {
        Command::new(common::kmsfs_bin())
            .env("KMSFS_KEYSTORE", &keystore)
            .env("KMSFS_PASSPHRASE", "p")
            .args(args)
            .output()
            .unwrap()
    };
    assert!(
        kmsfs(&[
            "init",
            path_str(&backing),
            "--kdf-memory-mib",
            "19",
            "--kdf-iterations",
            "2"
        ])
        .status
        .success()
    );
    let mount = || {
        let out = kmsfs(&["mount", path_str(&backing), path_str(&mnt)]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let umount = || {
        let out = kmsfs(&["umount", path_str(&mnt)]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    mount();
    // Whatever fails, the volume's mount goes first, then the tmpfs under it.
    let _mounted = TestMount(mnt.clone());
    let result = std::panic::catch_unwind(|| {
        let mut rng = Rng::new(9);
        let mut written: Vec<(PathBuf, Vec<u8>)> = Vec::new();
        let mut error = None;
        for i in 0..100 {
            let path = mnt.join(format!("f{i}"));
            let data = rng.bytes(700_000);
            let res = fs::File::create(&path).and_then(|mut f| f.write_all(&data).and_then(|_| f.sync_all()));
            match res {
                Ok(()) => written.push((path, data)),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let e = error.expect("the 12 MiB filesystem filled up");
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ENOSPC),
            "the application sees ENOSPC, not {e}"
        );
        assert!(written.len() >= 5, "{} files fit", written.len());
        // A shell redirection, which never looks at close(): with room for
        // the file but not for its data, the write itself fails.
        let (freed, _) = written.pop().unwrap();
        fs::remove_file(&freed).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500)); // the removed inode's release
        let shell = mnt.join("from-a-shell");
        // bash's echo is a builtin: bash closes the file itself and ignores close errors.
        let script = format!(
            "line=$(printf '%01000d' 0); for i in $(seq 3000); do echo \"$line\"; done > {}",
            path_str(&shell)
        );
        let out = Command::new("bash").arg("-c").arg(script).output().unwrap();
        assert!(!out.status.success(), "a shell write to a full volume reports failure");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("No space left"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let shown = fs::metadata(&shell).unwrap().len();
        let stored = fs::read(&shell).unwrap().len() as u64;
        assert_eq!(shown, stored, "the size shown is what is stored");
        fs::remove_file(&shell).unwrap();
        for (p, d) in &written {
            assert!(&fs::read(p).unwrap() == d, "{} intact after ENOSPC", p.display());
        }
        // Freeing space makes writes work again, once the removed inode is
        // released: the kernel's FORGET comes asynchronously after the
        // unlink, and the daemon's key-erasing thread holds the inode until
        // it has read its header (seen failing once in six runs under load
        // without the retry).
        fs::remove_file(&written.pop().unwrap().0).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let res = fs::File::create(mnt.join("after"))
                .and_then(|mut f| f.write_all(b"space again").and_then(|_| f.sync_all()));
            match res {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("writing after freeing space: {e}"),
            }
        }
        written
    });
    // A failure inside is what to report, not the unmount it makes fail.
    let written = result.unwrap_or_else(|e| {
        let _ = kmsfs(&["umount", "--force", path_str(&mnt)]);
        std::panic::resume_unwind(e)
    });
    umount();
    mount();
    let check = std::panic::catch_unwind(|| {
        for (p, d) in &written {
            assert!(&fs::read(p).unwrap() == d, "{} intact after remount", p.display());
        }
        assert_eq!(fs::read(mnt.join("after")).unwrap(), b"space again");
    });
    check.unwrap_or_else(|e| {
        let _ = kmsfs(&["umount", "--force", path_str(&mnt)]);
        std::panic::resume_unwind(e)
    });
    umount();
    let db = rusqlite::Connection::open(backing.join("kmsfs.db")).unwrap();
    let integrity: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok");
}

#[test]
fn a_read_only_backing_filesystem_is_refused_clearly() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::write(vol.path("kept"), b"kept").unwrap();
    m.unmount();
    let ro = vol.dir.path().join("ro");
    fs::create_dir(&ro).unwrap();
    sh(&["mount", "--bind", path_str(&vol.backing), path_str(&ro)]);
    let _bind = TestMount(ro.clone());
    sh(&["mount", "-o", "remount,bind,ro", path_str(&ro)]);
    let out = vol.run(&["mount", path_str(&ro), path_str(&vol.mnt)]);
    assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("read-only filesystem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _m = vol.mount();
    assert_eq!(fs::read(vol.path("kept")).unwrap(), b"kept");
}

/// A fresh ext4 of `mib` MiB in an image in `dir`, mounted with `options`:
/// (image, mount point, the guard that unmounts it).
fn ext4_image(dir: &std::path::Path, mib: u64, options: &str) -> (PathBuf, PathBuf, TestMount) {
    let image = dir.join("ext4.img");
    fs::File::create(&image).unwrap().set_len(mib << 20).unwrap();
    sh(&["mkfs.ext4", "-q", "-F", path_str(&image)]);
    let mounted = dir.join("ext4");
    fs::create_dir(&mounted).unwrap();
    sh(&["mount", "-o", options, path_str(&image), path_str(&mounted)]);
    (image, mounted.clone(), TestMount(mounted))
}

/// The device mounted at exactly `path` (from /proc/self/mountinfo).
fn source_of(path: &std::path::Path) -> String {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(path_str(path)))
        .expect("mounted");
    let after_dash: Vec<&str> = line.split(" - ").nth(1).unwrap().split(' ').collect();
    after_dash[1].to_string()
}

/// A backing filesystem that turns read-only under a mount takes the lock
/// file, where the daemon reports its failures, with it: the report of the
/// keys it can no longer commit reaches `status` and `umount` through its
/// record on the host instead, and the keys themselves, which cannot be
/// saved beside the DB, are saved on the host and stored by the next mount.
#[test]
fn keys_a_backing_filesystem_turned_read_only_keeps_from_committing_are_reported() {
    let outer = tempfile::tempdir().unwrap();
    let (image, ext, _ext) = ext4_image(outer.path(), 64, "loop,errors=remount-ro");
    let device = source_of(&ext);
    // Keys are committed every 3 s instead of 200 ms: the filesystem fails in between.
    let vol = TestVolume::init_on_with(&[("KMSFS_TEST_FLUSH_INTERVAL_MS", "3000")], ext.join("cipher"));
    let mut m = vol.mount();
    fs::write(vol.path("new"), b"not committed yet").unwrap();
    // The backing file is durable (the backing filesystem synced, not the
    // volume: an fsync through the mount would commit the key too).
    sh(&["sync", "-f", path_str(&ext)]);
    let sysfs = format!("/sys/fs/ext4/{}/trigger_fs_error", device.trim_start_matches("/dev/"));
    fs::write(&sysfs, "1").unwrap();
    let backing = path_str(&vol.backing);
    common::wait_until("status reports the failed commit", || {
        vol.run(&["status", backing]).status.code() == Some(7)
    });
    let status = vol.run(&["status", backing]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("FAILING:        committing file keys"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );
    let out = m.umount_with(&[]);
    assert_eq!(out.status.code(), Some(7), "umount refuses: {}", common::stderr(&out));
    // Forced: the keys cannot go beside the DB, so they go to the host.
    let out = m.umount_with(&["--force"]);
    let said = common::stderr(&out);
    assert_eq!(out.status.code(), Some(7), "umount says what happened: {said}");
    assert!(
        said.contains("saved to /var/lib/kmsfs/pending-keys/") && said.contains("kmsfs fsck"),
        "{said}"
    );
    // The filesystem repaired, the next mount stores them: nothing was lost.
    sh(&["umount", path_str(&ext)]);
    let _ = Command::new("e2fsck").args(["-fy", path_str(&image)]).output().unwrap();
    sh(&["mount", "-o", "loop", path_str(&image), path_str(&ext)]);
    // A copy of the backing directory (a backup checked on this host) stores
    // the new keys too (the files are in it as well), but leaves the file,
    // and its deletions, to the original.
    let copy = outer.path().join("copy");
    sh(&["cp", "-a", backing, path_str(&copy)]);
    let host: Vec<PathBuf> = fs::read_dir("/var/lib/kmsfs/pending-keys")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| fs::read_to_string(p).is_ok_and(|t| t.contains(backing)))
        .collect();
    assert_eq!(host.len(), 1, "{host:?}");
    let status = vol.run(&["status", "--json", path_str(&copy)]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["pending_keys_files"], serde_json::json!([]), "not the copy's");
    let out = vol.run(&["fsck", path_str(&copy)]);
    assert!(
        common::stderr(&out).contains("another copy of this volume"),
        "{}",
        common::stderr(&out)
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "the copy's file has its key: {}",
        common::stderr(&out)
    );
    assert!(host[0].exists(), "left for the original");
    let status = vol.run(&["status", "--json", backing]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["pending_keys_files"], serde_json::json!([host[0]]));
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("new")).unwrap(), b"not committed yet");
    m.unmount();
    let status = vol.run(&["status", "--json", path_str(&vol.backing)]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        status["pending_keys_files"],
        serde_json::json!([]),
        "the host's file is gone"
    );
}

/// Mounts with the daemon limited to 100 descriptors (it inherits the hard limit).
fn mount_with_100_descriptors<'a>(vol: &'a TestVolume, options: &str) -> Guard<'a> {
    let cmd = format!(
        "ulimit -n 100 && exec {} mount {} {} {options}",
        common::kmsfs_bin(),
        path_str(&vol.backing),
        path_str(&vol.mnt)
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .env("KMSFS_KEYSTORE", &vol.keystore)
        .env("KMSFS_PASSPHRASE", common::PASSPHRASE)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Guard(vol)
}

/// Creates and keeps open up to `count` files; returns them and the error that stopped it.
fn open_many(vol: &TestVolume, count: usize) -> (Vec<fs::File>, Option<std::io::Error>) {
    let mut open = Vec::new();
    for i in 0..count {
        let p = vol.path(&format!("f{i}"));
        match fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
        {
            Ok(f) => open.push(f),
            Err(e) => return (open, Some(e)),
        }
    }
    (open, None)
}

#[test]
fn running_out_of_descriptors_is_reported_not_a_crash() {
    let vol = TestVolume::init();
    // With OPEN requests each open file holds a daemon descriptor.
    let guard = mount_with_100_descriptors(&vol, "-o open_requests");
    let (open, failure) = open_many(&vol, 300);
    let e = failure.expect("the daemon ran out of descriptors");
    assert!(
        open.len() >= 40,
        "most of the limit serves open files, not caches: {} opened",
        open.len()
    );
    assert!(
        matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)),
        "reported as EMFILE/ENFILE, not {e}"
    );
    drop(open);
    // Still serving.
    fs::write(vol.path("after"), b"still alive").unwrap();
    assert_eq!(fs::read(vol.path("after")).unwrap(), b"still alive");
    assert!(fs::read_dir(&vol.mnt).unwrap().count() >= 40);
    drop(guard);
}

#[test]
fn without_open_requests_open_files_do_not_hold_daemon_descriptors() {
    let vol = TestVolume::init();
    // Running as root, the daemon has the kernel open files by itself and
    // keeps a bounded cache of backing descriptors instead.
    let guard = mount_with_100_descriptors(&vol, "");
    let (mut open, failure) = open_many(&vol, 300);
    assert!(failure.is_none(), "open failed: {failure:?}");
    for (i, f) in open.iter_mut().enumerate() {
        f.write_all(format!("file {i} ").repeat(1000).as_bytes()).unwrap();
    }
    for f in &open {
        f.sync_all().unwrap();
    }
    for (i, f) in open.iter_mut().enumerate() {
        let mut back = String::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_string(&mut back).unwrap();
        assert_eq!(
            back,
            format!("file {i} ").repeat(1000),
            "file {i} through its open descriptor"
        );
    }
    drop(open);
    for i in (0..300).step_by(37) {
        assert_eq!(
            fs::read_to_string(vol.path(&format!("f{i}"))).unwrap(),
            format!("file {i} ").repeat(1000)
        );
    }
    drop(guard);
    // And after a remount, from the backing files.
    let _m = vol.mount();
    assert_eq!(fs::read_to_string(vol.path("f299")).unwrap(), "file 299 ".repeat(1000));
}

struct Guard<'a>(&'a TestVolume);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let out = self.0.run(&["umount", path_str(&self.0.mnt)]);
        if !out.status.success() {
            let _ = Command::new("umount").arg("-l").arg(&self.0.mnt).status();
        }
    }
}

#[test]
fn key_commits_that_keep_failing_are_reported_and_lose_nothing() {
    use std::io::Write;
    let vol = TestVolume::init();
    let backing = path_str(&vol.backing);
    let m = vol.mount();
    fs::write(vol.path("before"), b"committed").unwrap();
    let db = common::refuse_key_commits(&vol);
    let mut f = fs::File::create(vol.path("during")).unwrap();
    f.write_all(b"precious").unwrap();
    assert_eq!(
        f.sync_all().unwrap_err().raw_os_error(),
        Some(libc::EIO),
        "fsync reports it"
    );
    drop(f);
    // What the daemon publishes for `status` (which itself refuses a DB
    // holding a trigger of someone else's, so it is read here directly).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        let published = fs::read_to_string(vol.backing.join("kmsfs.lock")).unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&published).unwrap_or_default();
        if !json["commit_error"].is_null() || std::time::Instant::now() > deadline {
            break json;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        status["commit_error"]
            .as_str()
            .unwrap_or("")
            .contains("injected failure"),
        "status shows it: {status}"
    );
    // `umount` leaves the daemon holding the keys rather than risk them.
    let mut m = m;
    let out = m.umount_with(&[]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "umount refuses: {said}");
    assert!(
        said.contains("injected failure") && said.contains("umount --force"),
        "says why and how: {said}"
    );
    assert_eq!(fs::read(vol.path("during")).unwrap(), b"precious", "still mounted");
    let out = m.umount_with(&["--force"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "umount --force exits non-zero: {said}");
    assert!(
        said.contains(backing) && said.contains("kmsfs.pending-keys") && said.contains("kmsfs fsck"),
        "names the volume and what to do: {said}"
    );
    // The cause goes away (a DB with a trigger of someone else's is refused
    // outright): the next mount stores the saved keys.
    common::allow_key_commits(db);
    let status = vol.run(&["status", backing]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("pending keys"));
    // Keys outside the DB: a backup of the directory now would lack them.
    assert_eq!(status.status.code(), Some(7), "{}", common::stderr(&status));
    assert!(
        common::stderr(&status).contains("kmsfs.pending-keys") && common::stderr(&status).contains("kmsfs fsck"),
        "{}",
        common::stderr(&status)
    );
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("during")).unwrap(), b"precious");
    assert_eq!(fs::read(vol.path("before")).unwrap(), b"committed");
    m.unmount();
    assert!(!vol.backing.join("kmsfs.pending-keys").exists());
    let fsck = vol.run(&["fsck", backing]);
    assert_eq!(fsck.status.code(), Some(0), "{}", String::from_utf8_lossy(&fsck.stdout));
}

/// A refused `umount` loses nothing: once the cause is gone the daemon
/// commits the keys it kept, and the next `umount` succeeds.
#[test]
fn an_unmount_refused_while_commits_fail_succeeds_once_they_commit() {
    let vol = TestVolume::init();
    let mut m = vol.mount();
    let db = common::refuse_key_commits(&vol);
    fs::write(vol.path("kept"), b"kept in memory").unwrap();
    common::wait_until("the daemon publishes the failure", || {
        fs::read_to_string(vol.backing.join("kmsfs.lock")).is_ok_and(|t| t.contains("injected failure"))
    });
    // The lock file is the backing directory's to forge; the host's record
    // of the daemon's state is what counts.
    fs::write(
        vol.backing.join("kmsfs.lock"),
        r#"{"pid":1,"provider_calls":0,"published_ms":18446744073709551615}"#,
    )
    .unwrap();
    let out = m.umount_with(&[]);
    assert_eq!(out.status.code(), Some(7), "{}", common::stderr(&out));
    common::allow_key_commits(db);
    common::wait_until("the keys committed", || {
        vol.run(&["status", path_str(&vol.backing)]).status.success()
    });
    m.unmount();
    assert!(!vol.backing.join("kmsfs.pending-keys").exists());
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("kept")).unwrap(), b"kept in memory");
    m.unmount();
}

/// A volume whose filesystem is full cannot open its DB (SQLite needs room
/// for its journal files): mount, status and fsck say the filesystem is
/// full (exit 7), not that the DB is damaged (exit 4, whose remedy is a
/// restore from backup that would lose the keys made since).
#[test]
fn a_db_on_a_full_filesystem_is_not_called_damaged() {
    // ext4, whose reserve no one may use shows as free blocks even to root.
    let outer = tempfile::tempdir().unwrap();
    let (_, small, _ext4) = ext4_image(outer.path(), 32, "loop");
    let vol = TestVolume::init_on(small.join("cipher"));
    let m = vol.mount();
    fs::write(vol.path("kept"), b"kept").unwrap();
    m.unmount();
    let ballast = small.join("ballast");
    let mut f = fs::File::create(&ballast).unwrap();
    // Full to the last block: ext4 gives back what it held for delayed
    // allocation once the data is on disk, so fill again after each sync.
    for chunk in [64 << 10, 4096, 4096] {
        while f.write_all(&vec![7u8; chunk]).is_ok() {}
        let _ = f.sync_all();
    }
    drop(f);
    let backing = path_str(&vol.backing);
    for args in [
        vec!["mount", backing, path_str(&vol.mnt)],
        vec!["status", backing],
        vec!["fsck", backing],
        vec!["rotate", backing],
    ] {
        let out = vol.run(&args);
        if common::is_mounted(&vol.mnt) {
            let _ = vol.run(&["umount", path_str(&vol.mnt)]);
        }
        let said = common::stderr(&out);
        assert_eq!(out.status.code(), Some(7), "{args:?}: {said}");
        assert!(
            said.contains("is full") && !said.contains("damaged or unreadable"),
            "{args:?}: {said}"
        );
    }
    assert!(!common::is_mounted(&vol.mnt));
    fs::remove_file(&ballast).unwrap();
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("kept")).unwrap(), b"kept");
    m.unmount();
}

/// An idle mount whose daemon cannot commit file keys stays mounted (as
/// `kmsfs umount` refuses): unmounted, the keys would have to be saved on
/// the very storage that is failing. It unmounts once they are committed.
#[test]
fn an_idle_mount_waits_for_its_keys_to_commit_before_unmounting() {
    let vol = TestVolume::init();
    let _m = vol.mount_with(&["-o", "idle=1s"]);
    let db = common::refuse_key_commits(&vol);
    fs::write(vol.path("kept"), b"kept in memory").unwrap();
    common::wait_until("the daemon publishes the failure", || {
        fs::read_to_string(vol.backing.join("kmsfs.lock")).is_ok_and(|t| t.contains("injected failure"))
    });
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert!(common::is_mounted(&vol.mnt), "idle, but keys are not committed");
    common::allow_key_commits(db);
    common::wait_until("unmounted once idle and committed", || !common::is_mounted(&vol.mnt));
    assert!(!vol.backing.join("kmsfs.pending-keys").exists());
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("kept")).unwrap(), b"kept in memory");
    m.unmount();
}
