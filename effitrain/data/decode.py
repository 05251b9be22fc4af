"""One image's bytes -> the uint8 crop it contributes to a batch.

With the C extension, ``effitrain.jpeg.decode_crop`` decodes every crop: for random-access
JPEGs (``Kind.RANDOM_ACCESS_JPEG``) only the MCUs the box covers, for other JPEGs the rows down
to the box's last one, other formats through PIL. Without it, images are decoded in full by
torchvision.io (JPEG) or PIL (other formats, CMYK JPEGs), then cut. Either way the pixels are
those of ``PIL.Image.convert("RGB")``, what torchvision's ImageFolder sees.

A crop is a ``[3, h, w]`` uint8 tensor, possibly a strided view; ``resize_into`` writes it,
resized and flipped, into its slot of a preallocated batch.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from .. import jpeg
from ..store.format import Kind
from .transforms import Box, SourceBox

JPEG_MAGIC = b"\xff\xd8"


class DecodeError(ValueError):
    """An image (a store record or a file) cannot be decoded; the message names it."""


def _error(name: str, e: Exception) -> DecodeError:
    return DecodeError(f"{name}: cannot decode image ({type(e).__name__}: {e})")


def decode_image(data: bytes | memoryview, name: str) -> torch.Tensor:
    """Decode a whole image to ``[3, H, W]`` uint8 RGB (the fallback decoder)."""
    try:
        if bytes(data[:2]) == JPEG_MAGIC:
            # decode_jpeg wants a writable tensor; LMDB and file buffers are read-only.
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
            if image.shape[0] == 3:
                return image
            if image.shape[0] == 1:  # grayscale: R = G = B, as convert("RGB") does
                return image.expand(3, -1, -1)
            # CMYK/YCCK: PIL knows Adobe's inverted CMYK; keep ImageFolder's colours.
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.array(im.convert("RGB"))
    except Exception as e:  # any decoder failure on untrusted bytes becomes one clear error
        raise _error(name, e) from e
    return torch.from_numpy(rgb).permute(2, 0, 1)


def decode_crop(kind: Kind, data: bytes | memoryview, index: bytes | memoryview, box: Box, name: str) -> torch.Tensor:
    """The ``box`` (top, left, height, width) of an image as ``[3, h, w]`` uint8 RGB."""
    top, left, height, width = box
    if jpeg.available():
        try:
            crop = jpeg.decode_crop(data, index if kind == Kind.RANDOM_ACCESS_JPEG else b"", box)
        except Exception as e:
            raise _error(name, e) from e
        return torch.from_numpy(crop).permute(2, 0, 1)
    image = decode_image(data, name)
    if image.shape[1] < top + height or image.shape[2] < left + width:
        raise DecodeError(
            f"{name}: decoded size {image.shape[2]}x{image.shape[1]} does not hold crop box {box} (corrupt record?)"
        )
    return image[:, top : top + height, left : left + width]


def encode_crop(
    kind: Kind, data: bytes | memoryview, index: bytes | memoryview, box: Box, name: str
) -> tuple[bytes | memoryview, Box] | None:
    """For decoding on a device: JPEG bytes holding ``box`` and the box inside them.

    A random-access JPEG yields a small JPEG of just the crop's MCUs; another JPEG that
    torchvision.io can decode on a GPU yields itself. None: decode this one on the CPU.
    """
    if kind == Kind.RANDOM_ACCESS_JPEG and jpeg.available():
        try:
            return jpeg.crop_jpeg(data, index, box)
        except Exception as e:
            raise _error(name, e) from e
    if device_decodable_jpeg(data):
        return data, box
    return None


def device_decodable_jpeg(data: bytes | memoryview) -> bool:
    """True for an 8-bit Huffman-coded JPEG (baseline, extended, progressive) with 1 or 3
    components: what nvJPEG decodes. CMYK, 12-bit, lossless and arithmetic-coded files are not."""
    if bytes(data[:2]) != JPEG_MAGIC:
        return False
    pos, end = 2, len(data)
    while pos + 4 <= end and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in (0xC0, 0xC1, 0xC2):  # start of frame: P, Y, X, Nf
            return pos + 10 <= end and data[pos + 4] == 8 and data[pos + 9] in (1, 3)
        elif 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker in (0xD9, 0xDA):
            return False  # another frame type, or image data before any frame
        else:
            pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
    return False


def resize_into(crop: torch.Tensor, out: torch.Tensor, flip: bool, source: SourceBox | None = None) -> None:
    """Resize ``crop`` (or its fractional ``source`` box) to ``out``'s size (bilinear,
    antialiased), flip it, write it into ``out``.

    Whole crops: on the CPU torch resizes uint8 directly (with AVX2: no float round trip)
    with the filter of PIL's BILINEAR resize, which torchvision's PIL pipeline uses;
    elsewhere via float. Called directly, not through torchvision's resize, whose checks
    cost ~25% of it. A ``source`` box (validation's Resize + CenterCrop, on the CPU) is
    resampled by PIL, the one resize that takes a fractional box.
    """
    size = tuple(out.shape[-2:])
    if source is not None:
        hwc = np.ascontiguousarray(crop.permute(1, 2, 0).numpy())
        image = Image.frombuffer("RGB", (hwc.shape[1], hwc.shape[0]), hwc, "raw", "RGB", 0, 1)
        image = image.resize(size[::-1], Image.BILINEAR, box=source)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        out.permute(1, 2, 0).numpy()[...] = np.asarray(image)
        return
    if tuple(crop.shape[-2:]) != size:
        # A batch of one whose batch stride is the whole image: unambiguously channels_last
        # for an HWC crop, so the result stays HWC (else torch repacks it planar, and
        # copying that into a channels_last batch is a slow transposition).
        x = crop.as_strided((1, *crop.shape), (crop.numel(), *crop.stride()))
        if x.device.type == "cpu":
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        else:
            x = resize_via_float(x, size)
        crop = x[0]
    out.copy_(crop.flip(-1) if flip else crop)


def resize_via_float(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The uint8 antialiased bilinear resize where torch has no uint8 kernel (CUDA): in
    float, rounded back (the filter's weights are >= 0, so no clamping is needed)."""
    x = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round_().to(torch.uint8)
