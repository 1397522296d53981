"""Process management every stage that writes a work dir needs: one writer per work dir (an OS lock, shared with the
processes a launcher starts), and ending with the launcher (parent-death signals, ancestry, descendants)."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from steps.core.common import FILE_MODE, InputError, require_writable
from steps.formats.work_dir import WorkDir

# ----------------------------------------------------------------------------------------------- one writer per work dir

WORK_DIR_LOCK_FD = "NLG_WORK_DIR_LOCK_FD"  # set by a launcher that already holds the lock and passed its descriptor on


def lock_path(work_dir: str | os.PathLike) -> Path:
    """`<parent>/.<name>.lock`: beside the work dir, not in it (the work dir is a DVC output; a PID would change its hash)."""
    return WorkDir(work_dir).lock


def lock_work_dir(work_dir: str | os.PathLike) -> int:
    """Take the work dir's exclusive lock for this process (and the children it passes the descriptor to).

    An OS lock (flock): the kernel releases it when the last process holding the descriptor ends, however it
    ends, so a stale lock never blocks. A second run on a locked work dir fails at once, naming the holder.
    """
    import fcntl

    path = lock_path(work_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # never through a symlink: the PID would overwrite whatever file it points to
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise InputError("the work dir's lock file is a symbolic link; remove it (a training writes its PID there)", path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InputError(f"another training (PID {holder}) is writing to this work dir; wait for it to finish or stop it "
                         "(a crashed one releases it by itself)", work_dir) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


_HELD_LOCKS: dict[str, int] = {}  # lock file -> descriptor, for the locks a `with work_dir_lock(...)` holds in this process


@contextlib.contextmanager
def work_dir_lock(work_dir: str | os.PathLike) -> Iterator[int]:
    """Hold the work dir's lock for the block (a launcher: the finetune flow). The processes it starts share it:
    `held_lock(work_dir)` gives the descriptor to pass on, so nobody threads it through their calls."""
    key = os.path.abspath(lock_path(work_dir))
    fd = lock_work_dir(work_dir)
    _HELD_LOCKS[key] = fd
    try:
        yield fd
    finally:
        del _HELD_LOCKS[key]
        os.close(fd)


def held_lock(work_dir: str | os.PathLike) -> int | None:
    """The descriptor of this work dir's lock when this process holds it in a `with work_dir_lock(...)` block."""
    return _HELD_LOCKS.get(os.path.abspath(lock_path(work_dir)))


# Set instead by a launcher that started this process through torchrun, which passes no descriptors on: its PID.
WORK_DIR_LOCK_HOLDER = "NLG_WORK_DIR_LOCK_HOLDER"


def holds_inherited_lock(work_dir: str | os.PathLike | None = None) -> bool:
    """True when a launcher (the finetune flow) holds the lock and passed its descriptor to this process, or (through
    torchrun) named itself: then it must be an ancestor of this process and the PID the lock file records."""
    fd = os.environ.get(WORK_DIR_LOCK_FD)
    if fd and fd.isdigit():
        try:
            os.fstat(int(fd))
            return True
        except OSError:
            pass
    holder = os.environ.get(WORK_DIR_LOCK_HOLDER, "")
    if not holder.isdigit() or work_dir is None or int(holder) not in ancestors():
        return False
    try:
        return lock_path(work_dir).read_text().strip() == holder
    except OSError:
        return False


def ancestors(pid: int | None = None) -> set[int]:
    """The PIDs of this process's parent, its parent, ... (Linux /proc; empty elsewhere)."""
    found: set[int] = set()
    pid = os.getppid() if pid is None else pid
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return found


PARENT_PID_ENV = "NLG_PARENT_PID"  # set by a launcher whose death must end this process


def _parents() -> dict[int, int]:
    """PID -> parent PID of every process (Linux /proc; empty elsewhere)."""
    table: dict[int, int] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if entry.isdigit():
            try:
                table[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return table


def descendants(pid: int) -> list[int]:
    """`pid`'s children, their children, ... (parents before their children; Linux /proc, empty elsewhere)."""
    kids: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        kids.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = [pid]
    while todo:
        for kid in kids.get(todo.pop(0), []):
            if kid not in found and kid != pid:
                found.append(kid)
                todo.append(kid)
    return found


def arm_parent_death_signal(parent: int, signum: int | None = None) -> bool:
    """Ask Linux to send this process `signum` (SIGTERM) when its parent ends; False when `parent` is already gone
    (the caller exits then). Linux only (True elsewhere, nothing armed). The signal comes when the parent *thread*
    that started this process ends: launchers start their children from a thread that outlives them."""
    if not sys.platform.startswith("linux"):
        return True
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM if signum is None else signum)  # 1 = PR_SET_PDEATHSIG
    return os.getppid() == parent  # checked after arming: a parent that died before is not missed


def disarm_parent_death_signal() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 0)


def die_with_parent() -> None:
    """When a launcher named itself in NLG_PARENT_PID: SIGTERM this process when the launcher ends (Linux), and
    exit now if it already has. Armed here, in the child, because a preexec hook is unsafe in a threaded flow."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not parent.isdigit():
        return
    if not arm_parent_death_signal(int(parent)):  # it died before the signal was armed
        raise SystemExit(f"error: the launcher (PID {parent}) is gone; not training on")


def claim_outputs(work_dir: str | os.PathLike, *other_dirs: str | os.PathLike | None) -> None:
    """What a run that writes `work_dir` does first: fail now if any output directory cannot be written (not after
    hours of compute), and take the work dir's lock unless the launcher holds it and passed it on."""
    for directory in (work_dir, *other_dirs):
        if directory:
            require_writable(directory)
    if not holds_inherited_lock(work_dir):
        lock_work_dir(work_dir)  # held until this process ends; a second writer on this work dir stops here
