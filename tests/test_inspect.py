"""inspect: the summary matches the store; --verify names every corrupt record."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import lmdb
from click.testing import CliRunner
from torchvision.datasets import ImageFolder

from effitrain.cli import cli
from effitrain.store import inspect as inspection
from effitrain.store.format import encode_record, record_key
from effitrain.store.reader import Store


def corrupt(path: Path, index: int, change) -> None:
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        key = record_key(index)
        txn.put(key, change(bytearray(txn.get(key))))
    env.close()


def flip_last_byte(value: bytearray) -> bytes:
    value[-1] ^= 0x10
    return bytes(value)


def test_summary_counts_match_imagefolder(image_store: Path, image_folder: Path) -> None:
    info = inspection.summarize(Store(image_store))
    ref = ImageFolder(str(image_folder))
    per_class = Counter(ref.targets)
    assert info["images"] == len(ref) and info["format_version"] == 1
    assert [(c["name"], c["images"]) for c in info["classes"]] == [(c, per_class[i]) for i, c in enumerate(ref.classes)]
    sizes = [ref.loader(p).size for p, _ in ref.samples]
    assert info["width"]["max"] == max(w for w, _ in sizes) and info["height"]["min"] == min(h for _, h in sizes)
    assert info["kinds"] == {"ENCODED": len(ref)} and info["skipped"] == []
    text = "\n".join(inspection.summary_lines(info))
    assert "ant" in text and f"{len(ref):,} in 3 classes" in text


def test_verify_passes_a_good_store(image_store: Path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(image_store), "--verify", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "0 bad" in result.output
    assert inspection.verify(Store(image_store), workers=2) == []


def test_verify_names_every_bad_record(image_store: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bad.lmdb"
    shutil.copytree(image_store, copy)
    corrupt(copy, 1, flip_last_byte)  # payload byte: CRC mismatch
    corrupt(copy, 4, lambda v: b"JUNK" + bytes(v[4:]))  # header destroyed
    # A record that is internally consistent (CRC fine) but does not decode as an image.
    corrupt(copy, 6, lambda v: encode_record(b"not an image", label=v[8], width=1, height=1))
    bad = inspection.verify(Store(copy), workers=0)
    assert [line.split(":")[0] for line in bad] == ["img-000000001", "img-000000004", "img-000000006"]
    assert "CRC32 mismatch" in bad[0] and "bad magic" in bad[1] and "does not decode" in bad[2]
    assert inspection.verify(Store(copy), workers=2) == bad

    result = CliRunner().invoke(cli, ["inspect", str(copy), "--verify", "--workers", "2"])
    assert result.exit_code == 1
    for key in ("img-000000001", "img-000000004", "img-000000006"):
        assert key in result.output
    assert "3 bad" in result.output


def test_inspect_json(image_store: Path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(image_store), "--json", "--verify", "--workers", "0"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["images"] == len(Store(image_store)) and info["problems"] == []
