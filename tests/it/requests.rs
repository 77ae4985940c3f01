//! The FUSE requests kmsfs gets, counted with the kernel's own trace event
//! where a request saved is the feature.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{TestVolume, path_str};

/// The requests the kernel sends to one mount, from its own trace event
/// (`fuse:fuse_request_send`, filtered to the mount's connection so that
/// other tests' mounts add nothing); the event is switched off on drop.
struct RequestTrace {
    event: PathBuf,
    buffer: PathBuf,
}

impl RequestTrace {
    fn start(mountpoint: &Path) -> RequestTrace {
        use std::os::unix::fs::MetadataExt;
        let tracing = Path::new("/sys/kernel/tracing");
        if !tracing.join("events").exists() {
            let mounted = Command::new("mount")
                .args(["-t", "tracefs", "nodev", path_str(tracing)])
                .status();
            assert!(mounted.unwrap().success(), "mount tracefs");
        }
        let event = tracing.join("events/fuse/fuse_request_send");
        assert!(
            event.exists(),
            "this kernel has no fuse:fuse_request_send trace event (Linux 6.13 or later)"
        );
        let connection = libc::minor(fs::metadata(mountpoint).unwrap().dev());
        fs::write(event.join("filter"), format!("connection == {connection}")).unwrap();
        let on = tracing.join("tracing_on");
        assert_eq!(
            fs::read_to_string(&on).unwrap().trim(),
            "1",
            "kernel tracing is switched off ({})",
            on.display()
        );
        let trace = RequestTrace {
            event,
            buffer: tracing.join("trace"),
        };
        fs::write(&trace.buffer, "").unwrap();
        fs::write(trace.event.join("enable"), "1").unwrap();
        trace
    }

    /// How many requests of type `opcode` (e.g. "RELEASE") were sent so far.
    fn count(&self, opcode: &str) -> usize {
        let marker = format!("(FUSE_{opcode})");
        fs::read_to_string(&self.buffer).unwrap().matches(&marker).count()
    }
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        let _ = fs::write(self.event.join("enable"), "0");
        let _ = fs::write(self.event.join("filter"), "0");
    }
}

#[test]
fn files_made_on_a_fresh_mount_cost_no_release_requests() {
    // The kernel sends a RELEASE at the close of every file made by CREATE
    // until its first OPEN on the mount is refused; kmsfs has it make files
    // with MKNOD instead, which it then opens without asking.
    let vol = TestVolume::init();
    let m = vol.mount();
    let trace = RequestTrace::start(&vol.mnt);
    for i in 0..20 {
        fs::write(vol.path(&format!("f{i}")), b"data").unwrap();
    }
    fs::write(vol.path("f0"), b"again").unwrap(); // an open of an existing file
    std::thread::sleep(Duration::from_millis(500)); // RELEASE is sent in the background
    assert_eq!(trace.count("MKNOD"), 20, "each new file made by one MKNOD");
    assert_eq!(trace.count("CREATE"), 1, "CREATE asked once, then never again");
    assert_eq!(trace.count("RELEASE"), 0, "no RELEASE for any file");
    assert_eq!(fs::read(vol.path("f7")).unwrap(), b"data");
    assert_eq!(fs::read(vol.path("f0")).unwrap(), b"again");
    drop(trace);
    m.unmount();
}
