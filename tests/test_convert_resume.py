"""Crash safety: ``convert`` killed with SIGKILL mid-way, then ``--resume``d, gives exactly the
store an uninterrupted run gives; nothing looks complete before it is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from conftest import encode
from effitrain.store.format import StoreError
from effitrain.store.prepare import ConvertOptions
from effitrain.store.reader import Store
from effitrain.store.writer import PROGRESS_KEY, convert, partial_path


def all_items(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return dict(txn.cursor())
    finally:
        env.close()


def committed(partial: Path) -> int:
    """Records committed so far in a partial store (0 while it does not exist yet)."""
    if not (partial / "data.mdb").exists():
        return 0
    try:
        env = lmdb.open(str(partial), readonly=True)  # with the reader lock: the writer is live
    except lmdb.Error:
        return 0
    try:
        with env.begin() as txn:
            raw = txn.get(PROGRESS_KEY)
        return json.loads(raw)["written"] if raw else 0
    finally:
        env.close()


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images that a conversion committing every few records runs for a while."""
    root = tmp_path_factory.mktemp("many") / "src"
    for i in range(240):
        path = root / f"c{i % 3}" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode("jpeg", seed=i, size=(160, 120)))
    (root / "c1" / "0004.jpg").write_bytes(b"not an image")  # a skipped file must survive the kill too
    return root


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigkill_then_resume_equals_uninterrupted(many_images: Path, tmp_path: Path, workers: str) -> None:
    out = tmp_path / "killed.lmdb"
    partial = partial_path(out)
    cmd = [sys.executable, "-m", "effitrain", "convert", str(many_images), str(out), "--keep-bytes",
           "--verify-decode", "--workers", workers, "--commit-mb", "0.1", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while committed(partial) < 20:  # kill once some batches are committed, long before the end
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    workers_before = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and partial.exists()
    done = committed(partial)
    assert 20 <= done < 239, done
    with pytest.raises(StoreError, match="not finished"):
        Store(out)
    deadline = time.monotonic() + 10  # worker processes die with the writer (no orphans)
    while any(alive(p) for p in workers_before):
        assert time.monotonic() < deadline, [p for p in workers_before if alive(p)]
        time.sleep(0.05)

    rerun = subprocess.run(cmd, capture_output=True, text=True)  # without --resume: refused, clearly
    assert rerun.returncode != 0 and "--resume" in rerun.stderr and len(rerun.stderr.strip().splitlines()) == 1
    resumed = subprocess.run(cmd + ["--resume", "--json"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["images"] == 239 and summary["resumed_from"] > 0
    assert [s["source"] for s in summary["skipped"]] == ["c1/0004.jpg"]

    reference = tmp_path / "reference.lmdb"
    convert(many_images, reference, options=ConvertOptions(payload="keep", verify_decode=True), workers=0,
            progress=False)
    assert not partial.exists()
    got, want = all_items(out), all_items(reference)
    assert sorted(got) == sorted(want)
    assert all(got[k] == want[k] for k in want)  # every record, __meta__, __len__ and __keys__
    assert [s["source"] for s in Store(out).skipped] == ["c1/0004.jpg"]


def test_full_disk_stops_clearly_then_resume_equals_uninterrupted(many_images: Path, tmp_path: Path) -> None:
    """A write that fails mid-way (here the file-size limit, which fails writes as a full
    disk does) stops convert with a one-line error; nothing looks complete, and once
    there is room --resume finishes the same store an uninterrupted run makes."""
    import resource

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 << 10, 512 << 10))

    out = tmp_path / "s.lmdb"
    cmd = [sys.executable, "-m", "effitrain", "convert", str(many_images), str(out), "--keep-bytes", "-q",
           "--commit-mb", "0.1"]
    full = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=small_disk)
    lines = [line for line in full.stderr.splitlines() if not line.startswith("warning: skipped")]
    assert full.returncode != 0 and len(lines) == 1, full.stderr  # one line, no traceback
    assert "writing failed" in lines[0] and "--resume" in lines[0] and str(partial_path(out)) in lines[0]
    assert not out.exists() and 0 < committed(partial_path(out)) < 239
    resumed = subprocess.run(cmd + ["--resume", "--json"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from"] > 0
    reference = tmp_path / "reference.lmdb"
    convert(many_images, reference, options=ConvertOptions(payload="keep"), workers=0, progress=False)
    got, want = all_items(out), all_items(reference)
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)


def test_resume_without_partial_starts_fresh(many_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.lmdb"
    summary = convert(many_images, out, options=ConvertOptions(payload="keep"), resume=True, workers=0, progress=False)
    assert summary.images == 239 and summary.resumed_from == 0
    assert len(Store(out)) == 239


def test_second_writer_on_the_same_partial_is_refused(many_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.lmdb"
    cmd = [sys.executable, "-m", "effitrain", "convert", str(many_images), str(out), "--keep-bytes",
           "--verify-decode", "--workers", "0", "--commit-mb", "0.1", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while committed(partial_path(out)) < 1:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        from effitrain.store.writer import ConvertError

        with pytest.raises(ConvertError, match="another convert"):
            convert(many_images, out, options=ConvertOptions(payload="keep", verify_decode=True), resume=True,
                    workers=0, progress=False)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
