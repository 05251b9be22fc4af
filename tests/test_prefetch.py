"""DevicePrefetcher (normalization on the device) and the device half of decode="gpu", on the
CPU and, where there is one, on a CUDA device."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DEVICES

from effitrain.data import DevicePrefetcher
from effitrain.data.decode import DecodeError
from effitrain.data.prefetch import IMAGENET_MEAN, IMAGENET_STD, EncodedBatch, decode_on_device

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def uint8_batches(n: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches like the loader's: uint8, channels_last."""
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=g).contiguous(
                memory_format=torch.channels_last
            ),
            torch.arange(4) + 4 * k,
        )
        for k in range(n)
    ]


def manual_normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


@pytest.mark.parametrize("device", DEVICES)
def test_prefetcher_output_equals_manual_normalize(device: str) -> None:
    source = uint8_batches(3)
    prefetcher = DevicePrefetcher(source, device)
    assert len(prefetcher) == 3
    out = list(prefetcher)
    assert len(out) == 3
    for (images, labels), (raw, raw_labels) in zip(out, source):
        assert images.device.type == device and labels.device.type == device
        assert images.dtype == torch.float32 and images.shape == raw.shape and images.is_contiguous()
        torch.testing.assert_close(images.cpu(), manual_normalize(raw), rtol=0, atol=1e-5)
        assert torch.equal(labels.cpu(), raw_labels)
    assert list(DevicePrefetcher([], device)) == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefetcher_channels_last_and_dtype(device: str, dtype: torch.dtype) -> None:
    (raw, _), = uint8_batches(1)
    (images, _), = DevicePrefetcher([(raw, torch.zeros(4, dtype=torch.int64))], device, dtype, True)
    assert images.dtype == dtype and images.device.type == device
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    torch.testing.assert_close(images.float().cpu(), manual_normalize(raw), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_prefetcher_gives_the_same_floats_on_every_device(device: str) -> None:
    # Subtraction and division are exactly rounded on CPU and GPU alike: equal, not close.
    source = uint8_batches(4, size=24)
    for channels_last in (False, True):
        here = [x for x, _ in DevicePrefetcher(source, device, channels_last=channels_last)]
        there = [x for x, _ in DevicePrefetcher(source, "cpu", channels_last=channels_last)]
        assert all(torch.equal(a.cpu(), b) for a, b in zip(here, there))


def jpeg_bytes(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    buf = io.BytesIO()
    Image.fromarray(pixels[:height, :width]).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def encoded_batch(chunks: list[bytes], boxes: list[tuple], size: int = 32) -> EncodedBatch:
    offsets = np.cumsum([0] + [len(c) for c in chunks])
    return EncodedBatch(
        torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8),
        torch.from_numpy(offsets),
        torch.tensor(boxes, dtype=torch.int64),
        torch.tensor([False, True] * (len(chunks) // 2)),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, 3, size, size, dtype=torch.uint8),
        torch.arange(len(chunks)),
        [f"sample {k}" for k in range(len(chunks))],
    )


@pytest.mark.parametrize("device", DEVICES)
def test_decode_on_device_cuts_resizes_and_flips(device: str) -> None:
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2.functional import resize_image

    chunks = [jpeg_bytes(60, 50, 0), jpeg_bytes(41, 70, 1)]
    boxes = [(5, 7, 30, 40), (0, 0, 70, 41)]
    images, labels = decode_on_device(encoded_batch(chunks, boxes), torch.device(device))
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1] and images.device.type == device
    for k, ((top, left, h, w), flip) in enumerate(zip(boxes, [False, True])):
        # The reference decodes the whole JPEG on the same device: nvJPEG's pixels are not
        # libjpeg's (its chroma upsampling differs, by up to ~50 levels at the sharp colour
        # edges of these block images); what is checked here is the cut, resize and flip.
        full = decode_jpeg(torch.frombuffer(bytearray(chunks[k]), dtype=torch.uint8), device=device)
        ref = resize_image(full[:, top : top + h, left : left + w], [32, 32], antialias=True)
        assert torch.equal(images[k], ref.flip(-1) if flip else ref)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_on_device_names_a_corrupt_sample(device: str) -> None:
    good = jpeg_bytes(60, 50, 0)
    batch = encoded_batch([good, good[:30] + bytes(len(good) - 30)], [(0, 0, 10, 10)] * 2)
    with pytest.raises(DecodeError, match=f"sample 1: cannot decode image on {device}"):
        decode_on_device(batch, torch.device(device))
