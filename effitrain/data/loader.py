"""Batches of uint8 images for one rank: ``make_loader`` and the ``Loader`` it returns.

    loader = make_loader("imagenet.lmdb", train=True, batch_size=256, workers=8, seed=0)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch, start_batch=k if epoch == start_epoch else 0)
        for images, labels in loader:  # uint8 [B, 3, H, W] (channels_last), int64 [B]
            ...

The work is split by batch, not by sample: the DataLoader's "sampler" hands each worker a
whole batch spec ``(epoch, sample indices)`` and the worker decodes every sample straight into
its slot of one preallocated batch. A sample's crop and flip depend only on
``(seed, epoch, index)``, and an epoch's order only on ``(seed, epoch)``; so batches do not
depend on the number of workers, and resuming at a batch gives exactly the batches the
uninterrupted epoch would have given (the skipped ones are never decoded).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..store.format import Kind, record_key
from ..store.reader import Store, is_store
from ..store.scan import scan_imagefolder
from .decode import DecodeError, decode_crop, encode_crop, resize_into
from .prefetch import EncodedBatch, decode_on_device
from .transforms import CropPlan

DECODERS = ("cpu", "gpu")
PREFETCH = 2  # batches in flight per worker (the DataLoader's prefetch_factor)


class Sample(NamedTuple):
    """One image as read from its source, before decoding."""

    kind: Kind
    data: bytes | memoryview
    index: bytes | memoryview
    width: int
    height: int
    label: int
    name: str


class StoreSource:
    """Samples of an effitrain store (any kind of record)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.labels: list[int] = store.labels

    def __len__(self) -> int:
        return len(self.store)

    def prefetch(self, indices: list[int]) -> None:
        """Start reading the records of a batch (see ``Store.prefetch``)."""
        self.store.prefetch(indices)

    def read(self, i: int) -> Sample:
        rec = self.store.record(i, copy=False)  # views into the memory map: decoded, never kept
        name = f"{self.store.path}: record {record_key(i).decode()}"
        return Sample(rec.kind, rec.payload, rec.index, rec.width, rec.height, rec.label, name)


class FolderSource:
    """Samples of a torchvision ImageFolder directory: same files, order and labels."""

    def __init__(self, root: str | os.PathLike) -> None:
        listing = scan_imagefolder(root)  # the same listing convert uses: ImageFolder's own
        self.samples: list[tuple[str, int]] = [(str(listing.root / rel), label) for rel, label in listing.samples]
        self.labels = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def prefetch(self, indices: list[int]) -> None:
        """Nothing: a file is read in one request by ``read``."""

    def read(self, i: int) -> Sample:
        path, label = self.samples[i]
        data = Path(path).read_bytes()
        try:  # the size from the header; the pixels are decoded later, once
            with Image.open(path) as im:
                width, height = im.size
        except Exception as e:
            raise DecodeError(f"{path}: cannot read image header ({type(e).__name__}: {e})") from e
        return Sample(Kind.ENCODED, data, b"", width, height, label, path)


def _empty_uint8(*shape: int) -> torch.Tensor:
    """An uninitialised uint8 tensor for a batch; a 4-d one ``[N, C, H, W]`` in channels_last
    layout (NHWC in memory).

    channels_last because the resize writes HWC pixels: copying them into a planar slot
    costs a transposition per image, about as much as the resize itself. In a worker the
    tensor is made in shared memory already, so handing it to the main process passes a
    file descriptor instead of copying it.
    """
    numel = math.prod(shape)
    if get_worker_info() is None:
        flat = torch.empty(numel, dtype=torch.uint8)
    else:
        flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(numel))
    if len(shape) == 4:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


class BufferPool:
    """Batch buffers in shared memory that each DataLoader worker reuses, for pinned batches.

    A fresh shared-memory batch costs a worker ~70 us per 224 px image (a new /dev/shm file,
    then a page fault and zeroing per 4 KiB): measured 8% of a worker's time. A buffer can be
    reused once the main process has copied the batch out of it, which the DataLoader's
    pinning thread does for CUDA anyway; on the CPU that copy would cost the main process
    more than the worker saves, so there the pool has no slots and every batch is fresh.

    Each worker has ``slots`` buffers; a flag per buffer, in memory shared with the main
    process, says which are free. A worker takes a free one and marks it busy; the main
    process marks it free when the pinned copy arrives. With none free (say, after an
    abandoned pass), the worker makes a fresh batch: reuse never waits, never overwrites.
    """

    def __init__(self, workers: int, slots: int, batch_size: int, image_size: int) -> None:
        self.shape = (batch_size, 3, image_size, image_size)
        self.free = torch.ones(max(workers, 1), slots, dtype=torch.bool).share_memory_()
        self._buffers: dict[int, torch.Tensor] = {}  # this worker's, made on first use

    def take(self, n: int) -> tuple[torch.Tensor, int]:
        """Images for a batch of ``n`` and the buffer's slot (-1: a fresh batch)."""
        info = get_worker_info()
        if info is not None:
            for slot in range(self.free.shape[1]):
                if self.free[info.id, slot]:
                    self.free[info.id, slot] = False
                    if slot not in self._buffers:
                        self._buffers[slot] = _empty_uint8(*self.shape)
                    return self._buffers[slot][:n], slot
        return _empty_uint8(n, *self.shape[1:]), -1

    def release(self, worker: int, slot: int) -> None:
        """The batch from ``worker``'s buffer ``slot`` has been copied out: reuse the buffer."""
        if slot >= 0:
            self.free[worker, slot] = True


class DecodedBatches(Dataset):
    """Batch spec -> ``(images uint8 [B, 3, S, S], labels int64 [B], worker, slot)``, decoded
    on the CPU into a buffer of ``pool`` (``worker`` and ``slot`` say which)."""

    def __init__(self, source: StoreSource | FolderSource, plan: CropPlan, pool: BufferPool) -> None:
        self.source, self.plan, self.pool = source, plan, pool

    def __getitem__(self, spec: tuple[int, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        epoch, indices = spec
        images, slot = self.pool.take(len(indices))
        labels = []
        self.source.prefetch(indices.tolist())  # in the background, while the first ones decode
        for out, i in zip(images, indices.tolist()):
            s = self.source.read(i)
            crop = self.plan(s.width, s.height, epoch, i)
            resize_into(decode_crop(s.kind, s.data, s.index, crop.box, s.name), out, crop.flip, crop.source)
            labels.append(s.label)
        info = get_worker_info()
        return images, torch.tensor(labels, dtype=torch.int64), 0 if info is None else info.id, slot


class EncodedBatches(Dataset):
    """Batch spec -> ``EncodedBatch`` for ``decode="gpu"``: each crop as the JPEG bytes that
    hold it (for a random-access JPEG, a small JPEG of the crop's MCUs) and its box in them.
    Images a GPU cannot decode (PNG, CMYK, ...) are decoded here and travel as pixels.
    Training crops only: validation's fractional boxes are resampled on the CPU."""

    def __init__(self, source: StoreSource | FolderSource, plan: CropPlan) -> None:
        if not plan.train:
            raise ValueError("decode='gpu' is for training batches; validation decodes on the CPU")
        self.source, self.plan = source, plan

    def __getitem__(self, spec: tuple[int, np.ndarray]) -> EncodedBatch:
        epoch, indices = spec
        size = self.plan.image_size
        chunks, boxes, flips, labels, names, on_cpu, cpu_crops = [], [], [], [], [], [], []
        self.source.prefetch(indices.tolist())
        for k, i in enumerate(indices.tolist()):
            s = self.source.read(i)
            box, flip, _ = self.plan(s.width, s.height, epoch, i)
            encoded = encode_crop(s.kind, s.data, s.index, box, s.name)
            if encoded is None:
                on_cpu.append(k)
                cpu_crops.append((decode_crop(s.kind, s.data, s.index, box, s.name), flip))
                encoded = (b"", (0, 0, 0, 0))
            chunks.append(encoded[0])
            boxes.append(encoded[1])
            flips.append(flip)
            labels.append(s.label)
            names.append(s.name)
        pixels = _empty_uint8(len(cpu_crops), 3, size, size)
        for slot, (crop, flip) in zip(pixels, cpu_crops):
            resize_into(crop, slot, flip)
        offsets = np.cumsum([0] + [len(c) for c in chunks])
        data = _empty_uint8(int(offsets[-1]))
        buffer = data.numpy()
        for chunk, start, end in zip(chunks, offsets.tolist(), offsets[1:].tolist()):
            buffer[start:end] = np.frombuffer(chunk, dtype=np.uint8)
        return EncodedBatch(
            data, torch.from_numpy(offsets), torch.tensor(boxes, dtype=torch.int64).view(-1, 4),
            torch.tensor(flips), torch.tensor(on_cpu, dtype=torch.int64), pixels,
            torch.tensor(labels, dtype=torch.int64), names,
        )


class EpochOrder:
    """Which samples make each batch of an epoch on one rank.

    Train: a permutation drawn from ``(seed, epoch)``, cut to a multiple of the world size and
    dealt round-robin to ranks (every rank gets as many samples), then cut into full batches.
    Val: samples in order, dealt round-robin, every sample exactly once (shards may differ by
    one sample; the last batch may be short).
    """

    def __init__(self, n: int, batch_size: int, train: bool, seed: int, rank: int, world_size: int) -> None:
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed
        self.rank, self.world_size = rank, world_size
        per_rank = n // world_size if train else len(range(rank, n, world_size))
        self.num_batches = per_rank // batch_size if train else math.ceil(per_rank / batch_size)

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for ``epoch``, in order."""
        if not self.train:
            return np.arange(self.rank, self.n, self.world_size)
        perm = np.random.default_rng((self.seed, epoch)).permutation(self.n)
        return perm[: self.n - self.n % self.world_size][self.rank :: self.world_size]

    def batches(self, epoch: int, start_batch: int = 0) -> list[tuple[int, np.ndarray]]:
        """Batch specs ``(epoch, indices)`` of ``epoch`` from batch ``start_batch`` on."""
        idx = self.indices(epoch)
        b = self.batch_size
        return [(epoch, idx[k * b : (k + 1) * b]) for k in range(start_batch, self.num_batches)]


class _Specs:
    """The DataLoader's sampler: the batch specs of the pass about to start."""

    def __init__(self) -> None:
        self.specs: list[tuple[int, np.ndarray]] = []

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


class Loader:
    """Iterable of ``(images, labels)`` batches for one rank; see ``make_loader``.

    Each complete pass advances the epoch by one; ``set_epoch`` sets it (and where the next
    pass starts) explicitly.
    """

    def __init__(
        self, batches: DecodedBatches | EncodedBatches, order: EpochOrder, workers: int, device: torch.device, pin: bool
    ) -> None:
        self.order, self.device = order, device
        self.decode = "gpu" if isinstance(batches, EncodedBatches) else "cpu"
        self.epoch, self.start_batch = 0, 0
        self._specs = _Specs()
        self._loader = DataLoader(
            batches,
            batch_size=None,  # a sampler item is a whole batch spec
            sampler=self._specs,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=PREFETCH if workers > 0 else None,
            # Pinned (in the DataLoader's pinning thread) for asynchronous copies to the GPU.
            pin_memory=pin,
        )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next pass epoch ``epoch``, starting at its batch ``start_batch`` (the
        batches before it are skipped, not decoded): how a resumed run continues exactly."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside 0..{len(self)}")
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches in a whole epoch on this rank."""
        return self.order.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self._specs.specs = self.order.batches(epoch, self.start_batch)
        self.start_batch = 0
        for batch in self._loader:
            if self.decode == "gpu":
                yield decode_on_device(batch, self.device)
                continue
            images, labels, worker, slot = batch
            # A pooled buffer's batch has been copied into pinned memory by now: hand it back.
            self._loader.dataset.pool.release(worker, slot)
            yield images, labels
        self.epoch = epoch + 1


def _world(distributed: bool, rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        return rank, world_size
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs torch.distributed initialised (run under torchrun) or rank= and world_size=")
    return dist.get_rank(), dist.get_world_size()


def make_loader(
    source: str | os.PathLike | Store,
    train: bool,
    batch_size: int,
    workers: int,
    image_size: int = 224,
    val_resize: int = 256,
    distributed: bool = False,
    seed: int = 0,
    decode: str = "cpu",
    device: str | torch.device | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> Loader:
    """Batches of ``(images uint8 [B, 3, S, S], labels int64 [B])`` from a store or an ImageFolder.

    ``images`` is in channels_last memory layout (NHWC: how the pixels are made); the
    ``DevicePrefetcher`` turns it into normalized floats on the device, in either layout.

    source: a ``Store``, a store's path, or an ImageFolder directory (decoded from its files).
    train: RandomResizedCrop + horizontal flip, shuffled, last short batch dropped; else
      Resize(val_resize) + CenterCrop(image_size), in order, every image exactly once.
    batch_size: per rank. workers: DataLoader worker processes (0: decode in this process).
    distributed: split samples across ranks (rank and world size from torch.distributed,
      or from ``rank``/``world_size`` when given).
    seed: with the epoch, fixes the order and every crop and flip.
    decode: "cpu" decodes in the workers (batches pinned when ``device`` is CUDA); "gpu" has
      workers cut each crop's JPEG bytes and decodes training batches on ``device`` (then
      the images are there already; labels stay on the CPU). Validation always decodes
      on the CPU: its exact Resize + CenterCrop is a fractional-box resample.
    device: where batches go (default: CUDA if available, else CPU).
    """
    if decode not in DECODERS:
        raise ValueError(f"decode must be one of {DECODERS}, got {decode!r}")
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size} and {workers}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(source, Store):
        src: StoreSource | FolderSource = StoreSource(source)
    elif is_store(source):
        src = StoreSource(Store(source))
    elif Path(source).is_dir():
        src = FolderSource(source)
    else:
        raise ValueError(f"{source}: neither an effitrain store nor an ImageFolder directory")
    rank, world_size = _world(distributed, rank, world_size)
    plan = CropPlan(train, image_size, val_resize, seed)
    order = EpochOrder(len(src), batch_size, train, seed, rank, world_size)
    if order.num_batches == 0:
        raise ValueError(
            f"{source}: {len(src)} images make no batch of {batch_size} on each of {world_size} rank(s)"
        )
    # Validation's Resize + CenterCrop needs a fractional-box resample, done on the CPU.
    decode = decode if train else "cpu"
    # CPU-decoded batches for a CUDA device are pinned; GPU-decoded ones are there already.
    pin = decode == "cpu" and device.type == "cuda" and torch.cuda.is_available()
    if decode == "gpu":
        batches: DecodedBatches | EncodedBatches = EncodedBatches(src, plan)
    else:
        batches = DecodedBatches(src, plan, BufferPool(workers, PREFETCH + 2 if pin else 0, batch_size, image_size))
    return Loader(batches, order, workers, device, pin)
