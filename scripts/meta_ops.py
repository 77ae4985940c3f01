"""Metadata workload shared by bench.sh and tmpfs-bench.sh.

    meta_ops.py DIR N create   mkdir DIR, then create N empty files in it
    meta_ops.py DIR N stat     stat each of them
    meta_ops.py DIR N unlink   unlink each of them, then rmdir DIR
"""
import os
import sys

d, n, op = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if op == "create":
    os.mkdir(d)
    for i in range(n):
        os.close(os.open(f"{d}/e{i}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
elif op == "stat":
    for i in range(n):
        os.stat(f"{d}/e{i}")
elif op == "unlink":
    for i in range(n):
        os.unlink(f"{d}/e{i}")
    os.rmdir(d)
else:
    sys.exit(f"meta_ops.py: unknown operation {op}")
