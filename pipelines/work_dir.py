"""The trainer's work dir between runs: a fresh run sets the previous run's outputs aside instead of deleting them,
and puts them back when the new run is refused or diverges, so a failed attempt never costs the last good adapter.

Only the trainer's own files move (TRAINER_OUTPUTS); anything else a user keeps in the work dir stays.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# Files the trainer writes in --work_dir (docs/architecture.md "Trainer outputs"): the only things moved or deleted.
TRAINER_OUTPUTS = ["adapter.safetensors", "adapter_config.json", "model.safetensors", "best", "checkpoints", "resume",
                   "train_log.csv", "valid_log.csv", "summary.json", "status.json"]


def previous_dir(work_dir: Path) -> Path:
    """`<parent>/.<name>.previous`: beside the work dir, so it is no part of the DVC output."""
    return work_dir.parent / f".{work_dir.name}.previous"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def clean_work_dir(work_dir: Path) -> None:
    """Remove a previous training's outputs (only the trainer's own files)."""
    for name in TRAINER_OUTPUTS:
        _remove(work_dir / name)


def set_aside(work_dir: Path) -> None:
    """Move the trainer's outputs to previous_dir (replacing an older copy); the work dir is then fresh."""
    present = [name for name in TRAINER_OUTPUTS if (work_dir / name).exists()]
    if not present:
        return
    keep = previous_dir(work_dir)
    _remove(keep)
    keep.mkdir(parents=True)
    for name in present:
        (work_dir / name).rename(keep / name)


def restore_previous(work_dir: Path) -> bool:
    """Put the set-aside outputs back in place of a failed run's; False when there were none."""
    keep = previous_dir(work_dir)
    if not keep.is_dir():
        return False
    clean_work_dir(work_dir)
    for item in keep.iterdir():
        item.rename(work_dir / item.name)
    keep.rmdir()
    return True


def drop_previous(work_dir: Path) -> None:
    """After a successful run the set-aside copy is no longer needed."""
    _remove(previous_dir(work_dir))
