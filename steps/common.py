"""Small helpers every stage shares: clear input errors, atomic writes, JSONL reading.

Kept free of torch so the data stages import fast.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Write to a temporary file next to `path` and rename it into place on success.

    A crash or an exception leaves no half-written file that a later stage (or DVC)
    could mistake for valid output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        kwargs = {} if "b" in mode else {"encoding": encoding}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write pretty, key-stable JSON atomically (stable bytes keep DVC hashes stable)."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False, ensure_ascii=False)
        f.write("\n")


def run_stage(body: Callable[[], object]) -> int:
    """Run a stage's body the way every entry point does: an InputError becomes `error: ...` and exit status 2."""
    try:
        body()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
