//! Backups into a mounted volume with the tools people use, run for real:
//! rsync (twice: the second run transfers nothing), restic (init, backup,
//! check --read-data, restore), borg (init, create, check --verify-data,
//! extract) and tar, each compared byte for byte with the source; then the
//! backing directory copied elsewhere and mounted there reads the same.
//! The source has hard links, symlinks, xattrs, a sparse file and odd names.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use crate::common::{Rng, TestVolume, path_str, xattr_get, xattr_set};

pub fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The tree a backup must carry whole.
pub fn make_source(root: &Path) {
    let mut rng = Rng::new(18);
    for dir in ["a/b/c", "with space", "ünïcødé ✓", "-leading-dash", "empty"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    let names = [
        "a/plain.txt".to_string(),
        "a/b/c/deep.bin".to_string(),
        "with space/file with spaces".to_string(),
        "ünïcødé ✓/ファイル.dat".to_string(),
        "-leading-dash/-f".to_string(),
        "a/new\nline".to_string(),
        format!("a/{}", "L".repeat(255)),
        format!("a/b/{}é", "m".repeat(253)),
    ];
    for (i, name) in names.iter().enumerate() {
        let size = [0, 1, 4095, 4096, 4097, 70_000, 300_000, 1 << 20][i % 8];
        fs::write(root.join(name), rng.bytes(size)).unwrap();
    }
    fs::hard_link(root.join("a/plain.txt"), root.join("with space/hard link")).unwrap();
    fs::hard_link(root.join("a/plain.txt"), root.join("a/b/second link")).unwrap();
    std::os::unix::fs::symlink("../a/plain.txt", root.join("with space/relative link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("a/dangling")).unwrap();
    xattr_set(&root.join("a/plain.txt"), "user.backup", b"keep me", 0).unwrap();
    xattr_set(&root.join("a/b"), "user.dir", b"on a directory", 0).unwrap();
    // Sparse: 64 MiB with data at the start, the middle and the end.
    let sparse = fs::File::create(root.join("a/sparse.img")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    for at in [0u64, 32 << 20, (64 << 20) - 5] {
        std::os::unix::fs::FileExt::write_all_at(&sparse, b"hello", at).unwrap();
    }
}

/// Fails unless `copy` holds the same tree as `source`: contents, symlink
/// targets, modes, xattrs, and hard links as hard links (a reverse view's
/// own directory in the source is not part of the tree).
pub fn assert_same_tree(source: &Path, copy: &Path, what: &str) {
    let out = Command::new("diff")
        .args(["-r", "--no-dereference", "--exclude=.kmsfs-reverse"])
        .arg(source)
        .arg(copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: diff -r:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let src = fs::symlink_metadata(source.join("a/plain.txt")).unwrap();
    let dst = fs::symlink_metadata(copy.join("a/plain.txt")).unwrap();
    assert_eq!(src.mode(), dst.mode(), "{what}: mode");
    assert_eq!(src.mtime(), dst.mtime(), "{what}: mtime");
    let linked = fs::symlink_metadata(copy.join("with space/hard link")).unwrap();
    assert_eq!(linked.ino(), dst.ino(), "{what}: hard links stay hard links");
    assert_eq!(dst.nlink(), 3, "{what}: link count");
    assert_eq!(
        fs::read_link(copy.join("with space/relative link")).unwrap(),
        Path::new("../a/plain.txt"),
        "{what}"
    );
    assert_eq!(
        xattr_get(&copy.join("a/plain.txt"), b"user.backup").unwrap(),
        b"keep me",
        "{what}"
    );
    assert_eq!(
        xattr_get(&copy.join("a/b"), b"user.dir").unwrap(),
        b"on a directory",
        "{what}"
    );
}

/// Runs restic on `repo` in `cwd`, its cache in `scratch`; it must succeed.
pub fn restic(scratch: &Path, repo: &Path, cwd: &Path, args: &[&str]) -> String {
    run(
        &format!("restic {args:?}"),
        Command::new("restic")
            .current_dir(cwd)
            .env("RESTIC_PASSWORD", "restic test password")
            .env("RESTIC_CACHE_DIR", scratch.join("restic-cache"))
            .arg("--repo")
            .arg(repo)
            .args(args),
    )
}

pub fn transferred(stats: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.strip_prefix("Number of regular files transferred: "))
        .unwrap_or_else(|| panic!("no transfer count in {stats}"))
        .replace(',', "")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn rsync_twice_and_tar_into_the_mount_then_the_backing_copy_mounts_elsewhere() {
    let vol = TestVolume::init();
    let source = vol.dir.path().join("source");
    make_source(&source);
    let m = vol.mount();
    let dest = vol.path("rsync");
    let rsync = |extra: &[&str]| {
        run(
            "rsync",
            Command::new("rsync")
                .args(["-aHX", "--delete", "--stats"])
                .args(extra)
                .arg(format!("{}/", source.display()))
                .arg(&dest),
        )
    };
    let first = rsync(&[]);
    assert!(transferred(&first) > 0, "{first}");
    assert_same_tree(&source, &dest, "rsync");
    let sparse = fs::metadata(dest.join("a/sparse.img")).unwrap();
    assert_eq!(sparse.len(), 64 << 20);
    let second = rsync(&["--itemize-changes"]);
    assert_eq!(transferred(&second), 0, "the second run transfers nothing:\n{second}");
    let changes: Vec<&str> = second
        .lines()
        .filter(|l| l.starts_with('>') || l.starts_with('c'))
        .collect();
    assert!(changes.is_empty(), "nothing itemized as changed: {changes:?}");
    // A change in the source: exactly that file moves.
    fs::write(source.join("a/b/c/deep.bin"), b"changed").unwrap();
    assert_eq!(transferred(&rsync(&[])), 1);
    assert_same_tree(&source, &dest, "rsync after a change");

    let tar_dest = vol.path("tar");
    fs::create_dir(&tar_dest).unwrap();
    run(
        "tar",
        Command::new("sh").arg("-c").arg(format!(
            "tar --xattrs --xattrs-include='user.*' -cSf - -C '{}' . | tar --xattrs --xattrs-include='user.*' -xpf - -C '{}'",
            source.display(),
            tar_dest.display()
        )),
    );
    assert_same_tree(&source, &tar_dest, "tar");
    m.unmount();

    // The backing directory, copied as a backup tool would, mounts elsewhere and reads the same.
    let copy = vol.dir.path().join("backing-copy");
    run("cp -a", Command::new("cp").arg("-a").arg(&vol.backing).arg(&copy));
    let view = vol.view_of(copy);
    let m = view.mount();
    assert_same_tree(&source, &view.path("rsync"), "the copied volume");
    assert_same_tree(&source, &view.path("tar"), "the copied volume (tar)");
    m.unmount();
}

#[test]
fn restic_and_borg_repositories_on_the_mount_verify_and_restore() {
    let vol = TestVolume::init();
    let source = vol.dir.path().join("source");
    make_source(&source);
    let m = vol.mount();

    let repo = vol.path("restic-repo");
    let restic = |args: &[&str]| restic(vol.dir.path(), &repo, vol.dir.path(), args);
    restic(&["init"]);
    restic(&["backup", "--quiet", path_str(&source)]);
    // A second snapshot of a changed tree: deduplication and pack rewrites on the mount.
    fs::write(source.join("a/b/c/deep.bin"), Rng::new(7).bytes(200_000)).unwrap();
    restic(&["backup", "--quiet", path_str(&source)]);
    restic(&["check", "--read-data"]);
    let restored = vol.path("restic-restore");
    restic(&["restore", "latest", "--target", path_str(&restored)]);
    assert_same_tree(
        &source,
        &restored.join(source.strip_prefix("/").unwrap()),
        "restic restore",
    );

    let borg_repo = vol.path("borg-repo");
    let borg = |args: &[&str], cwd: &Path| {
        run(
            &format!("borg {args:?}"),
            Command::new("borg")
                .current_dir(cwd)
                .env("BORG_PASSPHRASE", "borg test password")
                .env("BORG_BASE_DIR", vol.dir.path().join("borg-base"))
                .args(args),
        )
    };
    let here = vol.dir.path();
    borg(&["init", "--encryption=repokey", path_str(&borg_repo)], here);
    borg(&["create", &format!("{}::first", borg_repo.display()), "source"], here);
    borg(&["check", "--verify-data", path_str(&borg_repo)], here);
    let extracted = vol.path("borg-extract");
    fs::create_dir(&extracted).unwrap();
    borg(&["extract", &format!("{}::first", borg_repo.display())], &extracted);
    assert_same_tree(&source, &extracted.join("source"), "borg extract");
    m.unmount();

    // The repositories survive a remount and still verify.
    let m = vol.mount();
    restic(&["check", "--read-data"]);
    borg(&["check", "--verify-data", path_str(&borg_repo)], here);
    m.unmount();
}
