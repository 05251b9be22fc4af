"""Read-only access to a store: lazy, fork- and spawn-safe, no pickle."""

from __future__ import annotations

import json
import mmap
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import cached_property
from pathlib import Path

import lmdb
import numpy as np
import pyarrow as pa

from .format import (
    FORMAT_VERSION,
    LEN_KEY,
    META_CLASSES,
    META_FORMAT,
    META_KEY,
    META_OPTIONS,
    META_SKIPPED,
    Record,
    StoreError,
    decode_record,
    meta_from_bytes,
    record_key,
)

try:
    from effitrain._storeio import address as _address
except ImportError:  # the C extension is not built (`make ext`): slower, same result

    def _address(view: memoryview) -> int:
        return np.frombuffer(view, np.uint8).__array_interface__["data"][0]


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a store (an LMDB file, or a directory holding data.mdb)
    rather than an ImageFolder directory; nothing is opened."""
    path = Path(path)
    return path.is_file() or (path / "data.mdb").exists()


# Threads that read records ahead (``Store.prefetch``): enough to keep a disk's queue busy.
PREFETCH_THREADS = 16


class _Handle:
    """A store's LMDB environment in one process, with one read transaction per thread.

    A complete store never changes, so one snapshot serves every read: no transaction is
    begun per record. LMDB allows one open environment per file and process, so every
    Store of the same store in a process shares one handle (read-only, no locks, no
    readahead: random reads).
    """

    def __init__(self, path: Path) -> None:
        self.env = lmdb.open(
            str(path), readonly=True, lock=False, readahead=False, meminit=False, max_readers=2048,
            subdir=path.is_dir(),
        )
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None  # made on first use, in this process
        self._pending: list[Future] = []
        self._pid = os.getpid()
        self._file = path / "data.mdb" if path.is_dir() else path
        self._map: memoryview | None = None  # see lasting
        self._lmdb_map_addr: int | None = None  # where LMDB's map has the file's first byte

    def txn(self) -> lmdb.Transaction:
        txn = getattr(self._local, "txn", None)
        if txn is None:
            txn = self._local.txn = self.env.begin(buffers=True)
        return txn

    def lasting(self, view: memoryview) -> memoryview:
        """The bytes of ``view`` (a value in LMDB's map) in a map of the store's file that
        stays valid as long as the returned view, or any view of it, is alive.

        LMDB's map is unmapped when the store is closed, and a view of it used after that
        crashes the process. This second, read-only map of the same file (the same pages
        of the page cache; no copy) belongs to Python's ``mmap``, which is unmapped only
        once no view of it is left.
        """
        address = _address(view)
        if self._map is None:
            self._lmdb_map_addr = _mapping_base(address)
            if self._lmdb_map_addr is None:  # no /proc here: a copy is lasting too
                return memoryview(bytes(view))
            with open(self._file, "rb") as f:
                self._map = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
        start = address - self._lmdb_map_addr
        return self._map[start : start + len(view)]

    def prefetch(self, keys: Sequence[bytes]) -> None:
        """Read ``keys``' values in background threads, each thread every n-th key in order."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="effitrain-prefetch")
        self._pending = [f for f in self._pending if not f.done()]
        for t in range(min(PREFETCH_THREADS, len(keys))):
            self._pending.append(self._pool.submit(self._touch, keys[t::PREFETCH_THREADS]))

    def _touch(self, keys: Sequence[bytes]) -> None:
        txn = self.txn()
        for key in keys:
            txn.get(key)  # py-lmdb reads every page of the value, without the GIL

    def close(self) -> None:
        # No thread may be inside the map when it is unmapped. A forked child closing the
        # handle it inherited has none of its parent's threads: nothing to wait for.
        if self._pool is not None and self._pid == os.getpid():
            wait(self._pending)
            self._pool.shutdown()
        self._map = None  # unmapped with the last view of it
        self.env.close()  # also ends its transactions


def _mapping_base(address: int) -> int | None:
    """The address of file offset 0 in the file mapping that holds ``address`` (from
    /proc/self/maps; None where there is none). py-lmdb does not say where LMDB mapped
    the file; a store's map never moves once open."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                span, _, offset = line.split(maxsplit=3)[:3]
                low, high = (int(x, 16) for x in span.split("-"))
                if low <= address < high:
                    return low - int(offset, 16)
    except OSError:
        pass
    return None


# Keyed by process id: a forked child (a DataLoader worker) closes the handle it inherited
# and opens its own, as LMDB requires. The pid is kept here, not asked of the kernel per read.
_HANDLES: dict[tuple[int, int, int], _Handle] = {}
_PID = os.getpid()


def _after_fork() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def _file_id(path: Path) -> tuple[int, int]:
    st = os.stat(path / "data.mdb" if path.is_dir() else path)
    return st.st_dev, st.st_ino


def _handle(path: Path, file_id: tuple[int, int]) -> _Handle:
    key = (_PID, *file_id)
    handle = _HANDLES.get(key)
    if handle is None:
        for inherited in [k for k in _HANDLES if k[1:] == file_id]:
            _HANDLES.pop(inherited).close()  # only unmaps it in this process
        handle = _HANDLES[key] = _Handle(path)
    return handle


def _close_handle(file_id: tuple[int, int]) -> None:
    handle = _HANDLES.pop((_PID, *file_id), None)
    if handle is not None:
        handle.close()


class Store:
    """An effitrain store opened for reading.

    The metadata (``meta``: one Arrow row per record) is read and checked when the store is
    opened; the LMDB environment used for records is opened lazily in each process, so a
    ``Store`` can be pickled into DataLoader workers (fork or spawn) and used there.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file_id: tuple[int, int] = (0, 0)
        self.meta = self._load_meta()
        self._len = self.meta.num_rows
        md = self.meta.schema.metadata
        self.classes: list[str] = json.loads(md[META_CLASSES])
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.options: dict = json.loads(md[META_OPTIONS])
        self.skipped: list[dict] = json.loads(md[META_SKIPPED])

    def _load_meta(self) -> pa.Table:
        if not self.path.exists():
            if Path(f"{self.path}.partial").exists():
                raise StoreError(f"{self.path}: conversion not finished (found {self.path}.partial); run convert --resume")
            raise StoreError(f"{self.path}: no such store")
        try:
            self._file_id = _file_id(self.path)
            txn = _handle(self.path, self._file_id).txn()
            meta_view, length_view = txn.get(META_KEY), txn.get(LEN_KEY)
            meta_bytes = None if meta_view is None else bytes(meta_view)  # copies: the table outlives the map
            length = None if length_view is None else bytes(length_view)
        except (OSError, lmdb.Error) as e:
            raise StoreError(f"{self.path}: not an LMDB store ({e})") from None
        try:
            return self._check_meta(meta_bytes, length)
        except StoreError:
            _close_handle(self._file_id)  # hold nothing open for a store we refuse
            raise

    def _check_meta(self, meta_bytes: bytes | None, length: bytes | None) -> pa.Table:
        if meta_bytes is None or length is None:
            raise StoreError(f"{self.path}: not a complete effitrain store (no {META_KEY.decode()} record)")
        try:
            meta = meta_from_bytes(meta_bytes)
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{self.path}: unreadable {META_KEY.decode()} ({e})") from None
        md = meta.schema.metadata or {}
        version = md.get(META_FORMAT)
        if version is None or not all(k in md for k in (META_CLASSES, META_OPTIONS, META_SKIPPED)):
            raise StoreError(f"{self.path}: not an effitrain store (metadata keys missing)")
        if int(version) != FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: store format version {int(version)}, this effitrain reads version {FORMAT_VERSION}"
            )
        if int(length) != meta.num_rows:
            raise StoreError(f"{self.path}: {int(length)} records but {meta.num_rows} metadata rows")
        return meta

    def _txn_env(self) -> lmdb.Environment:
        return _handle(self.path, self._file_id).env

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("labels", None)
        return state

    def __len__(self) -> int:
        return self._len

    @cached_property
    def labels(self) -> list[int]:
        """Every record's label, from the metadata (no record is read)."""
        return self.meta.column("label").to_pylist()

    def _key(self, i: int) -> bytes:
        """The key of record ``i`` (negative ``i`` counts from the end, as for a list)."""
        n = self._len
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for a store of {n}")
        return record_key(i % n)

    def _view(self, key: bytes, lasting: bool = False) -> memoryview:
        """The value under ``key``, as a view into LMDB's map, valid until ``close()``; or
        ``lasting``: into a map that lives as long as the view (``_Handle.lasting``)."""
        handle = _handle(self.path, self._file_id)
        value = handle.txn().get(key)
        if value is None:
            raise StoreError(f"{self.path}: record {key.decode()} is missing")
        return handle.lasting(value) if lasting else value

    def raw(self, i: int) -> bytes:
        """The whole value of record ``i`` (header, index, payload)."""
        return bytes(self._view(self._key(i)))

    def record(self, i: int, copy: bool = True) -> Record:
        """Record ``i`` parsed: header fields, and index and payload as memoryviews.

        copy=False skips copying the value: the views then point into a memory map of the
        store's file (the page cache itself), read-only, valid for as long as they are
        kept, even after ``close()`` (e.g. to hand the payload straight to a decoder).
        """
        key = self._key(i)
        if copy:
            return decode_record(bytes(self._view(key)), key)
        return decode_record(self._view(key, lasting=True), key)

    def prefetch(self, indices: Sequence[int]) -> None:
        """Start reading records ``indices`` into memory in background threads; returns at once.

        py-lmdb touches every page of a value as it returns it, and with the map opened for
        random reads (no readahead) each page not in the page cache is one 4 KiB disk read
        after the other: ~2 ms for a 100 KB record here, against ~0.2 ms to read the same
        bytes from a file. Several records read at once overlap those waits; the records
        already in memory cost a lookup each. The loader calls this for every batch.
        """
        _handle(self.path, self._file_id).prefetch([self._key(i) for i in indices])

    def read(self, i: int, copy: bool = True) -> tuple[bytes | memoryview, int]:
        """The payload and label of record ``i``: the payload copied once from the map into
        ``bytes``, or with copy=False a read-only view of it in the map, which stays
        valid while it is kept (see ``record``): no copy, ~3x faster for 100 KB images."""
        key = self._key(i)
        rec = decode_record(self._view(key, lasting=not copy), key)
        return (bytes(rec.payload) if copy else rec.payload), rec.label

    def close(self) -> None:
        """Close this process's handle on the store (shared by every Store of it here;
        they reopen it on their next read)."""
        _close_handle(self._file_id)
