"""Crop boxes: the RandomResizedCrop distribution of torchvision, drawn without decoding."""

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from effitrain.data.transforms import (
    RATIO,
    SCALE,
    Crop,
    CropPlan,
    center_crop_box,
    center_fallback_box,
    random_resized_crop_box,
    sample_rng,
)

N = 3000


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two CDFs."""
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


# Critical value of the two-sample KS test at alpha = 0.001 for N and N draws.
KS_CRITICAL = 1.95 * np.sqrt(2 / N)


def features(boxes: np.ndarray, width: int, height: int) -> dict[str, np.ndarray]:
    top, left, h, w = boxes.T
    return {
        "area fraction": h * w / (width * height),
        "aspect ratio": w / h,
        "top": top,
        "left": left,
    }


@pytest.mark.parametrize("width,height", [(500, 375), (224, 224), (640, 160)])
def test_box_distribution_matches_torchvision(width: int, height: int) -> None:
    torch.manual_seed(0)
    image = torch.empty(1, height, width, dtype=torch.uint8)
    theirs = np.array([T.RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(N)])
    ours = np.array([random_resized_crop_box(width, height, sample_rng(1, 0, i)) for i in range(N)])
    assert (ours[:, 2] + ours[:, 0] <= height).all() and (ours[:, 3] + ours[:, 1] <= width).all()
    assert (ours >= 0).all() and (ours[:, 2:] > 0).all()
    f_ours, f_theirs = features(ours, width, height), features(theirs, width, height)
    for name in f_ours:
        d = ks_statistic(f_ours[name], f_theirs[name])
        assert d < KS_CRITICAL, f"{name}: KS statistic {d:.3f} >= {KS_CRITICAL:.3f} at {width}x{height}"
    # How often the ten tries all miss (the centred fallback): 640x160 misses often.
    fallback = center_fallback_box(width, height)
    rate_ours = np.mean([tuple(b) == fallback for b in ours])
    rate_theirs = np.mean([tuple(b) == fallback for b in theirs])
    assert abs(rate_ours - rate_theirs) < 4 * np.sqrt(max(rate_theirs, 1 / N) / N)


@pytest.mark.parametrize("width,height", [(1000, 10), (10, 1000), (90, 100)])
def test_fallback_box_is_torchvisions(width: int, height: int) -> None:
    # Ten misses are certain for 1000x10 and 10x1000; for 90x100 compare the helper directly.
    image = torch.empty(1, height, width, dtype=torch.uint8)
    fallback = center_fallback_box(width, height)
    if width * height != 9000:
        assert random_resized_crop_box(width, height, sample_rng(0, 0, 0)) == fallback
        assert T.RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) == fallback
    else:
        assert fallback == (0, 0, 100, 90)  # aspect 0.9 is within RATIO: the whole image


def test_sample_randomness_is_a_function_of_seed_epoch_index() -> None:
    plan = CropPlan(train=True, seed=3)
    assert plan(500, 375, 2, 17) == plan(500, 375, 2, 17)
    draws = {plan(500, 375, e, i) for e in range(3) for i in range(50)}
    assert len(draws) == 150  # no two (epoch, index) pairs share a crop
    assert CropPlan(train=True, seed=4)(500, 375, 2, 17) != plan(500, 375, 2, 17)
    flips = [plan(500, 375, 0, i)[1] for i in range(2000)]
    assert 0.45 < np.mean(flips) < 0.55


@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (256, 256), (1000, 300), (180, 120)])
def test_center_crop_box_is_resize_then_center_crop(width: int, height: int) -> None:
    (top, left, h, w), (x0, y0, x1, y1) = center_crop_box(width, height, 224, 256)
    # Resize(256) scales by 256 / shorter side: the 224 crop spans 224/256 of the shorter side,
    # centred like CenterCrop's anchor (rounded in the resized image: within a resized pixel).
    scale = min(width, height) / 256
    assert x1 - x0 == pytest.approx(224 * scale, rel=0.01) and y1 - y0 == pytest.approx(224 * scale, rel=0.01)
    cx, cy = left + (x0 + x1) / 2, top + (y0 + y1) / 2
    assert abs(cx - width / 2) <= scale and abs(cy - height / 2) <= scale
    # The region to decode holds the box and the filter's reach around it, within the image.
    assert 0 <= top and 0 <= left and top + h <= height and left + w <= width
    assert x0 >= min(left, 1) and y0 >= min(top, 1) and x1 <= w and y1 <= h
    assert CropPlan(train=False)(width, height, 5, 7) == Crop((top, left, h, w), False, (x0, y0, x1, y1))


def test_val_resize_smaller_than_image_size_is_an_error() -> None:
    with pytest.raises(ValueError, match="val_resize 200 is smaller than image_size 224"):
        center_crop_box(500, 375, 224, 200)
