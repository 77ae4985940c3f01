//! The volume layer without a mount: a local keystore in a temporary
//! directory, the real metadata DB, two handles on one volume where a test
//! needs a second process (a `kmsfs rotate` beside a mounted daemon).

use std::sync::Arc;

use zeroize::Zeroizing;

use super::*;
use crate::kms::local::{LocalKeystore, MIN_KDF, UnlockSecret};

struct Fixture {
    _dir: tempfile::TempDir,
    backing: PathBuf,
    store: Arc<LocalKeystore>,
    key: String,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let secret = UnlockSecret::Passphrase(Zeroizing::new("volume tests".into()));
    let store = LocalKeystore::create(&dir.path().join("ks.json"), &secret, MIN_KDF).unwrap();
    let key = store.create_key("volume tests").unwrap();
    let store = Arc::new(store);
    let backing = dir.path().join("backing");
    Volume::create(&backing, &store.provider(&key).unwrap()).unwrap();
    Fixture {
        _dir: dir,
        backing,
        store,
        key,
    }
}

impl Fixture {
    fn open(&self) -> Volume {
        Volume::open(&self.backing, Arc::new(self.store.provider(&self.key).unwrap())).unwrap()
    }
}

/// The committed rows, read as another process would.
fn file_key_rows(volume: &Volume) -> Vec<(FileId, u32)> {
    let db = rusqlite::Connection::open(volume.backing().join(DB_FILE)).unwrap();
    let mut stmt = db
        .prepare("SELECT file_id, vk_version FROM file_keys ORDER BY file_id")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, u32>(1)?)))
        .unwrap();
    rows.map(|r| {
        let (id, v) = r.unwrap();
        (id.try_into().unwrap(), v)
    })
    .collect()
}

/// The pending-keys files set aside in the backing directory.
fn set_aside(backing: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(backing)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("unreadable"))
        .collect()
}

#[test]
fn new_keys_are_readable_queued_and_committed() {
    let f = fixture();
    let volume = f.open();
    let (id, cipher) = volume.new_file_key().unwrap();
    let sealed = cipher.seal_block(0, true, b"queued");
    let mut out = [0u8; 6];
    volume
        .file_cipher(&id)
        .unwrap()
        .open_block(0, true, &sealed, &mut out)
        .unwrap();
    assert!(file_key_rows(&volume).is_empty(), "not committed yet");
    volume.sync_keys().unwrap();
    assert_eq!(file_key_rows(&volume), vec![(id, 1)]);
    drop(volume);
    let reopened = f.open();
    reopened
        .file_cipher(&id)
        .unwrap()
        .open_block(0, true, &sealed, &mut out)
        .unwrap();
    assert_eq!(&out, b"queued");
}

#[test]
fn a_failed_commit_keeps_the_keys_queued_and_says_why() {
    let f = fixture();
    let volume = f.open();
    let (id, _) = volume.new_file_key().unwrap();
    let other = rusqlite::Connection::open(f.backing.join(DB_FILE)).unwrap();
    other
        .execute_batch("CREATE TRIGGER refuse BEFORE INSERT ON file_keys BEGIN SELECT RAISE(ABORT, 'refused'); END;")
        .unwrap();
    assert!(volume.sync_keys().is_err());
    assert!(volume.commit_error().unwrap().contains("refused"));
    assert!(volume.file_cipher(&id).is_ok(), "still served from the queue");
    other.execute_batch("DROP TRIGGER refuse;").unwrap();
    volume.sync_keys().unwrap();
    assert_eq!(volume.commit_error(), None);
    assert_eq!(file_key_rows(&volume), vec![(id, 1)]);
}

#[test]
fn keys_queued_before_a_rotation_are_committed_under_the_new_version() {
    let f = fixture();
    let daemon = f.open();
    let queued: Vec<FileId> = (0..5).map(|_| daemon.new_file_key().unwrap().0).collect();
    // Another process rotates meanwhile (with a new master-key version too).
    let store = LocalKeystore::open(
        f.store.path(),
        &UnlockSecret::Passphrase(Zeroizing::new("volume tests".into())),
    )
    .unwrap();
    store.rotate_key(&f.key).unwrap();
    let rotating = f.open();
    let report = rotate::rotate(&rotating, &mut |_, _| ()).unwrap();
    assert_eq!((report.new_version, report.retired_versions.clone()), (2, vec![1]));
    // The daemon's queue was wrapped under version 1, now retired.
    daemon.sync_keys().unwrap();
    let rows = file_key_rows(&daemon);
    assert_eq!(rows.len(), 5);
    assert!(rows.iter().all(|(_, v)| *v == 2), "{rows:?}");
    drop(daemon);
    let reopened = f.open();
    for id in &queued {
        reopened.file_cipher(id).unwrap();
    }
}

/// Begins a rotation as another process would: `version`, a new key from
/// the provider, active; the active one retiring.
fn begin_by_hand(f: &Fixture, volume: &Volume, version: u32) {
    let keys = volume.keys();
    let (_, blob) = keys.provider().generate_data_key(keys.context()).unwrap();
    let db = rusqlite::Connection::open(f.backing.join(DB_FILE)).unwrap();
    db.execute("UPDATE volume_keys SET state = 'retiring' WHERE state = 'active'", [])
        .unwrap();
    db.execute(
        "INSERT INTO volume_keys (version, state, wrapped, created_at) VALUES (?1, 'active', ?2, 0)",
        rusqlite::params![version, blob.as_bytes()],
    )
    .unwrap();
}

#[test]
fn an_interrupted_rotation_resumes() {
    let f = fixture();
    let volume = f.open();
    for _ in 0..3 {
        volume.new_file_key().unwrap();
    }
    volume.sync_keys().unwrap();
    begin_by_hand(&f, &volume, 2);
    drop(volume);
    let volume = f.open();
    let report = rotate::rotate(&volume, &mut |_, _| ()).unwrap();
    assert!(report.resumed);
    assert_eq!((report.new_version, report.retired_versions), (2, vec![1]));
    assert!(file_key_rows(&volume).iter().all(|(_, v)| *v == 2));
}

#[test]
fn keys_read_together_are_the_keys_read_one_by_one() {
    let f = fixture();
    let volume = f.open();
    let committed: Vec<FileId> = (0..3).map(|_| volume.new_file_key().unwrap().0).collect();
    volume.sync_keys().unwrap();
    let queued = volume.new_file_key().unwrap().0;
    let forgotten = committed[1];
    volume.forget_file_key(&forgotten);
    let unknown = [9u8; 16];
    let ids = [committed[0], forgotten, queued, unknown, committed[2]];
    let together = volume.file_ciphers(&ids).unwrap();
    let sealed = |id: &FileId| volume.file_cipher(id).map(|c| c.seal_block(0, true, b"x"));
    for (id, cipher) in ids.iter().zip(together) {
        match (sealed(id), cipher) {
            (Ok(block), Ok(cipher)) => {
                let mut out = [0u8; 1];
                cipher.open_block(0, true, &block, &mut out).unwrap();
                assert_eq!(&out, b"x");
            }
            (Err(one), Err(both)) => assert_eq!(one.to_string(), both.to_string()),
            (one, both) => panic!("{id:?}: one by one {:?}, together {:?}", one.is_ok(), both.is_ok()),
        }
    }
    assert!(volume.file_cipher(&forgotten).is_err() && volume.file_cipher(&unknown).is_err());
}

#[test]
fn keys_saved_under_the_old_version_during_a_rotation_are_stored_before_it_goes() {
    let f = fixture();
    let daemon = f.open();
    let rotating = f.open();
    let queued: Vec<FileId> = (0..3).map(|_| daemon.new_file_key().unwrap().0).collect();
    // The daemon stops serving without having loaded the new version: its
    // keys are saved under version 1, after the rotation opened the volume.
    let (saved, path) = daemon.save_pending_keys().unwrap();
    assert_eq!(
        (saved, path.file_name().unwrap()),
        (3, std::ffi::OsStr::new(rescue::PENDING_FILE))
    );
    drop(daemon);
    let report = rotate::rotate(&rotating, &mut |_, _| ()).unwrap();
    assert_eq!((report.new_version, report.retired_versions), (2, vec![1]));
    assert!(!f.backing.join(rescue::PENDING_FILE).exists());
    let rows = file_key_rows(&rotating);
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|(_, v)| *v == 2), "{rows:?}");
    drop(rotating);
    let reopened = f.open();
    assert_eq!(reopened.problems(), None);
    for id in &queued {
        reopened.file_cipher(id).unwrap();
    }
}

#[test]
fn a_rotation_overtaken_by_a_newer_one_says_so() {
    let f = fixture();
    let volume = f.open();
    for _ in 0..3 {
        volume.new_file_key().unwrap();
    }
    volume.sync_keys().unwrap();
    // Another `rotate` begins version 3 once this one has moved its keys to 2.
    let mut began = false;
    let err = rotate::rotate(&volume, &mut |_, _| {
        if !began {
            began = true;
            begin_by_hand(&f, &volume, 3);
        }
    })
    .unwrap_err();
    assert!(
        matches!(err, VolumeError::RotationOvertaken { version: 2, now: 3, .. }),
        "{err}"
    );
}

/// A copy of a pending-keys file put back after its keys were stored, and
/// their version retired since, names files that have keys: nothing to
/// report, nothing set aside.
#[test]
fn a_stale_pending_keys_copy_of_stored_keys_is_no_problem() {
    let f = fixture();
    let daemon = f.open();
    let queued: Vec<FileId> = (0..3).map(|_| daemon.new_file_key().unwrap().0).collect();
    let (_, path) = daemon.save_pending_keys().unwrap();
    drop(daemon);
    let copy = std::fs::read(&path).unwrap();
    let volume = f.open();
    assert!(!path.exists());
    rotate::rotate(&volume, &mut |_, _| ()).unwrap();
    drop(volume);
    std::fs::write(&path, copy).unwrap();
    let reopened = f.open();
    assert_eq!(reopened.problems(), None);
    assert!(!path.exists());
    assert_eq!(set_aside(&f.backing), Vec::<String>::new());
    for id in &queued {
        reopened.file_cipher(id).unwrap();
    }
}

/// Keys saved under the version that was active when the volume was
/// opened, restored after another process began a rotation: not stored
/// under a version that is retiring, and not dropped either.
#[test]
fn pending_keys_a_rotation_overtook_stay_for_the_next_open() {
    let f = fixture();
    let daemon = f.open();
    let volume = f.open();
    let queued: Vec<FileId> = (0..2).map(|_| daemon.new_file_key().unwrap().0).collect();
    let (_, path) = daemon.save_pending_keys().unwrap();
    begin_by_hand(&f, &volume, 2);
    // Another user's volume, restored by root: the file stays theirs.
    let root = rustix::process::geteuid().is_root();
    if root {
        std::os::unix::fs::lchown(&path, Some(12345), Some(12345)).unwrap();
    }
    let kept = rescue::restore(&f.backing, &volume.keys, &volume.db).unwrap();
    assert!(
        matches!(&kept[..], [rescue::Unstored::Keys(k)] if k.contains("a rotation began meanwhile")),
        "{kept:?}"
    );
    assert!(path.exists(), "the file stays for the next open");
    if root {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (12345, 12345));
    }
    assert!(file_key_rows(&volume).is_empty());
    drop((daemon, volume));
    let reopened = f.open();
    assert_eq!(reopened.problems(), None);
    assert!(!path.exists());
    for id in &queued {
        reopened.file_cipher(id).unwrap();
    }
}

/// A row of the pending-keys file under the active version that does not
/// unwrap (edited in the backing directory) is never stored: the file is
/// set aside and the open says so; the genuine rows are stored.
#[test]
fn a_forged_pending_key_under_the_active_version_is_not_stored() {
    let f = fixture();
    let daemon = f.open();
    let ids: Vec<FileId> = (0..2).map(|_| daemon.new_file_key().unwrap().0).collect();
    let (_, path) = daemon.save_pending_keys().unwrap();
    drop(daemon);
    let mut file: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let forged = crate::util::hex(&ids[0]);
    let rows = file["inserts"].as_array_mut().unwrap();
    let row = rows.iter_mut().find(|r| r[0] == forged.as_str()).unwrap();
    let wrapped = row[2].as_str().unwrap().to_string();
    row[2] = serde_json::Value::String(format!(
        "{}{}",
        if wrapped.starts_with('A') { "B" } else { "A" },
        &wrapped[1..]
    ));
    std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
    let volume = f.open();
    let problem = volume.problems().unwrap();
    assert!(problem.contains("do not authenticate"), "{problem}");
    assert!(volume.file_cipher(&ids[0]).is_err(), "the forged row was not stored");
    volume.file_cipher(&ids[1]).unwrap();
    assert!(!path.exists());
    let aside = set_aside(&f.backing);
    assert_eq!(aside.len(), 1, "{aside:?}");
}

/// A daemon saving its keys waits while another process of the volume
/// holds the pending-keys files (a `rotate` storing them).
#[test]
fn saving_pending_keys_waits_for_a_restore_in_progress() {
    let f = fixture();
    let daemon = f.open();
    daemon.new_file_key().unwrap();
    let held = rescue::FilesLock::take(&f.backing);
    std::thread::scope(|scope| {
        let saving = scope.spawn(|| daemon.save_pending_keys().unwrap());
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!saving.is_finished(), "saved while another process held the files");
        drop(held);
        assert_eq!(saving.join().unwrap().0, 1);
    });
}

/// The whole-DB check a mount runs in the background finds a row that
/// breaks a CHECK constraint (written with `ignore_check_constraints`),
/// which a read-only connection's check passes over.
#[test]
fn the_background_db_check_finds_rows_that_break_check_constraints() {
    let f = fixture();
    let db = f.backing.join(DB_FILE);
    MetadataDb::check_file(&db).unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "PRAGMA ignore_check_constraints = ON; \
         INSERT INTO file_keys (file_id, vk_version, wrapped) VALUES (x'0011', 1, x'00');",
    )
    .unwrap();
    drop(conn);
    let found = MetadataDb::check_file(&db).unwrap_err().to_string();
    assert!(found.contains("CHECK constraint"), "{found}");
}

/// At the end of a rotation the pending-keys files are stored again: one
/// that is not a pending-keys file is set aside and the rotation finishes;
/// keys under a version the volume does not hold keep the old versions.
#[test]
fn a_rotation_finishes_past_a_damaged_pending_file_but_not_past_unstored_keys() {
    let f = fixture();
    let volume = f.open();
    volume.new_file_key().unwrap();
    volume.sync_keys().unwrap();
    let pending = f.backing.join(rescue::PENDING_FILE);
    std::fs::write(&pending, b"{not json").unwrap();
    let report = rotate::rotate(&volume, &mut |_, _| ()).unwrap();
    assert_eq!(report.retired_versions, vec![1]);
    assert_eq!(set_aside(&f.backing), vec!["kmsfs.pending-keys.unreadable".to_string()]);

    let row = serde_json::json!({
        "volume_id": crate::util::hex(&volume.info().volume_id),
        "inserts": [[crate::util::hex(&[7u8; 16]), 99, "AAAA"]],
        "deletes": [],
    });
    std::fs::write(&pending, serde_json::to_vec(&row).unwrap()).unwrap();
    let err = rotate::rotate(&volume, &mut |_, _| ()).unwrap_err();
    assert!(
        matches!(&err, VolumeError::PendingKept(what) if what.contains("[99]")),
        "{err}"
    );
    assert_eq!(set_aside(&f.backing).len(), 2, "kept beside the first");
}
