//! Several threads doing seeded random operations (create, write, truncate,
//! rename, link, unlink, mkdir, rmdir, xattrs) against the mount for a
//! bounded time, each checked against a model, then the whole tree checked
//! again after a remount. KMSFS_STRESS_SECONDS sets the duration (default
//! 12); the daemon's peak RSS is printed at the end.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use crate::common::{Rng, TestVolume, path_str, xattr_get, xattr_list, xattr_remove, xattr_set};

#[derive(Default, Clone)]
struct Inode {
    data: Vec<u8>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

#[derive(Default)]
struct Model {
    files: BTreeMap<String, usize>,
    inodes: Vec<Inode>,
    dirs: BTreeSet<String>,
}

impl Model {
    fn pick_file(&self, rng: &mut Rng) -> Option<String> {
        if self.files.is_empty() {
            return None;
        }
        self.files
            .keys()
            .nth(rng.below(self.files.len() as u64) as usize)
            .cloned()
    }

    fn new_path(&self, rng: &mut Rng, prefix: &str, n: usize) -> String {
        let dirs: Vec<&String> = self.dirs.iter().collect();
        let parent = dirs[rng.below(dirs.len() as u64) as usize];
        format!("{parent}/{prefix}{n}")
    }
}

fn check_file(vol: &TestVolume, model: &Model, path: &str, ctx: &str) {
    let inode = &model.inodes[model.files[path]];
    let got = fs::read(vol.path(path)).unwrap_or_else(|e| panic!("{ctx}: read {path}: {e}"));
    assert!(
        got == inode.data,
        "{ctx}: {path} differs ({} vs {} bytes)",
        got.len(),
        inode.data.len()
    );
    let mut names: Vec<String> = xattr_list(&vol.path(path))
        .unwrap()
        .into_iter()
        .map(|n| String::from_utf8(n).unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        inode.xattrs.keys().cloned().collect::<Vec<_>>(),
        "{ctx}: xattrs of {path}"
    );
}

fn run_thread(vol: &TestVolume, t: u64, deadline: Instant) -> Model {
    let mut rng = Rng::new(1000 + t);
    let mut m = Model::default();
    let root = format!("t{t}");
    fs::create_dir(vol.path(&root)).unwrap();
    m.dirs.insert(root.clone());
    let mut n = 0usize;
    while Instant::now() < deadline {
        n += 1;
        let ctx = format!("thread {t} op {n}");
        match rng.below(20) {
            0..=5 => {
                // write at a random offset into a new or existing file
                let path = match (rng.below(3), m.pick_file(&mut rng)) {
                    (0, _) | (_, None) => m.new_path(&mut rng, "f", n),
                    (_, Some(p)) => p,
                };
                let off = rng.below(200_000) as usize;
                let len = rng.below(40_000) as usize + 1;
                let data = rng.bytes(len);
                let f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(vol.path(&path))
                    .unwrap();
                f.write_all_at(&data, off as u64)
                    .unwrap_or_else(|e| panic!("{ctx}: write {path}: {e}"));
                let idx = *m.files.entry(path.clone()).or_insert_with(|| {
                    m.inodes.push(Inode::default());
                    m.inodes.len() - 1
                });
                let inode = &mut m.inodes[idx];
                if inode.data.len() < off + len {
                    inode.data.resize(off + len, 0);
                }
                inode.data[off..off + len].copy_from_slice(&data);
                check_file(vol, &m, &path, &ctx);
            }
            6 | 7 => {
                let Some(path) = m.pick_file(&mut rng) else { continue };
                let size = rng.below(250_000) as usize;
                fs::OpenOptions::new()
                    .write(true)
                    .open(vol.path(&path))
                    .unwrap()
                    .set_len(size as u64)
                    .unwrap();
                let idx = m.files[&path];
                m.inodes[idx].data.resize(size, 0);
                check_file(vol, &m, &path, &ctx);
            }
            8 | 9 => {
                // rename, possibly over an existing file, possibly across directories
                let Some(from) = m.pick_file(&mut rng) else { continue };
                let to = match (rng.below(3), m.pick_file(&mut rng)) {
                    (0, Some(existing)) => existing,
                    _ => m.new_path(&mut rng, "r", n),
                };
                fs::rename(vol.path(&from), vol.path(&to)).unwrap_or_else(|e| panic!("{ctx}: rename {from} {to}: {e}"));
                // POSIX: renaming onto another link of the same file does nothing.
                let same_file = m.files.get(&to) == m.files.get(&from);
                if !same_file {
                    let idx = m.files.remove(&from).unwrap();
                    m.files.insert(to.clone(), idx);
                    assert!(!vol.path(&from).exists(), "{ctx}: {from} still exists");
                }
                check_file(vol, &m, &to, &ctx);
            }
            10 => {
                let Some(from) = m.pick_file(&mut rng) else { continue };
                let to = m.new_path(&mut rng, "l", n);
                fs::hard_link(vol.path(&from), vol.path(&to)).unwrap();
                let idx = m.files[&from];
                m.files.insert(to.clone(), idx);
                check_file(vol, &m, &to, &ctx);
            }
            11 | 12 => {
                let Some(path) = m.pick_file(&mut rng) else { continue };
                fs::remove_file(vol.path(&path)).unwrap();
                m.files.remove(&path);
                assert!(!vol.path(&path).exists(), "{ctx}: {path} survived unlink");
            }
            13 | 14 => {
                let parent: Vec<&String> = m.dirs.iter().filter(|d| d.matches('/').count() < 3).collect();
                let dir = format!("{}/d{n}", parent[rng.below(parent.len() as u64) as usize]);
                fs::create_dir(vol.path(&dir)).unwrap();
                m.dirs.insert(dir);
            }
            15 => {
                let empty: Vec<String> = m
                    .dirs
                    .iter()
                    .filter(|d| {
                        **d != root
                            && !m.files.keys().any(|f| f.starts_with(&format!("{d}/")))
                            && !m.dirs.iter().any(|o| o.starts_with(&format!("{d}/")))
                    })
                    .cloned()
                    .collect();
                if let Some(dir) = empty.first() {
                    fs::remove_dir(vol.path(dir)).unwrap_or_else(|e| panic!("{ctx}: rmdir {dir}: {e}"));
                    m.dirs.remove(dir);
                }
            }
            16..=18 => {
                let Some(path) = m.pick_file(&mut rng) else { continue };
                let name = format!("user.k{}", rng.below(4));
                let len = rng.below(300) as usize;
                let value = rng.bytes(len);
                xattr_set(&vol.path(&path), &name, &value, 0).unwrap();
                let idx = m.files[&path];
                m.inodes[idx].xattrs.insert(name.clone(), value.clone());
                assert_eq!(xattr_get(&vol.path(&path), name.as_bytes()).unwrap(), value, "{ctx}");
            }
            _ => {
                let Some(path) = m.pick_file(&mut rng) else { continue };
                let idx = m.files[&path];
                let Some(name) = m.inodes[idx].xattrs.keys().next().cloned() else {
                    continue;
                };
                xattr_remove(&vol.path(&path), &name).unwrap();
                m.inodes[idx].xattrs.remove(&name);
                check_file(vol, &m, &path, &ctx);
            }
        }
    }
    m
}

fn verify_tree(vol: &TestVolume, t: u64, m: &Model, ctx: &str) {
    let mut dirs = BTreeSet::new();
    let mut files = BTreeSet::new();
    let mut stack = vec![format!("t{t}")];
    while let Some(d) = stack.pop() {
        dirs.insert(d.clone());
        for e in fs::read_dir(vol.path(&d)).unwrap() {
            let e = e.unwrap();
            let p = format!("{d}/{}", e.file_name().to_string_lossy());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                files.insert(p);
            }
        }
    }
    assert_eq!(dirs, m.dirs, "{ctx}: directories of thread {t}");
    assert_eq!(files, m.files.keys().cloned().collect(), "{ctx}: files of thread {t}");
    for f in &files {
        check_file(vol, m, f, ctx);
    }
}

fn daemon_peak_rss_kib(vol: &TestVolume) -> u64 {
    let out = vol.run(&["status", "--json", path_str(&vol.backing)]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pid = s["daemon_pid"].as_u64().unwrap();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn threads_of_random_operations_match_their_models() {
    let seconds: u64 = std::env::var("KMSFS_STRESS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    // A small descriptor cache, so that nodes are reopened from their handles all the time.
    let vol = TestVolume::init_with(
        &[("KMSFS_FD_CACHE", "16")],
        &["--kdf-memory-mib", "19", "--kdf-iterations", "2"],
    );
    let mount = vol.mount();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let models: Vec<Model> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let vol = &vol;
                s.spawn(move || run_thread(vol, t, deadline))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, m) in models.iter().enumerate() {
        verify_tree(&vol, t as u64, m, "end of run");
    }
    let total: usize = models.iter().map(|m| m.files.len()).sum();
    println!(
        "stress: {seconds} s, {total} files at the end, daemon peak RSS {} KiB",
        daemon_peak_rss_kib(&vol)
    );
    mount.unmount();
    let _m = vol.mount();
    for (t, m) in models.iter().enumerate() {
        verify_tree(&vol, t as u64, m, "after remount");
    }
}
