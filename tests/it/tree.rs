//! A generated tree copied into the mount, compared byte for byte, then
//! compared again after an unmount and a remount.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::common::{Rng, TestVolume, all_backing_bytes};

/// Relative path -> content (None for directories).
fn generate_tree(seed: u64) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut rng = Rng::new(seed);
    let mut tree = BTreeMap::new();
    let mut dirs = vec![PathBuf::new()];
    let special = [
        "with space.txt",
        "ünïcødé-ファイル.bin",
        "dash-and_underscore",
        ".hidden",
    ];
    let long_name: String = "L".repeat(255);
    for i in 0..40 {
        let parent = dirs[rng.below(dirs.len() as u64) as usize].clone();
        let dir = parent.join(format!("dir {i} ✓"));
        tree.insert(dir.clone(), None);
        dirs.push(dir);
    }
    let deep: PathBuf = (0..12).map(|i| format!("d{i}")).collect();
    for depth in 1..=deep.components().count() {
        tree.insert(deep.iter().take(depth).collect(), None);
    }
    dirs.push(deep);
    for i in 0..300 {
        let parent = dirs[rng.below(dirs.len() as u64) as usize].clone();
        let name = match i {
            0..=3 => special.get(i).map(|s| s.to_string()).unwrap_or_default(),
            4 => long_name.clone(),
            5 => format!("{}é", "m".repeat(253)), // 255 bytes, multibyte at the end
            _ => format!("file-{i}-{}", rng.below(1_000_000)),
        };
        let size = match rng.below(10) {
            0 => 0,
            1..=5 => rng.below(5000) as usize,
            6..=7 => rng.below(70_000) as usize,
            8 => 4096 * (1 + rng.below(8) as usize),
            _ => rng.below(3 << 20) as usize,
        };
        tree.insert(parent.join(name), Some(rng.bytes(size)));
    }
    tree
}

fn write_tree(root: &Path, tree: &BTreeMap<PathBuf, Option<Vec<u8>>>) {
    for (rel, content) in tree {
        let path = root.join(rel);
        match content {
            None => std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {rel:?}: {e}")),
            Some(data) => {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, data).unwrap_or_else(|e| panic!("write {rel:?}: {e}"));
            }
        }
    }
}

fn read_tree(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in std::fs::read_dir(root.join(&rel)).unwrap() {
            let entry = entry.unwrap();
            let child = rel.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                out.insert(child.clone(), None);
                stack.push(child);
            } else {
                out.insert(child.clone(), Some(std::fs::read(entry.path()).unwrap()));
            }
        }
    }
    out
}

fn assert_same(expected: &BTreeMap<PathBuf, Option<Vec<u8>>>, got: &BTreeMap<PathBuf, Option<Vec<u8>>>) {
    assert_eq!(expected.len(), got.len(), "entry count");
    for (rel, content) in expected {
        let other = got.get(rel).unwrap_or_else(|| panic!("missing {rel:?}"));
        assert!(content == other, "content of {rel:?} differs");
    }
}

#[test]
fn generated_tree_survives_copy_unmount_and_remount() {
    // A small descriptor cache: most lookups reopen inodes from their handles.
    let vol = TestVolume::init_with(
        &[("KMSFS_FD_CACHE", "16")],
        &["--kdf-memory-mib", "19", "--kdf-iterations", "2"],
    );
    let tree = generate_tree(42);
    let mount = vol.mount();
    write_tree(&vol.mnt, &tree);
    assert_same(&tree, &read_tree(&vol.mnt));
    mount.unmount();

    // Nothing in the backing directory carries a plaintext name.
    for (path, _) in all_backing_bytes(&vol.backing) {
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(
            !name.contains("file-") && !name.contains("dir ") && !name.contains("with space"),
            "plaintext name {name}"
        );
    }

    let mount = vol.mount();
    assert_same(&tree, &read_tree(&vol.mnt));
    // Removing everything leaves only kmsfs's own files behind.
    for entry in std::fs::read_dir(&vol.mnt).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
    assert_eq!(std::fs::read_dir(&vol.mnt).unwrap().count(), 0);
    mount.unmount();
    let mut left: Vec<String> = std::fs::read_dir(&vol.backing)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert!(
        left.iter().all(|n| n.starts_with("kmsfs.") || n == ".kmsfs.diriv"),
        "left behind: {left:?}"
    );
}
