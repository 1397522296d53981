"""The trainer's work dir (`--work_dir`, `finetune.work_dir`): the one place its file names live.

    adapter.safetensors, adapter_config.json   the final adapter (model.safetensors instead with --lora_dim 0)
    best/                                      the adapter of the best validation loss
    checkpoints/step_<N>/                      an adapter every --save_interval updates
    resume/state.pt                            the latest resume state (model, optimizer, schedule, RNG, data position)
    train_log.csv, valid_log.csv               the loss per log and eval interval
    summary.json                               the run's summary (what the DVC metric file copies)
    status.json                                running, completed or failed, and why (the finetune flow reads it)

Beside it, never in it (the work dir is a DVC output, and these would change its hash): `.<name>.lock`, the
single-writer lock, and `.<name>.previous`, where a fresh run sets the last run's outputs aside, to put them
back when the new run is refused or diverges, so a failed attempt never costs the last good adapter.
The trainer, the finetune flow, the register stage and the tests use these names; nothing else spells them.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FULL_MODEL = "model.safetensors"


@dataclass(frozen=True)
class WorkDir:
    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    def __fspath__(self) -> str:  # a WorkDir is also its directory's path
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER_WEIGHTS

    @property
    def adapter_config(self) -> Path:
        return self.root / ADAPTER_CONFIG

    @property
    def full_model(self) -> Path:
        return self.root / FULL_MODEL

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}"

    @property
    def resume_state(self) -> Path:
        return self.root / "resume" / "state.pt"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.csv"

    @property
    def valid_log(self) -> Path:
        return self.root / "valid_log.csv"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def lock(self) -> Path:
        return self.root.parent / f".{self.root.name}.lock"

    @property
    def previous(self) -> Path:
        return self.root.parent / f".{self.root.name}.previous"

    def trainer_outputs(self) -> list[Path]:
        """Everything the trainer writes here: the only things moved or deleted (a user's own files stay)."""
        return [self.adapter, self.adapter_config, self.full_model, self.best, self.checkpoints, self.resume_state.parent,
                self.train_log, self.valid_log, self.summary, self.status]

    # -- between runs (the finetune flow) ----------------------------------------------------------------------

    def clean(self) -> None:
        """Remove a previous training's outputs (only the trainer's own files)."""
        for path in self.trainer_outputs():
            _remove(path)

    def set_aside(self) -> None:
        """Move the trainer's outputs to `previous` (replacing an older copy); the work dir is then fresh."""
        present = [path for path in self.trainer_outputs() if path.exists()]
        if not present:
            return
        _remove(self.previous)
        self.previous.mkdir(parents=True)
        for path in present:
            path.rename(self.previous / path.name)

    def restore_previous(self) -> bool:
        """Put the set-aside outputs back in place of a failed run's; False when there were none."""
        if not self.previous.is_dir():
            return False
        self.clean()
        for item in self.previous.iterdir():
            item.rename(self.root / item.name)
        self.previous.rmdir()
        return True

    def drop_previous(self) -> None:
        """After a successful run the set-aside copy is no longer needed."""
        _remove(self.previous)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
