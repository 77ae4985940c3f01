//! Crypto core throughput: sealing and opening 4 KiB blocks on one core, and
//! a 1 MiB multi-block write sealed on one thread and on every core (rayon).
//!
//!   cargo bench --bench crypto
//!
//! The `bytes/s` criterion prints are the figures docs/DESIGN.md quotes.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kmsfs::crypto::{BLOCK_SIZE, BlockCipher, Layout, SecretKey};

fn cipher() -> BlockCipher {
    BlockCipher::new(&SecretKey::random(), [7u8; 16], Layout::Sealed)
}

fn single_blocks(c: &mut Criterion) {
    let cipher = cipher();
    let plain = vec![0x5au8; BLOCK_SIZE];
    let sealed = cipher.seal_blocks(3, 9, &plain);
    let mut out = vec![0u8; BLOCK_SIZE];
    let mut group = c.benchmark_group("block_4k");
    group.throughput(Throughput::Bytes(BLOCK_SIZE as u64));
    group.bench_function("seal", |b| {
        b.iter(|| cipher.seal_blocks(3, 9, std::hint::black_box(&plain)))
    });
    group.bench_function("open", |b| {
        b.iter(|| {
            cipher
                .open_blocks(3, 9, std::hint::black_box(&sealed), &mut out)
                .unwrap()
        })
    });
    group.finish();
}

fn multi_block_write(c: &mut Criterion) {
    let cipher = cipher();
    let plain = vec![0x5au8; 1 << 20];
    let sealed = cipher.seal_blocks(0, 255, &plain);
    let mut out = vec![0u8; 1 << 20];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut group = c.benchmark_group("write_1m");
    group.throughput(Throughput::Bytes(plain.len() as u64));
    for threads in [1, cores] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        group.bench_with_input(
            BenchmarkId::new("seal", format!("{threads}-threads")),
            &pool,
            |b, pool| b.iter(|| pool.install(|| cipher.seal_blocks(0, 255, std::hint::black_box(&plain)))),
        );
        group.bench_with_input(
            BenchmarkId::new("open", format!("{threads}-threads")),
            &pool,
            |b, pool| {
                b.iter(|| {
                    pool.install(|| {
                        cipher
                            .open_blocks(0, 255, std::hint::black_box(&sealed), &mut out)
                            .unwrap()
                    })
                })
            },
        );
        if threads == cores {
            break;
        }
    }
    group.finish();
}

criterion_group!(benches, single_blocks, multi_block_write);
criterion_main!(benches);
