"""``convert``: pack a folder of images into a store, in parallel and crash-safe.

Data flow: the source listing (``scan``) is cut into small chunks, and each image is
``prepare``d (read, check, CRC, maybe re-encode or transcode) into its finished record.
Files kept as they are (``--keep-bytes``) are read by a thread of the writer's process
(in C where built, a chunk at a time without the GIL), straight into the buffer that
becomes the record, which the writer hands to LMDB: nothing crosses between processes. Work
that needs the CPU (transcode, re-encode) runs in worker processes, which leave their
records in memory shared with the writer (``Arena``) and send back only a small result.
The single writer takes the records in source order, puts them into LMDB and commits
them in transactions of a few megabytes.

Crash safety: everything is written to ``OUT.partial``. Each transaction holds a batch of
records together with the batch's metadata rows and the progress (next source index,
records written, files skipped), so after ``kill -9`` the partial store holds exactly a
prefix of the job, and ``--resume`` continues from there; the result is identical to an
uninterrupted run. Only the last step writes ``__meta__``, syncs, and renames the folder
to OUT. Commits do not wait for the disk (a killed process loses nothing the kernel has;
a thread writes committed pages out beside the work and drops them from the page cache),
the final sync before the rename makes the store durable.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import gc
import json
import mmap
import multiprocessing as mp
import os
import queue
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
import pyarrow as pa

from effitrain import __version__

from ..cpus import usable_cpus
from .format import (
    KEYS_KEY,
    LEN_KEY,
    META_KEY,
    META_SCHEMA,
    META_SKIPPED,
    meta_from_bytes,
    meta_to_bytes,
    record_key,
    with_store_metadata,
)
from .prepare import ConvertOptions, Prepared, prepare, prepare_files
from .scan import Source, scan

PROGRESS_KEY = b"__progress__"
BATCH_PREFIX = b"__batch__"
ON_ERROR = ("skip", "fail")
CHUNK = 32  # images per worker task: small enough to keep results ordered and memory flat
READ_THREADS = 1  # with no worker processes: threads reading ahead of the writer (2: no faster)

try:  # Linux: start writing a file's dirty pages to disk without waiting for them
    _SYNC_FILE_RANGE = ctypes.CDLL(None, use_errno=True).sync_file_range
    _SYNC_FILE_RANGE.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
except (OSError, AttributeError):
    _SYNC_FILE_RANGE = None
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


class ConvertError(Exception):
    """Conversion cannot start or continue (OUT exists, bad image with --on-error fail, ...)."""


@dataclass
class Summary:
    """What a conversion did; ``seconds``, ``processed`` and rates cover this run only."""

    out: str
    images: int = 0
    classes: int = 0
    skipped: list[dict] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    processed: int = 0
    processed_bytes: int = 0
    resumed_from: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.processed_bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "out": self.out,
            "images": self.images,
            "classes": self.classes,
            "skipped": self.skipped,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "resumed_from": self.resumed_from,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 1),
            "mb_per_s": round(self.mb_per_s, 1),
        }

    def lines(self) -> list[str]:
        """The summary for people."""
        out = [
            f"wrote {self.out}: {self.images:,} images, {self.classes:,} classes, {len(self.skipped):,} skipped",
            f"bytes in {self.bytes_in / 1e6:,.1f} MB, out {self.bytes_out / 1e6:,.1f} MB",
            f"{self.processed:,} images in {self.seconds:.1f} s: {self.images_per_s:,.0f} images/s, "
            f"{self.mb_per_s:,.1f} MB/s" + (f" (resumed at source image {self.resumed_from:,})" if self.resumed_from else ""),
        ]
        out += [f"skipped {s['source']}: {s['error']}" for s in self.skipped]
        return out


def partial_path(out: str | os.PathLike) -> Path:
    """Where a conversion to ``out`` is built until it is complete."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    labels: str | os.PathLike | None = None,
    options: ConvertOptions = ConvertOptions(),
    workers: int | None = None,
    on_error: str = "skip",
    resume: bool = False,
    overwrite: bool = False,
    commit_bytes: int = 1 << 20,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> Summary:
    """Convert the ImageFolder tree ``src`` (or flat folder + ``labels``) into the store ``out``.

    workers: processes that prepare images (0: a thread of this process reads ahead of the
      writer). Default: 0 when every file is stored as it is (``payload="keep"``, no
      ``max_size``, no ``verify_decode``): that work is I/O and CRC, and processes would only
      add copies and CPU; else the CPU count (transcode and re-encode need the cores).
    on_error: ``"skip"`` bad images (warned and listed in the metadata) or ``"fail"``.
    resume: continue ``OUT.partial`` left by an interrupted run with the same arguments.
    overwrite: replace an existing ``out`` (only once the new store is complete).
    commit_bytes: payload bytes per LMDB transaction (the unit of crash recovery). Small
      transactions are faster: LMDB's dirty pages stay in the CPU cache until written, and
      each commit writes less at once (1 MB: about half the time of 8 MB, RESULTS.md).
    warn: called with one line per skipped file (default: printed on stderr).
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    out = Path(out)
    partial = partial_path(out)
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} already exists; pass --overwrite to replace it")
    if partial.exists() and not resume:
        if not overwrite:
            raise ConvertError(
                f"{partial} holds an interrupted conversion; pass --resume to continue it or --overwrite to start over"
            )
        shutil.rmtree(partial)

    source = scan(src, labels)
    store_options = {
        **options.to_dict(),
        "source": str(source.root.resolve()),
        "labels_file": None if labels is None else str(Path(labels).resolve()),
        "effitrain_version": __version__,
    }
    if workers is None:
        io_only = options.payload == "keep" and options.max_size is None and not options.verify_decode
        workers = 0 if io_only else usable_cpus()
    started = time.perf_counter()

    store = _PartialStore(partial, functools.partial(_rebuild, source=source, options=options))
    try:
        with _gc_paused():
            state = _start_or_resume(store, source, store_options)
            summary = Summary(str(out), classes=len(source.classes), resumed_from=state["next"] or 0)
            if state["next"] is not None:
                _run(store, source, options, state, workers, on_error, commit_bytes, progress, warn, summary)
                _finish(store, source, store_options, state)
            summary.images = state["written"]
            summary.skipped = state["skipped"]
            summary.bytes_in, summary.bytes_out = state["bytes_in"], state["bytes_out"]
    finally:
        store.close()
    _publish(partial, out)
    summary.seconds = time.perf_counter() - started
    return summary


class _PartialStore:
    """The LMDB of ``OUT.partial``, written by this process only, one transaction at a time.

    Records go into the open transaction as they come and are committed together with the
    progress. If the map fills up, the transaction is redone in a larger map: its records
    are rebuilt from their source files (``rebuild(source index)``), so they never pile up
    in memory and the map grows only as needed.
    """

    GROW_MIN, GROW_MAX = 1 << 30, 64 << 30

    def __init__(self, path: Path, rebuild: Callable[[int], bytes | bytearray]) -> None:
        self.path = path
        self.rebuild = rebuild
        path.mkdir(parents=True, exist_ok=True)
        # One writer per partial store: a second convert of the same OUT would interleave
        # commits. Lock before LMDB touches the file.
        self.fd = os.open(path / "data.mdb", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ConvertError(f"{path} is being written by another convert") from None
        self.env = lmdb.open(
            str(path), map_size=max(self.GROW_MIN, os.fstat(self.fd).st_size), subdir=True, sync=False,
            metasync=False, meminit=False, max_dbs=0, readahead=False,
        )
        self._txn: lmdb.Transaction | None = None
        self._records: list[tuple[bytes, int]] = []  # key, source index: in the open transaction
        self._page = self.env.stat()["psize"]
        self._writeback = _Writeback(self.fd)

    def put_record(self, key: bytes, value: bytes | bytearray | memoryview, index: int) -> None:
        """Put one record (built from the source image ``index``) into the open transaction."""
        if self._txn is None:
            self._txn = self.env.begin(write=True)
        try:
            self._txn.put(key, value, append=True)  # image keys are the largest and increase
        except lmdb.MapFullError:
            self._redo_larger()
            self._txn.put(key, value, append=True)
        self._records.append((key, index))

    def commit(self, puts: dict[bytes, bytes], deletes: tuple[bytes, ...] = ()) -> None:
        """Add ``puts`` and ``deletes`` to the open transaction and commit it atomically."""
        if self._txn is None:
            self._txn = self.env.begin(write=True)
        while True:
            try:
                for key, value in puts.items():
                    self._txn.put(key, value)
                for key in deletes:
                    self._txn.delete(key)
                self._txn.commit()
                break
            except lmdb.MapFullError:
                self._redo_larger()
            except lmdb.Error as e:  # LMDB reports a short write (a full disk) as an I/O error
                self._txn = None  # LMDB has aborted it
                raise ConvertError(
                    f"{self.path}: writing failed ({e}); if the disk is full, free space (a store takes "
                    "about as much as its source) and run the same command with --resume"
                ) from None
        self._txn = None
        self._records.clear()
        self._writeback.committed(self._used_bytes())

    def _used_bytes(self) -> int:
        """The size of the committed database: LMDB's pages 0..last_pgno."""
        return (self.env.info()["last_pgno"] + 1) * self._page

    def _redo_larger(self) -> None:
        """Abort the full transaction, grow the map, put its records again."""
        assert self._txn is not None
        while True:
            self._txn.abort()
            size = self.env.info()["map_size"]
            self.env.set_mapsize(size + min(max(size, self.GROW_MIN), self.GROW_MAX))
            self._txn = self.env.begin(write=True)
            try:
                for key, index in self._records:
                    self._txn.put(key, self.rebuild(index), append=True)
                return
            except lmdb.MapFullError:
                continue

    def close(self) -> None:
        """Abandon any uncommitted transaction, flush to disk and release the store."""
        try:
            if self._txn is not None:
                self._txn.abort()
            self._writeback.close()
            self.env.sync(True)
        finally:
            self.env.close()
            os.close(self.fd)


class _Writeback:
    """A thread that writes the store's committed pages to disk while the conversion goes
    on, and then drops them from the page cache, all but the newest ``KEEP_CACHED`` bytes
    (LMDB reads its newest pages again).

    Writing as we go leaves little for the final sync before the rename. Started with
    ``sync_file_range(WRITE)``, which only queues the dirty pages (an ``fdatasync``, used
    where that call is missing, also waits for the filesystem journal, which stalled the
    next commit: 0.45 s against 0.64 s for 620 MB). In a thread of its own: queuing the
    writes took ~9 us of the writer's ~70 us per image, and the reader thread has time.

    Dropping written pages: the store is written once and not read during the conversion;
    kept in memory, it would push the source files and everything else out of the page
    cache (an ImageNet store is ~140 GB). Reusing the same few megabytes of page cache is
    also faster: on this project's VMs, whose host takes back memory the guest frees,
    every page touched for the first time costs a fault in the host (RESULTS.md).
    """

    KEEP_CACHED, DROP_STEP = 8 << 20, 4 << 20

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._used = self._done = 0  # database size committed / written out so far
        self._dropped_to = 0  # pages before this offset are on disk and out of the page cache
        self._closing = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="convert-writeback")
        self._thread.start()

    def committed(self, used: int) -> None:
        """A commit made the database ``used`` bytes long: write it out."""
        with self._wake:
            self._used = used
            self._wake.notify()

    def close(self) -> None:
        """Finish the writes asked for and stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._used == self._done and not self._closing:
                    self._wake.wait()
                if self._used == self._done:
                    return
                self._done = used = self._used
            if _SYNC_FILE_RANGE is None:
                with contextlib.suppress(OSError):  # the final sync reports errors
                    os.fdatasync(self.fd)
                continue
            _SYNC_FILE_RANGE(self.fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # 0, 0: the whole file
            end = used - self.KEEP_CACHED
            end -= end % self.DROP_STEP
            if end - self._dropped_to >= self.DROP_STEP:
                start, length = self._dropped_to, end - self._dropped_to
                flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
                _SYNC_FILE_RANGE(self.fd, start, length, flags)  # errors: the final sync reports them
                with contextlib.suppress(OSError):  # only a hint
                    os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)
                self._dropped_to = end


def _start_or_resume(store: _PartialStore, source: Source, store_options: dict) -> dict:
    """The committed progress of ``partial``, checked against this run (new: written now).

    ``state["next"]`` is None when the partial store is already complete (interrupted just
    before its rename).
    """
    partial = store.path
    with store.env.begin() as txn:
        raw = txn.get(PROGRESS_KEY)
        meta = txn.get(META_KEY)
        empty = txn.stat()["entries"] == 0
    if raw is None:
        if meta is not None:
            table = meta_from_bytes(meta)
            skipped = json.loads(table.schema.metadata[META_SKIPPED])
            nbytes = sum(table.column("nbytes").to_pylist())
            return {"next": None, "written": table.num_rows, "skipped": skipped, "bytes_in": 0, "bytes_out": nbytes}
        if not empty:
            raise ConvertError(f"{partial} is not an effitrain conversion in progress; remove it or pass --overwrite")
        state = {
            "next": 0, "written": 0, "batches": 0, "skipped": [], "bytes_in": 0, "bytes_out": 0,
            "fingerprint": source.fingerprint(), "options": store_options,
        }
        store.commit({PROGRESS_KEY: json.dumps(state).encode()})
        return state
    state = json.loads(raw)
    if state["fingerprint"] != source.fingerprint():
        raise ConvertError(f"{partial} was started from a different listing of {source.root}; pass --overwrite to start over")
    if state["options"] != store_options:
        diff = sorted(k for k in store_options if state["options"].get(k) != store_options[k])
        raise ConvertError(f"{partial} was started with other options ({', '.join(diff)}); pass --overwrite to start over")
    return state


def _run(
    store: _PartialStore,
    source: Source,
    options: ConvertOptions,
    state: dict,
    workers: int,
    on_error: str,
    commit_bytes: int,
    show_progress: bool,
    warn: Callable[[str], None] | None,
    summary: Summary,
) -> None:
    """Convert source images ``state["next"]:`` and commit them batch by batch."""
    from effitrain.progress import Progress

    bar = Progress("convert", total=len(source.samples), initial=state["next"], enabled=show_progress)
    warn = warn or bar.write
    rows: list[tuple] = []  # META_SCHEMA rows of the open transaction
    batch_bytes = 0

    def commit(next_index: int) -> None:
        nonlocal batch_bytes
        state["next"] = next_index
        puts = {}
        if rows:
            # JSON, not Arrow: a few µs instead of ~55 per commit; _finish builds the table.
            puts[BATCH_PREFIX + b"%09d" % state["batches"]] = json.dumps(rows).encode()
            state["batches"] += 1
        puts[PROGRESS_KEY] = json.dumps(state).encode()
        store.commit(puts)
        rows.clear()
        batch_bytes = 0

    root = str(source.root)
    samples = source.samples
    arena = Arena(workers)
    stream = _prepared(source, options, state["next"], workers, arena)
    _keep_freed_memory(commit_bytes)
    try:
        for index, result in stream:
            rel, label = samples[index]
            bar.update(1, result.size_in)
            summary.processed += 1
            summary.processed_bytes += result.size_in
            if result.error is not None:
                path = os.path.join(root, rel)
                if on_error == "fail":
                    commit(index)  # keep what came before: fix the file and --resume
                    raise ConvertError(f"{path}: {result.error}")
                warn(f"warning: skipped {path}: {result.error}")
                state["skipped"].append({"source": rel, "error": result.error})
                continue
            key = record_key(state["written"])
            value = result.record if result.stored is None else arena[slice(*result.stored)]
            store.put_record(key, value, index)
            rows.append((key.decode(), label, result.width, result.height, result.nbytes, int(result.kind), rel))
            state["written"] += 1
            state["bytes_in"] += result.size_in
            state["bytes_out"] += len(value)
            batch_bytes += len(value)
            if batch_bytes >= commit_bytes:
                commit(index + 1)
        commit(len(samples))
    finally:
        stream.close()  # stops the worker pool at once if we are leaving on an error
        arena.close()
        bar.close()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic GC off: the conversion makes no reference cycles, but its many small
    objects would trigger it, and its full passes walk every object of the process
    (torch's included): ~0.15 s of the metadata step for 6,000 images."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _keep_freed_memory(commit_bytes: int) -> None:
    """Let glibc keep the memory freed at each commit for the next transaction.

    LMDB mallocs a transaction's dirty pages (a block per image) and frees them when it
    commits; so are the buffers files are read into. By default glibc gives the freed top
    of the heap back to the kernel and serves blocks over 128 KB with their own mmap, so
    every transaction faulted its megabytes in again (measured on 620 MB: ~90,000 page
    faults per run, about a third of the time). This keeps them in this process instead
    (glibc only; a no-op elsewhere; the setting lasts for the life of the process).
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: bigger blocks still get an mmap
    mallopt(M_TRIM_THRESHOLD, max(64 << 20, 4 * commit_bytes))


def _rebuild(index: int, source: Source, options: ConvertOptions) -> bytes | bytearray:
    """The record of source image ``index`` built again from its file (after the map grew)."""
    rel, label = source.samples[index]
    path = os.path.join(source.root, rel)
    result = prepare(path, label, options)
    if result.record is None:
        raise ConvertError(f"{path}: {result.error} (changed while being converted?); run again with --resume")
    return result.record


class Arena:
    """Memory shared by the writer and its forked workers, where workers leave records.

    One slot per task in flight: a worker writes its chunk's records one after the other
    into the task's slot, and the writer puts them into LMDB straight from there. Image
    bytes thus cross between processes in one copy, never pickled or piped; a record that
    does not fit in its slot travels back in the task's result instead.
    """

    SLOT_BYTES = 4 << 20  # a chunk of ImageNet-sized images (~110 KB each), with room

    def __init__(self, workers: int) -> None:
        forking = workers > 0 and "fork" in mp.get_all_start_methods()
        self.slots = 4 * workers if forking else 0
        self.map = mmap.mmap(-1, self.slots * self.SLOT_BYTES) if self.slots else None
        self._view = memoryview(self.map) if self.map is not None else None

    def __getitem__(self, where: slice) -> memoryview:
        assert self._view is not None
        return self._view[where]

    def close(self) -> None:
        """Drop the arena; it is unmapped once the last record view of it is gone."""
        self.map = self._view = None


_ARENA: mmap.mmap | None = None  # in a worker: the writer's Arena.map, inherited through fork


def _prepared(
    source: Source, options: ConvertOptions, start: int, workers: int, arena: Arena
) -> Iterator[tuple[int, Prepared]]:
    """``(source index, Prepared)`` for every image from ``start``, in source order."""
    root = str(source.root)
    paths = [os.path.join(root, rel) for rel, _ in source.samples]
    labels = [label for _, label in source.samples]
    chunks = [(i, paths[i : i + CHUNK], labels[i : i + CHUNK]) for i in range(start, len(paths), CHUNK)]
    if workers <= 0:
        yield from _read_ahead(chunks, options, READ_THREADS)
        return
    # fork is cheapest and shares the arena; the writer's other thread (_Writeback) holds
    # no lock a worker needs.
    ctx = mp.get_context("fork" if arena.slots else "spawn")
    window = arena.slots or 4 * workers  # tasks in flight: workers stay ahead, results don't pile up
    with ctx.Pool(workers, initializer=_init_worker, initargs=(arena.map,)) as pool:
        pending: deque = deque()
        free = list(range(window))
        todo = deque(chunks)
        while todo or pending:
            while todo and free:
                first, chunk, chunk_labels = todo.popleft()
                slot = free.pop()
                args = (chunk, chunk_labels, slot if arena.slots else None, options)
                pending.append((first, slot, pool.apply_async(_prepare_chunk, args)))
            first, slot, task = pending.popleft()
            yield from enumerate(task.get(), first)
            free.append(slot)  # the writer has put every record of this slot by now


def _read_ahead(
    chunks: list[tuple[int, list[str], list[int]]], options: ConvertOptions, threads: int
) -> Iterator[tuple[int, Prepared]]:
    """``(source index, Prepared)`` for ``chunks``, prepared by ``threads`` threads of this
    process while the caller writes (0: by the caller, between its writes).

    Threads suit files kept as they are: reading and the CRC32 release the GIL, and a
    record is handed over as the buffer it was read into, with no copy between processes.
    Thread ``k`` prepares chunks ``k, k + threads, ...`` into its own short queue, so
    results come back in order and memory stays flat.
    """
    if threads <= 0:
        for first, paths, labels in chunks:
            yield from enumerate(_prepare_chunk(paths, labels, None, options), first)
        return
    stop = threading.Event()
    queues: list[queue.Queue] = [queue.Queue(maxsize=2) for _ in range(threads)]

    def work(k: int) -> None:
        try:
            for first, paths, labels in chunks[k::threads]:
                if stop.is_set():
                    return
                queues[k].put((first, _prepare_chunk(paths, labels, None, options)))
        except BaseException as e:  # handed to the caller, who raises it
            queues[k].put((-1, e))

    pool = [threading.Thread(target=work, args=(k,), daemon=True, name=f"convert-read-{k}") for k in range(threads)]
    for thread in pool:
        thread.start()
    try:
        for i in range(len(chunks)):
            first, results = queues[i % threads].get()
            if first < 0:
                raise results
            yield from enumerate(results, first)
    finally:
        stop.set()
        for q in queues:  # unblock a thread waiting to hand over a chunk; it then stops
            while not q.empty():
                q.get_nowait()
        for thread in pool:
            thread.join()


def _init_worker(arena: mmap.mmap | None) -> None:
    """Workers leave Ctrl-C to the writer (which stops the pool) and die with it on kill -9."""
    global _ARENA
    _ARENA = arena
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _prepare_chunk(paths: list[str], labels: list[int], slot: int | None, options: ConvertOptions) -> list[Prepared]:
    """Prepare a chunk of images; in a worker with an arena slot, leave the records there."""
    results = prepare_files(paths, labels, options)
    if slot is None or _ARENA is None:
        return results
    offset, end = slot * Arena.SLOT_BYTES, (slot + 1) * Arena.SLOT_BYTES
    for i, result in enumerate(results):
        if result.record is None or offset + len(result.record) > end:
            continue  # a bad file, or a record too big for what is left: travels back in the result
        size = len(result.record)
        _ARENA[offset : offset + size] = result.record  # the one copy of the image bytes
        results[i] = dataclasses.replace(result, record=None, stored=(offset, offset + size))
        offset += size
    return results


def _finish(store: _PartialStore, source: Source, store_options: dict, state: dict) -> None:
    """Replace the progress records by ``__meta__``, ``__len__`` and ``__keys__``."""
    batch_keys = [BATCH_PREFIX + b"%09d" % b for b in range(state["batches"])]
    tables, rows = [], []
    with store.env.begin() as txn:
        for key in batch_keys:
            batch = txn.get(key)
            if batch[:1] != b"[":  # Arrow: a partial store begun by an effitrain before JSON batches
                tables += [_rows_table(rows), meta_from_bytes(batch)]
                rows = []
                continue
            rows += json.loads(batch)
            if len(rows) >= 1 << 16:  # a table at a time: Python rows take ~10x the memory
                tables.append(_rows_table(rows))
                rows = []
    tables.append(_rows_table(rows))
    # One chunk, so the bytes do not depend on where an interrupted run was resumed.
    table = pa.concat_tables(tables).combine_chunks()
    table = with_store_metadata(table, source.classes, store_options, state["skipped"])
    puts = {
        META_KEY: meta_to_bytes(table),
        LEN_KEY: str(table.num_rows).encode(),
        KEYS_KEY: "\n".join(table.column("key").to_pylist()).encode(),
    }
    store.commit(puts, deletes=(*batch_keys, PROGRESS_KEY))


def _rows_table(rows: list[list]) -> pa.Table:
    """Metadata rows (in ``META_SCHEMA``'s column order) as a table."""
    if not rows:
        return META_SCHEMA.empty_table()
    return pa.table({name: list(column) for name, column in zip(META_SCHEMA.names, zip(*rows))}, schema=META_SCHEMA)


def _publish(partial: Path, out: Path) -> None:
    """Rename the finished ``partial`` to ``out`` (replacing an old ``out`` only now)."""
    (partial / "lock.mdb").unlink(missing_ok=True)  # readers open stores with lock=False
    old = out.with_name(out.name + ".replaced")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(partial, out)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)
