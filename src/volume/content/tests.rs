//! The content layout: size mapping, random writes and truncates against a
//! model in both formats, concurrent writers, and the cuts each format detects.

use super::*;
use crate::crypto::SecretKey;

fn setup() -> (tempfile::TempDir, File, BlockCipher) {
    setup_with(Layout::Lenient)
}

fn setup_with(layout: Layout) -> (tempfile::TempDir, File, BlockCipher) {
    setup_in(tempfile::tempdir().unwrap(), layout)
}

/// A new file `f` in `dir`, with a random key.
fn setup_in(dir: tempfile::TempDir, layout: Layout) -> (tempfile::TempDir, File, BlockCipher) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("f"))
        .unwrap();
    let cipher = BlockCipher::new(&SecretKey::random(), [5u8; 16], layout);
    create(&file, &cipher).unwrap();
    (dir, file, cipher)
}

#[test]
fn sizes_map_both_ways() {
    for plain in [0u64, 1, 4095, 4096, 4097, 10 * 4096, 10 * 4096 + 17] {
        assert_eq!(plain_size(backing_size(plain)), plain);
    }
    assert_eq!(plain_size(0), 0);
}

#[test]
fn seeded_random_writes_and_truncates_match_a_model() {
    for layout in [Layout::Lenient, Layout::Sealed] {
        model_check(layout);
    }
}

fn model_check(layout: Layout) {
    let (_dir, file, cipher) = setup_with(layout);
    let mut model: Vec<u8> = Vec::new();
    let mut state = 0x1234_5678_u64;
    let mut next = |m: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % m
    };
    for step in 0..600 {
        match next(10) {
            0..=5 => {
                // One write in three is whole blocks at a block boundary
                // (what the writeback cache sends), sealed before the lock.
                let (off, len) = if next(3) == 0 {
                    (next(18) * BS, (next(5) as usize + 1) * BLOCK_SIZE)
                } else {
                    (next(70_000), next(20_000) as usize + 1)
                };
                let data: Vec<u8> = (0..len).map(|i| (i as u64 + step) as u8 | 1).collect();
                write(&file, &cipher, off, &data).unwrap();
                if model.len() < off as usize + len {
                    model.resize(off as usize + len, 0);
                }
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            6 | 7 => {
                let size = next(90_000);
                truncate(&file, &cipher, size).unwrap();
                model.resize(size as usize, 0);
            }
            _ => {
                let off = next(80_000);
                let len = next(30_000) as usize;
                let got = read(&file, &cipher, off, len).unwrap();
                let lo = (off as usize).min(model.len());
                let hi = (off as usize + len).min(model.len());
                assert_eq!(got, &model[lo..hi], "step {step}");
            }
        }
        assert_eq!(
            current_plain_size(&file, &cipher).unwrap(),
            model.len() as u64,
            "step {step}"
        );
        if layout == Layout::Sealed {
            // Always an authenticated end: a cut or appended zeros would show.
            let len = file.metadata().unwrap().len();
            assert!(sealed_length_ok(len), "step {step}: length {len}");
            let (_, bad) = check_blocks(&file, &cipher, &|_| ()).unwrap();
            assert!(bad.is_empty(), "step {step}: {bad:?}");
        }
    }
    assert_eq!(read(&file, &cipher, 0, model.len()).unwrap(), model);
}

#[test]
fn concurrent_whole_block_writers_leave_one_final_block() {
    // As the kernel's writeback does: several large writes to one file
    // at once, extending it in any order.
    let (_dir, file, cipher) = setup();
    let writers = std::sync::RwLock::new(());
    let (chunk, chunks) = (8 * BLOCK_SIZE, 24);
    let expected: Vec<u8> = (0..chunks * chunk).map(|i| (i / BLOCK_SIZE * 7 + i) as u8).collect();
    for round in 0..6 {
        file.set_len(HEADER_LEN as u64).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let (file, cipher, writers, expected) = (&file, &cipher, &writers, &expected);
                s.spawn(move || {
                    let mine = (0..chunks).filter(|c| (c + round) % 4 == t);
                    let order: Vec<usize> = if round % 2 == 0 {
                        mine.rev().collect()
                    } else {
                        mine.collect()
                    };
                    for c in order {
                        let range = c * chunk..(c + 1) * chunk;
                        write_under(file, cipher, range.start as u64, &expected[range], writers).unwrap();
                    }
                });
            }
        });
        assert_eq!(
            read(&file, &cipher, 0, expected.len()).unwrap(),
            expected,
            "round {round}"
        );
        // Only the real last block is sealed as final: a cut anywhere is detected.
        let keep = (5 + 13 * round as u64) % (chunks * 8) as u64 + 1;
        file.set_len(block_offset(keep)).unwrap();
        let cut = read(&file, &cipher, 0, expected.len());
        assert!(
            matches!(cut, Err(ContentError::Corrupt { block }) if block == keep - 1),
            "round {round}: cut after block {keep} not detected"
        );
    }
}

/// Whether page `page` of `file` is in the page cache.
fn resident(file: &File, page: u64) -> bool {
    crate::test_hooks::resident_pages(file).unwrap()[page as usize]
}

#[test]
fn a_write_queued_behind_another_asks_for_its_partly_covered_pages_while_it_waits() {
    // Not tmpfs, whose pages cannot be dropped.
    let (_dir, file, cipher) = setup_in(tempfile::tempdir_in("/var/tmp").unwrap(), Layout::Sealed);
    write(&file, &cipher, 0, &vec![7u8; 64 * BLOCK_SIZE]).unwrap();
    file.sync_all().unwrap();
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let block = 40;
    let start = block_offset(block);
    let (head, tail) = (start / 4096, (start + CIPHER_BLOCK_SIZE as u64) / 4096);
    assert!(
        !start.is_multiple_of(4096) && tail == head + 1,
        "the block covers two pages in part"
    );
    assert!(!resident(&file, head) && !resident(&file, tail), "pages dropped");
    let lock = RwLock::new(());
    std::thread::scope(|s| {
        // Dropped on a failed assertion too, before the scope waits for the writer.
        let ahead = lock.write().unwrap();
        let queued = s.spawn(|| write_under(&file, &cipher, block * BS, &[9u8; BLOCK_SIZE], &lock));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !(resident(&file, head) && resident(&file, tail)) {
            assert!(
                std::time::Instant::now() < deadline,
                "the queued write's pages were not read"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(ahead);
        queued.join().unwrap().unwrap();
    });
    assert_eq!(
        read(&file, &cipher, block * BS, BLOCK_SIZE).unwrap(),
        vec![9u8; BLOCK_SIZE]
    );
}

#[test]
fn truncation_at_a_block_boundary_is_detected() {
    let (_dir, file, cipher) = setup();
    write(&file, &cipher, 0, &vec![7u8; 3 * BLOCK_SIZE]).unwrap();
    file.set_len(block_offset(2)).unwrap();
    assert!(
        read(&file, &cipher, 0, 100).is_ok(),
        "blocks before the cut are authentic"
    );
    assert!(matches!(
        read(&file, &cipher, 0, 3 * BLOCK_SIZE),
        Err(ContentError::Corrupt { block: 1 })
    ));
}

#[test]
fn sealed_layout_detects_cuts_and_appended_zeros() {
    let (_dir, file, cipher) = setup_with(Layout::Sealed);
    assert_eq!(file.metadata().unwrap().len(), (HEADER_LEN + BLOCK_OVERHEAD) as u64);
    assert_eq!(read(&file, &cipher, 0, 10).unwrap(), b"");
    // An empty file cut to its header, or into its empty final block.
    for len in [0, HEADER_LEN as u64, HEADER_LEN as u64 + 5] {
        file.set_len(len).unwrap();
        assert!(read(&file, &cipher, 0, 10).is_err(), "cut to {len}");
    }
    // Header plus 28 zero bytes: the empty final block replaced by a hole.
    file.set_len((HEADER_LEN + BLOCK_OVERHEAD) as u64).unwrap();
    assert!(matches!(
        read(&file, &cipher, 0, 1),
        Err(ContentError::Corrupt { block: 0 })
    ));

    truncate(&file, &cipher, 0).unwrap();
    write(&file, &cipher, 0, &[7u8; 5000]).unwrap();
    // Whole zero blocks appended: the new last one is a hole.
    let len = file.metadata().unwrap().len();
    file.set_len(len + 2 * CIPHER_BLOCK_SIZE as u64).unwrap();
    assert!(read(&file, &cipher, 0, 20_000).is_err(), "grown by zero blocks");
    file.set_len(len).unwrap();
    assert_eq!(read(&file, &cipher, 0, 20_000).unwrap(), vec![7u8; 5000]);
    // Cut into the last block's overhead, or just past a whole block.
    for cut in [len - 1000 - 4, block_offset(1) + 10, block_offset(1) + 28] {
        file.set_len(cut).unwrap();
        assert!(read(&file, &cipher, 0, 20_000).is_err(), "cut to {cut}");
    }
    // Growing keeps a sealed final block.
    truncate(&file, &cipher, 0).unwrap();
    truncate(&file, &cipher, 3 * BS + 7).unwrap();
    assert_eq!(read(&file, &cipher, 0, 20_000).unwrap(), vec![0u8; 3 * BLOCK_SIZE + 7]);
    let (blocks, bad) = check_blocks(&file, &cipher, &|_| ()).unwrap();
    assert_eq!((blocks, bad.len()), (4, 0));
}

#[test]
fn lenient_layout_keeps_reading_format_1_files() {
    let (_dir, file, cipher) = setup_with(Layout::Lenient);
    assert_eq!(file.metadata().unwrap().len(), HEADER_LEN as u64, "header only");
    assert_eq!(read(&file, &cipher, 0, 10).unwrap(), b"");
    truncate(&file, &cipher, 2 * BS).unwrap();
    assert_eq!(
        read(&file, &cipher, 0, 3 * BLOCK_SIZE).unwrap(),
        vec![0u8; 2 * BLOCK_SIZE],
        "ends in a hole"
    );
}

#[test]
fn check_skips_backing_holes_and_still_finds_damage_after_them() {
    for layout in [Layout::Lenient, Layout::Sealed] {
        let (_dir, file, cipher) = setup_with(layout);
        // 64 MiB of hole, then two blocks of data.
        write(&file, &cipher, 64 << 20, &[7u8; 2 * BLOCK_SIZE]).unwrap();
        let blocks = (64 << 20) / BS + 2;
        // Block 0 shares its backing page with the header; from block 1 on,
        // the hole ends in the page where the data starts.
        let data = next_data_block(&file, 1, blocks);
        assert!(
            (blocks - 3..=blocks - 2).contains(&data),
            "{layout:?}: the hole is skipped ({data})"
        );
        let checked = std::sync::atomic::AtomicU64::new(0);
        let count = |n| {
            checked.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        };
        assert_eq!(check_blocks(&file, &cipher, &count).unwrap(), (blocks, vec![]));
        assert_eq!(checked.into_inner(), blocks, "progress counts skipped blocks too");

        // A flipped byte in the data after the hole is still found.
        let at = block_offset(blocks - 2) + 40;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 1], at).unwrap();
        assert_eq!(
            check_blocks(&file, &cipher, &|_| {}).unwrap(),
            (blocks, vec![blocks - 2])
        );
    }
}

#[test]
fn check_reads_the_final_block_even_inside_a_hole() {
    let (_dir, file, cipher) = setup_with(Layout::Sealed);
    write(&file, &cipher, 0, &[1u8; 100]).unwrap();
    truncate(&file, &cipher, 16 << 20).unwrap();
    let blocks = (16 << 20) / BS;
    // An attacker punches the sealed final block out: it reads as a hole,
    // which the sealed layout refuses for a final block.
    let len = file.metadata().unwrap().len();
    file.set_len(block_offset(blocks - 1)).unwrap();
    file.set_len(len).unwrap();
    assert_eq!(
        check_blocks(&file, &cipher, &|_| {}).unwrap(),
        (blocks, vec![blocks - 1])
    );
}

/// A file cut at a block boundary ends in a block sealed as not final.
/// Writing past it, or over it whole, would make that block a middle one
/// (or replace it) and the cut undetectable: such a write fails and leaves
/// the file as it was, damage and all.
#[test]
fn writes_do_not_heal_a_cut_at_a_block_boundary() {
    let cases: [(&str, u64, usize); 4] = [
        ("append", 2 * BS, 9),
        ("write past the end", 40 * BS + 3, 100),
        ("whole block over the last", BS, BLOCK_SIZE),
        ("part of the last block", BS + 10, 20),
    ];
    for (what, offset, len) in cases {
        let (_dir, file, cipher) = setup_with(Layout::Sealed);
        write(&file, &cipher, 0, &vec![7u8; 3 * BLOCK_SIZE]).unwrap();
        file.set_len(block_offset(2)).unwrap();
        let cut = std::fs::read(_dir.path().join("f")).unwrap();
        assert!(
            matches!(
                write(&file, &cipher, offset, &vec![9u8; len]),
                Err(ContentError::Corrupt { block: 1 })
            ),
            "{what}"
        );
        assert_eq!(
            std::fs::read(_dir.path().join("f")).unwrap(),
            cut,
            "{what}: nothing written"
        );
        assert!(
            read(&file, &cipher, 0, 3 * BLOCK_SIZE).is_err(),
            "{what}: still detected"
        );
    }
}

/// A write that grows a file and fails part way (the backing filesystem
/// filled up; here RLIMIT_FSIZE cuts the backing write short, then fails
/// it with EFBIG, in a forked child) leaves the file as it was: its old
/// size, content and authenticated end, not a length no file has.
#[test]
fn a_growing_write_that_fails_part_way_leaves_the_file_as_it_was() {
    // (old size, offset, length): into an empty file, at and past its start;
    // appends that cover the old final block in part, whole, or not at all.
    let cases = [
        (0u64, 0u64, 10_000usize),
        (0, 3 * BS, 2 * BLOCK_SIZE),
        (5_000, 5_000, 10_000),
        (5_000, 20_000, 3_000),
        (2 * BS, 2 * BS, 2 * BLOCK_SIZE),
        (2 * BS + 10, 2 * BS - 100, 5_000),
    ];
    // Every case seals fewer than PARALLEL_MIN_BLOCKS blocks: rayon's pool
    // has no threads in the forked child.
    for ((old_size, offset, len), layout) in cases
        .into_iter()
        .flat_map(|c| [(c, Layout::Sealed), (c, Layout::Lenient)])
    {
        let (_dir, file, cipher) = setup_with(layout);
        let old: Vec<u8> = (0..old_size).map(|i| (i % 251) as u8).collect();
        write(&file, &cipher, 0, &old).unwrap();
        let data = vec![0xa5u8; len];
        let start = block_offset(offset / BS).max(file.metadata().unwrap().len().min(block_offset(offset / BS)));
        let limit = start + (backing_size(old_size.max(offset + len as u64)) - start) / 2;
        // SAFETY: the child only writes with this file and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let failed = std::panic::catch_unwind(|| {
                let mut cap = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: plain system calls in the forked child; the hard
                // limit stays as it is.
                unsafe {
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    libc::getrlimit(libc::RLIMIT_FSIZE, &mut cap);
                    cap.rlim_cur = limit.min(cap.rlim_max);
                    libc::setrlimit(libc::RLIMIT_FSIZE, &cap) == 0 && write(&file, &cipher, offset, &data).is_err()
                }
            });
            unsafe { libc::_exit(if failed.unwrap_or(false) { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let case = (old_size, offset, len, layout);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{case:?}: the write failed"
        );
        assert_eq!(current_plain_size(&file, &cipher).unwrap(), old_size, "{case:?}");
        // Bytes the write reached before it failed may hold its data, as
        // on any filesystem; every other byte is as it was.
        let now = read(&file, &cipher, 0, old.len() + 1).unwrap();
        assert_eq!(now.len(), old.len(), "{case:?}");
        let reached = offset as usize..offset as usize + len;
        let changed = (0..old.len()).find(|&i| now[i] != old[i] && !(reached.contains(&i) && now[i] == 0xa5));
        assert_eq!(changed, None, "{case:?}: a byte neither old nor written");
        let (_, bad) = check_blocks(&file, &cipher, &|_| ()).unwrap();
        assert!(bad.is_empty(), "{case:?}: {bad:?}");
    }
}
