"""Shared fixtures: generated image folders (every odd format ImageNet-like data holds) and
a store converted from one. Nothing is downloaded; every image is a function of its name.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

# The device code paths run on the CPU everywhere and, where a CUDA device exists (a GPU
# machine; never CI), on it too: the same tests, parametrised.
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def picture(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth RGB picture with some noise: decodes like a photo, not like a flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.3, size=3)
    freq = rng.uniform(0.05, 0.3, size=3)
    rgb = np.stack([127 + 100 * np.sin(freq[c] * x + phase[c] + 0.7 * freq[c] * y) for c in range(3)], axis=-1)
    rgb += rng.normal(0, 12, size=rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def encode(kind: str, seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """Bytes of one image of the given ``kind`` (format and mode), ``size`` = (width, height)."""
    rgb = Image.fromarray(picture(*size, seed))
    out = io.BytesIO()
    if kind == "jpeg":
        rgb.save(out, "JPEG", quality=90)
    elif kind == "jpeg-progressive":
        rgb.save(out, "JPEG", quality=85, progressive=True)
    elif kind == "jpeg-444":
        rgb.save(out, "JPEG", quality=95, subsampling=0)
    elif kind == "jpeg-gray":
        rgb.convert("L").save(out, "JPEG", quality=90)
    elif kind == "jpeg-cmyk":
        rgb.convert("CMYK").save(out, "JPEG", quality=90)
    elif kind in ("png", "png-as-jpeg"):
        rgb.save(out, "PNG")
    elif kind == "png-rgba":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.fromarray(picture(*size, seed + 1)[..., 0]))
        rgba.save(out, "PNG")
    elif kind == "png-palette":
        rgb.quantize(colors=32).save(out, "PNG")
    elif kind == "png-16bit":
        gray16 = (picture(*size, seed)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
        Image.fromarray(gray16).save(out, "PNG")
    elif kind == "bmp":
        rgb.save(out, "BMP")
    elif kind == "tiff":
        rgb.save(out, "TIFF")
    elif kind == "webp":
        rgb.save(out, "WEBP", lossless=True)
    elif kind == "ppm":
        rgb.save(out, "PPM")
    elif kind == "pgm":
        rgb.convert("L").save(out, "PPM")
    else:
        raise ValueError(kind)
    return out.getvalue()


# (kind, file extension). WEBP only where this PIL was built with libwebp (make venv installs it).
ODD_KINDS = [
    ("jpeg", ".jpg"), ("jpeg-progressive", ".jpeg"), ("jpeg-444", ".JPEG"), ("jpeg-gray", ".jpg"),
    ("jpeg-cmyk", ".jpg"), ("png", ".png"), ("png-as-jpeg", ".JPEG"), ("png-rgba", ".png"),
    ("png-palette", ".png"), ("png-16bit", ".png"), ("bmp", ".bmp"), ("tiff", ".tif"),
    ("ppm", ".ppm"), ("pgm", ".pgm"),
] + ([("webp", ".webp")] if features.check("webp") else [])


def write_image_folder(root: Path, classes: tuple[str, ...] = ("ant", "bee", "cat"), per_class: int = 6) -> Path:
    """An ImageFolder tree with every kind of ``ODD_KINDS`` spread over the classes, a nested
    sub-folder, differing sizes and files ImageFolder ignores (wrong extension)."""
    root.mkdir(parents=True)
    n = 0
    for c, name in enumerate(classes):
        (root / name).mkdir()
        for i in range(per_class):
            kind, ext = ODD_KINDS[n % len(ODD_KINDS)]
            sub = root / name / ("nested" if i == per_class - 1 else "")
            sub.mkdir(exist_ok=True)
            size = (24 + 7 * (n % 5), 20 + 5 * (n % 4))
            (sub / f"{name}_{i:03d}{ext}").write_bytes(encode(kind, seed=n, size=size))
            n += 1
        (root / name / "notes.txt").write_text("not an image\n")
    return root


def crc_of_tree(root: Path) -> int:
    """A CRC of every file's name and bytes: proves a fixture was not modified by a test."""
    crc = 0
    for path in sorted(root.rglob("*")):
        if path.is_file():
            crc = zlib.crc32(path.read_bytes(), zlib.crc32(str(path.relative_to(root)).encode(), crc))
    return crc


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only ImageFolder tree of mixed formats (3 classes, every kind of ``ODD_KINDS``)."""
    return write_image_folder(tmp_path_factory.mktemp("src") / "folder")


@pytest.fixture(scope="session")
def image_store(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only store converted (``--keep-bytes``) from ``image_folder``."""
    from effitrain.store.prepare import ConvertOptions
    from effitrain.store.writer import convert

    out = tmp_path_factory.mktemp("store") / "folder.lmdb"
    convert(image_folder, out, options=ConvertOptions(payload="keep"), workers=0, progress=False)
    return out
