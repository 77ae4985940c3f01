//! The host's records of mount daemons (a copy of the state each daemon
//! publishes, out of the backing directory's reach): `status` and `umount`
//! believe a record only while the process that wrote it runs, and root
//! believes another user's record only from the process holding the
//! volume lock. Most run as root (they mount as other users).

use std::fs;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{self, TestVolume, path_str, said, stderr};

/// The user whose daemon serves the volume.
const USER: u32 = 1000;
/// Another user, who forges records.
const OTHER: u32 = 1002;

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// The tests here make and remove /run/user/UID: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes what the test made outside its temporary directory, last first.
#[derive(Default)]
struct Made(Vec<PathBuf>);

impl Made {
    /// `path` as a directory of `uid`'s with `mode`, made if it is not there.
    fn dir(&mut self, path: &Path, uid: u32, mode: u32) -> PathBuf {
        if !path.exists() {
            fs::create_dir(path).unwrap();
            self.0.push(path.to_path_buf());
            chown(path, Some(uid), Some(uid)).unwrap();
            fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
        }
        path.to_path_buf()
    }

    fn file(&mut self, path: &Path, text: &str, uid: u32) {
        fs::write(path, text).unwrap();
        self.0.push(path.to_path_buf());
        chown(path, Some(uid), Some(uid)).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        for path in self.0.iter().rev() {
            let _ = fs::remove_file(path).or_else(|_| fs::remove_dir(path));
        }
    }
}

fn give_to(path: &Path, uid: u32) {
    let ok = Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}"), path_str(path)])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Field 22 of /proc/PID/stat: when the process started.
fn process_start(pid: u32) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    text[text.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap()
}

/// The record of the daemon of `vol` in `dir`.
fn record_in(dir: &Path, vol: &TestVolume) -> PathBuf {
    let st = rustix::fs::stat(&vol.backing).unwrap();
    dir.join(format!("daemon-{:x}-{:x}.json", st.st_dev, st.st_ino))
}

fn write_as(uid: u32, path: &Path, text: &str) {
    let out = common::run_as(uid, &format!("printf {text} > \"$1\""), path);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Root's `umount` of a user's mount (named by `fsname=`, so only the
/// daemon's record says where its volume is) reads the user's daemon from
/// its record (the lock file is the backing directory's to forge), and a
/// record another user writes for the volume is not believed: whether it
/// names a process of theirs (which does not hold the volume lock) or the
/// daemon itself (which does not run as them).
#[test]
fn root_believes_a_users_record_only_from_the_lock_holder() {
    if !is_root() {
        eprintln!("skipped: mounts as other users, needs root");
        return;
    }
    let _serial = one_at_a_time();
    let vol = TestVolume::init();
    give_to(vol.dir.path(), USER);
    let mut made = Made::default();
    made.dir(Path::new("/run/user"), 0, 0o755);
    let runtime = made.dir(Path::new(&format!("/run/user/{USER}")), USER, 0o700);
    made.dir(&runtime.join("kmsfs"), USER, 0o700);
    let record = record_in(&runtime.join("kmsfs"), &vol);
    made.0.push(record.clone());
    let mut m = vol.mount_as(USER, &[("XDG_RUNTIME_DIR", &runtime)], &["-o", "fsname=users-volume"]);
    assert!(record.exists());

    // Keys that cannot be committed keep the mount up: `umount` refuses,
    // whatever the lock file says.
    let db = common::refuse_key_commits(&vol);
    write_as(USER, &vol.mnt.join("kept"), "kept");
    common::wait_until("the daemon publishes the failure", || {
        fs::read_to_string(vol.backing.join("kmsfs.lock")).is_ok_and(|t| t.contains("injected failure"))
    });
    fs::write(vol.backing.join("kmsfs.lock"), r#"{"pid":1,"provider_calls":0}"#).unwrap();
    let refused = m.umount_with(&[]);
    assert_eq!(refused.status.code(), Some(7), "{}", said(&refused));
    assert!(said(&refused).contains("injected failure"));

    // Another user's record: newer, all well, naming a process that runs.
    let other = made.dir(Path::new(&format!("/run/user/{OTHER}")), OTHER, 0o700);
    let other_records = made.dir(&other.join("kmsfs"), OTHER, 0o700);
    let mut sleeper = Command::new("setpriv")
        .args([
            &format!("--reuid={OTHER}"),
            &format!("--regid={OTHER}"),
            "--clear-groups",
        ])
        .args(["sleep", "60"])
        .spawn()
        .unwrap();
    let forged = serde_json::json!({
        "pid": sleeper.id(),
        "provider_calls": 0,
        "published_ms": u64::MAX,
        "proc_start": process_start(sleeper.id()),
    });
    made.file(
        &other_records.join(record.file_name().unwrap()),
        &forged.to_string(),
        OTHER,
    );
    let refused = m.umount_with(&[]);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    assert_eq!(refused.status.code(), Some(7), "{}", said(&refused));
    // Naming the daemon itself, which holds the lock but is not theirs.
    let daemon: serde_json::Value = serde_json::from_str(&fs::read_to_string(&record).unwrap()).unwrap();
    let forged = serde_json::json!({
        "pid": daemon["pid"],
        "provider_calls": 0,
        "published_ms": u64::MAX,
        "proc_start": daemon["proc_start"],
        "boot": daemon["boot"],
        "backing": daemon["backing"],
        "mountpoint": daemon["mountpoint"],
    });
    fs::write(other_records.join(record.file_name().unwrap()), forged.to_string()).unwrap();
    let refused = m.umount_with(&[]);
    assert_eq!(refused.status.code(), Some(7), "{}", said(&refused));
    assert!(said(&refused).contains("injected failure"), "{}", said(&refused));

    // The other user may not unmount it at all.
    fs::set_permissions(vol.dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let theirs = vol
        .command_as(OTHER, &[])
        .args(["umount", path_str(&vol.mnt)])
        .output()
        .unwrap();
    assert_eq!(theirs.status.code(), Some(6), "{}", said(&theirs));
    assert!(
        said(&theirs).contains(&format!("mounted by user {USER}")),
        "{}",
        said(&theirs)
    );

    common::allow_key_commits(db);
    common::wait_until("the keys committed", || {
        vol.run(&["status", path_str(&vol.backing)]).status.success()
    });
    m.unmount();
    assert!(!record.exists(), "a clean exit takes its record along");
    let m = vol.mount_as(USER, &[("XDG_RUNTIME_DIR", &runtime)], &[]);
    let out = common::run_as(USER, r#"cat "$1""#, &vol.mnt.join("kept"));
    assert_eq!(out.stdout, b"kept");
    m.unmount();
}

/// A daemon killed with SIGKILL leaves its record; when the next daemon
/// of the volume has nowhere to write one (no runtime or state directory:
/// its home cannot hold one),
/// `umount` reads that daemon's lock file, not the dead one's record, which
/// says all is well.
#[test]
fn a_dead_daemons_record_is_not_believed() {
    if !is_root() {
        eprintln!("skipped: mounts as another user, needs root");
        return;
    }
    let _serial = one_at_a_time();
    let vol = TestVolume::init();
    let runtime = vol.dir.path().join("runtime");
    fs::create_dir(&runtime).unwrap();
    fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700)).unwrap();
    give_to(vol.dir.path(), USER);
    let with_runtime = [("XDG_RUNTIME_DIR", runtime.as_path())];
    let m = vol.mount_as(USER, &with_runtime, &[]);
    let record = record_in(&runtime.join("kmsfs"), &vol);
    let published: serde_json::Value = serde_json::from_str(&fs::read_to_string(&record).unwrap()).unwrap();
    let pid = published["pid"].as_i64().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let status_as_user = || {
        vol.command_as(USER, &with_runtime)
            .args(["status", path_str(&vol.backing)])
            .output()
            .unwrap()
    };
    common::wait_until("the mount is stale", || status_as_user().status.code() == Some(6));
    // Root, to whom the user's mount answers EACCES live or not, tells too.
    let status = vol.run(&["status", path_str(&vol.backing)]);
    assert_eq!(status.status.code(), Some(6), "{}", said(&status));
    m.unmount();
    assert!(record.exists(), "a killed daemon's record stays");

    // A home where nothing can be made, and no runtime directory.
    let m = vol.mount_as(USER, &[("HOME", Path::new("/dev/null"))], &[]);
    assert_eq!(fs::read_dir(runtime.join("kmsfs")).unwrap().count(), 1);
    let db = common::refuse_key_commits(&vol);
    write_as(USER, &vol.mnt.join("kept"), "kept");
    common::wait_until("the daemon publishes the failure", || {
        fs::read_to_string(vol.backing.join("kmsfs.lock")).is_ok_and(|t| t.contains("injected failure"))
    });
    let refused = vol
        .command_as(USER, &with_runtime)
        .args(["umount", path_str(&vol.mnt)])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(7), "{}", said(&refused));
    assert!(said(&refused).contains("injected failure"));
    common::allow_key_commits(db);
    common::wait_until("the keys committed", || status_as_user().status.success());
    m.unmount();
}

/// A user's daemon with no runtime directory records under
/// `~/.local/state`, where that user's `umount` finds it: a forged lock
/// file does not let it unmount while file keys are not committed.
#[test]
fn a_record_in_the_state_directory_counts() {
    if !is_root() {
        eprintln!("skipped: mounts as another user, needs root");
        return;
    }
    let _serial = one_at_a_time();
    let vol = TestVolume::init();
    let home = vol.dir.path().join("home");
    fs::create_dir(&home).unwrap();
    give_to(vol.dir.path(), USER);
    let with_home = [("HOME", home.as_path())];
    let m = vol.mount_as(USER, &with_home, &[]);
    let record = record_in(&home.join(".local/state/kmsfs/daemons"), &vol);
    assert!(record.exists());
    let db = common::refuse_key_commits(&vol);
    write_as(USER, &vol.mnt.join("kept"), "kept");
    common::wait_until("the daemon publishes the failure", || {
        fs::read_to_string(&record).is_ok_and(|t| t.contains("injected failure"))
    });
    fs::write(vol.backing.join("kmsfs.lock"), r#"{"pid":1,"provider_calls":0}"#).unwrap();
    let umount = || {
        vol.command_as(USER, &with_home)
            .args(["umount", path_str(&vol.mnt)])
            .output()
            .unwrap()
    };
    let refused = umount();
    assert_eq!(refused.status.code(), Some(7), "{}", said(&refused));
    common::allow_key_commits(db);
    common::wait_until("the keys committed", || {
        fs::read_to_string(&record).is_ok_and(|t| !t.contains("injected failure"))
    });
    let out = umount();
    assert!(out.status.success(), "{}", said(&out));
    assert!(!common::is_mounted(&vol.mnt));
    drop(m);
}

/// The lock file replaced under a live mount (renamed away, a new one in
/// its place that no daemon holds): the daemon's record still finds it, so
/// `umount` still refuses while its file keys are not committed, then
/// waits for it.
#[test]
fn a_replaced_lock_file_does_not_hide_the_daemon() {
    let vol = TestVolume::init();
    let mut m = vol.mount();
    let db = common::refuse_key_commits(&vol);
    fs::write(vol.path("kept"), b"kept").unwrap();
    common::wait_until("the daemon publishes the failure", || {
        fs::read_to_string(vol.backing.join("kmsfs.lock")).is_ok_and(|t| t.contains("injected failure"))
    });
    fs::rename(vol.backing.join("kmsfs.lock"), vol.dir.path().join("held-lock")).unwrap();
    fs::write(vol.backing.join("kmsfs.lock"), "").unwrap();
    let refused = m.umount_with(&[]);
    assert_eq!(refused.status.code(), Some(7), "{}", said(&refused));
    assert!(said(&refused).contains("injected failure"), "{}", said(&refused));
    common::allow_key_commits(db);
    common::wait_until("the keys committed", || {
        vol.run(&["status", path_str(&vol.backing)]).status.success()
    });
    let out = m.umount_with(&[]);
    assert!(out.status.success(), "{}", said(&out));
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("kept")).unwrap(), b"kept");
    m.unmount();
}

/// Nor does it let a second daemon, or fsck, in: the lock file renamed
/// away under a serving daemon, a new one is locked at once, but the
/// daemon's record says the volume is in use.
#[test]
fn a_lock_file_renamed_away_does_not_let_a_second_user_of_the_volume_in() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::write(vol.path("f"), b"served").unwrap();
    fs::rename(vol.backing.join("kmsfs.lock"), vol.dir.path().join("moved-lock")).unwrap();
    let second = vol.dir.path().join("second");
    fs::create_dir(&second).unwrap();
    let out = vol.run(&["mount", path_str(&vol.backing), path_str(&second)]);
    if common::is_mounted(&second) {
        let _ = Command::new("umount").arg("-l").arg(&second).status();
    }
    assert_eq!(out.status.code(), Some(6), "{}", said(&out));
    assert!(said(&out).contains("already mounted"), "{}", said(&out));
    let out = vol.run(&["fsck", "--repair", path_str(&vol.backing)]);
    assert_eq!(out.status.code(), Some(6), "{}", said(&out));
    fs::rename(vol.dir.path().join("moved-lock"), vol.backing.join("kmsfs.lock")).unwrap();
    m.unmount();
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("f")).unwrap(), b"served");
    m.unmount();
}

/// A record whose directory stops being the user's alone moves to the next
/// of the user's directories, and the copy left behind goes: `umount`
/// reads the daemon's last word where it moved, never the stale one.
#[test]
fn a_record_that_moves_leaves_no_stale_copy() {
    if !is_root() {
        eprintln!("skipped: mounts as another user, needs root");
        return;
    }
    let _serial = one_at_a_time();
    let vol = TestVolume::init();
    let home = vol.dir.path().join("home");
    fs::create_dir(&home).unwrap();
    give_to(vol.dir.path(), USER);
    let mut made = Made::default();
    made.dir(Path::new("/run/user"), 0, 0o755);
    let runtime = made.dir(Path::new(&format!("/run/user/{USER}")), USER, 0o700);
    let records = made.dir(&runtime.join("kmsfs"), USER, 0o700);
    let first = record_in(&records, &vol);
    made.0.push(first.clone());
    let env = [("XDG_RUNTIME_DIR", runtime.as_path()), ("HOME", home.as_path())];
    let m = vol.mount_as(USER, &env, &[]);
    assert!(first.exists());
    fs::set_permissions(&records, fs::Permissions::from_mode(0o755)).unwrap();
    let db = common::refuse_key_commits(&vol);
    write_as(USER, &vol.mnt.join("kept"), "kept");
    let moved = record_in(&home.join(".local/state/kmsfs/daemons"), &vol);
    // The daemon writes the moved record before it removes the old one.
    common::wait_until(
        "the failure published where the record moved, the record left behind removed",
        || fs::read_to_string(&moved).is_ok_and(|t| t.contains("injected failure")) && !first.exists(),
    );
    let umount = || {
        vol.command_as(USER, &env)
            .args(["umount", path_str(&vol.mnt)])
            .output()
            .unwrap()
    };
    let refused = umount();
    assert_eq!(refused.status.code(), Some(7), "{}", said(&refused));
    assert!(said(&refused).contains("injected failure"), "{}", said(&refused));
    common::allow_key_commits(db);
    common::wait_until("the keys committed", || {
        fs::read_to_string(&moved).is_ok_and(|t| !t.contains("injected failure"))
    });
    let out = umount();
    assert!(out.status.success(), "{}", said(&out));
    assert!(!common::is_mounted(&vol.mnt));
    drop(m);
}
