"""CPU training-step throughput and the training loop's overhead (issue 3).

    .venv/bin/python benchmarks/bench_train.py --threads 1                  # generates a small store
    .venv/bin/python benchmarks/bench_train.py --threads 1 --store ../stores/corpus-train.lmdb

1. A bare training step of ``--arch`` at ``--size`` px on one synthetic batch already in
   memory (forward, loss, backward, SGD): fp32, bf16 autocast, channels_last, and
   channels_last + bf16.
2. The same step inside effitrain's loop (``train.loop.train_one_epoch``: prefetcher
   normalisation, device-side metrics, LR schedule, a log line every step), fed (a) uint8
   batches from memory and (b) the real loader reading and decoding the store with one
   worker process. Its cost is reported against the bare step of the same run.

Each figure is given twice: by this process's CPU time, which stays stable when other jobs
share the cores (use ``--threads 1``), and by the wall clock. Rounds interleave the variants;
medians are reported. Runs by hand; results go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from effitrain.data import make_loader
from effitrain.train import loop
from effitrain.train.config import Config, OptimConfig, from_dict
from effitrain.train.distributed import DistEnv
from effitrain.train.metrics import RunLog
from effitrain.train.model import create_model
from effitrain.train.optim import create_optimizer

OUT = Path(__file__).resolve().parent / "out" / "bench_train"
LABEL_SMOOTHING = 0.1


class QuietEnv(DistEnv):
    def print(self, *args: Any, **kwargs: Any) -> None:  # the bench prints its own table
        pass


CPU = QuietEnv(0, 1, 0, torch.device("cpu"))


def clocks() -> tuple[float, float]:
    """(this process's CPU seconds, wall seconds)."""
    return time.process_time(), time.perf_counter()


def rates(images: int, start: tuple[float, float], end: tuple[float, float]) -> tuple[float, float]:
    """Images/s by CPU time and by wall clock between two ``clocks()``."""
    return images / (end[0] - start[0]), images / (end[1] - start[1])


def synth_store(n: int) -> Path:
    """A store of ``n`` generated 300-500 px JPEGs (made once, kept in benchmarks/out/)."""
    from effitrain.store.prepare import ConvertOptions, default_payload
    from effitrain.store.writer import convert
    from effitrain.synth import make_imagefolder

    store = OUT / f"synth{n}.lmdb"
    if not store.exists():
        folders = make_imagefolder(OUT / f"synth{n}", train_per_class=n // 10, val_per_class=1)
        convert(folders["train"], store, options=ConvertOptions(payload=default_payload()), progress=False)
    return store


def bare_step(arch: str, batch: int, size: int, amp: bool, channels_last: bool, steps: int) -> tuple[float, float]:
    """Images/s of forward + loss + backward + SGD step on one batch already in memory: the
    loop's math (its optimizer and loss settings), none of its machinery."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model(arch, 1000).to(memory_format=fmt).train()
    opt = create_optimizer(model, OptimConfig(), batch)  # momentum 0.9, weight decay 1e-4, as in the loop
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            loss = criterion(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, oneDNN primitive selection
    start = clocks()
    for _ in range(steps):
        step()
    return rates(batch * steps, start, clocks())


class MemoryBatches:
    """Stands in for ``Loader``: the same uint8 batch again and again (no decoding)."""

    def __init__(self, batch: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.batch = (torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g),
                      torch.randint(0, 1000, (batch,), generator=g))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.batch


class Timed:
    """What ``train_one_epoch`` sees as its loader: ``steps`` batches of ``batches``, with
    both clocks read each time the loop asks for one. The loop's prefetcher pulls a batch
    ahead, so pull k + 2 happens once step k is done."""

    def __init__(self, batches: Iterator[Any], steps: int) -> None:
        self.batches, self.steps, self.marks = batches, steps, []

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.steps):
            self.marks.append(clocks())
            yield next(self.batches)
        self.marks.append(clocks())


def loop_steps(cfg: Config, state: loop.TrainState, batches: Iterator[Any], steps: int) -> tuple[float, float]:
    """Images/s of ``train_one_epoch`` on ``batches``, its first and last steps excluded."""
    timed = Timed(batches, steps)
    state.step = 0
    loop.train_one_epoch(state, torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING), timed, cfg, CPU,
                         RunLog(OUT, enabled=False, tensorboard=False), loop.StopRequest(),
                         loop.Checkpointer(OUT, cfg, CPU, []))
    # marks[2]: step 0 done; marks[-1] (pull `steps`): step steps - 2 done.
    return rates(cfg.train.batch_size * (steps - 2), timed.marks[2], timed.marks[-1])


def table(title: str, results: dict[str, list[tuple[float, float]]], base: str, vs: str) -> None:
    b_cpu, b_wall = (statistics.median(r[k] for r in results[base]) for k in (0, 1))
    print(f"\n| {title} | img/s, CPU time | img/s, wall | {vs} (CPU / wall) |")
    print("|---|---:|---:|---:|")
    for name, values in results.items():
        cpu, wall = (statistics.median(v[k] for v in values) for k in (0, 1))
        if vs == "vs fp32":
            rel = f"{cpu / b_cpu:.2f}x / {wall / b_wall:.2f}x"
        else:
            rel = f"{100 * (b_cpu / cpu - 1):+.1f}% / {100 * (b_wall / wall - 1):+.1f}%"
        print(f"| {name} | {cpu:.2f} | {wall:.2f} | {rel} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, help="a store to read in the end-to-end variant [default: generated]")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch compute threads [default: torch's, one per core]")
    p.add_argument("--skip-precision", action="store_true", help="only the loop-overhead part")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.arch} at {args.size} px, "
          f"batch {args.batch}", file=sys.stderr)

    if not args.skip_precision:
        variants = {"fp32": (False, False), "bf16 autocast": (True, False), "channels_last fp32": (False, True),
                    "channels_last + bf16": (True, True)}
        step_results: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for r in range(args.rounds):
            for name, (amp, cl) in variants.items():
                step_results[name].append(bare_step(args.arch, args.batch, args.size, amp, cl, args.steps))
                print(f"round {r} {name}: {step_results[name][-1][0]:.2f} img/s CPU, "
                      f"{step_results[name][-1][1]:.2f} wall", file=sys.stderr)
        table(f"bare training step, {args.arch} {args.size} px, batch {args.batch}", step_results, "fp32", "vs fp32")

    store = args.store or synth_store(400)
    cfg = from_dict({
        "data": {"train": str(store), "val": str(store), "workers": 1, "image_size": args.size},
        "model": {"arch": args.arch},
        "train": {"batch_size": args.batch, "amp": "bf16", "channels_last": True, "device": "cpu", "epochs": 1},
        "optim": {"warmup_epochs": 0},
        "log": {"print_freq": 1, "run_dir": str(OUT / "run")},  # a line every step: the worst case
        "checkpoint": {"every_minutes": 0},
    })
    steps = args.steps + 2  # the first and last steps are not timed
    state = loop.create_state(cfg, CPU, 1000, steps_per_epoch=10_000)
    store_loader = make_loader(store, train=True, batch_size=args.batch, workers=1, image_size=args.size)
    if len(store_loader) < steps * args.rounds:
        raise SystemExit(f"{store}: too few images for {args.rounds} rounds of {steps} batches of {args.batch}")
    from_store = iter(store_loader)  # one pass over all rounds: the worker starts once
    from_memory = iter(MemoryBatches(args.batch, args.size))
    loop_results: dict[str, list[tuple[float, float]]] = {
        "bare step, synthetic batch in memory": [], "effitrain loop, uint8 batches from memory": [],
        "effitrain loop, store + loader (1 worker)": []}
    for r in range(args.rounds):
        bare, memory, e2e = loop_results.values()
        bare.append(bare_step(args.arch, args.batch, args.size, True, True, args.steps))
        memory.append(loop_steps(cfg, state, from_memory, steps))
        e2e.append(loop_steps(cfg, state, from_store, steps))
        print(f"round {r}: bare {bare[-1][0]:.2f}, loop+memory {memory[-1][0]:.2f}, loop+store {e2e[-1][0]:.2f} "
              "img/s CPU", file=sys.stderr)
    table(f"channels_last + bf16, batch {args.batch}", loop_results, "bare step, synthetic batch in memory",
          "overhead vs bare step")


if __name__ == "__main__":
    main()
