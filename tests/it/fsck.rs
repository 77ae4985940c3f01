//! fsck detects each kind of damage, repairs what can be repaired without
//! guessing, and moves unreadable entries into lost+found with a report.

use crate::common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::common::{Rng, TestVolume, fsck, kinds, path_str};

/// Backing entries of a directory that are user entries (encrypted names).
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().contains('.'))
        .collect();
    v.sort();
    v
}

fn new_entry<T>(vol: &TestVolume, dir: &Path, f: impl FnOnce() -> T) -> (T, PathBuf) {
    let before = entries(dir);
    let out = f();
    let after = entries(dir);
    let new: Vec<_> = after.into_iter().filter(|p| !before.contains(p)).collect();
    assert_eq!(new.len(), 1, "{new:?}");
    let _ = vol;
    (out, new[0].clone())
}

/// Flips the lowest bit of the byte at `offset` of a backing file.
fn flip_bit(path: &Path, offset: u64) {
    let file = fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 1], offset).unwrap();
}

#[test]
fn clean_volume_is_clean_and_mounted_volume_is_refused() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::create_dir(vol.path("d")).unwrap();
    fs::write(vol.path("d/f"), Rng::new(1).bytes(100_000)).unwrap();
    fs::write(vol.path(&"L".repeat(255)), b"long").unwrap();
    std::os::unix::fs::symlink("d/f", vol.path("s")).unwrap();
    common::xattr_set(&vol.path("d"), "user.x", b"y", 0).unwrap();
    let refused = vol.run(&["fsck", path_str(&vol.backing)]);
    assert_eq!(refused.status.code(), Some(6), "fsck refuses a mounted volume");
    // Named by its mount point, the volume is found, and refused the same way.
    let refused = vol.run(&["fsck", path_str(&vol.mnt)]);
    assert_eq!(refused.status.code(), Some(6), "{}", common::stderr(&refused));
    // A rotation named by the mount point rotates the volume mounted there.
    let rotated = vol.run(&["rotate", path_str(&vol.mnt)]);
    assert!(rotated.status.success(), "{}", common::stderr(&rotated));
    m.unmount();
    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["files"], 2);
    assert_eq!(report["directories"], 2);
    assert_eq!(report["symlinks"], 1);
    assert_eq!(report["blocks"], 25 + 1);
    assert_eq!(report["db_integrity"], "ok");
}

#[test]
fn fsck_of_something_that_is_not_a_volume_says_so_and_leaves_nothing() {
    let vol = TestVolume::init();
    let missing = vol.dir.path().join("missing");
    let plain = vol.dir.path().join("just-a-directory");
    fs::create_dir(&plain).unwrap();
    for dir in [&missing, &plain] {
        let out = vol.run(&["fsck", path_str(dir)]);
        assert_eq!(
            out.status.code(),
            Some(4),
            "{dir:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(!missing.exists());
    assert!(
        entries(&plain).is_empty(),
        "no lock file left behind: {:?}",
        entries(&plain)
    );
}

#[test]
fn a_write_cut_short_at_a_page_boundary_is_named_as_such() {
    let vol = TestVolume::init();
    let data = Rng::new(3).bytes(3 * 4096);
    let m = vol.mount();
    let (_, torn) = new_entry(&vol, &vol.backing, || fs::write(vol.path("torn"), &data).unwrap());
    let (_, flipped) = new_entry(&vol, &vol.backing, || fs::write(vol.path("flipped"), &data).unwrap());
    m.unmount();
    // What a kill -9 during the write of block 2 leaves: the backing file
    // stops at the page boundary inside it.
    fs::OpenOptions::new()
        .write(true)
        .open(&torn)
        .unwrap()
        .set_len(3 * 4096)
        .unwrap();
    flip_bit(&flipped, 18 + 2 * 4124 + 7);

    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 10, "{report}");
    let detail = |path: &str| {
        let problem = report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["path"] == path);
        problem.unwrap()["detail"].as_str().unwrap().to_string()
    };
    assert!(
        detail("torn").contains("[2]; the file ends at a page boundary"),
        "{report}"
    );
    assert!(!detail("flipped").contains("page boundary"), "{report}");
}

#[test]
fn damaged_files_go_to_lost_and_found_and_salvage_zeroes_bad_blocks() {
    let vol = TestVolume::init();
    let data = Rng::new(2).bytes(5 * 4096);
    let m = vol.mount();
    let (_, bad_block) = new_entry(&vol, &vol.backing, || fs::write(vol.path("bad-block"), &data).unwrap());
    let (_, no_key) = new_entry(&vol, &vol.backing, || {
        fs::write(vol.path("no-key"), b"lost key").unwrap()
    });
    let (_, bad_header) = new_entry(&vol, &vol.backing, || {
        fs::write(vol.path("bad-header"), b"header").unwrap()
    });
    let (_, salvage) = new_entry(&vol, &vol.backing, || fs::write(vol.path("salvage-me"), &data).unwrap());
    fs::write(vol.path("fine"), b"untouched").unwrap();
    m.unmount();
    // Damage: a flipped bit in block 2, a missing key row, a broken header version.
    for f in [&bad_block, &salvage] {
        flip_bit(f, 18 + 2 * 4124 + 100);
    }
    let id = fs::read(&no_key).unwrap()[2..18].to_vec();
    rusqlite::Connection::open(vol.backing.join("kmsfs.db"))
        .unwrap()
        .execute("DELETE FROM file_keys WHERE file_id = ?1", [&id])
        .unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&bad_header)
        .unwrap()
        .write_all_at(&[0, 9], 0)
        .unwrap();
    let (_, zero_id) = new_entry(&vol, &vol.backing, || {
        let m = vol.mount();
        fs::write(vol.path("zero-id"), b"id gone").unwrap();
        m.unmount();
    });
    fs::OpenOptions::new()
        .write(true)
        .open(&zero_id)
        .unwrap()
        .write_all_at(&[0u8; 16], 2)
        .unwrap();

    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 10, "{report}");
    // The zeroed id also leaves its key row without a file.
    assert_eq!(
        kinds(&report),
        [
            "bad_blocks",
            "bad_blocks",
            "damaged_header",
            "damaged_header",
            "missing_key",
            "orphan_key"
        ]
    );
    let bad = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["path"] == "bad-block")
        .unwrap();
    assert!(
        bad["detail"].as_str().unwrap().contains("[2]"),
        "names the bad block: {bad}"
    );

    let (code, report) = fsck(&vol, &["--repair"]);
    assert_eq!(code, 11, "{report}");
    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 0, "after repair the volume is clean: {report}");
    assert_eq!(
        report["quarantined"].as_array().unwrap().len(),
        4,
        "unreadable files wait in lost+found: {report}"
    );

    let lost_names = |vol: &TestVolume| {
        let m = vol.mount();
        let mut lost: Vec<String> = fs::read_dir(vol.path("lost+found"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        lost.sort();
        m.unmount();
        lost
    };
    {
        let _m = vol.mount();
        assert_eq!(fs::read(vol.path("fine")).unwrap(), b"untouched");
        assert_eq!(
            fs::read(vol.path("bad-header")).unwrap(),
            b"header",
            "a header whose id is proven is rewritten in place"
        );
        for gone in ["bad-block", "no-key", "zero-id", "salvage-me"] {
            assert!(!vol.path(gone).exists(), "{gone} moved away");
        }
        // Moved as it is: the readable blocks read, the bad one is EIO.
        let moved = fs::read_dir(vol.path("lost+found"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("bad-block-"))
            .unwrap();
        let f = fs::File::open(vol.path(&format!("lost+found/{moved}"))).unwrap();
        let mut first = vec![0u8; 4096];
        f.read_exact_at(&mut first, 0).unwrap();
        assert_eq!(first, data[..4096]);
        assert_eq!(
            f.read_exact_at(&mut first, 2 * 4096).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
    }
    let lost = lost_names(&vol);
    assert_eq!(lost.len(), 5, "{lost:?}");

    // Salvage: the bad blocks become zeros, clearly marked; everything else is intact.
    let out = vol.run(&["fsck", "--repair", "--salvage", path_str(&vol.backing)]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{said}");
    // What it did to files already in lost+found is said.
    assert_eq!(
        said.lines()
            .filter(|l| l.starts_with("in lost+found: ") && l.contains("replaced by ZEROS; renamed"))
            .count(),
        2,
        "{said}"
    );
    let _m = vol.mount();
    let lost: Vec<String> = fs::read_dir(vol.path("lost+found"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let salvaged: Vec<&String> = lost.iter().filter(|n| n.ends_with(".salvaged")).collect();
    assert_eq!(salvaged.len(), 2, "{lost:?}");
    for name in salvaged {
        let got = fs::read(vol.path(&format!("lost+found/{name}"))).unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got[2 * 4096..3 * 4096].iter().all(|&b| b == 0));
        assert_eq!(got[..2 * 4096], data[..2 * 4096]);
        assert_eq!(got[3 * 4096..], data[3 * 4096..]);
    }
    let report_name = lost.iter().find(|n| n.starts_with("fsck-report-")).unwrap();
    let text = fs::read_to_string(vol.path(&format!("lost+found/{report_name}"))).unwrap();
    assert!(
        text.contains("bad-block") && text.contains("[2]"),
        "the report names the file and block: {text}"
    );
}

#[test]
fn orphans_temporaries_ivs_and_names() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::create_dir(vol.path("empty")).unwrap();
    fs::create_dir(vol.path("full")).unwrap();
    fs::write(vol.path("full/inside"), b"inside").unwrap();
    let long = "N".repeat(200);
    fs::write(vol.path(&long), b"long").unwrap();
    let (_, renamed) = new_entry(&vol, &vol.backing, || {
        fs::write(vol.path("renamed"), b"content kept").unwrap()
    });
    let (_, deleted) = new_entry(&vol, &vol.backing, || fs::write(vol.path("deleted"), b"x").unwrap());
    m.unmount();
    let dirs = entries(&vol.backing)
        .into_iter()
        .filter(|p| p.is_dir())
        .collect::<Vec<_>>();
    // Damage: IVs removed from both directories; a long name's entry removed
    // (leaving its sidecar); a backing file deleted behind kmsfs's back (an
    // orphan key); a leftover temporary directory; a name that does not decrypt.
    for d in &dirs {
        fs::remove_file(d.join(".kmsfs.diriv")).unwrap();
    }
    let long_entry = fs::read_dir(&vol.backing)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("kmsfs.longname.") && !n.ends_with(".name")
        })
        .unwrap();
    fs::remove_file(&long_entry).unwrap();
    fs::remove_file(&deleted).unwrap();
    fs::create_dir(vol.backing.join("kmsfs.tmp.0123456789abcdef")).unwrap();
    fs::write(vol.backing.join("kmsfs.tmp.0123456789abcdef/.kmsfs.diriv"), [7u8; 16]).unwrap();
    fs::rename(
        &renamed,
        vol.backing.join("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    )
    .unwrap();

    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 10, "{report}");
    let k = kinds(&report);
    for kind in [
        "bad_name",
        "leftover_temporary",
        "missing_dir_iv",
        "orphan_key",
        "orphan_sidecar",
    ] {
        assert!(k.contains(&kind.to_string()), "{kind} in {k:?}");
    }
    let (code, report) = fsck(&vol, &["--repair"]);
    // The non-empty directory's IV cannot be recovered: its entry is moved, the directory stays.
    assert_eq!(code, 12, "{report}");
    let unrepaired: Vec<_> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["repair"].is_null())
        .collect();
    assert_eq!(unrepaired.len(), 1, "{unrepaired:?}");
    assert_eq!(unrepaired[0]["kind"], "missing_dir_iv");
    assert!(!vol.backing.join("kmsfs.tmp.0123456789abcdef").exists());
    let _m = vol.mount();
    let lost: Vec<String> = fs::read_dir(vol.path("lost+found"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let contents: Vec<Vec<u8>> = lost
        .iter()
        .filter(|n| !n.starts_with("fsck-report"))
        .map(|n| fs::read(vol.path(&format!("lost+found/{n}"))).unwrap())
        .collect();
    assert!(
        contents.contains(&b"content kept".to_vec()),
        "the entry whose name broke is rescued"
    );
    assert!(
        contents.contains(&b"inside".to_vec()),
        "entries of the directory whose IV was lost are rescued"
    );
    assert!(
        fs::read_dir(vol.path("empty")).unwrap().next().is_none(),
        "the empty directory works again"
    );
    fs::write(vol.path("empty/new"), b"ok").unwrap();
}

#[test]
fn an_unreadable_entry_inside_an_unreadable_directory_is_rescued_with_it() {
    let vol = TestVolume::init();
    let m = vol.mount();
    let (_, dir) = new_entry(&vol, &vol.backing, || fs::create_dir(vol.path("outer")).unwrap());
    let (_, file) = new_entry(&vol, &dir, || fs::write(vol.path("outer/inner"), b"nested").unwrap());
    m.unmount();
    // Both names replaced by names that do not decrypt: the file's first.
    fs::rename(&file, dir.join("BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB")).unwrap();
    fs::rename(&dir, vol.backing.join("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")).unwrap();
    let (code, report) = fsck(&vol, &["--repair"]);
    assert_eq!(code, 11, "every problem repaired: {report}");
    assert_eq!(kinds(&report), vec!["bad_name", "bad_name"], "{report}");
    let _m = vol.mount();
    let lost: Vec<String> = fs::read_dir(vol.path("lost+found"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("fsck-report"))
        .collect();
    assert_eq!(lost.len(), 2, "{lost:?}");
    let contents: Vec<Vec<u8>> = lost
        .iter()
        .filter_map(|n| fs::read(vol.path(&format!("lost+found/{n}"))).ok())
        .collect();
    assert_eq!(contents, vec![b"nested".to_vec()], "{lost:?}");
}

#[test]
fn orphan_long_symlink_targets_are_reported_and_erased() {
    let vol = TestVolume::init();
    let long_target = "t/".repeat(1900);
    let m = vol.mount();
    std::os::unix::fs::symlink(&long_target, vol.path("long-link")).unwrap();
    std::os::unix::fs::symlink("short", vol.path("short-link")).unwrap();
    m.unmount();
    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 0, "a long target in use is no orphan: {report}");

    // A crash between removing the backing symlink and erasing its row.
    let rows = |vol: &TestVolume| -> i64 {
        rusqlite::Connection::open(vol.backing.join("kmsfs.db"))
            .unwrap()
            .query_row("SELECT count(*) FROM link_targets", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(rows(&vol), 1);
    let long_backing = entries(&vol.backing)
        .into_iter()
        .find(|p| {
            fs::read_link(p)
                .map(|t| t.to_string_lossy().starts_with("kmsfs.longlink."))
                .unwrap_or(false)
        })
        .expect("the long symlink's backing entry");
    fs::remove_file(long_backing).unwrap();

    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 10, "{report}");
    assert_eq!(kinds(&report), ["orphan_link_target"]);
    let (code, report) = fsck(&vol, &["--repair"]);
    assert_eq!(code, 11, "{report}");
    assert_eq!(rows(&vol), 0, "the orphan row is erased");
    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 0, "{report}");
    let m = vol.mount();
    assert_eq!(fs::read_link(vol.path("short-link")).unwrap().to_str(), Some("short"));
    m.unmount();
}

#[test]
fn a_damaged_file_id_is_restored_from_the_key_that_opens_its_blocks() {
    let vol = TestVolume::init();
    let data = Rng::new(77).bytes(10_000);
    let m = vol.mount();
    let ((), backing) = new_entry(&vol, &vol.backing, || fs::write(vol.path("kept"), &data).unwrap());
    m.unmount();
    flip_bit(&backing, 5); // inside the file id
    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 10);
    assert_eq!(kinds(&report), ["damaged_header", "orphan_key"], "{report}");
    let (code, report) = fsck(&vol, &["--repair"]);
    assert_eq!(code, 11, "{report}");
    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 0, "{report}");
    let _m = vol.mount();
    assert_eq!(
        fs::read(vol.path("kept")).unwrap(),
        data,
        "not quarantined: repaired in place"
    );
}

/// A file the system will not let fsck read (here: mode 000, fsck run by
/// its owner, not root) is not damage: it is reported and left alone, and
/// since any key no file was seen to use may be its, `--repair` erases none.
#[test]
fn a_file_fsck_may_not_read_is_left_alone_and_its_key_kept() {
    use std::os::unix::fs::PermissionsExt;
    let vol = TestVolume::init();
    let m = vol.mount();
    let data = Rng::new(5).bytes(9000);
    fs::write(vol.path("private"), &data).unwrap();
    m.unmount();
    let [backing] = entries(&vol.backing).try_into().unwrap();
    // Root reads whatever the mode: the volume then goes to a normal user,
    // who runs fsck (the suite also runs as one).
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        let chown = std::process::Command::new("chown")
            .args(["-R", "1000:1000", path_str(vol.dir.path())])
            .status()
            .unwrap();
        assert!(chown.success());
    }
    fs::set_permissions(&backing, fs::Permissions::from_mode(0o000)).unwrap();
    let args = ["fsck", "--json", "--repair", path_str(&vol.backing)];
    let out = if root {
        std::process::Command::new("setpriv")
            .args(["--reuid=1000", "--regid=1000", "--clear-groups"])
            .arg(common::kmsfs_bin())
            .args(args)
            .env("KMSFS_KEYSTORE", &vol.keystore)
            .env("KMSFS_CONFIG", &vol.config)
            .env("KMSFS_PASSPHRASE", common::PASSPHRASE)
            .env("HOME", vol.dir.path())
            .output()
            .unwrap()
    } else {
        vol.run(&args)
    };
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", common::stderr(&out)));
    assert_eq!(out.status.code(), Some(12), "some problems remain: {report}");
    assert_eq!(kinds(&report), ["inaccessible", "orphan_key"], "{report}");
    assert!(
        report.to_string().contains("kept: 1 entry could not be checked"),
        "{report}"
    );
    fs::set_permissions(&backing, fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(fsck(&vol, &[]).0, 0, "nothing was lost");
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("private")).unwrap(), data);
    m.unmount();
}

/// A repair never moves an entry over one `lost+found` already holds: it
/// takes the next free name.
#[test]
fn repair_never_replaces_what_lost_found_holds() {
    use std::os::unix::fs::MetadataExt;
    let vol = TestVolume::init();
    let (_, victim) = new_entry(&vol, &vol.backing, || {
        let m = vol.mount();
        fs::write(vol.path("victim"), b"victim").unwrap();
        m.unmount();
    });
    let ino = fs::metadata(&victim).unwrap().ino();
    // A name of the right shape that decrypts to nothing: the entry is unnamed.
    fs::rename(&victim, vol.backing.join("A".repeat(43))).unwrap();
    let m = vol.mount();
    fs::create_dir(vol.path("lost+found")).unwrap();
    let planted = format!("lost+found/unnamed-ino{ino}");
    fs::write(vol.path(&planted), b"precious").unwrap();
    m.unmount();
    let (code, report) = fsck(&vol, &["--repair"]);
    assert_eq!(code, 11, "{report}");
    assert!(report.to_string().contains(&format!("unnamed-ino{ino}.1")), "{report}");
    let m = vol.mount();
    assert_eq!(fs::read(vol.path(&planted)).unwrap(), b"precious");
    assert_eq!(fs::read(vol.path(&format!("{planted}.1"))).unwrap(), b"victim");
    m.unmount();
}

/// Copies that borrow what another entry's key or IV seals: a directory
/// IV copied from another directory or from a file's id (attributes are
/// sealed under either), a backing symlink copied with its long target
/// (removing one erases the target of both), a short name given a long
/// form (listed twice). `fsck` names each.
#[test]
fn copied_ivs_and_long_links_are_reported() {
    use std::os::unix::fs::PermissionsExt;
    let vol = TestVolume::init();
    let m = vol.mount();
    for d in ["d1", "d2", "d3"] {
        fs::create_dir(vol.path(d)).unwrap();
    }
    fs::write(vol.path("f"), b"file").unwrap();
    fs::write(vol.path("g"), b"another").unwrap();
    std::os::unix::fs::symlink("t".repeat(3500), vol.path("long")).unwrap();
    std::os::unix::fs::symlink("short", vol.path("s")).unwrap();
    m.unmount();
    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 0, "{report}");

    let backing = entries(&vol.backing);
    let of = |pick: fn(&fs::Metadata) -> bool| -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = backing
            .iter()
            .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| pick(&m)))
            .cloned()
            .collect();
        found.sort();
        found
    };
    let dirs = of(|m| m.is_dir());
    let [file, other] = of(|m| m.is_file()).try_into().unwrap();
    let links = of(|m| m.file_type().is_symlink());
    let long = links
        .iter()
        .find(|l| {
            fs::read_link(l)
                .unwrap()
                .to_string_lossy()
                .starts_with("kmsfs.longlink.")
        })
        .unwrap();
    let short = links.iter().find(|l| *l != long).unwrap();
    let set_iv = |dir: &Path, iv: &[u8]| {
        let path = dir.join(".kmsfs.diriv");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, iv).unwrap();
    };
    set_iv(&dirs[1], &fs::read(dirs[0].join(".kmsfs.diriv")).unwrap());
    set_iv(&dirs[2], &fs::read(&file).unwrap()[2..18]);
    // The short symlink's name now holds a copy of the long one.
    fs::remove_file(short).unwrap();
    std::os::unix::fs::symlink(fs::read_link(long).unwrap(), short).unwrap();
    // The other file under the long form of the first one's name.
    use base64::Engine;
    use sha2::Digest;
    let short_name = file.file_name().unwrap().to_str().unwrap();
    let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(short_name));
    let alias = vol.backing.join(format!("kmsfs.longname.{hash}"));
    fs::rename(&other, &alias).unwrap();
    fs::write(alias.with_file_name(format!("kmsfs.longname.{hash}.name")), short_name).unwrap();

    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 10, "{report}");
    let found = kinds(&report);
    for kind in [
        "duplicate_dir_iv",
        "dir_iv_is_file_id",
        "duplicate_long_link",
        "non_canonical_name",
    ] {
        assert!(found.contains(&kind.to_string()), "{kind}: {report}");
    }
}
