"""The training configuration: a typed dataclass tree loaded from YAML.

``load_config("configs/x.yaml", ["optim.lr=0.2", "train.amp=bf16"])`` reads the file,
applies ``--set`` overrides, checks every key and type, and returns a ``Config``. Unknown
keys, wrong types and impossible values raise ``ConfigError`` with a one-line message that
names the key, e.g. ``optim.lr: must be > 0, got -0.1``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key."""


@dataclass
class ProgressiveConfig:
    """Progressive resizing: the training resolution grows linearly from ``start_size`` at
    ``start_epoch`` to ``end_size`` at ``end_epoch``, in multiples of ``step`` pixels."""

    enabled: bool = False
    start_size: int = 160
    end_size: int = 192
    start_epoch: int = 0
    end_epoch: int = 0
    step: int = 32


@dataclass
class DataConfig:
    train: str = ""  # a store (effitrain convert) or an ImageFolder directory
    val: str = ""
    workers: int = 8  # loader processes per rank
    image_size: int = 224  # training crop size (unless progressive resizing is on)
    val_image_size: Optional[int] = None  # validation crop size; null = image_size
    val_resize: int = 256  # validation: shorter side resized to this, then center-cropped
    decode: Literal["cpu", "gpu"] = "cpu"
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # any torchvision classification model
    zero_init_residual: bool = False  # zero-init the last BN of each residual block
    sync_bn: bool = False  # SyncBatchNorm across ranks (CUDA only)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra builder arguments, e.g. {dropout: 0.0}


@dataclass
class OptimConfig:
    lr: float = 0.1  # for a global batch of 256; scaled linearly with train.batch_size
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1.0e-4
    no_decay_bn_bias: bool = False  # no weight decay on BN parameters and biases
    label_smoothing: float = 0.1
    warmup_epochs: float = 5.0
    warmup_start_factor: float = 0.1  # warmup starts at lr * this, grows linearly to lr
    schedule: Literal["cosine", "step", "linear"] = "cosine"
    step_milestones: list[int] = field(default_factory=lambda: [30, 60, 80])  # epochs, for "step"
    step_gamma: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 90
    batch_size: int = 256  # global: over all ranks and accumulation steps
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation)
    amp: Literal["fp16", "bf16", "off"] = "fp16"
    channels_last: bool = True
    compile: bool = False
    cudnn_benchmark: bool = True
    deterministic: bool = False  # deterministic kernels (slower); for exact reproduction
    device: Literal["auto", "cuda", "cpu"] = "auto"
    seed: int = 0
    max_steps: int = 0  # stop (with a resumable checkpoint) after this many optimizer steps in total; 0 = no limit


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9999  # per update
    every: int = 1  # update the average every this many optimizer steps


@dataclass
class LogConfig:
    print_freq: int = 10
    run_dir: str = "runs/resnet50"
    tensorboard: bool = True


@dataclass
class CheckpointConfig:
    every_minutes: float = 30.0  # also at every epoch end; 0 = only at epoch ends


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# --- building a typed tree from plain data -------------------------------------------------

def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked (and, for int -> float, converted) against type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        # YAML 1.1 reads a bare `off` as false: accept it where "off" is a choice.
        if value is False and "off" in args:
            value = "off"
        if value not in args:
            raise ConfigError(f"{key}: must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping with string keys, got {value!r}")
        return dict(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return float(value) if tp is float else value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {_join(prefix, close[0])}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{_join(prefix, str(k))}: unknown key{hint}")
    kwargs = {k: _coerce(v, hints[k], _join(prefix, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _field_type(dotted: str) -> Any:
    """The declared type of ``a.b.c`` in ``Config``; ConfigError if there is no such key."""
    tp: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{'.'.join(parts[:i])}: is not a section, cannot set {dotted}")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            names = list(hints)
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {'.'.join(parts[:i] + close)}?)" if close else ""
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: unknown key{hint}")
        tp = hints[part]
    return tp


def _parse_value(text: str, tp: Any) -> Any:
    """Parse an override's text: YAML, except that string-typed keys take the text as is."""
    stringy = tp is str or (typing.get_origin(tp) is Literal and all(isinstance(a, str) for a in typing.get_args(tp)))
    if stringy:
        return text
    return yaml.safe_load(text) if text.strip() else None


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set each ``a.b=value`` of ``overrides`` into the plain mapping ``raw`` (in place)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optim.lr=0.2")
        tp = _field_type(key)
        try:
            value = _parse_value(text, tp)
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse {text!r} ({_one_line(e)})") from None
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return raw


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def from_dict(data: dict) -> Config:
    """A typed ``Config`` from plain data (a parsed YAML file, a checkpoint's config)."""
    return _build(Config, data, "")


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> Config:
    """Read ``path`` (or start from ``base``, e.g. a checkpoint's config), apply overrides."""
    raw: Any = dict(base or {})
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML ({_one_line(e)})") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = _deep_copy(raw)
    apply_overrides(raw, overrides)
    return from_dict(raw)


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def to_dict(cfg: Config) -> dict:
    """Plain nested dicts/lists/scalars (YAML- and checkpoint-safe)."""
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (dataclass sections only; kwargs stay whole)."""
    out = {}
    for k, v in d.items():
        key = _join(prefix, k)
        if isinstance(v, dict) and k != "kwargs":
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved configuration as YAML (atomically: a reader never sees half)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


# --- impossible values -------------------------------------------------------------------

def check(cfg: Config, world_size: int = 1, check_paths: bool = True, need_train: bool = True) -> None:
    """Raise ConfigError for the first value that cannot work (``need_train=False``: for
    evaluation, data.train may be missing)."""
    d, m, o, t = cfg.data, cfg.model, cfg.optim, cfg.train

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {why}")

    for key, value in (("data.train", d.train), ("data.val", d.val))[0 if need_train else 1:]:
        need(bool(value), key, f"missing: give a store or ImageFolder path (--set {key}=PATH)")
        if check_paths:
            need(Path(value).exists(), key, f"no such store or directory: {value}")
    need(d.workers >= 0, "data.workers", f"must be >= 0, got {d.workers}")
    need(d.image_size >= 8, "data.image_size", f"must be >= 8, got {d.image_size}")
    val_size = d.val_image_size or d.image_size
    need(d.val_image_size is None or d.val_image_size >= 8, "data.val_image_size", f"must be >= 8, got {d.val_image_size}")
    need(d.val_resize >= val_size, "data.val_resize", f"must be >= the validation crop size {val_size}, got {d.val_resize}")
    p = d.progressive
    if p.enabled:
        need(p.step >= 1, "data.progressive.step", f"must be >= 1, got {p.step}")
        for key, size in (("start_size", p.start_size), ("end_size", p.end_size)):
            need(size >= 8 and size % p.step == 0, f"data.progressive.{key}",
                 f"must be >= 8 and a multiple of step {p.step}, got {size}")
        need(0 <= p.start_epoch <= p.end_epoch, "data.progressive.end_epoch",
             f"must be >= start_epoch {p.start_epoch} >= 0, got {p.end_epoch}")

    from .model import available_models  # torchvision import only when checking

    if m.arch not in available_models():
        close = difflib.get_close_matches(m.arch, available_models(), n=1)
        need(False, "model.arch", f"unknown torchvision classification model {m.arch!r}"
             + (f" (did you mean {close[0]}?)" if close else ""))

    need(math.isfinite(o.lr) and o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    need(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    need(not o.nesterov or o.momentum > 0, "optim.nesterov", "needs optim.momentum > 0")
    need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    need(0 <= o.label_smoothing < 1, "optim.label_smoothing", f"must be in [0, 1), got {o.label_smoothing}")
    need(0 <= o.warmup_epochs <= t.epochs, "optim.warmup_epochs",
         f"must be >= 0 and <= train.epochs {t.epochs}, got {o.warmup_epochs}")
    need(0 < o.warmup_start_factor <= 1, "optim.warmup_start_factor", f"must be in (0, 1], got {o.warmup_start_factor}")
    need(all(x > 0 for x in o.step_milestones) and o.step_milestones == sorted(set(o.step_milestones)),
         "optim.step_milestones", f"must be increasing positive epochs, got {o.step_milestones}")
    need(0 < o.step_gamma <= 1, "optim.step_gamma", f"must be in (0, 1], got {o.step_gamma}")

    need(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    need(t.accum_steps >= 1, "train.accum_steps", f"must be >= 1, got {t.accum_steps}")
    need(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    need(t.batch_size % (world_size * t.accum_steps) == 0, "train.batch_size",
         f"{t.batch_size} is not divisible by world size {world_size} x train.accum_steps {t.accum_steps}")
    need(t.seed >= 0, "train.seed", f"must be >= 0, got {t.seed}")
    need(t.max_steps >= 0, "train.max_steps", f"must be >= 0, got {t.max_steps}")

    need(0 < cfg.ema.decay < 1, "ema.decay", f"must be in (0, 1), got {cfg.ema.decay}")
    need(cfg.ema.every >= 1, "ema.every", f"must be >= 1, got {cfg.ema.every}")
    need(cfg.log.print_freq >= 1, "log.print_freq", f"must be >= 1, got {cfg.log.print_freq}")
    need(bool(cfg.log.run_dir), "log.run_dir", "must not be empty")
    need(cfg.checkpoint.every_minutes >= 0, "checkpoint.every_minutes",
         f"must be >= 0, got {cfg.checkpoint.every_minutes}")
