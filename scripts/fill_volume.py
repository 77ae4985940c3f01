#!/usr/bin/env python3
"""Fills a directory with small files for scripts/bench-scale.sh.

    fill_volume.py DIR FILES PER_DIR

Creates FILES files of 0-4 KiB (seeded, so every run writes the same
bytes), PER_DIR to a directory (d0000/f000000 ...), from two processes (one
per core of the benchmark machine)."""
import os
import random
import sys
from multiprocessing import Pool


def fill(args):
    root, first, last, per_dir = args
    rng = random.Random(first)
    for i in range(first, last):
        d = f"{root}/d{i // per_dir:05d}"
        if i % per_dir == 0:
            os.mkdir(d)
        fd = os.open(f"{d}/f{i:07d}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        try:
            os.write(fd, rng.randbytes(rng.randrange(4097)))
        finally:
            os.close(fd)


def main():
    root, files, per_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dirs = (files + per_dir - 1) // per_dir
    # Each worker takes whole directories, so no two create in one directory.
    half = (dirs // 2) * per_dir
    with Pool(2) as pool:
        pool.map(fill, [(root, 0, half, per_dir), (root, half, files, per_dir)])


if __name__ == "__main__":
    main()
