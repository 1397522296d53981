"""The LoRA adapter as an MLflow pyfunc model (logged "from code": this file is the model's code).

What a logged model carries: the adapter (adapter.safetensors + adapter_config.json) as artifacts, a copy
of steps/*.py, and in its model_config the decoding settings from params.yaml and the base checkpoint's
identity (recorded path and sha256). It does not carry the base weights (hundreds of MB, and the same
for every adapter); loading finds them, in this order:

1. `mlflow.pyfunc.load_model(uri, model_config={"init_checkpoint": "/path/model.safetensors"})`;
2. the environment variable LORA_NLG_BASE_CHECKPOINT;
3. `base_path`, the path recorded when the model was logged, if that file still exists.

The file found must have the sha256 the adapter recorded (an adapter on the wrong base generates
nonsense, so loading fails loudly instead; steps.decode checks it).

`predict(df)` takes a DataFrame with a `meaning_representation` column and returns one
generated text per row, decoded with the stored beam settings. Rows with the same input are decoded once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

BASE_ENV = "LORA_NLG_BASE_CHECKPOINT"
INPUT_COLUMN = "meaning_representation"

# The decoding settings besides the search's own (those build a steps.beam.BeamConfig).
QUERY_KEYS = ("seq_len", "batch_size", "add_bos")


def find_base_checkpoint(config: dict[str, Any]) -> Path:
    """The base weights for this adapter, in the order of the module docstring.

    The sha256 check against the adapter's recorded base happens in steps.decode.load_for_inference.
    """
    from steps.common import InputError

    chosen = [("model_config init_checkpoint", config.get("init_checkpoint")), (BASE_ENV, os.environ.get(BASE_ENV))]
    for origin, value in chosen:
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise InputError(f"base checkpoint from {origin} does not exist", path)
            return path
    recorded = config.get("base_path")
    if recorded and Path(recorded).is_file():
        return Path(recorded)
    raise InputError(
        f"cannot find the base checkpoint for this adapter ({config.get('model_card')}, sha256 {str(config.get('base_sha256'))[:12]}..., "
        f"recorded at {recorded}): set {BASE_ENV}=/path/to/model.safetensors or load with "
        "mlflow.pyfunc.load_model(uri, model_config={'init_checkpoint': '/path/to/model.safetensors'})"
    )


def contexts_from(model_input: pd.DataFrame | dict | list) -> list[str]:
    """The input texts: the `meaning_representation` column (or a plain list of strings), none of them empty."""
    from steps.common import InputError

    if isinstance(model_input, list):
        return [str(x) for x in model_input]
    frame = pd.DataFrame(model_input)
    if INPUT_COLUMN not in frame.columns:
        raise InputError(f"expected a DataFrame with a '{INPUT_COLUMN}' column of strings, got columns {list(frame.columns)}")
    texts = frame[INPUT_COLUMN]
    if texts.isna().any() or (texts.astype(str).str.strip() == "").any():
        raise InputError(f"'{INPUT_COLUMN}' holds an empty value in row {int((texts.isna() | (texts.astype(str).str.strip() == '')).idxmax())}; "
                         "every row needs a meaning representation")
    return texts.astype(str).tolist()


def pick_device(config: dict[str, Any]) -> str:
    """The device from the model config, or CUDA when this machine has it."""
    import torch

    return config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")


class AdapterModel(mlflow.pyfunc.PythonModel):
    """GPT-2 + LoRA adapter that turns meaning representations into text with batched beam search."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from steps.beam import BeamConfig
        from steps.decode import load_for_inference

        config = dict(context.model_config or {})
        base = find_base_checkpoint(config)
        self.model = load_for_inference(adapter=context.artifacts["adapter"], init_checkpoint=str(base), device=pick_device(config))
        self.search = BeamConfig.from_mapping(config)
        self.query_options = {key: config[key] for key in QUERY_KEYS if key in config}

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        """One text per row. A bad request raises MLflow's INVALID_PARAMETER_VALUE, which `mlflow models serve`
        answers with HTTP 400 and the message (a server keeps serving)."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from steps.common import InputError
        from steps.decode import generate_texts

        try:
            texts = contexts_from(model_input)
            self.check_lengths(texts)
            search = self.search_with(params or {})
        except (InputError, ValueError) as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        unique = list(dict.fromkeys(texts))  # E2E test sets repeat each MR many times
        generated = dict(zip(unique, generate_texts(self.model, unique, search, **self.query_options)))
        return [generated[text] for text in texts]

    def search_with(self, params: dict[str, Any]):
        """The stored search settings with the request's decoding params (beam, length_penalty, ...) applied."""
        import dataclasses

        from steps.beam import REQUEST_OPTIONS

        names = set(REQUEST_OPTIONS) & params.keys()
        return dataclasses.replace(self.search, **{name: params[name] for name in names}) if names else self.search

    def check_lengths(self, texts: list[str]) -> None:
        """An MR longer than the model's query window would be cut silently; say so instead."""
        from steps.common import InputError
        from steps.tokenizer import get_tokenizer

        limit = int(self.query_options.get("seq_len", 512)) - self.search.eval_len
        tokenizer = get_tokenizer()
        for row, text in enumerate(texts):
            if (n := len(tokenizer.encode(text))) > limit:
                raise InputError(f"the meaning representation in row {row} has {n} tokens; this model takes at most {limit}")


mlflow.models.set_model(AdapterModel())
