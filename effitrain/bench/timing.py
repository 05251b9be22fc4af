"""Honest throughput: warm-up excluded, the device synchronized before every clock read,
each figure the median of several windows with their spread.

Two ways to drive a measurement:
  * ``measure(works, ...)`` calls each ``work()`` (one chunk of work: a few reads, a batch)
    in turns, a window each per round, until the time is up;
  * a ``Clock`` is marked from inside a loop someone else runs (the trainer's), at step
    numbers chosen in advance with ``plan_steps``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Sync = Callable[[], None]


def device_sync(device: torch.device) -> Sync:
    """What to call before reading a clock: wait for queued device work (CUDA), or nothing."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass(frozen=True)
class Rate:
    """A throughput measured in several windows of one run."""

    img_per_s: tuple[float, ...]  # one value per window
    mb_per_s: tuple[float, ...]  # one value per window; empty where no bytes were counted
    images: int  # images in all windows together
    seconds: float  # measured time, all windows together

    @classmethod
    def of(cls, windows: list[tuple[float, int, int]]) -> Rate:
        """From ``(seconds, images, bytes)`` of each window."""
        img = tuple(n / max(dt, 1e-9) for dt, n, _ in windows)
        mb = tuple(b / max(dt, 1e-9) / 1e6 for dt, _, b in windows)
        counted_bytes = any(b for _, _, b in windows)
        return cls(img, mb if counted_bytes else (), sum(n for _, n, _ in windows), sum(dt for dt, _, _ in windows))

    @property
    def median(self) -> float:
        return statistics.median(self.img_per_s)

    @property
    def low(self) -> float:
        return min(self.img_per_s)

    @property
    def high(self) -> float:
        return max(self.img_per_s)

    @property
    def mb_median(self) -> float | None:
        return statistics.median(self.mb_per_s) if self.mb_per_s else None


class Clock:
    """Window boundaries: at each ``mark``, the device is synchronized, then the time and the
    running totals of images and bytes are recorded; each two consecutive marks make a window."""

    def __init__(self, sync: Sync) -> None:
        self.sync = sync
        self.marks: list[tuple[float, int, int]] = []

    def mark(self, images: int, nbytes: int = 0) -> None:
        self.sync()  # queued device work belongs to the window that queued it
        self.marks.append((time.perf_counter(), images, nbytes))

    def rate(self) -> Rate:
        """The windows between consecutive marks (at least two marks)."""
        if len(self.marks) < 2:
            raise ValueError("a rate needs at least two clock marks")
        return Rate.of([(t1 - t0, n1 - n0, b1 - b0) for (t0, n0, b0), (t1, n1, b1) in zip(self.marks, self.marks[1:])])


def measure(
    works: Sequence[Callable[[], tuple[int, int]]],
    seconds: float,
    windows: int,
    sync: Sync,
    warmup_s: float,
    warmup_calls: int = 1,
    on_work: Callable[[int, int], None] | None = None,
) -> list[Rate]:
    """Throughput of each of ``works`` (each call returns the images and bytes it handled).

    First a warm-up of each, at least ``warmup_calls`` calls and ``warmup_s`` seconds, not
    counted. Then ``windows`` rounds, each giving every work one window of ``seconds /
    windows`` (at least one call): measured in turns, the works see the same changes of
    load on the machine, so their ratios hold even where absolute figures drift.
    ``on_work(images, nbytes)`` sees every call (a progress line).
    """

    def call(work: Callable[[], tuple[int, int]]) -> tuple[int, int]:
        n, b = work()
        if on_work is not None:
            on_work(n, b)
        return n, b

    for work in works:
        start, calls = time.perf_counter(), 0
        while calls < warmup_calls or time.perf_counter() - start < warmup_s:
            call(work)
            calls += 1
    found: list[list[tuple[float, int, int]]] = [[] for _ in works]
    share = seconds / windows
    for _ in range(windows):
        for work, out in zip(works, found):
            sync()  # nothing queued before the window counts in it
            t0 = time.perf_counter()
            images = nbytes = 0
            while True:
                n, b = call(work)
                images, nbytes = images + n, nbytes + b
                if time.perf_counter() - t0 >= share:  # host clock only: no sync per call
                    break
            sync()
            out.append((time.perf_counter() - t0, images, nbytes))
    return [Rate.of(w) for w in found]


MIN_WINDOWS = 3


def plan_steps(step_s: float, seconds: float, windows: int) -> tuple[int, int]:
    """``(windows, steps per window)`` filling about ``seconds`` with steps of ``step_s``
    seconds: at most ``windows`` windows, at least ``MIN_WINDOWS`` of one step each."""
    total = max(int(seconds / max(step_s, 1e-9)), MIN_WINDOWS)
    n = max(MIN_WINDOWS, min(windows, total))
    return n, max(1, total // n)
