"""Random-access JPEG (effitrain.jpeg) on one CPU core: transcode cost and size, crop decode
speed against full-frame decodes, as ratios measured in the same run. The transcode is
timed both ways it can run: the default (baseline files re-coded without libjpeg) and the
libjpeg path alone (the transcoder before the re-coder).

    .venv/bin/python benchmarks/bench_jpeg.py ../corpus/train [--n 1000] [--rounds 3] [--json OUT]
    .venv/bin/python benchmarks/bench_jpeg.py ../corpus --n 100000 --verify   # pixels only, no timing

Images are read into memory first (no file I/O is timed). The process is pinned to one
core with torch.set_num_threads(1). Crop boxes follow torchvision's RandomResizedCrop
(scale 0.08-1, ratio 3/4-4/3), drawn once with a fixed seed; every decode produces the
box's uint8 RGB pixels (full-frame decoders decode everything, then cut). Rounds alternate
the methods so drift hits them all alike; medians are reported, as img/s of this process's
CPU time (robust when other processes share the core) and of wall time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop

from effitrain import jpeg

warnings.filterwarnings("ignore", message="The image decoding", category=DeprecationWarning)


def load(folder: Path, n: int) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg"))
    step = max(1, len(files) // n)  # spread over all classes
    return [p.read_bytes() for p in files[::step][:n]]


def rrc_boxes(sizes: list[tuple[int, int]], seed: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) from torchvision's own RandomResizedCrop.get_params."""
    torch.manual_seed(seed)
    rrc = RandomResizedCrop(224)
    return [tuple(rrc.get_params(torch.empty(0, h, w), rrc.scale, rrc.ratio)) for w, h in sizes]


# effitrain._jpegext.transcode's methods (see jpegext.c): the default re-codes baseline files
# without libjpeg (recode.c) and hands the rest to libjpeg; LIBJPEG is that libjpeg path for
# every file (the transcoder before the re-coder); RECODE the re-coder alone (None where it
# declines). All write the same bytes.
AUTO, LIBJPEG, RECODE = 0, 1, 3


def measure_transcode(originals: list[bytes], rounds: int) -> dict:
    """ms per image by this process's CPU time, median of rounds, for the default transcode
    and the libjpeg path alone (rounds alternate them); per-image wall times of the default."""
    cpu: dict[int, list[float]] = {AUTO: [], LIBJPEG: []}
    times, kept = [], []
    for r in range(rounds):
        for method in (AUTO, LIBJPEG):
            start_cpu = time.process_time()
            for data in originals:
                jpeg._ext.transcode(data, method)
            cpu[method].append(1e3 * (time.process_time() - start_cpu) / len(originals))
    for data in originals:
        start = time.perf_counter()
        result = jpeg.transcode(data)
        times.append(time.perf_counter() - start)
        kept.append(result)
    same = all(jpeg._ext.transcode(o, LIBJPEG) == r for o, r in zip(originals, kept))
    declined = sum(jpeg._ext.transcode(o, RECODE) is None for o in originals)
    done = [(o, r) for o, r in zip(originals, kept) if r is not None]
    orig = sum(len(o) for o, _ in done)
    new = sum(len(r[0]) for _, r in done)
    index = sum(len(r[1]) for _, r in done)
    return {
        "images": len(originals),
        "refused": len(originals) - len(done),
        "recoder_declined": declined,
        "same_bytes_as_libjpeg_path": same,
        "ms_cpu_median": statistics.median(cpu[AUTO]),
        "ms_cpu_libjpeg_path_median": statistics.median(cpu[LIBJPEG]),
        "ms_cpu_rounds": cpu[AUTO],
        "ms_cpu_libjpeg_path_rounds": cpu[LIBJPEG],
        "ms_median": 1e3 * statistics.median(times),
        "ms_p95": 1e3 * sorted(times)[int(0.95 * len(times))],
        "bytes_in": orig,
        "bytes_out": new,
        "size_change_pct": 100 * (new / orig - 1),
        "size_change_with_index_pct": 100 * ((new + index) / orig - 1),
        "index_bytes_mean": index / max(1, len(done)),
        "results": kept,
    }


def verify(originals: list[bytes], items: list[tuple[bytes, bytes]], boxes: list[tuple[int, int, int, int]]) -> None:
    """Check every image: transcode and crops (decode_crop, crop_jpeg + torchvision.io) give
    exactly PIL's pixels of the original."""
    rng = np.random.default_rng(1)
    mismatches, crops = 0, 0
    for original, (data, index), box in zip(originals, items, boxes):
        ref = np.asarray(Image.open(io.BytesIO(original)).convert("RGB"))
        height, width = ref.shape[:2]
        mismatches += not np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), ref)
        h, w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        for t, l, h, w in (box, (int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)):
            want = ref[t : t + h, l : l + w]
            sub, (st, sl, _, _) = jpeg.crop_jpeg(data, index, (t, l, h, w))
            tv = decode_jpeg(torch.frombuffer(bytearray(sub), dtype=torch.uint8), mode=ImageReadMode.RGB)
            crops += 2
            mismatches += not np.array_equal(jpeg.decode_crop(data, index, (t, l, h, w)), want)
            mismatches += not np.array_equal(tv.permute(1, 2, 0).numpy()[st : st + h, sl : sl + w], want)
    print(f"verify: {len(originals)} images, {crops} crops: {mismatches} differ from PIL's pixels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="an ImageFolder of JPEGs (the realistic corpus)")
    parser.add_argument("--n", type=int, default=1000, help="images to use")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    parser.add_argument("--verify", action="store_true", help="check pixels against PIL instead of timing")
    args = parser.parse_args()
    if not jpeg.available():
        raise SystemExit("bench_jpeg: the C extension is not built (make ext)")
    os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)

    originals = load(args.folder, args.n)
    tc = measure_transcode(originals, 1 if args.verify else args.rounds)
    # Crop decoding runs on what the store would hold: transcoded where possible.
    items = [(r[0], r[1]) if r is not None else (o, b"") for o, r in zip(originals, tc.pop("results"))]
    sizes = [Image.open(io.BytesIO(o)).size for o in originals]
    boxes = rrc_boxes(sizes, seed=0)
    if args.verify:
        print(f"transcode refused {tc['refused']}/{tc['images']}, re-coder declined {tc['recoder_declined']}, "
              f"same bytes as the libjpeg path: {tc['same_bytes_as_libjpeg_path']}")
        return verify(originals, items, boxes)
    tensors = [torch.frombuffer(bytearray(o), dtype=torch.uint8) for o in originals]

    def pil_full(i, box):
        t, l, h, w = box
        return np.asarray(Image.open(io.BytesIO(originals[i])).convert("RGB"))[t : t + h, l : l + w]

    def tv_full(i, box):
        t, l, h, w = box
        return decode_jpeg(tensors[i], mode=ImageReadMode.RGB)[:, t : t + h, l : l + w]

    def c_full(i, box):
        t, l, h, w = box
        return jpeg.decode(originals[i])[t : t + h, l : l + w]

    def crop_decode(i, box):
        return jpeg.decode_crop(items[i][0], items[i][1], box)

    def crop_decode_libjpeg_huffman(i, box):  # decode_crop before its own Huffman decoder
        data, index = items[i]
        out = np.empty((box[2], box[3], 3), np.uint8)
        if index:
            jpeg._ext.decode_crop(data, index, box, out, True)
            return out
        return jpeg.decode_crop(data, index, box)

    def sub_jpeg_only(i, box):
        return jpeg.crop_jpeg(items[i][0], items[i][1], box)

    def sub_jpeg_tv(i, box):  # the decode="gpu" path, with torchvision's CPU decoder
        sub, (t, l, h, w) = jpeg.crop_jpeg(items[i][0], items[i][1], box)
        return decode_jpeg(torch.frombuffer(bytearray(sub), dtype=torch.uint8), mode=ImageReadMode.RGB)[:, t : t + h, l : l + w]

    methods = {
        "PIL full decode + cut": pil_full,
        "torchvision.io full decode + cut": tv_full,
        "effitrain.jpeg.decode full + cut": c_full,
        "decode_crop (RRC boxes)": crop_decode,
        "decode_crop, libjpeg's Huffman decoder": crop_decode_libjpeg_huffman,
        "crop_jpeg only (sub-JPEG assembly)": sub_jpeg_only,
        "crop_jpeg + torchvision.io decode + cut": sub_jpeg_tv,
    }
    # img/s by this process's CPU time (others sharing the core do not count) and by wall time.
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    wall: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for i, box in enumerate(boxes):
                fn(i, box)
            cpu[name].append(len(boxes) / (time.process_time() - start_cpu))
            wall[name].append(len(boxes) / (time.perf_counter() - start))
    median = {name: statistics.median(r) for name, r in cpu.items()}
    median_wall = {name: statistics.median(r) for name, r in wall.items()}

    print(f"corpus: {args.folder} ({len(originals)} JPEGs, mean {np.mean([len(o) for o in originals]) / 1024:.1f} KiB)")
    print(
        f"transcode: {tc['ms_cpu_median']:.3f} ms/image CPU (median of {args.rounds} rounds), libjpeg path "
        f"{tc['ms_cpu_libjpeg_path_median']:.3f} ({tc['ms_cpu_libjpeg_path_median'] / tc['ms_cpu_median']:.2f}x); "
        f"wall {tc['ms_median']:.2f} median, {tc['ms_p95']:.2f} p95; re-coder declined {tc['recoder_declined']}, "
        f"refused {tc['refused']}/{tc['images']}; same bytes as the libjpeg path: {tc['same_bytes_as_libjpeg_path']}; "
        f"size {tc['bytes_in']} -> {tc['bytes_out']} B ({tc['size_change_pct']:+.2f}%, "
        f"{tc['size_change_with_index_pct']:+.2f}% with the index, {tc['index_bytes_mean']:.0f} B/image)"
    )
    pil, tv = median["PIL full decode + cut"], median["torchvision.io full decode + cut"]
    pil_w, tv_w = median_wall["PIL full decode + cut"], median_wall["torchvision.io full decode + cut"]
    print(f"one core, median of {args.rounds} rounds: img/s by CPU time (by wall time)")
    print(f"{'':42s} {'img/s':>6s} {'vs PIL':>7s} {'vs tv.io':>8s}   {'wall img/s, vs PIL, vs tv.io':>28s}")
    for name, rate in median.items():
        w = median_wall[name]
        print(
            f"{name:42s} {rate:6.0f} {rate / pil:6.2f}x {rate / tv:7.2f}x   {w:14.0f} {w / pil_w:6.2f}x {w / tv_w:6.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"transcode": tc, "img_per_s_cpu": median, "img_per_s_wall": median_wall}, indent=1))


if __name__ == "__main__":
    main()
