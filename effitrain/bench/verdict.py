"""The bench's conclusion in plain words: which stage limits training, by how much, and
what to do about it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .timing import Rate

LIMITS = ("storage", "loader", "model")


@dataclass(frozen=True)
class Figure:
    """One measured throughput of the bench."""

    stage: str  # "storage", "decode", "loader", "model" or "end_to_end"
    key: str  # unique, e.g. "storage.shuffled", "loader.workers=2"
    label: str  # for people
    rate: Rate
    workers: int | None = None  # loader processes, where the figure has any


@dataclass(frozen=True)
class Verdict:
    limit: str  # one of LIMITS: the stage that bounds end-to-end training
    factor: float  # >= 1: how much faster the other side is (data-bound: model / loader)
    text: str


def num(x: float) -> str:
    """A throughput for people: 1,234 / 56.7 / 8.91."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _workers(n: int) -> str:
    return f"{n} worker" + ("" if n == 1 else "s")


def decide(figures: Sequence[Figure], data_kind: str, device: str, cpus: int) -> Verdict:
    """The verdict from the figures of a complete bench run."""
    by_key = {f.key: f for f in figures}
    loaders = [f for f in figures if f.stage == "loader"]
    model = by_key["model.step"].rate.median
    best = max(loaders, key=lambda f: f.rate.median)
    feed = best.rate.median
    read = by_key["storage.shuffled"].rate.median
    decode = by_key["decode.train"].rate.median
    assert best.workers is not None
    # The fewest measured workers that keep up with the model step, if any do.
    enough = min((f.workers for f in loaders if f.rate.median >= model and f.workers is not None), default=None)

    if enough is not None:
        limit, factor = "model", feed / model
        text = (f"compute-bound: the model step takes {num(model)} img/s and the loader gives {num(feed)} img/s "
                f"with {_workers(best.workers)}: the loader has {factor:.1f}x headroom")
        if enough < best.workers:
            text += f" ({_workers(enough)} would keep up)"
        text += "."
    else:
        factor = model / feed
        # Per worker, the slower of reading and decoding is the cause.
        limit = "storage" if read < decode else "loader"
        per_worker = feed / max(best.workers, 1)
        need = math.ceil(model / per_worker)
        text = (f"data-bound: the loader gives {num(feed)} img/s with {_workers(best.workers)}, the model step "
                f"takes {num(model)} img/s ({factor:.1f}x more)")
        if limit == "storage":
            text += (f"; reading is the slow part: {num(read)} img/s shuffled in one process, against "
                     f"{num(decode)} img/s for decode + augment")
            text += ("; convert DATA into a store (effitrain convert)" if data_kind == "folder"
                     else "; put the store on faster storage, or on a machine with room for it in RAM")
        else:
            text += f"; each worker gives about {num(per_worker)} img/s (decode + augment alone: {num(decode)})"
        text += f"; about {need} workers would keep up"
        if need > cpus:
            text += (f", more than the {cpus} CPU cores here: "
                     + ("convert DATA into a store (its JPEGs decode only the crop), " if data_kind == "folder" else "")
                     + ("decode on the GPU (data.decode=gpu), " if device == "cuda" else "")
                     + "train at a lower resolution, or use a machine with more cores")
        text += "."

    e2e = by_key["end_to_end"]
    at_e2e = next((f.rate.median for f in loaders if f.workers == e2e.workers), feed)
    slower = min(at_e2e, model)
    text += (f" End to end, training runs at {num(e2e.rate.median)} img/s with {_workers(e2e.workers or 0)}, "
             f"{100 * e2e.rate.median / slower:.0f}% of the slower of its loader and model step")
    if device == "cpu":
        text += f" (on the CPU, the model and the loader workers share the same {cpus} cores)"
    if enough is not None and e2e.workers is not None and e2e.workers < enough:
        text += (f"; the config's {_workers(e2e.workers)} give only {num(at_e2e)} img/s: "
                 f"set data.workers={enough} to keep up with the model")
    if e2e.rate.median > 1.1 * slower:  # cannot be, unless the machine got faster meanwhile
        text += ("; faster than the slower stage: other work on this machine changed between the "
                 "measurements, rerun for steadier figures")
    return Verdict(limit, factor, text + ".")
