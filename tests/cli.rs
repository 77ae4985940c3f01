//! The command line: read-only mounts, the mount(8) helper form, foreground
//! mode with signals, and `status --json`.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{PASSPHRASE, TestVolume, path_str};

fn is_mounted(path: &std::path::Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(path_str(path)))
}

#[test]
fn read_only_mount_refuses_writes() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::write(vol.path("kept"), b"before").unwrap();
    m.unmount();
    let _m = vol.mount_with(&["-o", "ro,noexec,nosuid"]);
    assert_eq!(fs::read(vol.path("kept")).unwrap(), b"before");
    assert_eq!(
        fs::write(vol.path("new"), b"x").unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
}

#[test]
fn mount_helper_form_with_fstab_options() {
    let vol = TestVolume::init();
    let helper = vol.dir.path().join("mount.kmsfs");
    std::os::unix::fs::symlink(common::kmsfs_bin(), &helper).unwrap();
    let pass = vol.dir.path().join("passphrase");
    fs::write(&pass, format!("{PASSPHRASE}\n")).unwrap();
    let opts = format!(
        "rw,nodev,keystore={},passphrase_file={}",
        path_str(&vol.keystore),
        path_str(&pass)
    );
    let out = Command::new(&helper)
        .env_remove("KMSFS_PASSPHRASE")
        .env_remove("KMSFS_KEYSTORE")
        .args([path_str(&vol.backing), path_str(&vol.mnt), "-n", "-o", &opts])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount.kmsfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = fs::write(vol.path("via-helper"), b"ok");
    let unmounted = vol.run(&["umount", path_str(&vol.mnt)]);
    written.unwrap();
    assert!(unmounted.status.success());
}

#[test]
fn foreground_daemon_unmounts_on_sigterm_and_status_reports() {
    let vol = TestVolume::init();
    let mut child = vol
        .command()
        .args(["mount", "-f", path_str(&vol.backing), path_str(&vol.mnt)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !is_mounted(&vol.mnt) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "foreground mount never became ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let result = std::panic::catch_unwind(|| {
        fs::write(vol.path("f"), b"foreground").unwrap();
        let status = vol.run(&["status", "--json", path_str(&vol.backing)]);
        assert!(status.status.success());
        let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(json["mounted"], true);
        assert_eq!(json["daemon_pid"], child.id());
        assert_eq!(json["format_version"], 1);
        assert!(json["provider"].as_str().unwrap().starts_with("local:mk-"));
        assert_eq!(json["volume_keys"][0]["state"], "active");
    });
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let exit = child.wait().unwrap();
    if is_mounted(&vol.mnt) {
        let _ = Command::new("umount").arg("-l").arg(&vol.mnt).status();
        panic!("SIGTERM did not unmount");
    }
    result.unwrap();
    assert!(exit.success(), "daemon exit status {exit:?}");
    let status = vol.run(&["status", "--json", path_str(&vol.backing)]);
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["mounted"], false);
    assert_eq!(
        json["file_keys"], 1,
        "the key of the written file was committed before exit"
    );
}
