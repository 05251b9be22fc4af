"""convert: exact ImageFolder equivalence, odd formats, labels file, bad inputs, options."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from conftest import crc_of_tree, encode, write_image_folder
from effitrain.data import ImageFolderLMDB
from effitrain.store.format import Kind
from effitrain.store.prepare import ConvertOptions, default_payload
from effitrain.store.reader import Store
from effitrain.store.scan import SourceError
from effitrain.store.writer import Arena, ConvertError, _PartialStore, _Writeback, convert, partial_path

KEEP = ConvertOptions(payload="keep")


def assert_same_as_imagefolder(store: Path, src: Path) -> None:
    """Classes, targets, sample order and decoded pixels equal torchvision's ImageFolder."""
    ref = ImageFolder(str(src))
    ds = ImageFolderLMDB(store)
    assert ds.classes == ref.classes
    assert ds.class_to_idx == ref.class_to_idx
    assert ds.targets == ref.targets
    assert ds.samples == [(Path(p).relative_to(src).as_posix(), t) for p, t in ref.samples]
    assert len(ds) == len(ref)
    for i in range(len(ref)):
        (img, target), (ref_img, ref_target) = ds[i], ref[i]
        assert target == ref_target
        assert img.mode == "RGB" and img.size == ref_img.size
        assert np.array_equal(np.asarray(img), np.asarray(ref_img)), ds.samples[i]


@pytest.mark.parametrize("workers", [0, 2])
def test_round_trip_equals_imagefolder(image_folder: Path, tmp_path: Path, workers: int) -> None:
    before = crc_of_tree(image_folder)
    summary = convert(image_folder, tmp_path / "s.lmdb", options=KEEP, workers=workers, progress=False)
    assert summary.images == len(ImageFolder(str(image_folder))) and summary.skipped == []
    assert_same_as_imagefolder(tmp_path / "s.lmdb", image_folder)
    store = Store(tmp_path / "s.lmdb")
    for i, (rel, _) in enumerate(ImageFolderLMDB(tmp_path / "s.lmdb").samples):
        assert store.read(i)[0] == (image_folder / rel).read_bytes()  # --keep-bytes: untouched
        assert store.record(i).kind == Kind.ENCODED and store.record(i).check_crc()
    assert crc_of_tree(image_folder) == before
    assert not partial_path(tmp_path / "s.lmdb").exists()


def test_default_payload_reads_back_identically(image_folder: Path, tmp_path: Path) -> None:
    """Whatever the default payload (random-access JPEG where available), pixels are equal."""
    convert(image_folder, tmp_path / "s.lmdb", options=ConvertOptions(payload=default_payload()), workers=0, progress=False)
    assert_same_as_imagefolder(tmp_path / "s.lmdb", image_folder)


def test_flat_folder_with_labels(tmp_path: Path) -> None:
    tree = write_image_folder(tmp_path / "tree", classes=("n02", "n01"), per_class=3)
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = ["# filename,class_name"]
    for path in sorted(tree.rglob("*")):
        if path.is_file() and path.suffix != ".txt":
            (flat / path.name).write_bytes(path.read_bytes())
            lines.append(f"{path.name},{path.relative_to(tree).parts[0]}")
    (flat / "ignored.jpg").write_bytes(encode("jpeg", seed=99))  # not in the label file
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(lines[::-1]) + "\n")  # order in the file does not matter
    convert(flat, tmp_path / "s.lmdb", labels=labels, options=KEEP, workers=0, progress=False)

    # The same files moved into class folders: what ImageFolder would make of them.
    moved = tmp_path / "moved"
    for path in sorted(tree.rglob("*")):
        if path.is_file() and path.suffix != ".txt":
            dest = moved / path.relative_to(tree).parts[0] / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())
    ds, ref = ImageFolderLMDB(tmp_path / "s.lmdb"), ImageFolder(str(moved))
    assert ds.classes == ["n01", "n02"] == ref.classes
    assert ds.samples == [(Path(p).name, t) for p, t in ref.samples]
    assert all(np.array_equal(np.asarray(ds[i][0]), np.asarray(ref[i][0])) for i in range(len(ref)))


@pytest.mark.parametrize(
    "content, message",
    [
        ("nonexistent.jpg,n01", "does not exist"),
        ("a.jpg n01", "expected 'filename,class_name'"),
        ("a.jpg,n01\na.jpg,n02", "listed twice"),
        ("a.txt,n01", "image extension"),
        ("", "no 'filename,class_name' lines"),
    ],
)
def test_bad_labels_file(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(encode("jpeg", seed=1))
    (tmp_path / "flat" / "a.txt").write_text("x")
    (tmp_path / "labels.csv").write_text(content)
    with pytest.raises(SourceError, match=message):
        convert(tmp_path / "flat", tmp_path / "s.lmdb", labels=tmp_path / "labels.csv", options=KEEP, progress=False)


def corrupt_folder(root: Path) -> dict[str, bytes]:
    """Good images around every kind of bad file; returns the bad files' relative paths."""
    good = encode("jpeg", seed=5, size=(64, 48))
    png = encode("png", seed=6)
    bad = {
        "a/truncated.jpg": good[: len(good) // 2],
        "a/zero.jpg": b"",
        "b/text.jpg": b"this is not an image at all\n" * 20,
        "b/truncated.png": png[: len(png) - 30],
        "b/header-only.jpg": good[:200],
    }
    for rel, data in {**bad, "a/good1.jpg": good, "a/good2.png": png, "b/good3.jpg": good,
                      "b/trailing-bytes.jpg": good + b"junk after the end marker"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return bad


@pytest.mark.parametrize("verify_decode", [False, True])
def test_bad_images_are_skipped_and_listed(tmp_path: Path, verify_decode: bool) -> None:
    bad = corrupt_folder(tmp_path / "src")
    warnings: list[str] = []
    options = ConvertOptions(payload="keep", verify_decode=verify_decode)
    summary = convert(tmp_path / "src", tmp_path / "s.lmdb", options=options, workers=0, progress=False,
                      warn=warnings.append)
    assert sorted(s["source"] for s in summary.skipped) == sorted(bad)
    assert len(warnings) == len(bad) and all(any(rel in w for w in warnings) for rel in bad)
    ds = ImageFolderLMDB(tmp_path / "s.lmdb")
    assert [rel for rel, _ in ds.samples] == ["a/good1.jpg", "a/good2.png", "b/good3.jpg", "b/trailing-bytes.jpg"]
    assert sorted(s["source"] for s in ds.store.skipped) == sorted(bad)
    for i, (rel, _) in enumerate(ds.samples):  # PIL accepts bytes after EOI, and so do we
        assert np.array_equal(np.asarray(ds[i][0]), np.asarray(Image.open(tmp_path / "src" / rel).convert("RGB")))


def test_on_error_fail_stops_naming_the_file_and_resumes_after_a_fix(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("0.jpg", "1.jpg", "2.jpg"):
        (src / "c" / name).parent.mkdir(parents=True, exist_ok=True)
        (src / "c" / name).write_bytes(encode("jpeg", seed=int(name[0])))
    (src / "c" / "1.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(ConvertError, match=r"c/1\.jpg"):
        convert(src, tmp_path / "s.lmdb", options=KEEP, on_error="fail", workers=0, progress=False)
    assert not (tmp_path / "s.lmdb").exists() and partial_path(tmp_path / "s.lmdb").exists()
    (src / "c" / "1.jpg").write_bytes(encode("jpeg", seed=1))
    summary = convert(src, tmp_path / "s.lmdb", options=KEEP, on_error="fail", resume=True, workers=0, progress=False)
    assert summary.resumed_from == 1 and summary.processed == 2
    assert_same_as_imagefolder(tmp_path / "s.lmdb", src)


def test_max_size_reencodes_only_big_images(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "c").mkdir(parents=True)
    y, x = np.mgrid[0:120, 0:300]
    smooth = np.stack([x * 255 // 300, y * 255 // 120, (x + y) * 255 // 420], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(smooth).save(out, "PNG")
    big, small = out.getvalue(), encode("jpeg", seed=2, size=(80, 60))
    (src / "c" / "big.png").write_bytes(big)
    (src / "c" / "small.jpg").write_bytes(small)
    convert(src, tmp_path / "s.lmdb", options=ConvertOptions(payload="keep", max_size=100, quality=80),
            workers=0, progress=False)
    ds = ImageFolderLMDB(tmp_path / "s.lmdb")
    assert ds.store.options["max_size"] == 100 and ds.store.options["quality"] == 80
    rec_big, rec_small = ds.store.record(0), ds.store.record(1)
    assert rec_big.kind == Kind.REENCODED and (rec_big.width, rec_big.height) == (100, 40)
    assert Image.open(io.BytesIO(bytes(rec_big.payload))).format == "JPEG"
    assert ds[0][0].size == (100, 40)
    reference = np.asarray(Image.open(io.BytesIO(big)).convert("RGB").resize((100, 40), Image.Resampling.LANCZOS))
    assert np.abs(np.asarray(ds[0][0]).astype(int) - reference).mean() < 2  # a faithful downscale
    assert rec_small.kind == Kind.ENCODED and bytes(rec_small.payload) == small
    assert ds.meta.column("kind").to_pylist() == [Kind.REENCODED, Kind.ENCODED]


def test_existing_out_and_partial_are_refused_without_flags(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.lmdb"
    convert(image_folder, out, options=KEEP, workers=0, progress=False)
    with pytest.raises(ConvertError, match="already exists.*--overwrite"):
        convert(image_folder, out, options=KEEP, workers=0, progress=False)
    convert(image_folder, out, options=ConvertOptions(payload="keep", max_size=30), overwrite=True, workers=0,
            progress=False)
    assert Store(out).options["max_size"] == 30
    assert not out.with_name("s.lmdb.replaced").exists()

    partial = partial_path(tmp_path / "t.lmdb")
    partial.mkdir()
    with pytest.raises(ConvertError, match="interrupted conversion.*--resume"):
        convert(image_folder, tmp_path / "t.lmdb", options=KEEP, progress=False)
    env = lmdb.open(str(partial))
    with env.begin(write=True) as txn:
        txn.put(b"something", b"else")
    env.close()
    with pytest.raises(ConvertError, match="not an effitrain conversion"):
        convert(image_folder, tmp_path / "t.lmdb", options=KEEP, resume=True, progress=False)


def test_resume_with_other_options_or_files_is_refused(image_folder: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(image_folder, src)
    (src / "bee" / "bee_001.png").write_bytes(b"broken")
    out = tmp_path / "s.lmdb"
    with pytest.raises(ConvertError):
        convert(src, out, options=KEEP, on_error="fail", workers=0, progress=False)
    with pytest.raises(ConvertError, match="other options.*max_size"):
        convert(src, out, options=ConvertOptions(payload="keep", max_size=10), resume=True, workers=0, progress=False)
    (src / "bee" / "bee_001.png").unlink()
    with pytest.raises(ConvertError, match="different listing"):
        convert(src, out, options=KEEP, resume=True, workers=0, progress=False)


@pytest.mark.parametrize("workers", [0, 2])
def test_map_grows_as_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    monkeypatch.setattr(_PartialStore, "GROW_MIN", 256 << 10)  # start tiny: force several growths
    monkeypatch.setattr(Arena, "SLOT_BYTES", 300 << 10)  # and some records too big for their arena slot
    src = tmp_path / "src"
    (src / "c").mkdir(parents=True)
    for i in range(8):
        noise = np.random.default_rng(i).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)
        Image.fromarray(noise).save(src / "c" / f"{i}.png")  # ~120 KB each, incompressible
    convert(src, tmp_path / "s.lmdb", options=KEEP, workers=workers, commit_bytes=300 << 10, progress=False)
    assert_same_as_imagefolder(tmp_path / "s.lmdb", src)
    assert (tmp_path / "s.lmdb" / "data.mdb").stat().st_size < 2 * sum(p.stat().st_size for p in src.rglob("*.png"))


def resident_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all), by mincore(2) on a fresh map."""
    import ctypes
    import mmap

    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
            return sum(b & 1 for b in vec.raw), pages
        finally:
            libc.munmap(addr, size)


def test_written_pages_leave_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once on disk, the store's pages are dropped from the page cache (all but the newest
    few, and those the kernel keeps), and the store is intact."""
    monkeypatch.setattr(_Writeback, "KEEP_CACHED", 64 << 10)
    monkeypatch.setattr(_Writeback, "DROP_STEP", 16 << 10)
    src = tmp_path / "src"
    for c in "ab":
        (src / c).mkdir(parents=True)
        for i in range(12):
            noise = np.random.default_rng(ord(c) * 100 + i).integers(0, 256, size=(100, 100, 3), dtype=np.uint8)
            Image.fromarray(noise).save(src / c / f"{i}.png")  # ~30 KB each, incompressible
    convert(src, tmp_path / "s.lmdb", options=KEEP, commit_bytes=40 << 10, progress=False)
    resident, pages = resident_pages(tmp_path / "s.lmdb" / "data.mdb")
    # Not all of them: pages LMDB mapped, or whose buffers ext4 still holds, stay (137 of
    # 201 here, ~30% of a 620 MB store); with nothing dropped, all 201 are resident.
    assert pages > 150 and resident < 0.8 * pages, (resident, pages)
    assert_same_as_imagefolder(tmp_path / "s.lmdb", src)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such folder"),
        (lambda p: p.mkdir(), "Couldn't find any class folder"),
        (lambda p: (p / "c").mkdir(parents=True), "Found no valid file for the classes c"),
        (lambda p: p.write_text("x"), "not a folder"),
    ],
)
def test_unusable_source_is_a_clear_error(tmp_path: Path, make, message: str) -> None:
    make(tmp_path / "src")
    with pytest.raises(SourceError, match=message):
        convert(tmp_path / "src", tmp_path / "s.lmdb", options=KEEP, progress=False)
    assert not (tmp_path / "s.lmdb").exists() and not partial_path(tmp_path / "s.lmdb").exists()


def test_keep_bytes_default_reads_in_a_thread_and_its_errors_reach_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--keep-bytes alone uses no worker process; an unexpected failure of the reader
    thread stops convert with that error and keeps the committed prefix for --resume."""
    import effitrain.store.writer as writer

    src = tmp_path / "src"
    (src / "c").mkdir(parents=True)
    for i in range(2 * writer.CHUNK + 5):
        (src / "c" / f"{i:03d}.png").write_bytes(encode("png", seed=i))
    monkeypatch.setattr(writer.mp, "get_context", lambda *a: pytest.fail("a worker process was started"))
    real_prepare = writer.prepare_files

    def failing(paths: list[str], labels: list[int], options: ConvertOptions):
        if any(path.endswith("040.png") for path in paths):
            raise MemoryError("out of memory in the reader")
        return real_prepare(paths, labels, options)

    monkeypatch.setattr(writer, "prepare_files", failing)
    with pytest.raises(MemoryError, match="in the reader"):
        convert(src, tmp_path / "s.lmdb", options=KEEP, commit_bytes=1, progress=False)
    monkeypatch.setattr(writer, "prepare_files", real_prepare)
    summary = convert(src, tmp_path / "s.lmdb", options=KEEP, resume=True, progress=False)
    assert 0 < summary.resumed_from <= 40 and summary.images == 2 * writer.CHUNK + 5
    assert_same_as_imagefolder(tmp_path / "s.lmdb", src)


def test_resume_finishes_a_partial_store_with_arrow_metadata_batches(tmp_path: Path) -> None:
    """A partial store whose metadata batches an earlier effitrain wrote as Arrow streams
    (now JSON rows) is resumed into the same store as an uninterrupted run."""
    import pyarrow as pa

    from effitrain.store.format import META_SCHEMA, meta_to_bytes
    from effitrain.store.writer import BATCH_PREFIX

    src = tmp_path / "src"
    for i in range(6):
        (src / "c").mkdir(parents=True, exist_ok=True)
        (src / "c" / f"{i}.png").write_bytes(encode("png", seed=i))
    (src / "c" / "4.png").write_bytes(b"not an image")
    with pytest.raises(ConvertError, match=r"c/4\.png"):
        convert(src, tmp_path / "s.lmdb", options=KEEP, on_error="fail", commit_bytes=1, progress=False)
    with lmdb.open(str(partial_path(tmp_path / "s.lmdb")), subdir=True) as env, env.begin(write=True) as txn:
        batches = [(k, v) for k, v in txn.cursor() if k.startswith(BATCH_PREFIX)]
        assert len(batches) == 4
        for key, value in batches[:2]:  # the first two as an older effitrain wrote them
            rows = json.loads(value)
            columns = {name: [row[i] for row in rows] for i, name in enumerate(META_SCHEMA.names)}
            txn.put(key, meta_to_bytes(pa.table(columns, schema=META_SCHEMA)))
    (src / "c" / "4.png").write_bytes(encode("png", seed=4))
    convert(src, tmp_path / "s.lmdb", options=KEEP, on_error="fail", resume=True, progress=False)
    convert(src, tmp_path / "ref.lmdb", options=KEEP, progress=False)
    assert Store(tmp_path / "s.lmdb").meta.equals(Store(tmp_path / "ref.lmdb").meta, check_metadata=True)
    assert_same_as_imagefolder(tmp_path / "s.lmdb", src)
