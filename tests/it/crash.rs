//! kill -9 of the mount daemon, and simulated power cuts, at seeded random
//! moments during heavy writes, creates, renames and mkdirs: after each crash
//! every fsynced file reads back byte for byte, every fsynced directory
//! lists, and the metadata DB passes `PRAGMA integrity_check`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Rng, TestVolume, path_str};

fn is_mounted(path: &Path) -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path_str(path)))
}

fn start_daemon(vol: &TestVolume) -> Child {
    let child = vol
        .command()
        .args(["mount", "-f", path_str(&vol.backing), path_str(&vol.mnt)])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !is_mounted(&vol.mnt) {
        assert!(start.elapsed() < Duration::from_secs(20), "daemon never mounted");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn fsync_dir(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

#[derive(Default, Clone)]
struct Durable {
    files: BTreeMap<String, Vec<u8>>,
    dirs: BTreeSet<String>,
}

/// One worker: creates, writes, renames and mkdirs until the daemon dies.
fn worker(vol: &TestVolume, round: usize, t: usize, durable: &Mutex<Durable>, stop: &AtomicBool) {
    let mut rng = Rng::new((round * 100 + t) as u64);
    let mut mine: Vec<String> = Vec::new();
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let mut step = || -> std::io::Result<()> {
            match rng.below(10) {
                0..=5 => {
                    let name = format!("r{round}t{t}f{i}");
                    let len = rng.below(300_000) as usize + 1;
                    let data = rng.bytes(len);
                    let mut f = File::create(vol.path(&name))?;
                    f.write_all(&data)?;
                    f.sync_all()?;
                    fsync_dir(&vol.mnt)?;
                    durable.lock().unwrap().files.insert(name.clone(), data);
                    mine.push(name);
                }
                6 | 7 => {
                    // Not fsynced: may be lost, must not damage anything else.
                    let len = rng.below(100_000) as usize;
                    fs::write(vol.path(&format!("junk-r{round}t{t}-{i}")), rng.bytes(len))?;
                }
                8 => {
                    let dir = format!("r{round}t{t}d{i}");
                    fs::create_dir(vol.path(&dir))?;
                    fsync_dir(&vol.mnt)?;
                    let inner = format!("{dir}/inner");
                    let data = rng.bytes(5000);
                    let mut f = File::create(vol.path(&inner))?;
                    f.write_all(&data)?;
                    f.sync_all()?;
                    fsync_dir(&vol.path(&dir))?;
                    let mut d = durable.lock().unwrap();
                    d.dirs.insert(dir);
                    d.files.insert(inner, data);
                }
                _ => {
                    if let Some(name) = mine.pop() {
                        // Between the rename and the directory fsync either name may survive.
                        let data = durable.lock().unwrap().files.remove(&name).unwrap_or_default();
                        let moved = format!("{name}.moved");
                        fs::rename(vol.path(&name), vol.path(&moved))?;
                        fsync_dir(&vol.mnt)?;
                        durable.lock().unwrap().files.insert(moved, data);
                    }
                }
            }
            Ok(())
        };
        if step().is_err() {
            return; // the daemon is gone
        }
    }
}

#[test]
fn kill_9_at_random_moments_loses_nothing_that_was_fsynced() {
    let vol = TestVolume::init();
    let durable = Mutex::new(Durable::default());
    let mut rng = Rng::new(2026);
    for round in 0..8 {
        let mut daemon = start_daemon(&vol);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            for t in 0..3 {
                let (vol, durable, stop) = (&vol, &durable, &stop);
                s.spawn(move || worker(vol, round, t, durable, stop));
            }
            std::thread::sleep(Duration::from_millis(150 + rng.below(700)));
            daemon.kill().unwrap(); // SIGKILL
            daemon.wait().unwrap();
            stop.store(true, Ordering::Relaxed);
        });
        // The dead daemon's mount point answers ENOTCONN until detached.
        let _ = Command::new("umount").arg("-l").arg(&vol.mnt).status();
        let d = durable.lock().unwrap().clone();
        check_after_crash(&vol, &d, &format!("round {round}"));
        assert!(
            d.files.len() > round,
            "round {round}: the workload made progress ({} files)",
            d.files.len()
        );
    }
    let d = durable.lock().unwrap().clone();
    fsck_finds_only_interrupted_operations(&vol, &d, true);
}

/// The DB is intact, and a fresh mount reads every fsynced file and lists
/// every fsynced directory of `durable`.
fn check_after_crash(vol: &TestVolume, durable: &Durable, what: &str) {
    let db = rusqlite::Connection::open(vol.backing.join("kmsfs.db")).unwrap();
    let integrity: String = db.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(integrity, "ok", "{what}: the metadata DB is intact");
    drop(db);
    let m = vol.mount();
    for (name, data) in &durable.files {
        let got = fs::read(vol.path(name)).unwrap_or_else(|e| panic!("{what}: fsynced {name}: {e}"));
        assert!(&got == data, "{what}: fsynced {name} differs");
    }
    for dir in &durable.dirs {
        fs::read_dir(vol.path(dir)).unwrap_or_else(|e| panic!("{what}: fsynced dir {dir}: {e}"));
    }
    m.unmount();
}

/// The traces an interrupted operation may leave (DESIGN.md, "Write ordering
/// and crash safety").
const INTERRUPTED_OPERATION_TRACES: &[&str] = &["orphan_key", "leftover_temporary", "missing_key", "orphan_sidecar"];

/// fsck finds at most the traces of interrupted operations, none of them on
/// a fsynced file, and after `--repair` the volume is clean.
///
/// After a kill -9 (`torn_writes`) a block may also be torn: the kernel ends
/// a buffered write early, at a page boundary, when SIGKILL arrives during
/// it. A freeze waits for writes in progress, so the power-cut images have
/// no torn blocks.
fn fsck_finds_only_interrupted_operations(vol: &TestVolume, durable: &Durable, torn_writes: bool) {
    let out = vol.run(&["fsck", "--json", "--repair", path_str(&vol.backing)]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for p in report["problems"].as_array().unwrap() {
        let kind = p["kind"].as_str().unwrap();
        let expected = INTERRUPTED_OPERATION_TRACES.contains(&kind) || (torn_writes && kind == "bad_blocks");
        assert!(expected, "unexpected damage after crashes: {p}");
        let path = p["path"].as_str().unwrap_or("");
        assert!(!durable.files.contains_key(path), "damage to a fsynced file: {p}");
    }
    let out = vol.run(&["fsck", "--json", path_str(&vol.backing)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "clean after repair: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ext4 filesystem in an image file, loop-mounted; unmounted on drop.
struct LoopFs {
    _dir: tempfile::TempDir,
    image: std::path::PathBuf,
    mnt: std::path::PathBuf,
}

impl LoopFs {
    fn create(size_mib: u64) -> Self {
        let dir = tempfile::Builder::new().prefix("kmsfs-disk-").tempdir().unwrap();
        let image = dir.path().join("disk.img");
        File::create(&image).unwrap().set_len(size_mib << 20).unwrap();
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        Self::mount(dir, image)
    }

    /// Mounts a copy of a disk image, as the machine would boot after a power cut.
    fn boot(image: &Path) -> Self {
        let dir = tempfile::Builder::new().prefix("kmsfs-disk-").tempdir().unwrap();
        let copy = dir.path().join("disk.img");
        fs::rename(image, &copy).unwrap();
        Self::mount(dir, copy)
    }

    fn mount(dir: tempfile::TempDir, image: std::path::PathBuf) -> Self {
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        run_ok(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mnt));
        LoopFs { _dir: dir, image, mnt }
    }

    /// The disk as a power cut right after a `syncfs` would leave it: the
    /// filesystem is frozen (which syncs it and holds every later write,
    /// including the daemon's, mid-flight) while the image is copied.
    ///
    /// Freeze, copy and thaw run in one helper shell, started before the
    /// freeze: this process writes through the mount, and while the daemon
    /// is held by the freeze its threads may block in memory management
    /// (dirty pages of the writeback cache), so starting a process from
    /// here to thaw could wait for the thaw itself.
    fn power_cut_image(&self, to: &Path) {
        let script = r#"fsfreeze -f "$1" || exit 1
cp --sparse=always "$2" "$3"; rc=$?
fsfreeze -u "$1" || exit 1
exit $rc"#;
        run_ok(
            Command::new("sh")
                .args(["-c", script, "power-cut"])
                .arg(&self.mnt)
                .arg(&self.image)
                .arg(to),
        );
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

#[test]
fn power_cut_after_syncfs_loses_nothing_that_was_fsynced() {
    let disk = LoopFs::create(1024);
    let vol = TestVolume::init_on(disk.mnt.join("cipher"));
    let snapshots_dir = tempfile::Builder::new().prefix("kmsfs-cuts-").tempdir().unwrap();
    let mut cuts: Vec<(std::path::PathBuf, Durable)> = Vec::new();
    let durable = Mutex::new(Durable::default());
    let mut rng = Rng::new(4242);
    let m = vol.mount();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..3 {
            let (vol, durable, stop) = (&vol, &durable, &stop);
            s.spawn(move || worker(vol, 100, t, durable, stop));
        }
        for cut in 0..4 {
            std::thread::sleep(Duration::from_millis(300 + rng.below(700)));
            // Under load the first fsyncs can take longer than the pause.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while durable.lock().unwrap().files.len() <= cut && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Everything in the model was fsynced before the freeze began.
            // Holding the lock through the freeze keeps a worker from moving
            // a modelled file to its new name before the cut.
            let model = durable.lock().unwrap();
            let before = model.clone();
            let image = snapshots_dir.path().join(format!("cut{cut}.img"));
            disk.power_cut_image(&image);
            drop(model);
            eprintln!("power cut {cut}: {} fsynced files", before.files.len());
            cuts.push((image, before));
        }
        stop.store(true, Ordering::Relaxed);
    });
    m.unmount();
    for (cut, (image, before)) in cuts.iter().enumerate() {
        let rebooted = LoopFs::boot(image);
        let view = vol.view_of(rebooted.mnt.join("cipher"));
        check_after_crash(&view, before, &format!("power cut {cut}"));
        fsck_finds_only_interrupted_operations(&view, before, false);
        assert!(before.files.len() > cut, "power cut {cut}: the workload made progress");
    }
}
