"""ImageFolderLMDB: a drop-in for ImageFolder, in DataLoader workers under fork and spawn."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

from effitrain.data import ImageFolderLMDB

TRANSFORM = transforms.Compose([transforms.Resize((16, 16)), transforms.PILToTensor()])


def test_mirrors_imagefolder(image_store: Path, image_folder: Path) -> None:
    ds, ref = ImageFolderLMDB(image_store), ImageFolder(str(image_folder))
    assert (ds.classes, ds.class_to_idx, ds.targets) == (ref.classes, ref.class_to_idx, ref.targets)
    assert [s for s, _ in ds.samples] == [Path(p).relative_to(image_folder).as_posix() for p, _ in ref.samples]
    assert ds.imgs == ds.samples and len(ds) == len(ref)
    payload, label = ds.read(3)
    assert payload == Path(ref.samples[3][0]).read_bytes() and label == ref.targets[3]
    assert ds.meta.num_rows == len(ds) and ds.meta.column("source").to_pylist() == [s for s, _ in ds.samples]
    img, target = ds[-1]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and target == ref.targets[-1]


def test_transforms_are_applied(image_store: Path, image_folder: Path) -> None:
    ds = ImageFolderLMDB(image_store, transform=TRANSFORM, target_transform=lambda t: t + 100)
    ref = ImageFolder(str(image_folder), transform=TRANSFORM, target_transform=lambda t: t + 100)
    for i in (0, 5, len(ds) - 1):
        assert torch.equal(ds[i][0], ref[i][0]) and ds[i][1] == ref[i][1]


def test_pickles_without_an_open_environment(image_store: Path) -> None:
    ds = ImageFolderLMDB(image_store)
    ds.read(0)  # opens the LMDB in this process
    # What DataLoader does with spawn (IPC, not a data file); an LMDB handle cannot be pickled.
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.read(1) == ds.read(1) and clone.targets == ds.targets and clone.classes == ds.classes


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_workers(image_store: Path, image_folder: Path, start_method: str) -> None:
    ds = ImageFolderLMDB(image_store, transform=TRANSFORM)
    ds.read(0)  # an environment opened in the parent must not leak into forked workers,
    ds.store.prefetch(list(range(len(ds))))  # nor its prefetch threads (a child has none to wait for)
    loader = DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context=start_method,
                        persistent_workers=False)
    images, targets = zip(*loader)
    got = torch.cat(images)
    ref = ImageFolder(str(image_folder), transform=TRANSFORM)
    want = torch.stack([ref[i][0] for i in range(len(ref))])
    assert torch.equal(got, want) and torch.cat(targets).tolist() == ref.targets
    assert np.asarray(got).dtype == np.uint8


def test_prefetch_reads_ahead_in_threads(image_store: Path, image_folder: Path) -> None:
    ds, ref = ImageFolderLMDB(image_store), ImageFolder(str(image_folder))
    ds.store.prefetch(list(range(len(ds))))
    ds.store.close()  # waits for the threads: none may be inside the map when it is unmapped
    ds.store.prefetch(list(reversed(range(len(ds)))))  # reopens in this process
    assert [ds.read(i)[0] for i in range(len(ds))] == [Path(path).read_bytes() for path, _ in ref.samples]
    with pytest.raises(IndexError):
        ds.store.prefetch([len(ds)])
