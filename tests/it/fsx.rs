//! A model-based random test in the manner of fsx: seeded random writes,
//! truncates, extends and reads through the mount, each checked against an
//! in-memory model, and the whole file checked again after a remount.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use crate::common::{Rng, TestVolume};

const MAX_SIZE: u64 = 600_000;

fn check_range(file: &File, model: &[u8], off: u64, len: usize, step: usize, seed: u64) {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = file
            .read_at(&mut buf[got..], off + got as u64)
            .unwrap_or_else(|e| panic!("seed {seed} step {step}: read: {e}"));
        if n == 0 {
            break;
        }
        got += n;
    }
    let lo = (off as usize).min(model.len());
    let hi = (off as usize + len).min(model.len());
    assert_eq!(got, hi - lo, "seed {seed} step {step}: short read at {off}+{len}");
    assert!(
        buf[..got] == model[lo..hi],
        "seed {seed} step {step}: content differs at {off}+{len}"
    );
}

fn run(seed: u64, steps: usize) {
    let vol = TestVolume::init();
    let path = vol.path("fsx.data");
    let mut model: Vec<u8> = Vec::new();
    let mut rng = Rng::new(seed);
    {
        let _mount = vol.mount();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        for step in 0..steps {
            let op = rng.below(100);
            let size = model.len() as u64;
            match op {
                0..=39 => {
                    // write anywhere, possibly far beyond the end (leaving a hole)
                    let off = rng.below(MAX_SIZE);
                    let cap = if rng.below(4) == 0 { 200_000 } else { 9_000 };
                    let len = 1 + rng.below(cap) as usize;
                    let data = rng.bytes(len);
                    file.write_all_at(&data, off)
                        .unwrap_or_else(|e| panic!("seed {seed} step {step}: write: {e}"));
                    if model.len() < off as usize + len {
                        model.resize(off as usize + len, 0);
                    }
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                    check_range(&file, &model, off.saturating_sub(5000), len + 10_000, step, seed);
                }
                40..=49 => {
                    let new = rng.below(MAX_SIZE);
                    file.set_len(new)
                        .unwrap_or_else(|e| panic!("seed {seed} step {step}: truncate: {e}"));
                    model.resize(new as usize, 0);
                    check_range(&file, &model, new.saturating_sub(9000), 9000, step, seed);
                }
                50..=54 => {
                    // append through an O_APPEND descriptor
                    let len = 1 + rng.below(10_000) as usize;
                    let data = rng.bytes(len);
                    let mut appender = OpenOptions::new().append(true).open(&path).unwrap();
                    appender
                        .write_all(&data)
                        .unwrap_or_else(|e| panic!("seed {seed} step {step}: append: {e}"));
                    model.extend_from_slice(&data);
                }
                55..=57 => {
                    // extend by a small amount inside or across a block
                    let new = size + rng.below(5000);
                    file.set_len(new).unwrap();
                    model.resize(new as usize, 0);
                }
                58..=59 => {
                    file.sync_all().unwrap();
                    file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
                }
                _ => {
                    let off = rng.below(size.max(1) + 5000);
                    let len = rng.below(70_000) as usize;
                    check_range(&file, &model, off, len, step, seed);
                }
            }
            let reported = std::fs::metadata(&path).unwrap().len();
            assert_eq!(
                reported,
                model.len() as u64,
                "seed {seed} step {step}: size after op {op}"
            );
            if step % 250 == 0 {
                check_range(&file, &model, 0, model.len() + 10, step, seed);
            }
        }
        check_range(&file, &model, 0, model.len() + 10, steps, seed);
    }
    let _mount = vol.mount();
    let after = std::fs::read(&path).unwrap();
    assert!(after == model, "seed {seed}: content differs after remount");
}

#[test]
fn fsx_seed_1() {
    run(1, 2500);
}

#[test]
fn fsx_seed_2() {
    run(2, 2500);
}
