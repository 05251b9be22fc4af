"""Writing a new file in writes of different sizes, each after the page cache was dropped.

What this project's VMs do to `convert`'s writer (RESULTS.md, issue 2): the host takes
back memory the guest frees, and a write that gets large page-cache blocks (writes of
128 KB and more) pays host faults in its copy. LMDB commits a transaction in one
`writev` of about the transaction's size; tar writes 10 KB at a time.

    sudo .venv/bin/python benchmarks/bench_pagecache.py --dir /work/tmp --mb 620 --reps 3

Needs root (it writes /proc/sys/vm/drop_caches before each run and waits --settle s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

PAGE = 4096


def write_file(path: Path, total: int, size: int, as_pages: bool) -> float:
    """Seconds to write ``total`` bytes in writes of ``size`` (as 4 KiB iovecs, like LMDB)."""
    block = memoryview(os.urandom(1 << 20))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(total // len(block)):
            for at in range(0, len(block), size):
                chunk = block[at : at + size]
                if as_pages:
                    os.writev(fd, [chunk[p : p + PAGE] for p in range(0, len(chunk), PAGE)])
                else:
                    os.write(fd, chunk)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("."))
    ap.add_argument("--mb", type=int, default=620)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--settle", type=float, default=4.0, help="seconds between dropping the cache and writing")
    args = ap.parse_args()
    ways = {"10 KB writes (tar)": (10 << 10, False), "64 KB writes": (64 << 10, False),
            "128 KB writes": (128 << 10, False), "1 MB writev of 4 KB pages (LMDB commit)": (1 << 20, True)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for rep in range(args.reps):
        for name, (size, as_pages) in ways.items():
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("1")
            time.sleep(args.settle)
            times[name].append(write_file(args.dir / "bench-pagecache.bin", args.mb << 20, size, as_pages))
            print(f"rep {rep}  {name:42s} {times[name][-1]:.3f} s", flush=True)
    print(f"\n{args.mb} MB into a new file, median of {args.reps}:")
    for name, ts in times.items():
        print(f"  {name:42s} {statistics.median(ts):.3f} s  ({', '.join(f'{t:.2f}' for t in ts)})")


if __name__ == "__main__":
    main()
