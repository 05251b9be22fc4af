"""``effitrain bench DATA``: where does training time go? Storage, decode, loader, model
step and end-to-end throughput in one report, and a verdict naming the limit.

    effitrain bench /data/imagenet-train.lmdb --config configs/resnet50_imagenet.yaml
    effitrain bench /data/imagenet/train --config configs/tiny_cpu.yaml --seconds 2 \\
        --workers 1,2 --json bench.json --plot bench.png

DATA is a store (``effitrain convert``) or an ImageFolder directory; the same stages run
on either, so running both shows what converting buys. The figures, in order:

  1. storage     ``read, shuffled`` / ``read, sequential``: whole records (or files) read
                 in one process, no decoding; img/s and MB/s. A warm page cache makes this
                 the speed of memory: say so when quoting it.
  2. decode      per image in this process, with the loader's own code (read, crop box,
                 crop decode, resize, flip): the config's train transform and val transform,
                 and a full-image decode alone (torchvision.io / PIL) as the reference.
  3. loader      the trainer's loader for each worker count (``--workers``, default 1, 2,
                 4, ... up to the CPU count), batches delivered through the trainer's
                 ``DevicePrefetcher`` (on the device, normalized).
  4. model       the trainer's own step loop on one synthetic batch already on the device,
                 with the config's model, batch size, precision and memory format: the
                 compute ceiling.
  5. end_to_end  the trainer's step loop fed by its loader (the config's ``data.workers``).

Timing: every figure is measured after a warm-up (not counted), in several consecutive
windows (5) of ``--seconds`` in all; the device is synchronized before each clock read.
A figure is the median of its windows; the spread is its slowest and fastest window.

JSON (``--json OUT``), version 1::

  version            1
  data               {path, kind: "store"|"folder", images, classes}
  setup              {device: "cpu"|"cuda", device_name, cpus, torch, jpeg_ext (C extension
                      loaded), seconds, windows, load_before, load_after (1-minute load
                      averages), config: {path, arch, batch_size, accum_steps, image_size,
                      amp, channels_last, compile, decode, workers}}
  figures            a list, in the order above, each:
    stage            "storage" | "decode" | "loader" | "model" | "end_to_end"
    key              unique: storage.shuffled, storage.sequential, decode.train,
                     decode.val, decode.full, loader.workers=N, model.step, end_to_end
    label            the table's description
    workers          loader worker processes (loader, end_to_end), else null
    img_per_s        median over the windows
    img_per_s_min    slowest window
    img_per_s_max    fastest window
    img_per_s_windows  every window's img/s
    mb_per_s         median MB/s (storage only), else null
    images, seconds  counted images and measured time, all windows together
  verdict            {limit: "storage"|"loader"|"model", factor (>= 1: how many times
                      faster the other side is), text (the plain-words verdict)}
"""

from effitrain.bench.data import BenchError as BenchError
from effitrain.bench.report import BenchResult as BenchResult
from effitrain.bench.runner import bench_config as bench_config
from effitrain.bench.runner import parse_workers as parse_workers
from effitrain.bench.runner import run_bench as run_bench
