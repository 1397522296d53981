"""The one place in `steps/` that talks to MLflow.

Two users:
- the trainer (rank 0 only) streams metrics and checkpoint directories into the MLflow run that the
  finetune flow created, through `RunLogger.from_env(rank)`;
- the evaluate stage adds its per-example table (input, prediction, references, slot errors) to that same run
  through `log_predictions_table(run_file, table)`. The scores are logged once, by the register stage, which reruns
  for every new adapter (evaluate does not when two adapters decode alike).

Rules this module keeps, all learned the hard way (see the team's ecosystem notes):
- Never `mlflow.start_run()` here: a child process that attaches to the parent's run marks it FINISHED
  when it exits. Everything goes through `MlflowClient` with an explicit run id.
- Cheap per call: a synchronous `log_metric` on sqlite costs 14-21 ms, so `log_metrics` only enqueues;
  a background thread sends everything queued as one `log_batch`.
- Never fatal: if the store hiccups, warn once on stderr, keep the data queued, retry with backoff,
  and let training go on. `close()` waits a bounded time, then gives up with a warning.
- Free when disabled: without `MLFLOW_RUN_ID` (or on ranks > 0) nothing imports mlflow (2.5 s).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.core.common import InputError

if TYPE_CHECKING:
    import pandas

RUN_FILE_KEYS = ("run_id", "tracking_uri", "experiment_id")
MAX_METRICS_PER_BATCH = 1000  # MLflow's own limit for one log_batch call
EVAL_TABLE_ARTIFACT = "eval/predictions.json"


def warn(message: str) -> None:
    """Print a warning the way every stage does: one line on stderr, never an exception."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass
class _ArtifactUpload:
    staged_dir: Path  # a private copy, so the trainer may delete or rewrite its own directory meanwhile
    artifact_path: str


@dataclass
class _Outbox:
    """What the background thread still has to send, in order."""

    metrics: list[Any] = field(default_factory=list)  # mlflow.entities.Metric
    uploads: list[_ArtifactUpload] = field(default_factory=list)

    def empty(self) -> bool:
        return not self.metrics and not self.uploads


class RunLogger:
    """Rank-0 MLflow logger for the trainer: asynchronous, batched, never fatal.

    Disabled (every method a no-op) when `run_id` is None. Use `from_env(rank)` in the trainer.
    """

    def __init__(
        self,
        run_id: str | None,
        tracking_uri: str | None = None,
        flush_seconds: float = 1.0,
        close_timeout: float = 60.0,
        max_backoff: float = 30.0,
    ):
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.flush_seconds = flush_seconds
        self.close_timeout = close_timeout
        self.max_backoff = max_backoff
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._outbox = _Outbox()
        self._warned = False
        self._closed = False
        self._staging = None
        self._thread = None
        if self.enabled:
            self._staging = Path(tempfile.mkdtemp(prefix="runlogger-"))
            self._thread = threading.Thread(target=self._worker, name="mlflow-run-logger", daemon=True)
            self._thread.start()

    @classmethod
    def from_env(cls, rank: int) -> RunLogger:
        """Enabled iff this is rank 0 and the flow put MLFLOW_RUN_ID in the environment."""
        run_id = os.environ.get("MLFLOW_RUN_ID") or None
        if rank != 0:
            run_id = None
        return cls(run_id, tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None)

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    # ----- the trainer's side: only enqueue -----

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue one point per metric at `step`; returns immediately."""
        if not self.enabled or self._closed:
            return
        timestamp_ms = int(time.time() * 1000)
        clean = {name: float(value) for name, value in metrics.items()}
        self._queue.put(("metrics", (clean, timestamp_ms, int(step))))

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str) -> None:
        """Queue a copy of `local_dir` for upload under `artifact_path` (e.g. checkpoints/step_100)."""
        if not self.enabled or self._closed:
            return
        assert self._staging is not None
        staged = self._staging / f"{self._queue.qsize()}-{time.monotonic_ns()}"
        try:
            shutil.copytree(local_dir, staged)
        except OSError as exc:
            self._warn_once(f"could not stage {local_dir} for MLflow ({exc}); training continues without it")
            return
        self._queue.put(("artifacts", _ArtifactUpload(staged, artifact_path)))

    def close(self) -> None:
        """Send what is queued, waiting at most `close_timeout` seconds, then stop the thread."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        self._queue.put(("close", None))
        assert self._thread is not None
        self._thread.join(self.close_timeout + 5.0)
        if self._thread.is_alive():
            warn(f"MLflow logging did not finish within {self.close_timeout:.0f}s; some metrics or checkpoints may be missing from run {self.run_id}")
        elif not self._outbox.empty():
            warn(f"gave up sending {len(self._outbox.metrics)} metric points and {len(self._outbox.uploads)} artifact dirs "
                 f"to MLflow run {self.run_id}")
        if self._staging is not None and not self._thread.is_alive():
            shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- the background thread's side -----

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warn(message)

    def _worker(self) -> None:
        client = None
        wait = self.flush_seconds
        deadline = None  # set once close() is seen: from then on, stop when sent or out of time
        while True:
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            if self._drain(timeout=wait) and deadline is None:
                deadline = time.monotonic() + self.close_timeout
            if not self._outbox.empty():
                try:
                    if client is None:
                        client = self._make_client()
                    self._send(client)
                    wait = self.flush_seconds
                except Exception as exc:  # the store is down, locked, or misconfigured: keep training
                    self._warn_once(f"MLflow logging failed ({type(exc).__name__}: {exc}); training continues, will retry")
                    wait = min(max(wait * 2, 0.5), self.max_backoff)
            if deadline is not None and (self._outbox.empty() or time.monotonic() >= deadline):
                return

    def _drain(self, timeout: float) -> bool:
        """Move everything queued into the outbox (waiting up to `timeout` for the first item). True once close() was called."""
        closing = self._closed
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return closing
        while True:
            kind, payload = item
            if kind == "close":
                closing = True
            elif kind == "metrics":
                self._outbox.metrics.extend(self._to_metric_entities(*payload))
            else:
                self._outbox.uploads.append(payload)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return closing

    @staticmethod
    def _to_metric_entities(values: dict[str, float], timestamp_ms: int, step: int) -> list[Any]:
        from mlflow.entities import Metric

        return [Metric(key=name, value=value, timestamp=timestamp_ms, step=step) for name, value in values.items()]

    def _make_client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _send(self, client: Any) -> None:
        """Send metrics in batches, then artifact dirs; whatever fails stays in the outbox for the next try."""
        while self._outbox.metrics:
            batch = self._outbox.metrics[:MAX_METRICS_PER_BATCH]
            client.log_batch(self.run_id, metrics=batch, synchronous=True)
            del self._outbox.metrics[: len(batch)]
        while self._outbox.uploads:
            upload = self._outbox.uploads[0]
            client.log_artifacts(self.run_id, str(upload.staged_dir), artifact_path=upload.artifact_path)
            shutil.rmtree(upload.staged_dir, ignore_errors=True)
            self._outbox.uploads.pop(0)


# ----- run files: how the finetune flow tells the evaluate stage which run to add to -----
#
# A run file is local bookkeeping, like mlflow.db itself: it holds a run id and an absolute tracking URI that differ
# on every machine and run, so it is git-ignored and neither a DVC output nor a dependency (docs/pipeline.md, "Stages").


def write_run_file(path: str | os.PathLike, run_id: str, tracking_uri: str, experiment_id: str, **extra: Any) -> None:
    """Write the run file ({"run_id", "tracking_uri", "experiment_id"} plus flow-private keys)."""
    from steps.core.common import write_json

    write_json(path, {"run_id": run_id, "tracking_uri": tracking_uri, "experiment_id": experiment_id, **extra})


def read_run_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run file, with a clear error when it is not one."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("run file not found; run the finetune stage first (python -m pipelines.finetune)", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not a JSON run file ({exc}); expected the file written by pipelines.finetune", path) from None
    missing = [key for key in RUN_FILE_KEYS if not isinstance(record, dict) or not record.get(key)]
    if missing:
        raise InputError(f"run file lacks {', '.join(missing)}; expected keys {', '.join(RUN_FILE_KEYS)} (rerun the finetune stage)", path)
    return record


def log_predictions_table(run_file: str, table: pandas.DataFrame) -> None:
    """Add the per-example predictions table to the finetune run named in `run_file`.

    A missing run file (e.g. outputs pulled from a DVC remote, no local training run) only warns:
    the stage's real outputs are its files, MLflow is a copy. A store failure warns too. A malformed run
    file is a user error (InputError). Rerunning replaces the table instead of appending to it
    (MlflowClient.log_table would append).
    """
    if not Path(run_file).exists():
        warn(f"{run_file}: no MLflow run file; the predictions table is not logged to MLflow (run the finetune stage to create one)")
        return
    record = read_run_file(run_file)
    written_for = record.get("project_dir")
    if written_for and Path(written_for).resolve() != Path.cwd().resolve():
        # A copied project (cp -r) carries the original's run file, which names the original's store: never write there.
        warn(f"{run_file} was written for the project at {written_for}, not this one ({Path.cwd()}); the predictions table "
             "is not logged to MLflow (run the finetune stage here to create this project's run)")
        return
    try:
        _log_table_to_run(record, table)
    except Exception as exc:
        warn(f"could not log the predictions table to MLflow run {record['run_id']} ({type(exc).__name__}: {exc}); "
             "metrics/eval.json is unaffected")


def _log_table_to_run(record: dict[str, Any], table: pandas.DataFrame) -> None:
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    client = MlflowClient(tracking_uri=record["tracking_uri"])
    run_id = record["run_id"]
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(EVAL_TABLE_ARTIFACT).name
        # The same layout as MlflowClient.log_table, so the UI's evaluation view reads it.
        table.to_json(local, orient="split", index=False, date_format="iso")
        client.log_artifact(run_id, str(local), artifact_path=str(Path(EVAL_TABLE_ARTIFACT).parent))
    logged = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": EVAL_TABLE_ARTIFACT, "type": "table"}
    if entry not in logged:
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))
