"""The training config: YAML -> typed tree, --set overrides, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from effitrain.cli import cli
from effitrain.train.config import Config, ConfigError, check, from_dict, load_config, save_config, to_dict

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# The keys the issue names, exactly as it writes them.
ISSUE_YAML = """
data:   {train: PATH, val: PATH, workers: 8, image_size: 224, val_resize: 256, decode: cpu}
model:  {arch: resnet50}
optim:  {lr: 0.1, momentum: 0.9, weight_decay: 1.0e-4, label_smoothing: 0.1,
         warmup_epochs: 5, schedule: cosine}
train:  {epochs: 90, batch_size: 256, amp: fp16, channels_last: true, compile: false,
         seed: 0}
log:    {print_freq: 10, run_dir: runs/resnet50}
checkpoint: {every_minutes: 30}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.fixture()
def data_dirs(tmp_path: Path) -> list[str]:
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    return [f"data.train={tmp_path / 'train'}", f"data.val={tmp_path / 'val'}"]


def error_of(tmp_path: Path, text: str, overrides: tuple[str, ...] = (), world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as e:
        check(load_config(write(tmp_path, text), overrides), world_size=world_size, check_paths=False)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_the_issues_keys_load_with_their_types(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ISSUE_YAML))
    assert cfg.data.train == "PATH" and cfg.data.workers == 8 and cfg.data.decode == "cpu"
    assert cfg.optim.lr == 0.1 and isinstance(cfg.optim.warmup_epochs, float)
    assert cfg.train.amp == "fp16" and cfg.train.batch_size == 256 and cfg.train.channels_last is True
    assert cfg.checkpoint.every_minutes == 30.0 and cfg.log.run_dir == "runs/resnet50"
    check(cfg, world_size=8, check_paths=False)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid(path: Path, data_dirs: list[str]) -> None:
    cfg = load_config(path, data_dirs)
    check(cfg, world_size=8 if "resnet50" in path.name else 1)


def test_shipped_recipes_say_what_the_issue_asks() -> None:
    classic = load_config(REPO / "configs/resnet50_imagenet.yaml")
    assert (classic.model.arch, classic.train.epochs, classic.train.batch_size) == ("resnet50", 90, 256)
    assert (classic.optim.momentum, classic.optim.weight_decay, classic.optim.label_smoothing) == (0.9, 1e-4, 0.1)
    assert classic.optim.warmup_epochs > 0 and classic.optim.schedule in ("cosine", "step")
    fast = load_config(REPO / "configs/resnet50_fast.yaml")
    assert 16 <= fast.train.epochs <= 40 and fast.train.batch_size > 256
    assert fast.data.progressive.enabled and fast.data.progressive.start_size < fast.data.progressive.end_size
    assert fast.data.val_image_size > fast.data.progressive.end_size
    tiny = load_config(REPO / "configs/tiny_cpu.yaml")
    assert tiny.train.device == "cpu" and tiny.data.image_size <= 64


def test_overrides_are_typed(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ISSUE_YAML), [
        "optim.lr=1", "train.channels_last=false", "log.run_dir=123", "train.amp=off",
        "optim.step_milestones=[10, 20]", "data.val_image_size=288", "model.kwargs={dropout: 0.0}",
        "data.progressive.enabled=true",
    ])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.channels_last is False
    assert cfg.log.run_dir == "123"  # string keys take the text as it is
    assert cfg.train.amp == "off"
    assert cfg.optim.step_milestones == [10, 20]
    assert cfg.data.val_image_size == 288
    assert cfg.model.kwargs == {"dropout": 0.0}
    assert cfg.data.progressive.enabled is True
    assert load_config(write(tmp_path, ISSUE_YAML), ["data.val_image_size=null"]).data.val_image_size is None


def test_yaml_bare_off_means_off(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "train: {amp: off}")).train.amp == "off"


@pytest.mark.parametrize(("text", "overrides", "key"), [
    ("optim: {lrr: 0.1}", (), "optim.lrr: unknown key (did you mean optim.lr?)"),
    ("optimizer: {lr: 0.1}", (), "optimizer: unknown key"),
    ("", ("train.batchsize=3",), "train.batchsize: unknown key (did you mean train.batch_size?)"),
    ("", ("model.arch.name=x",), "model.arch: is not a section"),
    ("", ("optim.lr",), "expected KEY=VALUE"),
    ("train: {batch_size: abc}", (), "train.batch_size: expected an integer, got 'abc'"),
    ("train: {batch_size: 2.5}", (), "train.batch_size: expected an integer"),
    ("train: {channels_last: 1}", (), "train.channels_last: expected true/false"),
    ("", ("optim.lr=fast",), "optim.lr: expected a number, got 'fast'"),
    ("", ("train.amp=fp8",), "train.amp: must be one of 'fp16' | 'bf16' | 'off', got 'fp8'"),
    ("", ("optim.step_milestones=30",), "optim.step_milestones: expected a list"),
    ("data: [1, 2]", (), "data: expected a mapping"),
    ("", ("optim.lr=[1",), "optim.lr: cannot parse"),
])
def test_unknown_keys_and_wrong_types(tmp_path: Path, text: str, overrides: tuple[str, ...], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    assert key in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("overrides", "world_size", "key"), [
    (("optim.lr=-0.1",), 1, "optim.lr: must be > 0, got -0.1"),
    (("optim.momentum=1.0",), 1, "optim.momentum"),
    (("optim.weight_decay=-1",), 1, "optim.weight_decay"),
    (("optim.label_smoothing=1.0",), 1, "optim.label_smoothing"),
    (("optim.warmup_epochs=91",), 1, "optim.warmup_epochs: must be >= 0 and <= train.epochs 90, got 91.0"),
    (("optim.step_milestones=[60, 30]",), 1, "optim.step_milestones"),
    (("train.batch_size=250",), 4, "train.batch_size: 250 is not divisible by world size 4 x train.accum_steps 1"),
    (("train.batch_size=256", "train.accum_steps=3"), 1, "train.batch_size: 256 is not divisible"),
    (("train.epochs=0",), 1, "train.epochs"),
    (("data.train=",), 1, "data.train: missing"),
    (("data.val_resize=200",), 1, "data.val_resize: must be >= the validation crop size 224"),
    (("data.progressive.enabled=true", "data.progressive.start_size=100"), 1, "data.progressive.start_size"),
    (("model.arch=resnet5",), 1, "model.arch: unknown torchvision classification model 'resnet5'"),
    (("log.print_freq=0",), 1, "log.print_freq"),
    (("checkpoint.every_minutes=-1",), 1, "checkpoint.every_minutes"),
    (("ema.decay=1.5",), 1, "ema.decay"),
])
def test_impossible_values(tmp_path: Path, overrides: tuple[str, ...], world_size: int, key: str) -> None:
    assert key in error_of(tmp_path, ISSUE_YAML, overrides, world_size)


def test_missing_data_path_is_named(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ISSUE_YAML), [f"data.train={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"^data\.train: no such store or directory: .*nope$"):
        check(cfg)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ISSUE_YAML), ["optim.lr=0.3", "model.kwargs={dropout: 0.1}"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text())) == cfg
    assert from_dict(to_dict(Config())) == Config()


@pytest.mark.parametrize(("args", "needle"), [
    (["--set", "optim.lr=-1"], "Error: optim.lr: must be > 0, got -1.0"),
    (["--set", "optim.lrr=1"], "Error: optim.lrr: unknown key (did you mean optim.lr?)"),
    (["--set", "train.batch_size=x"], "Error: train.batch_size: expected an integer, got 'x' (str)"),
    (["--set", "data.train=/no/such/store"], "Error: data.train: no such store or directory: /no/such/store"),
])
def test_cli_reports_one_line_and_fails(tmp_path: Path, data_dirs: list[str], args: list[str], needle: str) -> None:
    path = write(tmp_path, ISSUE_YAML)
    sets = [a for d in data_dirs for a in ("--set", d)]
    result = CliRunner().invoke(cli, ["train", "--config", str(path), *sets, *args])
    assert result.exit_code == 1
    assert result.output.strip() == needle


def test_cli_needs_a_config_or_a_checkpoint() -> None:
    result = CliRunner().invoke(cli, ["train"])
    assert result.exit_code == 1 and result.output.startswith("Error: --config: required")
