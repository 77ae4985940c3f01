//! The audit log through the command line: every key operation and volume
//! event of a volume's life, failures included, filtered listing, and
//! `audit verify` catching each kind of tampering (exit 9).

use std::fs;

use crate::common::{TestVolume, path_str, stderr};

fn records(vol: &TestVolume, filters: &[&str]) -> Vec<serde_json::Value> {
    let out = vol.run(&[&["audit", "--json"], filters].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn actions(records: &[serde_json::Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r["command"].as_str().unwrap(),
                r["action"].as_str().unwrap(),
                r["result"].as_str().unwrap()
            )
        })
        .collect()
}

fn verify(vol: &TestVolume) -> (i32, serde_json::Value) {
    let out = vol.run(&["audit", "verify", "--json"]);
    let code = out.status.code().unwrap();
    if code == 0 || !out.stdout.is_empty() {
        (code, serde_json::from_slice(&out.stdout).unwrap())
    } else {
        (code, serde_json::Value::Null)
    }
}

#[test]
fn a_volume_life_is_recorded_with_failures_and_verifies() {
    let vol = TestVolume::init();
    let backing = path_str(&vol.backing);
    let key = records(&vol, &["--action", "CreateKey"])[0]["key_id"]
        .as_str()
        .unwrap()
        .to_string();

    let m = vol.mount();
    for i in 0..3 {
        fs::write(vol.path(&format!("private-name-{i}")), b"data").unwrap();
    }
    fs::File::open(vol.path("private-name-0")).unwrap().sync_all().unwrap();
    for i in 0..3 {
        fs::remove_file(vol.path(&format!("private-name-{i}"))).unwrap();
    }
    fs::create_dir(vol.path("private-name-dir")).unwrap();
    let refused = vol.run(&["rekey", path_str(&vol.path("private-name-dir"))]);
    assert_eq!(refused.status.code(), Some(2), "a directory is not re-keyed");
    assert!(
        stderr(&refused).contains("is a directory: rekey takes files (for every file under it: find"),
        "{}",
        stderr(&refused)
    );
    m.unmount();
    assert!(vol.run(&["key", "disable", &key]).status.success());
    assert_eq!(vol.run(&["rotate", backing]).status.code(), Some(5));
    assert!(vol.run(&["key", "enable", &key]).status.success());
    assert!(vol.run(&["rotate", backing]).status.success());
    assert!(vol.run(&["key", "rotate", &key]).status.success());
    assert!(vol.run(&["rewrap", backing]).status.success());
    let scheduled = vol.run(&["key", "schedule-deletion", &key, "--days", "7"]);
    assert!(scheduled.status.success());
    // The volume that uses it is named, and what stops the deletion.
    assert!(
        stderr(&scheduled).contains("volumes this keystore knows use key")
            && stderr(&scheduled).contains(&format!("kmsfs key cancel-deletion {key}")),
        "{}",
        stderr(&scheduled)
    );
    assert!(vol.run(&["key", "cancel-deletion", &key]).status.success());
    let wrong = vol
        .command()
        .env("KMSFS_PASSPHRASE", "not it")
        .args(["key", "list"])
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(3));

    let all = records(&vol, &[]);
    let seen = actions(&all);
    let expected = [
        "init CreateKey ok",
        "init GenerateDataKey ok",
        "init CreateVolume ok",
        "mount Decrypt ok",
        "mount Mount ok",
        "mount CryptoShred ok",
        "mount Unmount ok",
        "key disable DisableKey ok",
        "rotate Decrypt error",
        "rotate Rotate error",
        "key enable EnableKey ok",
        "rotate Decrypt ok",
        "rotate GenerateDataKey ok",
        "rotate Rotate ok",
        "key rotate RotateKeyOnDemand ok",
        "rewrap ReEncrypt ok",
        "rewrap Rewrap ok",
        "key schedule-deletion ScheduleKeyDeletion ok",
        "key cancel-deletion CancelKeyDeletion ok",
        "key list UnlockKeystore error",
    ];
    let mut at = 0;
    for want in expected {
        at += seen[at..]
            .iter()
            .position(|s| s == want)
            .unwrap_or_else(|| panic!("{want:?} missing (in order) from {seen:#?}"));
    }
    assert!(seen.contains(&"rekey Rekey error".to_string()), "{seen:#?}");
    for (i, r) in all.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1);
        assert!(r["uid"].is_u64() && r["pid"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["process"], "kmsfs");
    }
    let refused = all
        .iter()
        .find(|r| r["action"] == "Decrypt" && r["result"] == "error")
        .unwrap();
    assert!(refused["error"].as_str().unwrap().contains("Disabled"), "{refused}");
    assert_eq!(refused["key_id"], key.as_str());
    let shred = all.iter().find(|r| r["action"] == "CryptoShred").unwrap();
    assert_eq!(shred["details"]["erased_file_keys"], 3, "{shred}");
    let volume_id = all.iter().find(|r| r["action"] == "Mount").unwrap()["context"]["kmsfs:volume-id"].clone();
    assert_eq!(shred["context"]["kmsfs:volume-id"], volume_id);
    let reencrypt = all.iter().find(|r| r["action"] == "ReEncrypt").unwrap();
    assert_eq!(
        reencrypt["key_version"], 2,
        "wrapped under the new version: {reencrypt}"
    );
    let text = fs::read_to_string(vol.keystore.with_file_name("audit.jsonl")).unwrap();
    assert!(!text.contains("private-name"), "file names never reach the audit log");

    // Filters.
    let failed = records(&vol, &["--failed"]);
    assert!(!failed.is_empty() && failed.iter().all(|r| r["result"] == "error"));
    assert_eq!(
        records(&vol, &["--action", "decrypt", "--key", &key]).len(),
        4,
        "mount, rotate (refused), rotate, rewrap"
    );
    assert!(records(&vol, &["--key", "mk-none"]).is_empty());
    assert!(records(&vol, &["--until", "2000-01-01"]).is_empty());
    assert_eq!(records(&vol, &["--since", "2000-01-01"]).len(), all.len());
    let bogus = vol.run(&["audit", "--action", "Bogus"]);
    assert_eq!(bogus.status.code(), Some(2));
    // A reader that stops early ends the listing quietly.
    let mut child = vol
        .command()
        .args(["audit"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let early = child.wait_with_output().unwrap();
    assert_ne!(
        early.status.code(),
        Some(101),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );
    assert!(!String::from_utf8_lossy(&early.stderr).contains("panicked"));
    let bad = vol.run(&["audit", "--since", "last tuesday"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--since"));
    let human = vol.run(&["audit", "--action", "Mount"]);
    assert!(String::from_utf8_lossy(&human.stdout).contains(backing));

    let (code, report) = verify(&vol);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["valid_records"], all.len());
}

#[test]
fn audit_verify_finds_each_kind_of_tampering_and_says_where() {
    let vol = TestVolume::init();
    let m = vol.mount();
    m.unmount();
    assert!(vol.run(&["key", "list"]).status.success());
    let log = vol.keystore.with_file_name("audit.jsonl");
    let original: Vec<String> = fs::read_to_string(&log).unwrap().lines().map(str::to_string).collect();
    assert!(original.len() >= 6, "{original:#?}");
    let write = |lines: &[String]| fs::write(&log, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let problems = |report: &serde_json::Value| -> Vec<(u64, String)> {
        report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["line"].as_u64().unwrap(), p["what"].as_str().unwrap().to_string()))
            .collect()
    };

    let mut edited = original.clone();
    edited[3] =
        edited[3]
            .replacen("\"uid\":0", "\"uid\":1000", 1)
            .replacen("\"result\":\"ok\"", "\"result\":\"error\"", 1);
    assert_ne!(edited[3], original[3]);
    let cases: Vec<(&str, Vec<String>, u64, &str)> = vec![
        ("edited", edited, 4, "MAC mismatch"),
        ("removed", [&original[..2], &original[3..]].concat(), 3, "removed"),
        (
            "reordered",
            {
                let mut l = original.clone();
                l.swap(2, 4);
                l
            },
            3,
            "",
        ),
        (
            "inserted",
            {
                let mut l = original.clone();
                l.insert(2, original[4].clone());
                l
            },
            3,
            "",
        ),
        ("truncated", original[..original.len() - 1].to_vec(), 0, "truncated"),
    ];
    for (kind, lines, line, what) in cases {
        write(&lines);
        let (code, report) = verify(&vol);
        assert_eq!(code, 9, "{kind}: {report}");
        assert_eq!(report["intact"], false);
        let found = problems(&report);
        assert_eq!(found[0].0, line, "{kind}: {found:?}");
        assert!(found[0].1.contains(what), "{kind}: {found:?}");
        let human = vol.run(&["audit", "verify"]);
        assert_eq!(human.status.code(), Some(9));
        assert!(String::from_utf8_lossy(&human.stderr).contains("fails verification"));
    }
    // The listing warns about a tampered log.
    write(&[&original[..2], &original[3..]].concat());
    let listed = vol.run(&["audit"]);
    assert!(listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stderr).contains("fails verification"));
    write(&original);
    assert_eq!(verify(&vol).0, 0);

    // Without its key and anchor the log cannot be vouched for.
    let state = log.with_file_name("audit.jsonl.state");
    let saved = fs::read(&state).unwrap();
    fs::remove_file(&state).unwrap();
    let out = vol.run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(9));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("state"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::write(&state, saved).unwrap();
    assert_eq!(verify(&vol).0, 0);

    // A log replaced by a directory or by a symlink stops a command before it does anything.
    let elsewhere = vol.dir.path().join("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let other_log = elsewhere.join("audit.jsonl");
    let with_other_log = |args: &[&str]| {
        vol.command()
            .env("KMSFS_AUDIT_LOG", &other_log)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(with_other_log(&["key", "list"]).status.success());
    fs::remove_file(&other_log).unwrap();
    std::os::unix::fs::symlink(&log, &other_log).unwrap();
    let before = fs::read(&log).unwrap();
    let out = with_other_log(&["key", "create"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "symlink: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(&log).unwrap(), before, "nothing written through the symlink");
    fs::remove_file(&other_log).unwrap();
    fs::create_dir(&other_log).unwrap();
    let out = with_other_log(&["key", "create"]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "directory: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A log that cannot be written stops a command before it does anything.
    let out = vol
        .command()
        .env("KMSFS_AUDIT_LOG", "/proc/kmsfs-no-such/audit.jsonl")
        .args(["key", "create"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KMSFS_AUDIT_LOG"));
    // `status` uses no key and records nothing, so it needs no log; with
    // --check-key it asks the provider, which is recorded.
    let status = |extra: &[&str]| {
        vol.command()
            .env("KMSFS_AUDIT_LOG", "/proc/kmsfs-no-such/audit.jsonl")
            .arg("status")
            .args(extra)
            .arg(&vol.backing)
            .output()
            .unwrap()
    };
    let out = status(&[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(status(&["--check-key"]).status.code(), Some(7));
    assert_eq!(
        vol.run(&["key", "list", "--json"])
            .stdout
            .iter()
            .filter(|&&b| b == b'{')
            .count(),
        1,
        "no key made"
    );
}
