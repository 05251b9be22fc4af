"""``effitrain demo``: the whole product at work on this machine, in a few minutes.

Nothing can be downloaded, so the demo draws its own data (``effitrain.synth``: 10 classes
of coloured shapes on varied backgrounds, real JPEG files of 300-500 px), then runs the
real commands on it, each printed before it runs so it can be typed again:

  1. data      ``images/train`` and ``images/val``: ImageFolder trees of JPEG files
  2. convert   both into stores, with the progress bar and the summary
  3. inspect   what the training store holds; ``--verify`` reads back every record
  4. train     ``configs/tiny_cpu.yaml`` (a ResNet-18 at 64 px): the per-iteration log,
               validation Error@1 falling far below chance (90%), TensorBoard logs
  5. bench     a short bench of the training store: the table, the verdict and the plot

and ends with where the run directory, the TensorBoard logs and the plot are. The commands
run as child processes (``python -m effitrain ...``), so what the demo shows is exactly
what a user gets from the same command. ``small=True`` shrinks every step (tests).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .progress import format_duration
from .synth import make_imagefolder

MARKER = ".effitrain-demo"  # marks a directory the demo made, so a rerun may replace it
PARTS = ("images", "stores", "runs", "bench")  # what the demo writes under --out
NUM_CLASSES = 10
CHANCE = 100.0 * (1 - 1 / NUM_CLASSES)  # Error@1 of guessing


class DemoError(RuntimeError):
    """The demo cannot run or a step failed; the message is one line."""


@dataclass(frozen=True)
class DemoSize:
    """How much the demo draws, trains and benches."""

    train_per_class: int
    val_per_class: int
    min_px: int  # long side of the drawn images
    max_px: int
    settings: tuple[str, ...]  # --set overrides of configs/tiny_cpu.yaml, for train and bench
    epochs: int | None  # train.epochs, if not the config's
    bench_seconds: float
    bench_workers: str


# About 1.5 minutes on 2 idle CPU cores (make demo: 1:34; 2:22 at load average 3): 1,200 images
# drawn at ImageNet-like sizes; the tiny config as it ships (4 epochs of 1,000 images at 64 px).
FULL = DemoSize(100, 20, 300, 500, (), epochs=None, bench_seconds=1.0, bench_workers="1,2")
# Under a minute: small images at 32 px, the settings test_train.py proves learnable.
SMALL = DemoSize(40, 10, 48, 96, ("data.image_size=32", "data.val_resize=37", "train.batch_size=32"), epochs=5,
                 bench_seconds=0.3, bench_workers="1")


@dataclass(frozen=True)
class DemoPaths:
    """Where each part of the demo lands under ``out``."""

    out: Path

    @property
    def images(self) -> Path:
        return self.out / "images"

    def store(self, split: str) -> Path:
        return self.out / "stores" / f"{split}.lmdb"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def run_dir(self) -> Path:
        return self.runs / "tiny_cpu"

    @property
    def bench_json(self) -> Path:
        return self.out / "bench" / "bench.json"

    @property
    def bench_plot(self) -> Path:
        return self.out / "bench" / "bench.png"


def tiny_config() -> Path:
    """``configs/tiny_cpu.yaml`` of the source tree this package runs from."""
    path = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"
    if not path.is_file():
        raise DemoError(f"{path}: not found; the demo runs from a source checkout of effitrain "
                        "(git clone, then make demo)")
    return path


def prepare_out(out: Path) -> DemoPaths:
    """Make ``out`` ready: new, empty, or a previous demo's (whose parts are removed).

    Anything else is refused, so a mistyped ``--out`` never deletes a user's files."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise DemoError(f"{out}: not empty and not made by effitrain demo; choose another --out")
        for part in PARTS:
            shutil.rmtree(out / part, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by effitrain demo; rerunning the demo replaces "
                              + ", ".join(f"{p}/" for p in PARTS) + "\n")
    return DemoPaths(out)


def make_data(paths: DemoPaths, size: DemoSize, seed: int) -> dict[str, Path]:
    """Draw the train and val ImageFolder trees (the same bytes for the same seed)."""
    return make_imagefolder(paths.images, num_classes=NUM_CLASSES, train_per_class=size.train_per_class,
                            val_per_class=size.val_per_class, min_size=size.min_px, max_size=size.max_px, seed=seed)


def _shown(path: Path) -> str:
    """``path`` as a user would type it here: relative to the working directory if inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def effitrain(*args: str | Path) -> None:
    """Print ``effitrain ARGS`` and run it (this interpreter, ``-m effitrain``); its
    output goes straight to the terminal. Raises DemoError if it fails."""
    words = [_shown(a) if isinstance(a, Path) else a for a in args]
    print(f"$ {shlex.join(['effitrain', *words])}", flush=True)
    status = subprocess.call([sys.executable, "-m", "effitrain", *words])
    if status != 0:
        raise DemoError(f"'effitrain {words[0]}' failed with exit status {status} (its output is above)")


def _sets(*settings: str) -> list[str]:
    """``--set`` options for ``settings`` (``key=value`` each)."""
    return [word for setting in settings for word in ("--set", setting)]


def validation_errors(run_dir: Path) -> list[float]:
    """Validation Error@1 (percent) after each epoch, from the run's ``metrics.jsonl``."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["error1"] for r in map(json.loads, lines) if r["kind"] == "val"]


def _tool(name: str) -> str:
    """The program ``name`` of this Python environment, as a user would type it here."""
    path = Path(sys.executable).parent / name
    return _shown(path) if path.exists() else name


def tensorboard_command(runs: Path) -> str:
    """The command that opens TensorBoard on ``runs``, with this environment's tensorboard."""
    return shlex.join([_tool("tensorboard"), "--logdir", _shown(runs)])


class _Steps:
    """Numbered step headers with the time each step took."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.start = self._t = time.perf_counter()

    def begin(self, title: str) -> None:
        self.done += 1
        self._t = time.perf_counter()
        print(f"\n== [{self.done}/{self.total}] {title}", flush=True)

    def end(self, note: str = "") -> None:
        print(f"   ({note + '; ' if note else ''}{format_duration(time.perf_counter() - self._t)})", flush=True)


def run_demo(out: Path, small: bool = False, seed: int = 0) -> DemoPaths:
    """Run the whole demo into ``out``; return where its parts are. Raises DemoError."""
    size = SMALL if small else FULL
    config = tiny_config()
    paths = prepare_out(out)
    steps = _Steps(5)
    print(f"effitrain demo ({'small' if small else 'full'} size): data, convert, inspect, train and bench in "
          f"{_shown(out)}/\nEach '$ effitrain ...' line is a command you can type yourself "
          f"(after: source {_tool('activate')})", flush=True)

    steps.begin(f"data: drawing {NUM_CLASSES} classes of shapes as JPEG files, {size.min_px}-{size.max_px} px")
    print(f"   effitrain.synth.make_imagefolder({_shown(paths.images)!r}, train_per_class={size.train_per_class}, "
          f"val_per_class={size.val_per_class}, seed={seed})", flush=True)
    folders = make_data(paths, size, seed)
    n_train, n_val = NUM_CLASSES * size.train_per_class, NUM_CLASSES * size.val_per_class
    steps.end(f"{n_train:,} train + {n_val:,} val images in {_shown(paths.images)}")

    steps.begin("convert: pack each folder into one LMDB store")
    for split in ("train", "val"):
        effitrain("convert", folders[split], paths.store(split))
    steps.end()

    steps.begin("inspect: what the training store holds; --verify reads back every record")
    effitrain("inspect", paths.store("train"), "--verify")
    steps.end()

    steps.begin(f"train: {_shown(config)} from the stores (validation Error@1 by chance: {CHANCE:.0f}%)")
    data = [f"data.train={_shown(paths.store('train'))}", f"data.val={_shown(paths.store('val'))}"]
    epochs = [f"train.epochs={size.epochs}"] if size.epochs else []
    effitrain("train", "--config", config, *_sets(*data, *size.settings, *epochs, f"log.run_dir={_shown(paths.run_dir)}"))
    errors = validation_errors(paths.run_dir)
    steps.end("validation Error@1 by epoch: " + " -> ".join(f"{e:.1f}" for e in errors) + f" (chance {CHANCE:.0f})")

    steps.begin("bench: where would training time go? storage, decode, loader, model step")
    paths.bench_plot.parent.mkdir(parents=True, exist_ok=True)
    effitrain("bench", paths.store("train"), "--config", config, *_sets(*size.settings), "--seconds", f"{size.bench_seconds:g}",
              "--workers", size.bench_workers, "--json", paths.bench_json, "--plot", paths.bench_plot)
    steps.end()

    total = format_duration(time.perf_counter() - steps.start)
    best = f"{_shown(paths.run_dir / 'best.pt')}"
    print(f"\nDone in {total}. Everything is in {_shown(out)}/:\n"
          f"  images         {_shown(paths.images)}/{{train,val}}\n"
          f"  stores         {_shown(paths.store('train'))}, {_shown(paths.store('val'))}\n"
          f"  run directory  {_shown(paths.run_dir)}  (config.yaml, metrics.jsonl, last.pt, best.pt)\n"
          f"  TensorBoard    {_shown(paths.run_dir)}  (event files; loss, Error@1/@5, img/s, lr)\n"
          f"  bench plot     {_shown(paths.bench_plot)}  (figures as JSON: {_shown(paths.bench_json)})\n"
          f"Open TensorBoard:  {tensorboard_command(paths.runs)}   (then http://localhost:6006)\n"
          f"Evaluate the best checkpoint:  effitrain train --eval-only --resume {best}\n"
          f"Next: README.md shows the same steps on ImageNet.", flush=True)
    return paths

