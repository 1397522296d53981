"""Environment defaults and params.yaml access shared by every pipeline entry point.

Each entry point calls `apply_env_defaults()` itself, before it imports prefect or mlflow (both read
some settings once, at import); importing this module changes nothing. Every value is a *default*
(os.environ.setdefault): whatever the user exported wins.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import yaml

from steps.core.common import InputError

CODE_ROOT = Path(__file__).resolve().parents[1]  # this checkout: steps/ and pipelines/ live here

# Why each one (measured, see docs/pipeline.md "Environment"):
OFFLINE_DEFAULTS = {
    "DO_NOT_TRACK": "true",  # Prefect client analytics off; MLflow telemetry off (MLflow only accepts "true")
    "MLFLOW_DISABLE_TELEMETRY": "true",  # no remote config fetch / event posts from MLflow
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry heartbeat (and its noisy DNS errors) from the server
    "DVC_NO_ANALYTICS": "1",  # no DVC analytics daemon (also off in .dvc/config)
    # The ephemeral Prefect API server needs 10-50 s to start on a busy 2-core machine; Prefect's default is 20 s.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_HOME": str(CODE_ROOT / ".prefect"),  # the ephemeral run database lives with the checkout (git-ignored)
}


def apply_env_defaults() -> None:
    """Set the offline/quick defaults unless the user already chose otherwise."""
    user_profiles = Path.home() / ".prefect" / "profiles.toml"
    if "PREFECT_HOME" not in os.environ and "PREFECT_PROFILES_PATH" not in os.environ and user_profiles.is_file():
        # Moving PREFECT_HOME would also hide a profile made with `prefect config set PREFECT_API_URL=...`.
        os.environ["PREFECT_PROFILES_PATH"] = str(user_profiles)
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


# ----- params.yaml -----


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently; DVC refuses)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in first_line:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice (first on line {first_line[key]}); "
                                                        "keep one", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_params(path: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read params.yaml (the single source of every pipeline default), then apply `key.sub=value` overrides."""
    path = Path(path)
    try:
        params = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise InputError("params file not found; run from the project root or pass --params <file>", path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise InputError(f"invalid YAML ({getattr(exc, 'problem', exc)}); fix the file", path, mark.line + 1 if mark else None) from None
    if not isinstance(params, dict):
        raise InputError("expected a mapping of sections (prepare:, finetune:, ...) at the top level", path)
    for item in overrides or []:
        set_dotted(params, item, path)
    return params


def add_params_arguments(parser: Any, sections: str, example: str) -> None:
    """--params, --set and --project_dir: how every pipeline entry point is told its params file and project root."""
    parser.add_argument("--params", default="params.yaml", help=f"params file (sections {sections}); "
                        "it and the relative paths inside it are resolved against --project_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one param, e.g. --set {example} (repeatable; value parsed as YAML)")
    parser.add_argument("--project_dir", default=".", help="project root: where dvc.yaml runs its commands")


def set_dotted(params: dict[str, Any], assignment: str, source: str | os.PathLike = "--set") -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (so 8 is an int, true a bool)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise InputError(f"override {assignment!r} is not key=value (e.g. finetune.lora_dim=8)", source)
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise InputError(f"override {assignment!r}: {part} is not a section", source)
    node[leaf] = yaml.safe_load(raw)


def section(params: dict[str, Any], name: str, source: str | os.PathLike) -> dict[str, Any]:
    """One top-level section, with an error that says which one is missing."""
    value = params.get(name)
    if not isinstance(value, dict):
        raise InputError(f"missing section '{name}:'; copy it from the project's params.yaml", source)
    return value


def require(block: dict[str, Any], keys: list[str], where: str, source: str | os.PathLike) -> None:
    """Fail early, with every missing key named, instead of deep inside a run."""
    missing = [k for k in keys if k not in block]
    if missing:
        raise InputError(f"section '{where}' lacks {', '.join(missing)}; copy them from the project's params.yaml", source)


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'finetune': {'lr': 2e-4}} -> {'finetune.lr': 2e-4}: how the params appear in MLflow."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def resolve_path(project_dir: Path, value: str | os.PathLike) -> Path:
    """Paths in params.yaml are relative to the project root (where dvc.yaml runs its commands)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else project_dir / path


def store_root(project_dir: Path) -> Path:
    """Where the project's local stores (the SQLite MLflow store, mlruns/) live: the project itself, or, for an
    experiment DVC's queue runs in a temporary copy (`<project>/.dvc/tmp/exps/...`), the project it was queued from
    (DVC sets DVC_ROOT to it), so every queued run lands in the project's store, not in a copy deleted afterwards."""
    root = os.environ.get("DVC_ROOT")
    if root:
        with contextlib.suppress(ValueError):
            Path(project_dir).resolve().relative_to(Path(root).resolve() / ".dvc" / "tmp" / "exps")
            return Path(root).resolve()
    return project_dir


def tracking_uri(tracking: dict[str, Any], project_dir: Path) -> str:
    """MLFLOW_TRACKING_URI wins, then tracking.tracking_uri from params.yaml.

    A relative sqlite path would be resolved against each process's own working directory (torchrun
    ranks, DVC stages), so it is always made absolute here.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking["tracking_uri"]
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(resolve_path(store_root(project_dir), uri[len(prefix) :]))
    return uri



def check_tracking_store(uri: str, wait_s: float = 120.0, say: Any = print) -> None:
    """Fail in seconds, before anything starts, when the MLflow store cannot be used.

    A tracking server must answer /health within 5 s (MLflow's own client would retry for minutes). A SQLite
    store locked by another process is waited for, at most `wait_s` seconds (MLflow itself gives up after 20),
    and the wait is said out loud.
    """
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    elif uri.startswith("sqlite:///"):
        _wait_for_sqlite(Path(uri[len("sqlite:///") :]), wait_s, say)


def _check_server(uri: str) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
            if response.status == 200:
                return
            reason = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise InputError(f"the MLflow tracking server {uri} does not answer ({reason}); start it (mlflow server ...) or point "
                     "tracking.tracking_uri / MLFLOW_TRACKING_URI at one that runs")


def _wait_for_sqlite(path: Path, wait_s: float, say: Any) -> None:
    import sqlite3

    from steps.core.common import require_writable

    require_writable(path.parent)
    if not path.exists():
        return
    for timeout in (0.1, wait_s):
        try:
            with contextlib.closing(sqlite3.connect(path, timeout=timeout)) as db:
                db.execute("BEGIN IMMEDIATE")  # the lock a writer needs; released at once
                db.rollback()
            return
        except sqlite3.DatabaseError as exc:  # OperationalError ("database is locked", ...) is one
            if not isinstance(exc, sqlite3.OperationalError):  # "file is not a database", "database disk image is malformed"
                raise InputError(f"the MLflow store is damaged ({exc}); move it aside (mv {path.name} {path.name}.broken) and "
                                 "rerun to start a new one, or restore it from a backup", path) from None
            if "locked" not in str(exc):
                raise InputError(f"the MLflow store cannot be opened ({exc})", path) from None
            if timeout != wait_s:
                say(f"waiting up to {wait_s:.0f} s for the MLflow store {path}: another process is writing to it")
    raise InputError(f"the MLflow store stayed locked by another process for {wait_s:.0f} s; let that process finish "
                     "(or stop it) and rerun", path)
