"""Random-access reads: ImageFolderLMDB.read(i) against opening the individual files.

Both read the same images in the same random order, with a warm page cache (the case of
every epoch after the first on a machine whose RAM holds the data set), so the figure is
the cost of the access path itself: one LMDB lookup against open + read + close of a file.

    .venv/bin/python benchmarks/bench_read.py --src ../corpus/train --reps 5
    .venv/bin/python benchmarks/bench_read.py --src ../corpus/train --reps 3 --cold

--cold drops the files and the store from the page cache before every measurement
(posix_fadvise DONTNEED, the store closed first; the first epoch, or a data set larger
than RAM) and adds the loader's way of reading: batches of 256 announced with
Store.prefetch, then read as views.

The store is converted (--keep-bytes) into a temporary folder first unless --store is given.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from effitrain.data import ImageFolderLMDB
from effitrain.store.prepare import ConvertOptions
from effitrain.store.writer import convert


def read_files(paths: list[str], order: list[int]) -> int:
    total = 0
    for i in order:
        with open(paths[i], "rb") as f:
            total += len(f.read())
    return total


def read_store(ds: ImageFolderLMDB, order: list[int]) -> int:
    total = 0
    for i in order:
        total += len(ds.read(i)[0])
    return total


def read_store_views(ds: ImageFolderLMDB, order: list[int]) -> int:
    total = 0
    for i in order:
        total += len(ds.read(i, copy=False)[0])
    return total


def copies_alone(views: list[memoryview], order: list[int]) -> int:
    """Only the copy a ``bytes`` result costs: each payload copied out of the page cache."""
    total = 0
    for i in order:
        total += len(bytes(views[i]))
    return total


def view_store(ds: ImageFolderLMDB, order: list[int]) -> int:
    total = 0
    for i in order:
        total += len(ds.store.record(i, copy=False).payload)
    return total


def prefetched_views(ds: ImageFolderLMDB, order: list[int], batch: int = 256) -> int:
    total = 0
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        ds.store.prefetch(chunk)
        for i in chunk:
            total += len(ds.store.record(i, copy=False).payload)
    return total


def evict(paths: list[str]) -> None:
    """Drop these files' pages from the page cache."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=Path("../corpus/train"))
    ap.add_argument("--store", type=Path, default=None, help="an existing store of --src (default: convert one)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each measurement")
    args = ap.parse_args()

    tmp = None
    store = args.store
    if store is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-read-"))
        store = tmp / "store.lmdb"
        convert(args.src, store, options=ConvertOptions(payload="keep"), progress=False)
    ds = ImageFolderLMDB(store)
    paths = [str(args.src / rel) for rel, _ in ds.samples]
    order = list(range(len(ds)))
    random.Random(args.seed).shuffle(order)
    nbytes = read_files(paths, order)  # warm both caches
    assert read_store(ds, order) == nbytes

    ways = {
        "open files (open + read + close)": lambda: read_files(paths, order),
        "ds.read(i) (payload copied to bytes)": lambda: read_store(ds, order),
        "ds.read(i, copy=False) (view of the map)": lambda: read_store_views(ds, order),
        "store.record(i, copy=False) (loader's read)": lambda: view_store(ds, order),
    }
    if args.cold:
        ways["store.prefetch per 256, then views (loader)"] = lambda: prefetched_views(ds, order)
    else:  # the floor of any bytes-returning read: the copy alone, no lookup
        views = [ds.read(i, copy=False)[0] for i in range(len(ds))]
        ways["bytes(view) alone (the copy in ds.read(i))"] = lambda: copies_alone(views, order)
    data_file = str(store / "data.mdb" if store.is_dir() else store)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for rep in range(args.reps):  # interleaved, so drift hits all alike
        for name, fn in ways.items():
            if args.cold:
                ds.store.close()  # unmapped pages can be dropped
                evict(paths + [data_file])
            t = time.perf_counter()
            assert fn() == nbytes
            times[name].append(time.perf_counter() - t)
        print(f"rep {rep}  " + "  ".join(f"{ts[-1]:.4f} s" for ts in times.values()), flush=True)

    n = len(order)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    files = medians["open files (open + read + close)"]
    result: dict = {"images": n, "bytes": nbytes, "reps": args.reps, "cache": "cold" if args.cold else "warm"}
    cache = "cold" if args.cold else "warm"
    print(f"\n{n} random reads, {nbytes / 1e6:.1f} MB, {cache} cache, median of {args.reps}:")
    for name, t in medians.items():
        result[name] = {"seconds": round(t, 4), "reads_per_s": round(n / t), "mb_per_s": round(nbytes / t / 1e6, 1),
                        "ratio_vs_files": round(files / t, 2)}
        print(f"  {name:46s} {n / t:10,.0f} reads/s  {nbytes / t / 1e6:8.1f} MB/s  {files / t:5.2f}x files")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if tmp is not None:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
