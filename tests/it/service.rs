//! Running under systemd: `Type=notify` messages on `$NOTIFY_SOCKET`
//! (READY=1 once the mount serves, STATUS= lines, STOPPING=1 on the way
//! out), checked on a datagram socket the way systemd reads them.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command};
use std::time::Duration;

use crate::common::{TestVolume, is_mounted, path_str};

/// A foreground daemon, unmounted (and reaped) on drop whatever happens.
struct Foreground<'a> {
    vol: &'a TestVolume,
    child: Child,
}

impl Drop for Foreground<'_> {
    fn drop(&mut self) {
        if is_mounted(&self.vol.mnt) {
            let _ = self.vol.run(&["umount", path_str(&self.vol.mnt)]);
        }
        if is_mounted(&self.vol.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.vol.mnt).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Datagrams until one contains `wanted` (each datagram: newline-separated states).
fn receive_until(socket: &UnixDatagram, wanted: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !seen.iter().any(|m: &String| m.lines().any(|l| l == wanted)) {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("waiting for {wanted}: {e}; got {seen:?}"));
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    seen
}

#[test]
fn under_systemd_the_daemon_reports_ready_status_and_stopping() {
    let vol = TestVolume::init();
    let socket_path = vol.dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let child = vol
        .command()
        .env("NOTIFY_SOCKET", &socket_path)
        .args(["mount", "-f", path_str(&vol.backing), path_str(&vol.mnt)])
        .spawn()
        .unwrap();
    let mut daemon = Foreground { vol: &vol, child };

    let ready = receive_until(&socket, "READY=1");
    assert!(is_mounted(&vol.mnt), "READY=1 only once the mount is there");
    let status = ready.last().unwrap();
    assert!(
        status.contains("STATUS=serving") && status.contains(path_str(&vol.mnt)),
        "{status}"
    );
    std::fs::write(vol.path("f"), b"served").unwrap();

    let out = vol.run(&["umount", path_str(&vol.mnt)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stopping = receive_until(&socket, "STOPPING=1");
    assert!(stopping.iter().any(|m| m.contains("STATUS=")), "{stopping:?}");
    assert!(daemon.child.wait().unwrap().success());
}

/// `-o idle=`: unmounted once nothing names a file for that long, never
/// while a file is open (the kernel refuses a non-lazy unmount then); the
/// daemon commits and exits as after `kmsfs umount`.
#[test]
fn idle_mounts_unmount_once_unused_and_never_while_a_file_is_open() {
    let vol = TestVolume::init();
    let m = vol.mount_with(&["-o", "idle=2s"]);
    let mut held = std::fs::File::create(vol.path("held")).unwrap();
    std::io::Write::write_all(&mut held, b"kept open").unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert!(is_mounted(&vol.mnt), "a file is open: the mount stays");
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while is_mounted(&vol.mnt) {
        assert!(std::time::Instant::now() < deadline, "never unmounted once idle");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(m);
    // The daemon commits its keys and exits, releasing the volume lock.
    loop {
        let status = vol.run(&["status", "--json", path_str(&vol.backing)]);
        let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        if json["mounted"] == false {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the daemon never exited: {json}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let again = vol.mount();
    assert_eq!(std::fs::read(vol.path("held")).unwrap(), b"kept open");
    again.unmount();
}
