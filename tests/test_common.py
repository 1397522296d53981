"""The helpers every stage writes through: file permissions that follow the umask, and nothing left half-written."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from steps.core.common import atomic_write

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_permissions_of_the_umask(tmp_path, umask, expected):
    """mkstemp's 0600 used to reach data/formatted, outputs, adapters and metrics, which breaks shared use."""
    script = ("import os, sys, torch; os.umask(int(sys.argv[2], 8)); from steps.core.common import write_json; from steps.formats.checkpoints "
              "import save_resume_state, save_hf_checkpoint; from steps.model.gpt2 import GPT2, CARDS; "
              "write_json(sys.argv[1] + '/a.json', {}); save_resume_state(sys.argv[1] + '/s.pt', {}); "
              "save_hf_checkpoint(GPT2(CARDS['gpt2.tiny']), sys.argv[1] + '/m.safetensors')")  # safetensors replaces the file
    subprocess.run([sys.executable, "-c", script, str(tmp_path), oct(umask)[2:]], cwd=REPO, check=True)
    for name in ("a.json", "s.pt", "m.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_file_digest_is_the_real_digest_and_sees_every_rewrite(tmp_path):
    import hashlib

    from steps.core.common import file_digest, sha256_file

    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert file_digest(path, "md5") == hashlib.md5(b"a" * 1000).hexdigest()
    with open(path, "r+b") as f:  # in place: same inode, same size, within the same timestamp tick
        f.write(b"b")
    assert sha256_file(path) == hashlib.sha256(b"b" + b"a" * 999).hexdigest()
    old = time.time() - 60  # an old file is remembered, until its size or time changes
    os.utime(path, (old, old))
    first = sha256_file(path)
    with open(path, "ab") as f:
        f.write(b"c")
    assert sha256_file(path) != first
