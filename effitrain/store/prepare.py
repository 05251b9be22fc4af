"""Per-image work of ``convert``: read, check, maybe re-encode, build the record.

``prepare_files(paths, labels, options)`` reads source files and returns a ``Prepared`` for
each: the complete record to store (header, index and payload: the file's bytes, or a
re-encoded or transcoded image), its size and kind, or why the file cannot be used.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from PIL import Image

from .format import HEADER, Kind, crc32, encode_record, header_fields

try:  # reads a chunk of files without the GIL, CRC32 included
    from effitrain import _storeio
except ImportError:  # not built (`make ext`): files are read here, one call at a time
    _storeio = None

PAYLOADS = ("keep", "random-access")
JPEG_EOI = b"\xff\xd9"
PNG_IEND = b"IEND\xaeB`\x82"


@dataclass(frozen=True)
class ConvertOptions:
    """How images are stored; recorded in the store's metadata and checked on ``--resume``.

    payload: ``"keep"`` stores the file's bytes; ``"random-access"`` losslessly transcodes
      JPEGs for cropped decoding (``effitrain.jpeg``), other images and JPEGs it cannot
      transcode exactly stay as they are.
    max_size: re-encode images whose longer side exceeds this many pixels (None: never).
    quality: JPEG quality of re-encoded images.
    verify_decode: fully decode every image instead of the cheap structural check.
    """

    payload: str = "keep"
    max_size: int | None = None
    quality: int = 90
    verify_decode: bool = False

    def __post_init__(self) -> None:
        if self.payload not in PAYLOADS:
            raise ValueError(f"payload must be one of {PAYLOADS}, got {self.payload!r}")
        if self.max_size is not None and self.max_size < 1:
            raise ValueError(f"max_size must be a positive number of pixels, got {self.max_size}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be between 1 and 100, got {self.quality}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Prepared:
    """One source image, ready for the writer.

    ``record`` is the complete LMDB value (header, index, payload), or None when ``error``
    says why the file cannot be used (the rest is then meaningless) or, in a worker
    process, when the record was already written into memory shared with the writer:
    ``stored`` is then its (start, end) there. ``nbytes`` is the payload's size.
    """

    size_in: int
    kind: Kind = Kind.ENCODED
    width: int = 0
    height: int = 0
    nbytes: int = 0
    record: bytes | bytearray | None = None
    error: str | None = None
    stored: tuple[int, int] | None = None


class BadImage(Exception):
    """A source file that is not a usable image."""


# A file read for its record: (buffer, CRC32 of the file's bytes or None if not computed
# yet), or the error reading it gave.
Read = tuple[bytearray, int | None] | OSError


def prepare_files(paths: Sequence[str], labels: Sequence[int], options: ConvertOptions) -> list[Prepared]:
    """Read and check source images and build their records; never raises for bad input."""
    return [_prepare_read(read, label, options) for read, label in zip(read_files(paths), labels)]


def prepare(path: str, label: int, options: ConvertOptions) -> Prepared:
    """``prepare_files`` of one image."""
    return prepare_files([path], [label], options)[0]


def _prepare_read(read: Read, label: int, options: ConvertOptions) -> Prepared:
    if isinstance(read, OSError):
        return Prepared(size_in=0, error=f"cannot read: {read.strerror or read}")
    buf, crc = read
    data = memoryview(buf)[HEADER.size :]
    try:
        fmt, width, height = check_image(data, full_decode=options.verify_decode)
        if options.max_size is not None and max(width, height) > options.max_size:
            payload = downscale(data, options.max_size, options.quality)
            with Image.open(io.BytesIO(payload)) as im:
                width, height = im.size
            return _joined(len(data), label, Kind.REENCODED, width, height, payload)
        if options.payload == "random-access" and fmt == "JPEG":
            transcoded = _transcode(bytes(data))
            if transcoded is not None:
                payload, index = transcoded
                return _joined(len(data), label, Kind.RANDOM_ACCESS_JPEG, width, height, payload, index)
    except BadImage as e:
        return Prepared(size_in=len(data), error=str(e))
    # The file's bytes are the payload: the record is the buffer they were read into.
    crc = crc32(data) if crc is None else crc
    HEADER.pack_into(buf, 0, *header_fields(label, width, height, Kind.ENCODED, 0, crc))
    return Prepared(len(data), Kind.ENCODED, width, height, len(data), buf)


def read_files(paths: Sequence[str]) -> list[Read]:
    """Each file's bytes, read into a new buffer after ``HEADER.size`` free bytes.

    The record header is packed into that room afterwards, so the file's bytes are copied
    once, by the kernel, and never again until LMDB takes them. With the C extension the
    files are read (and their CRC32 computed) without the GIL, in one call: ~45 us of the
    reading thread per 100 KB image, checks included, against ~95 us one Python call at a
    time (perf of a convert --keep-bytes, RESULTS.md).
    """
    if _storeio is None:
        return [_read_one(path) for path in paths]
    reads: list[Read] = []
    for path, (buf, code) in zip(paths, _storeio.read_files(paths, HEADER.size)):
        if buf is not None:
            reads.append((buf, code))
        elif code:
            reads.append(OSError(code, os.strerror(code), path))
        else:  # its size changed while it was read: the simple way
            reads.append(_read_one(path))
    return reads


def _read_one(path: str) -> Read:
    try:
        return read_after_header(path), None
    except OSError as e:
        return e


def read_after_header(path: str) -> bytearray:
    """The bytes of the file ``path``, read into a buffer after ``HEADER.size`` free bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(HEADER.size + os.fstat(fd).st_size)
        done = HEADER.size
        with memoryview(buf) as view:
            while done < len(buf) and (n := os.readv(fd, [view[done:]])):
                done += n
        del buf[done:]  # shorter than it was a moment ago: keep what is there
        while more := os.read(fd, 1 << 20):  # longer than it was (rare): the simple way
            buf += more
        return buf
    finally:
        os.close(fd)


def _joined(
    size_in: int, label: int, kind: Kind, width: int, height: int, payload: bytes, index: bytes = b""
) -> Prepared:
    """The record of a payload made here (re-encoded or transcoded): one small extra copy."""
    record = encode_record(payload, label, width, height, kind, index)
    return Prepared(size_in, kind, width, height, len(payload), record)


def _jpeg_module():
    """``effitrain.jpeg`` when its random-access transcode can run here, else None."""
    try:
        from effitrain import jpeg
    except ImportError:
        return None
    return jpeg if jpeg.available() else None


def default_payload() -> str:
    """``"random-access"`` where the JPEG transcode is available, else ``"keep"``."""
    return "random-access" if _jpeg_module() is not None else "keep"


def _transcode(data: bytes) -> tuple[bytes, bytes] | None:
    """The random-access JPEG transcode, or None where it is unavailable or not exact."""
    jpeg = _jpeg_module()
    return None if jpeg is None else jpeg.transcode(data)


def check_image(data: bytes | memoryview, full_decode: bool = False) -> tuple[str, int, int]:
    """Check that ``data`` is an image PIL can load; return (format, width, height).

    The cheap check parses the header and, for JPEG and PNG (nearly every file of an
    ImageNet-like corpus), looks for the end marker: a truncated file lacks it. Files of
    other formats, and JPEG/PNG files whose end looks wrong (e.g. trailing bytes after the
    end marker, which PIL accepts), are fully decoded: only files PIL cannot load, exactly
    as torchvision's loader opens them, are rejected.
    """
    if not data:
        raise BadImage("empty file")
    if not full_decode:
        size = _plain_jpeg_size(data)
        if size is not None and bytes(data[-16:]).rstrip(b"\0").endswith(JPEG_EOI):
            return ("JPEG", *size)
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (width, height) = im.format, im.size
            tail = bytes(data[-16:]).rstrip(b"\0")
            intact = (fmt == "JPEG" and tail.endswith(JPEG_EOI)) or (fmt == "PNG" and tail.endswith(PNG_IEND))
            if full_decode or not intact:
                im.convert("RGB")  # what torchvision's pil_loader does
    except Image.DecompressionBombError as e:
        raise BadImage(str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(describe_image_error(e)) from None
    if width < 1 or height < 1:
        raise BadImage(f"{fmt} image of size {width}x{height}")
    return fmt, width, height


_SOF_PLAIN = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive Huffman
_SOF_OTHER = frozenset(range(0xC3, 0xD0)) - {0xC4, 0xC8, 0xCC}  # lossless, arithmetic, ...
_SEGMENT = struct.Struct(">BBH")


def _plain_jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) of an 8-bit grayscale or 3-component Huffman JPEG, read from its
    frame header without PIL; None for anything else (PIL then opens it).

    This is most of ImageNet, and PIL's JPEG header parser, written in Python, costs more
    than reading the file.
    """
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data) - 10
    while pos < end:
        ff, marker, length = _SEGMENT.unpack_from(data, pos)
        if ff != 0xFF:
            return None
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _SOF_PLAIN:
            precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 4)
            ok = precision == 8 and components in (1, 3) and 0 < width * height <= 2 * Image.MAX_IMAGE_PIXELS
            return (width, height) if ok else None
        if marker in _SOF_OTHER or marker == 0xDA:  # another frame type, or scan data before a frame
            return None
        pos += 2 + length
    return None


def downscale(data: bytes | memoryview, max_size: int, quality: int) -> bytes:
    """Decode, shrink so the longer side is ``max_size`` (Lanczos) and encode as JPEG."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    width, height = rgb.size
    scale = max_size / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    out = io.BytesIO()
    rgb.resize(size, Image.Resampling.LANCZOS).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def describe_image_error(e: Exception) -> str:
    """One line saying why PIL could not load an image."""
    msg = str(e).split("\n")[0]
    if msg.startswith("cannot identify image file"):
        return "not an image PIL can read"
    return msg or type(e).__name__
