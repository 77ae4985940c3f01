//! The backing directory is attacker-controlled, `kmsfs.db` included: what it
//! records about the key provider may name a key, never code to load, an
//! address to send credentials to, or a file to read.

use crate::common;

use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{TestVolume, path_str, stderr};

fn set_recorded_provider(vol: &TestVolume, provider: &str, blob: &[u8]) {
    let db = rusqlite::Connection::open(vol.backing.join("kmsfs.db")).unwrap();
    db.execute("UPDATE volume SET provider = ?1", [provider]).unwrap();
    db.execute("UPDATE volume_keys SET wrapped = ?1", [blob]).unwrap();
}

/// A shared library whose constructor creates `marker` when it is loaded.
fn build_marker_library(dir: &Path, marker: &Path) -> std::path::PathBuf {
    let source = dir.join("evil.c");
    let library = dir.join("evil.so");
    std::fs::write(
        &source,
        format!(
            "#include <fcntl.h>\n#include <unistd.h>\n\
             __attribute__((constructor)) static void run(void) {{\n\
             int fd = open(\"{}\", O_CREAT | O_WRONLY, 0644); if (fd >= 0) close(fd); }}\n",
            marker.display()
        ),
    )
    .unwrap();
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-o", path_str(&library), path_str(&source)])
        .output()
        .expect("run cc");
    assert!(out.status.success(), "cc: {}", stderr(&out));
    std::fs::remove_file(&source).unwrap();
    library
}

#[test]
fn a_module_path_in_the_db_is_never_loaded() {
    let vol = TestVolume::init();
    let outside = tempfile::tempdir().unwrap();
    let marker = outside.path().join("code-ran");
    let library = build_marker_library(&vol.backing, &marker);

    // Positive control: loading the library does create the marker.
    let out = Command::new("python3")
        .args(["-c", &format!("import ctypes; ctypes.CDLL('{}')", library.display())])
        .output()
        .unwrap();
    assert!(out.status.success() && marker.exists(), "control: {}", stderr(&out));
    std::fs::remove_file(&marker).unwrap();

    let pkcs11_like_blob = [&[1u8][..], &[0u8; 12 + 32 + 16]].concat();
    set_recorded_provider(
        &vol,
        &format!(
            "pkcs11:token=t;object=o?module-path={}&pin-value=6543",
            library.display()
        ),
        &pkcs11_like_blob,
    );
    let (backing, mnt) = (path_str(&vol.backing), path_str(&vol.mnt));
    for args in [
        vec!["fsck", backing],
        vec!["status", backing],
        vec!["status", "--json", "--check-key", backing],
        vec!["mount", backing, mnt],
        vec!["rotate", backing],
    ] {
        let out = vol
            .command()
            .env_remove("KMSFS_PKCS11_MODULE")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            !marker.exists(),
            "`kmsfs {}` loaded a library named by the volume",
            args[0]
        );
        let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        assert!(!printed.contains("6543"), "a PIN from the DB was printed: {printed}");
        assert!(!printed.contains("evil.so"), "the DB's module path was used: {printed}");
        if args[0] == "status" && args.len() == 2 {
            assert!(out.status.success(), "status: {printed}");
            assert!(printed.contains("pkcs11:token=t;object=o"), "{printed}");
        } else {
            assert_eq!(out.status.code(), Some(5), "{args:?}: {printed}");
            assert!(printed.contains("does not name"), "{args:?}: {printed}");
        }
    }
}

/// Runs `cmd` while accepting (and dropping) every connection to `listener`;
/// returns the command's output and how many connections it made.
fn connections_during(listener: &TcpListener, mut cmd: Command) -> (Output, usize) {
    listener.set_nonblocking(true).unwrap();
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut connections = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                connections += 1;
                drop(stream);
                continue;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    while listener.accept().is_ok() {
        connections += 1;
    }
    (out, connections)
}

#[test]
fn addresses_and_token_files_in_the_db_are_never_used() {
    let vol = TestVolume::init();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let users_token = vol.dir.path().join("users-vault-token");
    std::fs::write(&users_token, "s.users-secret-token\n").unwrap();
    let vault = format!(
        "vault-transit:http://127.0.0.1:{port}/transit/k?token_file={}",
        users_token.display()
    );
    let aws = format!("aws-kms:alias/k?endpoint=http%3A%2F%2F127.0.0.1%3A{port}&profile=attacker");

    // Positive control: the same URI given by the user does connect.
    let mut control = vol.command();
    control.args(["--kms", &vault, "status", "--check-key", path_str(&vol.backing)]);
    set_recorded_provider(&vol, &vault, b"vault:v1:AAAA");
    let (_, made) = connections_during(&listener, control);
    assert!(made > 0, "control: a user-given address is reached");

    let (backing, mnt) = (path_str(&vol.backing), path_str(&vol.mnt));
    for recorded in [&vault, &aws] {
        set_recorded_provider(&vol, recorded, b"vault:v1:AAAA");
        for args in [
            vec!["mount", backing, mnt],
            vec!["status", "--check-key", backing],
            vec!["fsck", backing],
            vec!["rewrap", backing],
        ] {
            let mut cmd = vol.command();
            cmd.env("VAULT_TOKEN", "s.env-secret-token")
                .env("AWS_ACCESS_KEY_ID", "AKIDUSER")
                .env("AWS_SECRET_ACCESS_KEY", "users-aws-secret")
                .env("AWS_REGION", "us-east-1")
                .env_remove("VAULT_ADDR")
                .env_remove("AWS_ENDPOINT_URL")
                .env_remove("AWS_ENDPOINT_URL_KMS")
                .args(&args);
            let (out, made) = connections_during(&listener, cmd);
            assert_eq!(made, 0, "{recorded}: `kmsfs {}` connected to the DB's address", args[0]);
            assert!(!out.status.success(), "{args:?}");
            let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
            assert!(!printed.contains("secret-token"), "{printed}");
        }
    }
}

#[test]
fn a_configured_provider_that_names_another_key_is_refused() {
    let vol = TestVolume::init();
    let (backing, mnt) = (path_str(&vol.backing), path_str(&vol.mnt));
    let status: serde_json::Value = serde_json::from_slice(&vol.run(&["status", "--json", backing]).stdout).unwrap();
    let volume_id = status["volume_id"].as_str().unwrap().to_string();
    let recorded = status["provider"].as_str().unwrap().to_string();
    assert!(recorded.starts_with("local:mk-"), "{recorded}");

    // The host configuration says this volume uses Vault; the DB says local.
    std::fs::write(
        &vol.config,
        format!("[volumes.{volume_id}]\nkms = \"vault-transit:http://127.0.0.1:1/transit/k\"\n"),
    )
    .unwrap();
    let out = vol.run(&["mount", backing, mnt]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("records key provider {recorded}"))
            && stderr(&out).contains("names vault-transit:transit/k"),
        "names both: {}",
        stderr(&out)
    );
    std::fs::remove_file(&vol.config).unwrap();

    // --kms naming another local key.
    let out = vol.run(&[
        "--kms",
        "local:mk-000000000000000000000000",
        "status",
        "--check-key",
        backing,
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    // The DB edited to name another key than the host configured.
    std::fs::write(
        &vol.config,
        format!("[volumes.{volume_id}]\nkms = \"vault-transit:https://vault.example:8200/transit/k\"\n"),
    )
    .unwrap();
    set_recorded_provider(&vol, "vault-transit:transit/attackers-key", b"vault:v1:AAAA");
    let out = vol.run(&["status", "--check-key", backing]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("records key provider vault-transit:transit/attackers-key"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn plain_http_only_to_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("providers.toml");
    let run = |env: &[(&str, &str)], kms: &str| {
        Command::new(common::kmsfs_bin())
            .env("KMSFS_CONFIG", &config)
            .env("VAULT_TOKEN", "t")
            .env("AWS_ACCESS_KEY_ID", "a")
            .env("AWS_SECRET_ACCESS_KEY", "s")
            .env("AWS_REGION", "us-east-1")
            .env_remove("VAULT_ADDR")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT_URL_KMS")
            .envs(env.iter().copied())
            .args(["--kms", kms, "init", path_str(&dir.path().join("v"))])
            .output()
            .unwrap()
    };
    for (env, kms) in [
        (vec![], "vault-transit:http://192.0.2.1:8200/transit/k"),
        (
            vec![("VAULT_ADDR", "http://vault.example:8200")],
            "vault-transit:transit/k",
        ),
        (vec![], "aws-kms:alias/k?endpoint=http%3A%2F%2F192.0.2.1"),
        (vec![("AWS_ENDPOINT_URL", "http://192.0.2.1:4566")], "aws-kms:alias/k"),
    ] {
        let out = run(&env, kms);
        assert_eq!(out.status.code(), Some(2), "{kms} {env:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("https://"), "{}", stderr(&out));
        assert!(!dir.path().join("v").exists(), "nothing created");
    }
}

#[test]
fn a_db_switched_to_a_remote_provider_contacts_nothing_and_prints_no_escapes() {
    let vol = TestVolume::init();
    let (backing, mnt) = (path_str(&vol.backing), path_str(&vol.mnt));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // A local volume edited to name a remote key: with the user's AWS
    // settings in the environment, nothing on this host named it.
    set_recorded_provider(&vol, "aws-kms:arn:aws:kms:us-east-1:999999999999:key/attacker", b"blob");
    let mut cmd = vol.command();
    cmd.env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
        .env("AWS_ACCESS_KEY_ID", "AKIDUSER")
        .env("AWS_SECRET_ACCESS_KEY", "users-aws-secret")
        .env("AWS_REGION", "us-east-1")
        .args(["mount", backing, mnt]);
    let (out, made) = connections_during(&listener, cmd);
    assert_eq!(made, 0, "contacted a provider only the DB named");
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("does not name for it"), "{}", stderr(&out));
    // Escape sequences and fake lines from the DB are shown escaped.
    set_recorded_provider(&vol, "local:mk-x\u{1b}]0;PWNED\u{7}\nfake line: FAKE", b"blob");
    for args in [vec!["status", backing], vec!["mount", backing, mnt]] {
        let out = vol.run(&args);
        let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        assert!(
            !printed.contains('\u{1b}') && !printed.contains('\u{7}'),
            "{args:?}: {printed:?}"
        );
        assert!(
            !printed.contains("\nfake line: FAKE"),
            "{args:?}: a fake line: {printed}"
        );
    }
}
