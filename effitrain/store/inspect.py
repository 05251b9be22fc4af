"""``inspect``: what a store holds (counts, classes, sizes, skipped files) and ``--verify``."""

from __future__ import annotations

import multiprocessing as mp
import statistics
from collections import Counter
from collections.abc import Callable

from .format import FORMAT_VERSION, Kind, StoreError
from .prepare import describe_image_error
from .reader import Store

VERIFY_CHUNK = 256


def summarize(store: Store) -> dict:
    """Counts, per-class counts, payload kinds, size and resolution statistics, skipped files.

    Uses only the metadata table: no image record is read.
    """
    meta = store.meta
    per_class = Counter(store.labels)
    kinds = Counter(meta.column("kind").to_pylist())
    return {
        "path": str(store.path),
        "format_version": FORMAT_VERSION,
        "images": len(store),
        "classes": [{"index": i, "name": c, "images": per_class.get(i, 0)} for i, c in enumerate(store.classes)],
        "kinds": {Kind(k).name: n for k, n in sorted(kinds.items())},
        "bytes": _stats(meta.column("nbytes").to_pylist()),
        "width": _stats(meta.column("width").to_pylist()),
        "height": _stats(meta.column("height").to_pylist()),
        "options": store.options,
        "skipped": store.skipped,
    }


def _stats(values: list[int]) -> dict:
    if not values:
        return {"min": 0, "median": 0, "mean": 0, "max": 0, "total": 0}
    return {
        "min": min(values),
        "median": statistics.median(values),
        "mean": round(statistics.fmean(values), 1),
        "max": max(values),
        "total": sum(values),
    }


def summary_lines(info: dict, max_classes: int = 20) -> list[str]:
    """The summary for people; long class lists are shortened to their ends."""
    b, w, h = info["bytes"], info["width"], info["height"]
    lines = [
        f"store      {info['path']}",
        f"format     effitrain store version {info['format_version']}",
        f"images     {info['images']:,} in {len(info['classes']):,} classes, {len(info['skipped']):,} skipped at convert",
        f"payload    " + ", ".join(f"{name} {n:,}" for name, n in info["kinds"].items()),
        f"bytes      total {b['total'] / 1e6:,.1f} MB; per image min {b['min']:,} median {b['median']:,.0f} "
        f"mean {b['mean']:,.0f} max {b['max']:,}",
        f"width      min {w['min']} median {w['median']:.0f} mean {w['mean']:.0f} max {w['max']}",
        f"height     min {h['min']} median {h['median']:.0f} mean {h['mean']:.0f} max {h['max']}",
        "options    " + ", ".join(f"{k}={v}" for k, v in sorted(info["options"].items())),
        "classes:",
    ]
    classes = info["classes"]
    shown = classes if len(classes) <= max_classes else classes[: max_classes // 2] + [None] + classes[-max_classes // 2 :]
    for c in shown:
        lines.append("  ..." if c is None else f"  {c['index']:>5}  {c['name']}  {c['images']:,}")
    for s in info["skipped"]:
        lines.append(f"skipped    {s['source']}: {s['error']}")
    return lines


def verify(
    store: Store, workers: int = 0, on_bad: Callable[[str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Check every record: header, CRC32, label and size against the metadata, full decode.

    Returns one line per bad record (``img-000000012: CRC mismatch``), calling ``on_bad``
    with each as found and ``on_progress`` with the count of records checked. ``workers``
    processes share the work (0: in this process).
    """
    chunks = [range(i, min(i + VERIFY_CHUNK, len(store))) for i in range(0, len(store), VERIFY_CHUNK)]
    problems: list[str] = []

    def collect(found: list[str], n: int) -> None:
        for line in found:
            problems.append(line)
            if on_bad is not None:
                on_bad(line)
        if on_progress is not None:
            on_progress(n)

    if workers <= 0:
        for chunk in chunks:
            collect(_verify_range(store, chunk), len(chunk))
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            for chunk, found in zip(chunks, pool.imap(_verify_range_args, [(store, c) for c in chunks])):
                collect(found, len(chunk))
    return problems


def _verify_range_args(args: tuple[Store, range]) -> list[str]:
    return _verify_range(*args)


def _verify_range(store: Store, indices: range) -> list[str]:
    from effitrain.data.dataset import decode_rgb

    meta = store.meta.slice(indices.start, len(indices)).to_pylist()
    bad = []
    for i, row in zip(indices, meta):
        key = row["key"]
        try:
            rec = store.record(i)
        except StoreError as e:
            bad.append(f"{key}: {e}")
            continue
        if not rec.check_crc():
            bad.append(f"{key}: CRC32 mismatch (stored {rec.crc32:08x}), the record is corrupt")
            continue
        if rec.label != row["label"]:
            bad.append(f"{key}: label {rec.label} in the record, {row['label']} in the metadata")
            continue
        try:
            image = decode_rgb(rec.payload)
        except Exception as e:  # any decoder failure is a bad record, reported by key
            bad.append(f"{key}: does not decode ({describe_image_error(e)})")
            continue
        if image.size != (rec.width, rec.height) or image.size != (row["width"], row["height"]):
            bad.append(f"{key}: decodes to {image.size[0]}x{image.size[1]}, recorded {rec.width}x{rec.height}")
    return bad
