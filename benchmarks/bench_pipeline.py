"""Input pipeline throughput on one CPU core, as ratios against baselines in the same run.

    .venv/bin/python -m pip install --target ../bench-pillow --no-deps pillow==12.1.1
    .venv/bin/python benchmarks/bench_pipeline.py --folder ../corpus/train --stock-pillow ../bench-pillow

Measured, images/s, one process pinned to one core, torch.set_num_threads(1):
  (a) stock: torchvision ImageFolder from files, PIL, RandomResizedCrop(224) +
      RandomHorizontalFlip + ToTensor + Normalize, as most users run it: with stock Pillow
      (``--stock-pillow DIR``, a directory holding it, put first on PYTHONPATH of a child
      process) and with the pillow-simd that effitrain installs;
  (b) effitrain: make_loader(store, train=True, workers=0) batches (crop draw, crop decode,
      uint8 resize to 224, flip, collate; normalization happens later on the device);
  (c) full-frame torchvision.io.decode_jpeg of every image, bytes already in memory;
then the DataLoader end to end with 2 workers against 1 (not pinned; the machine's cores).
Rounds alternate the pipelines so drift hits all alike; the medians are reported.
The store is built with the default ``convert`` if ``--store`` is not given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torchvision import datasets
from torchvision import transforms as T
from torchvision.io import decode_jpeg

from effitrain import jpeg
from effitrain.data import make_loader
from effitrain.store.format import Kind
from effitrain.store.prepare import ConvertOptions, default_payload
from effitrain.store.reader import Store
from effitrain.store.writer import convert

warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)


def stock(folder: Path, indices: list[int]) -> int:
    """(a): the torchvision ImageNet training recipe on files."""
    dataset = datasets.ImageFolder(
        str(folder),
        T.Compose(
            [
                T.RandomResizedCrop(224),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        ),
    )
    for i in indices:
        dataset[i]
    return len(indices)


def stock_in_child(pillow_dir: Path, folder: Path, indices: list[int], core: int) -> float:
    """(a) with the Pillow in ``pillow_dir``, in a child process pinned to ``core``."""
    env = {**os.environ, "PYTHONPATH": f"{pillow_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, __file__, "--child-stock", json.dumps([str(folder), indices, core])],
        env=env, check=True, capture_output=True, text=True,
    ).stdout.split()
    return float(out[-1])


def effitrain_batches(store: Store, images: int, epoch: int) -> int:
    """(b): effitrain's training batches, decoded in this process."""
    loader = make_loader(store, True, 64, 0, device="cpu")
    loader.set_epoch(epoch)
    n = 0
    for x, _ in loader:
        n += len(x)
        if n >= images:
            break
    return n


def process_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by the processes ``pids``."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def loader_rate(loader, epoch: int, images: int) -> tuple[float, float, float]:
    """``loader``'s wall-clock images/s from its first batch of ``epoch`` (worker start-up
    and the first batch's latency not counted) until ``images`` more, and the CPU time per
    image of its workers and of this (the main) process."""
    loader.set_epoch(epoch)
    batches = iter(loader)
    next(batches)
    workers = [w.pid for w in loader._loader._iterator._workers]  # the persistent DataLoader's workers
    start, cpu_main, cpu_workers, n = time.perf_counter(), time.process_time(), process_cpu(workers), 0
    for x, _ in batches:
        n += len(x)
        if n >= images:
            break
    wall = time.perf_counter() - start
    return n / wall, (process_cpu(workers) - cpu_workers) / n, (time.process_time() - cpu_main) / n


def full_decode(blobs: list[torch.Tensor]) -> int:
    """(c): torchvision.io full-frame JPEG decode, from memory."""
    for b in blobs:
        decode_jpeg(b)
    return len(blobs)


def rate(fn, *args, clock=time.process_time) -> float:
    """Images per second of ``clock``: CPU time for the one-core figures (other processes on
    a shared machine do not count against us), wall time for the multi-process loader."""
    start = clock()
    n = fn(*args)
    return n / (clock() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, default=Path("../corpus/train"), help="ImageFolder of JPEGs")
    p.add_argument("--store", type=Path, help="store of --folder (default: convert it into benchmarks/out/)")
    p.add_argument("--images", type=int, default=640, help="images per pipeline per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--core", type=int, default=0, help="the core to pin to")
    p.add_argument("--loader-images", type=int, default=2560, help="images per DataLoader run (0: skip)")
    p.add_argument("--stock-pillow", type=Path, help="a directory holding stock Pillow, for (a)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    p.add_argument("--child-stock", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_stock:  # (a) in a child process: print images per CPU-second
        folder, indices, core = json.loads(args.child_stock)
        os.sched_setaffinity(0, {core})
        torch.set_num_threads(1)
        import PIL

        assert "post" not in PIL.__version__, f"expected stock Pillow, got {PIL.__version__}"
        stock(Path(folder), indices[:32])  # warm-up: imports, first-call costs
        print(rate(stock, Path(folder), indices))
        return

    store_path = args.store or Path(__file__).parent / "out" / "bench_pipeline.lmdb"
    if not Path(store_path).exists():
        print(f"building {store_path} as `effitrain convert` does by default ...")
        convert(args.folder, store_path, options=ConvertOptions(payload=default_payload()), progress=False)
    store = Store(store_path)
    kinds = Counter(Kind(k).name for k in store.meta.column("kind").to_pylist())
    print(f"store {store_path}: {len(store)} images, kinds {dict(kinds)}; C JPEG extension: {jpeg.available()}")

    # Warm the page cache: every pipeline reads warm files / records.
    folder_files = sorted(str(f) for f in args.folder.rglob("*") if f.is_file())
    blobs = [torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8) for f in folder_files]
    for i in range(len(store)):
        store.raw(i)

    print(f"load average at the start: {os.getloadavg()[0]:.2f} (on {os.cpu_count()} cores)")
    loader_rates, loader_cpu = {}, {}
    if args.loader_images:  # before pinning: the workers use the machine's cores
        for workers in (1, 2):
            loader = make_loader(store, True, 64, workers, device="cpu")
            runs = [loader_rate(loader, epoch, args.loader_images) for epoch in range(3)]
            loader_rates[workers] = statistics.median(r[0] for r in runs)
            loader_cpu[workers] = tuple(statistics.median(r[k] for r in runs) for k in (1, 2))
            del loader

    os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rates: dict[str, list[float]] = {"stock": [], "effitrain": [], "decode": []}
    if args.stock_pillow:
        rates["stock-pillow"] = []
    for r in range(args.rounds):
        indices = torch.randperm(len(folder_files), generator=g)[: args.images].tolist()
        if args.stock_pillow:
            rates["stock-pillow"].append(stock_in_child(args.stock_pillow, args.folder, indices, args.core))
        rates["stock"].append(rate(stock, args.folder, indices))
        rates["effitrain"].append(rate(effitrain_batches, store, args.images, r))
        rates["decode"].append(rate(full_decode, [blobs[i] for i in indices]))
    med = {k: statistics.median(v) for k, v in rates.items()}

    print(f"load average at the end: {os.getloadavg()[0]:.2f} (on {os.cpu_count()} cores)")
    print(f"one core (core {args.core}), {args.images} images x {args.rounds} rounds, median images per CPU-second:")
    stock_key = "stock-pillow" if args.stock_pillow else "stock"
    print("  (a) stock torchvision (ImageFolder, PIL, RRC, flip, ToTensor, Normalize)")
    if args.stock_pillow:
        print(f"        with stock Pillow:                                         {med['stock-pillow']:8.0f}")
    print(f"        with pillow-simd:                                          {med['stock']:8.0f}")
    print(f"  (b) effitrain make_loader from the store (uint8 batches):      {med['effitrain']:8.0f}")
    print(f"  (c) full-frame torchvision.io.decode_jpeg from memory:          {med['decode']:8.0f}")
    print(
        f"  (b)/(a) = {med['effitrain'] / med[stock_key]:.2f}x ({stock_key}), "
        f"{med['effitrain'] / med['stock']:.2f}x (pillow-simd)   (b)/(c) = {med['effitrain'] / med['decode']:.2f}x"
    )
    if loader_rates:
        print(
            f"DataLoader end to end, {args.loader_images} images, wall clock: 1 worker {loader_rates[1]:.0f}/s, "
            f"2 workers {loader_rates[2]:.0f}/s = {loader_rates[2] / loader_rates[1]:.2f}x"
        )
        (w1, m1), (w2, m2) = loader_cpu[1], loader_cpu[2]
        # One worker runs at 1 / w1 (the main process on the other core); two workers and the
        # main process share two cores: at most 2 / (w2 + m2). For a busy shared machine.
        print(
            f"  CPU per image: workers {w1 * 1e6:.0f} / {w2 * 1e6:.0f} us, main process {m1 * 1e6:.0f} / "
            f"{m2 * 1e6:.0f} us (1 / 2 workers): on 2 idle cores, 2 workers at most "
            f"{2 * w1 / (w2 + m2):.2f}x"
        )
    if args.json:
        print(json.dumps({"median_images_per_s": med, "rounds": rates, "loader_images_per_s": loader_rates,
                          "loader_cpu_s_per_image_workers_main": loader_cpu}))


if __name__ == "__main__":
    main()
