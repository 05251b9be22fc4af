"""Training metrics: device-side sums, the per-iteration log line, TensorBoard and JSONL.

Loss and top-1/top-5 hits are summed on the device, so the loop never waits for the GPU
except once per print step, when the sums are all-reduced over ranks and read back. Step
time and data time are host clocks; between two print steps their mean is the real
throughput, because the print step's sync drains the GPU queue.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .distributed import DistEnv, all_reduce_sum

# Columns of the sum vectors.
LOSS, TOP1, TOP5, COUNT, NONFINITE = range(5)


def batch_sums(loss_sum: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[loss sum, top-1 hits, top-5 hits, images, non-finite]`` for one batch, float64 on
    the batch's device, without a host sync. ``loss_sum`` is the batch's summed loss."""
    k = min(5, logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(target[:, None])
    loss_sum = loss_sum.detach().double()
    return torch.stack([
        loss_sum,
        hits[:, 0].sum().double(),
        hits.sum().double(),
        # torch.full launches a fill; torch.tensor(n, device=cuda) would copy from pageable
        # host memory, which waits for the GPU.
        torch.full((), float(target.shape[0]), dtype=torch.float64, device=loss_sum.device),
        (~loss_sum.isfinite()).double(),
    ])


def summarize(sums: list[float]) -> dict[str, float]:
    """Mean loss and Error@1/@5 (percent) from a host copy of summed batch_sums."""
    n = max(sums[COUNT], 1.0)
    return {"loss": sums[LOSS] / n, "error1": 100.0 * (1 - sums[TOP1] / n),
            "error5": 100.0 * (1 - sums[TOP5] / n), "images": sums[COUNT]}


class MetricLogger:
    """One epoch's training metrics and its log line, in the format of the PyTorch ImageNet
    example extended with throughput and learning rate::

        Epoch: [0][430/5005]  Time 0.409 (0.405)  Data 0.002 (0.003)  Speed 626.6 (628.0) img/s  Loss 6.8381 (6.9754)  Error@1 100.000 (99.850)  Error@5 99.609 (99.259)  LR 0.1000

    Each field is its mean since the previous printed line, then (in brackets) its mean over
    the epoch so far. Speed is global (all ranks); Data is the time spent waiting for batches.
    """

    def __init__(self, env: DistEnv, epoch: int, steps: int, print_freq: int) -> None:
        self.env, self.epoch, self.steps, self.print_freq = env, epoch, steps, print_freq
        # Row 0: since the last print; row 1: the epoch so far. Columns: see batch_sums.
        self._sums = torch.zeros(2, 5, dtype=torch.float64, device=env.device)
        self._time = [0.0, 0.0]
        self._data = [0.0, 0.0]
        self._steps = [0, 0]
        self._last = time.perf_counter()

    def next_batch(self, batches: Iterator[Any]) -> Any:
        """``next(batches)``, timing the wait as data time."""
        t = time.perf_counter()
        batch = next(batches)
        wait = time.perf_counter() - t
        self._data[0] += wait
        self._data[1] += wait
        return batch

    def update(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one micro-batch (``loss`` is its mean loss); device ops only, no sync."""
        self._sums += batch_sums(loss * target.shape[0], logits, target)

    def step_done(self, i: int, lr: float, force: bool = False) -> dict[str, float] | None:
        """Close optimizer step ``i``; on print steps (and when ``force``), sync, print the
        line on rank 0 and return the figures (the same on every rank), else None.

        Every rank must pass the same ``force``: a print step is a collective.
        """
        now = time.perf_counter()
        for w in (0, 1):
            self._time[w] += now - self._last
            self._steps[w] += 1
        self._last = now
        if not (force or i % self.print_freq == 0 or i == self.steps - 1):
            return None
        # The CPU-GPU sync point of the loop: once per print step.
        win, tot = all_reduce_sum(self._sums.clone()).tolist()
        w, t = summarize(win), summarize(tot)
        out = {
            "loss": w["loss"], "loss_avg": t["loss"],
            "error1": w["error1"], "error1_avg": t["error1"],
            "error5": w["error5"], "error5_avg": t["error5"],
            "time": self._time[0] / self._steps[0], "time_avg": self._time[1] / self._steps[1],
            "data_time": self._data[0] / self._steps[0], "data_time_avg": self._data[1] / self._steps[1],
            "img_per_s": w["images"] / max(self._time[0], 1e-9), "img_per_s_avg": t["images"] / max(self._time[1], 1e-9),
            "lr": lr, "nonfinite": win[NONFINITE] + tot[NONFINITE] > 0,
        }
        self.env.print(
            f"Epoch: [{self.epoch}][{i}/{self.steps}]  Time {out['time']:.3f} ({out['time_avg']:.3f})  "
            f"Data {out['data_time']:.3f} ({out['data_time_avg']:.3f})  "
            f"Speed {out['img_per_s']:.1f} ({out['img_per_s_avg']:.1f}) img/s  "
            f"Loss {out['loss']:.4f} ({out['loss_avg']:.4f})  "
            f"Error@1 {out['error1']:.3f} ({out['error1_avg']:.3f})  "
            f"Error@5 {out['error5']:.3f} ({out['error5_avg']:.3f})  LR {lr:.4f}"
        )
        self._sums[0].zero_()
        self._time[0] = self._data[0] = 0.0
        self._steps[0] = 0
        return out


def format_val(epoch: int, stats: dict[str, float], label: str = "Val") -> str:
    """`` * Epoch 0  Val Loss 6.123  Error@1 98.120  Error@5 92.400  (1234 img/s)``"""
    return (f" * Epoch {epoch}  {label} Loss {stats['loss']:.3f}  Error@1 {stats['error1']:.3f}  "
            f"Error@5 {stats['error5']:.3f}  ({stats['img_per_s']:.0f} img/s)")


class RunLog:
    """Scalars for people (TensorBoard) and for scripts (``metrics.jsonl``), rank 0 only.

    Tags are ``<kind>/<name>``: ``train/loss``, ``train/error1``, ``train/error5``,
    ``train/img_per_s``, ``train/data_time``, ``train/lr``, ``val/loss``, ``val/error1``,
    ``val/error5`` (and ``val_ema/...`` with EMA).
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if enabled:
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir))

    def write(self, kind: str, step: int, scalars: dict[str, float], **fields: Any) -> None:
        """One JSONL record ``{"kind", "step", **fields, **scalars}`` and a TB scalar each."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"kind": kind, "step": step, **fields, **scalars}) + "\n")
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
