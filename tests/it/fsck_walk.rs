//! What fsck cannot walk into is never taken for absent: a key no file was
//! seen to use may belong to a file there, and `--repair` erases none.

use std::fs;
use std::path::PathBuf;

use crate::common::{TestVolume, fsck, kinds};

/// The one subdirectory of the backing root.
fn backing_subdir(vol: &TestVolume) -> PathBuf {
    let dirs: Vec<PathBuf> = fs::read_dir(&vol.backing)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    let [dir] = dirs.try_into().expect("one subdirectory");
    dir
}

/// Encrypted names are several times longer than short plain ones: a tree
/// the mount serves well can lie beyond PATH_MAX in the backing directory,
/// where path-based calls fail. Such entries are reported as unreached,
/// and the keys of the files in them stay.
#[test]
fn a_tree_beyond_path_max_is_reported_and_its_keys_kept() {
    let vol = TestVolume::init();
    let deep = "cccc/".repeat(120);
    let m = vol.mount();
    fs::create_dir_all(vol.path(&deep)).unwrap();
    fs::write(vol.path(&format!("{deep}deepfile")), b"deep data").unwrap();
    fs::write(vol.path("shallow"), b"shallow data").unwrap();
    m.unmount();

    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 10, "{report}");
    let k = kinds(&report);
    assert!(k.contains(&"unreached".to_string()), "{report}");
    let (code, report) = fsck(&vol, &["--repair"]);
    assert_eq!(code, 12, "an unchecked tree is a problem that remains: {report}");
    assert!(!report.to_string().contains("key row erased"), "{report}");
    let m = vol.mount();
    assert_eq!(fs::read(vol.path(&format!("{deep}deepfile"))).unwrap(), b"deep data");
    assert_eq!(fs::read(vol.path("shallow")).unwrap(), b"shallow data");
    m.unmount();
}

/// A directory under a temporary's name (an interrupted mkdir leaves one
/// holding only its IV) that holds entries is checked like any other and
/// left alone: renamed back, its files read as before.
#[test]
fn a_temporary_directory_with_files_is_checked_and_left_alone() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::create_dir(vol.path("dir")).unwrap();
    fs::write(vol.path("dir/a"), b"first").unwrap();
    fs::write(vol.path("dir/b"), vec![7u8; 9000]).unwrap();
    m.unmount();
    let dir = backing_subdir(&vol);
    let temporary = vol.backing.join("kmsfs.tmp.0123456789abcdef");
    fs::rename(&dir, &temporary).unwrap();

    let (code, report) = fsck(&vol, &["--repair"]);
    assert_eq!(code, 12, "{report}");
    assert_eq!(
        kinds(&report),
        ["leftover_temporary"],
        "its files' keys are in use: {report}"
    );
    assert!(report.to_string().contains("not empty"), "{report}");
    assert!(temporary.is_dir(), "left alone");
    fs::rename(&temporary, &dir).unwrap();
    assert_eq!(fsck(&vol, &[]).0, 0);
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("dir/a")).unwrap(), b"first");
    assert_eq!(fs::read(vol.path("dir/b")).unwrap(), vec![7u8; 9000]);
    m.unmount();
}

/// A symlink under a temporary's name is never followed: whatever it
/// points at (here a directory outside the volume) is neither walked nor
/// moved into lost+found; the link itself is removed.
#[test]
fn a_temporary_name_that_is_a_symlink_is_removed_not_followed() {
    let vol = TestVolume::init();
    let outside = vol.dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("precious"), b"not the volume's").unwrap();
    fs::create_dir(outside.join("sub")).unwrap();
    let link = vol.backing.join("kmsfs.tmp.0123456789abcdef");
    std::os::unix::fs::symlink(&outside, &link).unwrap();

    let (code, report) = fsck(&vol, &["--repair"]);
    assert_eq!(code, 11, "{report}");
    assert_eq!(kinds(&report), ["leftover_temporary"], "{report}");
    assert!(fs::symlink_metadata(&link).is_err(), "the link is removed");
    assert_eq!(fs::read(outside.join("precious")).unwrap(), b"not the volume's");
    assert_eq!(
        fs::read_dir(outside.join("sub")).unwrap().count(),
        0,
        "no IV written outside"
    );
    assert!(!vol.backing.join("lost+found").exists());
}

/// The backing root's regular files, by name, other than kmsfs's own.
fn backing_files(vol: &TestVolume) -> Vec<PathBuf> {
    fs::read_dir(&vol.backing)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with("kmsfs."))
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect()
}

/// Entries under names kmsfs does not write are not checked, but what they
/// may hold is never taken for gone: a file renamed by hand keeps its key
/// (its header names it), a directory under a name beginning like the
/// DB's is unreached, and a file under a temporary's name is checked and
/// moved to lost+found, not deleted.
#[test]
fn files_under_names_kmsfs_does_not_write_keep_their_keys() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::write(vol.path("renamed"), b"renamed by hand").unwrap();
    fs::create_dir(vol.path("dir")).unwrap();
    fs::write(vol.path("dir/inside"), b"in a directory renamed by hand").unwrap();
    m.unmount();
    let [file] = backing_files(&vol).try_into().expect("one file");
    let aside = vol.backing.join("conflict copy.bak");
    fs::rename(&file, &aside).unwrap();
    let dir = backing_subdir(&vol);
    let db_like = vol.backing.join("kmsfs.db.old");
    fs::rename(&dir, &db_like).unwrap();

    let (code, report) = fsck(&vol, &["--repair"]);
    assert_eq!(code, 12, "the renamed directory could not be checked: {report}");
    assert!(!report.to_string().contains("key row erased"), "{report}");
    assert!(
        report.to_string().contains("holds the header of a kmsfs file"),
        "{report}"
    );
    assert!(kinds(&report).contains(&"unreached".to_string()), "{report}");
    fs::rename(&aside, &file).unwrap();
    fs::rename(&db_like, &dir).unwrap();
    assert_eq!(fsck(&vol, &[]).0, 0);

    // A file under a temporary's name: checked, its key used, moved.
    let temporary = vol.backing.join("kmsfs.tmp.0123456789abcdef");
    fs::rename(&file, &temporary).unwrap();
    let (code, report) = fsck(&vol, &["--repair"]);
    assert_eq!(code, 11, "{report}");
    assert_eq!(kinds(&report), ["leftover_temporary"], "{report}");
    assert!(!temporary.exists());
    let m = vol.mount();
    let lost: Vec<_> = fs::read_dir(vol.path("lost+found"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("kmsfs.tmp."))
        .collect();
    let [moved] = lost.try_into().expect("the temporary in lost+found");
    assert_eq!(fs::read(moved).unwrap(), b"renamed by hand");
    assert_eq!(
        fs::read(vol.path("dir/inside")).unwrap(),
        b"in a directory renamed by hand"
    );
    m.unmount();
}

/// A file under a temporary's name whose check finds damage too has both
/// problems repaired by its one move to lost+found, and `--salvage` zeroes
/// its bad block there.
#[test]
fn a_damaged_file_under_a_temporarys_name_is_moved_once_for_both_problems() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::write(vol.path("damaged"), vec![3u8; 10_000]).unwrap();
    m.unmount();
    let [file] = backing_files(&vol).try_into().expect("one file");
    let mut bytes = fs::read(&file).unwrap();
    bytes[5000] ^= 1;
    fs::write(&file, &bytes).unwrap();
    let temporary = vol.backing.join("kmsfs.tmp.0123456789abcdef");
    fs::rename(&file, &temporary).unwrap();

    let (code, report) = fsck(&vol, &["--repair", "--salvage"]);
    assert_eq!(code, 11, "every problem repaired: {report}");
    assert_eq!(kinds(&report), ["bad_blocks", "leftover_temporary"], "{report}");
    assert!(report.to_string().contains("ZEROS"), "salvaged: {report}");
    assert!(!temporary.exists());
    assert_eq!(fsck(&vol, &[]).0, 0);
}

/// The backing directory's own IV replaced by a symlink: fsck reports it
/// (at `.`), and `--repair`, which cannot name lost+found without it, says
/// to restore that file instead of blaming the DB; the symlink's target is
/// never read as an IV or written.
#[test]
fn a_root_iv_that_is_a_symlink_is_named_and_repair_says_to_restore_it() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::write(vol.path("f"), b"data").unwrap();
    m.unmount();
    let iv = vol.backing.join(".kmsfs.diriv");
    let saved = fs::read(&iv).unwrap();
    let outside = vol.dir.path().join("outside");
    fs::write(&outside, b"0123456789abcdef").unwrap();
    fs::remove_file(&iv).unwrap();
    std::os::unix::fs::symlink(&outside, &iv).unwrap();
    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 10, "{report}");
    assert!(
        report["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["kind"] == "missing_dir_iv" && p["backing"] == "."),
        "{report}"
    );
    let out = vol.run(&["fsck", "--repair", vol.backing.to_str().unwrap()]);
    let said = crate::common::stderr(&out);
    assert_eq!(out.status.code(), Some(7), "{said}");
    assert!(
        said.contains(".kmsfs.diriv: the backing directory's own IV is unusable")
            && said.contains("restore this file from a backup")
            && !said.contains("does not belong to this key"),
        "{said}"
    );
    assert_eq!(fs::read(&outside).unwrap(), b"0123456789abcdef");
    fs::remove_file(&iv).unwrap();
    fs::write(&iv, saved).unwrap();
    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 0, "{report}");
}

/// A file cut to nothing has no id: the key no file uses may be its, for
/// an intact copy from a backup. `--repair` moves the file to lost+found
/// and keeps the key (reported with the quarantined files), so the copy put
/// back reads; once the damaged file is gone, a repair erases what no file
/// uses.
#[test]
fn a_key_a_file_without_an_id_may_need_is_kept_until_that_file_is_gone() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::write(vol.path("doc"), b"a document").unwrap();
    m.unmount();
    let [backing] = backing_files(&vol).try_into().unwrap();
    let intact = fs::read(&backing).unwrap();
    fs::write(&backing, b"").unwrap();
    let (code, report) = fsck(&vol, &["--repair"]);
    assert_eq!(code, 11, "{report}");
    assert_eq!(kinds(&report), ["no_header"], "{report}");
    let kept = &report["quarantined"].as_array().unwrap();
    assert!(kept.iter().any(|p| p["kind"] == "orphan_key"), "{report}");
    let (code, report) = fsck(&vol, &[]);
    assert_eq!(code, 0, "the damaged file waits in lost+found, its key kept: {report}");
    // The intact copy put back from a backup reads.
    fs::write(&backing, &intact).unwrap();
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("doc")).unwrap(), b"a document");
    fs::remove_dir_all(vol.path("lost+found")).unwrap();
    m.unmount();
    // With no file without an id left, a key no file uses is erased.
    fs::remove_file(&backing).unwrap();
    let (code, report) = fsck(&vol, &["--repair"]);
    assert_eq!(code, 11, "{report}");
    assert_eq!(kinds(&report), ["orphan_key"], "{report}");
    assert!(report.to_string().contains("key row erased"), "{report}");
}
