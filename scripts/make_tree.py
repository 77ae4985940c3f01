#!/usr/bin/env python3
"""Writes the benchmarks' tarball: FILES files of 0-16 KiB of random bytes
spread over DIRS directories, from a fixed seed (the same bytes every run).

    make_tree.py OUT.tar FILES DIRS          directories grouped 32 per parent
    make_tree.py OUT.tar FILES DIRS --flat   all directories under tree/
"""
import io
import random
import sys
import tarfile


def main() -> None:
    out, files, dirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    flat = "--flat" in sys.argv[4:]

    def dir_name(d: int) -> str:
        return f"tree/d{d}" if flat else f"tree/d{d // 32}/d{d}"

    rng = random.Random(1)
    with tarfile.open(out, "w") as tar:
        for d in range(dirs):
            info = tarfile.TarInfo(dir_name(d))
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for i in range(files):
            data = rng.randbytes(rng.randrange(0, 16385))
            info = tarfile.TarInfo(f"{dir_name(i % dirs)}/f{i}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main()
