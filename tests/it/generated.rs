//! What scripts and packagers take from the command line: shell completions
//! and man pages generated from the clap definitions, and errors as JSON
//! under `--json`.

use std::process::Command;

use crate::common::{TestVolume, kmsfs_bin};

fn kmsfs(args: &[&str]) -> std::process::Output {
    Command::new(kmsfs_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

#[test]
fn completions_for_each_shell_name_the_commands_and_parse() {
    for (shell, marker) in [
        ("bash", "_kmsfs()"),
        ("zsh", "#compdef kmsfs"),
        ("fish", "complete -c kmsfs"),
    ] {
        let out = kmsfs(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: {}", &script[..script.len().min(200)]);
        for command in ["mount", "umount", "rotate", "fsck", "status"] {
            assert!(script.contains(command), "{shell} completes {command}");
        }
    }
    let script = String::from_utf8(kmsfs(&["completions", "bash"]).stdout).unwrap();
    let checked = Command::new("bash").args(["-n", "-c", &script]).status().unwrap();
    assert!(checked.success(), "bash parses its completion script");
    let bad = kmsfs(&["completions", "tcsh"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn man_pages_cover_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("man1");
    let out = kmsfs(&["manpages", out_dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let main = std::fs::read_to_string(out_dir.join("kmsfs.1")).unwrap();
    assert!(main.contains(".TH kmsfs 1"), "{main}");
    for page in [
        "mount",
        "umount",
        "init",
        "rotate",
        "rewrap",
        "rekey",
        "fsck",
        "status",
        "key-rotate",
    ] {
        let text = std::fs::read_to_string(out_dir.join(format!("kmsfs-{page}.1")))
            .unwrap_or_else(|e| panic!("kmsfs-{page}.1: {e}"));
        assert!(text.contains(".SH SYNOPSIS"), "kmsfs-{page}.1");
    }
    let mount = std::fs::read_to_string(out_dir.join("kmsfs-mount.1")).unwrap();
    assert!(mount.contains("allow_other"), "the -o options are in the mount page");
}

#[test]
fn with_json_errors_are_json_on_stderr_with_code_and_exit_status() {
    let vol = TestVolume::init();
    let missing = vol.dir.path().join("missing");
    let out = vol.run(&["status", missing.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(out.stdout.is_empty());
    let error: serde_json::Value =
        serde_json::from_slice(&out.stderr).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(error["error"]["code"], "volume");
    assert_eq!(error["error"]["exit_status"], 4);
    assert!(error["error"]["message"].as_str().unwrap().contains("does not exist"));

    // Usage errors too, and the exit status is the one given.
    let out = vol.run(&["fsck", "--json", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let error: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(error["error"]["code"], "usage");
    assert!(error["error"]["message"].as_str().unwrap().contains("--no-such-flag"));

    // Log lines are JSON objects too: stderr is read as JSON lines.
    std::fs::write(vol.backing.join("kmsfs.pending-keys"), "{garbage").unwrap();
    let out = vol.run(&["fsck", "--json", vol.backing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(10), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["log"]["level"] == "ERROR"
            && l["log"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("is not a pending-keys file kmsfs wrote"))),
        "{lines:?}"
    );

    // Without --json: one line for a person.
    let out = vol.run(&["status", missing.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("kmsfs: "));

    // Every command that takes --json says what it does.
    for command in [
        &["init"][..],
        &["rotate"],
        &["rewrap"],
        &["rekey"],
        &["fsck"],
        &["status"],
        &["key", "list"],
        &["key", "rotate"],
    ] {
        let help = kmsfs(&[command, &["--help"]].concat());
        assert!(
            String::from_utf8_lossy(&help.stdout).contains("errors as JSON on stderr"),
            "{command:?} --help"
        );
    }
}

/// The passphrase from a program (`--extpass`, as gocryptfs's -extpass) or
/// from systemd's credentials directory (`LoadCredential=`), with no
/// passphrase in the environment.
#[test]
fn passphrase_from_extpass_and_from_systemd_credentials() {
    let vol = TestVolume::init();
    let without_env = |args: &[&str], extra: &[(&str, &std::path::Path)]| {
        let mut cmd = vol.command();
        cmd.env_remove("KMSFS_PASSPHRASE");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.args(args).output().unwrap()
    };
    let right = format!("printf '%s\\n' '{}'", crate::common::PASSPHRASE);
    let out = without_env(&["--extpass", &right, "key", "list", "--json"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("mk-"));

    for (command, why) in [
        ("printf 'wrong\\n'", "passphrase"),
        ("exit 3", "--extpass command failed"),
        ("true", "empty passphrase"),
    ] {
        let out = without_env(&["--extpass", command, "key", "list"], &[]);
        assert_eq!(out.status.code(), Some(3), "{command}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(why),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let both = without_env(
        &["--extpass", &right, "--passphrase-file", "/dev/null", "key", "list"],
        &[],
    );
    assert_eq!(both.status.code(), Some(2), "--extpass and --passphrase-file conflict");

    // An empty passphrase is a mistake named as one, not a wrong guess.
    let empty_file = tempfile::NamedTempFile::new().unwrap();
    let out = without_env(
        &["--passphrase-file", empty_file.path().to_str().unwrap(), "key", "list"],
        &[],
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the passphrase from the passphrase file is empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = vol
        .command()
        .env("KMSFS_PASSPHRASE", "")
        .args(["key", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the passphrase from KMSFS_PASSPHRASE is empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let credentials = tempfile::tempdir().unwrap();
    let out = without_env(&["key", "list"], &[("CREDENTIALS_DIRECTORY", credentials.path())]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "an empty credentials directory gives nothing"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("kmsfs-passphrase"));
    std::fs::write(
        credentials.path().join("kmsfs-passphrase"),
        format!("{}\n", crate::common::PASSPHRASE),
    )
    .unwrap();
    let out = without_env(&["key", "list"], &[("CREDENTIALS_DIRECTORY", credentials.path())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A keystore unlocked by a key file: the credential `kmsfs-key-file`.
    let keyed_dir = tempfile::tempdir().unwrap();
    let key_file = keyed_dir.path().join("volume.key");
    let keyed = TestVolume::init_with(
        &[],
        &[
            "--key-file",
            key_file.to_str().unwrap(),
            "--kdf-memory-mib",
            "19",
            "--kdf-iterations",
            "2",
        ],
    );
    let listed = |creds: &std::path::Path| {
        keyed
            .command()
            .env_remove("KMSFS_PASSPHRASE")
            .env("CREDENTIALS_DIRECTORY", creds)
            .args(["key", "list"])
            .output()
            .unwrap()
    };
    let key_credentials = tempfile::tempdir().unwrap();
    std::fs::copy(&key_file, key_credentials.path().join("kmsfs-key-file")).unwrap();
    let out = listed(key_credentials.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(key_credentials.path().join("kmsfs-key-file"), [7u8; 32]).unwrap();
    assert_eq!(
        listed(key_credentials.path()).status.code(),
        Some(3),
        "another key file is refused"
    );
}
