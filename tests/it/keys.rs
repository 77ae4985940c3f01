//! The local keystore's key lifecycle through `kmsfs key …`: create with an
//! alias, describe, aliases, disable/enable (a mounted volume keeps
//! working), scheduled deletion with its waiting period, destruction after
//! it (the clock set through KMSFS_TEST_NOW), and every refusal.

use crate::common::{TestVolume, json, path_str, stderr};

#[test]
fn key_lifecycle_disable_enable_schedule_cancel_and_destroy() {
    let vol = TestVolume::init();
    let (backing, mnt) = (path_str(&vol.backing), path_str(&vol.mnt));
    let list = json(&vol.run(&["key", "list", "--json"]));
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert_eq!(list[0]["state"], "Enabled");

    // Aliases: named at creation, moved, refused twice, deleted.
    let other = json(&vol.run(&[
        "key",
        "create",
        "--alias",
        "backup",
        "--description",
        "for backups",
        "--json",
    ]));
    let other_id = other["id"].as_str().unwrap().to_string();
    assert_eq!(other["alias"], "backup");
    assert_eq!(
        json(&vol.run(&["key", "describe", "backup", "--json"]))["description"],
        "for backups"
    );
    let taken = vol.run(&["key", "create", "--alias", "backup"]);
    assert_eq!(taken.status.code(), Some(2), "{}", stderr(&taken));
    assert!(stderr(&taken).contains(&other_id));
    let bad = vol.run(&["key", "alias", "create", "mk-lookalike", &id]);
    assert_eq!(bad.status.code(), Some(2));
    json(&vol.run(&["key", "alias", "delete", "backup", "--json"]));
    json(&vol.run(&["key", "alias", "create", "volume-key", &id, "--json"]));
    let moved = json(&vol.run(&["key", "alias", "update", "volume-key", &other_id, "--json"]));
    assert_eq!(moved["id"], other_id.as_str());
    json(&vol.run(&["key", "alias", "update", "volume-key", &id, "--json"]));
    assert_eq!(
        json(&vol.run(&["key", "describe", "volume-key", "--json"]))["id"],
        id.as_str()
    );

    // Disabled: a mounted volume keeps working; nothing new opens it.
    let m = vol.mount();
    std::fs::write(vol.path("before"), b"written before").unwrap();
    assert_eq!(
        json(&vol.run(&["key", "disable", "volume-key", "--json"]))["state"],
        "Disabled"
    );
    std::fs::write(vol.path("during"), b"written while disabled").unwrap();
    assert_eq!(std::fs::read(vol.path("before")).unwrap(), b"written before");
    let checked = vol.run(&["status", "--json", "--check-key", backing]);
    assert_eq!(
        checked.status.code(),
        Some(5),
        "a key that cannot be used: {}",
        stderr(&checked)
    );
    let status: serde_json::Value = serde_json::from_slice(&checked.stdout).unwrap();
    assert_eq!(status["key_state"], "Disabled", "{status}");
    m.unmount();
    for args in [
        vec!["mount", backing, mnt],
        vec!["rotate", backing],
        vec!["rewrap", backing],
        vec!["key", "rotate", "volume-key"],
    ] {
        let out = vol.run(&args);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&id) && stderr(&out).contains("Disabled"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let fresh = vol.dir.path().join("fresh");
    let out = vol.run(&["init", path_str(&fresh), "--key", "volume-key"]);
    assert_eq!(out.status.code(), Some(5), "init with a disabled key: {}", stderr(&out));
    json(&vol.run(&["key", "enable", &id, "--json"]));
    let m = vol.mount();
    assert_eq!(std::fs::read(vol.path("during")).unwrap(), b"written while disabled");
    m.unmount();

    // Scheduled deletion: 7-30 days, unusable at once, cancellable (back
    // disabled), and destroyed once the date has passed.
    assert_eq!(
        vol.run(&["key", "schedule-deletion", &id, "--days", "6"]).status.code(),
        Some(2)
    );
    let scheduled = json(&vol.run(&["key", "schedule-deletion", &id, "--days", "7", "--json"]));
    assert_eq!(scheduled["state"], "PendingDeletion");
    let date = scheduled["deletion_date"].as_u64().unwrap();
    let out = vol.run(&["mount", backing, mnt]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let fresh = vol.dir.path().join("fresh-volume");
    let out = vol.run(&["init", path_str(&fresh), "--key", &id]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(!fresh.exists(), "a refused init leaves no directory behind");
    let refused = vol.run(&["key", "enable", &id]);
    assert_eq!(refused.status.code(), Some(5));
    assert!(
        stderr(&refused).contains("cancel the deletion first"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(
        json(&vol.run(&["key", "cancel-deletion", &id, "--json"]))["state"],
        "Disabled"
    );
    json(&vol.run(&["key", "enable", &id, "--json"]));
    vol.mount().unmount();

    json(&vol.run(&["key", "schedule-deletion", &id, "--days", "7", "--json"]));
    let checked = vol.run(&["status", "--json", "--check-key", backing]);
    assert_eq!(checked.status.code(), Some(5), "{}", stderr(&checked));
    let status: serde_json::Value = serde_json::from_slice(&checked.stdout).unwrap();
    assert_eq!(status["key_state"], "PendingDeletion", "{status}");
    assert!(status["key_deletion_date"].as_str().unwrap().ends_with('Z'), "{status}");
    let human = String::from_utf8(vol.run(&["status", "--check-key", backing]).stdout).unwrap();
    assert!(
        human.contains("scheduled for deletion on") && human.contains(&format!("`kmsfs key cancel-deletion {id}`")),
        "{human}"
    );
    let keystore = || std::fs::read_to_string(&vol.keystore).unwrap();
    let before = vol
        .command()
        .env("KMSFS_TEST_NOW", (date - 60).to_string())
        .args(["key", "list", "--json"])
        .output()
        .unwrap();
    assert_eq!(json(&before)[0]["state"], "PendingDeletion", "not yet due");
    let after = vol
        .command()
        .env("KMSFS_TEST_NOW", (date + 8 * 86_400).to_string())
        .args(["key", "describe", &id, "--json"])
        .output()
        .unwrap();
    let after = json(&after);
    assert_eq!(after["state"], "Deleted");
    assert_eq!(after["versions"], serde_json::json!([]));
    let stored: serde_json::Value = serde_json::from_str(&keystore()).unwrap();
    let record = stored["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap();
    assert_eq!(
        record["versions"],
        serde_json::json!([]),
        "the material is gone from the file"
    );
    let out = vol.run(&["mount", backing, mnt]);
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("Deleted"), "{}", stderr(&out));
    let audit = json(&vol.run(&["audit", "--json", "--action", "DeleteKey", "--key", &id]));
    assert_eq!(
        audit.as_array().unwrap().len(),
        1,
        "the destruction is audited: {audit}"
    );
    // The other key is untouched.
    assert_eq!(
        json(&vol.run(&["key", "describe", &other_id, "--json"]))["state"],
        "Enabled"
    );
}

/// `keystore passwd`: another passphrase, then a key file, at a chosen
/// Argon2id cost; the old secret stops working, the volume is untouched
/// and mounts with the new one; a weak cost is refused and changes nothing.
#[test]
fn keystore_passwd_changes_the_secret_without_touching_volumes() {
    let vol = TestVolume::init();
    let m = vol.mount();
    std::fs::write(vol.path("f"), b"before the change").unwrap();
    m.unmount();
    let volume_bytes = crate::common::all_backing_bytes(&vol.backing);
    let new_pass = vol.dir.path().join("new.pass");
    std::fs::write(&new_pass, "a second passphrase\n").unwrap();
    let pass_file = path_str(&new_pass);
    let changed = vol.run(&[
        "keystore",
        "passwd",
        "--new-passphrase-file",
        pass_file,
        "--kdf-memory-mib",
        "19",
        "--kdf-iterations",
        "2",
        "--json",
    ]);
    assert_eq!(json(&changed)["protected_by"], "passphrase");
    let old = vol.run(&["key", "list"]);
    assert_eq!(old.status.code(), Some(3), "the old passphrase: {}", stderr(&old));
    assert_eq!(
        crate::common::all_backing_bytes(&vol.backing),
        volume_bytes,
        "no volume touched"
    );
    let m = vol.mount_with(&["--passphrase-file", pass_file]);
    assert_eq!(std::fs::read(vol.path("f")).unwrap(), b"before the change");
    m.unmount();

    let key_file = vol.dir.path().join("keystore.key");
    let key = path_str(&key_file);
    json(&vol.run(&[
        "--passphrase-file",
        pass_file,
        "keystore",
        "passwd",
        "--new-key-file",
        key,
        "--json",
    ]));
    assert!(key_file.exists());
    assert_eq!(
        vol.run(&["--passphrase-file", pass_file, "key", "list"]).status.code(),
        Some(3)
    );
    json(&vol.run(&["--key-file", key, "key", "list", "--json"]));
    let weak = vol.run(&[
        "--key-file",
        key,
        "keystore",
        "passwd",
        "--new-passphrase-file",
        pass_file,
        "--kdf-memory-mib",
        "8",
    ]);
    assert_eq!(weak.status.code(), Some(2), "{}", stderr(&weak));
    json(&vol.run(&["--key-file", key, "key", "list", "--json"]));
    let m = vol.mount_with(&["--key-file", key]);
    assert_eq!(std::fs::read(vol.path("f")).unwrap(), b"before the change");
    m.unmount();
}

/// Automatic rotation: due when the keystore is next opened after the
/// period (the clock set through KMSFS_TEST_NOW); `mount` then re-wraps the
/// volume key under the new version with one provider call, and the volume
/// keeps mounting afterwards, with and without the rotation.
#[test]
fn automatic_rotation_comes_due_and_mount_moves_the_volume_key_forward() {
    let vol = TestVolume::init();
    let (backing, mnt) = (path_str(&vol.backing), path_str(&vol.mnt));
    let m = vol.mount();
    std::fs::write(vol.path("f"), b"before the rotation").unwrap();
    m.unmount();
    let id = json(&vol.run(&["key", "list", "--json"]))[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        vol.run(&["key", "rotation", "enable", &id, "--period-days", "30"])
            .status
            .code(),
        Some(2)
    );
    let on = json(&vol.run(&["key", "rotation", "enable", &id, "--period-days", "90", "--json"]));
    assert_eq!(on["rotation_period_days"], 90);
    let created = on["newest_version_created"].as_u64().unwrap();
    let blob_version = || {
        let db = rusqlite::Connection::open(vol.backing.join("kmsfs.db")).unwrap();
        let blob: Vec<u8> = db
            .query_row("SELECT wrapped FROM volume_keys WHERE state = 'active'", [], |r| {
                r.get(0)
            })
            .unwrap();
        u32::from_be_bytes([blob[1], blob[2], blob[3], blob[4]])
    };
    assert_eq!(blob_version(), 1);

    let at = |days: u64| (created + days * 86_400).to_string();
    let early = vol
        .command()
        .env("KMSFS_TEST_NOW", at(89))
        .args(["key", "describe", &id, "--json"])
        .output()
        .unwrap();
    assert_eq!(
        json(&early)["versions"],
        serde_json::json!([1]),
        "not due before 90 days"
    );
    let out = vol
        .command()
        .env("KMSFS_TEST_NOW", at(91))
        .args(["mount", backing, mnt, "--log-file", path_str(&vol.log)])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(vol.path("f")).unwrap(), b"before the rotation");
    let status = json(&vol.run(&["status", "--json", backing]));
    assert_eq!(
        status["daemon_provider_calls"], 2,
        "one Decrypt and one ReEncrypt: {status}"
    );
    assert!(vol.run(&["umount", mnt]).status.success());
    assert_eq!(blob_version(), 2, "the volume key moved to the new version");
    let status = json(&vol.run(&["status", "--json", backing]));
    assert_eq!(status["volume_keys"][0]["master_key_version"], 2, "{status}");
    assert_eq!(status["days_since_rotation"], 0);
    assert_eq!(
        json(&vol.run(&["key", "describe", &id, "--json"]))["versions"],
        serde_json::json!([1, 2])
    );

    // Later mounts: no further rotation or re-wrap until the next period.
    let m = vol.mount();
    assert_eq!(std::fs::read(vol.path("f")).unwrap(), b"before the rotation");
    m.unmount();
    assert_eq!(blob_version(), 2);
    json(&vol.run(&["key", "rotation", "disable", &id, "--json"]));
    let off = vol
        .command()
        .env("KMSFS_TEST_NOW", at(400))
        .args(["key", "describe", &id, "--json"])
        .output()
        .unwrap();
    assert_eq!(json(&off)["versions"], serde_json::json!([1, 2]), "off: no rotation");
}

/// `key trim`: old versions are destroyed only once no volume the keystore
/// knows of still has keys wrapped by one; until then it names them.
#[test]
fn key_trim_refuses_while_a_known_volume_needs_an_old_version() {
    let vol = TestVolume::init();
    let backing = path_str(&vol.backing);
    let m = vol.mount();
    std::fs::write(vol.path("f"), b"kept across the trim").unwrap();
    m.unmount();
    // A backup made before the rewraps keeps its volume key under version 1.
    let backup = vol.dir.path().join("backup");
    let copied = std::process::Command::new("cp")
        .args(["-a", path_str(&vol.backing), path_str(&backup)])
        .status()
        .unwrap();
    assert!(copied.success());
    let id = json(&vol.run(&["key", "list", "--json"]))[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    json(&vol.run(&["key", "rotate", &id, "--json"]));

    let refused = vol.run(&["key", "trim", &id, "--min-version", "2"]);
    assert_eq!(refused.status.code(), Some(5), "{}", stderr(&refused));
    let canonical = std::fs::canonicalize(&vol.backing).unwrap();
    assert!(
        stderr(&refused).contains(canonical.to_str().unwrap()) && stderr(&refused).contains("kmsfs rewrap"),
        "names the volume and what to do: {}",
        stderr(&refused)
    );
    assert_eq!(
        vol.run(&["key", "trim", &id, "--min-version", "3"]).status.code(),
        Some(2)
    );

    // A volume that cannot be read now (its disk not mounted, say) still counts.
    let away = vol.dir.path().join("away");
    std::fs::rename(&vol.backing, &away).unwrap();
    let refused = vol.run(&["key", "trim", &id, "--min-version", "2"]);
    std::fs::rename(&away, &vol.backing).unwrap();
    assert_eq!(
        refused.status.code(),
        Some(5),
        "an unreadable volume counts: {}",
        stderr(&refused)
    );

    assert!(vol.run(&["rewrap", backing]).status.success());
    // A second volume of the key, gone for good: named until forgotten.
    let second = vol.dir.path().join("second");
    assert!(vol.run(&["init", path_str(&second), "--key", &id]).status.success());
    let second_id = json(&vol.run(&["status", "--json", path_str(&second)]))["volume_id"]
        .as_str()
        .unwrap()
        .to_string();
    json(&vol.run(&["key", "rotate", &id, "--json"]));
    assert!(vol.run(&["rewrap", backing]).status.success());
    std::fs::remove_dir_all(&second).unwrap();
    let refused = vol.run(&["key", "trim", &id, "--min-version", "3"]);
    assert_eq!(refused.status.code(), Some(5));
    assert!(stderr(&refused).contains(&second_id), "{}", stderr(&refused));
    let out = vol.run(&[
        "key",
        "trim",
        &id,
        "--min-version",
        "3",
        "--forget",
        &second_id,
        "--json",
    ]);
    assert!(
        stderr(&out).contains("from before the trim"),
        "warns of backups: {}",
        stderr(&out)
    );
    let trimmed = json(&out);
    assert_eq!(trimmed["destroyed_versions"], serde_json::json!([1, 2]));
    // The backup names the destroyed version, not an older keystore.
    let out = vol.run(&["mount", path_str(&backup), path_str(&vol.mnt)]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("version 1 of master key") && stderr(&out).contains("was destroyed (`kmsfs key trim`)"),
        "{}",
        stderr(&out)
    );
    // `status --check-key` says so too, before anyone tries to mount it.
    let out = vol.run(&["status", "--check-key", path_str(&backup)]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("master-key version(s) [1], which the keystore does not hold (versions 3 to 3)")
            && stderr(&out).contains("destroyed by `kmsfs key trim`"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        json(&vol.run(&["key", "describe", &id, "--json"]))["versions"],
        serde_json::json!([3])
    );
    let m = vol.mount();
    assert_eq!(std::fs::read(vol.path("f")).unwrap(), b"kept across the trim");
    m.unmount();
}
