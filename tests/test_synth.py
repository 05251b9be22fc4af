"""effitrain.synth: a deterministic, learnable ImageFolder of real JPEG files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from effitrain.synth import CLASSES, class_names, make_imagefolder


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "a"
    make_imagefolder(root, num_classes=10, train_per_class=6, val_per_class=3, min_size=40, max_size=80, seed=7)
    return root


def test_layout_is_an_imagefolder_of_jpegs(small: Path) -> None:
    for split, per_class in (("train", 6), ("val", 3)):
        ds = ImageFolder(str(small / split))
        assert ds.classes == class_names(10) == sorted(class_names(10))
        assert len(ds) == 10 * per_class
        assert sorted(ds.targets) == [c for c in range(10) for _ in range(per_class)]
        for path, _ in ds.samples:
            with Image.open(path) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert 40 <= max(im.size) <= 80
                assert 3 / 4 - 0.05 <= im.size[0] / im.size[1] <= 4 / 3 + 0.05


def test_same_seed_same_bytes_other_seed_other_images(small: Path, tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "b", num_classes=10, train_per_class=6, val_per_class=3, min_size=40, max_size=80, seed=7)
    assert tree_digest(tmp_path / "b") == tree_digest(small)
    make_imagefolder(tmp_path / "c", num_classes=10, train_per_class=6, val_per_class=3, min_size=40, max_size=80, seed=8)
    other = tree_digest(tmp_path / "c")
    assert other.keys() == tree_digest(small).keys()
    assert not set(other.values()) & set(tree_digest(small).values())


def test_train_and_val_images_differ(small: Path) -> None:
    train = set(tree_digest(small / "train").values())
    val = set(tree_digest(small / "val").values())
    assert len(train) == 60 and len(val) == 30 and not train & val


def test_class_colour_is_a_learnable_signal(small: Path) -> None:
    """The most saturated pixels of an image carry its class's hue: a nearest-hue rule
    (no learning at all) already beats chance by far, so a network has something to learn."""
    ds = ImageFolder(str(small / "val"))
    hits = 0
    for path, label in ds.samples:
        hsv = np.asarray(Image.open(path).convert("HSV"), dtype=np.float32)
        sat = hsv[..., 1].reshape(-1)
        hue = hsv[..., 0].reshape(-1)[sat >= np.quantile(sat, 0.9)] * 360 / 255
        angle = np.angle(np.exp(1j * np.deg2rad(hue)).mean(), deg=True) % 360
        dist = [abs((angle - h + 180) % 360 - 180) for _, h in CLASSES]
        hits += int(np.argmin(dist)) == label
    assert hits / len(ds) > 0.6  # chance: 0.1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        make_imagefolder("unused", num_classes=11)
    with pytest.raises(ValueError, match="min_size"):
        make_imagefolder("unused", min_size=100, max_size=50)
