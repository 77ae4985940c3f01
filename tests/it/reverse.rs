//! Reverse mode, end to end with the real tools: the encrypted view of a
//! plaintext tree copied with rsync (twice; then once more after one
//! change: exactly one file moves), identical on every mount, backed up
//! with restic; the copies mount in forward mode and read back the tree,
//! fsck passes on them and a flipped byte reads as EIO. Then excludes,
//! refusals, and rotation (new ciphertext everywhere; old copies still open).

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use crate::backups::{assert_same_tree, make_source, run, transferred};
use crate::common::{TestVolume, fsck, json, path_str, stderr};

fn rsync(view: &Path, dest: &Path, extra: &[&str]) -> String {
    run(
        "rsync",
        Command::new("rsync")
            .args(["-aHX", "--delete", "--stats"])
            .args(extra)
            .arg(format!("{}/", view.display()))
            .arg(dest),
    )
}

/// A volume over `dir` (a copy of a view) with the same keys, mounted forward.
fn forward(vol: &TestVolume, dir: &Path) -> TestVolume {
    vol.view_of(dir.to_path_buf())
}

#[test]
fn reverse_view_backs_up_with_rsync_and_restic_and_the_copies_mount_forward() {
    let vol = TestVolume::init_reverse(|plain| {
        make_source(plain);
        // Sparse to its end: a hole is never the last block.
        let tail = fs::File::create(plain.join("a/ends-in-a-hole")).unwrap();
        tail.write_all_at(b"start", 0).unwrap();
        tail.set_len(1 << 20).unwrap();
    });
    let plain = vol.backing.clone();
    let view = vol.mnt.clone();
    let m = vol.mount_with(&["--reverse"]);
    assert!(view.join("kmsfs.db").is_file() && view.join(".kmsfs.diriv").is_file());
    // The top's five directories, the DB and the IV; not .kmsfs-reverse.
    assert_eq!(fs::read_dir(&view).unwrap().count(), 5 + 2);
    // Nothing of the plaintext shows: every name is encrypted.
    let names: Vec<String> = fs::read_dir(&view)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        !names.iter().any(|n| n == "a" || n == "empty" || n.contains("space")),
        "{names:?}"
    );
    let write = fs::OpenOptions::new().write(true).open(view.join("kmsfs.db"));
    assert!(write.is_err(), "the view is read-only");
    let label = crate::common::xattr_get(&view.join("kmsfs.db"), b"security.selinux");
    assert_eq!(
        label.unwrap_err().raw_os_error(),
        Some(libc::EOPNOTSUPP),
        "labels are not kept"
    );

    let dest = vol.dir.path().join("dest");
    let first = rsync(&view, &dest, &[]);
    assert!(transferred(&first) > 10, "{first}");
    let again = rsync(&view, &dest, &[]);
    assert_eq!(transferred(&again), 0, "nothing changed, nothing moves:\n{again}");
    fs::write(plain.join("a/b/c/deep.bin"), b"changed in place").unwrap();
    // The kernel keeps the view's attributes for attr_timeout (1 s) after
    // the run before looked at them.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let changed = rsync(&view, &dest, &[]);
    assert_eq!(transferred(&changed), 1, "exactly the changed file:\n{changed}");

    // Deterministic: another mount shows byte-identical files and targets,
    // with the same inode numbers, sizes and times.
    let before = view_attrs(&view);
    m.unmount();
    let m = vol.mount_with(&["--reverse"]);
    assert_eq!(view_attrs(&view), before);
    let same = Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(&view)
        .arg(&dest)
        .output()
        .unwrap();
    assert!(same.status.success(), "{}", String::from_utf8_lossy(&same.stdout));

    // restic stores the view; its restore is another copy.
    let repo = vol.dir.path().join("restic-repo");
    let restic = |args: &[&str]| crate::backups::restic(vol.dir.path(), &repo, &view, args);
    restic(&["init"]);
    restic(&["backup", "--quiet", "."]);
    restic(&["check", "--read-data"]);
    let restored = vol.dir.path().join("restic-restore");
    restic(&["restore", "latest", "--target", path_str(&restored)]);
    m.unmount();

    for (copy, what) in [(&dest, "rsync copy"), (&restored, "restic restore")] {
        let fwd = forward(&vol, copy);
        let mounted = fwd.mount();
        assert_same_tree(&plain, &fwd.mnt, what);
        assert_eq!(fs::metadata(fwd.path("a/sparse.img")).unwrap().len(), 64 << 20);
        assert_eq!(
            fs::read(fwd.path("a/ends-in-a-hole")).unwrap(),
            fs::read(plain.join("a/ends-in-a-hole")).unwrap()
        );
        mounted.unmount();
        let (code, report) = fsck(&fwd, &[]);
        assert_eq!(code, 0, "{what}: fsck: {report}");
    }

    // A copy that split the hard links holds files with one id, which is
    // what a file copied over another's name looks like: EIO, and fsck says so.
    let split = vol.dir.path().join("split-links");
    run(
        "cp --no-preserve=links",
        Command::new("cp")
            .args(["-a", "--no-preserve=links"])
            .arg(&dest)
            .arg(&split),
    );
    let fwd = forward(&vol, &split);
    let mounted = fwd.mount();
    let read_all: Vec<_> = ["a/plain.txt", "with space/hard link", "a/b/second link"]
        .iter()
        .map(|name| fs::read(fwd.path(name)).map_err(|e| e.raw_os_error()))
        .collect();
    assert!(read_all.contains(&Err(Some(libc::EIO))), "{read_all:?}");
    mounted.unmount();
    let (code, report) = fsck(&fwd, &[]);
    assert_eq!(code, 10, "{report}");
    assert!(
        crate::common::kinds(&report).contains(&"duplicate_file_id".to_string()),
        "{report}"
    );

    // A restored copy is a volume like any: files with derived keys change,
    // new ones get keys of their own, and it all checks.
    let fwd = forward(&vol, &restored);
    let mounted = fwd.mount();
    let mut appended = fs::OpenOptions::new()
        .append(true)
        .open(fwd.path("a/plain.txt"))
        .unwrap();
    std::io::Write::write_all(&mut appended, b" and more").unwrap();
    drop(appended);
    fs::write(fwd.path("a/new file"), b"written after the restore").unwrap();
    mounted.unmount();
    let (code, report) = fsck(&fwd, &[]);
    assert_eq!(code, 0, "fsck after writing into a restored copy: {report}");
    let mounted = fwd.mount();
    let mut expected = fs::read(plain.join("a/plain.txt")).unwrap();
    expected.extend_from_slice(b" and more");
    assert_eq!(fs::read(fwd.path("a/plain.txt")).unwrap(), expected);
    assert_eq!(fs::read(fwd.path("a/new file")).unwrap(), b"written after the restore");
    mounted.unmount();

    // A flipped byte in the copy: that file reads as EIO, the rest reads.
    let (target, _) = largest_file(&dest);
    let file = fs::OpenOptions::new().read(true).write(true).open(&target).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, 40).unwrap();
    file.write_all_at(&[byte[0] ^ 1], 40).unwrap();
    drop(file);
    let fwd = forward(&vol, &dest);
    let mounted = fwd.mount();
    let err = fs::read(fwd.path("a/sparse.img")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(
        fs::read(fwd.path("a/plain.txt")).unwrap(),
        fs::read(plain.join("a/plain.txt")).unwrap()
    );
    mounted.unmount();
}

/// Every entry under `dir` with its inode number, size and mtime, sorted.
fn view_attrs(dir: &Path) -> Vec<(std::path::PathBuf, u64, u64, i64)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        out.push((path.clone(), meta.ino(), meta.len(), meta.mtime()));
        if meta.is_dir() {
            out.extend(view_attrs(&path));
        }
    }
    out.sort();
    out
}

fn largest_file(dir: &Path) -> (std::path::PathBuf, u64) {
    let mut best = (dir.to_path_buf(), 0);
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            let inner = largest_file(&entry.path());
            if inner.1 > best.1 {
                best = inner;
            }
        } else if meta.is_file() && meta.len() > best.1 && entry.file_name() != "kmsfs.db" {
            best = (entry.path(), meta.len());
        }
    }
    best
}

fn fill_small(plain: &Path) {
    for dir in ["sub/cache", "cache", "keep"] {
        fs::create_dir_all(plain.join(dir)).unwrap();
    }
    for file in [
        "keep.txt",
        "skip.tmp",
        "cache/big",
        "sub/deep.tmp",
        "sub/cache/x",
        "keep/cache",
    ] {
        fs::write(plain.join(file), file.as_bytes()).unwrap();
    }
}

#[test]
fn reverse_excludes_refusals_and_rotation() {
    let vol = TestVolume::init_reverse(fill_small);
    let plain = vol.backing.clone();
    let patterns = vol.dir.path().join("excludes");
    fs::write(&patterns, "# directories named cache\ncache/\n").unwrap();

    // Bad input: named, with a usage exit, nothing mounted.
    let bad = vol.run(&[
        "mount",
        "--reverse",
        path_str(&plain),
        path_str(&vol.mnt),
        "--exclude",
        "!keep",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("!keep"), "{}", stderr(&bad));
    let forward_only = vol.run(&["mount", path_str(&plain), path_str(&vol.mnt), "--exclude", "*.tmp"]);
    assert_eq!(forward_only.status.code(), Some(2), "{}", stderr(&forward_only));
    let inside = plain.join("sub");
    let nested = vol.run(&["mount", "--reverse", path_str(&plain), path_str(&inside)]);
    assert_eq!(nested.status.code(), Some(6), "{}", stderr(&nested));
    let other = vol.dir.path().join("not-a-view");
    fs::create_dir(&other).unwrap();
    let none = vol.run(&["mount", "--reverse", path_str(&other), path_str(&vol.mnt)]);
    assert_eq!(none.status.code(), Some(4), "{}", stderr(&none));
    assert!(stderr(&none).contains("init --reverse"), "{}", stderr(&none));

    let options = ["--reverse", "--exclude", "*.tmp", "--exclude-from", path_str(&patterns)];
    let m = vol.mount_with(&options);
    let status = json(&vol.run(&["status", path_str(&plain), "--json"]));
    assert_eq!(status["reverse_view_of"], path_str(&plain), "{status}");
    assert_eq!(status["mounted"], true, "{status}");
    let of_mount_point = json(&vol.run(&["status", path_str(&vol.mnt), "--json"]));
    assert_eq!(of_mount_point["reverse_view_of"], path_str(&plain), "{of_mount_point}");
    let forgot = vol.run(&["fsck", path_str(&plain)]);
    assert_eq!(forgot.status.code(), Some(4), "{}", stderr(&forgot));
    assert!(stderr(&forgot).contains("--reverse"), "{}", stderr(&forgot));
    let busy = vol.run(&["rotate", path_str(&plain)]);
    assert_eq!(
        busy.status.code(),
        Some(6),
        "rotation waits for the view to go: {}",
        stderr(&busy)
    );
    let dest = vol.dir.path().join("dest");
    rsync(&vol.mnt, &dest, &[]);
    m.unmount();
    let copy_as_view = vol.run(&["mount", "--reverse", path_str(&dest), path_str(&vol.mnt)]);
    assert_eq!(copy_as_view.status.code(), Some(2), "{}", stderr(&copy_as_view));
    assert!(
        stderr(&copy_as_view).contains("without --reverse"),
        "{}",
        stderr(&copy_as_view)
    );

    let old_copy = vol.dir.path().join("before-rotation");
    run("cp -a", Command::new("cp").arg("-a").arg(&dest).arg(&old_copy));
    let check = |copy: &Path| {
        let fwd = forward(&vol, copy);
        let mounted = fwd.mount();
        assert_eq!(fs::read(fwd.path("keep.txt")).unwrap(), b"keep.txt");
        assert_eq!(
            fs::read(fwd.path("keep/cache")).unwrap(),
            b"keep/cache",
            "a file named cache stays"
        );
        for gone in ["skip.tmp", "cache", "sub/deep.tmp", "sub/cache"] {
            assert!(!fwd.path(gone).exists(), "{gone} is excluded");
        }
        assert!(fwd.path("sub").is_dir());
        mounted.unmount();
    };
    check(&dest);

    // The same through -o, as fstab gives it: `cache` (a directory) left out.
    let fstab = format!("reverse,exclude_from={}", patterns.display());
    let m = vol.mount_with(&["-o", &fstab]);
    let top = fs::read_dir(&vol.mnt).unwrap().count();
    assert_eq!(top, 4 + 2, "keep.txt, skip.tmp, keep, sub, the DB and the IV");
    m.unmount();
    let bad = vol.run(&["mount", path_str(&plain), path_str(&vol.mnt), "-o", "exclude_from=/x"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));

    let rotated = vol.run(&["rotate", path_str(&plain)]);
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    assert!(String::from_utf8_lossy(&rotated.stdout).contains("copies everything"));
    let m = vol.mount_with(&options);
    let stats = rsync(&vol.mnt, &dest, &["--itemize-changes"]);
    // Every regular file again: keep.txt, keep/cache, kmsfs.db and the three directory IVs.
    assert_eq!(
        transferred(&stats),
        6,
        "a rotation gives the view new ciphertext:\n{stats}"
    );
    m.unmount();
    check(&dest);
    check(&old_copy);
}

/// The view file of the plaintext file of `plain_len` bytes (the only one
/// of that size in `view`'s top directory).
fn view_file_of_size(view: &Path, plain_len: u64) -> std::path::PathBuf {
    let size = 18 + plain_len.div_ceil(4096) * 28 + plain_len;
    fs::read_dir(view)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| fs::metadata(p).unwrap().len() == size)
        .unwrap_or_else(|| panic!("no view file of {size} bytes"))
}

#[test]
fn reverse_files_changing_during_a_copy_read_as_they_were_or_eio() {
    let original: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
    let vol = TestVolume::init_reverse(|plain| {
        fs::create_dir(plain).unwrap();
        fs::write(plain.join("grows"), &original).unwrap();
        fs::write(plain.join("shrinks"), [7u8; 3 * 4096 + 1]).unwrap();
    });
    let plain = vol.backing.clone();
    let m = vol.mount_with(&["--reverse"]);
    let dest = vol.dir.path().join("dest");
    rsync(&vol.mnt, &dest, &[]);

    // Opened, then the plaintext grows: the view reads as it was at open.
    let grows = view_file_of_size(&vol.mnt, original.len() as u64);
    let opened = fs::File::open(&grows).unwrap();
    let mut appender = fs::OpenOptions::new().append(true).open(plain.join("grows")).unwrap();
    std::io::Write::write_all(&mut appender, &[1u8; 5000]).unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut &opened, &mut bytes).unwrap();
    assert_eq!(bytes.len() as u64, 18 + 3 * 4124);
    fs::write(dest.join(grows.file_name().unwrap()), &bytes).unwrap();
    drop(opened);

    // Opened, then the plaintext shrinks: the blocks it lost read as EIO.
    let shrinks = view_file_of_size(&vol.mnt, 3 * 4096 + 1);
    let opened = fs::File::open(&shrinks).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(plain.join("shrinks"))
        .unwrap()
        .set_len(100)
        .unwrap();
    let mut block = vec![0u8; 4124];
    let err = opened.read_exact_at(&mut block, 18 + 2 * 4124).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    drop(opened);

    // A symlink whose target is too long for the view stays listed; its
    // readlink fails, for the backup tool to report.
    std::os::unix::fs::symlink("t/".repeat(1600), plain.join("long link")).unwrap();
    let link = fs::read_dir(&vol.mnt)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| fs::symlink_metadata(p).unwrap().file_type().is_symlink())
        .expect("the long symlink is listed");
    let err = fs::read_link(&link).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG), "{err}");
    m.unmount();

    let fwd = forward(&vol, &dest);
    let mounted = fwd.mount();
    assert_eq!(
        fs::read(fwd.path("grows")).unwrap(),
        original,
        "the file as it was, whole"
    );
    mounted.unmount();
}
