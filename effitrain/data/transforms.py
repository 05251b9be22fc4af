"""Crop boxes for training and validation, computed from an image's size alone.

A box is ``(top, left, height, width)`` in the original image's pixels. Drawing it before
decoding lets the decoder produce only the crop (see ``decode.py``). The random draws are plain
Python on a per-sample ``random.Random`` whose seed is a pure function of
``(seed, epoch, sample index)``: a batch's content never depends on which worker made it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

Box = tuple[int, int, int, int]  # top, left, height, width
SourceBox = tuple[float, float, float, float]  # left, top, right, bottom (PIL's resize box)

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
_LOG_RATIO = (math.log(RATIO[0]), math.log(RATIO[1]))
_MASK64 = (1 << 64) - 1


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream of sample ``index`` in ``epoch``: one seed per (seed, epoch, index).

    The three numbers are packed into disjoint bit ranges of one integer (index < 2**40,
    epoch < 2**24), which ``random.Random`` hashes into its full state.
    """
    return random.Random(((seed & _MASK64) << 64) | ((epoch & 0xFFFFFF) << 40) | index)


def random_resized_crop_box(width: int, height: int, rng: random.Random) -> Box:
    """torchvision's ``RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)).get_params``.

    The same distribution, step for step: ten tries of (area fraction uniform in ``SCALE``,
    log aspect ratio uniform in log ``RATIO``), the first box that fits placed uniformly,
    else the centred crop of the whole image clamped to ``RATIO``.
    """
    area = height * width
    for _ in range(10):
        target_area = area * rng.uniform(*SCALE)
        aspect_ratio = math.exp(rng.uniform(*_LOG_RATIO))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randrange(height - h + 1), rng.randrange(width - w + 1), h, w
    return center_fallback_box(width, height)


def center_fallback_box(width: int, height: int) -> Box:
    """The box RandomResizedCrop falls back to after ten misses."""
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(width: int, height: int, image_size: int, resize: int) -> tuple[Box, SourceBox]:
    """``Resize(resize)`` then ``CenterCrop(image_size)`` as a region of the original image.

    Returns the region to decode (whole pixels) and, inside it, the fractional box
    ``(left, top, right, bottom)`` that the crop's pixels come from. Resampling that box
    straight to ``image_size`` with PIL's ``resize(box=...)`` uses the very filter taps of
    resizing the whole image and cutting: the pixels of torchvision's Resize + CenterCrop.
    The region adds the filter's reach around the box (clipped to the image).
    """
    if resize < image_size:
        raise ValueError(f"val_resize {resize} is smaller than image_size {image_size}")
    # Resize's output size: shorter side to `resize`, longer side truncated like torchvision.
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    # CenterCrop's anchor in the resized image, mapped back to the original.
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    sy, sx = height / new_h, width / new_w
    x0, y0, x1, y1 = left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy
    # A bilinear filter reaches max(scale, 1) input pixels from an output pixel's centre.
    mx, my = math.ceil(max(sx, 1.0)) + 1, math.ceil(max(sy, 1.0)) + 1
    rx0, ry0 = max(0, math.floor(x0) - mx), max(0, math.floor(y0) - my)
    rx1, ry1 = min(width, math.ceil(x1) + mx), min(height, math.ceil(y1) + my)
    return (ry0, rx0, ry1 - ry0, rx1 - rx0), (x0 - rx0, y0 - ry0, x1 - rx0, y1 - ry0)


class Crop(NamedTuple):
    """What one sample contributes: decode ``box``, resample ``source`` (all of it when
    None) to the output size, flip it if ``flip``."""

    box: Box
    flip: bool
    source: SourceBox | None = None


@dataclass(frozen=True)
class CropPlan:
    """Each sample's crop: RandomResizedCrop + flip (train) or Resize + CenterCrop (val)."""

    train: bool
    image_size: int = 224
    val_resize: int = 256
    seed: int = 0

    def __call__(self, width: int, height: int, epoch: int, index: int) -> Crop:
        """The crop of sample ``index`` (``width`` x ``height`` pixels) in ``epoch``."""
        if not self.train:
            box, source = center_crop_box(width, height, self.image_size, self.val_resize)
            return Crop(box, False, source)
        rng = sample_rng(self.seed, epoch, index)
        box = random_resized_crop_box(width, height, rng)
        return Crop(box, rng.random() < 0.5)
