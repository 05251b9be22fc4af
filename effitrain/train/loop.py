"""The training loop: ``main(cfg)`` trains, evaluates and checkpoints. Read it top to bottom.

    effitrain train --config configs/resnet50_imagenet.yaml --set data.train=T --set data.val=V
    torchrun --nproc_per_node=8 --no-python effitrain train --config configs/resnet50_imagenet.yaml
    effitrain train --config configs/resnet50_imagenet.yaml --resume auto    # continue a run
    effitrain train --resume runs/resnet50/last.pt                            # same, config from it
    effitrain train --eval-only --resume runs/resnet50/best.pt

Data path: ``make_loader`` (uint8 batches, this rank's share) -> ``DevicePrefetcher`` (to the
device, normalized, channels_last) -> model under autocast -> ``MetricLogger`` (sums on the
device) -> log line, TensorBoard, metrics.jsonl -> atomic checkpoints.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.datasets.folder import find_classes

from ..cpus import usable_cpus
from ..data.loader import Loader, make_loader
from ..data.prefetch import DevicePrefetcher
from ..store.reader import Store, is_store
from . import checkpoint, distributed
from .config import Config, ConfigError, DataConfig, check, flatten, load_config, save_config, to_dict
from .distributed import DistEnv
from .metrics import MetricLogger, RunLog, batch_sums, format_val, summarize
from .model import create_model
from .optim import create_optimizer, create_scheduler, scaled_lr

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "off": torch.float32}


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops without saving."""


@dataclass
class TrainState:
    """Everything a checkpoint holds, besides the config and the RNG states."""

    model: torch.nn.Module  # what trains: DDP- and/or compile-wrapped
    raw_model: torch.nn.Module  # the bare module: checkpoints and evaluation use it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    epoch: int = 0
    step: int = 0  # optimizer steps done in this epoch
    global_step: int = 0
    best_error: float = math.inf


# --- small helpers ---------------------------------------------------------------------------

def _autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def _started(batches: Iterable[Any]) -> Iterator[Any]:
    """Iterate ``batches``, starting them with the global RNG state unchanged afterwards.

    Starting a DataLoader pass draws its workers' base seed from the global torch RNG (how
    often depends on the worker count); without this, a resumed run's dropout and other
    model randomness would drift from the uninterrupted run's.
    """
    it = iter(batches)
    with torch.random.fork_rng(devices=[]):
        first = next(it, None)
    if first is not None:
        yield first
        yield from it


def _source(path: str) -> tuple[Store | str, list[str]]:
    """A data source, opened once (a store's metadata is read here, not again by each
    loader), and its class names; no image is read."""
    if is_store(path):
        store = Store(path)
        return store, store.classes
    return path, find_classes(path)[0]


def train_image_size(data: DataConfig, epoch: int) -> int:
    """The training resolution of ``epoch`` (progressive resizing, FFCV-style)."""
    p = data.progressive
    if not p.enabled:
        return data.image_size
    if epoch <= p.start_epoch or p.end_epoch == p.start_epoch:
        return p.start_size if epoch <= p.start_epoch else p.end_size
    frac = min(1.0, (epoch - p.start_epoch) / (p.end_epoch - p.start_epoch))
    return int(round((p.start_size + frac * (p.end_size - p.start_size)) / p.step)) * p.step


def build_loader(cfg: Config, env: DistEnv, train: bool, image_size: int,
                 source: Store | str | None = None) -> Loader:
    """This rank's loader of data.train or data.val (or of ``source``, opened already)."""
    key = "data.train" if train else "data.val"
    per_rank = cfg.train.batch_size // (env.world_size * cfg.train.accum_steps)
    if source is None:
        source = cfg.data.train if train else cfg.data.val
    try:
        return make_loader(
            source, train=train, batch_size=per_rank,
            workers=cfg.data.workers, image_size=image_size, val_resize=cfg.data.val_resize,
            distributed=env.distributed, seed=cfg.train.seed, decode=cfg.data.decode, device=env.device,
        )
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def prefetcher(loader: Iterable, cfg: Config, env: DistEnv) -> DevicePrefetcher:
    """``loader``'s batches as the loop takes them: on the device, normalized, in the amp
    dtype and the config's memory format."""
    return DevicePrefetcher(loader, env.device, dtype=AMP_DTYPES[cfg.train.amp], channels_last=cfg.train.channels_last)


def _fmt_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class StopRequest:
    """SIGTERM / SIGINT: finish the current step, checkpoint, exit. A second one exits now."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals go to the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class Checkpointer:
    """Writes the run's ``last.pt`` (and ``best.pt``) and knows when a timed one is due."""

    def __init__(self, run_dir: Path, cfg: Config, env: DistEnv, classes: list[str]) -> None:
        self.path, self.best_path = run_dir / "last.pt", run_dir / "best.pt"
        self.cfg, self.env, self.classes = cfg, env, classes
        self.every = cfg.checkpoint.every_minutes * 60
        self._last = time.monotonic()

    def due(self) -> bool:
        return self.every > 0 and time.monotonic() - self._last >= self.every

    def save(self, s: TrainState, best: bool = False) -> None:
        """All ranks call this together (RNG states are gathered); rank 0 writes."""
        if not checkpoint.all_finite(s.raw_model):
            raise NonFiniteLoss(f"non-finite weights at epoch {s.epoch} step {s.step}")
        rng = distributed.all_gather_objects(checkpoint.rng_state())
        if self.env.is_main:
            checkpoint.save({
                "format": checkpoint.FORMAT,
                "epoch": s.epoch, "step": s.step, "global_step": s.global_step, "best_error": s.best_error,
                "model": s.raw_model.state_dict(),
                "ema": s.ema.state_dict() if s.ema is not None else None,
                "optimizer": s.optimizer.state_dict(),
                "scheduler": s.scheduler.state_dict(),
                "scaler": s.scaler.state_dict(),
                "rng": rng,
                "world_size": self.env.world_size,
                "classes": self.classes,
                "config": to_dict(self.cfg),
            }, self.path)
            if best:
                checkpoint.link(self.path, self.best_path)
        self._last = time.monotonic()


def restore(s: TrainState, ck: dict[str, Any], env: DistEnv) -> None:
    """Load a checkpoint's state into ``s`` (and this rank's RNG states)."""
    s.raw_model.load_state_dict(ck["model"])
    if s.ema is not None and ck["ema"] is not None:
        s.ema.load_state_dict(ck["ema"])
    s.optimizer.load_state_dict(ck["optimizer"])
    s.scheduler.load_state_dict(ck["scheduler"])
    s.scaler.load_state_dict(ck["scaler"])
    s.epoch, s.step, s.global_step, s.best_error = ck["epoch"], ck["step"], ck["global_step"], ck["best_error"]
    if len(ck["rng"]) == env.world_size:
        checkpoint.set_rng_state(ck["rng"][env.rank])
    else:
        env.print(f"note: the checkpoint holds RNG states of {len(ck['rng'])} ranks, this run has "
                  f"{env.world_size}: random streams restart from the seed")


# --- one epoch, evaluation ---------------------------------------------------------------

def train_one_epoch(s: TrainState, criterion: torch.nn.Module, loader: Loader, cfg: Config, env: DistEnv,
                    run_log: RunLog, stop: StopRequest, checkpointer: Checkpointer) -> str:
    """Train epoch ``s.epoch`` from its step ``s.step``. Returns why it ended: "epoch" (all
    steps done), "signal" or "max_steps". Raises NonFiniteLoss."""
    accum = cfg.train.accum_steps
    steps = len(loader) // accum
    s.model.train()
    loader.set_epoch(s.epoch, start_batch=s.step * accum)
    batches = _started(prefetcher(loader, cfg, env))
    logger = MetricLogger(env, s.epoch, steps, cfg.log.print_freq)
    amp = _autocast(cfg.train.amp, env.device)
    for i in range(s.step, steps):
        lr = s.optimizer.param_groups[0]["lr"]
        for k in range(accum):
            images, labels = logger.next_batch(batches)
            # DDP all-reduces gradients in backward; the inner micro-batches only accumulate.
            sync = k == accum - 1 or not env.distributed
            with contextlib.nullcontext() if sync else s.model.no_sync():
                with amp:
                    logits = s.model(images)
                    loss = criterion(logits, labels)
                s.scaler.scale(loss / accum).backward()
            logger.update(loss, logits, labels)
        s.scaler.step(s.optimizer)  # skipped by the scaler if fp16 gradients overflowed
        s.scaler.update()
        s.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # When the scaler skipped the step (fp16 overflow, usually the first steps), torch
            # warns that the scheduler steps first; the schedule follows the step count anyway.
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`", UserWarning)
            s.scheduler.step()
        s.step, s.global_step = i + 1, s.global_step + 1
        if s.ema is not None and s.global_step % cfg.ema.every == 0:
            s.ema.update_parameters(s.raw_model)

        # Every rank must take the same decisions: agree on the host flags (no GPU sync).
        stop_now, save_now = distributed.agree(bool(stop.signum), checkpointer.due())
        limit = 0 < cfg.train.max_steps <= s.global_step
        stats = logger.step_done(i, lr, force=stop_now or save_now or limit)
        if stats is not None:
            if stats["nonfinite"]:
                raise NonFiniteLoss(f"non-finite loss in epoch {s.epoch} by step {i}")
            scalars = {name: stats[name] for name in ("loss", "error1", "error5", "img_per_s", "data_time", "lr")}
            run_log.write("train", s.global_step, scalars, epoch=s.epoch, iter=i)
        if stop_now:
            return "signal"
        if limit:
            return "max_steps"
        if save_now:
            checkpointer.save(s)
    return "epoch"


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: Loader, cfg: Config, env: DistEnv) -> dict[str, float]:
    """Loss (plain cross-entropy) and Error@1/@5 over the whole validation set, all ranks.

    ``model`` must not be DDP-wrapped: ranks may hold different numbers of batches.
    """
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=env.device)
    start = time.perf_counter()
    amp = _autocast(cfg.train.amp, env.device)
    for images, labels in _started(prefetcher(loader, cfg, env)):
        with amp:
            logits = model(images)
        sums += batch_sums(F.cross_entropy(logits.float(), labels, reduction="sum"), logits, labels)
    # The one CPU-GPU sync of evaluation: sums over ranks, read back.
    stats = summarize(distributed.all_reduce_sum(sums).tolist())
    stats["img_per_s"] = stats["images"] / max(time.perf_counter() - start, 1e-9)
    return stats


# --- the run ---------------------------------------------------------------------------------

def resolve_config(config_path: str | None, overrides: tuple[str, ...], resume: str | None) -> Config:
    """The run's config: ``config_path`` with overrides, or (``--resume PATH`` without
    ``--config``) the checkpoint's own config with the overrides."""
    if config_path is not None:
        return load_config(config_path, overrides)
    if resume is None or resume == "auto":
        raise ConfigError("--config: required (or --resume PATH to take the config from a checkpoint)")
    return load_config(None, overrides, base=checkpoint.load(resume)["config"])


def _resume_path(resume: str | None, run_dir: Path, eval_only: bool) -> Path | None:
    if resume is None:
        if eval_only:
            raise ConfigError("--eval-only: needs --resume PATH (or auto) of the checkpoint to evaluate")
        if (run_dir / "last.pt").exists():
            raise ConfigError(f"log.run_dir: {run_dir} already holds a run (last.pt); continue it with "
                              "--resume auto, or choose another log.run_dir")
        return None
    if resume == "auto":
        path = run_dir / "last.pt"
        if eval_only and not path.exists():
            raise ConfigError(f"--resume: no checkpoint {path} to evaluate")
        return path if path.exists() else None
    return Path(resume)


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu_compute_threads(workers: int, local_world_size: int = 1) -> int:
    """Torch compute threads for one training process on the CPU: the cores this process may
    run on, shared by the ``local_world_size`` processes of this machine, less one core per
    DataLoader worker; at least 1."""
    return max(1, usable_cpus() // max(1, local_world_size) - workers)


def set_backends(cfg: Config, env: DistEnv) -> None:
    """Process-wide torch settings for training as ``cfg`` says on ``env.device``: CPU
    compute threads, cuDNN autotuning, deterministic kernels."""
    if env.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # torch starts one OpenMP compute thread per core; beside the loader's worker
        # processes (and the other ranks of a CPU DDP run) they oversubscribe the cores, and
        # OpenMP threads spin while they wait: on 2 cores, 2 threads next to 1 worker trained
        # 2.5-3x slower and benched up to 8x slower than 1 thread. Only ever lowered, so a
        # caller's own torch.set_num_threads stands.
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
        threads = cpu_compute_threads(cfg.data.workers, local_world_size)
        torch.set_num_threads(min(torch.get_num_threads(), threads))
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True)


def _model(cfg: Config, env: DistEnv, num_classes: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(raw, model)``: the bare model on the device (channels_last, SyncBN) and what trains
    (``raw`` wrapped in DDP and/or torch.compile)."""
    raw = create_model(cfg.model.arch, num_classes, cfg.model.zero_init_residual, cfg.model.kwargs)
    if cfg.model.sync_bn and env.distributed:
        if env.device.type != "cuda":
            raise ConfigError("model.sync_bn: PyTorch's SyncBatchNorm runs on CUDA only")
        raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    raw = raw.to(env.device, memory_format=memory_format)
    model = raw
    if env.distributed:
        model = DistributedDataParallel(raw, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if cfg.train.compile:
        model = torch.compile(model)
    return raw, model


def _ema(cfg: Config, raw: torch.nn.Module) -> AveragedModel | None:
    if not cfg.ema.enabled:
        return None
    return AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema.decay), use_buffers=True)


def create_state(cfg: Config, env: DistEnv, num_classes: int, steps_per_epoch: int) -> TrainState:
    """The model and everything that trains it, as ``cfg`` says, before any checkpoint is loaded."""
    raw, model = _model(cfg, env, num_classes)
    optimizer = create_optimizer(raw, cfg.optim, cfg.train.batch_size)
    return TrainState(
        model=model, raw_model=raw, optimizer=optimizer,
        scheduler=create_scheduler(optimizer, cfg.optim, cfg.train.epochs, steps_per_epoch),
        scaler=torch.amp.GradScaler(env.device.type, enabled=cfg.train.amp == "fp16"),
        ema=_ema(cfg, raw),
    )


def main(cfg: Config, resume: str | None = None, eval_only: bool = False) -> int:
    """Train as ``cfg`` says (or with ``eval_only``, evaluate a checkpoint); return the exit
    status: 0 when done, 1 on a non-finite loss, 128 + signal number when stopped by one."""
    env = distributed.init(cfg.train.device)
    try:
        return _run(cfg, env, resume, eval_only)
    finally:
        distributed.cleanup()


def _run(cfg: Config, env: DistEnv, resume: str | None, eval_only: bool) -> int:
    check(cfg, env.world_size, need_train=not eval_only)
    run_dir = Path(cfg.log.run_dir)
    ckpt_path = _resume_path(resume, run_dir, eval_only)
    ck = checkpoint.load(ckpt_path) if ckpt_path is not None else None
    seed_all(cfg.train.seed + env.rank)
    set_backends(cfg, env)
    if eval_only:
        return _evaluate_checkpoint(cfg, env, ck, ckpt_path)

    train_source, classes = _source(cfg.data.train)
    val_source, val_classes = _source(cfg.data.val)
    if val_classes != classes:
        raise ConfigError(f"data.val: its classes differ from data.train's ({len(classes)} classes)")
    if ck is not None and ck["classes"] != classes:
        raise ConfigError(f"data.train: {len(classes)} classes, but checkpoint {ckpt_path} has {len(ck['classes'])}")
    val_loader = build_loader(cfg, env, False, cfg.data.val_image_size or cfg.data.image_size, val_source)
    train_size = train_image_size(cfg.data, ck["epoch"] if ck is not None else 0)
    train_loader = build_loader(cfg, env, True, train_size, train_source)
    steps_per_epoch = len(train_loader) // cfg.train.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"train.accum_steps: {cfg.train.accum_steps} micro-batches make no step of an epoch")

    s = create_state(cfg, env, len(classes), steps_per_epoch)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    run_log = RunLog(run_dir, env.is_main, cfg.log.tensorboard)
    checkpointer = Checkpointer(run_dir, cfg, env, classes)
    if ck is not None:
        restore(s, ck, env)
        before = flatten(ck["config"])
        changed = {k: v for k, v in flatten(to_dict(cfg)).items() if before.get(k) != v}
        env.print(f"Resumed from {ckpt_path}: epoch {s.epoch}, step {s.step}/{steps_per_epoch}"
                  + (f"; settings changed since: {', '.join(f'{k}={v}' for k, v in changed.items())} "
                     "(optimizer and LR schedule state continue from the checkpoint)" if changed else ""))
        run_log.write("resume", s.global_step, {}, epoch=s.epoch, iter=s.step, checkpoint=str(ckpt_path))
        ck = None  # loaded: let its tensors (hundreds of MB for ResNet-50) go
    _describe(cfg, env, s, classes, val_loader, steps_per_epoch)
    if cfg.train.amp == "fp16" and env.device.type == "cpu":
        env.print("note: fp16 autocast is very slow on the CPU; train.amp=bf16 is its fast path")

    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    eval_model = torch.compile(s.raw_model) if cfg.train.compile else s.raw_model
    try:
        with StopRequest() as stop:
            return _epochs(s, criterion, (train_loader, train_size, train_source), val_loader, eval_model, cfg,
                           env, run_log, stop, checkpointer)
    except NonFiniteLoss as e:
        last = f"{checkpointer.path} is left as it was" if checkpointer.path.exists() else "no checkpoint was written"
        env.print(f"Error: {e}; stopped without saving: {last}. Try a lower optim.lr, or train.amp=bf16.",
                  file=sys.stderr)
        return 1
    finally:
        run_log.close()


def _evaluate_checkpoint(cfg: Config, env: DistEnv, ck: dict[str, Any], path: Path) -> int:
    """``--eval-only``: the checkpoint's model (and EMA) on data.val."""
    source, classes = _source(cfg.data.val)
    if classes != ck["classes"]:
        raise ConfigError(f"data.val: its classes differ from those of checkpoint {path} ({len(ck['classes'])})")
    raw, _ = _model(cfg, env, len(classes))
    raw.load_state_dict(ck["model"])
    loader = build_loader(cfg, env, False, cfg.data.val_image_size or cfg.data.image_size, source)
    epoch = ck["epoch"] - (ck["step"] == 0)  # the epoch the weights come from
    env.print(f"Evaluating {path} (epoch {epoch}, step {ck['step']}) on {cfg.data.val}")
    stats = evaluate(raw, loader, cfg, env)
    env.print(format_val(epoch, stats))
    ema = _ema(cfg, raw)
    if ema is not None and ck["ema"] is not None:
        ema.load_state_dict(ck["ema"])
        env.print(format_val(epoch, evaluate(ema.module, loader, cfg, env), "EMA Val"))
    env.print(f"   {stats['images']:.0f} images on {env.world_size} rank(s)")
    return 0


def _epochs(s: TrainState, criterion: torch.nn.Module, train: tuple[Loader, int, Store | str], val_loader: Loader,
            eval_model: torch.nn.Module, cfg: Config, env: DistEnv, run_log: RunLog, stop: StopRequest,
            checkpointer: Checkpointer) -> int:
    """The epoch loop: train, evaluate, checkpoint; stop on a signal or at train.max_steps."""
    train_loader, loader_size, train_source = train
    for epoch in range(s.epoch, cfg.train.epochs):
        s.epoch = epoch
        t0 = time.perf_counter()
        size = train_image_size(cfg.data, epoch)
        if size != loader_size:  # progressive resizing
            env.print(f"Epoch {epoch}: training resolution {size} px")
            train_loader, loader_size = build_loader(cfg, env, True, size, train_source), size
        why = train_one_epoch(s, criterion, train_loader, cfg, env, run_log, stop, checkpointer)
        if why != "epoch":
            checkpointer.save(s)
            return _stopped(why, s, cfg, env, stop, checkpointer)

        stats = evaluate(eval_model, val_loader, cfg, env)
        env.print(format_val(epoch, stats))
        run_log.write("val", s.global_step, {k: stats[k] for k in ("loss", "error1", "error5")},
                      epoch=epoch, images=stats["images"])
        if s.ema is not None:
            ema_stats = evaluate(s.ema.module, val_loader, cfg, env)
            env.print(format_val(epoch, ema_stats, "EMA Val"))
            run_log.write("val_ema", s.global_step, {k: ema_stats[k] for k in ("loss", "error1", "error5")},
                          epoch=epoch, images=ema_stats["images"])
        best = stats["error1"] < s.best_error
        s.best_error = min(s.best_error, stats["error1"])
        s.epoch, s.step = epoch + 1, 0
        checkpointer.save(s, best=best)
        took = time.perf_counter() - t0
        env.print(f"   epoch {epoch} took {_fmt_duration(took)}; "
                  f"{cfg.train.epochs - epoch - 1} to go, ETA {_fmt_duration(took * (cfg.train.epochs - epoch - 1))}; "
                  f"best Error@1 {s.best_error:.3f}")
        if distributed.agree(bool(stop.signum))[0] and epoch + 1 < cfg.train.epochs:  # a signal during evaluation
            return _stopped("signal", s, cfg, env, stop, checkpointer)
    env.print(f"Done: {cfg.train.epochs} epochs, best Error@1 {s.best_error:.3f}; run directory {checkpointer.path.parent}")
    return 0


def _stopped(why: str, s: TrainState, cfg: Config, env: DistEnv, stop: StopRequest, checkpointer: Checkpointer) -> int:
    """Say where the run stopped and how to resume it; return the exit status."""
    reason = signal.Signals(stop.signum).name if why == "signal" else f"train.max_steps={cfg.train.max_steps}"
    env.print(f"Stopped ({reason}) at epoch {s.epoch}, step {s.step}; checkpoint saved: {checkpointer.path}\n"
              f"Resume with: effitrain train --resume {checkpointer.path}"
              + (" (under the same torchrun command)" if env.distributed else ""))
    return 128 + stop.signum if why == "signal" else 0


def _describe(cfg: Config, env: DistEnv, s: TrainState, classes: list[str], val_loader: Loader, steps: int) -> None:
    """One paragraph for people: what runs where, with which numbers."""
    t = cfg.train
    params = sum(p.numel() for p in s.raw_model.parameters())
    per_rank = t.batch_size // (env.world_size * t.accum_steps)
    env.print(
        f"Training {cfg.model.arch} ({params / 1e6:.1f}M parameters, {len(classes)} classes) on "
        f"{env.device.type} x {env.world_size} rank(s): {cfg.data.train} -> {cfg.data.val}\n"
        f"  global batch {t.batch_size} = {per_rank} per rank x {env.world_size} rank(s) x {t.accum_steps} "
        f"accumulation step(s); lr {scaled_lr(cfg.optim, t.batch_size):g} ({cfg.optim.lr:g} per 256), "
        f"{cfg.optim.schedule} after {cfg.optim.warmup_epochs:g} warmup epoch(s)\n"
        f"  {t.epochs} epochs x {steps} steps; amp {t.amp}, channels_last {t.channels_last}, compile {t.compile}; "
        f"{len(val_loader)} validation batches per rank; run directory {cfg.log.run_dir}"
    )
