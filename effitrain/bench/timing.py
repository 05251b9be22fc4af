"""Honest throughput: warm-up excluded, the device synchronized before every clock read,
each figure the median of several windows with their spread.

Two ways to drive a measurement:
  * ``measure(work, ...)`` calls ``work()`` (one chunk of work: a few reads, a batch) until
    its time is up, cutting the time into windows;
  * a ``Clock`` is marked from inside a loop someone else runs (the trainer's), at step
    numbers chosen in advance with ``plan_steps``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
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
    """A throughput measured over consecutive windows of one run."""

    img_per_s: tuple[float, ...]  # one value per window
    mb_per_s: tuple[float, ...]  # one value per window; empty where no bytes were counted
    images: int  # images in all windows together
    seconds: float  # measured time, all windows together

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
    running totals of images and bytes are recorded."""

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
        img, mb = [], []
        for (t0, n0, b0), (t1, n1, b1) in zip(self.marks, self.marks[1:]):
            dt = max(t1 - t0, 1e-9)
            img.append((n1 - n0) / dt)
            mb.append((b1 - b0) / dt / 1e6)
        (t_first, n_first, _), (t_last, n_last, b_last) = self.marks[0], self.marks[-1]
        return Rate(tuple(img), tuple(mb) if b_last else (), n_last - n_first, t_last - t_first)


def measure(
    work: Callable[[], tuple[int, int]],
    seconds: float,
    windows: int,
    sync: Sync,
    warmup_s: float,
    warmup_calls: int = 1,
    on_work: Callable[[int, int], None] | None = None,
) -> Rate:
    """Throughput of ``work`` (each call returns the images and bytes it handled).

    First a warm-up of at least ``warmup_calls`` calls and ``warmup_s`` seconds, not
    counted; then ``windows`` windows of ``seconds / windows`` each (a window holds at
    least one call). ``on_work(images, nbytes)`` sees every call (a progress line).
    """
    start = time.perf_counter()
    calls = 0
    while calls < warmup_calls or time.perf_counter() - start < warmup_s:
        n, b = work()
        calls += 1
        if on_work is not None:
            on_work(n, b)
    clock = Clock(sync)
    clock.mark(0, 0)
    t0 = clock.marks[0][0]
    images = nbytes = 0
    for w in range(1, windows + 1):
        deadline = t0 + seconds * w / windows
        while True:
            n, b = work()
            images, nbytes = images + n, nbytes + b
            if on_work is not None:
                on_work(n, b)
            if time.perf_counter() >= deadline:  # host clock only: no sync per call
                break
        clock.mark(images, nbytes)
    return clock.rate()


MIN_WINDOWS = 3


def plan_steps(step_s: float, seconds: float, windows: int) -> tuple[int, int]:
    """``(windows, steps per window)`` filling about ``seconds`` with steps of ``step_s``
    seconds: at most ``windows`` windows, at least ``MIN_WINDOWS`` of one step each."""
    total = max(int(seconds / max(step_s, 1e-9)), MIN_WINDOWS)
    n = max(MIN_WINDOWS, min(windows, total))
    return n, max(1, total // n)
