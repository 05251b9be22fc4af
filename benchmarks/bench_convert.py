"""convert --keep-bytes throughput against tar -cf of the same tree, start-up excluded.

tar reads every file once and writes it once into one file: the floor of this job. Both
tools are run as commands on the full tree and on a one-image-per-class copy of it; the
difference of the two times is the time spent on the extra images, free of start-up
(Python, imports, worker processes) and of the fixed end (final fsync of small files).
The page cache is warmed first, so both measure the same thing: CPU and write path.

    .venv/bin/python benchmarks/bench_convert.py --src ../corpus/train --reps 5

Prints one line per run and a summary; --json writes the figures to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tree_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def one_per_class(src: Path, dest: Path) -> Path:
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        first = min(p for p in cls.iterdir() if p.is_file())
        (dest / cls.name).mkdir(parents=True)
        shutil.copy(first, dest / cls.name / first.name)
    return dest


def warm(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            p.read_bytes()


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=Path("../corpus/train"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None, help="convert --workers (default: CPU count)")
    ap.add_argument("--workdir", type=Path, default=None, help="where outputs go (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    small = one_per_class(args.src, workdir / "one-per-class")
    (n_full, b_full), (n_small, b_small) = tree_bytes(args.src), tree_bytes(small)
    warm(args.src)
    workers = [] if args.workers is None else ["--workers", str(args.workers)]

    def convert_cmd(tree: Path) -> list[str]:
        return [sys.executable, "-m", "effitrain", "convert", str(tree), str(workdir / "out.lmdb"), "--keep-bytes",
                "-q", *workers]

    tools = {
        "tar": lambda tree: ["tar", "-cf", str(workdir / "out.tar"), "-C", str(tree), "."],
        "tar+fsync": lambda tree: ["sh", "-c", f"tar -cf {workdir / 'out.tar'} -C {tree} . && sync {workdir / 'out.tar'}"],
        "convert": convert_cmd,
    }
    times: dict[str, list[float]] = {name: [] for name in tools}
    for rep in range(args.reps):
        for name, cmd in tools.items():
            full, one = timed(cmd(args.src)), None
            shutil.rmtree(workdir / "out.lmdb", ignore_errors=True)
            (workdir / "out.tar").unlink(missing_ok=True)
            one = timed(cmd(small))
            shutil.rmtree(workdir / "out.lmdb", ignore_errors=True)
            (workdir / "out.tar").unlink(missing_ok=True)
            times[name].append(full - one)
            print(f"rep {rep} {name:10s} full {full:6.3f} s  one-per-class {one:6.3f} s  difference {full - one:6.3f} s",
                  flush=True)

    images, nbytes = n_full - n_small, b_full - b_small
    result = {"src": str(args.src), "images": images, "bytes": nbytes, "reps": args.reps, "cpus": os.cpu_count()}
    for name, ts in times.items():
        t = statistics.median(ts)
        result[name] = {"seconds": round(t, 4), "images_per_s": round(images / t), "mb_per_s": round(nbytes / t / 1e6, 1)}
    result["ratio_vs_tar"] = round(result["tar"]["seconds"] / result["convert"]["seconds"], 3)
    result["ratio_vs_tar_fsync"] = round(result["tar+fsync"]["seconds"] / result["convert"]["seconds"], 3)
    print(f"\n{images} images, {nbytes / 1e6:.1f} MB (full tree minus one image per class), median of {args.reps}:")
    for name in tools:
        r = result[name]
        print(f"  {name:10s} {r['seconds']:7.3f} s  {r['images_per_s']:8,} img/s  {r['mb_per_s']:8.1f} MB/s")
    print(f"  convert / tar throughput: {result['ratio_vs_tar']:.2f}x   convert / (tar + fsync): {result['ratio_vs_tar_fsync']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
