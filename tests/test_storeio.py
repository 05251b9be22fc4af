"""The store's C file reader and CRC32 (effitrain._storeio) against Python's os and zlib."""

from __future__ import annotations

import errno
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from effitrain.store import prepare
from effitrain.store.format import HEADER

storeio = pytest.importorskip("effitrain._storeio", reason="the C extension is not built (make ext)")


@pytest.mark.parametrize("simd", [True, False])
def test_crc32_equals_zlib(simd: bool) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    lengths = [*range(0, 200), 255, 256, 257, 4095, 4096, 65_537, 102_400, 299_983]
    for n in lengths:
        for offset in (0, 1, 7, 13):  # unaligned starts too
            chunk = data[offset : offset + n]
            for value in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):  # continuing a running CRC
                assert storeio.crc32(chunk, value, simd=simd) == zlib.crc32(chunk, value), (n, offset, value)
    assert storeio.crc32(memoryview(data)[5:70_000]) == zlib.crc32(data[5:70_000])  # any buffer


def test_read_files_equals_python_reads(tmp_path: Path) -> None:
    """Buffers, room for the header and CRCs equal the pure-Python path's, for sizes around
    the read and fold boundaries, an empty file and more files than one group."""
    rng = np.random.default_rng(1)
    sizes = [0, 1, 15, 16, 63, 64, 65, 4096, 100_003, *rng.integers(1, 50_000, 150).tolist()]
    paths = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"{i}.bin"
        path.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        paths.append(str(path))
    got = storeio.read_files(paths, HEADER.size)
    assert len(got) == len(paths)
    for path, (buf, crc) in zip(paths, got):
        data = Path(path).read_bytes()
        assert isinstance(buf, bytearray) and len(buf) == HEADER.size + len(data)
        assert buf[HEADER.size :] == data and crc == zlib.crc32(data)
        assert buf[HEADER.size :] == prepare.read_after_header(path)[HEADER.size :]


def test_read_files_reports_errors_per_file(tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    good.write_bytes(b"abc")
    got = storeio.read_files([str(tmp_path / "missing.jpg"), str(tmp_path), str(good)], 4)
    assert got[0] == (None, errno.ENOENT)
    assert got[1] == (None, errno.EISDIR)
    assert got[2][0][4:] == b"abc" and got[2][1] == zlib.crc32(b"abc")


def test_prepare_reads_with_or_without_the_extension(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``read_files`` gives the same reads with the C reader and without it, errors as
    OSErrors naming the file, and a file whose size is not what fstat says (here a /proc
    file: size 0, content not empty) read again the simple way."""
    path = tmp_path / "x.bin"
    path.write_bytes(os.urandom(10_000))
    paths = [str(path), str(tmp_path / "missing.jpg"), "/proc/self/cmdline"]
    with_c = prepare.read_files(paths)
    monkeypatch.setattr(prepare, "_storeio", None)
    without = prepare.read_files(paths)
    room = HEADER.size  # left for the header, not yet written
    assert with_c[0][0][room:] == without[0][0][room:] == path.read_bytes()
    assert with_c[0][1] == zlib.crc32(path.read_bytes())
    assert without[0][1] is None  # computed later, only where the file's bytes are the payload
    for errs in (with_c, without):
        assert isinstance(errs[1], FileNotFoundError) and errs[1].filename == paths[1]
        assert errs[2][0][room:].startswith(Path("/proc/self/cmdline").read_bytes()[:8])


def test_address_is_where_the_bytes_are() -> None:
    from effitrain.store import reader

    data = np.arange(1000, dtype=np.uint8)
    view = memoryview(data.tobytes())[100:]
    expected = np.frombuffer(view, np.uint8).__array_interface__["data"][0]
    assert storeio.address(view) == expected == reader._address(view)
    with pytest.raises(TypeError):
        storeio.address("not a buffer")
