"""Decoding one image into its batch slot: fallback decoders, crops, resize, flip, errors."""

import io

import numpy as np
import pytest
import torch
from conftest import ODD_KINDS, encode, picture
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from effitrain.data import decode
from effitrain.data.decode import (
    DecodeError,
    decode_crop,
    decode_image,
    device_decodable_jpeg,
    resize_into,
    resize_via_float,
)
from effitrain.data.transforms import CropPlan
from effitrain.store.format import Kind

# torchvision 0.29 deprecates torchvision.io decoding in favour of TorchCodec; we use it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(params=["C extension", "fallback"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with effitrain's C decoder (where built) and with the fallback decoders."""
    if request.param == "fallback":
        monkeypatch.setattr(decode.jpeg, "available", lambda: False)
    return request.param


def pil_rgb(data: bytes) -> np.ndarray:
    """What torchvision's ImageFolder sees: PIL's convert("RGB")."""
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


SIZE = (123, 97)  # width, height: not a multiple of any MCU
KINDS = [kind for kind, _ in ODD_KINDS]


def jpeg_bytes(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture(width, height, seed)).save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.mark.parametrize("kind", KINDS)
def test_decoders_give_pil_convert_rgb(kind: str) -> None:
    data = encode(kind, seed=3, size=SIZE)
    image = decode_image(memoryview(data), "x")  # the decoder used without the C extension
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE[1], SIZE[0])
    np.testing.assert_array_equal(hwc(image), pil_rgb(data))
    crop = decode_crop(Kind.ENCODED, memoryview(data), b"", (3, 5, 90, 110), "x")  # with it, if built
    np.testing.assert_array_equal(hwc(crop), pil_rgb(data)[3:93, 5:115])


def test_crop_box_outside_the_image_is_an_error(decoder: str) -> None:
    with pytest.raises(DecodeError, match="^x: .*123x97"):
        decode_crop(Kind.ENCODED, encode("jpeg", seed=0, size=SIZE), b"", (50, 0, 50, 10), "x")


@pytest.mark.parametrize("flip", [False, True])
def test_train_sample_equals_torchvision_pil_pipeline(flip: bool, decoder: str) -> None:
    """Same box, same flip: RandomResizedCrop's resized_crop + hflip on PIL give the same pixels."""
    data = jpeg_bytes(500, 375, 1)
    out = torch.empty(3, 224, 224, dtype=torch.uint8)
    for index in range(6):
        box = CropPlan(train=True)(500, 375, 0, index).box
        resize_into(decode_crop(Kind.ENCODED, data, b"", box, "x"), out, flip)
        ref = TF.resized_crop(Image.open(io.BytesIO(data)).convert("RGB"), *box, [224, 224])
        ref = np.array(TF.hflip(ref) if flip else ref)
        diff = np.abs(hwc(out).astype(int) - ref)
        assert diff.max() <= 1 and diff.mean() < 0.05, (box, diff.max(), diff.mean())


@pytest.mark.parametrize("width,height", [(500, 375), (333, 500), (256, 300), (180, 150)])
def test_val_sample_equals_resize_and_center_crop(width: int, height: int, decoder: str) -> None:
    data = jpeg_bytes(width, height, 2)
    crop = CropPlan(train=False, image_size=224, val_resize=256)(width, height, 0, 0)
    out = torch.empty(3, 224, 224, dtype=torch.uint8)
    resize_into(decode_crop(Kind.ENCODED, data, b"", crop.box, "x"), out, crop.flip, crop.source)
    ref = np.array(T.Compose([T.Resize(256), T.CenterCrop(224)])(Image.open(io.BytesIO(data)).convert("RGB")))
    diff = np.abs(hwc(out).astype(int) - ref)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    flipped = torch.empty(3, 224, 224, dtype=torch.uint8)
    resize_into(decode_crop(Kind.ENCODED, data, b"", crop.box, "x"), flipped, True, crop.source)
    assert torch.equal(flipped, out.flip(-1))


def test_resize_via_float_the_cuda_path_matches_uint8() -> None:
    crop = torch.from_numpy(picture(300, 250, 3)).permute(2, 0, 1)[None]
    for size in [(224, 224), (400, 380), (100, 120)]:
        ours = resize_via_float(crop, size)
        native = torch.nn.functional.interpolate(crop, size=size, mode="bilinear", antialias=True)
        assert ours.dtype == torch.uint8 and (ours.int() - native.int()).abs().max() <= 1


def test_resize_into_same_size_copies_and_flips() -> None:
    crop = torch.arange(3 * 4 * 5, dtype=torch.uint8).view(3, 4, 5)
    out = torch.empty(3, 4, 5, dtype=torch.uint8)
    resize_into(crop, out, flip=True)
    assert torch.equal(out, crop.flip(-1))


@pytest.mark.parametrize(
    "data,what",
    [
        (b"", "empty"),
        (b"not an image at all", "garbage"),
        (encode("jpeg", seed=0, size=SIZE)[:200], "truncated jpeg"),
        (encode("png-palette", seed=0, size=SIZE)[:100], "truncated png"),
        (b"\xff\xd8\xff\xe0" + bytes(300), "jpeg header only"),
    ],
)
def test_corrupt_data_raises_a_clear_error(data: bytes, what: str, decoder: str) -> None:
    with pytest.raises(DecodeError, match=r"^store.lmdb: record img-000000007: cannot decode image \("):
        decode_crop(Kind.ENCODED, data, b"", (0, 0, 1, 1), "store.lmdb: record img-000000007")


def test_device_decodable_jpeg() -> None:
    for kind in ("jpeg", "jpeg-444", "jpeg-progressive", "jpeg-gray"):
        assert device_decodable_jpeg(memoryview(encode(kind, seed=0, size=SIZE))), kind
    for kind in ("jpeg-cmyk", "png", "png-as-jpeg"):
        assert not device_decodable_jpeg(encode(kind, seed=0, size=SIZE)), kind
    assert not device_decodable_jpeg(b"\xff\xd8\xff")
