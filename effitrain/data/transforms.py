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

Box = tuple[int, int, int, int]  # top, left, height, width

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


def center_crop_box(width: int, height: int, image_size: int, resize: int) -> Box:
    """``Resize(resize)`` then ``CenterCrop(image_size)`` as one box in the original image.

    Resizing the returned box to ``image_size`` x ``image_size`` gives (within rounding of the
    box to whole pixels) what torchvision's Resize + CenterCrop give.
    """
    if resize < image_size:
        raise ValueError(f"val_resize {resize} is smaller than image_size {image_size}")
    # Resize's output size: shorter side to `resize`, longer side truncated like torchvision.
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    # CenterCrop's anchor in the resized image.
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    # Map the crop's edges back to the original and round them to whole pixels.
    sy, sx = height / new_h, width / new_w
    y0, y1 = round(top * sy), round((top + image_size) * sy)
    x0, x1 = round(left * sx), round((left + image_size) * sx)
    y1, x1 = max(min(y1, height), y0 + 1), max(min(x1, width), x0 + 1)
    return y0, x0, y1 - y0, x1 - x0


@dataclass(frozen=True)
class CropPlan:
    """Each sample's crop box and flip: RandomResizedCrop + flip (train) or Resize + CenterCrop."""

    train: bool
    image_size: int = 224
    val_resize: int = 256
    seed: int = 0

    def __call__(self, width: int, height: int, epoch: int, index: int) -> tuple[Box, bool]:
        """The box and flip of sample ``index`` (``width`` x ``height`` pixels) in ``epoch``."""
        if not self.train:
            return center_crop_box(width, height, self.image_size, self.val_resize), False
        rng = sample_rng(self.seed, epoch, index)
        box = random_resized_crop_box(width, height, rng)
        return box, rng.random() < 0.5
