"""The store format and its reader: records, metadata, refusal of anything not a complete
effitrain store of this version."""

from __future__ import annotations

import shutil
from pathlib import Path

import lmdb
import pyarrow as pa
import pytest

from effitrain.store.format import (
    FORMAT_VERSION,
    HEADER,
    KEYS_KEY,
    LEN_KEY,
    META_FORMAT,
    META_KEY,
    META_SCHEMA,
    Kind,
    StoreError,
    decode_record,
    encode_record,
    meta_from_bytes,
    meta_to_bytes,
    record_key,
    with_store_metadata,
)
from effitrain.store import reader
from effitrain.store.reader import Store


def rewrite(path: Path, **items: bytes | None) -> None:
    """Put (or, for None, delete) raw LMDB items in a store."""
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        for key, value in items.items():
            if value is None:
                txn.delete(key.encode())
            else:
                txn.put(key.encode(), value)
    env.close()


def test_record_round_trip_and_crc() -> None:
    value = encode_record(b"payload", label=7, width=3, height=2, kind=Kind.RANDOM_ACCESS_JPEG, index=b"idx")
    rec = decode_record(value, record_key(5))
    assert (rec.kind, rec.label, rec.width, rec.height) == (Kind.RANDOM_ACCESS_JPEG, 7, 3, 2)
    assert bytes(rec.index) == b"idx" and bytes(rec.payload) == b"payload" and rec.check_crc()
    flipped = bytearray(value)
    flipped[-1] ^= 1
    assert not decode_record(bytes(flipped)).check_crc()
    assert record_key(5) == b"img-000000005" and record_key(10) > record_key(9)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda v: v[:10], "shorter than its header"),
        (lambda v: b"JUNK" + v[4:], "bad magic"),
        (lambda v: v[:4] + bytes([FORMAT_VERSION + 1]) + v[5:], "format version"),
        (lambda v: v[:5] + bytes([99]) + v[6:], "unknown payload kind"),
        (lambda v: v[: HEADER.size - 4] + (10**6).to_bytes(4, "little") + v[HEADER.size :], "index runs past"),
    ],
)
def test_malformed_records_are_refused(mutate, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        decode_record(mutate(encode_record(b"payload", 1, 2, 3)), b"img-000000001")


def test_metadata_round_trip() -> None:
    table = pa.Table.from_pylist(
        [{"key": "img-000000000", "label": 1, "width": 4, "height": 5, "nbytes": 6, "kind": 0, "source": "a/b.jpg"}],
        schema=META_SCHEMA,
    )
    table = with_store_metadata(table, ["x", "y"], {"payload": "keep"}, [{"source": "c.jpg", "error": "empty file"}])
    back = meta_from_bytes(meta_to_bytes(table))
    assert back.equals(table) and back.schema.metadata == table.schema.metadata


def test_store_reads_labels_and_sizes_from_metadata(image_store: Path) -> None:
    store = Store(image_store)
    assert store.classes == ["ant", "bee", "cat"] and store.class_to_idx == {"ant": 0, "bee": 1, "cat": 2}
    assert store.labels == sorted(store.labels) and set(store.labels) == {0, 1, 2}
    for i in (0, len(store) - 1, -1):
        rec = store.record(i)
        row = store.meta.slice(i % len(store), 1).to_pylist()[0]
        assert (rec.label, rec.width, rec.height, len(rec.payload)) == (row["label"], row["width"], row["height"], row["nbytes"])
    assert store.read(-1) == store.read(len(store) - 1)
    view = store.record(2, copy=False)
    assert view == store.record(2) and bytes(view.payload) == store.read(2)[0]
    with pytest.raises(IndexError):
        store.read(len(store))
    with store._txn_env().begin() as txn:
        assert int(txn.get(LEN_KEY)) == len(store)
        assert txn.get(KEYS_KEY).decode().split("\n") == store.meta.column("key").to_pylist()
        assert [k for k, _ in txn.cursor() if not k.startswith(b"img-")] == [KEYS_KEY, LEN_KEY, META_KEY]
    assert Store(image_store).read(2) == store.read(2)  # two Stores of one store in one process


def test_views_stay_valid_after_close(image_store: Path) -> None:
    """copy=False views are read-only, equal to the copies, and still readable once the
    store is closed (LMDB's own map is gone by then)."""
    store = Store(image_store)
    payload, label = store.read(2, copy=False)
    rec = store.record(1, copy=False)
    copies = store.read(2), store.record(1)
    assert isinstance(payload, memoryview) and payload.readonly
    assert (payload, label) == copies[0] and rec == copies[1] and rec.check_crc()
    store.close()
    assert not any(key[1:] == store._file_id for key in reader._HANDLES)
    assert bytes(payload) == copies[0][0] and rec == copies[1] and rec.check_crc()
    assert store.read(2, copy=False) == copies[0]  # reopened on the next read


def test_foreign_lmdb_is_refused(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "plain"))
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    with pytest.raises(StoreError, match="not a complete effitrain store"):
        Store(tmp_path / "plain")
    (tmp_path / "file").write_bytes(b"x" * 5000)
    with pytest.raises(StoreError, match="not an LMDB store"):
        Store(tmp_path / "file")
    with pytest.raises(StoreError, match="no such store"):
        Store(tmp_path / "missing")


def test_incomplete_stores_are_refused(image_store: Path, tmp_path: Path) -> None:
    (tmp_path / "x.lmdb.partial").mkdir()
    with pytest.raises(StoreError, match="not finished.*--resume"):
        Store(tmp_path / "x.lmdb")
    copy = tmp_path / "nometa.lmdb"
    shutil.copytree(image_store, copy)
    rewrite(copy, __meta__=None)
    with pytest.raises(StoreError, match="not a complete effitrain store"):
        Store(copy)
    shutil.rmtree(copy)
    shutil.copytree(image_store, copy)
    rewrite(copy, __len__=b"1")
    with pytest.raises(StoreError, match="1 records but"):
        Store(copy)


def test_other_format_version_is_refused(image_store: Path, tmp_path: Path) -> None:
    copy = tmp_path / "v99.lmdb"
    shutil.copytree(image_store, copy)
    meta = Store(image_store).meta
    md = dict(meta.schema.metadata)
    md[META_FORMAT] = b"99"
    rewrite(copy, __meta__=meta_to_bytes(meta.replace_schema_metadata(md)))
    with pytest.raises(StoreError, match="version 99"):
        Store(copy)
    rewrite(copy, __meta__=b"not arrow")
    with pytest.raises(StoreError, match="unreadable __meta__"):
        Store(copy)
