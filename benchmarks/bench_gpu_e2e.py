"""End-to-end ResNet-50 training img/s on a CUDA GPU: the stock torchvision pipeline against
effitrain's, same model step, same run (needs a GPU; run by hand on a GPU machine).

    python benchmarks/bench_gpu_e2e.py --folder ../corpus/train --store stores/train.lmdb --workers 4,8,15

For each worker count W, both pipelines feed the same training step (ResNet-50, SGD, fp16
autocast + GradScaler, channels_last, cuDNN autotuning) for ``--steps`` timed steps after
``--warmup`` untimed ones:
  stock:     torchvision ImageFolder(folder) with PIL, RandomResizedCrop(224) +
             RandomHorizontalFlip + ToTensor + Normalize, DataLoader(W workers,
             pin_memory=True, persistent), batches copied with non_blocking=True;
  effitrain: make_loader(store, train=True, W workers) uint8 batches (crop decode in C)
             through the DevicePrefetcher (copy + normalize on a side stream).
Also the model step alone on one batch kept on the GPU: the ceiling both aim at.
Throughput is images over wall time between two CUDA synchronisations.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from effitrain.data import DevicePrefetcher, make_loader
from effitrain.data.prefetch import IMAGENET_MEAN, IMAGENET_STD
from effitrain.train.model import create_model


def stock_batches(folder: str, batch: int, workers: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = DataLoader(datasets.ImageFolder(folder, tf), batch_size=batch, shuffle=True, num_workers=workers,
                        pin_memory=True, drop_last=True, persistent_workers=True)
    while True:
        for images, labels in loader:
            yield images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last), \
                labels.to(device, non_blocking=True)


def effitrain_batches(store: str, batch: int, workers: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    loader = make_loader(store, True, batch, workers, device=device)
    while True:
        yield from DevicePrefetcher(loader, device, channels_last=True)


def forever(batch: tuple[torch.Tensor, torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield batch


def steps_per_s(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], classes: int, warmup: int, steps: int,
                device: torch.device) -> float:
    """Images/s of ``steps`` training steps fed by ``batches``, after ``warmup`` untimed ones."""
    model = create_model("resnet50", classes).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    it = iter(batches)
    count = 0
    for k in range(warmup + steps):
        if k == warmup:
            torch.cuda.synchronize(device)  # the timed steps start from an idle GPU
            start, count = time.perf_counter(), 0
        images, labels = next(it)
        with torch.autocast("cuda", torch.float16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        count += len(labels)
    torch.cuda.synchronize(device)  # wait for the queued steps: the clock stops when they are done
    seconds = time.perf_counter() - start
    if hasattr(it, "close"):
        it.close()  # ends the loader's worker processes before the next measurement
    return count / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", required=True, help="ImageFolder of JPEGs")
    ap.add_argument("--store", required=True, help="effitrain store converted from --folder")
    ap.add_argument("--workers", default="4,8", help="comma-separated DataLoader worker counts")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    classes = len(datasets.ImageFolder(a.folder).classes)
    print(f"{torch.cuda.get_device_name(device)}, ResNet-50 fp16 channels_last, batch {a.batch}, "
          f"{a.steps} timed steps after {a.warmup}")
    images = torch.randn(a.batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (a.batch,), device=device)
    results: dict = {"model_step": steps_per_s(forever((images, labels)), classes, a.warmup, a.steps, device)}
    print(f"model step alone (batch on the GPU): {results['model_step']:,.0f} img/s")
    print(f"{'workers':>7}  {'stock img/s':>11}  {'effitrain img/s':>15}  {'ratio':>6}")
    for w in (int(x) for x in a.workers.split(",")):
        stock = steps_per_s(stock_batches(a.folder, a.batch, w, device), classes, a.warmup, a.steps, device)
        ours = steps_per_s(effitrain_batches(a.store, a.batch, w, device), classes, a.warmup, a.steps, device)
        results[f"workers_{w}"] = {"stock": stock, "effitrain": ours}
        print(f"{w:>7}  {stock:>11,.0f}  {ours:>15,.0f}  {ours / stock:>5.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
