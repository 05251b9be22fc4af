"""README.md: every command it shows works as written.

Statically, every command of every shell block: an ``effitrain`` command line parses with
the CLI's own click definitions (the subcommand, every option and argument that ``--help``
lists), its ``--config`` file exists and its ``--set`` keys and values load; a ``torchrun``
line parses with torchrun's own argument parser.

Then the blocks run in README order, as a user pastes them, against a tiny fake ImageNet
laid out like the downloads (a train tar of per-class tars, a flat val tar, Kaggle's
``LOC_val_solution.csv``): ``/data/imagenet`` becomes a temporary folder. Training and
bench commands get overrides appended that shrink them to a CPU-sized job; the few lines
that need GPUs, several nodes, a server or would change the environment are in
``NOT_RUN``, each with its reason.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import click
import numpy as np
import pytest

from effitrain.cli import cli
from effitrain.store.reader import Store
from effitrain.synth import make_imagefolder
from effitrain.train.config import load_config

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DATA_ROOT = "/data/imagenet"  # where the README puts ImageNet; replaced by a temporary folder
BIN = Path(sys.executable).parent

# The first word of each command line not run here, and why.
NOT_RUN = {
    "make": "make test is this suite; make demo is test_demo.py's run plus test_make_demo_sets_up_first",
    "source": "the tests run with the environment's bin directory first on PATH",
    "torchrun": "needs GPUs or several nodes; parsed with torchrun's own parser above",
    "tensorboard": "a server that runs until stopped",
    "pip": "would change the environment the tests run in",
}


def not_run(words: list[str]) -> str | None:
    """Why the command line ``words`` is not run here, or None."""
    if words[:2] == ["effitrain", "convert"] and "--resume" in words:
        return "recovers an interrupted conversion: test_convert_resume.py kills conversions and resumes them"
    return NOT_RUN.get(words[0])


# Appended to `effitrain train` and `effitrain bench` lines: the same commands, CPU-sized.
TINY_TRAIN = ("train.device=cpu", "model.arch=resnet18", "data.image_size=32", "data.val_resize=37",
              "data.val_image_size=null", "data.progressive.enabled=false", "data.workers=0",
              "train.batch_size=6", "train.epochs=1", "optim.warmup_epochs=0", "train.amp=off",
              "train.channels_last=false", "log.print_freq=1")
TINY_BENCH = ("--seconds", "0.1", "--workers", "1", "--device", "cpu", "--batch-size", "6")

# The fake ImageNet: three WordNet ids as class folders.
WNIDS = ("n01440764", "n01443537", "n01751748")
TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 4


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of a Markdown text: (language, body), in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def commands(body: str) -> list[str]:
    """The command lines of a shell block (continuations joined, comments and blanks dropped)."""
    joined = body.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def shell_commands() -> list[str]:
    return [c for lang, body in blocks(README.read_text()) if lang == "bash" for c in commands(body)]


def effitrain_args(words: list[str]) -> list[str] | None:
    """The arguments after ``effitrain`` on a command line (also under torchrun), or None."""
    return words[words.index("effitrain") + 1:] if "effitrain" in words else None


def test_readme_has_the_commands_the_issue_asks_for() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert "MEASURED_TABLE" not in text, "the measured table is still a placeholder"
    lines = shell_commands()
    effitrain_lines = [c for c in lines if effitrain_args(shlex.split(c, comments=True)) is not None]
    for needle in ("convert", "--labels", "--max-size", "--workers", "--keep-bytes", "--resume", "inspect", "bench",
                   "--eval-only"):
        assert any(needle in c for c in effitrain_lines), needle
    assert any(c.startswith("torchrun --nproc_per_node=8") for c in lines)
    assert any(c.startswith("torchrun --nnodes=2") and "--rdzv_endpoint" in c for c in lines)
    assert "docs/FORMAT.md" in text and (REPO / "docs" / "FORMAT.md").is_file()
    for topic in ("pillow-simd", "/dev/shm", "Worker count", "Disk space"):
        assert topic in text, topic


EFFITRAIN_LINES = [c for c in shell_commands() if "effitrain" in shlex.split(c, comments=True)]


@pytest.mark.parametrize("line", EFFITRAIN_LINES, ids=[f"{i}:{c[:40]}" for i, c in enumerate(EFFITRAIN_LINES)])
def test_effitrain_command_lines_parse(line: str) -> None:
    """Each effitrain line parses exactly as the CLI would parse it, and its config loads."""
    words = shlex.split(line, comments=True)
    args = effitrain_args(words)
    assert args is not None
    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        parsed = get_args_parser().parse_args(words[1:])  # exits (fails the test) on an unknown flag
        assert parsed.no_python and parsed.training_script == "effitrain"
    if not args or args[0].startswith("-"):  # effitrain --help / --version
        assert set(args) <= {"--help", "-h", "--version", "-V"}
        return
    name, rest = args[0], args[1:]
    assert name in cli.commands, f"no effitrain command {name!r}"
    command = cli.commands[name]
    try:
        with command.make_context(name, list(rest)) as ctx:
            params = ctx.params
    except click.UsageError as e:
        pytest.fail(f"{line}\n  {e.format_message()}")
    if name in ("train", "bench"):
        config = params.get("config_path")
        if config is not None:
            assert (REPO / config).is_file(), config
        load_config(str(REPO / config) if config else None, params["overrides"])  # keys and values


def test_make_demo_sets_up_first(tmp_path: Path) -> None:
    """``make demo`` on a fresh machine builds the venv and the extension, then runs the demo."""
    venv = tmp_path / "venv"
    result = subprocess.run(["make", "-n", "demo", f"VENV={venv}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    setup = next(i for i, line in enumerate(lines) if "scripts/setup_venv.sh" in line)
    ext = next(i for i, line in enumerate(lines) if "jpegext.c" in line)
    demo = next(i for i, line in enumerate(lines) if "-m effitrain demo --out demo-out" in line)
    assert setup < ext < demo and lines[demo].startswith(f"{venv}/bin/python")


# --- running the README --------------------------------------------------------------------


def fake_imagenet(root: Path) -> dict[str, str]:
    """The ImageNet downloads in miniature under ``root``; returns each val file's true class."""
    drawn = make_imagefolder(root.parent / "drawn", num_classes=len(WNIDS), train_per_class=TRAIN_PER_CLASS,
                             val_per_class=VAL_PER_CLASS, min_size=40, max_size=72, seed=3)
    root.mkdir(parents=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid, folder in zip(WNIDS, sorted(drawn["train"].iterdir())):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for i, path in enumerate(sorted(folder.iterdir())):
                    tar.add(path, arcname=f"{wnid}_{i + 1}.JPEG")
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = inner.tell()
            inner.seek(0)
            outer.addfile(info, inner)
    val = [(wnid, path) for wnid, folder in zip(WNIDS, sorted(drawn["val"].iterdir())) for path in sorted(folder.iterdir())]
    order = np.random.default_rng(0).permutation(len(val))  # classes interleaved, as in ImageNet
    truth = {}
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
        for number, k in enumerate(order, 1):
            wnid, path = val[k]
            name = f"ILSVRC2012_val_{number:08d}"
            tar.add(path, arcname=f"{name}.JPEG")
            truth[f"{name}.JPEG"] = wnid
    # Kaggle's file: a header, rows in no particular order, one box or more per image.
    rows = [f"{name[:-5]},{wnid} 10 12 30 33 {wnid} 1 2 20 21 " for name, wnid in sorted(truth.items(), reverse=True)]
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return truth


def runnable(line: str) -> str:
    """``line`` as the test runs it: CPU-sized if it trains or benches, skipped if in NOT_RUN."""
    words = shlex.split(line, comments=True)
    if not_run(words) is not None:
        return f": not run here: {words[0]}"
    code = line.split(" #")[0].rstrip()
    if words[:2] == ["effitrain", "train"]:
        code += " " + " ".join(f"--set {s}" for s in TINY_TRAIN)
    if words[:2] == ["effitrain", "bench"]:
        code += " " + " ".join(TINY_BENCH) + " " + " ".join(f"--set {s}" for s in TINY_TRAIN[:-1])
    return code


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every README block run in order in a scratch directory; the outputs of each block."""
    scratch = tmp_path_factory.mktemp("readme")
    data = scratch / "data" / "imagenet"
    truth = fake_imagenet(data)
    work = scratch / "work"  # the "checkout": configs/ is there, runs/ land there
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    # One shell session, as a user's: the first block's `export DATA=...` holds for the later ones.
    assert f"export DATA={DATA_ROOT} " in README.read_text()
    # One compute thread: on 2 shared cores torch's default of one spinning OpenMP thread per
    # core made these CPU-sized train and bench runs up to 8x slower (see effitrain.train.loop.cpu_compute_threads).
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DATA": str(data), "OMP_NUM_THREADS": "1"}
    outputs = []
    for lang, body in blocks(README.read_text()):
        body = body.replace(DATA_ROOT, str(data))
        if lang == "bash":
            script = "set -euo pipefail\n" + "\n".join(runnable(c) for c in commands(body)) + "\n"
            argv = ["bash", "-c", script]
        elif lang == "python":
            argv = [sys.executable, "-c", body]
        else:
            continue
        result = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"README block failed:\n{body}\n--- stdout\n{result.stdout[-4000:]}\n" \
                                       f"--- stderr\n{result.stderr[-4000:]}"
        outputs.append((lang, body, result.stdout))
    return {"data": data, "work": work, "truth": truth, "outputs": outputs}


def test_readme_prepares_imagenet_with_the_right_validation_labels(readme_run: dict) -> None:
    data, truth = readme_run["data"], readme_run["truth"]
    assert sorted(p.name for p in (data / "train").iterdir()) == list(WNIDS)  # the inner tars are gone
    assert all(len(list((data / "train" / w).glob("*.JPEG"))) == TRAIN_PER_CLASS for w in WNIDS)
    labels = dict(line.split(",") for line in (data / "val_labels.csv").read_text().splitlines())
    assert labels == truth
    train, val = Store(data / "train.lmdb"), Store(data / "val.lmdb")
    assert train.classes == val.classes == list(WNIDS)
    assert len(train) == len(WNIDS) * TRAIN_PER_CLASS and len(val) == len(truth)
    # Every validation record carries the class of the file it came from.
    sources = val.meta.column("source").to_pylist()
    assert [val.classes[label] for label in val.labels] == [truth[s] for s in sources]


def test_readme_convert_options_and_python_example_work(readme_run: dict) -> None:
    data = readme_run["data"]
    small, orig = Store(data / "train-512.lmdb"), Store(data / "val-orig.lmdb")
    assert small.options["max_size"] == 512 and orig.options["payload"] == "keep"
    (python,) = [out for lang, _, out in readme_run["outputs"] if lang == "python"]
    assert python.split()[:2] == [str(len(readme_run["truth"])), WNIDS[0]]  # record 0 is of the first class


def test_readme_training_resume_eval_and_bench_ran(readme_run: dict) -> None:
    run = readme_run["work"] / "runs" / "resnet50"
    assert {"config.yaml", "metrics.jsonl", "last.pt", "best.pt"} <= {p.name for p in run.iterdir()}
    printed = "\n".join(out for _, _, out in readme_run["outputs"])
    assert printed.count("Evaluating runs/resnet50/best.pt") == 2
    assert "verdict (" in printed and (readme_run["work"] / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"^\d+\.\d+\.\d+\S*$", printed, re.M)  # the PIL version line
