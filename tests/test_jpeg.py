"""effitrain.jpeg: lossless transcode, sub-JPEG crops and crop decode give PIL's pixels.

The reference everywhere is ``np.asarray(PIL.Image.open(original).convert("RGB"))``, cut.
"""

from __future__ import annotations

import io
import random
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from effitrain import jpeg

needs_ext = pytest.mark.skipif(not jpeg.available(), reason="C JPEG extension not built")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth gradients, edges and noise: enough detail for every DCT coefficient to matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.02, 0.4), rng.uniform(0.02, 0.4), rng.uniform(0, 6.3)
        channels.append(127 + 90 * np.sin(fx * x + fy * y + phase) + 30 * ((x + y) % 17 < 8))
    rgb = np.stack(channels, axis=-1) + rng.normal(0, 10, size=(height, width, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def make_jpeg(kind: str, width: int, height: int, seed: int = 0) -> bytes:
    img = Image.fromarray(photo(width, height, seed))
    out = io.BytesIO()
    options = {
        "420": dict(quality=90, subsampling=2),
        "422": dict(quality=88, subsampling=1),
        "444": dict(quality=95, subsampling=0),
        "progressive": dict(quality=90, progressive=True),
        "progressive-444": dict(quality=92, subsampling=0, progressive=True),
        "restarts": dict(quality=90, restart_marker_blocks=3),
        "restart-rows": dict(quality=91, subsampling=1, restart_marker_rows=1),
        "optimized": dict(quality=93, optimize=True),
        "exif-icc": dict(quality=90, exif=_exif(), icc_profile=b"not really a profile" * 10),
    }
    if kind.startswith("gray"):
        img = img.convert("L")
        kind = kind.removeprefix("gray") or "420"
        kind = kind.lstrip("-")
    img.save(out, "JPEG", **options[kind])
    return out.getvalue()


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: PIL's decode ignores it, so must we
    exif[0x010F] = "effitrain"
    return exif.tobytes()


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def boxes(width: int, height: int, n_random: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Every corner and edge (1 px and wider), the full image, and random boxes."""
    out = {(0, 0, height, width)}
    for h in {min(n, height) for n in (1, 2, 3, 17, height)}:
        for w in {min(n, width) for n in (1, 2, 3, 19, width)}:
            for top in {0, (height - h) // 2, height - h}:
                for left in {0, (width - w) // 2, width - w}:
                    out.add((top, left, h, w))
    rng = random.Random(seed)
    for _ in range(n_random):
        h, w = rng.randint(1, height), rng.randint(1, width)
        out.add((rng.randint(0, height - h), rng.randint(0, width - w), h, w))
    return sorted(out)


def cut(img: np.ndarray, box) -> np.ndarray:
    top, left, h, w = box
    return img[top : top + h, left : left + w]


def markers(data: bytes) -> list[int]:
    """The marker codes of a JPEG's header segments, up to and including SOS."""
    pos, found = 2, []
    while data[pos] == 0xFF:
        code, length = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        found.append(code)
        if code == 0xDA:
            break
        pos += 2 + length
    return found


# PIL writes grayscale with the luma sampling of `subsampling`: "gray" is 2x2, "gray-422"
# 2x1, "gray-progressive" 1x1.
KINDS = ["420", "422", "444", "gray", "gray-422", "progressive", "progressive-444", "gray-progressive",
         "restarts", "restart-rows", "optimized", "exif-icc"]
SIZES = [(203, 157), (64, 48), (37, 29), (17, 9), (1, 1), (250, 16)]
# _ext.transcode's methods besides the default (see jpegext.c): libjpeg's coefficient
# transcoding with our tables, the same with libjpeg's tables, the re-coder alone.
LIBJPEG, LIBJPEG_TABLES, RECODE = 1, 2, 3
DECLINED = {"progressive", "progressive-444", "gray-progressive"}  # the re-coder leaves these to libjpeg
CASES = [(k, s) for k in KINDS for s in SIZES[:2]] + [(k, s) for k in ("420", "422", "444", "gray") for s in SIZES[2:]]


@pytest.fixture(scope="module")
def transcoded():
    """(original, ref pixels, transcoded jpeg, index) per case, computed once."""
    cache = {}

    def get(kind, size):
        if (kind, size) not in cache:
            original = make_jpeg(kind, *size, seed=len(cache))
            result = jpeg.transcode(original)
            assert result is not None, f"{kind} {size} was refused"
            cache[kind, size] = (original, pil_rgb(original), *result)
        return cache[kind, size]

    return get


@needs_ext
@pytest.mark.parametrize("kind,size", CASES)
def test_transcode_is_lossless_baseline_with_a_restart_per_mcu(transcoded, kind, size):
    original, ref, new, index = transcoded(kind, size)
    assert np.array_equal(pil_rgb(new), ref)
    # Every way of transcoding writes the same bytes: the re-coder without libjpeg (the
    # default where it takes the file), libjpeg with our tables, and libjpeg with its own
    # (slower) optimize_coding.
    assert jpeg._ext.transcode(original, LIBJPEG) == jpeg._ext.transcode(original, LIBJPEG_TABLES) == (new, index)
    assert jpeg._ext.transcode(original, RECODE) == (None if kind in DECLINED else (new, index))
    codes = markers(new)
    assert 0xC0 in codes or 0xC1 in codes  # sequential Huffman, even from progressive
    assert 0xC2 not in codes and 0xDD in codes
    pos = new.index(b"\xff\xdd")
    assert new[pos + 4 : pos + 6] == b"\x00\x01"  # restart interval: 1 MCU
    assert not any(0xE1 <= c <= 0xEF or c == 0xFE for c in codes)  # EXIF/ICC/comments dropped
    mcu_height = 8 if kind.startswith("gray") or kind in ("422", "444", "progressive-444", "restart-rows") else 16
    assert len(index) == 12 + 4 * (-(-size[1] // mcu_height) + 1)  # a u32 per MCU row, and the end


@needs_ext
@pytest.mark.parametrize("kind,size", CASES)
def test_decode_crop_equals_full_decode_then_cut(transcoded, kind, size):
    original, ref, new, index = transcoded(kind, size)
    for box in boxes(size[0], size[1], n_random=40, seed=size[0]):
        got = jpeg.decode_crop(new, index, box)
        assert got.dtype == np.uint8 and got.flags.writeable
        assert np.array_equal(got, cut(ref, box)), box


def libjpeg_decode_crop(data: bytes, index: bytes, box) -> np.ndarray | None:
    """decode_crop with libjpeg's own Huffman decoder (None where it raises)."""
    out = np.empty((box[2], box[3], 3), np.uint8)
    try:
        jpeg._ext.decode_crop(data, index, box, out, True)
    except jpeg.JpegError:
        return None
    return out


@needs_ext
@pytest.mark.parametrize("kind", ["420", "422", "444", "gray", "gray-422", "restarts"])
def test_crop_huffman_decoder_gives_libjpegs_pixels(transcoded, kind):
    """decode_crop decodes a sub-JPEG's Huffman codes itself (recode.c); libjpeg's decoder,
    which it replaces, gives the same pixels, PIL's."""
    original, ref, new, index = transcoded(kind, (203, 157))
    for box in boxes(203, 157, n_random=20, seed=7):
        ours = jpeg.decode_crop(new, index, box)
        assert np.array_equal(ours, cut(ref, box)), box
        assert np.array_equal(libjpeg_decode_crop(new, index, box), ours), box


@needs_ext
def test_crop_huffman_decoder_on_corrupt_codes(transcoded):
    """Bits flipped in the entropy-coded data (markers kept): the crop decoder raises, or
    gives exactly what libjpeg's decoder gives; it never accepts what libjpeg refuses."""
    original, ref, new, index = transcoded("420", (203, 157))
    scan = struct.unpack("<I", index[12:16])[0]  # the first entropy-coded byte
    rng = random.Random(11)
    outcomes = {"raised": 0, "decoded": 0}
    for trial in range(400):
        data = bytearray(new)
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(scan, len(data) - 2)
            flipped = data[pos] ^ (1 << rng.randrange(8))
            if data[pos] != 0xFF and data[pos - 1] != 0xFF and flipped != 0xFF:
                data[pos] = flipped
        box = (rng.randrange(100), rng.randrange(100), 57, 57)
        try:
            ours = jpeg.decode_crop(bytes(data), index, box)
        except jpeg.JpegError:
            outcomes["raised"] += 1
            continue
        outcomes["decoded"] += 1
        theirs = libjpeg_decode_crop(bytes(data), index, box)
        assert theirs is not None and np.array_equal(ours, theirs), trial
    assert outcomes["raised"] > 20 and outcomes["decoded"] > 20, outcomes


@needs_ext
@pytest.mark.parametrize("kind,size", [(k, (203, 157)) for k in ("420", "422", "444", "gray")] + [("420", (37, 29))])
def test_sub_jpeg_decodes_with_torchvision_and_pil(transcoded, kind, size):
    original, ref, new, index = transcoded(kind, size)
    for box in boxes(size[0], size[1], n_random=20, seed=1):
        sub, inner = jpeg.crop_jpeg(new, index, box)
        assert len(sub) <= len(new) + 4
        tv = decode_jpeg(torch.frombuffer(bytearray(sub), dtype=torch.uint8), mode=ImageReadMode.RGB)
        assert np.array_equal(cut(tv.permute(1, 2, 0).numpy(), inner), cut(ref, box)), box
        assert np.array_equal(cut(pil_rgb(sub), inner), cut(ref, box)), box


@needs_ext
def test_sub_jpeg_is_only_the_mcus_around_the_box(transcoded):
    original, ref, new, index = transcoded("420", (203, 157))
    sub, inner = jpeg.crop_jpeg(new, index, (40, 50, 10, 20))
    # widened to rows 39..51, cols 49..71: MCU rows 2..3, MCU cols 3..4 -> 32x32 px
    assert Image.open(io.BytesIO(sub)).size == (32, 32)
    assert inner == (40 - 32, 50 - 48, 10, 20)
    assert len(sub) < len(new) / 10
    sub, inner = jpeg.crop_jpeg(new, index, (150, 190, 7, 13))  # bottom-right: clipped to the image
    assert Image.open(io.BytesIO(sub)).size == (203 - 176, 157 - 144)
    assert inner == (150 - 144, 190 - 176, 7, 13)


@needs_ext
def test_decode_matches_pil_and_decode_crop_without_index(transcoded):
    original, ref, new, index = transcoded("422", (203, 157))
    assert np.array_equal(jpeg.decode(original), ref)
    assert np.array_equal(jpeg.decode(new), ref)
    for box in boxes(203, 157, n_random=10, seed=3):
        assert np.array_equal(jpeg.decode_crop(original, b"", box), cut(ref, box))
    sub, inner = jpeg.crop_jpeg(original, b"", (5, 6, 7, 8))  # not random-access: whole JPEG
    assert sub == original and inner == (5, 6, 7, 8)


@needs_ext
def test_memoryview_inputs_and_threads(transcoded):
    """Records arrive as memoryviews into LMDB; decoding runs without the GIL."""
    original, ref, new, index = transcoded("420", (203, 157))
    record = memoryview(b"header" + index + new)
    idx_view, data_view = record[6 : 6 + len(index)], record[6 + len(index) :]
    box_list = boxes(203, 157, n_random=60, seed=4)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: jpeg.decode_crop(data_view, idx_view, b), box_list))
    for box, got in zip(box_list, results):
        assert np.array_equal(got, cut(ref, box))
    sub, inner = jpeg.crop_jpeg(data_view, idx_view, (0, 0, 5, 5))
    assert np.array_equal(cut(pil_rgb(sub), inner), ref[:5, :5])


def _progressive_cut_after_scans(data: bytes, n_scans: int) -> bytes:
    """A valid progressive JPEG that stops after its first scans (coefficients incomplete)."""
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    return data[: starts[n_scans]] + b"\xff\xd9"


def _patched(data: bytes, marker: bytes, offset: int, value: int) -> bytes:
    pos = data.index(marker)
    return data[: pos + offset] + bytes([value]) + data[pos + offset + 1 :]


@needs_ext
def test_transcode_refuses_what_it_cannot_keep_identical():
    rgb = Image.fromarray(photo(48, 40, 9))
    cmyk = io.BytesIO()
    rgb.convert("CMYK").save(cmyk, "JPEG", quality=90)
    png = io.BytesIO()
    rgb.save(png, "PNG")
    baseline = make_jpeg("420", 48, 40)
    progressive = make_jpeg("progressive", 48, 40)
    partial = _progressive_cut_after_scans(progressive, 3)
    assert Image.open(io.BytesIO(partial)).convert("RGB").size == (48, 40)  # PIL decodes it (smoothed)
    refused = {
        "cmyk": cmyk.getvalue(),
        "png": png.getvalue(),
        "arithmetic": _patched(baseline, b"\xff\xc0", 1, 0xC9),  # SOF9
        "12-bit": _patched(baseline, b"\xff\xc0", 4, 12),
        "progressive-incomplete": partial,
        "truncated": baseline[: len(baseline) * 2 // 3],
        "garbage": b"\xff\xd8" + bytes(range(256)) * 4,
        "empty": b"",
    }
    for name, data in refused.items():
        assert jpeg.transcode(data) is None, name
    # What is stored as is still decodes to PIL's pixels (PIL converts CMYK, decodes PNG).
    for data in (refused["cmyk"], refused["png"], partial):
        assert np.array_equal(jpeg.decode(data), pil_rgb(data))
        assert np.array_equal(jpeg.decode_crop(data, b"", (3, 5, 20, 30)), pil_rgb(data)[3:23, 5:35])


@needs_ext
def test_corrupt_or_mismatched_data_raises(transcoded):
    original, ref, new, index = transcoded("420", (203, 157))
    _, _, other, other_index = transcoded("444", (64, 48))
    box = (10, 10, 50, 50)
    bad = {
        "truncated payload": (new[: len(new) // 2], index),
        "index of another image": (new, other_index),
        "payload of another image": (other, index),
        "empty index": (b"", index),
        "short index": (new, index[:20]),
        "index version": (new, b"\x07" + index[1:]),
    }
    for name, (data, idx) in bad.items():
        with pytest.raises(jpeg.JpegError):
            jpeg.decode_crop(data, idx, box)
        with pytest.raises(jpeg.JpegError):
            jpeg.crop_jpeg(data, idx, box)
    for box in [(-1, 0, 5, 5), (0, 0, 158, 5), (0, 200, 5, 4), (0, 0, 0, 5)]:
        with pytest.raises(ValueError):
            jpeg.decode_crop(new, index, box)
    with pytest.raises(jpeg.JpegError):
        jpeg.decode(original[: len(original) // 2])
    with pytest.raises(jpeg.JpegError):
        jpeg.decode(b"\xff\xd8 not a jpeg at all")


@needs_ext
def test_random_corruption_never_crashes(transcoded):
    """Flipped bytes give an exception or some pixels, never a crash or a hang."""
    original, ref, new, index = transcoded("420", (203, 157))
    rng = random.Random(5)
    for trial in range(300):
        data, idx = bytearray(new), bytearray(index)
        target = data if trial % 3 else idx
        for _ in range(rng.randint(1, 4)):
            target[rng.randrange(len(target))] = rng.randrange(256)
        try:
            got = jpeg.decode_crop(bytes(data), bytes(idx), (20, 30, 100, 120))
            assert got.shape == (100, 120, 3)
        except jpeg.JpegError:
            pass


@needs_ext
def test_recoder_never_accepts_what_libjpeg_would_code_otherwise():
    """The re-coder, on damaged baseline files (bytes flipped, inserted, removed, cut), gives
    exactly what the libjpeg path gives, or declines: it never turns corrupt data into a
    transcode libjpeg would refuse, nor writes other bytes."""
    rng = random.Random(11)
    bases = [make_jpeg(kind, w, h, seed=i) for i, (kind, (w, h)) in
             enumerate([("420", (40, 24)), ("444", (24, 16)), ("gray", (33, 17)), ("restarts", (48, 32)),
                        ("422", (35, 20))])]
    taken = 0
    for trial in range(1500):
        data = bytearray(bases[trial % len(bases)])
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(2, len(data))
            op = rng.random()
            if op < 0.6:
                data[pos] = rng.choice((0x00, 0xFF, 0xD0 + rng.randrange(10), rng.randrange(256)))
            elif op < 0.75:
                data.insert(pos, rng.choice((0x00, 0xFF, rng.randrange(256))))
            elif op < 0.9:
                del data[pos]
            else:
                del data[pos:]
        data = bytes(data)
        recoded = jpeg._ext.transcode(data, RECODE)
        if recoded is not None:
            taken += 1
            assert recoded == jpeg._ext.transcode(data, LIBJPEG), f"trial {trial}"
    assert taken > 100  # flips in the scan that keep it decodable are taken


def _segments(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """A JPEG's header segments up to and including SOS as (marker, payload), and the rest."""
    pos, segments = 2, []
    while True:
        code, length = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        segments.append((code, data[pos + 4 : pos + 2 + length]))
        pos += 2 + length
        if code == 0xDA:
            return segments, data[pos:]


def _joined(segments: list[tuple[int, bytes]], scan: bytes) -> bytes:
    return b"\xff\xd8" + b"".join(bytes([0xFF, c]) + struct.pack(">H", len(p) + 2) + p for c, p in segments) + scan


def _header_variants(data: bytes) -> dict[str, bytes]:
    """The same scan under headers written other ways than PIL writes them."""
    segs, scan = _segments(data)
    no_jfif = [(c, p) for c, p in segs if c != 0xE0]
    jfif = [(c, p[:5] + bytes([1, 2, 1]) + struct.pack(">HH", 300, 72) + p[12:]) if c == 0xE0 else (c, p) for c, p in segs]
    dqt = [p for c, p in segs if c == 0xDB]
    dht = [p for c, p in segs if c == 0xC4]

    def wide(payload: bytes, bump: int) -> bytes:  # 8-bit quantisers written as 16-bit ones
        out = b""
        while payload:
            values = [v + (bump if i == 63 else 0) for i, v in enumerate(payload[1:65])]
            out += bytes([0x10 | payload[0]]) + struct.pack(">64H", *values)
            payload = payload[65:]
        return out

    def replace(code: int, payloads: list[bytes], segs=segs) -> list[tuple[int, bytes]]:
        first = next(i for i, (c, _) in enumerate(segs) if c == code)
        rest = [(c, p) for c, p in segs if c != code]
        return rest[:first] + [(code, p) for p in payloads] + rest[first:]

    sof = next(p for c, p in segs if c == 0xC0)
    rgb_ids = sof[:6] + b"".join(bytes([i]) + sof[7 + 3 * n : 9 + 3 * n] for n, i in enumerate(b"RGB"))
    sos = next(p for c, p in segs if c == 0xDA)
    sos_rgb = sos[:1] + b"".join(bytes([i]) + sos[2 + 2 * n : 3 + 2 * n] for n, i in enumerate(b"RGB")) + sos[7:]
    sos_swapped = sos[:1] + sos[3:5] + sos[1:3] + sos[5:]
    return {
        "no JFIF": _joined(no_jfif, scan),
        "JFIF 1.02, 300x72 dpi": _joined(jfif, scan),
        "one DQT, one DHT segment": _joined(replace(0xC4, [b"".join(dht)], replace(0xDB, [b"".join(dqt)])), scan),
        "16-bit quantisers": _joined(replace(0xDB, [wide(p, 0) for p in dqt]), scan),
        "a quantiser above 255": _joined(replace(0xDB, [wide(p, 300) for p in dqt]), scan),
        "Adobe APP14": _joined([(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01")] + segs, scan),
        "RGB component IDs": _joined([(0xC0, rgb_ids) if c == 0xC0 else (0xDA, sos_rgb) if c == 0xDA else (c, p)
                                      for c, p in no_jfif], scan),
        "scan in another component order": _joined([(0xDA, sos_swapped) if c == 0xDA else (c, p) for c, p in segs], scan),
    }


@needs_ext
def test_recoder_writes_libjpegs_header_for_other_headers():
    """Headers written other ways (no JFIF, other density, merged or 16-bit tables, Adobe,
    RGB IDs, another scan order): the re-coder writes the libjpeg path's bytes or declines."""
    taken = set()
    for name, data in _header_variants(make_jpeg("420", 40, 24)).items():
        expected = jpeg._ext.transcode(data, LIBJPEG)
        recoded = jpeg._ext.transcode(data, RECODE)
        assert recoded is None or recoded == expected, name
        assert jpeg.transcode(data) == expected, name
        if recoded is not None:
            taken.add(name)
    assert taken == {"no JFIF", "JFIF 1.02, 300x72 dpi", "one DQT, one DHT segment", "16-bit quantisers",
                     "a quantiser above 255"}


def test_fallback_without_the_extension(monkeypatch):
    original = make_jpeg("422", 61, 45, seed=7)
    ref = pil_rgb(original)
    stored = jpeg.transcode(original) if jpeg.available() else None
    monkeypatch.setattr(jpeg, "_ext", None)
    assert not jpeg.available()
    assert jpeg.transcode(original) is None
    assert np.array_equal(jpeg.decode(original), ref)
    for box in boxes(61, 45, n_random=10, seed=6):
        assert np.array_equal(jpeg.decode_crop(original, b"", box), cut(ref, box))
        if stored is not None:  # a store written with the extension, read without it
            assert np.array_equal(jpeg.decode_crop(stored[0], stored[1], box), cut(ref, box))
    assert jpeg.crop_jpeg(original, b"", (1, 2, 3, 4)) == (original, (1, 2, 3, 4))
    gray_png = io.BytesIO()
    Image.fromarray(ref[..., 0]).save(gray_png, "PNG")
    assert np.array_equal(jpeg.decode_crop(gray_png.getvalue(), b"", (3, 4, 5, 6)), np.repeat(ref[3:8, 4:10, :1], 3, 2))
    with pytest.raises(jpeg.JpegError):
        jpeg.decode_crop(original[:300], b"", (0, 0, 5, 5))
    with pytest.raises(jpeg.JpegError):
        jpeg.decode_crop(original, b"", (40, 0, 10, 5))


def test_missing_extension_prints_one_line_notice():
    code = (
        "import sys; sys.modules['effitrain._jpegext'] = None  # what a failed build looks like\n"
        "import effitrain.jpeg as j\n"
        "import effitrain.jpeg\n"
        "assert not j.available() and j.decode_crop(j.__doc__ and TEST_JPEG, b'', (0, 0, 2, 2)).shape == (2, 2, 3)\n"
    ).replace("TEST_JPEG", repr(make_jpeg("420", 8, 8)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("effitrain: C JPEG extension not available"), proc.stderr
