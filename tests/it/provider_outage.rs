//! A key provider that goes away around a rotation of a mounted volume:
//! no file key is lost, whatever the order of events, and a rotation the
//! daemon cannot follow changes nothing.

use std::fs;

use crate::common::peers;
use crate::common::{self, TestVolume, path_str, stderr};

fn vault_volume(bao: &peers::Peer) -> TestVolume {
    let uri = format!("vault-transit:{}/transit/kmsfs", peers::bao_addr(bao, false));
    TestVolume::init_with(
        &[("VAULT_TOKEN", "root"), ("KMSFS_PROVIDER_TIMEOUT", "2")],
        &["--kms", &uri],
    )
}

/// `vol` mounted with a token of its own, a file written, then the token
/// revoked: the daemon can no longer reach the provider.
fn mounted_with_its_token_revoked<'a>(bao: &peers::Peer, vol: &'a TestVolume) -> common::Mount<'a> {
    let token = peers::bao(bao, false, &["token", "create", "-field=token", "-policy=root"]);
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let m = vol.mount_with_env(&[("VAULT_TOKEN", &token)], &[]);
    fs::write(vol.path("before"), b"before").unwrap();
    peers::bao(bao, false, &["token", "revoke", &token]);
    m
}

fn volume_key_states(vol: &TestVolume) -> Vec<(u32, String, bool)> {
    let db = rusqlite::Connection::open(vol.backing.join("kmsfs.db")).unwrap();
    let mut stmt = db
        .prepare("SELECT version, state, wrapped IS NOT NULL FROM volume_keys ORDER BY version")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A file written before a rotation, its key still queued in the daemon
/// under the old version (which the rotation erases once the daemon holds
/// the new one), and one written after the provider went away: the
/// daemon moves the first key to the new version itself, and when its
/// commits fail too (a DB that refuses them) `umount --force` saves both
/// keys under the version the next mount holds. Both files read back.
#[test]
fn keys_queued_across_a_rotation_survive_the_provider_going_away() {
    let bao = peers::openbao(false);
    let vol = vault_volume(&bao);
    let backing = path_str(&vol.backing);
    // Queued keys are committed at fsync and unmount only.
    let mut m = vol.mount_with_env(&[("KMSFS_TEST_FLUSH_INTERVAL_MS", "600000")], &[]);
    fs::write(vol.path("old"), b"written before the rotation").unwrap();
    let out = vol.run(&["rotate", backing]);
    assert!(out.status.success(), "rotate: {}", stderr(&out));
    assert_eq!(
        volume_key_states(&vol),
        vec![(1, "retired".into(), false), (2, "active".into(), true)]
    );
    let db = common::refuse_key_commits(&vol);
    {
        let _hung = bao.pause();
        fs::write(vol.path("new"), b"written with the provider gone").unwrap();
        let out = m.umount_with(&["--force"]);
        assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
        assert!(stderr(&out).contains("kmsfs.pending-keys"), "{}", stderr(&out));
    }
    common::allow_key_commits(db);
    let m = vol.mount();
    assert_eq!(fs::read(vol.path("old")).unwrap(), b"written before the rotation");
    assert_eq!(fs::read(vol.path("new")).unwrap(), b"written with the provider gone");
    m.unmount();
    assert!(!vol.backing.join("kmsfs.pending-keys").exists());
    let (code, report) = common::fsck(&vol, &[]);
    assert_eq!(code, 0, "{report}");
}

/// A daemon that cannot load the new volume key (its token revoked) would
/// read files whose keys moved to it as EIO: the rotation is undone as soon
/// as the daemon says it failed, and the mount keeps reading and writing.
#[test]
fn a_rotation_the_daemon_cannot_follow_is_undone() {
    let bao = peers::openbao(false);
    let vol = vault_volume(&bao);
    let backing = path_str(&vol.backing);
    let mut m = mounted_with_its_token_revoked(&bao, &vol);
    let started = std::time::Instant::now();
    let out = vol
        .command()
        .env(kmsfs::volume::rotate::DAEMON_WAIT_ENV, "60000")
        .args(["rotate", backing])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the rotation was undone")
            && stderr(&out).contains("could not load volume key version 2"),
        "{}",
        stderr(&out)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "stopped waiting when the daemon said it failed"
    );
    assert_eq!(
        volume_key_states(&vol),
        vec![(1, "active".into(), true), (2, "retired".into(), false)]
    );
    fs::write(vol.path("after"), b"after").unwrap();
    assert_eq!(fs::read(vol.path("before")).unwrap(), b"before");
    let out = m.umount_with(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Run again beside a daemon that can follow, it rotates.
    let m = vol.mount();
    let out = vol.run(&["rotate", backing]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(fs::read(vol.path("after")).unwrap(), b"after");
    m.unmount();
    assert_eq!(volume_key_states(&vol).last(), Some(&(3, "active".into(), true)));
}

/// A rotation killed while the daemon could not follow it leaves the daemon
/// BEHIND, which `status` shows until the next `rotate` undoes the
/// rotation; the mount reads and writes throughout.
#[test]
fn a_daemon_left_behind_by_a_killed_rotation_is_shown_until_the_next_rotate_undoes_it() {
    let bao = peers::openbao(false);
    let vol = vault_volume(&bao);
    let backing = path_str(&vol.backing);
    let mut m = mounted_with_its_token_revoked(&bao, &vol);
    let killed = vol
        .command()
        .env(kmsfs::volume::rotate::KILL_AFTER_ENV, "daemon-failed")
        .args(["rotate", backing])
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(killed.status.signal(), Some(libc::SIGKILL), "{}", stderr(&killed));
    let status = vol.run(&["status", backing]);
    assert!(
        common::stdout(&status).contains("BEHIND:         the daemon has not loaded volume key version 2"),
        "{}",
        common::said(&status)
    );
    fs::write(vol.path("meanwhile"), b"meanwhile").unwrap();
    let out = vol.run(&["rotate", backing]);
    assert_eq!(out.status.code(), Some(8), "{}", stderr(&out));
    assert!(stderr(&out).contains("the rotation was undone"), "{}", stderr(&out));
    let status = vol.run(&["status", backing]);
    assert!(!common::stdout(&status).contains("BEHIND"), "{}", common::said(&status));
    assert_eq!(
        volume_key_states(&vol),
        vec![(1, "active".into(), true), (2, "retired".into(), false)]
    );
    assert_eq!(fs::read(vol.path("before")).unwrap(), b"before");
    assert_eq!(fs::read(vol.path("meanwhile")).unwrap(), b"meanwhile");
    let out = m.umount_with(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A daemon that is stopped (SIGSTOP) could not load a new key either:
/// `rotate` refuses at once, naming `kill -CONT`, and begins nothing (no
/// volume-key version is used up), and the daemon, continued, serves as
/// before.
#[test]
fn a_rotation_beside_a_stopped_daemon_begins_nothing() {
    let bao = peers::openbao(false);
    let vol = vault_volume(&bao);
    let backing = path_str(&vol.backing);
    let m = vol.mount();
    fs::write(vol.path("before"), b"before").unwrap();
    let status = common::json(&vol.run(&["status", "--json", backing]));
    let pid = status["daemon_pid"].as_u64().unwrap() as libc::pid_t;
    assert_eq!(status["daemon_volume_key_version"], 1, "{status}");
    let states = volume_key_states(&vol);
    common::wait_until_mount_recorded(&vol);
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let out = vol.run(&["rotate", backing]);
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("kill -CONT {pid}")), "{}", stderr(&out));
    assert_eq!(volume_key_states(&vol), states, "nothing begun");
    fs::write(vol.path("after"), b"after").unwrap();
    assert_eq!(fs::read(vol.path("before")).unwrap(), b"before");
    m.unmount();
    let (code, report) = common::fsck(&vol, &[]);
    assert_eq!(code, 0, "{report}");
}
