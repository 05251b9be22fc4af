"""The ``effitrain`` command line: a thin layer over the package.

Each command is one small function; errors a user can cause (bad paths, bad stores, bad
images with ``--on-error fail``) end as one ``Error: ...`` line and exit status 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import lmdb

from effitrain import __version__
from effitrain.store.format import StoreError
from effitrain.store.scan import SourceError
from effitrain.store.writer import ConvertError

# Exceptions whose message is the whole story for the user: no traceback. Commands that
# define their own user-facing errors add them here.
USER_ERRORS: tuple[type[Exception], ...] = (StoreError, SourceError, ConvertError, OSError, lmdb.Error)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="effitrain")
def cli() -> None:
    """effitrain: fast, dependable ImageNet training with PyTorch.

    \b
    effitrain convert SRC OUT      pack an ImageFolder into one LMDB store
    effitrain inspect STORE        what a store holds; --verify checks every record
    effitrain train --config X     train a classifier (configs/*.yaml)
    effitrain bench DATA           find the bottleneck: storage, decode, loader, model step
    effitrain demo [--out DIR]     all of the above on drawn data, in a few minutes
    """


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--labels", type=click.Path(path_type=Path), help="Label file 'filename,class_name' per line: SRC is a flat folder of images.")
@click.option("--keep-bytes", is_flag=True, help="Store every file's bytes unchanged (no random-access JPEG transcode).")
@click.option("--max-size", type=click.IntRange(min=1), metavar="PX", help="Downscale (Lanczos) and re-encode as JPEG images whose longer side exceeds PX.")
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality of re-encoded images.")
@click.option("--workers", type=click.IntRange(min=0), help="Worker processes preparing images [default: 0 (a reader thread) for --keep-bytes alone, else CPU count].")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True, help="Bad image: skip it (warned, listed in the metadata) or stop.")
@click.option("--verify-decode", is_flag=True, help="Fully decode every image, not just the cheap structural check.")
@click.option("--resume", is_flag=True, help="Continue OUT.partial left by an interrupted run of the same command.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT (once the new store is complete).")
@click.option("--commit-mb", type=click.FloatRange(min=0, min_open=True), default=1, show_default=True, help="Megabytes per LMDB transaction: the unit of crash recovery.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress line.")
def convert(src: Path, out: Path, labels: Path | None, keep_bytes: bool, max_size: int | None, quality: int,
            workers: int | None, on_error: str, verify_decode: bool, resume: bool, overwrite: bool,
            commit_mb: float, as_json: bool, quiet: bool) -> None:
    """Pack the ImageFolder tree SRC (or a flat folder with --labels) into the store OUT.

    Classes, labels and sample order are exactly torchvision's ImageFolder(SRC). The store
    is built in OUT.partial and renamed to OUT when complete; after a crash or kill, run
    the same command with --resume.
    """
    from effitrain.store.prepare import ConvertOptions, default_payload
    from effitrain.store.writer import convert as run_convert

    options = ConvertOptions(
        payload="keep" if keep_bytes else default_payload(), max_size=max_size, quality=quality,
        verify_decode=verify_decode,
    )
    summary = run_convert(
        src, out, labels=labels, options=options, workers=workers, on_error=on_error, resume=resume,
        overwrite=overwrite, commit_bytes=int(commit_mb * 2**20), progress=not quiet,
    )
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        for line in summary.lines():
            click.echo(line)


@cli.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Check every record's CRC32 and that it decodes; exit 1 if any is bad.")
@click.option("--workers", type=click.IntRange(min=0), help="Processes for --verify [default: CPU count].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (and problems) as JSON on stdout.")
def inspect(store: Path, verify: bool, workers: int | None, as_json: bool) -> None:
    """Show what STORE holds: format, counts, classes, sizes, skipped files."""
    from effitrain.progress import Progress
    from effitrain.store import inspect as inspection
    from effitrain.store.reader import Store
    from effitrain.cpus import usable_cpus

    opened = Store(store)
    info = inspection.summarize(opened)
    if not as_json:
        for line in inspection.summary_lines(info):
            click.echo(line)
    if verify:
        bar = Progress("verify", total=len(opened), enabled=not as_json)
        bad = inspection.verify(
            opened, workers=usable_cpus() if workers is None else workers,
            on_bad=lambda line: bar.write(f"bad {line}"), on_progress=bar.update,
        )
        bar.close()
        info["problems"] = bad
    if as_json:
        click.echo(json.dumps(info, indent=2))
    elif verify:
        click.echo(f"verify     {len(opened) - len(bad):,} of {len(opened):,} records good, {len(bad):,} bad")
    if verify and bad:
        raise click.ClickException(f"{store}: {len(bad)} bad record(s), first: {bad[0]}")


@cli.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config, e.g. configs/resnet50_imagenet.yaml.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. --set optim.lr=0.2 (repeatable).")
@click.option("--resume", metavar="auto|PATH", help="Continue the run from its last.pt (auto) or from PATH; without --config, PATH's config is used.")
@click.option("--eval-only", is_flag=True, help="Evaluate the --resume checkpoint on data.val, then exit.")
def train(config_path: str | None, overrides: tuple[str, ...], resume: str | None, eval_only: bool) -> None:
    """Train a torchvision classifier on a store (or ImageFolder) as the config says.

    Several GPUs or nodes: torchrun --nproc_per_node=N --no-python effitrain train ...
    """
    from effitrain.train.checkpoint import CheckpointError
    from effitrain.train.config import ConfigError
    from effitrain.train.loop import main as run_training
    from effitrain.train.loop import resolve_config

    try:
        status = run_training(resolve_config(config_path, overrides, resume), resume=resume, eval_only=eval_only)
    except (ConfigError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None
    raise SystemExit(status)


@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Training config to bench with [default: the built-in ResNet-50 recipe].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. --set train.amp=bf16 (repeatable).")
@click.option("--workers", metavar="N,N,...", help="Loader worker counts to measure [default: 1, 2, 4, ... up to the CPU count].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Batch size [default: the config's train.batch_size].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Where the model runs [default: CUDA if available].")
@click.option("--seconds", type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True, help="Measured time per figure (warm-up not counted).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the figures as JSON (fields: effitrain/bench/__init__.py).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Also draw a bar chart PNG (needs matplotlib: pip install 'effitrain[plot]').")
@click.option("-q", "--quiet", is_flag=True, help="No progress line.")
def bench(data: Path, config_path: str | None, overrides: tuple[str, ...], workers: str | None, batch_size: int | None,
          device: str | None, seconds: float, json_path: Path | None, plot_path: Path | None, quiet: bool) -> None:
    """Find the bottleneck: storage, decode, loader, model step and end-to-end img/s of
    training from DATA (a store or an ImageFolder directory), and a verdict."""
    from effitrain.bench import BenchError, bench_config, parse_workers, run_bench
    from effitrain.bench.report import plot, pyplot, table_lines, write_json
    from effitrain.cpus import usable_cpus
    from effitrain.train.config import ConfigError

    try:
        if plot_path is not None:
            pyplot()  # a missing matplotlib fails now, not after the measurements
        counts = parse_workers(workers, usable_cpus())
        cfg = bench_config(config_path, overrides, data, batch_size, device)
        result = run_bench(data, cfg, counts, seconds, progress=not quiet, config_path=config_path,
                           on_header=lambda lines: click.echo("\n".join(lines)))
        click.echo("\n".join(table_lines(result)))
        if json_path is not None:
            write_json(result, json_path)
        if plot_path is not None:
            plot(result, plot_path)
    except (BenchError, ConfigError) as e:
        raise click.ClickException(str(e)) from None


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True, help="Directory for the demo's images, stores, run and bench; a previous demo's is replaced.")
@click.option("--small", is_flag=True, help="The smallest size (about a minute; for tests): fewer, smaller images at 32 px.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the drawn images (same seed, same files).")
def demo(out: Path, small: bool, seed: int) -> None:
    """Draw a small learnable dataset (10 classes of JPEGs), then convert, inspect, train
    (configs/tiny_cpu.yaml) and bench on it: the whole product in a few minutes on a CPU."""
    from effitrain.demo import DemoError, run_demo

    try:
        run_demo(out, small=small, seed=seed)
    except DemoError as e:
        raise click.ClickException(str(e)) from None


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="effitrain")

