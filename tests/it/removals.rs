//! Unlinks answered before the backing removal (src/fs/removals.rs): a
//! removed name never comes back and never blocks its reuse, a directory
//! emptied a moment ago can be removed, every key goes with its file, and
//! a removal that fails after its reply is reported by fsync of the
//! directory, by `status` and by `umount`. Root only: a normal user's
//! daemon removes before replying. And, for any daemon, the keys of files
//! whose headers nothing had read are erased too.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::common::{self, TestVolume, json, path_str};

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Backing entries of a directory other than kmsfs's own (IV, sidecars).
fn backing_entries(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".kmsfs"))
        .count()
}

/// The entry of backing directory `dir` whose inode is `ino` (the number
/// the mount shows).
fn backing_entry_with_ino(dir: &Path, ino: u64) -> Option<std::path::PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| fs::symlink_metadata(p).unwrap().ino() == ino)
}

#[test]
fn removed_names_stay_removed_and_can_be_reused_at_once() {
    assert!(
        is_root(),
        "this test checks the daemon of root (scripts/test.sh runs it as root)"
    );
    // Each backing removal waits a moment, so that many are pending when
    // the names are used again.
    let vol = TestVolume::init_with(&[("KMSFS_TEST_REMOVAL_DELAY_MS", "1")], &[]);
    let m = vol.mount_with(&["-o", "deferred_unlink"]);
    let dir = vol.path("d");
    fs::create_dir(&dir).unwrap();
    for round in 0..3u8 {
        for i in 0..1500 {
            fs::write(dir.join(format!("f{i}")), [round; 100]).unwrap();
        }
        // Remove all, then at once: reuse every other name (a pending
        // removal must not make it "taken"), list, and stat.
        for i in 0..1500 {
            fs::remove_file(dir.join(format!("f{i}"))).unwrap();
        }
        for i in (0..1500).step_by(2) {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dir.join(format!("f{i}")))
                .unwrap_or_else(|e| panic!("round {round}: recreating f{i}: {e}"));
        }
        let listed: BTreeSet<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let expected: BTreeSet<String> = (0..1500).step_by(2).map(|i| format!("f{i}")).collect();
        assert_eq!(listed, expected, "round {round}");
        assert!(!dir.join("f1").exists());
        assert_eq!(fs::metadata(dir.join("f0")).unwrap().len(), 0);
        for i in (0..1500).step_by(2) {
            fs::remove_file(dir.join(format!("f{i}"))).unwrap();
        }
    }
    // A directory emptied a moment ago is empty to rmdir and to a rename over it.
    let nested = vol.path("n/inner");
    fs::create_dir_all(&nested).unwrap();
    let target = vol.path("t");
    fs::create_dir(&target).unwrap();
    for i in 0..500 {
        fs::write(nested.join(format!("x{i}")), b"x").unwrap();
        fs::write(target.join(format!("y{i}")), b"y").unwrap();
    }
    fs::remove_dir_all(vol.path("n")).unwrap();
    let emptied = vol.path("e");
    fs::create_dir(&emptied).unwrap();
    for i in 0..500 {
        fs::write(emptied.join(format!("z{i}")), b"z").unwrap();
    }
    for i in 0..500 {
        fs::remove_file(emptied.join(format!("z{i}"))).unwrap();
    }
    fs::remove_dir(&emptied).unwrap();
    for i in 0..500 {
        fs::remove_file(target.join(format!("y{i}"))).unwrap();
    }
    fs::create_dir(vol.path("s")).unwrap();
    fs::rename(vol.path("s"), &target).unwrap();
    // df sees the removals done.
    let status = Command::new("df")
        .arg(&vol.mnt)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    m.unmount();

    let backing_root = backing_entries(&vol.backing);
    // kmsfs.db (and its WAL), d and t remain in the backing root.
    assert!(backing_root <= 4, "{backing_root} backing entries left at the top");
    let status = json(&vol.run(&["status", "--json", path_str(&vol.backing)]));
    assert_eq!(status["file_keys"], 0, "every removed file's key is erased: {status}");
    let (code, report) = common::fsck(&vol, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["files"], 0, "{report}");
}

#[test]
fn a_removal_failing_after_its_reply_is_reported() {
    assert!(
        is_root(),
        "this test checks the daemon of root (scripts/test.sh runs it as root)"
    );
    let vol = TestVolume::init();
    let m = vol.mount_with(&["-o", "deferred_unlink"]);
    fs::write(vol.path("kept"), b"immutable").unwrap();
    fs::write(vol.path("gone"), b"removable").unwrap();
    let ino = fs::metadata(vol.path("kept")).unwrap().ino();
    let backing = backing_entry_with_ino(&vol.backing, ino).expect("backing file of kept");
    let chattr = |flag: &str| {
        let out = Command::new("chattr").arg(flag).arg(&backing).output().unwrap();
        assert!(
            out.status.success(),
            "chattr {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The backing filesystem refuses to remove it, which the unlink cannot know.
    chattr("+i");
    let removed = fs::remove_file(vol.path("kept"));
    fs::remove_file(vol.path("gone")).unwrap();
    // Answered before the backing removal; fsync of the directory says it failed.
    assert!(removed.is_ok(), "{removed:?}");
    let dir = fs::File::open(&vol.mnt).unwrap();
    assert!(dir.sync_all().is_err(), "fsync of the directory hid a failed removal");
    assert!(dir.sync_all().is_ok(), "reported once, as a writeback error");
    drop(dir);
    assert_eq!(
        fs::read(vol.path("kept")).unwrap(),
        b"immutable",
        "the name is back, its data intact"
    );
    assert!(!vol.path("gone").exists());
    // The daemon publishes its state four times a second.
    let mut text = String::new();
    let mut code = None;
    for _ in 0..40 {
        let status = vol.run(&["status", path_str(&vol.backing)]);
        text = String::from_utf8_lossy(&status.stdout).to_string();
        code = status.status.code();
        if text.contains("FAILING:        removing ") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(text.contains("FAILING:        removing "), "{text}");
    assert!(text.contains("Operation not permitted"), "the OS's words: {text}");
    assert_eq!(code, Some(7), "status fails while it reports a failure: {text}");
    let out = m.umount_output();
    chattr("-i");
    assert!(!out.status.success(), "umount hid the failed removal");
    assert!(
        common::stderr(&out).contains("after its unlink was answered failed"),
        "{}",
        common::stderr(&out)
    );
    assert!(!common::is_mounted(&vol.mnt));

    // By default the unlink itself fails, as the backing filesystem's.
    let m = vol.mount();
    chattr("+i");
    let err = fs::remove_file(vol.path("kept")).unwrap_err();
    chattr("-i");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert_eq!(fs::read(vol.path("kept")).unwrap(), b"immutable");
    let status = vol.run(&["status", path_str(&vol.backing)]);
    assert!(!String::from_utf8_lossy(&status.stdout).contains("FAILING"));
    assert!(status.status.success(), "{}", common::stderr(&status));
    m.unmount();
}

/// Files removed before anything read their headers (a fresh mount, files
/// never opened) have their ids read off the unlink path, many asked for
/// at once: every key goes with its file, except that of a file whose
/// header was damaged, which names no id to erase.
#[test]
fn the_keys_of_files_removed_unread_are_all_erased() {
    let vol = TestVolume::init();
    let m = vol.mount();
    let dir = vol.path("d");
    fs::create_dir(&dir).unwrap();
    for i in 0..1200 {
        fs::write(dir.join(format!("f{i}")), [i as u8; 100]).unwrap();
    }
    let damaged_ino = fs::metadata(dir.join("f7")).unwrap().ino();
    m.unmount();
    let backing_dir = fs::read_dir(&vol.backing)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .expect("backing directory of d");
    let damaged = backing_entry_with_ino(&backing_dir, damaged_ino).expect("backing file of f7");
    let mut bytes = fs::read(&damaged).unwrap();
    bytes[0] ^= 0xff; // the header's version
    fs::write(&damaged, bytes).unwrap();

    let m = vol.mount();
    let status = json(&vol.run(&["status", "--json", path_str(&vol.backing)]));
    assert_eq!(status["file_keys"], 1200, "{status}");
    fs::remove_dir_all(&dir).unwrap();
    m.unmount();
    let status = json(&vol.run(&["status", "--json", path_str(&vol.backing)]));
    assert_eq!(
        status["file_keys"], 1,
        "the damaged file's key stays, no other: {status}"
    );
    assert!(
        vol.log_text().contains("removed file without a readable header"),
        "{}",
        vol.log_text()
    );
}
