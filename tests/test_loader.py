"""make_loader: batches from a store or an ImageFolder, reproducible, resumable, sharded."""

from pathlib import Path
from types import SimpleNamespace

import lmdb
import numpy as np
import pytest
import torch
from conftest import CUDA, write_image_folder

from effitrain import jpeg
from effitrain.data import decode, make_loader
from effitrain.data.decode import DecodeError
from effitrain.data import loader as loader_module
from effitrain.data.loader import BufferPool, EpochOrder
from effitrain.store.format import Kind, decode_record, encode_record, record_key
from effitrain.store.prepare import ConvertOptions
from effitrain.store.reader import Store
from effitrain.store.writer import convert

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

SIZE = 64  # small outputs keep the tests fast; the code path is the same as for 224
VAL_RESIZE = 73


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """21 images (an odd count) of every format and mode conftest knows: JPEGs (4:2:0, 4:4:4,
    progressive, grayscale, CMYK), PNGs (RGBA, palette, 16-bit), BMP, TIFF, PPM/PGM."""
    return write_image_folder(tmp_path_factory.mktemp("folder") / "train", per_class=7)


@pytest.fixture(scope="module")
def store(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "train.lmdb"
    convert(folder, out, workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def ra_store(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default store: JPEGs transcoded for random access where the C extension is built."""
    out = tmp_path_factory.mktemp("ra") / "train.lmdb"
    convert(folder, out, options=ConvertOptions(payload="random-access"), workers=0, progress=False)
    return out


def batches(source, train=True, batch_size=4, workers=0, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = make_loader(source, train, batch_size, workers, image_size=SIZE, val_resize=VAL_RESIZE, **kw)
    return list(loader)


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batches_shape_dtype_and_labels(store: Path) -> None:
    loader = make_loader(store, True, 4, 0, image_size=SIZE, device="cpu")
    assert len(loader) == 21 // 4  # the short last batch is dropped in training
    out = list(loader)
    assert len(out) == 5
    images, labels = out[0]
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.uint8
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64
    seen = torch.cat([y for _, y in out])
    assert len(set(seen.tolist()) - {0, 1, 2}) == 0 and len(seen) == 20
    assert (images.float().std(dim=(1, 2, 3)) > 10).all()  # real pixels, not an empty buffer


def test_store_and_folder_give_the_same_batches(store: Path, folder: Path) -> None:
    # The store keeps the files' bytes, in ImageFolder's order and labels: same pixels.
    assert_same(batches(store), batches(folder))
    assert_same(batches(store, train=False), batches(Store(store), train=False))


@pytest.mark.skipif(not jpeg.available(), reason="the C JPEG extension is not built")
def test_random_access_store_gives_the_pixels_of_the_files(ra_store: Path, folder: Path) -> None:
    kinds = Store(ra_store).meta.column("kind").to_pylist()
    assert kinds.count(Kind.RANDOM_ACCESS_JPEG) == 8  # the JPEGs (4 kinds x 2) but the CMYK ones
    for train in (True, False):
        assert_same(batches(ra_store, train=train), batches(folder, train=train))


def test_without_the_c_extension_batches_are_the_same(ra_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = batches(ra_store)
    monkeypatch.setattr(decode.jpeg, "available", lambda: False)  # torchvision.io / PIL full decode + crop
    assert_same(batches(ra_store), ref)


def test_same_seed_same_batches_any_worker_count(store: Path) -> None:
    ref = batches(store, seed=5)
    assert_same(ref, batches(store, seed=5, workers=2))
    other = batches(store, seed=6)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(ref, other))


def test_epochs_differ_and_advance_by_themselves(store: Path) -> None:
    loader = make_loader(store, True, 4, 0, image_size=SIZE)
    epoch0, epoch1 = list(loader), list(loader)  # a full pass moves on to the next epoch
    assert not torch.equal(torch.cat([y for _, y in epoch0]), torch.cat([y for _, y in epoch1]))
    loader.set_epoch(0)
    assert_same(list(loader), epoch0)
    loader.set_epoch(1)
    assert_same(list(loader), epoch1)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_rest_of_the_epoch(store: Path, workers: int) -> None:
    loader = make_loader(store, True, 4, workers, image_size=SIZE, seed=1)
    loader.set_epoch(3)
    full = list(loader)
    for k in (0, 2, 5):
        loader.set_epoch(3, start_batch=k)
        assert_same(list(loader), full[k:])
    after = list(loader)  # a resumed pass that ends moves on to the next epoch too
    loader.set_epoch(4)
    assert_same(list(loader), after)
    with pytest.raises(ValueError, match="start_batch 6 is outside 0..5"):
        loader.set_epoch(3, start_batch=6)


def test_distributed_val_covers_every_image_once(store: Path) -> None:
    # 21 images over 2 ranks: 11 and 10, no padding duplicates.
    n = len(Store(store))
    single = batches(store, train=False, batch_size=4)
    images = torch.cat([x for x, _ in single])
    shards = []
    for rank in range(2):
        part = batches(store, train=False, batch_size=4, distributed=True, rank=rank, world_size=2)
        shard = torch.cat([x for x, _ in part])
        assert torch.equal(shard, images[rank::2])
        shards.append(len(shard))
    assert shards == [11, 10] and sum(shards) == n == 21
    order = [EpochOrder(21, 4, False, 0, r, 2) for r in range(2)]
    assert sorted(np.concatenate([o.indices(0) for o in order]).tolist()) == list(range(21))


def test_distributed_train_shards_are_disjoint_and_equal(store: Path) -> None:
    orders = [EpochOrder(21, 3, True, 7, r, 2) for r in range(2)]
    a, b = (o.indices(2) for o in orders)
    assert len(a) == len(b) == 10 and not set(a) & set(b)
    assert orders[0].num_batches == orders[1].num_batches == 3
    opened = Store(store)
    loader = make_loader(opened, True, 3, 0, image_size=SIZE, seed=7, rank=1, world_size=2)
    loader.set_epoch(2)
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == [opened.labels[i] for i in b[:9]]


def test_bad_arguments_and_sources(tmp_path: Path, store: Path) -> None:
    with pytest.raises(ValueError, match="neither an effitrain store nor an ImageFolder"):
        make_loader(tmp_path / "missing", True, 4, 0)
    with pytest.raises(ValueError, match="decode must be one of"):
        make_loader(store, True, 4, 0, decode="tpu")
    with pytest.raises(ValueError, match="21 images make no batch of 32 on each of 1 rank"):
        make_loader(store, True, 32, 0)
    with pytest.raises(ValueError, match="distributed=True needs torch.distributed"):
        make_loader(store, True, 4, 0, distributed=True)


def corrupt_copy(store: Path, out: Path, index: int) -> None:
    """Copy ``store`` and garble record ``index``'s JPEG data (header and CRC kept valid)."""
    out.mkdir()
    (out / "data.mdb").write_bytes((store / "data.mdb").read_bytes())
    env = lmdb.open(str(out), subdir=True, lock=False)
    with env.begin(write=True) as txn:
        rec = decode_record(txn.get(record_key(index)))
        garbled = bytes(rec.payload[:20]) + bytes(len(rec.payload) - 20)
        txn.put(record_key(index), encode_record(garbled, rec.label, rec.width, rec.height, rec.kind, bytes(rec.index)))
    env.close()


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_record_raises_naming_it(store: Path, tmp_path: Path, workers: int) -> None:
    bad = tmp_path / "bad.lmdb"
    corrupt_copy(store, bad, 6)
    loader = make_loader(bad, False, 7, workers, image_size=SIZE, val_resize=VAL_RESIZE)
    with pytest.raises(DecodeError, match=r"bad.lmdb: record img-000000006: cannot decode image"):
        list(loader)
    # Resuming after the batch that holds it never reads it: skipped batches are not decoded.
    loader.set_epoch(0, start_batch=1)
    assert len(list(loader)) == 2


@pytest.mark.parametrize("which", ["store", "ra_store"])
def test_gpu_decode_path_on_cpu_matches_cpu_path(which: str, request: pytest.FixtureRequest) -> None:
    # decode="gpu" with device="cpu": workers cut crop JPEGs, torchvision.io decodes them here.
    source = request.getfixturevalue(which)
    for train in (True, False):
        cpu = batches(source, train=train, seed=2)
        gpu = batches(source, train=train, seed=2, decode="gpu", device="cpu")
        assert_same(cpu, gpu)


@CUDA
@pytest.mark.parametrize("which", ["store", "ra_store"])
def test_gpu_decode_on_cuda_is_close_to_cpu_path(which: str, request: pytest.FixtureRequest) -> None:
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg's by a level or two; the crops,
    # flips, labels and the samples the workers decode themselves (non-JPEGs) are the same.
    source = request.getfixturevalue(which)
    cpu = batches(source, seed=2)
    gpu = batches(source, seed=2, decode="gpu", device="cuda")
    assert len(cpu) == len(gpu)
    for (xa, ya), (xb, yb) in zip(cpu, gpu):
        assert xb.device.type == "cuda" and xb.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(ya, yb.cpu())
        diff = (xa.int() - xb.cpu().int()).abs().float()
        assert diff.mean() < 2.0 and diff.flatten(1).mean(1).max() < 4.0, (diff.mean(), diff.max())


@CUDA
@pytest.mark.parametrize("workers", [0, 2])
def test_cpu_decoded_batches_for_cuda_are_pinned_and_equal(store: Path, workers: int) -> None:
    # Pinned host memory is what lets the prefetcher's copies run asynchronously.
    plain = batches(store, seed=3, workers=workers, device="cpu")
    pinned = batches(store, seed=3, workers=workers, device="cuda")
    assert all(x.is_pinned() for x, _ in pinned) and not any(x.is_pinned() for x, _ in plain)
    assert_same(plain, pinned)


def test_buffer_pool_reuses_only_released_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = BufferPool(workers=2, slots=2, batch_size=4, image_size=8)
    monkeypatch.setattr(loader_module, "get_worker_info", lambda: SimpleNamespace(id=1))  # in worker 1
    (a, slot_a), (b, slot_b), (c, slot_c) = pool.take(4), pool.take(3), pool.take(4)
    assert (slot_a, slot_b, slot_c) == (0, 1, -1)  # none free for the third: a fresh batch
    assert b.shape == (3, 3, 8, 8) and a.is_shared() and c.is_shared()
    assert a.is_contiguous(memory_format=torch.channels_last)
    pool.release(1, 0)  # the main process copied batch `a` out
    d, slot_d = pool.take(4)
    assert slot_d == 0 and d.data_ptr() == a.data_ptr()
    assert pool.take(4)[1] == -1 and pool.free[0].all()  # worker 0's buffers untouched
    assert BufferPool(workers=2, slots=0, batch_size=4, image_size=8).take(4)[1] == -1
