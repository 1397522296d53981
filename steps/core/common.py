"""Small helpers every stage shares: clear input errors, atomic writes, JSONL reading.

Kept free of torch so the data stages import fast.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

# The original's --seq_len: the trainer's default example length (longer ones lose context tokens there).
DEFAULT_SEQ_LEN = 512


class InputError(ValueError):
    """A problem with something the user gave us (a file, a flag, a checkpoint).

    The message always says where (file and line when there is one), what was
    expected, and what to do, so a stage can print it and exit with status 2
    instead of a traceback.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = str(path) if path is not None else None
        self.line = line


def _umask() -> int:
    """The process umask (reading it means setting it; done once, at import, before any thread starts)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Files we write get the permissions a plain open() would give them (typically 0644), not mkstemp's 0600.
FILE_MODE = 0o666 & ~_umask()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file in `path` durable: a crash right after it cannot resurrect the old entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(directory: Path, below: int = 1 << 20) -> bool:
    """Less than `below` bytes left for us on the file system of `directory`."""
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < below


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name next to `path`; on success it is fsynced, renamed into place and the directory fsynced.

    The one way this project writes a file: a crash, a full disk or an exception leaves either the old
    file or the new one, never half of one that a later stage (or DVC, or a resume) could take for valid.
    Use it directly for writers that want a file name (safetensors, matplotlib, torch.save).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
        yield tmp
        os.chmod(tmp, FILE_MODE)  # again: a writer that replaces the file (safetensors does) leaves it 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        full = isinstance(exc, Exception) and not isinstance(exc, OSError) and disk_full(path.parent)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if full:  # torch.save and safetensors report a full disk as their own errors, without errno
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a failed write() names no file; the error message should
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """`with atomic_write(path) as f: f.write(...)`: an open file with atomic_path's guarantees."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
        yield f


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, object) for each non-blank line, with errors that name file and line."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found; check the path (did the previous stage run?)", path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"invalid UTF-8 ({exc.reason} at byte {exc.start}); re-save the file as UTF-8", path, number) from None
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(f"malformed JSON ({exc.msg} at column {exc.colno}); expected one JSON object per line", path, number) from None


_DIGESTS: dict[tuple, str] = {}  # (path, device, inode, size, mtime, algorithm) -> hex digest


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (md5 is what DVC 3 records). Remembered for the life of the process while the
    file's inode, size and modification time stay the same, so a base checkpoint is read once, not at every check.
    A file modified in the last two seconds is always read: timestamps are coarse, and a rewrite of the same size
    within one tick would look unchanged (git's "racy clean" case)."""
    import hashlib
    import time

    info = os.stat(path)
    key = (os.path.abspath(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, algorithm)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    if time.time_ns() - info.st_mtime_ns > 2_000_000_000:
        _DIGESTS[key] = digest.hexdigest()
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write pretty, key-stable JSON atomically (stable bytes keep DVC hashes stable)."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, ensure_ascii=False)
        f.write("\n")


class TrainingDiverged(FloatingPointError):
    """The loss became nan/inf: rerunning with the same settings gives the same result (exit status 3)."""


# Exit statuses every entry point shares; the finetune flow never retries 2 or 3 (the same input fails again).
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


# Errors of the machine rather than of the input: a full disk, a read-only or forbidden directory.
STORAGE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EFBIG: "file too large"}
EXIT_STORAGE = 4
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT


def storage_message(exc: OSError) -> str:
    where = f" while writing {exc.filename}" if exc.filename else ""
    return f"{STORAGE_ERRORS[exc.errno]}{where}; free space or fix the permissions, then rerun (nothing half-written was kept)"


def run_stage(body: Callable[[], object], on_failure: Callable[[Exception, int], None] | None = None) -> int:
    """Run a stage's body the way every entry point does: one `error: ...` line instead of a traceback and an
    exit status that says what kind of failure it was: 2 bad input, 3 a diverged loss, 4 full or read-only
    storage. Anything else is a bug and keeps its traceback.

    `on_failure(exc, status)` runs first (the trainer records the failure for the finetune flow).
    """
    try:
        body()
    except (InputError, TrainingDiverged) as exc:
        status = EXIT_BAD_INPUT if isinstance(exc, InputError) else EXIT_DIVERGED
        message = str(exc)
    except OSError as exc:
        if exc.errno not in STORAGE_ERRORS:
            raise
        status, message = EXIT_STORAGE, storage_message(exc)
    except KeyboardInterrupt:  # Ctrl-C: every file written so far is whole (atomic writes); no traceback
        status, message = EXIT_INTERRUPTED, "interrupted; what was written is complete, and a rerun of a training resumes from its last checkpoint"
    else:
        return 0
    if on_failure is not None:
        on_failure(ValueError(message), status)
    print(f"error: {message}", file=sys.stderr)
    return status


def require_writable(directory: str | os.PathLike) -> None:
    """Fail before any compute when a stage could not write its outputs (a read-only mount, a missing permission)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        reason = STORAGE_ERRORS.get(exc.errno, exc.strerror)
        raise InputError(f"cannot write outputs here ({reason}); choose another output directory or fix its permissions",
                         directory) from None
