//! Shared helpers for the integration tests: a fresh volume in a temporary
//! directory, and a mount guard that always unmounts.

#![allow(dead_code)]

pub mod peers;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const PASSPHRASE: &str = "integration test passphrase";

pub struct TestVolume {
    pub dir: tempfile::TempDir,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub keystore: PathBuf,
    /// The host configuration (KMSFS_CONFIG): never the real /etc/kmsfs.
    pub config: PathBuf,
    pub log: PathBuf,
    /// Extra environment for every kmsfs command (provider credentials…).
    pub env: Vec<(OsString, OsString)>,
}

pub fn kmsfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kmsfs")
}

impl TestVolume {
    /// A new volume with the local provider and a fast (test-only) Argon2id setting.
    pub fn init() -> Self {
        Self::init_with(&[], &["--kdf-memory-mib", "19", "--kdf-iterations", "2"])
    }

    /// A new volume; `env` applies to every later command too.
    pub fn init_with(env: &[(&str, &str)], init_args: &[&str]) -> Self {
        Self::create(env, init_args, None)
    }

    /// A new local-provider volume whose backing directory is `backing`
    /// (on a filesystem of the test's choosing); the rest lives in a tempdir.
    pub fn init_on(backing: PathBuf) -> Self {
        Self::create(&[], &["--kdf-memory-mib", "19", "--kdf-iterations", "2"], Some(backing))
    }

    /// `init_on` with `env` for every later command.
    pub fn init_on_with(env: &[(&str, &str)], backing: PathBuf) -> Self {
        Self::create(env, &["--kdf-memory-mib", "19", "--kdf-iterations", "2"], Some(backing))
    }

    /// A new reverse-view volume of the plaintext directory `backing`
    /// (made in the tempdir and filled by `fill` before `init --reverse`);
    /// `mount_with(&["--reverse"])` mounts its encrypted view.
    pub fn init_reverse(fill: impl FnOnce(&Path)) -> Self {
        let vol = Self::unmade(&[], None);
        fill(&vol.backing);
        vol.run_init(&["--reverse", "--kdf-memory-mib", "19", "--kdf-iterations", "2"]);
        vol
    }

    fn create(env: &[(&str, &str)], init_args: &[&str], backing: Option<PathBuf>) -> Self {
        let vol = Self::unmade(env, backing);
        vol.run_init(init_args);
        vol
    }

    fn run_init(&self, init_args: &[&str]) {
        let mut args = vec!["init", path_str(&self.backing)];
        args.extend_from_slice(init_args);
        let out = self.run(&args);
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn unmade(env: &[(&str, &str)], backing: Option<PathBuf>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("kmsfs-test-")
            .tempdir()
            .expect("tempdir");
        let vol = TestVolume {
            backing: backing.unwrap_or_else(|| dir.path().join("cipher")),
            mnt: dir.path().join("plain"),
            keystore: dir.path().join("keystore.json"),
            config: dir.path().join("providers.toml"),
            log: dir.path().join("daemon.log"),
            env: env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                .collect(),
            dir,
        };
        std::fs::create_dir(&vol.mnt).expect("mkdir mountpoint");
        vol
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(kmsfs_bin());
        cmd.env("KMSFS_KEYSTORE", &self.keystore)
            .env("KMSFS_CONFIG", &self.config)
            .env("KMSFS_PASSPHRASE", PASSPHRASE)
            .env_remove("RUST_LOG");
        // Never reach for the real EC2 metadata service from a test.
        cmd.env("AWS_EC2_METADATA_DISABLED", "true");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run kmsfs")
    }

    pub fn mount(&self) -> Mount<'_> {
        self.mount_with(&[])
    }

    /// Mounted with `-o OPTIONS` for other users to reach (the options
    /// should include `allow_other`): the tempdir above it and the mount
    /// root opened to them.
    pub fn mount_shared(&self, options: &str) -> Mount<'_> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let m = self.mount_with(&["-o", options]);
        std::fs::set_permissions(&self.mnt, std::fs::Permissions::from_mode(0o755)).unwrap();
        m
    }

    pub fn mount_with(&self, extra: &[&str]) -> Mount<'_> {
        self.mount_with_env(&[], extra)
    }

    /// `mount_with`, the daemon given `env` besides the volume's settings.
    pub fn mount_with_env(&self, env: &[(&str, &str)], extra: &[&str]) -> Mount<'_> {
        let mut args = vec![
            "mount",
            path_str(&self.backing),
            path_str(&self.mnt),
            "--log-file",
            path_str(&self.log),
        ];
        args.extend_from_slice(extra);
        // scripts/test.sh runs some suites again under other option sets.
        let matrix = std::env::var("KMSFS_TEST_MOUNT_OPTIONS").unwrap_or_default();
        if !matrix.is_empty() {
            args.extend_from_slice(&["-o", &matrix]);
        }
        let out = self
            .command()
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .args(&args)
            .output()
            .expect("run kmsfs mount");
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount {
            vol: self,
            mounted: true,
        }
    }

    /// Mounts as the user `uid` (root only; the volume's directory must be
    /// theirs), whose daemon sees only `env` besides the volume's settings,
    /// with `extra` mount arguments.
    pub fn mount_as(&self, uid: u32, env: &[(&str, &Path)], extra: &[&str]) -> Mount<'_> {
        let out = self
            .command_as(uid, env)
            .args(["mount", path_str(&self.backing), path_str(&self.mnt)])
            .args(extra)
            .output()
            .expect("run kmsfs mount");
        assert!(out.status.success(), "mount as {uid} failed: {}", stderr(&out));
        Mount {
            vol: self,
            mounted: true,
        }
    }

    /// A kmsfs command run as the user `uid` with only `env` and the
    /// volume's settings in its environment.
    pub fn command_as(&self, uid: u32, env: &[(&str, &Path)]) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args([&format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups"])
            .arg(kmsfs_bin())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("KMSFS_KEYSTORE", &self.keystore)
            .env("KMSFS_CONFIG", &self.config)
            .env("KMSFS_PASSPHRASE", PASSPHRASE)
            .envs(env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// The same keys and environment, over another backing directory (a
    /// copy of this one) and with its own mount point.
    pub fn view_of(&self, backing: PathBuf) -> TestVolume {
        let dir = tempfile::Builder::new()
            .prefix("kmsfs-view-")
            .tempdir()
            .expect("tempdir");
        let view = TestVolume {
            backing,
            mnt: dir.path().join("plain"),
            keystore: self.keystore.clone(),
            config: self.config.clone(),
            log: dir.path().join("daemon.log"),
            env: self.env.clone(),
            dir,
        };
        std::fs::create_dir(&view.mnt).expect("mkdir mountpoint");
        view
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A command's stdout as JSON; the command must have succeeded.
pub fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A command's stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// All a command said, stdout then stderr.
pub fn said(out: &Output) -> String {
    stdout(out) + &stderr(out)
}

/// Runs `sh -c script` with `$1` = `path` as user `uid` (group `uid`, no
/// others), through `setpriv`.
pub fn run_as(uid: u32, script: &str, path: &Path) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(path)
        .output()
        .unwrap()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 test path")
}

/// `kmsfs fsck --json` with `extra` options: (exit code, report).
pub fn fsck(vol: &TestVolume, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut args = vec!["fsck", "--json", path_str(&vol.backing)];
    args.extend_from_slice(extra);
    let out = vol.run(&args);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "fsck output ({e}): {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

/// The kinds of problem an fsck report lists, sorted.
pub fn kinds(report: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap().to_string())
        .collect();
    k.sort();
    k
}

/// From now on every commit of file keys to the volume's DB fails ('injected
/// failure'), as on a broken disk, until `allow_key_commits`.
pub fn refuse_key_commits(vol: &TestVolume) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(vol.backing.join("kmsfs.db")).unwrap();
    db.execute_batch(
        "CREATE TRIGGER refuse BEFORE INSERT ON file_keys BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
    )
    .unwrap();
    db
}

/// Undoes `refuse_key_commits`.
pub fn allow_key_commits(db: rusqlite::Connection) {
    db.execute_batch("DROP TRIGGER refuse;").unwrap();
}

/// Waits up to 20 s for `done`, failing the test with `what` after that.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "{what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits until the daemon of `vol` has recorded its mount in the audit log
/// and holds the log's lock no more. A thread of its own records it, under
/// that lock: a daemon stopped (SIGSTOP) meanwhile would hold it, and every
/// command would wait for it (and give up after 30 s, saying so).
pub fn wait_until_mount_recorded(vol: &TestVolume) {
    let log = vol.dir.path().join("audit.jsonl");
    let lock_free = || {
        use std::os::fd::AsRawFd;
        std::fs::File::open(vol.dir.path().join("audit.jsonl.lock")).is_ok_and(|lock| {
            // Taken and let go at once: nobody holds it now.
            unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
        })
    };
    wait_until("the daemon recorded its mount", || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("\"Mount\"")) && lock_free()
    });
}

/// Whether something is mounted at exactly `path`.
pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|l| l.split(' ').nth(4) == Some(path_str(path)))
}

/// Unmounts on drop, even when the test panics.
pub struct Mount<'a> {
    vol: &'a TestVolume,
    mounted: bool,
}

impl Mount<'_> {
    pub fn unmount(mut self) {
        self.do_unmount();
        assert!(!self.mounted, "unmount failed");
    }

    /// Runs `kmsfs umount` once and returns what it said, whatever it was
    /// (the guard still unmounts on drop if the mount is left).
    pub fn umount_output(mut self) -> Output {
        self.umount_with(&[])
    }

    /// Runs `kmsfs umount OPTIONS MOUNTPOINT` once and returns what it said.
    pub fn umount_with(&mut self, options: &[&str]) -> Output {
        let mut args = vec!["umount"];
        args.extend(options);
        args.push(path_str(&self.vol.mnt));
        let out = self.vol.run(&args);
        self.mounted = is_mounted(&self.vol.mnt);
        out
    }

    fn do_unmount(&mut self) {
        if !self.mounted || !is_mounted(&self.vol.mnt) {
            self.mounted = false;
            return;
        }
        let out = self.vol.run(&["umount", path_str(&self.vol.mnt)]);
        if out.status.success() {
            self.mounted = false;
            return;
        }
        eprintln!("kmsfs umount failed: {}", String::from_utf8_lossy(&out.stderr));
        // Last resort: never leave a stale mount behind.
        let _ = Command::new("umount").arg("-l").arg(&self.vol.mnt).status();
    }
}

impl Drop for Mount<'_> {
    fn drop(&mut self) {
        self.do_unmount();
    }
}

/// Every regular file (and symlink target, and xattr) under `dir`, as raw bytes, for leak scans.
pub fn all_backing_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let entry = entry.expect("entry");
            let path = entry.path();
            let ft = entry.file_type().expect("file type");
            let mut bytes = path.file_name().unwrap().as_encoded_bytes().to_vec();
            if ft.is_dir() {
                stack.push(path.clone());
            } else if ft.is_symlink() {
                bytes.extend(std::fs::read_link(&path).unwrap().as_os_str().as_encoded_bytes());
            } else if ft.is_file() {
                bytes.extend(std::fs::read(&path).expect("read backing file"));
            }
            if !ft.is_symlink()
                && let Ok(names) = xattr_list(&path)
            {
                for name in names {
                    bytes.extend_from_slice(&name);
                    bytes.extend(xattr_get(&path, &name).unwrap_or_default());
                }
            }
            out.push((path, bytes));
        }
    }
    out
}

fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

pub fn xattr_list(p: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let c = cpath(p);
    let mut buf = vec![0u8; 65536];
    let n = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(buf[..n as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| s.to_vec())
        .collect())
}

pub fn xattr_get(p: &Path, name: &[u8]) -> std::io::Result<Vec<u8>> {
    let c = cpath(p);
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    let len = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

pub fn xattr_set(p: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<()> {
    let c = cpath(p);
    let n = std::ffi::CString::new(name).unwrap();
    let rc = unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn xattr_remove(p: &Path, name: &str) -> std::io::Result<()> {
    let c = cpath(p);
    let n = std::ffi::CString::new(name).unwrap();
    let rc = unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A small deterministic generator so failures reproduce from the seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}
