"""``effitrain bench``: every stage runs and reports positive figures, the JSON has its
documented fields, the verdict names a stage, the plot is a PNG, bad input is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import effitrain.bench
from effitrain.bench.report import BenchResult, plot
from effitrain.bench.timing import Clock, Rate, measure, plan_steps
from effitrain.bench.verdict import LIMITS, Figure, decide
from effitrain.cli import cli

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny_cpu.yaml")
# Small images and batches: the stages, not the model, are under test.
FAST = ["--config", CONFIG, "--set", "data.image_size=32", "--set", "data.val_resize=36", "--seconds", "0.3", "-q"]
EXPECTED_KEYS = ["storage.shuffled", "storage.sequential", "decode.train", "decode.val", "decode.full",
                 "loader.workers=1", "loader.workers=2", "model.step", "end_to_end"]


def bench(*args: str) -> subprocess.CompletedProcess:
    # One intra-op thread: on a shared 2-core machine, OpenMP threads spinning against the
    # loader's workers make a step many times slower (no effect on what is checked).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "effitrain", "bench", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 JPEGs in 10 classes, converted with the default (random-access JPEG) payload."""
    from effitrain.store.prepare import ConvertOptions, default_payload
    from effitrain.store.writer import convert
    from effitrain.synth import make_imagefolder

    root = tmp_path_factory.mktemp("bench")
    folders = make_imagefolder(root / "synth", train_per_class=6, val_per_class=1, min_size=48, max_size=96)
    out = root / "train.lmdb"
    convert(folders["train"], out, options=ConvertOptions(payload=default_payload()), workers=0, progress=False)
    return out


def test_bench_store_json_plot(synth_store: Path, tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    run = bench(str(synth_store), *FAST, "--batch-size", "8", "--workers", "1,2",
                "--json", str(out_json), "--plot", str(out_png))
    assert run.returncode == 0, run.stderr
    for word in ("storage", "decode", "loader", "model", "end_to_end", "verdict"):
        assert word in run.stdout

    report = json.loads(out_json.read_text())
    assert report["version"] == 1
    assert report["data"] == {"path": str(synth_store), "kind": "store", "images": 60, "classes": 10}
    assert report["setup"]["device"] == "cpu" and report["setup"]["config"]["batch_size"] == 8
    for name in (*report["setup"], *report["setup"]["config"]):
        assert name in effitrain.bench.__doc__, name
    figures = report["figures"]
    assert [f["key"] for f in figures] == EXPECTED_KEYS
    for f in figures:
        assert 0 < f["img_per_s_min"] <= f["img_per_s"] <= f["img_per_s_max"], f
        assert len(f["img_per_s_windows"]) >= 3 and all(x > 0 for x in f["img_per_s_windows"])
        assert f["images"] > 0 and f["seconds"] > 0
        assert (f["mb_per_s"] is not None and f["mb_per_s"] > 0) == (f["stage"] == "storage")
        if f["stage"] in ("loader", "model", "end_to_end"):
            assert f["images"] % 8 == 0, f  # whole batches of the asked size went through
    assert [f["workers"] for f in figures if f["stage"] == "loader"] == [1, 2]
    assert figures[-1]["workers"] == 1  # tiny_cpu.yaml's data.workers

    verdict = report["verdict"]
    assert verdict["limit"] in LIMITS and verdict["factor"] >= 1
    assert ("compute-bound" in verdict["text"]) == (verdict["limit"] == "model")
    assert verdict["text"] in run.stdout

    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out_png) as im:
        im.load()
        assert im.format == "PNG" and im.width > 200 and im.height > 200


def test_bench_imagefolder(image_folder: Path, tmp_path: Path) -> None:
    """The raw folder of every odd format (PNG, CMYK, 16-bit, ...): same stages on files."""
    out_json = tmp_path / "bench.json"
    run = bench(str(image_folder), *FAST, "--batch-size", "4", "--workers", "1", "--json", str(out_json))
    assert run.returncode == 0, run.stderr
    report = json.loads(out_json.read_text())
    assert report["data"]["kind"] == "folder" and report["data"]["images"] == 18
    assert [f["key"] for f in report["figures"]] == [k for k in EXPECTED_KEYS if k != "loader.workers=2"]
    assert all(f["img_per_s"] > 0 for f in report["figures"])
    assert report["verdict"]["limit"] in LIMITS


def _error_line(args: list[str]) -> str:
    result = CliRunner().invoke(cli, ["bench", *args])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: "), result.output
    return lines[-1]


def test_bad_data_is_one_line(tmp_path: Path, synth_store: Path) -> None:
    assert str(tmp_path / "nope") in _error_line([str(tmp_path / "nope"), *FAST])
    (tmp_path / "empty").mkdir()
    assert str(tmp_path / "empty") in _error_line([str(tmp_path / "empty"), *FAST])
    (tmp_path / "notes.txt").write_text("not a store\n")
    assert "notes.txt" in _error_line([str(tmp_path / "notes.txt"), *FAST])
    (tmp_path / "no_images" / "cls").mkdir(parents=True)
    assert "no_images" in _error_line([str(tmp_path / "no_images"), *FAST])
    assert "--workers" in _error_line([str(synth_store), *FAST, "--workers", "1,two"])
    assert "--workers" in _error_line([str(synth_store), *FAST, "--workers", "0"])
    assert "train.batch_sise" in _error_line([str(synth_store), *FAST, "--set", "train.batch_sise=4"])
    assert "batch" in _error_line([str(synth_store), *FAST, "--batch-size", "1000"])


def _figure(stage: str, key: str, rate: float, workers: int | None = None) -> Figure:
    return Figure(stage, key, key, Rate((rate * 0.9, rate, rate * 1.1), (), 100, 1.0), workers)


def _figures(read: float, decode: float, loaders: dict[int, float], model: float, e2e: float) -> list[Figure]:
    return [
        _figure("storage", "storage.shuffled", read), _figure("decode", "decode.train", decode),
        *[_figure("loader", f"loader.workers={w}", r, w) for w, r in loaders.items()],
        _figure("model", "model.step", model), _figure("end_to_end", "end_to_end", e2e, 2),
    ]


def test_verdict_data_bound() -> None:
    v = decide(_figures(50_000, 230, {1: 210, 2: 410}, 1_900, 400), "store", "cuda", 16)
    assert v.limit == "loader" and v.factor == pytest.approx(1_900 / 410)
    assert "data-bound" in v.text and "410 img/s with 2 workers" in v.text and "1,900 img/s" in v.text
    assert "about 10 workers would keep up" in v.text  # 205 img/s per worker
    assert "more than the" not in v.text
    v = decide(_figures(50_000, 230, {1: 210, 2: 410}, 1_900, 400), "store", "cuda", 8)
    assert "more than the 8 CPU cores" in v.text and "data.decode=gpu" in v.text and "convert" not in v.text
    v = decide(_figures(50_000, 230, {1: 210, 2: 410}, 1_900, 400), "folder", "cpu", 8)
    assert "convert DATA into a store" in v.text and "data.decode=gpu" not in v.text


def test_verdict_compute_bound() -> None:
    v = decide(_figures(50_000, 900, {1: 800, 2: 1_500, 4: 2_300}, 1_000, 950), "store", "cuda", 4)
    assert v.limit == "model" and v.factor == pytest.approx(2.3)
    assert "compute-bound" in v.text and "2.3x headroom" in v.text and "2 workers would keep up" in v.text
    assert "95%" in v.text  # end to end against the slower of loader (2 workers) and model
    assert "changed between" not in v.text
    v = decide(_figures(50_000, 900, {1: 800, 2: 1_500}, 1_000, 1_300), "store", "cuda", 4)
    assert "130%" in v.text and "changed between the measurements" in v.text
    assert "set data.workers" not in v.text  # the end-to-end run's 2 workers keep up


def test_verdict_names_the_workers_a_config_needs() -> None:
    # As on an H100 with 16 cores: 15 workers feed the model, the config's 8 do not.
    figures = _figures(87_000, 612, {2: 1_291, 8: 3_437, 15: 5_582}, 4_583, 2_574)
    figures[-1] = _figure("end_to_end", "end_to_end", 2_574, 8)
    v = decide(figures, "store", "cuda", 16)
    assert v.limit == "model" and "75% of the slower" in v.text
    assert "the config's 8 workers give only 3,437 img/s: set data.workers=15 to keep up" in v.text


def test_verdict_storage_bound() -> None:
    v = decide(_figures(120, 900, {1: 100, 2: 190}, 1_000, 180), "folder", "cpu", 2)
    assert v.limit == "storage" and "reading is the slow part" in v.text and "effitrain convert" in v.text
    assert "share the same 2 cores" in v.text


def test_measure_in_turns_excludes_warmup_and_syncs() -> None:
    log: list[str] = []

    def work(name: str, n: int):
        def call() -> tuple[int, int]:
            log.append(name)
            return n, 10 * n
        return call

    rates = measure([work("a", 3), work("b", 5)], seconds=0.02, windows=4, sync=lambda: log.append("sync"),
                    warmup_s=0.0, warmup_calls=2)
    assert log[:4] == ["a", "a", "b", "b"]  # warm-ups, before any clock read
    turns = [name for name, before in zip(log[4:], log[3:]) if name != "sync" and before == "sync"]
    assert turns == ["a", "b"] * 4  # one window each per round, in turns
    assert log[4:].count("sync") == 2 * 8  # before and after each window
    for rate, name, n in zip(rates, "ab", (3, 5)):
        assert rate.images == n * (log.count(name) - 2)  # warm-up calls not counted
        assert len(rate.img_per_s) == 4 and rate.mb_per_s == pytest.approx([10 * x / 1e6 for x in rate.img_per_s])


def test_clock_rates_and_plan() -> None:
    clock = Clock(lambda: None)
    clock.marks = [(0.0, 0, 0), (1.0, 100, 2_000_000), (1.5, 200, 4_000_000), (3.5, 300, 5_000_000)]
    r = clock.rate()
    assert r.img_per_s == (100.0, 200.0, 50.0) and r.median == 100.0 and (r.low, r.high) == (50.0, 200.0)
    assert r.mb_per_s == (2.0, 4.0, 0.5) and r.images == 300 and r.seconds == 3.5
    assert plan_steps(0.1, 5.0, 5) == (5, 10)
    assert plan_steps(2.0, 1.0, 5) == (3, 1)  # slow steps: three windows of one step


def test_json_fields_are_documented() -> None:
    result = BenchResult({"path": "p", "kind": "store", "images": 1, "classes": 1}, {"device": "cpu"},
                         [_figure("model", "model.step", 10.0)])
    doc = effitrain.bench.__doc__
    for name in (*result.to_json(), *result.to_json()["figures"][0], "limit", "factor", "text"):
        assert name in doc, name


def test_plot_without_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = BenchResult({"path": "p", "kind": "store"}, {"device": "cpu"}, [_figure("model", "model.step", 1.0)])
    with pytest.raises(effitrain.bench.BenchError, match="matplotlib"):
        plot(result, tmp_path / "x.png")
