//! What an operator meets when things are not as they should be: a busy
//! unmount, a killed daemon, a mount point in use, an `init` to repeat.
//! Each gets a message naming the problem and the command that fixes it.

use crate::common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{TestVolume, path_str, stderr, wait_until};

fn mount_type(path: &std::path::Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        (fields[4] == path_str(path)).then(|| fields[dash + 1].to_string())
    })
}

#[test]
fn sigterm_on_a_busy_mount_unmounts_once_it_is_free() {
    let vol = TestVolume::init();
    let mut daemon = vol
        .command()
        .args(["mount", "-f", path_str(&vol.backing), path_str(&vol.mnt)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("mounted", || mount_type(&vol.mnt).is_some());
    let busy = fs::File::create(vol.path("open")).unwrap();
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(1500));
    let still_mounted = mount_type(&vol.mnt).is_some();
    drop(busy);
    wait_until("unmounted once free", || {
        daemon.try_wait().unwrap().is_some() && mount_type(&vol.mnt).is_none()
    });
    assert!(still_mounted, "a busy mount stays mounted");
    assert!(daemon.wait().unwrap().success());
}

/// A stop must end (systemd waits for it): after `lazy_unmount_after` a
/// busy mount is detached, its open files keep working, and the daemon
/// commits and exits once the last one closes. Never a stale mount.
#[test]
fn sigterm_on_a_mount_busy_too_long_detaches_it_and_exits_once_free() {
    let vol = TestVolume::init();
    let mut daemon = vol
        .command()
        .args([
            "mount",
            "-f",
            "-o",
            "lazy_unmount_after=1s",
            path_str(&vol.backing),
            path_str(&vol.mnt),
        ])
        .stdout(Stdio::null())
        .stderr(fs::File::create(&vol.log).unwrap())
        .spawn()
        .unwrap();
    wait_until("mounted", || mount_type(&vol.mnt).is_some());
    let mut busy = fs::File::create(vol.path("open")).unwrap();
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    wait_until("detached", || mount_type(&vol.mnt).is_none());
    std::io::Write::write_all(&mut busy, b"written after the detach").unwrap();
    busy.sync_all().unwrap();
    assert!(daemon.try_wait().unwrap().is_none(), "serving the open file");
    drop(busy);
    wait_until("exited once free", || daemon.try_wait().unwrap().is_some());
    assert!(daemon.wait().unwrap().success(), "{}", vol.log_text());
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("open")).unwrap(), b"written after the detach");
    m.unmount();
}

#[test]
fn a_killed_daemon_leaves_a_mount_that_status_mount_and_umount_name() {
    let vol = TestVolume::init();
    let (backing, mnt) = (path_str(&vol.backing), path_str(&vol.mnt));
    let m = vol.mount();
    fs::write(vol.path("f"), b"x").unwrap();
    let status: serde_json::Value = serde_json::from_slice(&vol.run(&["status", "--json", backing]).stdout).unwrap();
    assert!(status["failing"].is_null(), "a healthy mount: {status}");
    let pid = status["daemon_pid"].as_i64().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until("daemon gone", || unsafe { libc::kill(pid, 0) } != 0);
    let status = vol.run(&["status", backing]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("STALE") && text.contains(&format!("kmsfs umount {mnt}")),
        "{text}"
    );
    assert_eq!(
        status.status.code(),
        Some(6),
        "a script checking the exit status learns of it too"
    );
    let status = vol.run(&["status", "--json", backing]);
    assert_eq!(status.status.code(), Some(6));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&status.stdout).unwrap()["stale_mount"],
        true
    );
    let out = vol.run(&["mount", backing, mnt]);
    assert_eq!(out.status.code(), Some(6));
    assert!(
        stderr(&out).contains("stale kmsfs mount") && stderr(&out).contains(&format!("kmsfs umount {mnt}")),
        "{}",
        stderr(&out)
    );
    // Mounted again elsewhere before the stale mount is cleared.
    let elsewhere = vol.dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let out = vol.run(&["mount", backing, path_str(&elsewhere)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&vol.run(&["status", "--json", backing]).stdout).unwrap();
    assert_eq!(
        status["mountpoint"],
        path_str(&elsewhere),
        "the live mount, not the stale one"
    );
    assert_eq!(status["stale_mount"], false);
    let start = Instant::now();
    let out = vol.run(&["umount", mnt]);
    assert!(out.status.success(), "umount clears a stale mount: {}", stderr(&out));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "it does not wait for the other daemon"
    );
    assert!(mount_type(&vol.mnt).is_none());
    assert!(mount_type(&elsewhere).is_some(), "the live mount stays");
    let out = vol.run(&["umount", path_str(&elsewhere)]);
    assert!(out.status.success(), "{}", stderr(&out));
    drop(m);
    let m = vol.mount();
    m.unmount();
}

#[test]
fn mount_points_in_use_are_refused_unless_nonempty() {
    let vol = TestVolume::init();
    let (backing, mnt) = (path_str(&vol.backing), path_str(&vol.mnt));
    fs::write(vol.mnt.join("already-here"), b"x").unwrap();
    let out = vol.run(&["mount", backing, mnt]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("not empty") && stderr(&out).contains("nonempty"));
    let m = vol.mount_with(&["-o", "nonempty"]);
    assert_eq!(
        mount_type(&vol.mnt).as_deref(),
        Some("fuse.kmsfs"),
        "the type is fuse.kmsfs"
    );
    // Mounted already: a second mount names the first, not raw JSON.
    fs::remove_file(vol.path("already-here")).ok();
    let out = vol.run(&["mount", backing, mnt, "-o", "nonempty"]);
    assert_eq!(out.status.code(), Some(6));
    assert!(
        stderr(&out).contains("already mounted (daemon pid "),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains('{'), "{}", stderr(&out));
    // Over another mount (this one), without nonempty.
    let other = TestVolume::init();
    let out = other.run(&["mount", path_str(&other.backing), mnt]);
    assert_eq!(out.status.code(), Some(6));
    assert!(stderr(&out).contains("already a kmsfs mount point"), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("nonempty"),
        "no advice to mount on top: {}",
        stderr(&out)
    );
    m.unmount();
    fs::remove_file(vol.mnt.join("already-here")).unwrap();
    // Not over the backing directory itself, in it, or above it.
    let inside = vol.backing.join("mnt");
    fs::create_dir(&inside).unwrap();
    for (at, said) in [
        (backing, "is in the backing directory"),
        (path_str(&inside), "is in the backing directory"),
        (path_str(vol.dir.path()), "the mount would hide it"),
    ] {
        let out = vol.run(&["mount", backing, at, "-o", "nonempty"]);
        assert_eq!(out.status.code(), Some(6), "{at}: {}", stderr(&out));
        assert!(stderr(&out).contains(said), "{at}: {}", stderr(&out));
        assert!(!common::is_mounted(std::path::Path::new(at)));
    }
    fs::remove_dir(&inside).unwrap();
}

#[test]
fn status_of_a_mount_point_and_umount_with_fsname_or_backing_gone() {
    let vol = TestVolume::init();
    let mnt = path_str(&vol.mnt);
    let m = vol.mount_with(&["-o", "fsname=my-volume"]);
    assert_eq!(mount_type(&vol.mnt).as_deref(), Some("fuse.kmsfs"));
    m.unmount();

    let m = vol.mount();
    let status: serde_json::Value = serde_json::from_slice(&vol.run(&["status", "--json", mnt]).stdout).unwrap();
    assert_eq!(
        status["backing"],
        path_str(&vol.backing),
        "a mount point names its backing directory"
    );
    assert_eq!(status["mountpoint"], mnt);
    assert_eq!(status["mounted"], true);
    // The backing directory removed under a live mount: it still unmounts.
    let moved = vol.dir.path().join("moved-away");
    fs::rename(&vol.backing, &moved).unwrap();
    let out = vol.run(&["umount", mnt]);
    fs::rename(&moved, &vol.backing).unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(mount_type(&vol.mnt).is_none());
    drop(m);
}

#[test]
fn the_init_hint_repeats_the_options_mounting_needs() {
    let dir = tempfile::tempdir().unwrap();
    let keystore = dir.path().join("ks.json");
    let key_file = dir.path().join("volume.key");
    let backing = dir.path().join("v");
    let out = Command::new(common::kmsfs_bin())
        .env("KMSFS_CONFIG", dir.path().join("providers.toml"))
        .args(["--keystore", path_str(&keystore), "--key-file", path_str(&key_file)])
        .args(["init", path_str(&backing)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    let hint = said.lines().find_map(|l| l.strip_prefix("Mount it with: ")).unwrap();
    assert!(hint.starts_with("kmsfs "), "{hint}");
    assert!(hint.contains(&format!(" --keystore {} ", keystore.display())), "{hint}");
    assert!(hint.contains(&format!(" --key-file {} ", key_file.display())), "{hint}");
    assert!(
        hint.ends_with(&format!(" mount {} MOUNTPOINT", backing.display())),
        "{hint}"
    );
}

/// A plain `umount` (fstab users, `-o idle=`) returns before the daemon has
/// committed and exited: the next mount, `fsck` and `status` wait for it or
/// say so instead of calling the volume "already mounted".
#[test]
fn plain_umount_then_mount_again_at_once() {
    let vol = TestVolume::init();
    let (backing, mnt) = (path_str(&vol.backing), path_str(&vol.mnt));
    for round in 0..3 {
        let m = vol.mount();
        fs::write(vol.path(&format!("f{round}")), b"x").unwrap();
        assert!(Command::new("umount").arg(&vol.mnt).status().unwrap().success());
        drop(m);
    }
    // `status` stops saying "mounted" once the daemon has seen its unmount.
    wait_until("status says unmounted", || {
        let status = vol.run(&["status", "--json", backing]);
        let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        json["mounted"] == false
    });
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("f2")).unwrap(), b"x");
    m.unmount();
    let _ = mnt;
    let (code, report) = crate::common::fsck(&vol, &[]);
    assert_eq!(code, 0, "{report}");
    // Neither form of unmount leaves a warning about the unmount behind.
    let log = vol.log_text();
    assert!(!log.contains("umount"), "{log}");
}

/// A volume's mount lets the kernel keep what it looked up for 30 s (the
/// daemon is its backing directory's only writer), and `attr_timeout=`
/// shortens that. Seen from outside, with the one change a mount never
/// expects: a file whose backing name went away behind the mount is still
/// found 1.5 s later by default, and no longer with `attr_timeout=1`.
#[test]
fn the_kernel_keeps_a_volumes_entries_for_the_attr_timeout() {
    let vol = TestVolume::init();
    let backing_names = || -> Vec<std::ffi::OsString> {
        let mut names: Vec<_> = fs::read_dir(&vol.backing)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let aside = vol.dir.path().join("aside");
    for (name, options, kept) in [
        ("default", &[][..], true),
        ("short", &["-o", "attr_timeout=1"][..], false),
    ] {
        let m = vol.mount_with(options);
        let before = backing_names();
        fs::write(vol.path(name), b"x").unwrap();
        let made: Vec<_> = backing_names().into_iter().filter(|n| !before.contains(n)).collect();
        assert_eq!(made.len(), 1, "one backing name for {name}: {made:?}");
        let backing_file = vol.backing.join(&made[0]);
        assert!(fs::metadata(vol.path(name)).is_ok());
        fs::rename(&backing_file, &aside).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let found = fs::metadata(vol.path(name)).is_ok();
        fs::rename(&aside, &backing_file).unwrap();
        assert_eq!(found, kept, "{name}: the entry looked up 1.5 s ago");
        m.unmount();
    }
}

/// A mount whose source names no directory (`fsname=`) is found by its
/// daemon's host record: `umount` still refuses while file keys cannot be
/// committed, and still waits for the daemon once they are.
#[test]
fn umount_of_an_fsname_mount_finds_its_volume() {
    let vol = TestVolume::init();
    let mnt = path_str(&vol.mnt);
    let m = vol.mount_with(&["-o", "fsname=my-volume"]);
    let db = common::refuse_key_commits(&vol);
    fs::write(vol.path("kept"), b"kept").unwrap();
    wait_until("the daemon publishes the failure", || {
        fs::read_to_string(vol.backing.join("kmsfs.lock")).is_ok_and(|t| t.contains("injected failure"))
    });
    let out = vol.run(&["umount", mnt]);
    assert_eq!(out.status.code(), Some(7), "refused: {}", stderr(&out));
    assert!(mount_type(&vol.mnt).is_some());
    common::allow_key_commits(db);
    wait_until("the keys committed", || {
        vol.run(&["status", path_str(&vol.backing)]).status.success()
    });
    m.unmount();
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("kept")).unwrap(), b"kept");
    m.unmount();
}

/// A daemon that is stopped (SIGSTOP, a debugger) never answers: `umount`
/// unmounts its mount without asking it anything, then waits for it.
#[test]
fn umount_of_a_stopped_daemons_mount_does_not_wait_on_it() {
    struct Resume(i32);
    impl Drop for Resume {
        fn drop(&mut self) {
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    let vol = TestVolume::init();
    let backing = path_str(&vol.backing);
    // No attributes kept by the kernel: a look at the mount point asks the daemon.
    let m = vol.mount_with(&["-o", "attr_timeout=0"]);
    let status: serde_json::Value = serde_json::from_slice(&vol.run(&["status", "--json", backing]).stdout).unwrap();
    assert!(status["failing"].is_null(), "a healthy mount: {status}");
    let pid = status["daemon_pid"].as_i64().unwrap() as i32;
    common::wait_until_mount_recorded(&vol);
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let resume = Resume(pid);
    wait_until("the daemon is stopped", || {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") T "))
    });
    // `status` says so, and fails: everything on the mount waits.
    let out = vol.run(&["status", "--json", backing]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["daemon_stopped"], true, "{status}");
    assert!(
        status["failing"]
            .as_str()
            .is_some_and(|why| why.contains(&format!("kill -CONT {pid}"))),
        "one field says why it fails: {status}"
    );
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("kill -CONT {pid}")), "{}", stderr(&out));
    // Named by its mount point, the volume is found in the mount table,
    // without a look at the mount point (which would wait on the daemon:
    // resolving "MOUNTPOINT/" checks that it is a directory).
    let mut by_mountpoint = vol
        .command()
        .args(["status", "--json", &format!("{}/", path_str(&vol.mnt))])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let finished = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        by_mountpoint.try_wait().unwrap().is_some()
    });
    if !finished {
        let _ = by_mountpoint.kill();
    }
    let out = by_mountpoint.wait_with_output().unwrap();
    assert!(finished, "status of the mount point waits on the stopped daemon");
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    // A rotation would wait for the daemon to take the new version up: it
    // is refused at once, and nothing is begun.
    let started = Instant::now();
    let out = vol.run(&["rotate", path_str(&vol.mnt)]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("kill -CONT {pid}")), "{}", stderr(&out));
    assert!(started.elapsed() < Duration::from_secs(10), "refused without waiting");
    assert!(common::stdout(&vol.run(&["status", backing])).contains("rotation:       none"));
    let mut umount = vol.command().args(["umount", path_str(&vol.mnt)]).spawn().unwrap();
    wait_until("the stopped daemon's mount is gone", || !common::is_mounted(&vol.mnt));
    // Unmounted, the stopped daemon still holds the volume: said, not
    // "mounted: yes" with exit 0, nor a bare "already mounted".
    let out = vol.run(&["status", backing]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        common::stdout(&out).contains("no (unmounted), but") && stderr(&out).contains(&format!("kill -CONT {pid}")),
        "{}{}",
        common::stdout(&out),
        stderr(&out)
    );
    let out = vol.run(&["mount", backing, path_str(&vol.mnt)]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("kill -CONT {pid}")), "{}", stderr(&out));
    drop(resume);
    assert!(umount.wait().unwrap().success());
    drop(m);
}

/// A symlink to a mount point names that mount for `umount`.
#[test]
fn umount_through_a_symlink_to_the_mount_point() {
    let vol = TestVolume::init();
    let m = vol.mount();
    let link = vol.dir.path().join("link-to-mount");
    std::os::unix::fs::symlink(&vol.mnt, &link).unwrap();
    let out = vol.run(&["umount", path_str(&link)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!common::is_mounted(&vol.mnt));
    drop(m);
}

/// `umount BACKING` unmounts the volume's one mount, as `status`, `rotate`
/// and `fsck` take either path; a volume that is not mounted is said to be
/// so.
#[test]
fn umount_of_the_backing_directory_unmounts_its_mount() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::write(vol.path("f"), b"kept").unwrap();
    let out = vol.run(&["umount", path_str(&vol.backing)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!common::is_mounted(&vol.mnt));
    drop(m);
    let out = vol.run(&["umount", path_str(&vol.backing)]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not mounted"), "{}", stderr(&out));
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("f")).unwrap(), b"kept");
    drop(m);
}

/// fusermount3 refuses `allow_other` to a normal user unless /etc/fuse.conf
/// says `user_allow_other`: the mount fails saying so, mounts nothing and
/// leaves no daemon. Run by the normal-user pass of scripts/test.sh (root
/// needs no such line).
#[test]
fn allow_other_by_a_normal_user_needs_user_allow_other() {
    let conf = fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    let allowed = conf
        .lines()
        .any(|line| line.split('#').next().unwrap_or("").trim() == "user_allow_other");
    if unsafe { libc::geteuid() } == 0 || allowed {
        eprintln!("nothing to check: run as root, or /etc/fuse.conf allows other users");
        return;
    }
    let vol = TestVolume::init();
    let out = vol.run(&["mount", path_str(&vol.backing), path_str(&vol.mnt), "-o", "allow_other"]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("user_allow_other") && stderr(&out).contains("/etc/fuse.conf"),
        "names the setting and the file: {}",
        stderr(&out)
    );
    assert!(!common::is_mounted(&vol.mnt));
    let status: serde_json::Value =
        serde_json::from_slice(&vol.run(&["status", "--json", path_str(&vol.backing)]).stdout).unwrap();
    assert!(status["daemon_pid"].is_null(), "no daemon left: {status}");
    // Without the option the same user mounts.
    let m = vol.mount();
    fs::write(vol.path("mine"), b"only mine").unwrap();
    drop(m);
}
