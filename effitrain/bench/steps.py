"""The compute stages of the bench, run by the trainer's own loop.

Nothing here is a second training step: ``TrainerBench`` builds the model, optimizer,
scheduler and scaler as ``effitrain train`` does and drives ``train.loop.train_one_epoch``
for a planned number of steps, on synthetic batches already on the device (the compute
ceiling) or on the trainer's loader (end to end). The clock is read, after a device
synchronize, from inside the batch iterator the loop pulls from: the loop asks for a step's
first batch only once the previous step (backward, optimizer, log) has been queued, so a
mark there closes that step.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.loader import Loader
from ..train import loop
from ..train.config import Config
from ..train.distributed import DistEnv
from ..train.metrics import RunLog
from .data import BenchError
from .timing import Clock, Rate, device_sync, plan_steps

CALIBRATION_STEPS = 3  # a first step (set-up, cuDNN autotuning), one timed step, one more


@dataclass(frozen=True)
class QuietEnv(DistEnv):
    """A single-process environment whose trainer log lines are not printed: the bench has
    its own output."""

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


def bench_env(device: str) -> QuietEnv:
    """One process on ``device`` ("auto": CUDA if available, else CPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available here")
    if use_cuda:
        torch.cuda.set_device(0)
    return QuietEnv(0, 1, 0, torch.device("cuda", 0) if use_cuda else torch.device("cpu"))


class _Metered:
    """What the loop sees as its loader: ``n`` batches from ``batches``, with a clock mark
    at the pulls listed in ``marks`` (pull index -> images trained by then). The pull after
    the last batch (the one that ends the loop's prefetcher) may be marked too."""

    def __init__(self, batches: Iterator[Any], n: int, marks: dict[int, int], clock: Clock,
                 on_batch: Callable[[int], None]) -> None:
        self.batches, self.n, self.marks, self.clock, self.on_batch = batches, n, marks, clock, on_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Ignored: ``batches`` runs its own epochs."""

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Any]:
        for j in range(self.n + 1):
            if j in self.marks:
                self.clock.mark(self.marks[j])
            if j == self.n:
                return
            batch = next(self.batches)
            self.on_batch(len(batch[1]))
            yield batch


class TrainerBench:
    """The trainer set up from ``cfg`` as ``effitrain train`` sets it up (seed, backends,
    model, optimizer, schedule, scaler, EMA), never writing a checkpoint or a log."""

    def __init__(self, cfg: Config, env: DistEnv, num_classes: int, steps_per_epoch: int) -> None:
        cfg = copy.deepcopy(cfg)
        cfg.checkpoint.every_minutes = 0  # no timed checkpoints
        cfg.train.max_steps = 0  # the bench decides the number of steps
        self.cfg, self.env = cfg, env
        self.image_size = cfg.data.image_size
        self.micro_batch = cfg.train.batch_size // cfg.train.accum_steps
        self.sync = device_sync(env.device)
        loop.seed_all(cfg.train.seed)
        loop.set_backends(cfg, env)
        self.state = loop.create_state(cfg, env, num_classes, max(1, steps_per_epoch))
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        self.num_classes = num_classes

    def loader(self, workers: int) -> Loader:
        """The trainer's training loader with ``workers`` worker processes."""
        cfg = copy.deepcopy(self.cfg)
        cfg.data.workers = workers
        return loop.build_loader(cfg, self.env, train=True, image_size=self.image_size)

    def prefetcher(self, loader: Loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``loader``'s batches as the trainer's loop gets them: on the device, normalized,
        in the config's dtype and memory format."""
        return loop.prefetcher(loader, self.cfg, self.env)

    def synthetic(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One random uint8 batch (and labels) already on the device, forever."""
        g = torch.Generator().manual_seed(0)
        size = self.image_size
        images = torch.randint(0, 256, (self.micro_batch, 3, size, size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, self.num_classes, (self.micro_batch,), generator=g)
        return itertools.repeat((images.to(self.env.device), labels.to(self.env.device)))

    def measure(self, batches: Iterator[Any], seconds: float, windows: int, expected: float | None = None,
                on_batch: Callable[[int], None] = lambda n: None) -> Rate:
        """Images/s of the trainer's steps on ``batches``, in windows sized from the
        ``expected`` img/s, or else from a calibration run (its first step not timed). The
        measured run's first step is not timed either (a loader restarts its pass there)."""
        if expected is None:
            expected = self._run(batches, CALIBRATION_STEPS, [1, 2], on_batch).rate().median
        n, k = plan_steps(self.cfg.train.batch_size / expected, seconds, windows)
        return self._run(batches, 2 + n * k, [1 + w * k for w in range(n + 1)], on_batch).rate()

    def _run(self, batches: Iterator[Any], steps: int, mark_steps: list[int],
             on_batch: Callable[[int], None]) -> Clock:
        """``steps`` optimizer steps of the trainer's loop; a clock mark once each step in
        ``mark_steps`` (1 <= g < steps) steps are done."""
        accum = self.cfg.train.accum_steps
        clock = Clock(self.sync)
        # The loop asks for step g's first micro-batch (g * accum) once steps 0..g-1 are
        # done, and its prefetcher then pulls the one after it: g * accum + 1.
        marks = {g * accum + 1: g * self.cfg.train.batch_size for g in mark_steps}
        metered = _Metered(batches, steps * accum, marks, clock, on_batch)
        self.state.step = 0
        try:
            loop.train_one_epoch(self.state, self.criterion, metered, self.cfg, self.env,
                                 RunLog(Path("."), enabled=False, tensorboard=False), loop.StopRequest(),
                                 loop.Checkpointer(Path(self.cfg.log.run_dir), self.cfg, self.env, []))
        except loop.NonFiniteLoss as e:
            raise BenchError(f"model step: {e} (try --set train.amp=bf16 or a lower optim.lr)") from None
        return clock
