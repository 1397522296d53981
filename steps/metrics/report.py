"""What the evaluate stage adds to the word-overlap scores: the slot error rate (E2E), and the base alone.

- **Slot error rate** (steps/metrics/slot_error.py, docs/slot_error.md): the share of MR slot values that the outputs
  miss, contradict or add. Only for E2E MRs; a WebNLG/DART triple context has no slots, so nothing is added.
- **The base alone**: the same test MRs decoded with the same search settings by the base model without the
  adapter (the `decode_base` stage), scored the same way, so what the adapter added is measured, not claimed.

The record keeps the adapted model's scores at the top level, as before (`BLEU`, ..., now `SER` and
`slot_errors`), and the base's under `base`: `dvc metrics show` flattens that to columns `base.BLEU`, `base.SER`,
and `dvc metrics diff` / `dvc exp show` compare them like any metric. MLflow gets the same flat names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from steps.metrics.slot_error import check_corpus, is_e2e_mr, summarise

BASE_KEY = "base"  # eval.json section (and MLflow name prefix) of the base model's scores
SLOT_ERROR_COUNTS = ("missing", "wrong", "added", "slots", "examples_with_errors")


@dataclass(frozen=True)
class SlotErrors:
    """The corpus slot error rate and one short description per output ("" when it has no error)."""

    record: dict[str, Any]  # {"SER": rate, "slot_errors": {missing, wrong, added, slots, examples_with_errors}}
    per_example: list[str]


def slot_errors(contexts: Sequence[str] | None, predictions: Sequence[str], ref_type: str = "e2e") -> SlotErrors | None:
    """SER of `predictions` (one per instance) against their MRs; None when these are not E2E MRs.

    `contexts` are the instances' MRs, in the context form steps.prepare writes or the official one.
    """
    if ref_type != "e2e" or not contexts or not all(is_e2e_mr(c) for c in contexts):
        return None
    predictions = [p.strip() for p in predictions]
    checks = check_corpus(list(contexts), predictions)
    counts = summarise(checks).as_dict()
    return SlotErrors({"SER": counts["rate"], "slot_errors": {k: counts[k] for k in SLOT_ERROR_COUNTS}},
                      [c.describe() for c in checks])


def add_slot_errors(record: dict[str, Any], table: Any, contexts: Sequence[str] | None, predictions: Sequence[str],
                    ref_type: str, column: str = "slot_errors") -> bool:
    """Put SER into `record` and a per-example column into `table` (a DataFrame); False when not E2E."""
    found = slot_errors(contexts, predictions, ref_type)
    if found is None:
        return False
    record.update(found.record)
    table[column] = found.per_example
    return True


def add_base(record: dict[str, Any], base_record: Mapping[str, Any], metric_names: Sequence[str], table: Any,
             base_predictions: Sequence[str], base_slot_errors: SlotErrors | None) -> None:
    """The base alone's metrics (and SER) under record["base"]; its outputs and slot errors as table columns."""
    section: dict[str, Any] = {name: base_record[name] for name in metric_names if name in base_record}
    table["base_prediction"] = [p.strip() for p in base_predictions]
    if base_slot_errors is not None:
        section.update(base_slot_errors.record)
        table["base_slot_errors"] = base_slot_errors.per_example
    record[BASE_KEY] = section


def mlflow_metrics(record: Mapping[str, Any], metric_names: Sequence[str]) -> dict[str, float]:
    """The numbers to log as `eval/<name>`: the metrics, SER and its counts, and the same under `base.`."""

    def flat(section: Mapping[str, Any], prefix: str) -> dict[str, float]:
        out = {prefix + name: float(section[name]) for name in (*metric_names, "SER") if name in section}
        out.update({f"{prefix}slot_errors.{k}": float(v) for k, v in section.get("slot_errors", {}).items()})
        return {k: v for k, v in out.items() if math.isfinite(v)}

    values = flat(record, "")
    if isinstance(record.get(BASE_KEY), Mapping):
        values.update(flat(record[BASE_KEY], BASE_KEY + "."))
    return values


def comparable(record: Mapping[str, Any], metric_names: Sequence[str]) -> dict[str, Any]:
    """The numbers that compare across runs, for `dvc exp show` and `dvc metrics diff`: the metrics and SER, and the same
    under `base`. How they were computed (implementations, counts, instance count) stays in the full record."""
    def numbers(section: Mapping[str, Any]) -> dict[str, float]:
        return {name: section[name] for name in (*metric_names, "SER") if name in section}

    out: dict[str, Any] = numbers(record)
    if isinstance(record.get(BASE_KEY), Mapping):
        out[BASE_KEY] = numbers(record[BASE_KEY])
    return out


def headline(record: Mapping[str, Any]) -> str:
    """`SER 0.0312 (base alone: BLEU 0.0123, SER 0.9876)` for the stage's summary line; "" when neither is there."""
    parts = []
    if "SER" in record:
        parts.append(f"SER {record['SER']:.4f}")
    base = record.get(BASE_KEY)
    if isinstance(base, Mapping):
        parts.append("(base alone: " + ", ".join(f"{k} {base[k]:.4f}" for k in ("BLEU", "SER") if k in base) + ")")
    return " ".join(parts)
