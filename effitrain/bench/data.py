"""The data stages of the bench: storage reads, decode + augment per image, the loader.

Each ``*_work`` function returns a ``work()`` callable for ``timing.measure``: one call does
a small chunk (a few reads or images, or one batch) and returns ``(images, bytes)``. The
decode + augment stage runs the loader itself without worker processes, so its figure is
what one worker can do at best.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.decode import decode_image
from ..data.loader import FolderSource, StoreSource, make_loader
from ..store.format import StoreError
from ..store.reader import Store, is_store
from ..store.scan import SourceError

Work = Callable[[], tuple[int, int]]


class BenchError(ValueError):
    """The bench cannot run as asked (bad DATA, bad option); the message is one line."""


@dataclass(frozen=True)
class Data:
    """What is benched: a store or an ImageFolder directory, read the way the loader reads it."""

    path: Path
    kind: str  # "store" or "folder"
    source: StoreSource | FolderSource

    @property
    def num_classes(self) -> int:
        """Classes the model's head needs (a folder's classes all hold images)."""
        if isinstance(self.source, StoreSource):
            return len(self.source.store.classes)
        return max(self.source.labels) + 1

    @property
    def loader_source(self) -> Store | Path:
        """What ``make_loader`` takes for this data."""
        return self.source.store if isinstance(self.source, StoreSource) else self.path

    def read(self, i: int) -> int:
        """Read image ``i``'s bytes as stored (a whole record, or a whole file); no decoding."""
        if isinstance(self.source, StoreSource):
            return len(self.source.store.raw(i))
        return len(Path(self.source.samples[i][0]).read_bytes())


def open_data(path: str | Path) -> Data:
    """``path`` as a store (made by ``effitrain convert``) or an ImageFolder directory."""
    path = Path(path)
    try:
        if is_store(path):
            return Data(path, "store", StoreSource(Store(path)))
        if path.is_dir():
            return Data(path, "folder", FolderSource(path))
    except StoreError as e:
        raise BenchError(str(e)) from None
    except SourceError as e:  # no class folders, or no images in them
        raise BenchError(f"not an ImageFolder directory: {e}") from None
    raise BenchError(f"{path}: no such store or ImageFolder directory")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch ops on one thread inside the block, as in a DataLoader worker (which sets it so):
    a per-process figure must not borrow the other cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _cycle(order: np.ndarray) -> Iterator[int]:
    return itertools.cycle(order.tolist())


def read_work(data: Data, order: np.ndarray, chunk: int = 64) -> Work:
    """Storage: read ``chunk`` images' bytes per call, in ``order`` (cycled), no decoding."""
    indices = _cycle(order)

    def work() -> tuple[int, int]:
        return chunk, sum(data.read(next(indices)) for _ in range(chunk))

    return work


def crop_work(data: Data, train: bool, image_size: int, val_resize: int, seed: int, chunk: int = 8) -> Work:
    """Decode + augment in this process: the loader itself with no worker processes, in
    batches of ``chunk`` (train: random crop + flip, shuffled; val: resize + center crop),
    pass after pass."""
    loader = make_loader(data.loader_source, train=train, batch_size=min(chunk, len(data.source)), workers=0,
                         image_size=image_size,
                         val_resize=val_resize, seed=seed, device="cpu")
    return batch_work(endless(loader))


def full_decode_work(data: Data, order: np.ndarray, chunk: int = 4) -> Work:
    """The reference limit: read and decode whole images (torchvision.io for JPEGs, PIL
    for other formats), no crop, no resize."""
    indices = _cycle(order)

    def work() -> tuple[int, int]:
        for _ in range(chunk):
            sample = data.source.read(next(indices))
            decode_image(sample.data, sample.name)
        return chunk, 0

    return work


def endless(batches: Iterable[Any]) -> Iterator[Any]:
    """Pass after pass over ``batches`` (a loader: each pass is the next epoch)."""
    while True:
        yield from batches


def batch_work(batches: Iterator[tuple[Any, Any]]) -> Work:
    """The loader: one batch per call (``(images, labels)``), counted by its labels."""

    def work() -> tuple[int, int]:
        _, labels = next(batches)
        return len(labels), 0

    return work
