"""``run_bench``: the five stages in order, each figure measured with a progress line."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import jpeg
from ..cpus import usable_cpus
from ..progress import Progress
from ..train.config import Config, check, load_config
from .data import (BenchError, batch_work, crop_work, endless, full_decode_work, one_thread, open_data,
                   read_work)
from .report import BenchResult, header_lines
from .steps import TrainerBench, bench_env
from .timing import Rate, device_sync, measure
from .verdict import Figure, decide

WINDOWS = 5


def default_workers(cpus: int) -> list[int]:
    """1, 2, 4, ... below ``cpus``, then ``cpus``."""
    counts = [1 << k for k in range(cpus.bit_length()) if 1 << k < cpus]
    return counts + [cpus]


def parse_workers(text: str | None, cpus: int) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; None -> the default sweep."""
    if text is None:
        return default_workers(cpus)
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"--workers: expected worker counts like 1,2,4, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise BenchError(f"--workers: expected worker counts >= 1 like 1,2,4, got {text!r}")
    return sorted(set(counts))


def bench_config(config_path: str | None, overrides: tuple[str, ...], data: Path,
                 batch_size: int | None, device: str | None) -> Config:
    """The training config to bench with: ``config_path`` (or the defaults: ResNet-50,
    the ImageNet recipe) with ``--set`` overrides, DATA as its data, and the bench's
    ``--batch-size`` and ``--device``. Raises ConfigError naming a bad key."""
    extra = [f"data.train={data}", f"data.val={data}"]
    if batch_size is not None:
        extra.append(f"train.batch_size={batch_size}")
    if device is not None:
        extra.append(f"train.device={device}")
    cfg = load_config(config_path, [*overrides, *extra])
    check(cfg, check_paths=False)  # DATA is checked by open_data, with its own message
    return cfg


def run_bench(data_path: str | Path, cfg: Config, workers: list[int], seconds: float,
              windows: int = WINDOWS, progress: bool = True, config_path: str | None = None,
              on_header: Callable[[list[str]], None] = lambda lines: None) -> BenchResult:
    """Measure every stage of training from ``data_path`` with ``cfg``; see the package
    docstring for what each figure means. ``on_header`` gets the description lines
    before the measurements start."""
    if seconds <= 0 or windows < 1:
        raise BenchError(f"--seconds must be > 0 and windows >= 1, got {seconds} and {windows}")
    data = open_data(data_path)
    env = bench_env(cfg.train.device)
    cpus = usable_cpus()
    n = len(data.source)
    result = BenchResult(
        data={"path": str(data.path), "kind": data.kind, "images": n, "classes": data.num_classes},
        setup=_setup(cfg, env.device, cpus, seconds, windows, config_path),
    )
    on_header(header_lines(result.data, result.setup))
    if n < cfg.train.batch_size:
        raise BenchError(f"{data.path}: {n} images make no batch of {cfg.train.batch_size} (use --batch-size)")
    groups, numbers = 4 + len(workers), itertools.count(1)

    def run(stage: str, figures: list[tuple[str, str]], measure_them: Callable[[Callable[[int, int], None]], list[Rate]],
            workers: int | None = None) -> None:
        """Measure ``figures`` ((key, label) each) of ``stage`` together, with a progress line."""
        names = ", ".join(key.partition(".")[2] or label for key, label in figures)
        bar = Progress(f"[{next(numbers)}/{groups}] {stage}: {names}", enabled=progress)
        rates = measure_them(lambda images, nbytes: bar.update(images, nbytes))
        bar.close()
        result.figures += [Figure(stage, key, label, rate, workers) for (key, label), rate in zip(figures, rates)]

    sync = device_sync(env.device)
    warm = min(0.25 * seconds, 2.0)

    def in_turns(*works: Callable[[], tuple[int, int]], warmup_calls: int = 1) -> Callable[..., list[Rate]]:
        return lambda on_work: measure(works, seconds, windows, sync, warm, warmup_calls, on_work)

    # 1. Storage: bytes only.
    shuffled = np.random.default_rng(cfg.train.seed).permutation(n)
    run("storage", [("storage.shuffled", "read, shuffled"), ("storage.sequential", "read, sequential")],
        in_turns(read_work(data, shuffled), read_work(data, np.arange(n))))

    # 2. Decode + augment, one process on one thread like a loader worker, the loader's code.
    size, val_size, resize = cfg.data.image_size, cfg.data.val_image_size or cfg.data.image_size, cfg.data.val_resize
    with one_thread():
        run("decode", [("decode.train", f"train crop {size} px + flip, 1 process"),
                       ("decode.val", f"val resize {resize} + crop {val_size}, 1 process"),
                       ("decode.full", "full decode only (reference), 1 process")],
            in_turns(crop_work(data, True, size, resize, cfg.train.seed),
                     crop_work(data, False, val_size, resize, cfg.train.seed), full_decode_work(data, shuffled)))

    # 3. The loader, batches delivered to the device as the trainer gets them.
    trainer = TrainerBench(cfg, env, data.num_classes, steps_per_epoch=n // cfg.train.batch_size)
    for w in workers:
        with _loader_batches(trainer, w, prefetch=True) as batches:
            run("loader", [(f"loader.workers={w}", f"{_plural(w, 'worker')} -> {env.device.type}")],
                in_turns(batch_work(batches), warmup_calls=w + 1), workers=w)

    # 4. The trainer's step on a synthetic batch on the device: the compute ceiling.
    run("model", [("model.step", f"train step, synthetic batch {cfg.train.batch_size}")],
        lambda on_work: [trainer.measure(trainer.synthetic(), seconds, windows, on_batch=lambda k: on_work(k, 0))])

    # 5. End to end: the trainer's loop on its loader. Its windows are sized from the
    # slower of the two stages it combines.
    e2e_workers = cfg.data.workers
    by_key = {f.key: f.rate.median for f in result.figures}
    expected = min(by_key["model.step"], by_key.get(f"loader.workers={e2e_workers}", by_key["model.step"]))
    with _loader_batches(trainer, e2e_workers, prefetch=False) as batches:  # the loop prefetches itself
        run("end_to_end", [("end_to_end", f"training from {data.kind}, {_plural(e2e_workers, 'worker')}")],
            lambda on_work: [trainer.measure(batches, seconds, windows, expected, lambda k: on_work(k, 0))],
            workers=e2e_workers)

    result.setup["load_after"] = os.getloadavg()[0]
    result.verdict = decide(result.figures, data.kind, env.device.type, cpus)
    return result


@contextlib.contextmanager
def _loader_batches(trainer: TrainerBench, workers: int, prefetch: bool) -> Iterator[Iterator[Any]]:
    """Endless batches from the trainer's loader with ``workers`` processes (``prefetch``:
    on the device, as the trainer's loop gets them); the processes end with the block."""
    loader = trainer.loader(workers)
    batches = endless(trainer.prefetcher(loader) if prefetch else loader)
    try:
        yield batches
    finally:
        batches.close()
        del batches, loader
        gc.collect()  # drops the DataLoader, which stops its worker processes


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _setup(cfg: Config, device: torch.device, cpus: int, seconds: float, windows: int,
           config_path: str | None) -> dict[str, Any]:
    t, d = cfg.train, cfg.data
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": device.type, "device_name": name, "cpus": cpus, "torch": torch.__version__,
        "jpeg_ext": jpeg.available(), "seconds": seconds, "windows": windows,
        "load_before": os.getloadavg()[0], "load_after": None,
        "config": {
            "path": config_path, "arch": cfg.model.arch, "batch_size": t.batch_size, "accum_steps": t.accum_steps,
            "image_size": d.image_size, "amp": t.amp, "channels_last": t.channels_last, "compile": t.compile,
            "decode": d.decode, "workers": d.workers,
        },
    }
