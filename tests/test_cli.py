"""The command line: help, version, a convert round trip, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from effitrain import __version__
from effitrain.cli import cli
from effitrain.data import ImageFolderLMDB


def test_version_and_help() -> None:
    runner = CliRunner()
    assert __version__ in runner.invoke(cli, ["--version"]).output
    assert "convert" in runner.invoke(cli, ["--help"]).output
    for command, word in (("convert", "--keep-bytes"), ("inspect", "--verify")):
        result = runner.invoke(cli, [command, "--help"])
        assert result.exit_code == 0 and word in result.output


def test_convert_then_inspect(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.lmdb"
    result = CliRunner().invoke(cli, ["convert", str(image_folder), str(out), "--keep-bytes", "--workers", "2",
                                      "--json", "-q"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == len(ImageFolderLMDB(out)) and summary["classes"] == 3
    assert summary["bytes_in"] > 0 and summary["skipped"] == []
    text = CliRunner().invoke(cli, ["convert", str(image_folder), str(tmp_path / "t.lmdb"), "--keep-bytes", "-q"]).output
    assert "images/s" in text and "MB/s" in text and "3 classes" in text
    result = CliRunner().invoke(cli, ["inspect", str(out)])
    assert result.exit_code == 0 and "format     effitrain store version 1" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "{tmp}/missing", "{tmp}/o.lmdb"], "no such folder"),
        (["convert", "{tmp}", "{tmp}/o.lmdb", "--labels", "{tmp}/nolabels.csv"], "cannot read label file"),
        (["convert", "{tmp}/empty", "{tmp}/o.lmdb"], "Couldn't find any class folder"),
        (["convert", "{src}", "{store}"], "already exists"),
        (["inspect", "{tmp}/missing.lmdb"], "no such store"),
        (["inspect", "{src}"], "not an LMDB store"),
    ],
)
def test_errors_are_one_line(image_folder: Path, image_store: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path, src=image_folder, store=image_store) for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr


def test_real_command_error_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "effitrain", "convert", str(tmp_path / "missing"),
                             str(tmp_path / "o.lmdb")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip() == f"Error: {tmp_path / 'missing'}: no such folder"
