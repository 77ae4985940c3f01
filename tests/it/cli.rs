//! The command line: read-only mounts, the mount(8) helper form, foreground
//! mode with signals, and `status --json`.

use crate::common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{PASSPHRASE, TestVolume, path_str};

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
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(path_str(&vol.mnt)))
        .unwrap();
    let options = line.split(' ').nth(5).unwrap();
    for flag in ["ro", "noexec", "nosuid", "nodev"] {
        assert!(options.split(',').any(|o| o == flag), "{flag} in {options}");
    }
    assert_eq!(
        fs::write(vol.path("new"), b"x").unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
}

#[test]
fn concurrent_inits_and_key_rotations_keep_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let keystore = dir.path().join("keystore.json");
    let kmsfs = |args: &[&str]| {
        let mut cmd = Command::new(common::kmsfs_bin());
        cmd.env("KMSFS_KEYSTORE", &keystore)
            .env("KMSFS_PASSPHRASE", PASSPHRASE)
            .env("KMSFS_CONFIG", dir.path().join("providers.toml"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    };
    let wait_all = |children: Vec<std::process::Child>| {
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    };
    // Eight inits race to create the keystore, then to add their keys.
    let volumes: Vec<_> = (0..8).map(|i| dir.path().join(format!("v{i}"))).collect();
    let children = volumes
        .iter()
        .map(|v| {
            kmsfs(&["init", path_str(v), "--kdf-memory-mib", "19", "--kdf-iterations", "2"])
                .spawn()
                .unwrap()
        })
        .collect();
    wait_all(children);
    let list = kmsfs(&["key", "list", "--json"]).output().unwrap();
    let keys: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 8, "{keys}");
    let key = keys[0]["id"].as_str().unwrap().to_string();
    let children = (0..4)
        .map(|_| kmsfs(&["key", "rotate", &key]).spawn().unwrap())
        .collect();
    wait_all(children);
    let list = kmsfs(&["key", "list", "--json"]).output().unwrap();
    let keys: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let rotated = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == key.as_str())
        .unwrap();
    assert_eq!(rotated["versions"].as_array().unwrap().len(), 5, "{rotated}");
    for v in &volumes {
        let out = kmsfs(&["status", "--check-key", path_str(v)]).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            v.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn init_makes_private_files_and_a_refused_init_makes_no_key() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let vol = TestVolume::init();
    assert_eq!(mode(&vol.backing), 0o700, "backing directory");
    assert_eq!(mode(&vol.backing.join("kmsfs.db")), 0o600, "metadata DB");
    let m = vol.mount();
    fs::write(vol.path("f"), b"x").unwrap();
    let wal = vol.backing.join("kmsfs.db-wal");
    assert!(wal.exists());
    assert_eq!(mode(&wal), 0o600, "WAL");
    m.unmount();

    let key_count = || {
        let out = vol.run(&["key", "list", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    let before = key_count();
    let not_empty = vol.dir.path().join("not-empty");
    fs::create_dir(&not_empty).unwrap();
    fs::write(not_empty.join("x"), b"x").unwrap();
    for target in [&not_empty, &vol.backing] {
        let out = vol.run(&["init", path_str(target)]);
        assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(key_count(), before, "a refused init leaves no master key behind");
}

#[test]
fn the_daemon_keeps_no_passphrase_in_its_environment_dumps_no_core_and_logs_no_names() {
    let vol = TestVolume::init();
    let out = vol
        .command()
        .env("RUST_LOG", "debug")
        .args([
            "mount",
            path_str(&vol.backing),
            path_str(&vol.mnt),
            "--log-file",
            path_str(&vol.log),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = vol.run(&["status", "--json", path_str(&vol.backing)]);
    let pid = serde_json::from_slice::<serde_json::Value>(&status.stdout).unwrap()["daemon_pid"]
        .as_u64()
        .unwrap();
    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap();
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    fs::write(vol.path("a-plaintext-name"), b"x").unwrap();
    fs::read_dir(&vol.mnt).unwrap().for_each(drop);
    let unmounted = vol.run(&["umount", path_str(&vol.mnt)]);
    assert!(unmounted.status.success());
    assert!(
        !environ.windows(PASSPHRASE.len()).any(|w| w == PASSPHRASE.as_bytes()),
        "the passphrase is readable in /proc/PID/environ"
    );
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
    assert!(core.split_whitespace().skip(4).take(2).all(|v| v == "0"), "{core}");
    let log = vol.log_text();
    assert!(log.contains("DEBUG"), "debug logging is on: {log}");
    assert!(!log.contains("a-plaintext-name"), "a plaintext name in the debug log");
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
        assert_eq!(json["format_version"], 2);
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

/// The per-mount kernel limits are applied after mounting, and bad values
/// are refused with a usage error naming the option.
#[test]
fn kernel_limits_are_set_and_bad_cache_options_refused() {
    let vol = TestVolume::init();
    let bdi_value = |name: &str| {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let device = info
            .lines()
            .find(|l| l.split(' ').nth(4) == vol.mnt.to_str())
            .and_then(|l| l.split(' ').nth(2))
            .expect("mounted")
            .to_string();
        std::fs::read_to_string(format!("/sys/class/bdi/{device}/{name}"))
            .unwrap()
            .trim()
            .to_string()
    };
    let m = vol.mount();
    assert_eq!(bdi_value("read_ahead_kb"), "1024", "the default readahead");
    m.unmount();
    let m = vol.mount_with(&[
        "-o",
        "read_ahead_kb=2048,bdi_max_ratio=15,bdi_strict_limit=0,attr_timeout=0.5",
    ]);
    assert_eq!(bdi_value("read_ahead_kb"), "2048");
    assert_eq!(bdi_value("max_ratio"), "15");
    assert_eq!(bdi_value("strict_limit"), "0");
    std::fs::write(vol.path("f"), b"data").unwrap();
    m.unmount();

    for bad in [
        "read_ahead_kb=lots",
        "bdi_max_ratio=0",
        "attr_timeout=-1",
        "bdi_strict_limit=2",
    ] {
        let out = vol.run(&["mount", path_str(&vol.backing), path_str(&vol.mnt), "-o", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad} is a usage error");
        let name = bad.split('=').next().unwrap();
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(name),
            "the message names {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_background_daemon_without_a_log_file_logs_to_syslog() {
    let vol = TestVolume::init();
    let socket_path = vol.dir.path().join("syslog.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let m = vol.mount();
    fs::write(vol.path("victim"), vec![7u8; 9000]).unwrap();
    m.unmount();
    let backing_file = fs::read_dir(&vol.backing)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().contains('.'))
        .unwrap();
    let mut bytes = fs::read(&backing_file).unwrap();
    bytes[18 + 100] ^= 1;
    fs::write(&backing_file, bytes).unwrap();
    let out = vol
        .command()
        .env("KMSFS_LOG_SOCKET", &socket_path)
        .args(["mount", path_str(&vol.backing), path_str(&vol.mnt)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = fs::read(vol.path("victim"));
    let unmounted = vol.run(&["umount", path_str(&vol.mnt)]);
    assert_eq!(read.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(unmounted.status.success());
    let mut buf = vec![0u8; 4096];
    let mut received = String::new();
    while !received.contains("fails authentication") {
        let n = socket.recv(&mut buf).expect("a syslog line about the damaged block");
        received.push_str(&String::from_utf8_lossy(&buf[..n]));
        received.push('\n');
    }
    assert!(
        received.contains("<27>kmsfs["),
        "an error at facility daemon: {received}"
    );
    // No syslog on the host: the daemon logs to a file of its own, which
    // `mount` names while the terminal is there.
    let out = vol
        .command()
        .env("KMSFS_LOG_SOCKET", vol.dir.path().join("no-syslog.sock"))
        .args(["mount", path_str(&vol.backing), path_str(&vol.mnt)])
        .output()
        .unwrap();
    let said = common::stderr(&out);
    assert!(out.status.success(), "{said}");
    let read = fs::read(vol.path("victim"));
    let unmounted = vol.run(&["umount", path_str(&vol.mnt)]);
    assert_eq!(read.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(unmounted.status.success());
    let log = said
        .lines()
        .find_map(|l| {
            l.split_once("the daemon logs to ")
                .map(|(_, file)| file.trim().to_string())
        })
        .unwrap_or_else(|| panic!("names its log file: {said}"));
    let logged = fs::read_to_string(&log).unwrap();
    fs::remove_file(&log).unwrap();
    assert!(logged.contains("fails authentication"), "{logged}");
}

#[test]
fn output_to_a_closed_pipe_or_a_full_disk_ends_cleanly_and_says_so() {
    let vol = TestVolume::init();
    let closed_pipe = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    let run_into = |args: &[&str], stdout: Stdio| {
        vol.command()
            .args(args)
            .stdout(stdout)
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    // A reader that went away (`kmsfs status | head -0`): the status a shell
    // reports for SIGPIPE, and no panic message.
    let out = run_into(&["status", path_str(&vol.backing)], closed_pipe().into());
    assert_eq!(out.status.code(), Some(141), "{}", common::stderr(&out));
    assert!(common::stderr(&out).is_empty(), "{}", common::stderr(&out));
    // The work is done whole, its audit record included, before any output.
    let second = vol.dir.path().join("second");
    let out = run_into(
        &[
            "init",
            path_str(&second),
            "--kdf-memory-mib",
            "19",
            "--kdf-iterations",
            "2",
        ],
        closed_pipe().into(),
    );
    assert_eq!(out.status.code(), Some(141), "{}", common::stderr(&out));
    let audit = vol.run(&["audit", "--json"]);
    let records: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    let created = records
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "CreateVolume" && r["result"] == "ok")
        .count();
    assert_eq!(created, 2, "{records}");
    // A streamed listing ends the same way.
    let out = run_into(&["audit"], closed_pipe().into());
    assert_eq!(out.status.code(), Some(141), "{}", common::stderr(&out));
    // Output redirected to a full disk is an I/O error, not a silent success,
    // and with --json the error is JSON too.
    let full = || fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let out = run_into(&["status", "--json", path_str(&vol.backing)], full().into());
    assert_eq!(out.status.code(), Some(7), "{}", common::stderr(&out));
    let error: serde_json::Value = serde_json::from_str(common::stderr(&out).trim()).unwrap();
    assert_eq!(error["error"]["code"], "io", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("output could not be written"),
        "{error}"
    );
}
