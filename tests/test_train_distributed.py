"""``torchrun --nproc_per_node=2`` with gloo on the CPU: DDP training matches one process with
the same global batch, and distributed evaluation counts every validation image once. Where
a CUDA device exists, one rank per GPU under torchrun (NCCL) matches a plain process too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CUDA

from effitrain.store.prepare import ConvertOptions, default_payload
from effitrain.store.writer import convert
from effitrain.synth import make_imagefolder

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """70 train images (4 steps of 16 an epoch) and an odd number of val images: 49."""
    root = tmp_path_factory.mktemp("ddp-data")
    folders = make_imagefolder(root / "img", train_per_class=7, val_per_class=5, min_size=40, max_size=64)
    next(iter(sorted((folders["val"] / "00_disc").iterdir()))).unlink()
    out = {}
    for split, folder in folders.items():
        out[split] = root / f"{split}.lmdb"
        convert(folder, out[split], options=ConvertOptions(payload=default_payload()), workers=0, progress=False)
    return out


def train(stores: dict[str, Path], run_dir: Path, nproc: int, *args: str, torchrun: bool | None = None
          ) -> subprocess.CompletedProcess:
    """``effitrain train`` on SqueezeNet 1.1 without dropout, one epoch of global batch 16 in
    two accumulation steps (so DDP skips the gradient all-reduce on the first micro-batch).

    SqueezeNet has no BatchNorm: with BN in training mode each rank would normalise with the
    statistics of its own 8 images, not of the 16 a single process sees, and the losses would
    differ for a reason that is not a bug (PyTorch's SyncBatchNorm, which would fix that, runs
    on CUDA only). Without dropout nothing random differs between ranks and one process:
    the same samples (the loader deals one permutation to the ranks), the same crops (a
    function of seed, epoch and sample), the same initial weights (DDP broadcasts rank 0's),
    and DDP's averaged gradient equals the gradient of the whole batch's mean loss.
    """
    sets = [f"data.train={stores['train']}", f"data.val={stores['val']}", f"log.run_dir={run_dir}",
            "model.arch=squeezenet1_1", "model.kwargs={dropout: 0.0}", "data.image_size=32", "data.val_resize=37",
            "train.batch_size=16", "train.epochs=1", "log.print_freq=1", "data.workers=0", "optim.label_smoothing=0",
            "optim.lr=4", "optim.warmup_epochs=0", "train.accum_steps=2"]
    command = ["effitrain", "train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
               *[a for s in sets for a in ("--set", s)], *args]
    if nproc > 1 if torchrun is None else torchrun:
        command = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "--no-python", *command]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_two_ranks_match_one_process_and_count_val_images_once(stores: dict[str, Path], tmp_path: Path) -> None:
    one = train(stores, tmp_path / "one", 1)
    assert one.returncode == 0, one.stdout + one.stderr
    two = train(stores, tmp_path / "two", 2)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count(" * Epoch 0  Val Loss") == 1  # rank 0 alone prints

    single, ddp = records(tmp_path / "one", "train"), records(tmp_path / "two", "train")
    assert [r["step"] for r in single] == [r["step"] for r in ddp] == [1, 2, 3, 4]
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], rel=1e-5)
    # A large lr moves the weights far from their start (where the loss is ~ln 10 = 2.303), so a
    # missing or wrong gradient all-reduce would show in the later steps' losses.
    assert max(r["loss"] for r in single[1:]) > 2.5
    assert [r["error1"] for r in ddp] == [r["error1"] for r in single]

    # 49 validation images: 25 on rank 0, 24 on rank 1, in batches of 4 with a short last one.
    (val_one,), (val_two,) = records(tmp_path / "one", "val"), records(tmp_path / "two", "val")
    assert val_one["images"] == val_two["images"] == 49
    assert val_two["loss"] == pytest.approx(val_one["loss"], rel=1e-4)

    # The same weights evaluated on one rank and on two: identical counts, the same figures.
    for nproc in (1, 2):
        result = train(stores, tmp_path / "one", nproc, "--eval-only", "--resume", str(tmp_path / "one" / "last.pt"))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"49 images on {nproc} rank(s)" in result.stdout
        assert f"Error@1 {val_one['error1']:.3f}" in result.stdout


@CUDA
def test_one_gpu_rank_under_torchrun_matches_one_process(stores: dict[str, Path], tmp_path: Path) -> None:
    # NCCL, DDP with device_ids, SyncBN conversion and the gloo group for host-side flags.
    # Deterministic kernels: cuDNN's autotuned ones may sum in another order in each run.
    cuda = ("--set", "train.device=cuda", "--set", "model.sync_bn=true", "--set", "train.deterministic=true")
    one = train(stores, tmp_path / "one", 1, *cuda)
    assert one.returncode == 0, one.stdout + one.stderr
    ddp = train(stores, tmp_path / "ddp", 1, *cuda, torchrun=True)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    single, ranked = records(tmp_path / "one", "train"), records(tmp_path / "ddp", "train")
    assert [r["step"] for r in ranked] == [1, 2, 3, 4]
    assert [r["loss"] for r in ranked] == pytest.approx([r["loss"] for r in single], rel=1e-5)
    assert records(tmp_path / "ddp", "val")[0]["images"] == 49
