"""``effitrain train`` end to end on the CPU, on generated learnable data converted to stores:
it learns, logs in the issue's format, writes TensorBoard scalars, resumes exactly, stops
cleanly on SIGTERM and on a non-finite loss."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CUDA, DEVICES

from effitrain.store.prepare import ConvertOptions, default_payload
from effitrain.store.writer import convert
from effitrain.synth import make_imagefolder
from effitrain.train import checkpoint
from effitrain.train.config import load_config
from effitrain.train.distributed import DistEnv
from effitrain.train.loop import main
from effitrain.train.metrics import MetricLogger, format_val

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny_cpu.yaml"
EFFITRAIN = Path(sys.executable).parent / "effitrain"

LOG_LINE = re.compile(
    r"^Epoch: \[\d+\]\[\d+/\d+\]  Time \d+\.\d{3} \(\d+\.\d{3}\)  Data \d+\.\d{3} \(\d+\.\d{3}\)  "
    r"Speed \d+\.\d \(\d+\.\d\) img/s  Loss \d+\.\d{4} \(\d+\.\d{4}\)  Error@1 \d+\.\d{3} \(\d+\.\d{3}\)  "
    r"Error@5 \d+\.\d{3} \(\d+\.\d{3}\)  LR \d+\.\d{4}$"
)
VAL_LINE = re.compile(r"^ \* Epoch \d+  Val Loss \d+\.\d{3}  Error@1 \d+\.\d{3}  Error@5 \d+\.\d{3}  \(\d+ img/s\)$")
# One compute thread: the processes of a test share 2 cores with a loader worker, and
# OpenMP threads spinning against other processes can make a run several times slower.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
TB_TAGS = {"train/loss", "train/error1", "train/error5", "train/img_per_s", "train/data_time", "train/lr",
           "val/loss", "val/error1", "val/error5"}


@pytest.fixture(autouse=True)
def one_thread() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """10 classes of drawn shapes: 400 train and 100 val JPEGs (48-96 px), as folders and stores."""
    root = tmp_path_factory.mktemp("learnable")
    folders = make_imagefolder(root / "img", train_per_class=40, val_per_class=10, min_size=48, max_size=96)
    out = {f"{split}_folder": folder for split, folder in folders.items()}
    for split, folder in folders.items():
        out[split] = root / f"{split}.lmdb"
        convert(folder, out[split], options=ConvertOptions(payload=default_payload()), workers=0, progress=False)
    return out


def settings(data: dict[str, Path], run_dir: Path, *extra: str, folders: bool = False) -> list[str]:
    """Overrides of the tiny CPU config: these data, 32 px, batch 32 (12 steps an epoch)."""
    suffix = "_folder" if folders else ""
    return [f"data.train={data['train' + suffix]}", f"data.val={data['val' + suffix]}", f"log.run_dir={run_dir}",
            "data.image_size=32", "data.val_resize=37", "train.batch_size=32", *extra]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(EFFITRAIN), *args], capture_output=True, text=True, timeout=timeout, env=ONE_THREAD)


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_issue_examples_match_the_line_patterns() -> None:
    assert LOG_LINE.match("Epoch: [0][430/5005]  Time 0.409 (0.405)  Data 0.002 (0.003)  Speed 626.6 (628.0) img/s  "
                          "Loss 6.8381 (6.9754)  Error@1 100.000 (99.850)  Error@5 99.609 (99.259)  LR 0.1000")
    assert VAL_LINE.match(" * Epoch 0  Val Loss 6.123  Error@1 98.120  Error@5 92.400  (1234 img/s)")


def test_metric_logger_lines_and_means(capsys: pytest.CaptureFixture) -> None:
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    logger = MetricLogger(env, epoch=3, steps=5, print_freq=2)
    batches = iter([(None, None)] * 5)
    printed = []
    for i in range(5):
        logger.next_batch(batches)
        logits = torch.eye(4) * (1 if i < 3 else -1)  # steps 3 and 4 get every image wrong
        logger.update(torch.tensor(float(i)), logits, torch.arange(4))
        printed.append(logger.step_done(i, lr=0.1))
    lines = capsys.readouterr().out.splitlines()
    assert [p is not None for p in printed] == [True, False, True, False, True]  # 0, 2, and the last
    assert len(lines) == 3 and all(LOG_LINE.match(line) for line in lines)
    assert lines[0].startswith("Epoch: [3][0/5]") and lines[-1].startswith("Epoch: [3][4/5]")
    last = printed[-1]
    # Value: the mean since the previous line (steps 3 and 4); in brackets: over the epoch.
    assert last["loss"] == pytest.approx(3.5) and last["loss_avg"] == pytest.approx(2.0)
    assert last["error1"] == pytest.approx(100.0) and last["error1_avg"] == pytest.approx(40.0)
    assert "LR 0.1000" in lines[-1] and not last["nonfinite"]
    assert VAL_LINE.match(format_val(3, {"loss": 1.0, "error1": 2.0, "error5": 0.5, "img_per_s": 10.0}))


def test_learns_logs_and_evaluates(data: dict[str, Path], tmp_path: Path) -> None:
    """A short run drives validation Error@1 far below chance (90%): images, labels, model and
    loop line up. The same run checks the log, TensorBoard, the run directory, --eval-only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    sets = [a for s in settings(data, run, "train.epochs=5", "log.print_freq=4", "data.workers=1") for a in ("--set", s)]
    result = cli("train", "--config", str(TINY), *sets)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.splitlines()

    val = records(run, "val")
    assert [r["epoch"] for r in val] == [0, 1, 2, 3, 4] and all(r["images"] == 100 for r in val)
    assert val[-1]["error1"] < 50, val  # chance is 90
    assert val[-1]["loss"] < val[0]["loss"]

    steps = [line for line in out if line.startswith("Epoch: [")]
    assert len(steps) == 5 * 4 and all(LOG_LINE.match(line) for line in steps)  # steps 0, 4, 8, 11 of 12
    val_lines = [line for line in out if line.startswith(" * ")]
    assert len(val_lines) == 5 and all(VAL_LINE.match(line) for line in val_lines)
    assert f"Error@1 {val[-1]['error1']:.3f}" in val_lines[-1]

    events = EventAccumulator(str(run))
    events.Reload()
    assert TB_TAGS <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("val/error1")] == pytest.approx([r["error1"] for r in val])
    assert len(events.Scalars("train/loss")) == 20

    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "last.pt", "best.pt"}
    cfg = load_config(run / "config.yaml")
    assert cfg == load_config(TINY, settings(data, run, "train.epochs=5", "log.print_freq=4", "data.workers=1"))
    last = checkpoint.load(run / "last.pt")
    assert (last["epoch"], last["step"], last["global_step"]) == (5, 0, 60)
    best = min(r["error1"] for r in val)
    assert last["best_error"] == best

    evaluated = cli("train", "--eval-only", "--resume", str(run / "best.pt"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"Error@1 {best:.3f}" in evaluated.stdout and "100 images" in evaluated.stdout

    again = cli("train", "--config", str(TINY), *sets)
    assert again.returncode == 1
    assert again.stderr.strip() == (f"Error: log.run_dir: {run} already holds a run (last.pt); continue it with "
                                    "--resume auto, or choose another log.run_dir")


def run_in_process(data: dict[str, Path], run_dir: Path, *extra: str, resume: str | None = None) -> int:
    return main(load_config(TINY, settings(data, run_dir, *extra)), resume=resume)


@pytest.mark.parametrize("device", DEVICES)
def test_resume_mid_epoch_continues_exactly(data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                            device: str) -> None:
    """Stopped mid-epoch and resumed, a run's later losses equal the uninterrupted run's,
    bit for bit. The model has dropout (RNG state), BN, an EMA, gradient accumulation and a
    loader worker, so every piece of resumable state matters. (On CUDA with deterministic
    kernels: cuDNN's fastest ones may add in any order.)"""
    common = ("model.arch=mobilenet_v3_small", "train.epochs=2", "train.accum_steps=2", "ema.enabled=true",
              "ema.decay=0.9", "log.print_freq=1", "data.workers=1", f"train.device={device}",
              f"train.deterministic={device == 'cuda'}")
    assert run_in_process(data, tmp_path / "whole", *common) == 0
    assert run_in_process(data, tmp_path / "parts", *common, "train.max_steps=17") == 0  # epoch 1, step 5 of 12
    stopped = capsys.readouterr().out
    assert f"Resume with: effitrain train --resume {tmp_path / 'parts' / 'last.pt'}" in stopped
    ck = checkpoint.load(tmp_path / "parts" / "last.pt")
    assert (ck["epoch"], ck["step"], ck["global_step"]) == (1, 5, 17)
    assert run_in_process(data, tmp_path / "parts", *common, resume="auto") == 0
    assert "Resumed from" in capsys.readouterr().out

    whole = {r["step"]: r["loss"] for r in records(tmp_path / "whole", "train")}
    resumed = [r for r in records(tmp_path / "parts", "train") if r["step"] > 17]
    assert [r["step"] for r in resumed] == list(range(18, 25))
    assert [r["loss"] for r in resumed] == [whole[r["step"]] for r in resumed]
    assert records(tmp_path / "parts", "resume")[0]["step"] == 17
    for kind in ("val", "val_ema"):
        assert records(tmp_path / "parts", kind)[-1]["loss"] == records(tmp_path / "whole", kind)[-1]["loss"]


def test_sigterm_checkpoints_and_resumes(data: dict[str, Path], tmp_path: Path) -> None:
    """SIGTERM mid-epoch: the step finishes, a checkpoint is saved, the process exits with
    128 + 15 and says how to resume; resuming continues from that step. The data here are
    plain ImageFolder directories (no store)."""
    run = tmp_path / "run"
    sets = [a for s in settings(data, run, "train.epochs=50", "log.print_freq=1", folders=True) for a in ("--set", s)]
    proc = subprocess.Popen([str(EFFITRAIN), "train", "--config", str(TINY), *sets],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and len(records(run, "train")) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert f"Resume with: effitrain train --resume {run / 'last.pt'}" in stdout

    ck = checkpoint.load(run / "last.pt")
    done = records(run, "train")[-1]["step"]
    assert ck["global_step"] == done >= 3 and (ck["epoch"], ck["step"]) == divmod(done, 12)
    resumed = cli("train", "--resume", str(run / "last.pt"), "--set", f"train.max_steps={done + 2}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resumed from {run / 'last.pt'}" in resumed.stdout
    assert [r["step"] for r in records(run, "train")][-2:] == [done + 1, done + 2]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
        data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The loss turns NaN in epoch 1 (as when training diverges); the run stops at the next
    print step with exit status 1 and leaves epoch 0's checkpoints byte for byte as they were."""
    forward = torch.nn.CrossEntropyLoss.forward
    calls = []

    def diverging(self: torch.nn.CrossEntropyLoss, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        loss = forward(self, logits, target)
        return loss * float("nan") if len(calls) > 14 else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", diverging)
    run = tmp_path / "run"
    assert run_in_process(data, run, "train.epochs=1") == 0
    saved = {name: digest(run / name) for name in ("last.pt", "best.pt")}
    assert run_in_process(data, run, "train.epochs=3", "log.print_freq=5", resume="auto") == 1
    err = capsys.readouterr().err
    assert f"Error: non-finite loss in epoch 1 by step 5; stopped without saving: {run / 'last.pt'} is left as it was" in err
    assert {name: digest(run / name) for name in saved} == saved
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".pt") == ["best.pt", "last.pt"]


@pytest.mark.parametrize(("amp", "arch", "device"), [
    ("bf16", "resnet18", "cpu"), ("fp16", "mobilenet_v3_small", "cpu"),
    pytest.param("bf16", "resnet18", "cuda", marks=CUDA), pytest.param("fp16", "resnet18", "cuda", marks=CUDA),
])
def test_mixed_precision(data: dict[str, Path], tmp_path: Path, amp: str, arch: str, device: str) -> None:
    """The autocast paths run on the CPU as on CUDA: bf16, and fp16 with its GradScaler,
    with channels_last; the scaler's state goes into the checkpoint. (fp16 convolutions are
    ~70x slower than bf16 on the CPU, hence the smaller model there.)"""
    run = tmp_path / "run"
    assert run_in_process(data, run, f"train.amp={amp}", f"model.arch={arch}", "train.channels_last=true",
                          f"train.device={device}", "train.max_steps=3", "log.print_freq=1") == 0
    losses = [r["loss"] for r in records(run, "train")]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
    scaler = checkpoint.load(run / "last.pt")["scaler"]
    assert (scaler.get("scale", 0) > 0) if amp == "fp16" else scaler == {}



@CUDA
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_learns_on_cuda(data: dict[str, Path], tmp_path: Path, decode: str) -> None:
    """On a GPU, the way the ResNet-50 recipe runs (fp16 autocast, channels_last, cuDNN
    autotuning, pinned batches through the side-stream prefetcher), and with the JPEG crops
    decoded on the GPU: validation Error@1 falls far below chance (90%)."""
    run = tmp_path / "run"
    assert run_in_process(data, run, "train.device=cuda", "train.amp=fp16", "train.channels_last=true",
                          "train.cudnn_benchmark=true", f"data.decode={decode}", "data.workers=2",
                          "train.epochs=5") == 0
    val = records(run, "val")
    assert val[-1]["error1"] < 50 and val[-1]["loss"] < val[0]["loss"], val


def test_progressive_resizing_switches_the_loader(data: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """The fast recipe's progressive resizing: epoch 0 at 32 px, epoch 1 at 48 px, evaluation
    at 48 px throughout."""
    assert run_in_process(data, tmp_path / "run", "train.epochs=2", "data.progressive.enabled=true",
                          "data.progressive.start_size=32", "data.progressive.end_size=48", "data.progressive.step=16",
                          "data.progressive.end_epoch=1", "data.val_image_size=48", "data.val_resize=55") == 0
    out = capsys.readouterr().out
    assert "Epoch 1: training resolution 48 px" in out and "resolution 32 px" not in out
    assert [r["epoch"] for r in records(tmp_path / "run", "val")] == [0, 1]


def test_cpu_compute_threads_leave_cores_to_loader_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the trainer lowers torch's threads to the cores its loader workers (and
    other local ranks) leave; OMP_NUM_THREADS set by the user wins."""
    from effitrain.train import loop

    cpus = len(os.sched_getaffinity(0))
    assert loop.cpu_compute_threads(0) == cpus
    assert loop.cpu_compute_threads(1) == max(1, cpus - 1)
    assert loop.cpu_compute_threads(cpus + 3) == 1
    assert loop.cpu_compute_threads(1, local_world_size=2) == max(1, cpus // 2 - 1)

    cfg = load_config(TINY, ["data.workers=1"])
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    torch.set_num_threads(cpus + 1)
    loop.set_backends(cfg, env)
    assert torch.get_num_threads() == max(1, cpus - 1)

    monkeypatch.setenv("OMP_NUM_THREADS", str(cpus + 1))
    torch.set_num_threads(cpus + 1)
    loop.set_backends(cfg, env)
    assert torch.get_num_threads() == cpus + 1
