"""What the trainer writes for people and for DVC: its CSV logs, the loss plots and the run summary.

The CSV logs in the work dir hold one row per log/eval interval and follow a resume (rows written after
the resumed state are dropped). At the end of a run, the pipeline's DVC plot files (`train_loss.csv`,
`valid_loss.csv`) and a PNG of the same curves (opens offline, unlike `dvc plots show`) are written from
them. Nothing here holds a time or a path, so a rerun writes the same bytes.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from steps.core.common import atomic_path, atomic_write
from steps.formats.work_dir import WorkDir

TRAIN_LOG_FIELDS = ["step", "epoch", "lr", "loss", "nll", "ppl"]
VALID_LOG_FIELDS = ["step", "valid_loss", "valid_ppl", "best_valid_loss"]
TRAIN_PLOT, VALID_PLOT, LOSS_PNG = "train_loss.csv", "valid_loss.csv", "loss.png"


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    with atomic_write(path) as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: row[k] for k in fields} for row in rows)


def append_row(path: Path, fields: list[str], row: dict[str, Any]) -> None:
    """One more interval. Appending (not rewriting) keeps this cheap; a torn last line only follows a crash,
    and the resume that follows rewrites the file (`truncate_after`)."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow({k: row[k] for k in fields})


def truncate_after(path: Path, step: int) -> None:
    """Forget the rows written after `step` (a resumed run writes them again)."""
    rows = read_rows(path)
    if rows:
        fields = list(rows[0].keys())
        write_rows(path, [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= step], fields)


def write_plots(work_dir: Path, plots_dir: str | os.PathLike) -> None:
    """The DVC plot files and the PNG, from the work dir's logs."""
    train, valid = read_rows(WorkDir(work_dir).train_log), read_rows(WorkDir(work_dir).valid_log)
    plots = Path(plots_dir)
    write_rows(plots / TRAIN_PLOT, train, ["step", "loss", "nll"])
    write_rows(plots / VALID_PLOT, valid, ["step", "valid_loss"])
    draw_loss_png(train, valid, plots / LOSS_PNG)


def draw_loss_png(train: list[dict[str, str]], valid: list[dict[str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([int(r["step"]) for r in train], [float(r["loss"]) for r in train], label="train loss (label-smoothed)")
    ax.plot([int(r["step"]) for r in train], [float(r["nll"]) for r in train], label="train nll", alpha=0.6)
    ax.plot([int(r["step"]) for r in valid], [float(r["valid_loss"]) for r in valid], "o-", label="valid loss")
    ax.set_xlabel("optimizer update")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})  # no version stamp: same curves, same bytes
    plt.close(fig)
