//! The keystore: creation, unlocking, integrity, concurrent writers, providers.

use super::*;

fn fast() -> KdfParams {
    MIN_KDF
}

#[test]
fn passphrase_keystore_generate_and_decrypt_with_context() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks.json");
    let secret = UnlockSecret::Passphrase(Zeroizing::new("correct horse".into()));
    let ks = LocalKeystore::create(&path, &secret, fast()).unwrap();
    let id = ks.create_key("test").unwrap();
    let ks = Arc::new(LocalKeystore::open(&path, &secret).unwrap());
    let p = ks.provider(&id).unwrap();
    let ctx = EncryptionContext::for_volume(&[1; 16]);
    let (key, wrapped) = p.generate_data_key(&ctx).unwrap();
    assert_eq!(p.decrypt(&wrapped, &ctx).unwrap(), key);
    let other = EncryptionContext::for_volume(&[2; 16]);
    assert!(matches!(
        p.decrypt(&wrapped, &other),
        Err(KmsError::InvalidCiphertext(_))
    ));
    assert_eq!(p.call_count(), 3);
    // A blob naming a version the keystore never had (it comes from the
    // volume's DB) is told apart from a damaged keystore.
    let mut bytes = wrapped.as_bytes().to_vec();
    bytes[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
    match p.decrypt(&WrappedKey::from_bytes(bytes), &ctx) {
        Err(e @ KmsError::UnknownKeyVersion { version: u32::MAX, .. }) => {
            assert!(e.to_string().contains("metadata DB"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    // One naming a version destroyed by `key trim` says so, and what opens it.
    ks.rotate_key(&id).unwrap();
    ks.trim(&id, 2, &[]).unwrap();
    match p.decrypt(&wrapped, &ctx) {
        Err(e @ KmsError::UnknownKeyVersion { version: 1, .. }) => {
            assert!(e.to_string().contains("was destroyed (`kmsfs key trim`)"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let wrong = UnlockSecret::Passphrase(Zeroizing::new("wrong".into()));
    assert!(matches!(
        LocalKeystore::open(&path, &wrong),
        Err(KmsError::WrongPassphrase(_))
    ));
    let text = fs::read_to_string(&path).unwrap();
    assert!(!text.contains("correct horse"));
}

#[test]
fn key_file_keystore_rejects_other_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (dir.path().join("k1"), dir.path().join("k2"));
    create_key_file(&k1).unwrap();
    create_key_file(&k2).unwrap();
    let path = dir.path().join("ks.json");
    LocalKeystore::create(&path, &UnlockSecret::KeyFile(k1.clone()), fast()).unwrap();
    assert!(LocalKeystore::open(&path, &UnlockSecret::KeyFile(k1)).is_ok());
    assert!(matches!(
        LocalKeystore::open(&path, &UnlockSecret::KeyFile(k2)),
        Err(KmsError::WrongKeyFile(_))
    ));
}

#[test]
fn states_aliases_and_versions_are_authenticated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks.json");
    let secret = UnlockSecret::Passphrase(Zeroizing::new("pass".into()));
    let ks = LocalKeystore::create(&path, &secret, fast()).unwrap();
    let id = ks.create_key("test").unwrap();
    let original = fs::read_to_string(&path).unwrap();
    for (from, to) in [
        ("\"state\": \"Enabled\"", "\"state\": \"Disabled\""),
        ("\"alias\": null", "\"alias\": \"prod\""),
        ("\"description\": \"test\"", "\"description\": \"x\""),
    ] {
        assert!(original.contains(from), "{from}");
        fs::write(&path, original.replace(from, to)).unwrap();
        match LocalKeystore::open(&path, &secret) {
            Err(KmsError::KeystoreCorrupt { reason, .. }) => {
                assert!(
                    reason.contains("changed outside") && reason.contains("backup"),
                    "{reason}"
                )
            }
            other => panic!("{to}: {:?}", other.map(|_| ())),
        }
    }
    // Dropping the tag, or claiming the old format, does not get around it.
    let mut value: serde_json::Value = serde_json::from_str(&original).unwrap();
    value.as_object_mut().unwrap().remove("integrity");
    fs::write(&path, value.to_string()).unwrap();
    assert!(LocalKeystore::open(&path, &secret).is_err());
    value["format"] = 1.into();
    fs::write(&path, value.to_string()).unwrap();
    assert!(matches!(
        LocalKeystore::open(&path, &secret),
        Err(KmsError::WrongPassphrase(_))
    ));
    fs::write(&path, &original).unwrap();
    assert_eq!(LocalKeystore::open(&path, &secret).unwrap().key_id(&id).unwrap(), id);
}

#[test]
fn a_cut_keystore_says_to_restore_it_from_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks.json");
    let secret = UnlockSecret::Passphrase(Zeroizing::new("pass".into()));
    LocalKeystore::create(&path, &secret, fast()).unwrap();
    let text = fs::read(&path).unwrap();
    fs::write(&path, &text[..text.len() / 2]).unwrap();
    match LocalKeystore::open(&path, &secret) {
        Err(e @ KmsError::KeystoreCorrupt { .. }) => {
            let said = e.to_string();
            assert!(
                said.contains("ks.json") && said.contains("restore it from your backup"),
                "{said}"
            );
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn weak_argon2_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let secret = UnlockSecret::Passphrase(Zeroizing::new("pass".into()));
    for (memory_kib, iterations) in [(8 * 1024, 3), (64 * 1024, 1)] {
        let weak = KdfParams {
            memory_kib,
            iterations,
            parallelism: 1,
        };
        let path = dir.path().join(format!("{memory_kib}-{iterations}.json"));
        assert!(matches!(
            LocalKeystore::create(&path, &secret, weak),
            Err(KmsError::WeakKdf { .. })
        ));
        assert!(!path.exists());
    }
}
