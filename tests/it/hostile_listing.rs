//! Listing a backing directory an attacker filled or edited: foreign names
//! are hidden and an entry that cannot be read is left out, each listing
//! saying so in one log line however many names are affected, and the
//! entry looked up by its name reads as EIO.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::common::TestVolume;

fn backing_entries(backing: &Path) -> BTreeSet<PathBuf> {
    fs::read_dir(backing).unwrap().map(|e| e.unwrap().path()).collect()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

#[test]
fn foreign_and_unreadable_entries_cost_one_log_line_per_listing() {
    let vol = TestVolume::init();
    let mount = vol.mount();
    fs::write(vol.path("kept"), b"kept").unwrap();
    let before = backing_entries(&vol.backing);
    fs::write(vol.path("swapped"), b"").unwrap();
    let swapped: Vec<_> = backing_entries(&vol.backing).difference(&before).cloned().collect();
    assert_eq!(swapped.len(), 1, "{swapped:?}");
    let swapped = swapped[0].clone();
    mount.unmount();

    const FOREIGN: usize = 2_000;
    for i in 0..FOREIGN {
        fs::write(vol.backing.join(format!("foreign-{i}")), b"").unwrap();
    }
    // The empty file's backing name now points outside the volume.
    let outside = vol.dir.path().join("outside");
    fs::write(&outside, b"not kmsfs data").unwrap();
    fs::remove_file(&swapped).unwrap();
    symlink(&outside, &swapped).unwrap();

    let mount = vol.mount();
    for _ in 0..2 {
        assert_eq!(listing(&vol.mnt), ["kept"]);
    }
    let err = fs::symlink_metadata(vol.path("swapped")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(fs::read(vol.path("kept")).unwrap(), b"kept");
    mount.unmount();

    let log = vol.log_text();
    let hidden = lines_with(&log, "names that do not decrypt, hidden");
    assert_eq!(hidden.len(), 2, "one line per listing:\n{}", hidden.join("\n"));
    assert!(
        hidden.iter().all(|l| l.contains(&format!("hidden: {FOREIGN} "))),
        "{hidden:?}"
    );
    let left_out = lines_with(&log, "left out of the listing");
    assert!(!left_out.is_empty(), "the unreadable entry is not mentioned:\n{log}");
    let swapped_name = swapped.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        left_out
            .iter()
            .all(|l| l.contains("listing: 1 ") && l.contains(&swapped_name)),
        "{left_out:?}"
    );
    assert!(
        log.lines().count() < 100,
        "the log grew with the foreign names: {} lines",
        log.lines().count()
    );
}
