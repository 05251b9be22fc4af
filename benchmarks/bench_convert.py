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
import resource
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


def replicated(src: Path, dest: Path, copies: int) -> Path:
    """``copies`` copies of every file of ``src`` (real files, not links: tar stores a hard
    link as a link), so the measured part is long against start-up noise."""
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        (dest / rel.parent).mkdir(parents=True, exist_ok=True)
        for c in range(copies):
            shutil.copy(path, dest / rel.parent / f"{rel.stem}_{c}{rel.suffix}")
    return dest


def warm(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            p.read_bytes()


def _convert_name(flags: list[str]) -> str:
    return " ".join(["convert", *flags])


def timed(cmd: list[str], settle: float = 0.0) -> tuple[float, float, str]:
    """Wall-clock seconds, CPU seconds (user + system, of the command and all its
    processes) and the standard output of ``cmd``, started ``settle`` s after a sync."""
    # Flush everything dirty first: an fsync in the timed command must not pay for the
    # previous command's unwritten data.
    os.sync()
    time.sleep(settle)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=Path("../corpus/train"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--copies", type=int, default=1, help="measure on a tree of this many copies of --src")
    ap.add_argument("--workers", default="default",
                    help="comma-separated convert --workers values to compare, 'default' for none given [default: default]")
    ap.add_argument("--commit-mb", default="default",
                    help="comma-separated convert --commit-mb values to compare, 'default' for none given [default: default]")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to wait before every timed command, after the sync (see RESULTS.md, issue 2)")
    ap.add_argument("--workdir", type=Path, default=None, help="where outputs go (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    if args.copies > 1:
        args.src = replicated(args.src, workdir / "full", args.copies)
    small = one_per_class(args.src, workdir / "one-per-class")
    (n_full, b_full), (n_small, b_small) = tree_bytes(args.src), tree_bytes(small)
    warm(args.src)
    settings = [(w, mb) for w in args.workers.split(",") for mb in args.commit_mb.split(",")]
    out_tar, out_lmdb = workdir / "out.tar", workdir / "out.lmdb"
    tools = {
        "tar": lambda tree: ["tar", "-cf", str(out_tar), "-C", str(tree), "."],
        "tar+fsync": lambda tree: ["sh", "-c", f"tar -cf {out_tar} -C {tree} . && sync {out_tar}"],
    }
    for setting in settings:
        flag = [x for name, value in zip(("--workers", "--commit-mb"), setting) if value != "default" for x in (name, value)]
        tools[_convert_name(flag)] = lambda tree, flag=flag: [
            sys.executable, "-m", "effitrain", "convert", str(tree), str(out_lmdb), "--keep-bytes", "-q", "--json", *flag]
    # Per tool: (wall, CPU) differences full - one-per-class; for convert also the
    # difference of its own timer (--json "seconds": from after the listing to the rename),
    # which leaves out interpreter start-up and imports and so their noise.
    diffs: dict[str, list[tuple[float, float]]] = {name: [] for name in tools}
    for name in [n for n in tools if n.startswith("convert")]:
        diffs[name + " (own timer)"] = []
    for rep in range(args.reps):
        warm(args.src)  # this VM drops page cache idle for a minute (DAMON): keep both tools' input cached
        for name, cmd in tools.items():
            runs = []
            for tree in (args.src, small):
                runs.append(timed(cmd(tree), args.settle))
                shutil.rmtree(out_lmdb, ignore_errors=True)
                out_tar.unlink(missing_ok=True)
            (full, full_cpu, full_out), (one, one_cpu, one_out) = runs
            diffs[name].append((full - one, full_cpu - one_cpu))
            line = f"rep {rep} {name:10s} full {full:6.3f} s  one-per-class {one:6.3f} s  difference {full - one:6.3f} s"
            if name.startswith("convert"):
                own = json.loads(full_out)["seconds"] - json.loads(one_out)["seconds"]
                diffs[name + " (own timer)"].append((own, float("nan")))
                line += f"  (own timer: {own:6.3f} s)"
            print(line + f"  CPU difference {full_cpu - one_cpu:6.3f} s  load {os.getloadavg()[0]:.2f}", flush=True)

    images, nbytes = n_full - n_small, b_full - b_small
    result: dict = {"src": str(args.src), "copies": args.copies, "images": images, "bytes": nbytes,
                    "reps": args.reps, "cpus": os.cpu_count(), "workers": args.workers, "commit_mb": args.commit_mb, "settle": args.settle}
    print(f"\n{images} images, {nbytes / 1e6:.1f} MB (full tree minus one image per class), {args.reps} runs:")
    for name, pairs in diffs.items():
        t, best = statistics.median(p[0] for p in pairs), min(p[0] for p in pairs)
        c = statistics.median(p[1] for p in pairs)
        result[name] = {"seconds": round(t, 4), "best_seconds": round(best, 4), "images_per_s": round(images / t),
                        "mb_per_s": round(nbytes / t / 1e6, 1), "cpu_seconds": None if c != c else round(c, 4)}
        cpu_text = "" if c != c else f"   CPU {c:6.3f} s"
        print(f"  {name:32s} median {t:7.3f} s  {images / t:8,.0f} img/s  {nbytes / t / 1e6:8.1f} MB/s"
              f"   best {best:7.3f} s{cpu_text}")
    for base in ("tar", "tar+fsync"):
        for name in (n for n in diffs if n.startswith("convert")):
            ratio = result[base]["seconds"] / result[name]["seconds"]
            best = result[base]["best_seconds"] / result[name]["best_seconds"]
            result[f"{name} / {base}"] = {"median": round(ratio, 3), "best": round(best, 3)}
            # Each rep's tools run a few seconds apart: the median of the per-rep ratios
            # is less moved by this VM's drift than the ratio of the medians.
            paired = statistics.median(b[0] / c[0] for b, c in zip(diffs[base], diffs[name]))
            result[f"{name} / {base}"]["paired_median"] = round(paired, 3)
            print(f"  {name} / {base} throughput: {ratio:.2f}x (best runs: {best:.2f}x, median of per-rep ratios: {paired:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
