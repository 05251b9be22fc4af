"""``ImageFolderLMDB``: a drop-in for ``torchvision.datasets.ImageFolder`` reading a store."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from PIL import Image
from torch.utils.data import Dataset

from effitrain.store.reader import Store


def decode_rgb(payload: bytes | memoryview) -> Image.Image:
    """Decode a record's payload exactly as torchvision's default loader decodes a file."""
    with Image.open(io.BytesIO(payload)) as im:
        return im.convert("RGB")


class ImageFolderLMDB(Dataset):
    """A store seen as ``torchvision.datasets.ImageFolder`` sees its source folder.

    ``classes``, ``class_to_idx``, ``targets`` and ``samples`` ((path relative to the source
    folder, target) pairs) come from the store's metadata, without reading any image.
    ``ds[i]`` is ``(PIL RGB image, target)`` after the optional transforms; ``ds.read(i)``
    the encoded payload and label. The LMDB is opened lazily in each process (read-only,
    no locks, no readahead), so the dataset works in DataLoader workers (fork or spawn).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ) -> None:
        self.root = str(path)
        self.store = Store(path)
        self.transform = transform
        self.target_transform = target_transform
        self.classes: list[str] = self.store.classes
        self.class_to_idx: dict[str, int] = self.store.class_to_idx
        self.targets: list[int] = self.store.labels
        self.samples: list[tuple[str, int]] = list(zip(self.store.meta.column("source").to_pylist(), self.targets))
        self.imgs = self.samples  # ImageFolder's alias

    @property
    def meta(self) -> pa.Table:
        """One row per record: key, label, width, height, nbytes, kind, source."""
        return self.store.meta

    def __len__(self) -> int:
        return len(self.store)

    def read(self, index: int, copy: bool = True) -> tuple[bytes | memoryview, int]:
        """The record's encoded image bytes and its label, undecoded; copy=False: the bytes
        as a read-only view of the store's memory map instead of a copy (``Store.read``)."""
        return self.store.read(index, copy)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        record = self.store.record(index, copy=False)  # views into the map, decoded right away
        sample: Any = decode_rgb(record.payload)
        target: Any = record.label
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r}, {len(self)} images, {len(self.classes)} classes)"
