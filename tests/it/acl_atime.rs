//! POSIX ACLs (set with the real setfacl, enforced by the kernel, stored
//! sealed, inherited, in step with chmod) and access times (moved by the
//! user's reads as the mount says, never by the daemon's own).

use crate::common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use crate::common::{TestVolume, path_str, xattr_list};

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `script` succeeds run as `uid` (see `common::run_as`).
fn as_user(uid: u32, script: &str, path: &Path) -> bool {
    common::run_as(uid, script, path).status.success()
}

fn getfacl(p: &Path) -> String {
    ok("getfacl", &["--omit-header", "--numeric", path_str(p)])
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn acls_are_enforced_inherited_kept_in_step_with_chmod_and_stored_sealed() {
    let vol = TestVolume::init();
    let m = vol.mount_shared("allow_other");

    let p = vol.path("secret");
    fs::write(&p, b"for 1000 only").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    let read = r#"cat "$1" >/dev/null"#;
    assert!(!as_user(1000, read, &p), "mode 0600 keeps uid 1000 out");

    ok("setfacl", &["-m", "u:1000:r", path_str(&p)]);
    let acl = getfacl(&p);
    assert!(acl.contains("user:1000:r--") && acl.contains("mask::r--"), "{acl}");
    assert_eq!(mode(&p), 0o640, "the group bits show the mask");
    assert!(as_user(1000, read, &p), "the named user reads");
    assert!(!as_user(1001, read, &p), "no one else does");
    assert!(xattr_list(&p).unwrap().contains(&b"system.posix_acl_access".to_vec()));

    // chmod moves the mask: the named entry stays but grants nothing.
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    let acl = getfacl(&p);
    assert!(acl.contains("user:1000:r--\t#effective:---"), "{acl}");
    assert!(!as_user(1000, read, &p), "chmod 0600 shuts the named user out");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    assert!(as_user(1000, read, &p));

    // A default ACL is inherited: files get it as their access ACL masked
    // by the creation mode (no umask), directories as both.
    let shared = vol.path("shared");
    fs::create_dir(&shared).unwrap();
    ok(
        "setfacl",
        &["-m", "u:1000:rwx", "-d", "-m", "u:1000:rwx", path_str(&shared)],
    );
    fs::write(shared.join("new"), b"made by root").unwrap();
    let acl = getfacl(&shared.join("new"));
    assert!(acl.contains("user:1000:rwx\t#effective:rw-"), "{acl}");
    assert_eq!(
        mode(&shared.join("new")),
        0o664,
        "0666 masked by the default ACL, not by the umask"
    );
    assert!(as_user(1000, r#"printf more >> "$1""#, &shared.join("new")));
    fs::create_dir(shared.join("sub")).unwrap();
    let sub_default = ok(
        "getfacl",
        &["--omit-header", "--numeric", "-d", path_str(&shared.join("sub"))],
    );
    assert!(sub_default.contains("user:1000:rwx"), "{sub_default}");
    assert!(as_user(1000, r#"printf x > "$1/sub/by-1000""#, &shared));

    // A fifo keeps no ACL: its owning group gets what both its entry and
    // the mask allow (never the mask alone), and plain ACLs set on it are
    // its mode bits (as `cp -a` sets them).
    ok("setfacl", &["-d", "-m", "u:1001:rw,g::r,o::-", path_str(&shared)]);
    ok("mkfifo", &[path_str(&shared.join("fifo"))]);
    assert_eq!(mode(&shared.join("fifo")), 0o640);
    ok("setfacl", &["-m", "g::rw", path_str(&shared.join("fifo"))]);
    assert_eq!(mode(&shared.join("fifo")), 0o660);
    assert!(
        !run("setfacl", &["-m", "u:1001:rw", path_str(&shared.join("fifo"))])
            .status
            .success()
    );
    // Removing an ACL there is none of succeeds, as on ext4.
    common::xattr_remove(&shared.join("fifo"), "system.posix_acl_access").unwrap();
    common::xattr_remove(&vol.path("secret"), "system.posix_acl_default").unwrap();

    // setfacl -b leaves the mode bits alone and nothing stored.
    ok("setfacl", &["-b", path_str(&shared.join("new"))]);
    assert!(!getfacl(&shared.join("new")).contains("1000"));
    assert!(xattr_list(&shared.join("new")).unwrap().is_empty());

    // What the backing directory holds: sealed values under sealed names.
    let backing_xattrs: Vec<Vec<u8>> = walk(&vol.backing)
        .iter()
        .flat_map(|f| xattr_list(f).unwrap_or_default())
        .collect();
    assert!(!backing_xattrs.is_empty());
    for name in &backing_xattrs {
        assert!(name.starts_with(b"user.kmsfs."), "{}", String::from_utf8_lossy(name));
        assert!(!String::from_utf8_lossy(name).contains("acl"));
    }
    m.unmount();

    let (code, report) = common::fsck(&vol, &[]);
    assert_eq!(code, 0, "a volume with ACLs is clean: {report}");

    // Kept across mounts, and across re-encryption under a new data key.
    let m = vol.mount_with(&["-o", "allow_other"]);
    assert!(getfacl(&p).contains("user:1000:r--"));
    let out = vol.run(&["rekey", path_str(&p)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    m.unmount();
    let m = vol.mount_with(&["-o", "allow_other"]);
    assert!(getfacl(&p).contains("user:1000:r--"), "rekey kept the ACL");
    assert!(as_user(1000, read, &p));
    m.unmount();
    // `noacl` turns them off (setfacl: not supported).
    let m = vol.mount_with(&["-o", "allow_other,noacl"]);
    let refused = run("setfacl", &["-m", "u:1001:r", path_str(&p)]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not supported"));
    // A chmod where ACLs are not enforced still reaches the stored ACL: a
    // later mount that enforces it must not grant what the mode took away.
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    m.unmount();
    let m = vol.mount_with(&["-o", "allow_other"]);
    assert!(getfacl(&p).contains("mask::---"), "{}", getfacl(&p));
    assert!(!as_user(1000, read, &p), "the chmod under noacl holds");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    m.unmount();

    // A sealed ACL edited in the backing directory reads as EIO.
    for f in walk(&vol.backing) {
        for name in xattr_list(&f).unwrap_or_default() {
            let name = String::from_utf8(name).unwrap();
            let mut value = common::xattr_get(&f, name.as_bytes()).unwrap();
            value[20] ^= 1;
            common::xattr_set(&f, &name, &value, 0).unwrap();
        }
    }
    let (code, report) = common::fsck(&vol, &[]);
    assert_eq!(code, 10, "{report}");
    assert!(
        report
            .to_string()
            .contains("system.posix_acl_access does not authenticate"),
        "{report}"
    );
    let m = vol.mount_with(&["-o", "allow_other"]);
    let damaged = run("getfacl", &[path_str(&p)]);
    assert!(!damaged.status.success());
    assert!(
        String::from_utf8_lossy(&damaged.stderr).contains("Input/output error"),
        "{}",
        String::from_utf8_lossy(&damaged.stderr)
    );
    m.unmount();
}

/// A directory made in a set-group-ID directory takes its group and is
/// set-group-ID too, so the group carries down the tree (as on ext4), with
/// and without a default ACL.
#[test]
fn new_directories_inherit_set_group_id() {
    let vol = TestVolume::init();
    let m = vol.mount_shared("allow_other");
    let top = vol.path("shared");
    fs::create_dir(&top).unwrap();
    std::os::unix::fs::chown(&top, None, Some(2002)).unwrap();
    fs::set_permissions(&top, fs::Permissions::from_mode(0o2775)).unwrap();
    fs::create_dir(top.join("sub")).unwrap();
    fs::create_dir(top.join("sub/deeper")).unwrap();
    fs::write(top.join("sub/deeper/f"), b"x").unwrap();
    for p in [top.join("sub"), top.join("sub/deeper")] {
        assert_eq!(mode(&p) & 0o2000, 0o2000, "{p:?}");
        assert_eq!(fs::metadata(&p).unwrap().gid(), 2002, "{p:?}");
    }
    assert_eq!(fs::metadata(top.join("sub/deeper/f")).unwrap().gid(), 2002);
    ok("setfacl", &["-d", "-m", "u:1000:rwx", path_str(&top)]);
    fs::create_dir(top.join("with-acl")).unwrap();
    assert_eq!(mode(&top.join("with-acl")) & 0o2000, 0o2000);

    // setfacl by an owner outside the file's group clears set-group-ID (as
    // the kernel does on ext4); root keeps it.
    let f = vol.path("setgid-file");
    fs::write(&f, b"x").unwrap();
    std::os::unix::fs::chown(&f, Some(1000), Some(2002)).unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o2770)).unwrap();
    ok("setfacl", &["-m", "u:1001:r", path_str(&f)]);
    assert_eq!(mode(&f) & 0o2000, 0o2000, "root keeps it");
    assert!(as_user(1000, r#"setfacl -m u:1002:r "$1""#, &f));
    assert_eq!(mode(&f) & 0o2000, 0, "an owner outside group 2002 clears it");
    m.unmount();
}

/// Without `allow_other` or `default_permissions` the kernel checks no
/// permissions, so ACLs are off unless `-o acl` (which turns the checks on).
#[test]
fn acl_option_on_a_private_mount() {
    let vol = TestVolume::init();
    let m = vol.mount();
    fs::write(vol.path("f"), b"x").unwrap();
    assert!(
        !run("setfacl", &["-m", "u:1000:r", path_str(&vol.path("f"))])
            .status
            .success()
    );
    m.unmount();
    let m = vol.mount_with(&["-o", "acl"]);
    ok("setfacl", &["-m", "u:1000:r", path_str(&vol.path("f"))]);
    assert!(getfacl(&vol.path("f")).contains("user:1000:r--"));
    m.unmount();
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            out.push(path.clone());
            out.extend(walk(&path));
        } else if meta.is_file() {
            out.push(path);
        }
    }
    out
}

const Y2000: i64 = 946_684_800;

fn append(p: &Path, bytes: &[u8]) {
    fs::OpenOptions::new()
        .append(true)
        .open(p)
        .and_then(|mut f| std::io::Write::write_all(&mut f, bytes))
        .unwrap();
}

fn set_atime(p: &Path, secs: i64) {
    let c = std::ffi::CString::new(path_str(p)).unwrap();
    let times = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    ];
    // SAFETY: a valid C path and two timespecs.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) },
        0
    );
}

/// The daemon's own reads (headers, directory IVs, the read half of a
/// partial-block write) never move an access time; the user's reads do, as the backing filesystem's relatime
/// says (the atimes here are years old, so it always moves them), unless
/// the mount says `noatime`. Each step remounts, so that the attributes
/// come from the backing inode and no page cache answers a read.
#[test]
fn reads_move_access_times_as_the_mount_says_and_the_daemons_own_reads_never_do() {
    for (options, moves) in [(&[][..], true), (&["-o", "noatime"][..], false)] {
        let vol = TestVolume::init();
        let m = vol.mount();
        fs::write(vol.path("f"), b"contents").unwrap();
        fs::create_dir(vol.path("d")).unwrap();
        fs::write(vol.path("d/inner"), b"x").unwrap();
        set_atime(&vol.path("f"), Y2000);
        set_atime(&vol.path("d"), Y2000);
        m.unmount();

        let atimes = |vol: &TestVolume| {
            let m = vol.mount_with(options);
            let t = (
                fs::metadata(vol.path("f")).unwrap().atime(),
                fs::metadata(vol.path("d")).unwrap().atime(),
            );
            m.unmount();
            t
        };
        // Lookups, stat, listings of the parent: the daemon reads headers.
        let m = vol.mount_with(options);
        ok("ls", &["-lR", path_str(&vol.mnt)]);
        m.unmount();
        let m = vol.mount_with(options);
        ok("stat", &[path_str(&vol.path("f")), path_str(&vol.path("d/inner"))]);
        m.unmount();
        // `ls -lR` listed d itself: a user's read of a directory.
        let after_lookups = atimes(&vol);
        assert_eq!(after_lookups.0, Y2000, "{options:?}: lookups moved the file's atime");
        assert_eq!(after_lookups.1 == Y2000, !moves, "{options:?}: listing d");

        // A partial-block write reads the block it changes: the daemon's
        // read. (With the writeback cache the kernel also reads the page it
        // writes into, a READ like any other: that one moves the atime.)
        let m = vol.mount_with(options);
        set_atime(&vol.path("d"), Y2000);
        append(&vol.path("f"), b" and more");
        m.unmount();
        if !moves {
            assert_eq!(atimes(&vol).0, Y2000, "{options:?}: appending moved the atime");
        }

        let m = vol.mount_with(options);
        assert_eq!(fs::read(vol.path("f")).unwrap(), b"contents and more");
        m.unmount();
        let after_read = atimes(&vol);
        assert_eq!(after_read.0 != Y2000, moves, "{options:?}: reading f");
        assert_eq!(after_read.1, Y2000, "{options:?}: reading f listed nothing");
    }
}

/// A new file's own descriptor serves its I/O for the rest of the mount,
/// and the daemon's reads through it move no access time either: here the
/// final block an append reseals (without the writeback cache the append
/// reaches the daemon as it was made, not as a whole page).
#[test]
fn the_daemons_reads_through_a_new_files_descriptor_move_no_access_time() {
    let vol = TestVolume::init();
    let m = vol.mount_with(&["-o", "no_writeback_cache"]);
    fs::File::create(vol.path("g"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"made").and_then(|()| f.sync_all()))
        .unwrap();
    set_atime(&vol.path("g"), Y2000);
    append(&vol.path("g"), b" here");
    m.unmount();
    let m = vol.mount();
    let atime = fs::metadata(vol.path("g")).unwrap().atime();
    assert_eq!(fs::read(vol.path("g")).unwrap(), b"made here");
    m.unmount();
    assert_eq!(atime, Y2000, "the append's read of the final block moved the atime");
}
