//! Rotation re-wraps without rewriting data, survives kill -9 and resumes;
//! master-key rotation re-wraps only volume-key blobs; rekey is atomic per
//! file; deleting a file shreds its key.

use crate::common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::{Rng, TestVolume, path_str, stderr, xattr_get, xattr_set};

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn status(vol: &TestVolume) -> serde_json::Value {
    json(&vol.run(&["status", "--json", path_str(&vol.backing)]))
}

/// Files per volume-key version, from `status --json`.
fn files_per_version(vol: &TestVolume) -> BTreeMap<u64, (String, u64)> {
    status(vol)["volume_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["version"].as_u64().unwrap(),
                (k["state"].as_str().unwrap().to_string(), k["files"].as_u64().unwrap()),
            )
        })
        .collect()
}

/// Every backing file except the metadata DB, byte for byte.
fn data_snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    common::all_backing_bytes(dir)
        .into_iter()
        .filter(|(p, _)| !p.file_name().unwrap().to_string_lossy().starts_with("kmsfs."))
        .collect()
}

fn db_files_bytes(vol: &TestVolume) -> Vec<u8> {
    ["kmsfs.db", "kmsfs.db-wal", "kmsfs.db-shm"]
        .iter()
        .flat_map(|n| fs::read(vol.backing.join(n)).unwrap_or_default())
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn query_blobs(vol: &TestVolume, sql: &str) -> Vec<Vec<u8>> {
    let db = rusqlite::Connection::open(vol.backing.join("kmsfs.db")).unwrap();
    let mut stmt = db.prepare(sql).unwrap();
    stmt.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Writes `count` small files (each gets a data key) and returns their contents.
fn populate(vol: &TestVolume, count: usize, seed: u64) -> BTreeMap<String, Vec<u8>> {
    let mut rng = Rng::new(seed);
    let mount = vol.mount();
    let mut files = BTreeMap::new();
    fs::create_dir(vol.path("sub")).unwrap();
    for i in 0..count {
        let name = if i % 3 == 0 {
            format!("sub/f{i}")
        } else {
            format!("f{i}")
        };
        let len = 1 + rng.below(9000) as usize;
        let data = rng.bytes(len);
        fs::write(vol.path(&name), &data).unwrap();
        files.insert(name, data);
    }
    xattr_set(&vol.path("f1"), "user.tag", b"kept through rotation", 0).unwrap();
    mount.unmount();
    files
}

fn verify(vol: &TestVolume, files: &BTreeMap<String, Vec<u8>>) {
    let _m = vol.mount();
    for (name, data) in files {
        let got = fs::read(vol.path(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(&got == data, "{name} differs");
    }
    assert_eq!(
        xattr_get(&vol.path("f1"), b"user.tag").unwrap(),
        b"kept through rotation"
    );
}

#[test]
fn rotation_rewraps_keys_and_leaves_every_data_byte_alone() {
    let vol = TestVolume::init();
    let files = populate(&vol, 120, 1);
    let before = data_snapshot(&vol.backing);
    let old_vk = query_blobs(&vol, "SELECT wrapped FROM volume_keys WHERE version = 1");
    let old_deks = query_blobs(&vol, "SELECT wrapped FROM file_keys");
    let old_secrets = query_blobs(&vol, "SELECT wrapped FROM volume_secrets");
    assert_eq!(old_deks.len(), 120);

    let report = json(&vol.run(&["rotate", "--json", path_str(&vol.backing)]));
    assert_eq!(report["new_version"], 2);
    assert_eq!(report["retired_versions"], serde_json::json!([1]));
    assert_eq!(report["rewrapped_file_keys"], 120);
    assert_eq!(report["resumed"], false);

    assert!(
        data_snapshot(&vol.backing) == before,
        "rotation rewrote file data, headers or names"
    );
    let db = db_files_bytes(&vol);
    assert!(
        !contains(&db, &old_vk[0]),
        "the retired volume key's wrapped blob is still in the DB files"
    );
    for old in old_deks.iter().chain(&old_secrets) {
        assert!(!contains(&db, old), "an old wrapped key is still in the DB files");
    }
    let versions = files_per_version(&vol);
    assert_eq!(versions[&1], ("retired".into(), 0));
    assert_eq!(versions[&2], ("active".into(), 120));
    assert_eq!(status(&vol)["rotation_in_progress"], false);
    let text = vol.run(&["status", path_str(&vol.backing)]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("retired keys:   v1 (erased, no files)"), "{text}");
    assert!(text.contains("volume key v2:  active (120 files"), "{text}");
    verify(&vol, &files);
}

#[test]
fn rotation_and_master_key_rotation_on_a_live_mount_during_concurrent_writes() {
    let vol = TestVolume::init();
    let files = populate(&vol, 60, 2);
    let mount = vol.mount();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let written = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut written = BTreeMap::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || i < 50 {
                let name = format!("live{i}");
                let data = format!("written during rotation {i}").repeat(1 + i % 50).into_bytes();
                fs::write(vol.path(&name), &data).unwrap();
                assert_eq!(fs::read(vol.path(&name)).unwrap(), data);
                if i % 7 == 0 {
                    // reading older files (their keys are being re-wrapped) works too
                    assert_eq!(fs::read(vol.path("f2")).unwrap(), files["f2"]);
                }
                written.insert(name, data);
                i += 1;
            }
            written
        });
        let master_key = status(&vol)["master_key_id"].as_str().unwrap().to_string();
        for _ in 0..3 {
            // The master key gains a version the daemon has not seen; the new
            // volume key is wrapped under it, and the daemon must adopt it.
            json(&vol.run(&["key", "rotate", &master_key, "--json"]));
            let out = vol.run(&["rotate", "--json", path_str(&vol.backing)]);
            json(&out);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap()
    });
    for (name, data) in &written {
        assert_eq!(&fs::read(vol.path(name)).unwrap(), data, "{name}");
    }
    mount.unmount();
    let versions = files_per_version(&vol);
    let (newest, (state, count)) = versions.iter().next_back().unwrap();
    assert_eq!((*newest, state.as_str()), (4, "active"));
    assert_eq!(
        *count as usize,
        60 + written.len(),
        "every key, old and new, ends on the newest version"
    );
    for (v, (state, count)) in &versions {
        if v != newest {
            assert_eq!((state.as_str(), *count), ("retired", 0), "version {v}");
        }
    }
    let mut all = files;
    all.extend(written);
    verify(&vol, &all);
}

#[test]
fn rotation_killed_at_many_points_keeps_everything_readable_and_resumes() {
    let vol = TestVolume::init();
    let files = populate(&vol, 400, 3);
    // Batches of 40 over 400 keys: killed after 40, 80 and 200 re-wraps in all.
    for kill_after in [0u64, 40, 100] {
        let out = vol
            .command()
            .env("KMSFS_TEST_ROTATE_BATCH", "40")
            .env("KMSFS_TEST_ROTATE_KILL_AFTER", kill_after.to_string())
            .args(["rotate", path_str(&vol.backing)])
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGKILL),
            "killed by the hook: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(status(&vol)["rotation_in_progress"], true);
        verify(&vol, &files); // mid-rotation: some keys on v1, some on v2, all readable
    }
    let report = json(&vol.run(&["rotate", "--json", path_str(&vol.backing)]));
    assert_eq!(report["resumed"], true);
    assert_eq!(report["new_version"], 2, "resuming does not start yet another version");
    let versions = files_per_version(&vol);
    assert_eq!(versions[&1], ("retired".into(), 0));
    assert_eq!(versions[&2], ("active".into(), 400));
    verify(&vol, &files);
}

#[test]
fn master_key_rotation_then_rewrap_touches_only_volume_key_blobs() {
    let vol = TestVolume::init();
    let files = populate(&vol, 30, 4);
    let before = data_snapshot(&vol.backing);
    let deks_before = query_blobs(&vol, "SELECT wrapped FROM file_keys ORDER BY file_id");
    let key_id = status(&vol)["master_key_id"].as_str().unwrap().to_string();
    let rotated = json(&vol.run(&["key", "rotate", &key_id, "--json"]));
    assert_eq!(rotated["new_version"], 2);
    let blob = &query_blobs(&vol, "SELECT wrapped FROM volume_keys WHERE state = 'active'")[0];
    assert_eq!(u32::from_be_bytes(blob[1..5].try_into().unwrap()), 1);
    // Old master-key versions still decrypt: the volume mounts, and the
    // mount moves its volume key forward (one ReEncrypt).
    verify(&vol, &files);
    let moved = &query_blobs(&vol, "SELECT wrapped FROM volume_keys WHERE state = 'active'")[0];
    assert_eq!(
        u32::from_be_bytes(moved[1..5].try_into().unwrap()),
        2,
        "mount re-wrapped it"
    );
    // `rewrap` does it for volumes not mounted meanwhile (and again here).
    let report = json(&vol.run(&["rewrap", "--json", path_str(&vol.backing)]));
    assert_eq!(report["rewrapped_volume_keys"], serde_json::json!([1]));
    assert!(
        report["provider_calls"].as_u64().unwrap() <= 2,
        "a handful of provider calls: {report}"
    );
    let new_blob = &query_blobs(&vol, "SELECT wrapped FROM volume_keys WHERE state = 'active'")[0];
    assert_eq!(
        u32::from_be_bytes(new_blob[1..5].try_into().unwrap()),
        2,
        "wrapped under the newest master version"
    );
    assert!(!contains(&db_files_bytes(&vol), blob), "the old blob is erased");
    assert_eq!(
        query_blobs(&vol, "SELECT wrapped FROM file_keys ORDER BY file_id"),
        deks_before
    );
    assert!(data_snapshot(&vol.backing) == before);
    verify(&vol, &files);
}

fn backing_data_files(vol: &TestVolume) -> Vec<PathBuf> {
    fs::read_dir(&vol.backing)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().contains('.'))
        .collect()
}

#[test]
fn rekey_in_the_backing_directory_is_atomic() {
    let vol = TestVolume::init();
    let data = Rng::new(5).bytes(50_000);
    let m = vol.mount();
    fs::write(vol.path("secret"), &data).unwrap();
    xattr_set(&vol.path("secret"), "user.k", b"v", 0).unwrap();
    m.unmount();
    let [backing] = backing_data_files(&vol).try_into().unwrap();
    let id_of = |p: &Path| fs::read(p).unwrap()[2..18].to_vec();
    let old_id = id_of(&backing);

    // Killed before the rename: the old file, whole.
    let out = vol
        .command()
        .env("KMSFS_TEST_REKEY_KILL_AT", "before-rename")
        .args(["rekey", path_str(&backing)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(id_of(&backing), old_id);
    verify_one(&vol, &data);

    // Killed after the rename: the new file, whole.
    let out = vol
        .command()
        .env("KMSFS_TEST_REKEY_KILL_AT", "after-rename")
        .args(["rekey", path_str(&backing)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let mid_id = id_of(&backing);
    assert_ne!(mid_id, old_id);
    verify_one(&vol, &data);

    // A normal run: new id, the previous key row erased, content and xattr kept.
    let report = json(&vol.run(&["rekey", "--json", path_str(&backing)]));
    // The files kmsfs keeps beside the volume's are not re-keyed.
    for own in [".kmsfs.diriv", "kmsfs.db"] {
        let out = vol.run(&["rekey", path_str(&vol.backing.join(own))]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{own}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a file of the volume"));
    }
    assert_eq!(report[0]["via"], "backing");
    let new_id = id_of(&backing);
    assert_ne!(new_id, mid_id);
    let ids = query_blobs(&vol, "SELECT file_id FROM file_keys");
    assert!(ids.contains(&new_id) && !ids.contains(&mid_id));
    verify_one(&vol, &data);

    // A mounted volume is re-keyed through its mount point, not behind the daemon's back.
    let m = vol.mount();
    let refused = vol.run(&["rekey", path_str(&backing)]);
    assert_eq!(refused.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("mount point"));
    let through = json(&vol.run(&["rekey", "--json", path_str(&vol.path("secret"))]));
    assert_eq!(through[0]["via"], "mount");
    assert_eq!(fs::read(vol.path("secret")).unwrap(), data);
    assert_eq!(xattr_get(&vol.path("secret"), b"user.k").unwrap(), b"v");
    // A read-only file with xattrs (its copy gets them before its mode).
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(vol.path("secret"), fs::Permissions::from_mode(0o444)).unwrap();
    json(&vol.run(&["rekey", "--json", path_str(&vol.path("secret"))]));
    assert_eq!(xattr_get(&vol.path("secret"), b"user.k").unwrap(), b"v");
    assert_eq!(
        fs::metadata(vol.path("secret")).unwrap().permissions().mode() & 0o777,
        0o444
    );
    fs::set_permissions(vol.path("secret"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::hard_link(vol.path("secret"), vol.path("link")).unwrap();
    let linked = vol.run(&["rekey", path_str(&vol.path("secret"))]);
    assert_eq!(linked.status.code(), Some(2), "hard-linked files are refused");
    fs::remove_file(vol.path("link")).unwrap();
    // A path that fails does not stop the next one.
    let missing = vol.path("missing");
    let out = vol.run(&["rekey", "--json", path_str(&missing), path_str(&vol.path("secret"))]);
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    let each: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(each[0]["error"]["exit_status"], 7, "{each}");
    assert_eq!(each[1]["via"], "mount", "{each}");
    // A file a process holds open is refused: its later writes would go to
    // the old copy, which the rename unlinks, and be lost.
    let log = vol.path("log");
    let mut held = fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
    held.write_all(b"line1\n").unwrap();
    let refused = vol.run(&["rekey", path_str(&log)]);
    assert_eq!(
        refused.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let said = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(said.contains(&format!("(pid {})", std::process::id())), "{said}");
    held.write_all(b"line2\n").unwrap();
    drop(held);
    json(&vol.run(&["rekey", "--json", path_str(&log)]));
    assert_eq!(fs::read(&log).unwrap(), b"line1\nline2\n");
    // So is one mapped, with no descriptor left open.
    let map = {
        use std::os::fd::AsRawFd;
        let file = fs::File::open(&log).unwrap();
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                12,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        map
    };
    let refused = vol.run(&["rekey", path_str(&log)]);
    assert_eq!(
        refused.status.code(),
        Some(6),
        "mapped: {}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(unsafe { libc::munmap(map, 12) }, 0);
    json(&vol.run(&["rekey", "--json", path_str(&log)]));
    fs::remove_file(&log).unwrap();
    m.unmount();
    let [after] = backing_data_files(&vol).try_into().unwrap();
    assert_ne!(
        id_of(&after),
        new_id,
        "re-keyed through the mount: a new file id and key"
    );
}

fn verify_one(vol: &TestVolume, data: &[u8]) {
    let _m = vol.mount();
    assert_eq!(fs::read(vol.path("secret")).unwrap(), data);
    assert_eq!(xattr_get(&vol.path("secret"), b"user.k").unwrap(), b"v");
}

#[test]
fn deleting_a_file_shreds_its_key_from_the_db_files() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::write(vol.path("doomed"), b"shred me").unwrap();
    fs::write(vol.path("kept"), b"keep me").unwrap();
    m.unmount();
    let rows = query_blobs(&vol, "SELECT wrapped FROM file_keys");
    assert_eq!(rows.len(), 2);
    let m = vol.mount();
    fs::remove_file(vol.path("doomed")).unwrap();
    m.unmount();
    let left = query_blobs(&vol, "SELECT wrapped FROM file_keys");
    assert_eq!(left.len(), 1);
    let gone: Vec<_> = rows.iter().filter(|r| !left.contains(r)).collect();
    assert_eq!(gone.len(), 1);
    assert!(
        !contains(&db_files_bytes(&vol), gone[0]),
        "the erased key's bytes remain in the DB files"
    );
    let _m = vol.mount();
    assert_eq!(fs::read(vol.path("kept")).unwrap(), b"keep me");
}

/// pjdfstest unlink/14: written, unlinked and closed before the written data
/// (held by the writeback cache) reached the daemon: the key still goes.
#[test]
fn a_file_unlinked_while_open_is_shredded_when_closed() {
    use std::io::Write;
    let vol = TestVolume::init();
    let m = vol.mount();
    for i in 0..20 {
        let path = vol.path(&format!("brief{i}"));
        let mut f = fs::File::create(&path).unwrap();
        f.write_all(&vec![i as u8; 5000 + i * 300]).unwrap();
        fs::remove_file(&path).unwrap();
        f.write_all(b"written after the unlink").unwrap();
        drop(f);
    }
    m.unmount();
    assert!(
        query_blobs(&vol, "SELECT wrapped FROM file_keys").is_empty(),
        "every key erased"
    );
    let fsck = vol.run(&["fsck", path_str(&vol.backing)]);
    assert_eq!(fsck.status.code(), Some(0), "{}", String::from_utf8_lossy(&fsck.stdout));
}

#[test]
fn removing_many_files_erases_every_key_by_unmount() {
    // Keys of files read or written in this mount are known to the daemon;
    // the others are found by reading headers off the unlink path.
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::create_dir(vol.path("tree")).unwrap();
    for i in 0..300 {
        fs::write(vol.path(&format!("tree/f{i}")), format!("file {i}")).unwrap();
    }
    fs::write(vol.path("kept"), b"keep me").unwrap();
    m.unmount();
    assert_eq!(query_blobs(&vol, "SELECT file_id FROM file_keys").len(), 301);
    let m = vol.mount();
    for i in (0..300).step_by(3) {
        assert_eq!(
            fs::read_to_string(vol.path(&format!("tree/f{i}"))).unwrap(),
            format!("file {i}")
        );
    }
    fs::remove_dir_all(vol.path("tree")).unwrap();
    m.unmount();
    assert_eq!(
        query_blobs(&vol, "SELECT file_id FROM file_keys").len(),
        1,
        "keys of removed files are left in the DB"
    );
    let _m = vol.mount();
    assert_eq!(fs::read(vol.path("kept")).unwrap(), b"keep me");
}

/// An old volume key put back in the DB as a new version (the blob of
/// version 1 copied into a version 2 row, version 1 marked retiring) would
/// turn a rotation into one that changes nothing: no command opens it.
#[test]
fn an_old_volume_key_put_back_as_a_new_version_is_refused() {
    let vol = TestVolume::init();
    let files = populate(&vol, 3, 11);
    let db = rusqlite::Connection::open(vol.backing.join("kmsfs.db")).unwrap();
    db.execute_batch(
        "INSERT INTO volume_keys SELECT 2, 'active', wrapped, created_at FROM volume_keys WHERE version = 1;
         UPDATE volume_keys SET state = 'retiring' WHERE version = 1;",
    )
    .unwrap();
    for args in [
        vec!["rotate", path_str(&vol.backing)],
        vec!["mount", path_str(&vol.backing), path_str(&vol.mnt)],
        vec!["fsck", path_str(&vol.backing)],
    ] {
        let out = vol.run(&args);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("an old volume key put back"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    assert!(!crate::common::is_mounted(&vol.mnt));
    // An active version whose blob is gone (retired, yet active).
    db.execute_batch("UPDATE volume_keys SET wrapped = NULL WHERE version = 2;")
        .unwrap();
    let out = vol.run(&["mount", path_str(&vol.backing), path_str(&vol.mnt)]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("the active volume key"), "{}", stderr(&out));
    assert!(!crate::common::is_mounted(&vol.mnt));
    // Put right, the volume is as it was.
    db.execute_batch("DELETE FROM volume_keys WHERE version = 2; UPDATE volume_keys SET state = 'active';")
        .unwrap();
    verify(&vol, &files);
    // The last version there can be, retired: a rotation names it and
    // changes nothing.
    db.execute_batch(
        "INSERT INTO volume_keys SELECT 4294967295, 'retired', NULL, created_at FROM volume_keys WHERE version = 1;",
    )
    .unwrap();
    let out = vol.run(&["rotate", path_str(&vol.backing)]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("version 4294967295, after which no version can follow"),
        "{}",
        stderr(&out)
    );
    verify(&vol, &files);
}
