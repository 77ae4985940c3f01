//! External key providers against real peers on loopback: AWS KMS (moto),
//! Vault Transit (OpenBao), PKCS#11 (SoftHSM2), plus scripted fakes for the
//! failures the peers cannot produce.

use crate::common;

use std::fs;

use crate::common::peers::{self, SoftHsm};
use crate::common::{TestVolume, path_str, stderr};

const AWS_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-east-1"),
];

fn status(vol: &TestVolume) -> serde_json::Value {
    let out = vol.run(&["status", "--json", path_str(&vol.backing)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// init, mount, write, unmount, remount, read back; returns what was written.
fn round_trip(vol: &TestVolume, files: usize) -> Vec<(String, Vec<u8>)> {
    let mount = vol.mount();
    let written: Vec<(String, Vec<u8>)> = (0..files)
        .map(|i| {
            (
                format!("f{i}"),
                format!("content of file {i} ").repeat(1 + i % 7).into_bytes(),
            )
        })
        .collect();
    for (name, data) in &written {
        fs::write(vol.path(name), data).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(500)); // let the daemon publish its call count
    let s = status(vol);
    assert_eq!(
        s["daemon_provider_calls"], 1,
        "mount + {files} files: one provider call per volume-key version: {s}"
    );
    mount.unmount();
    let _m = vol.mount();
    for (name, data) in written.iter().step_by((files / 50).max(1)) {
        assert_eq!(&fs::read(vol.path(name)).unwrap(), data, "{name}");
    }
    written
}

fn check_read(vol: &TestVolume, written: &[(String, Vec<u8>)]) {
    let _m = vol.mount();
    for (name, data) in written.iter().step_by((written.len() / 20).max(1)) {
        assert_eq!(&fs::read(vol.path(name)).unwrap(), data, "{name}");
    }
}

#[test]
fn aws_kms_with_moto_round_trip_rotation_rewrap_and_10000_files_one_call() {
    let moto = peers::moto();
    peers::moto_create_key(&moto.url(), "alias/kmsfs");
    let uri = format!("aws-kms:alias/kmsfs?endpoint={}", moto.url());
    let vol = TestVolume::init_with(AWS_ENV, &["--kms", &uri]);
    let s = status(&vol);
    // The volume records the key, not how to reach it (that is the host's).
    assert_eq!(s["provider"], "aws-kms:alias/kmsfs");
    let config = fs::read_to_string(&vol.config).unwrap();
    assert!(
        config.contains(&uri),
        "init records the URI in the host configuration: {config}"
    );
    assert_eq!(s["master_key_id"], "alias/kmsfs");
    let written = round_trip(&vol, 10_000);
    let out = vol.run(&["rotate", path_str(&vol.backing)]);
    assert!(out.status.success(), "rotate: {}", stderr(&out));
    let out = vol.run(&["rewrap", "--json", path_str(&vol.backing)]);
    assert!(out.status.success(), "rewrap (ReEncrypt): {}", stderr(&out));
    check_read(&vol, &written);
    let out = vol.run(&["status", "--check-key", path_str(&vol.backing)]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Enabled"),
        "DescribeKey: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Endpoint from the standard variable instead of the URI.
    let plain_uri = "aws-kms:alias/kmsfs";
    let mut env: Vec<(&str, &str)> = AWS_ENV.to_vec();
    let endpoint = moto.url();
    env.push(("AWS_ENDPOINT_URL_KMS", &endpoint));
    let vol2 = TestVolume::init_with(&env, &["--kms", plain_uri]);
    round_trip(&vol2, 20);
}

#[test]
fn aws_credentials_from_a_shared_profile_and_from_imdsv2() {
    let moto = peers::moto();
    peers::moto_create_key(&moto.url(), "alias/creds");
    let home = tempfile::tempdir().unwrap();
    fs::create_dir(home.path().join(".aws")).unwrap();
    fs::write(home.path().join(".aws/credentials"), "[default]\naws_access_key_id = nope\n\n[dev]\naws_access_key_id = AKIDDEV\naws_secret_access_key = devsecret\n").unwrap();
    fs::write(home.path().join(".aws/config"), "[profile dev]\nregion = us-east-1\n").unwrap();
    let uri = format!("aws-kms:alias/creds?endpoint={}", moto.url());
    let home_str = path_str(home.path()).to_string();
    let vol = TestVolume::init_with(&[("HOME", home_str.as_str()), ("AWS_PROFILE", "dev")], &["--kms", &uri]);
    round_trip(&vol, 5);

    // No environment credentials, no shared files: the instance metadata service (a loopback fake).
    let imds = peers::python_fake("imds.py", &["AKIDIMDS", "imdssecret"]);
    let empty_home = tempfile::tempdir().unwrap();
    let empty = path_str(empty_home.path()).to_string();
    let imds_url = imds.url();
    let out = std::process::Command::new(common::kmsfs_bin())
        .env("HOME", &empty)
        .env("KMSFS_CONFIG", &vol.config)
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds_url)
        .env_remove("AWS_EC2_METADATA_DISABLED")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_REGION")
        .args(["--kms", &uri, "init", path_str(&vol.dir.path().join("imds-volume"))])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init with IMDSv2 credentials and region: {}",
        stderr(&out)
    );
}

#[test]
fn aws_kms_failures_unreachable_disabled_and_throttled() {
    let moto = peers::moto();
    peers::moto_create_key(&moto.url(), "alias/fail");
    let uri = format!("aws-kms:alias/fail?endpoint={}", moto.url());
    let vol = TestVolume::init_with(AWS_ENV, &["--kms", &uri]);
    round_trip(&vol, 3);
    let (backing, mnt) = (path_str(&vol.backing), path_str(&vol.mnt));

    let closed = format!("aws-kms:alias/fail?endpoint=http://127.0.0.1:{}", peers::free_port());
    let out = vol.run(&["--kms", &closed, "mount", backing, mnt]);
    assert_eq!(out.status.code(), Some(8), "unreachable: {}", stderr(&out));
    assert!(
        stderr(&out).contains("aws-kms") && stderr(&out).contains("unreachable"),
        "{}",
        stderr(&out)
    );

    // The key looked for in another region: the refusal says which.
    let elsewhere = format!("{uri}&region=eu-west-1");
    let out = vol.run(&["--kms", &elsewhere, "status", "--check-key", backing]);
    assert_eq!(out.status.code(), Some(5), "other region: {}", stderr(&out));
    assert!(
        stderr(&out).contains("looked for in region eu-west-1"),
        "{}",
        stderr(&out)
    );

    // A provider that accepts and never answers: one call is bounded by
    // KMSFS_PROVIDER_TIMEOUT, retries included (two attempts fit in it),
    // and says so.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_url = format!("aws-kms:alias/fail?endpoint=http://{}", hung.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in hung.incoming().flatten() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(conn); // never answered, never closed
        }
    });
    let started = std::time::Instant::now();
    let out = vol
        .command()
        .env("KMSFS_PROVIDER_TIMEOUT", "2")
        .args(["--kms", &hung_url, "mount", backing, mnt])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(8), "hung: {}", stderr(&out));
    assert!(
        stderr(&out).contains("no answer within 0.8 s, 2 attempt(s) in")
            && stderr(&out).contains("may take 2 s: KMSFS_PROVIDER_TIMEOUT"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "a retry within the 2 s, and no third attempt"
    );
    assert!(
        took >= std::time::Duration::from_millis(1600),
        "both attempts waited: {took:?}"
    );
    // The same bound kept with the volume's URI (the host configuration's
    // `kms = "…&timeout=2"`), without the variable.
    let out = vol.run(&["--kms", &format!("{hung_url}&timeout=2"), "mount", backing, mnt]);
    assert_eq!(out.status.code(), Some(8), "hung: {}", stderr(&out));
    assert!(stderr(&out).contains("may take 2 s"), "{}", stderr(&out));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 4);
    let bad = vol
        .command()
        .env("KMSFS_PROVIDER_TIMEOUT", "0")
        .args(["--kms", &hung_url, "mount", backing, mnt])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("KMSFS_PROVIDER_TIMEOUT"), "{}", stderr(&bad));

    for (mode, code, attempts) in [
        ("disabled", "DisabledException", 1),
        ("throttle", "ThrottlingException", 4),
        ("unavailable", "KMSInternalException", 4),
    ] {
        let counter = vol.dir.path().join(format!("{mode}.count"));
        let fake = peers::python_fake("aws_kms_errors.py", &[mode, path_str(&counter)]);
        let via_fake = format!("aws-kms:alias/fail?endpoint={}", fake.url());
        let out = vol.run(&["--kms", &via_fake, "mount", backing, mnt]);
        assert_eq!(out.status.code(), Some(5), "{mode}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(code),
            "{mode}: AWS's error code in the message: {}",
            stderr(&out)
        );
        if mode == "disabled" {
            assert!(stderr(&out).contains("is disabled"), "AWS's message: {}", stderr(&out));
        }
        let calls = fs::read_to_string(&counter).unwrap_or_default().lines().count();
        assert_eq!(calls, attempts, "{mode}: retried {attempts} time(s)");
        fake.stop();
    }
    check_read(&vol, &[("f1".into(), b"content of file 1 content of file 1 ".to_vec())]);
}

#[test]
fn vault_transit_with_openbao_round_trip_rewrap_and_failures() {
    let bao = peers::openbao(false);
    let uri = format!("vault-transit:{}/transit/kmsfs", peers::bao_addr(&bao, false));
    let vol = TestVolume::init_with(&[("VAULT_TOKEN", "root")], &["--kms", &uri]);
    let blob = |vol: &TestVolume| {
        let db = rusqlite::Connection::open(vol.backing.join("kmsfs.db")).unwrap();
        let b: Vec<u8> = db
            .query_row("SELECT wrapped FROM volume_keys WHERE state = 'active'", [], |r| {
                r.get(0)
            })
            .unwrap();
        String::from_utf8(b).unwrap()
    };
    assert!(blob(&vol).starts_with("vault:v1:"));
    let written = round_trip(&vol, 100);
    peers::bao(&bao, false, &["write", "-f", "transit/keys/kmsfs/rotate"]);
    // Vault told to stop decrypting version 1, which wraps the volume key.
    let min = |v: &str| {
        peers::bao(
            &bao,
            false,
            &[
                "write",
                "transit/keys/kmsfs/config",
                &format!("min_decryption_version={v}"),
            ],
        )
    };
    min("2");
    let out = vol.run(&["status", "--check-key", path_str(&vol.backing)]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("no longer decrypts"), "{}", stderr(&out));
    min("1");
    let out = vol.run(&["rewrap", path_str(&vol.backing)]);
    assert!(out.status.success(), "rewrap: {}", stderr(&out));
    assert!(
        blob(&vol).starts_with("vault:v2:"),
        "re-wrapped under the transit key's newest version"
    );
    let status = vol.run(&["status", "--json", path_str(&vol.backing)]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["volume_keys"][0]["master_key_version"], 2, "{status}");
    check_read(&vol, &written);

    // Token from a file instead of the environment.
    let token_file = vol.dir.path().join("token");
    fs::write(&token_file, "root\n").unwrap();
    let with_file = format!("{uri}?token_file={}", token_file.display());
    let out = vol
        .command()
        .env_remove("VAULT_TOKEN")
        .args(["--kms", &with_file, "status", "--check-key", path_str(&vol.backing)])
        .output()
        .unwrap();
    assert!(out.status.success(), "token file: {}", stderr(&out));

    // Traced, a rotation (Vault answers with the new volume key in the
    // clear) writes no other crate's trace lines: the HTTP client's dump
    // the token and the key.
    let out = vol
        .command()
        .env("RUST_LOG", "trace")
        .args(["rotate", path_str(&vol.backing)])
        .output()
        .unwrap();
    assert!(out.status.success(), "rotate: {}", stderr(&out));
    let theirs: Vec<&str> = std::str::from_utf8(&out.stderr)
        .unwrap()
        .lines()
        .filter(|l| l.contains(" TRACE ") && !l.contains(" TRACE kmsfs"))
        .collect();
    assert!(
        theirs.is_empty(),
        "{} lines, the first: {:?}",
        theirs.len(),
        theirs.first()
    );
    assert!(
        stderr(&out).contains(" TRACE kmsfs") || stderr(&out).contains(" DEBUG "),
        "RUST_LOG=trace took"
    );
    check_read(&vol, &written);

    let (backing, mnt) = (path_str(&vol.backing), path_str(&vol.mnt));
    let out = vol
        .command()
        .env("VAULT_TOKEN", "wrong-token")
        .args(["mount", backing, mnt])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "bad token: {}", stderr(&out));
    assert!(stderr(&out).contains("permission denied"), "{}", stderr(&out));
    // A transit key made without derived=true would ignore the volume-id context.
    peers::bao(&bao, false, &["write", "-f", "transit/keys/underived"]);
    let underived = format!("vault-transit:{}/transit/underived", peers::bao_addr(&bao, false));
    let refused = vol.dir.path().join("underived");
    let out = vol.run(&["--kms", &underived, "init", path_str(&refused)]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("not derived"), "{}", stderr(&out));
    assert!(!refused.exists());
    let closed = format!("vault-transit:http://127.0.0.1:{}/transit/kmsfs", peers::free_port());
    let out = vol.run(&["--kms", &closed, "mount", backing, mnt]);
    assert_eq!(out.status.code(), Some(8), "unreachable: {}", stderr(&out));
    // A deleted key is refused with Vault's reason.
    peers::bao(
        &bao,
        false,
        &["write", "transit/keys/kmsfs/config", "deletion_allowed=true"],
    );
    peers::bao(&bao, false, &["delete", "transit/keys/kmsfs"]);
    let out = vol.run(&["mount", backing, mnt]);
    assert_eq!(out.status.code(), Some(5), "deleted key: {}", stderr(&out));
    assert!(stderr(&out).contains("vault-transit"), "{}", stderr(&out));
}

#[test]
fn vault_transit_over_tls_with_a_custom_ca() {
    let bao = peers::openbao(true);
    let ca = bao.dir.path().join("ca.pem");
    let uri = format!(
        "vault-transit:{}/transit/kmsfs?ca_cert={}",
        peers::bao_addr(&bao, true),
        ca.display()
    );
    let vol = TestVolume::init_with(&[("VAULT_TOKEN", "root")], &["--kms", &uri]);
    round_trip(&vol, 10);
    // Without the CA the server's certificate is not trusted.
    let no_ca = format!("vault-transit:{}/transit/kmsfs", peers::bao_addr(&bao, true));
    let out = vol.run(&["--kms", &no_ca, "mount", path_str(&vol.backing), path_str(&vol.mnt)]);
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    // VAULT_CACERT works as well.
    let ca_str = path_str(&ca).to_string();
    let out = vol
        .command()
        .env("VAULT_CACERT", &ca_str)
        .args(["--kms", &no_ca, "status", "--check-key", path_str(&vol.backing)])
        .output()
        .unwrap();
    assert!(out.status.success(), "VAULT_CACERT: {}", stderr(&out));
}

#[test]
fn pkcs11_with_softhsm_round_trip_and_failures() {
    let hsm = SoftHsm::new();
    let conf = path_str(&hsm.conf).to_string();
    let uri = hsm.uri("master", &hsm.pin_file);
    let vol = TestVolume::init_with(&[("SOFTHSM2_CONF", &conf)], &["--kms", &uri]);
    let written = round_trip(&vol, 100);
    let out = vol.run(&["rotate", path_str(&vol.backing)]);
    assert!(out.status.success(), "rotate: {}", stderr(&out));
    check_read(&vol, &written);
    // Rotated while mounted: the daemon (a child of the process that first
    // opened the token) loads the new key from the token itself.
    let m = vol.mount();
    fs::write(vol.path("live"), b"written before a live rotation").unwrap();
    let out = vol.run(&["rotate", path_str(&vol.backing)]);
    assert!(out.status.success(), "live rotate: {}", stderr(&out));
    fs::write(vol.path("after"), b"written after it").unwrap();
    m.unmount();
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("live")).unwrap(), b"written before a live rotation");
    assert_eq!(fs::read(vol.path("after")).unwrap(), b"written after it");
    m.unmount();

    let (backing, mnt) = (path_str(&vol.backing), path_str(&vol.mnt));
    let bad_pin = vol.dir.path().join("bad-pin");
    fs::write(&bad_pin, "9999\n").unwrap();
    let out = vol.run(&["--kms", &hsm.uri("master", &bad_pin), "mount", backing, mnt]);
    assert_eq!(out.status.code(), Some(5), "wrong PIN: {}", stderr(&out));
    assert!(stderr(&out).contains("C_Login"), "{}", stderr(&out));
    let out = vol.run(&["--kms", &hsm.uri("other", &hsm.pin_file), "mount", backing, mnt]);
    assert_eq!(out.status.code(), Some(5), "another key: {}", stderr(&out));
    assert!(
        stderr(&out).contains("records key provider pkcs11:token=kmsfs;object=master")
            && stderr(&out).contains("--kms names pkcs11:token=kmsfs;object=other"),
        "{}",
        stderr(&out)
    );
    let bad_module = uri.replace(peers::SOFTHSM_MODULE, "/nonexistent/libpkcs11.so");
    let out = vol.run(&["--kms", &bad_module, "mount", backing, mnt]);
    assert_eq!(out.status.code(), Some(8), "module missing: {}", stderr(&out));
    // PIN from the environment instead of a file.
    let env_uri = uri.replace(&format!("file:{}", hsm.pin_file.display()), "env:TEST_HSM_PIN");
    let out = vol
        .command()
        .env("TEST_HSM_PIN", "1234")
        .args(["--kms", &env_uri, "status", "--check-key", backing])
        .output()
        .unwrap();
    assert!(out.status.success(), "PIN from env: {}", stderr(&out));

    // A PIN given in the URI is used, and never stored or printed.
    let with_pin = format!(
        "pkcs11:token=kmsfs;object=master?module-path={}&pin-value=1234",
        peers::SOFTHSM_MODULE
    );
    let second = vol.dir.path().join("second");
    let out = vol.run(&["--kms", &with_pin, "init", path_str(&second)]);
    assert!(out.status.success(), "init with pin-value: {}", stderr(&out));
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(!printed.contains("1234"), "{printed}");
    assert!(printed.contains("not saved"), "says the PIN is not kept: {printed}");
    let db = fs::read(second.join("kmsfs.db")).unwrap();
    assert!(!db.windows(4).any(|w| w == b"1234"), "PIN in the DB");
    assert!(
        !fs::read_to_string(&vol.config).unwrap().contains("1234"),
        "PIN in the host configuration"
    );
    let out = vol
        .command()
        .env("KMSFS_PKCS11_PIN", "1234")
        .args(["status", "--check-key", path_str(&second)])
        .output()
        .unwrap();
    assert!(out.status.success(), "mount side needs only the PIN: {}", stderr(&out));
}

/// A module that never returns from a call (a network HSM whose link went
/// away; here SoftHSM2 reading its configuration from a FIFO no one writes)
/// costs a command the call's budget, not its life: exit 8 naming the wait,
/// set by KMSFS_PROVIDER_TIMEOUT or the URI's `timeout=`.
#[test]
fn pkcs11_module_that_never_returns_fails_within_the_call_budget() {
    let hsm = SoftHsm::new();
    let conf = path_str(&hsm.conf).to_string();
    let uri = hsm.uri("master", &hsm.pin_file);
    let vol = TestVolume::init_with(&[("SOFTHSM2_CONF", &conf)], &["--kms", &uri]);
    let fifo = vol.dir.path().join("softhsm2.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo");
    let (backing, mnt) = (path_str(&vol.backing), path_str(&vol.mnt));
    let short = format!("{uri}&timeout=1");
    let cases: [(Option<&str>, Vec<&str>, &str); 3] = [
        (Some("2"), vec!["status", "--check-key", backing], "2"),
        (Some("2"), vec!["mount", backing, mnt], "2"),
        (None, vec!["--kms", &short, "status", "--check-key", backing], "1"),
    ];
    for (timeout, args, waited) in cases {
        let mut command = vol.command();
        command
            .env("SOFTHSM2_CONF", &fifo)
            .env_remove("KMSFS_PROVIDER_TIMEOUT")
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(t) = timeout {
            command.env("KMSFS_PROVIDER_TIMEOUT", t);
        }
        let mut child = command.spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                let _ = child.wait();
                panic!("{args:?} still waits for the module after 60 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        if common::is_mounted(&vol.mnt) {
            vol.run(&["umount", mnt]);
            panic!("mounted without its key: {}", stderr(&out));
        }
        assert_eq!(out.status.code(), Some(8), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("no answer within {waited} s")) && stderr(&out).contains("has not returned"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let out = vol.run(&["--kms", &format!("{uri}&timeout=0"), "status", "--check-key", backing]);
    assert_eq!(out.status.code(), Some(2), "timeout=0: {}", stderr(&out));
    assert!(stderr(&out).contains("seconds from 1 to 600"), "{}", stderr(&out));
    // The token answers again once its configuration can be read.
    let out = vol.run(&["status", "--check-key", backing]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn bad_provider_uris_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    for uri in [
        "nonsense",
        "aws-kms:",
        "vault-transit:localhost:8200/transit",
        "pkcs11:token=x",
        // Misspelt settings: ignored, the call would go to the default endpoint.
        "aws-kms:alias/x?edpoint=http://127.0.0.1:5099",
        "vault-transit:http://127.0.0.1:8200/transit/k?token_flie=/t",
    ] {
        let out = std::process::Command::new(common::kmsfs_bin())
            .args(["--kms", uri, "init", path_str(&dir.path().join("v"))])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{uri}: {}", stderr(&out));
        assert!(stderr(&out).contains("bad key provider URI"), "{}", stderr(&out));
        let out = std::process::Command::new(common::kmsfs_bin())
            .args(["--kms", uri, "status", path_str(dir.path())])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "status --kms {uri}: {}", stderr(&out));
    }
}

/// Separation of duties, as Vault/OpenBao enforce it: a token whose policy
/// allows only `transit/decrypt/KEY` mounts and uses a volume; `rotate`,
/// `rewrap` and `init` with it fail with exit 5 naming the path and the
/// capability its policy lacks; the administrator's token can rotate.
#[test]
fn vault_transit_decrypt_only_token_mounts_but_cannot_administer() {
    let bao = peers::openbao(false);
    let uri = format!("vault-transit:{}/transit/kmsfs", peers::bao_addr(&bao, false));
    let vol = TestVolume::init_with(&[("VAULT_TOKEN", "root")], &["--kms", &uri]);
    let written = round_trip(&vol, 5);
    let policy = bao.dir.path().join("mount-only.hcl");
    fs::write(
        &policy,
        "path \"transit/decrypt/kmsfs\" {\n  capabilities = [\"update\"]\n}\n",
    )
    .unwrap();
    peers::bao(&bao, false, &["policy", "write", "mount-only", path_str(&policy)]);
    let token =
        String::from_utf8(peers::bao(&bao, false, &["token", "create", "-policy=mount-only", "-field=token"]).stdout)
            .unwrap();
    let mut user_vol = vol.view_of(vol.backing.clone());
    user_vol.env.push(("VAULT_TOKEN".into(), token.trim().into()));
    let user = |args: &[&str]| user_vol.run(args);
    let backing = path_str(&vol.backing);

    // The user's mount: one Decrypt, then file keys under the volume key.
    check_read(&user_vol, &written);

    for (args, path) in [
        (vec!["rotate", backing], "transit/datakey/plaintext/kmsfs"),
        (vec!["rewrap", backing], "transit/rewrap/kmsfs"),
    ] {
        let out = user(&args);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(path) && stderr(&out).contains("\"update\""),
            "{args:?} names the missing capability: {}",
            stderr(&out)
        );
    }
    let fresh = vol.dir.path().join("fresh");
    let out = user(&["--kms", &uri, "init", path_str(&fresh)]);
    assert_eq!(out.status.code(), Some(5), "init: {}", stderr(&out));
    assert!(
        stderr(&out).contains("transit/datakey/plaintext/kmsfs"),
        "{}",
        stderr(&out)
    );

    let out = vol.run(&["rotate", backing]);
    assert!(out.status.success(), "the administrator rotates: {}", stderr(&out));
    check_read(&vol, &written);

    // The audit log has the remote provider's calls, refusals included.
    let out = vol.run(&["audit", "--json", "--key", "transit/kmsfs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let records: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let find = |command: &str, action: &str, result: &str| {
        records
            .iter()
            .find(|r| r["command"] == command && r["action"] == action && r["result"] == result)
            .unwrap_or_else(|| panic!("no {result} {action} by {command} in {records:#?}"))
    };
    let decrypt = find("mount", "Decrypt", "ok");
    assert_eq!(decrypt["provider"], "vault-transit");
    assert_eq!(decrypt["key_version"], 1);
    assert!(decrypt["context"]["kmsfs:volume-id"].is_string());
    let refused = find("rotate", "GenerateDataKey", "error");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("transit/datakey/plaintext/kmsfs"),
        "{refused}"
    );
    find("rewrap", "ReEncrypt", "error");
    find("init", "GenerateDataKey", "error");
    find("rotate", "GenerateDataKey", "ok");
    let verify = vol.run(&["audit", "verify"]);
    assert!(verify.status.success(), "{}", stderr(&verify));
}
