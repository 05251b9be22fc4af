"""``effitrain demo``: run end to end at its smallest size through the real CLI, it learns
(validation Error@1 far below chance), leaves the run directory, TensorBoard logs, bench
figures and plot it names; its images are a function of its seed; it never deletes a
directory it did not make."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from effitrain.cli import cli
from effitrain.demo import CHANCE, MARKER, SMALL, DemoPaths, make_data, prepare_out
from effitrain.store.reader import Store


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoPaths, subprocess.CompletedProcess]:
    """``effitrain demo --small --seed 5`` run once, as a user runs it."""
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    result = subprocess.run([sys.executable, "-m", "effitrain", "demo", "--small", "--seed", "5", "--out", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return DemoPaths(out), result


def test_small_demo_learns(demo: tuple[DemoPaths, subprocess.CompletedProcess]) -> None:
    paths, result = demo
    records = [json.loads(line) for line in (paths.run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["epoch"] for r in val] == list(range(SMALL.epochs))
    assert all(r["images"] == 10 * SMALL.val_per_class for r in val)
    assert val[-1]["error1"] <= CHANCE - 40, val  # chance: 90; far below it
    assert val[-1]["loss"] < val[0]["loss"]
    # The per-epoch summary the demo prints is these figures.
    assert " -> ".join(f"{r['error1']:.1f}" for r in val) in result.stdout


def test_small_demo_runs_the_real_commands_and_says_where_everything_is(
        demo: tuple[DemoPaths, subprocess.CompletedProcess]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    paths, result = demo
    out = result.stdout
    for command in ("convert", "inspect", "train", "bench"):
        assert re.search(rf"^\$ (OMP_NUM_THREADS=\d+ )?effitrain {command} ", out, re.M), command
    # convert's summary, inspect --verify's verdict, train's log, bench's verdict: their own output.
    n_train, n_val = 10 * SMALL.train_per_class, 10 * SMALL.val_per_class
    assert f"train.lmdb: {n_train:,} images, 10 classes, 0 skipped" in out
    assert f"verify     {n_train:,} of {n_train:,} records good, 0 bad" in out
    assert f" * Epoch {SMALL.epochs - 1}  Val Loss " in out and "\nverdict (" in out

    train, val = Store(paths.store("train")), Store(paths.store("val"))
    assert (len(train), len(val), len(train.classes)) == (n_train, n_val, 10)
    assert {"config.yaml", "last.pt", "best.pt"} <= {p.name for p in paths.run_dir.iterdir()}
    events = EventAccumulator(str(paths.run_dir))
    events.Reload()
    assert {"train/loss", "val/error1"} <= set(events.Tags()["scalars"])
    bench = json.loads(paths.bench_json.read_text())
    assert bench["verdict"]["limit"] in ("storage", "loader", "model") and bench["data"]["images"] == n_train
    assert paths.bench_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    tail = out[out.rindex("\nDone in "):]
    for path in (paths.run_dir, paths.bench_plot):
        assert str(path) in tail
    assert f"tensorboard --logdir {paths.runs}" in tail


def test_demo_images_are_a_function_of_the_seed(demo: tuple[DemoPaths, subprocess.CompletedProcess],
                                                tmp_path: Path) -> None:
    """The demo's images (drawn inside the CLI run) are exactly what its seed draws, and
    another seed draws other images."""
    paths, _ = demo
    again = prepare_out(tmp_path / "again")
    make_data(again, SMALL, seed=5)
    assert tree_digest(again.images) == tree_digest(paths.images)
    other = prepare_out(tmp_path / "other")
    make_data(other, SMALL, seed=6)
    digests = tree_digest(other.images)
    assert digests.keys() == tree_digest(paths.images).keys()
    assert not set(digests.values()) & set(tree_digest(paths.images).values())


def test_rerun_replaces_only_what_the_demo_made(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    paths = prepare_out(out)
    for part in (paths.run_dir / "last.pt", paths.store("train") / "data.mdb", paths.bench_plot):
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    prepare_out(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "notes.txt"])


def test_refuses_a_directory_it_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    result = CliRunner().invoke(cli, ["demo", "--small", "--out", str(precious)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {precious}: not empty and not made by effitrain demo; choose another --out"
    assert [p.name for p in precious.iterdir()] == ["chapter1.tex"]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = CliRunner().invoke(cli, ["demo", "--out", str(a_file)])
    assert result.exit_code != 0 and a_file.read_text() == "x"
