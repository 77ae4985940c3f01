//! A volume written by an earlier version of kmsfs (format 1), checked in
//! with its keystore and key file: it must keep mounting, reading back and
//! passing fsck. Made with the local provider, a key file, the files below
//! and one `kmsfs rotate`; no hard links or xattrs, which git does not keep.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::common::{TestVolume, path_str};

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/format1");

fn copy_of_golden() -> (TestVolume, String) {
    let dir = tempfile::Builder::new().prefix("kmsfs-golden-").tempdir().unwrap();
    // -R, not -a: a normal user running the tests cannot keep root's ownership.
    let status = Command::new("cp")
        .args(["-R", GOLDEN, path_str(&dir.path().join("g"))])
        .status()
        .unwrap();
    assert!(status.success());
    let g = dir.path().join("g");
    let vol = TestVolume {
        backing: g.join("volume"),
        mnt: dir.path().join("plain"),
        keystore: g.join("keystore.json"),
        config: dir.path().join("providers.toml"),
        log: dir.path().join("daemon.log"),
        env: Vec::new(),
        dir,
    };
    fs::create_dir(&vol.mnt).unwrap();
    let key_file = path_str(&g.join("golden.key")).to_string();
    (vol, key_file)
}

fn expect_golden_tree(mnt: &Path) {
    assert_eq!(fs::read(mnt.join("hello.txt")).unwrap(), b"hello, kmsfs\n");
    assert_eq!(fs::read(mnt.join("empty")).unwrap(), b"", "never written: no header");
    assert_eq!(fs::read(mnt.join("truncated-empty")).unwrap(), b"", "header only");
    let deep: Vec<u8> = (0..10000u32).map(|i| ((i * 7 + 3) % 251) as u8).collect();
    assert_eq!(fs::read(mnt.join("dir/nested/deep.bin")).unwrap(), deep);
    let mut sparse = vec![0u8; 65536];
    sparse[20000..20006].copy_from_slice(b"middle");
    assert_eq!(
        fs::read(mnt.join("sparse")).unwrap(),
        sparse,
        "ends in a hole (format 1 allows it)"
    );
    assert_eq!(fs::read_link(mnt.join("link")).unwrap(), Path::new("hello.txt"));
    assert_eq!(fs::read(mnt.join("n".repeat(200))).unwrap(), b"long name\n");
    assert_eq!(fs::read(mnt.join("two-blocks")).unwrap(), b"two blocks".repeat(900));
    let mut names: Vec<_> = fs::read_dir(mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected = vec![
        "dir".to_string(),
        "empty".into(),
        "hello.txt".into(),
        "link".into(),
        "n".repeat(200),
        "sparse".into(),
        "truncated-empty".into(),
        "two-blocks".into(),
    ];
    expected.sort();
    assert_eq!(names, expected);
}

#[test]
fn format_1_volume_reads_back_and_checks_clean() {
    let (vol, key_file) = copy_of_golden();
    let status = vol.run(&["--key-file", &key_file, "status", "--json", path_str(&vol.backing)]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["format_version"], 1);
    let fsck = vol.run(&["--key-file", &key_file, "fsck", path_str(&vol.backing)]);
    assert_eq!(
        fsck.status.code(),
        Some(0),
        "fsck: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let m = vol.mount_with(&["--key-file", &key_file]);
    expect_golden_tree(&vol.mnt);
    // It stays writable under its own format's rules.
    fs::write(vol.path("added"), b"written later").unwrap();
    fs::write(vol.path("empty"), b"no longer empty").unwrap();
    m.unmount();
    let m = vol.mount_with(&["--key-file", &key_file]);
    assert_eq!(fs::read(vol.path("added")).unwrap(), b"written later");
    assert_eq!(fs::read(vol.path("empty")).unwrap(), b"no longer empty");
    m.unmount();
}
