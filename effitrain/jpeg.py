"""Random-access JPEG: decode only the part of an image a crop needs, same pixels as PIL.

A baseline JPEG is one stream of Huffman codes: to decode any pixel, a decoder must first
decode every code before it. ``transcode`` rewrites a JPEG losslessly (its DCT coefficients
are copied, never re-quantised) so that a restart marker follows every MCU, the 8x8 or
16x16 block group that is the unit of the stream. Each MCU then starts on a byte of its
own with fresh predictors, and ``crop_jpeg`` can cut the MCUs a box covers into a small
valid JPEG of their own. ``decode_crop`` decodes just that, in C, without the GIL (its
Huffman codes with our own decoder: libjpeg's takes a slow path where restart markers are).

The box is widened by 1 px up/left and 2 px down/right before it is aligned to MCUs:
chroma upsampling blends neighbouring samples and treats the sub-image's edges as image
edges, so the widened margin absorbs the difference. Crops are bit-identical to
``np.asarray(PIL.Image.open(original).convert("RGB"))[top:top+h, left:left+w]``.

Boxes are ``(top, left, height, width)`` in pixels of the full image. ``index`` is the
per-record bytes that ``transcode`` returned (stored beside the payload, see
``effitrain.store.format``): the offset of each MCU row, 12 + 4 * (rows + 1) bytes, about
0.1-0.2% of an ImageNet file; MCUs inside a row are found by scanning for their markers.

Without the C extension (``make ext`` builds it), everything still works, slower: crops
come from a full PIL decode, ``transcode`` returns None and ``crop_jpeg`` returns the
whole JPEG with the box unchanged.
"""

from __future__ import annotations

import io
import sys

import numpy as np
from PIL import Image

try:
    from effitrain import _jpegext as _ext
except ImportError as exc:  # not built here: no compiler or headers, or another Python
    _ext = None
    print(
        f"effitrain: C JPEG extension not available ({exc}); using the PIL fallback (`make ext` builds it)",
        file=sys.stderr,
    )

Box = tuple[int, int, int, int]

if _ext is not None:
    JpegError = _ext.JpegError
else:

    class JpegError(ValueError):
        """Corrupt or unsupported JPEG data."""


# PIL's ways of saying "this is not a decodable image".
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def available() -> bool:
    """True when the C extension is loaded (fast crop decode and transcode)."""
    return _ext is not None


def transcode(data: bytes) -> tuple[bytes, bytes] | None:
    """Losslessly rewrite a JPEG with a restart marker after every MCU.

    Returns ``(jpeg, index)``: a sequential JPEG with optimised Huffman tables and no APPn
    or comment markers (EXIF, ICC, XMP are dropped: PIL's decode does not use them), whose
    decoded pixels equal the original's, and the index ``crop_jpeg``/``decode_crop`` need.
    Returns None where that identity is not guaranteed (CMYK/YCCK, RGB-coded, arithmetic
    coding, 12-bit, unusual chroma sampling, incomplete progressive scans, any corrupt
    data) or without the C extension: store the original bytes then. Baseline files are
    re-coded symbol by symbol without libjpeg (~1.2 ms for a 100 KB photo), the others
    through libjpeg's coefficients (~2.5 ms); both write the same bytes.
    """
    if _ext is None:
        return None
    return _ext.transcode(data)


def crop_jpeg(data: bytes, index: bytes, box: Box) -> tuple[bytes, Box]:
    """A small JPEG covering ``box`` and the box inside it, for decoders of whole JPEGs.

    Any JPEG decoder (``torchvision.io.decode_jpeg`` on CPU or CUDA) can decode the result;
    cutting the returned box from it gives the box of the full image. With an empty
    ``index`` (a JPEG stored as its original bytes) or without the C extension, the whole
    JPEG comes back with the box unchanged.
    """
    box = _check_box(box)
    if _ext is not None and index:
        return _ext.crop(data, index, box)
    width, height = _size(data)
    _check_inside(box, width, height)
    return bytes(data), box


def decode_crop(data: bytes, index: bytes, box: Box) -> np.ndarray:
    """Decode ``box`` of an image as uint8 RGB ``[height, width, 3]``.

    With an index from ``transcode``, only the MCUs around the box are decoded. With an
    empty index (any image PIL reads, stored as is), the image is decoded from the top down
    to the box's last row and cut.
    """
    box = _check_box(box)
    out = np.empty((box[2], box[3], 3), np.uint8)
    if _ext is not None and index:
        _ext.decode_crop(data, index, box, out)
        return out
    return _decode_into(data, box, out)


def decode(data: bytes) -> np.ndarray:
    """Decode a whole image as uint8 RGB ``[height, width, 3]`` (PIL's pixels)."""
    width, height = _size(data)
    return _decode_into(data, (0, 0, height, width), np.empty((height, width, 3), np.uint8))


def _decode_into(data: bytes, box: Box, out: np.ndarray) -> np.ndarray:
    """Full-image decode of ``box`` into ``out``: libjpeg in C where it can, else PIL.

    PIL also decodes what the C path refuses: other formats, CMYK, and JPEGs with minor
    corruption that libjpeg only warns about.
    """
    if _ext is not None and _is_jpeg(data):
        try:
            _ext.decode(data, box, out)
            return out
        except JpegError:
            pass
    top, left, height, width = box
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_inside(box, *img.size)
            out[...] = np.asarray(img.crop((left, top, left + width, top + height)).convert("RGB"))
    except _PIL_ERRORS as exc:
        if isinstance(exc, JpegError):
            raise
        raise JpegError(f"cannot decode image: {exc}") from exc
    return out


def _size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header."""
    if _ext is not None and _is_jpeg(data):
        try:
            width, height, _ = _ext.info(data)
            return width, height
        except JpegError:
            pass
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except _PIL_ERRORS as exc:
        raise JpegError(f"cannot read image header: {exc}") from exc


def _is_jpeg(data: bytes) -> bool:
    return data[:2] == b"\xff\xd8"


def _check_box(box: Box) -> Box:
    if len(box) != 4:
        raise ValueError(f"box must be (top, left, height, width), got {box!r}")
    top, left, height, width = (int(v) for v in box)
    return top, left, height, width


def _check_inside(box: Box, width: int, height: int) -> None:
    top, left, h, w = box
    if top < 0 or left < 0 or h < 1 or w < 1 or top + h > height or left + w > width:
        raise JpegError(f"box (top={top}, left={left}, height={h}, width={w}) is outside the {width}x{height} image")
