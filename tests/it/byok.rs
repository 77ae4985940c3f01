//! Bring your own key: a key created with origin external waits for its
//! material (PendingImport); `key import-params` hands out an RSA-3072
//! public key and a token; material wrapped with openssl (RSAES-OAEP
//! SHA-256, as users do) is imported; an expiry makes the key unusable
//! until the same material is imported again. Every refusal on the way.

use std::process::Command;

use crate::common::{TestVolume, json, path_str, stderr};

/// Fresh import parameters, and `material` wrapped with their public key by openssl.
fn wrap_for_import(vol: &TestVolume, key: &str, material: &[u8], name: &str) -> (std::path::PathBuf, String) {
    let params = json(&vol.run(&["key", "import-params", key, "--json"]));
    assert_eq!(params["wrapping_algorithm"], "RSAES_OAEP_SHA_256");
    assert_eq!(params["wrapping_key_spec"], "RSA_3072");
    let pem = vol.dir.path().join(format!("{name}.pem"));
    std::fs::write(&pem, params["public_key_pem"].as_str().unwrap()).unwrap();
    let plain = vol.dir.path().join(format!("{name}.bin"));
    std::fs::write(&plain, material).unwrap();
    let wrapped = vol.dir.path().join(format!("{name}.enc"));
    let out = Command::new("openssl")
        .args(["pkeyutl", "-encrypt", "-pubin", "-inkey", path_str(&pem)])
        .args(["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256"])
        .args([
            "-pkeyopt",
            "rsa_mgf1_md:sha256",
            "-in",
            path_str(&plain),
            "-out",
            path_str(&wrapped),
        ])
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{}", stderr(&out));
    (wrapped, params["import_token"].as_str().unwrap().to_string())
}

#[test]
fn imported_key_material_lifecycle_with_expiry_and_refusals() {
    let vol = TestVolume::init();
    let key = json(&vol.run(&["key", "create", "--origin", "external", "--alias", "byok", "--json"]));
    assert_eq!(key["state"], "PendingImport");
    assert_eq!(key["origin"], "external");
    assert_eq!(key["versions"], serde_json::json!([]));
    let id = key["id"].as_str().unwrap().to_string();
    // A deletion cancelled before any import leaves it waiting for material, not enabled.
    json(&vol.run(&["key", "schedule-deletion", "byok", "--days", "7", "--json"]));
    assert_eq!(
        json(&vol.run(&["key", "cancel-deletion", "byok", "--json"]))["state"],
        "PendingImport"
    );
    let backing = vol.dir.path().join("byok-volume");
    let mnt = vol.dir.path().join("byok-mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (backing, mnt) = (path_str(&backing).to_string(), path_str(&mnt).to_string());

    // Without material nothing uses it.
    let out = vol.run(&["init", &backing, "--key", "byok"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("PendingImport"), "{}", stderr(&out));
    assert_eq!(vol.run(&["key", "enable", "byok"]).status.code(), Some(5));
    let nothing = vol.dir.path().join("nothing");
    std::fs::write(&nothing, [0u8; 384]).unwrap();
    let out = vol.run(&["key", "import", "byok", "--material", path_str(&nothing)]);
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("import-params"), "{}", stderr(&out));

    // Wrong material, wrong token, wrong size, a date in the past: refused, parameters kept.
    let material: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect();
    let (short, _) = wrap_for_import(&vol, "byok", &material[..16], "short");
    let out = vol.run(&["key", "import", "byok", "--material", path_str(&short)]);
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("16 bytes"), "{}", stderr(&out));
    let (wrapped, token) = wrap_for_import(&vol, "byok", &material, "good");
    let out = vol.run(&["key", "import", "byok", "--material", path_str(&short)]);
    assert_eq!(out.status.code(), Some(5), "wrapped for older parameters");
    assert!(stderr(&out).contains("does not decrypt"), "{}", stderr(&out));
    let wrapped_str = path_str(&wrapped);
    let out = vol.run(&[
        "key",
        "import",
        "byok",
        "--material",
        wrapped_str,
        "--import-token",
        "00",
    ]);
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("import token"), "{}", stderr(&out));
    let out = vol.run(&[
        "key",
        "import",
        "byok",
        "--material",
        wrapped_str,
        "--valid-to",
        "2001-01-01",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--valid-to"), "{}", stderr(&out));

    // Imported, to expire in two days.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let valid_to = format!("@{}", now + 2 * 86_400);
    let imported = json(&vol.run(&[
        "key",
        "import",
        "byok",
        "--material",
        wrapped_str,
        "--import-token",
        &token,
        "--valid-to",
        &valid_to,
        "--json",
    ]));
    assert_eq!(imported["state"], "Enabled");
    assert_eq!(imported["material_valid_to"], now + 2 * 86_400);
    let out = vol.run(&["key", "import", "byok", "--material", wrapped_str]);
    assert_eq!(out.status.code(), Some(5), "the parameters are used up");

    json(&vol.run(&["init", &backing, "--key", "byok", "--json"]));
    let view = vol.view_of(backing.clone().into());
    let m = view.mount();
    std::fs::write(view.path("kept"), b"under imported material").unwrap();
    m.unmount();
    let status = json(&vol.run(&["status", "--json", "--check-key", &backing]));
    assert!(status["key_material_valid_to"].is_string(), "{status}");
    for args in [vec!["key", "rotate", "byok"], vec!["key", "rotation", "enable", "byok"]] {
        let out = vol.run(&args);
        assert_eq!(out.status.code(), Some(5), "{args:?}");
        assert!(stderr(&out).contains("holds imported material"), "{}", stderr(&out));
    }

    // The expiry passes: the material is deleted and the key waits for it again.
    let later = (now + 3 * 86_400).to_string();
    let at_later = |args: &[&str]| vol.command().env("KMSFS_TEST_NOW", &later).args(args).output().unwrap();
    let out = at_later(&["mount", &backing, &mnt]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&id) && stderr(&out).contains("expired on"),
        "{}",
        stderr(&out)
    );
    let status = String::from_utf8(at_later(&["status", "--check-key", &backing]).stdout).unwrap();
    assert!(status.contains("expired on"), "{status}");
    let described = json(&vol.run(&["key", "describe", "byok", "--json"]));
    assert_eq!(described["state"], "PendingImport");
    assert_eq!(described["versions"], serde_json::json!([]));
    let audit = json(&vol.run(&["audit", "--json", "--key", &id]));
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    for want in [
        "CreateKey",
        "GetParametersForImport",
        "ImportKeyMaterial",
        "DeleteImportedKeyMaterial",
    ] {
        assert!(actions.contains(&want), "{want} in {actions:?}");
    }
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "ImportKeyMaterial" && r["result"] == "error"),
        "refused imports are audited"
    );

    // Other material is refused; the same material (through a passphrase change) brings it back.
    let other: Vec<u8> = material.iter().map(|b| b ^ 0xff).collect();
    let (other_wrapped, _) = wrap_for_import(&vol, "byok", &other, "other");
    let out = vol.run(&["key", "import", "byok", "--material", path_str(&other_wrapped)]);
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("not the material"), "{}", stderr(&out));
    let (again, _) = wrap_for_import(&vol, "byok", &material, "again");
    let new_pass = vol.dir.path().join("new-pass");
    std::fs::write(&new_pass, "another passphrase\n").unwrap();
    json(&vol.run(&[
        "keystore",
        "passwd",
        "--new-passphrase-file",
        path_str(&new_pass),
        "--kdf-memory-mib",
        "19",
        "--kdf-iterations",
        "2",
        "--json",
    ]));
    let with_new = |args: &[&str]| {
        vol.command()
            .env("KMSFS_PASSPHRASE", "another passphrase")
            .args(args)
            .output()
            .unwrap()
    };
    assert_eq!(
        json(&with_new(&[
            "key",
            "import",
            "byok",
            "--material",
            path_str(&again),
            "--json"
        ]))["state"],
        "Enabled"
    );
    let out = with_new(&["mount", &backing, &mnt]);
    assert!(out.status.success(), "{}", stderr(&out));
    let read = std::fs::read(std::path::Path::new(&mnt).join("kept"));
    let unmounted = with_new(&["umount", &mnt]);
    assert_eq!(read.unwrap(), b"under imported material");
    assert!(unmounted.status.success(), "{}", stderr(&unmounted));
}
