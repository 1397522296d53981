"""The LoRA adapter as an MLflow pyfunc model (logged "from code": this file is the model's code).

What a logged model carries: the adapter (adapter.safetensors + adapter_config.json) as artifacts, a copy
of steps/*.py, and in its model_config the decoding settings from params.yaml and the base checkpoint's
identity (recorded path and sha256). It does not carry the base weights (hundreds of MB, and the same
for every adapter); loading finds them, in this order:

1. `mlflow.pyfunc.load_model(uri, model_config={"init_checkpoint": "/path/model.safetensors"})`;
2. the environment variable LORA_NLG_BASE_CHECKPOINT;
3. `base_path`, the path recorded when the model was logged, if that file still exists.

When a sha256 was recorded, the file found must match it (an adapter on the wrong base generates
nonsense, so this fails loudly instead).

`predict(df)` takes a DataFrame with a `meaning_representation` (or `context`) column and returns one
generated text per row, decoded with the stored beam settings. Rows with the same input are decoded once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

BASE_ENV = "LORA_NLG_BASE_CHECKPOINT"
INPUT_COLUMNS = ("meaning_representation", "context")
DECODING_KEYS = ("beam", "length_penalty", "no_repeat_ngram_size", "repetition_penalty", "min_length", "eval_len", "seq_len",
                 "batch_size", "add_bos")


def find_base_checkpoint(config: dict[str, Any]) -> Path:
    """The base weights for this adapter (see the module docstring for the order), checked against the recorded sha256."""
    from steps.checkpoints import sha256_file
    from steps.common import InputError

    candidates = [("model_config init_checkpoint", config.get("init_checkpoint")), (BASE_ENV, os.environ.get(BASE_ENV)),
                  ("the path recorded at logging time", config.get("base_path"))]
    for origin, value in candidates:
        if not value:
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            if origin.startswith("the path recorded"):
                break
            raise InputError(f"base checkpoint from {origin} does not exist", path)
        expected = config.get("base_sha256")
        if expected and sha256_file(path) != expected:
            raise InputError(f"base checkpoint from {origin} has sha256 {sha256_file(path)[:12]}..., but this adapter was trained "
                             f"on {expected[:12]}...; point at the right base ({config.get('model_card')})", path)
        return path
    raise InputError(
        f"cannot find the base checkpoint for this adapter ({config.get('model_card')}, sha256 {str(config.get('base_sha256'))[:12]}...; "
        f"recorded at {config.get('base_path')}): set {BASE_ENV}=/path/to/model.safetensors or load with "
        "model_config={'init_checkpoint': '/path/to/model.safetensors'}"
    )


def contexts_from(model_input: pd.DataFrame | dict | list) -> list[str]:
    """The input texts: the `meaning_representation` or `context` column (or a plain list of strings)."""
    from steps.common import InputError

    if isinstance(model_input, list):
        return [str(x) for x in model_input]
    frame = pd.DataFrame(model_input)
    for column in INPUT_COLUMNS:
        if column in frame.columns and frame[column].notna().all():
            return frame[column].astype(str).tolist()
    raise InputError(f"expected a DataFrame with a '{INPUT_COLUMNS[0]}' or '{INPUT_COLUMNS[1]}' column of strings, "
                     f"got columns {list(frame.columns)}")


class AdapterModel(mlflow.pyfunc.PythonModel):
    """GPT-2 + LoRA adapter that turns meaning representations into text with batched beam search."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from steps.decode import load_for_inference

        config = dict(context.model_config or {})
        base = find_base_checkpoint(config)
        self.model = load_for_inference(adapter=context.artifacts["adapter"], init_checkpoint=str(base),
                                        device=config.get("device") or "cpu")
        self.decoding = {key: config[key] for key in DECODING_KEYS if key in config}
        self.decoding["eos_token_ids"] = tuple(config.get("eos_token_ids") or (50256,))

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        from steps.decode import generate_texts

        texts = contexts_from(model_input)
        unique = list(dict.fromkeys(texts))  # E2E test sets repeat each MR many times
        generated = dict(zip(unique, generate_texts(self.model, unique, **self.decoding)))
        return [generated[text] for text in texts]


mlflow.models.set_model(AdapterModel())
