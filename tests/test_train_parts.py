"""The trainer's parts on their own: schedule, optimizer groups, checkpoints, metrics, model."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from effitrain.train import checkpoint
from effitrain.train.config import ConfigError, DataConfig, OptimConfig, ProgressiveConfig
from effitrain.train.loop import train_image_size
from effitrain.train.metrics import batch_sums, summarize
from effitrain.train.model import create_model
from effitrain.train.optim import create_optimizer, create_scheduler, lr_factor, scaled_lr


# --- learning rate ------------------------------------------------------------------------

def test_lr_scales_linearly_from_batch_256() -> None:
    assert scaled_lr(OptimConfig(lr=0.1), 256) == pytest.approx(0.1)
    assert scaled_lr(OptimConfig(lr=0.1), 1024) == pytest.approx(0.4)


def test_warmup_then_cosine_per_step() -> None:
    f = lr_factor(OptimConfig(warmup_epochs=2, warmup_start_factor=0.1, schedule="cosine"), epochs=10, steps_per_epoch=100)
    assert f(0) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.55)  # halfway through warmup
    assert f(200) == pytest.approx(1.0)
    assert f(600) == pytest.approx(0.5)  # halfway through the cosine
    assert f(999) == pytest.approx(0.0, abs=1e-4)
    values = [f(i) for i in range(1000)]
    assert values[:200] == sorted(values[:200]) and values[200:] == sorted(values[200:], reverse=True)


def test_step_and_linear_schedules() -> None:
    step = lr_factor(OptimConfig(warmup_epochs=0, schedule="step", step_milestones=[3, 6], step_gamma=0.1), 9, 10)
    assert [step(i) for i in (0, 29, 30, 59, 60, 89)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    linear = lr_factor(OptimConfig(warmup_epochs=1, schedule="linear"), 5, 10)
    assert linear(10) == pytest.approx(1.0) and linear(30) == pytest.approx(0.5)


def test_scheduler_drives_the_optimizer_and_restores() -> None:
    model = torch.nn.Linear(3, 2)
    cfg = OptimConfig(lr=0.256, warmup_epochs=1, warmup_start_factor=0.5)
    opt = create_optimizer(model, cfg, 1000)
    sched = create_scheduler(opt, cfg, epochs=3, steps_per_epoch=4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # 0.256 * 1000 / 256 * 0.5
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = create_optimizer(model, cfg, 1000)
    sched2 = create_scheduler(opt2, cfg, epochs=3, steps_per_epoch=4)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_no_weight_decay_on_bn_and_bias() -> None:
    model = torchvision.models.resnet18(num_classes=3)
    plain = create_optimizer(model, OptimConfig(weight_decay=1e-4), 256)
    assert [g["weight_decay"] for g in plain.param_groups] == [1e-4]
    split = create_optimizer(model, OptimConfig(weight_decay=1e-4, no_decay_bn_bias=True), 256)
    decayed, free = split.param_groups
    assert decayed["weight_decay"] == 1e-4 and free["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in free["params"])
    bn = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert bn <= {id(p) for p in free["params"]} and id(model.fc.bias) in {id(p) for p in free["params"]}
    assert len(decayed["params"]) + len(free["params"]) == len(list(model.parameters()))


def test_progressive_resizing() -> None:
    data = DataConfig(image_size=224, progressive=ProgressiveConfig(
        enabled=True, start_size=160, end_size=192, start_epoch=10, end_epoch=20, step=32))
    sizes = [train_image_size(data, e) for e in range(25)]
    assert sizes[:11] == [160] * 11 and sizes[20:] == [192] * 5
    assert sizes == sorted(sizes) and set(sizes) == {160, 192}
    assert train_image_size(DataConfig(image_size=128), 7) == 128


# --- model -------------------------------------------------------------------------------------

def test_model_by_name_with_classes_from_data() -> None:
    model = create_model("resnet18", 7)
    assert model.fc.out_features == 7
    assert create_model("squeezenet1_1", 4, kwargs={"dropout": 0.0}).classifier[0].p == 0.0


def test_zero_init_residual_zeroes_the_last_bn_of_each_block() -> None:
    model = create_model("resnet50", 10, zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert len(blocks) == 16 and all(torch.all(b.bn3.weight == 0) for b in blocks)
    assert not torch.all(create_model("resnet50", 10).layer1[0].bn3.weight == 0)


def test_model_options_a_builder_rejects_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^model\.zero_init_residual: vgg11 does not accept it"):
        create_model("vgg11", 10, zero_init_residual=True)
    with pytest.raises(ConfigError, match=r"^model\.kwargs: resnet18 does not accept it"):
        create_model("resnet18", 10, kwargs={"dropout": 0.1})


# --- checkpoints -------------------------------------------------------------------------

def test_checkpoint_round_trip_with_weights_only(tmp_path: Path) -> None:
    model = torchvision.models.resnet18(num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = {"format": checkpoint.FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "config": {"a": [1, 2]}, "best_error": math.inf, "rng": [checkpoint.rng_state()]}
    checkpoint.save(state, tmp_path / "last.pt")
    back = checkpoint.load(tmp_path / "last.pt")
    assert all(torch.equal(back["model"][k], v) for k, v in model.state_dict().items())
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(back["optimizer"])
    assert back["config"] == {"a": [1, 2]} and back["best_error"] == math.inf
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_rng_states_restore_every_stream() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    saved = checkpoint.rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    checkpoint.set_rng_state(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save({"format": checkpoint.FORMAT, "epoch": 1}, path)
    good = path.read_bytes()

    def disk_full(obj: object, f: object) -> None:
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save({"format": checkpoint.FORMAT, "epoch": 2}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_best_is_a_link_that_keeps_its_content(tmp_path: Path) -> None:
    checkpoint.save({"format": checkpoint.FORMAT, "epoch": 1}, tmp_path / "last.pt")
    checkpoint.link(tmp_path / "last.pt", tmp_path / "best.pt")
    checkpoint.save({"format": checkpoint.FORMAT, "epoch": 2}, tmp_path / "last.pt")
    assert checkpoint.load(tmp_path / "best.pt")["epoch"] == 1
    assert checkpoint.load(tmp_path / "last.pt")["epoch"] == 2


def test_unreadable_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    truncated = tmp_path / "cut.pt"
    checkpoint.save({"format": checkpoint.FORMAT, "w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    torch.save({"w": torch.zeros(1)}, tmp_path / "foreign.pt")
    for name, needle in (("junk.pt", "not a readable checkpoint"), ("cut.pt", "not a readable checkpoint"),
                         ("foreign.pt", "not an effitrain checkpoint"), ("none.pt", "no such checkpoint")):
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load(tmp_path / name)
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_non_finite_weights_are_detected() -> None:
    model = torch.nn.Linear(2, 2)
    assert checkpoint.all_finite(model)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert not checkpoint.all_finite(model)


# --- metrics -------------------------------------------------------------------------------

def test_batch_sums_count_top1_top5() -> None:
    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    target = torch.tensor([0, 0, 5])  # top-1 hit; a miss (rank 6); in top-6 but not top-5
    sums = batch_sums(torch.tensor(6.0), logits, target)
    assert sums.tolist() == [6.0, 1.0, 1.0, 3.0, 0.0]
    assert summarize(sums.tolist()) == pytest.approx({"loss": 2.0, "error1": 200 / 3, "error5": 200 / 3, "images": 3})
    assert batch_sums(torch.tensor(float("nan")), logits, target)[4] == 1.0
