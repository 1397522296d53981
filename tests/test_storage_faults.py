"""A full disk and a read-only output directory, for real: small tmpfs mounts (root only; skipped elsewhere).

Expected: one `error:` line naming what happened and where, no temporary files left behind, the previous
outputs intact, and a read-only directory refused before any compute."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import tiny_run_args

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs (a full or read-only file system)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=600)


def leftovers(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*.tmp"))


def write_formatted(path: Path, lines: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = '{"context": "name : The Golden Lion | Type : pub", "completion": "The Golden Lion is a pub in the city centre ."}\n'
    path.write_text(text * lines)
    return path


def test_encode_on_a_full_disk_says_so_in_one_line_and_keeps_the_old_output(tmp_path):
    source = write_formatted(tmp_path / "formatted" / "train.jsonl", 3000)
    with tmpfs(tmp_path / "small", "64k") as out:
        (out / "train.jsonl").write_text("old\n")
        done = run("steps.encode", "--input", str(source), "--output", str(out / "train.jsonl"))
        assert done.returncode == 4, done.stderr
        assert done.stderr.startswith("error: no space left on device while writing") and done.stderr.count("\n") == 1
        assert (out / "train.jsonl").read_text() == "old\n"
        assert leftovers(out) == [] and [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_training_on_a_full_disk_says_so_in_one_line_and_leaves_no_temp_files(tmp_path):
    with tmpfs(tmp_path / "small", "24k") as out:
        done = run("steps.train", *tiny_run_args(tmp_path / "data", out / "run", max_step=6, save_interval=1))
        assert done.returncode == 4, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith("error: no space left on device")
        assert "Traceback" not in done.stderr
        assert leftovers(out) == []


@pytest.mark.parametrize("stage", ["encode", "train", "decode", "evaluate"])
def test_a_read_only_output_directory_is_refused_before_any_compute(tmp_path, stage):
    with tmpfs(tmp_path / "ro", "64k", read_only=True) as out:
        if stage == "encode":
            argv = ["steps.encode", "--input", str(write_formatted(tmp_path / "f" / "train.jsonl", 10)), "--output", str(out / "x.jsonl")]
        elif stage == "train":
            argv = ["steps.train", *tiny_run_args(tmp_path / "data", out / "run")]
        elif stage == "evaluate":
            argv = ["steps.evaluate", str(tmp_path / "refs.txt"), str(tmp_path / "preds.txt"), "--json", str(out / "eval.json")]
        else:
            argv = ["steps.decode", "--data", str(tmp_path / "none.jsonl"), "--adapter", str(tmp_path / "none"), "--work_dir", str(out)]
        done = run(*argv)
        assert done.returncode == 2, done.stderr
        assert "cannot write outputs here (read-only file system)" in done.stderr and done.stderr.count("\n") == 1
