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

`predict(df)` takes a DataFrame with a `meaning_representation` column of strings and returns one
generated text per row, decoded with the stored beam settings. Rows with the same input are decoded once.

A request is bounded by limits its model config states (docs/pipeline.md, "Serving limits"): rows per request
(`max_rows`), `beam` (`max_beam`), `eval_len` (`max_eval_len`, below `seq_len`), their product rows x beam x eval_len
(`max_request_tokens`) and the decoding time (`max_request_seconds`, and at most 80% of the scoring server's
MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, so our answer comes before the server's 504 and no work outlives its request).
A model logged before these keys existed gets the defaults of `request_bounds`. A request outside them, or with a
value of the wrong type, is answered with one line (HTTP 400 when served) and no traceback.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INTERNAL_ERROR, INVALID_PARAMETER_VALUE

BASE_ENV = "LORA_NLG_BASE_CHECKPOINT"
INPUT_COLUMN = "meaning_representation"

# The decoding settings besides the search's own (those build a steps.decoding.beam.BeamConfig).
QUERY_KEYS = ("seq_len", "batch_size", "add_bos")

# Per-request bounds: the model config keys (packaging.model_config_for writes them) and their defaults.
DEFAULT_MAX_ROWS = 256
DEFAULT_MAX_BEAM = 16
DEFAULT_MAX_EVAL_LEN = 256  # the original gpt2_beam.py's default eval_len; never more than seq_len - 1
DEFAULT_MAX_REQUEST_SECONDS = 50.0
SERVER_TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # the scoring server's own limit (504 after it; MLflow: 60 s)
SERVER_TIMEOUT_SHARE = 0.8  # our time budget ends at this share of the server's, so we answer first
BOUND_KEYS = ("max_rows", "max_beam", "max_eval_len", "max_request_tokens", "max_request_seconds")

_log = logging.getLogger(__name__)


class RequestRefused(MlflowException):
    """A request this model will not (or could not) decode, answered in one line with no stack trace.

    MLflow's scoring server rewrites the message of an MlflowException raised by predict to "Failed to predict data
    '<the request's DataFrame, printed over several lines>'.", a newline and "Error: <message>"; this one keeps its
    own message, so the answer is the one line that says what was wrong.
    """

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):  # set once, by MlflowException.__init__
            self._message = value


def request_bounds(config: dict[str, Any]) -> dict[str, Any]:
    """The per-request bounds in `config`, with defaults for the keys it lacks (a model logged before they existed).

    Defaults: 256 rows; beam 16 and eval_len 256, or the model's own beam/eval_len if larger; eval_len never more than
    seq_len - 1 (the query needs one token of room); max_request_tokens = max_rows x the model's beam x its eval_len
    (a full request at the model's own settings fits); 50 s. A bound that would refuse the model's own settings is an
    error at load time.
    """
    from steps.core.common import DEFAULT_SEQ_LEN, InputError
    from steps.decoding.beam import BeamConfig

    stored = BeamConfig()
    seq_len = int(config.get("seq_len") or DEFAULT_SEQ_LEN)
    beam, eval_len = int(config.get("beam") or stored.beam), int(config.get("eval_len") or stored.eval_len)

    def given(key: str, default: Any, kind: type = int) -> Any:
        value = config.get(key)
        if value is None or value == "":
            return default
        ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and value > 0
        if not ok or (kind is int and not isinstance(value, numbers.Integral)):
            raise InputError(f"model config {key} = {value!r}: expected a {'whole ' if kind is int else ''}number > 0")
        return kind(value)

    bounds = {"max_rows": given("max_rows", DEFAULT_MAX_ROWS), "max_beam": given("max_beam", max(DEFAULT_MAX_BEAM, beam))}
    bounds["max_eval_len"] = min(given("max_eval_len", max(DEFAULT_MAX_EVAL_LEN, eval_len)), seq_len - 1)
    bounds["max_request_tokens"] = given("max_request_tokens", bounds["max_rows"] * beam * eval_len)
    bounds["max_request_seconds"] = given("max_request_seconds", DEFAULT_MAX_REQUEST_SECONDS, float)
    for key, value, limit in (("max_beam", beam, "beam"), ("max_eval_len", eval_len, "eval_len"),
                              ("max_request_tokens", beam * eval_len, "beam x eval_len")):
        if value > bounds[key]:
            raise InputError(f"model config {key} = {bounds[key]} refuses the model's own {limit} ({value}); raise it")
    return bounds


def time_budget(bounds: dict[str, Any]) -> float:
    """Seconds a request may decode: max_request_seconds, and at most 80% of the scoring server's request timeout
    (when set: `mlflow models serve` sets it in the server's environment)."""
    budget = float(bounds["max_request_seconds"])
    try:
        server = float(os.environ.get(SERVER_TIMEOUT_ENV) or "inf")
    except ValueError:
        server = math.inf
    return min(budget, SERVER_TIMEOUT_SHARE * server) if server > 0 else budget


def find_base_checkpoint(config: dict[str, Any]) -> Path:
    """The base weights for this adapter, in the order of the module docstring.

    The sha256 check against the adapter's recorded base happens in steps.decode.load_for_inference.
    """
    from steps.core.common import InputError

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


def kind_of(value: Any) -> str:
    """What a value is, in the words of the JSON a client sent: 'an int', 'a list', 'an object (dict)', ..."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, numbers.Integral):
        return "an int"
    if isinstance(value, numbers.Real):
        return "a float"
    if isinstance(value, (list, tuple)) or hasattr(value, "__array__"):
        return "a list"
    if isinstance(value, dict):
        return "an object (dict)"
    return f"a {type(value).__name__}"


def contexts_from(model_input: pd.DataFrame | dict | list) -> list[str]:
    """The input texts: the `meaning_representation` column (or a plain list of strings), each a non-empty string.

    A DataFrame built from JSON keeps whatever each row held (an int, a list, an object, a boolean); decoding
    str() of it would answer garbage, so any value that is not a string is refused, naming its row and type.
    """
    from steps.core.common import InputError

    if isinstance(model_input, list):
        values, where = model_input, "the input list"
    else:
        frame = pd.DataFrame(model_input)
        if INPUT_COLUMN not in frame.columns:
            raise InputError(f"expected a DataFrame with a '{INPUT_COLUMN}' column of strings, got columns {list(frame.columns)}")
        values, where = frame[INPUT_COLUMN].tolist(), f"'{INPUT_COLUMN}'"
    for row, value in enumerate(values):  # row: the position (0 = first), whatever the frame's index
        if (pd.api.types.is_scalar(value) and pd.isna(value)) or (isinstance(value, str) and not value.strip()):
            raise InputError(f"{where} holds an empty value in row {row}; every row needs a meaning representation")
        if not isinstance(value, str):
            raise InputError(f"row {row} of {where} is {kind_of(value)}; expected a string (a meaning representation)")
    return [str(value) for value in values]


def pick_device(config: dict[str, Any]) -> str:
    """The device from the model config, or CUDA when this machine has it."""
    import torch

    return config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")


class AdapterModel(mlflow.pyfunc.PythonModel):
    """GPT-2 + LoRA adapter that turns meaning representations into text with batched beam search."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from steps.decode import load_for_inference
        from steps.decoding.beam import BeamConfig

        config = dict(context.model_config or {})
        self.bounds = request_bounds(config)  # before the weights: a bad bound fails in a second
        base = find_base_checkpoint(config)
        self.model = load_for_inference(adapter=context.artifacts["adapter"], init_checkpoint=str(base), device=pick_device(config))
        self.search = BeamConfig.from_mapping(config)
        self.query_options = {key: config[key] for key in QUERY_KEYS if key in config}

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        """One text per row. A bad request raises RequestRefused (INVALID_PARAMETER_VALUE), which `mlflow models serve`
        answers with HTTP 400 and one line (a server keeps serving); running past the time budget raises it with
        DEADLINE_EXCEEDED (HTTP 504) and stops decoding; any other failure is one line (HTTP 500) and the traceback
        goes to the server's log, never into the answer."""
        from steps.core.common import InputError

        started = time.monotonic()
        try:
            texts = contexts_from(model_input)
            search = self.search_with(params or {})
            self.check_bounds(len(texts), search)
            self.check_lengths(texts, search.eval_len)
            return self.decode(texts, search, deadline=started + time_budget(self.bounds))
        except RequestRefused:
            raise
        except InputError as exc:  # what the request asked for (the checks above raise only InputError)
            raise RequestRefused(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        except Exception as exc:
            _log.exception("predict failed on a request")
            raise RequestRefused(f"the model failed on this request ({type(exc).__name__}); the server's log has the details",
                                 error_code=INTERNAL_ERROR) from None

    def decode(self, texts: list[str], search: Any, deadline: float) -> list[str]:
        """Each distinct text decoded once, `batch_size` at a time; between batches, past the deadline the rest is
        dropped and the request refused (a request the server gave up on stops using the machine)."""
        from steps.decode import DEFAULT_BATCH_SIZE, generate_texts

        unique = list(dict.fromkeys(texts))  # E2E test sets repeat each MR many times
        step = int(self.query_options.get("batch_size", DEFAULT_BATCH_SIZE))
        generated: dict[str, str] = {}
        for start in range(0, len(unique), step):
            if start and time.monotonic() > deadline:
                budget = time_budget(self.bounds)
                raise RequestRefused(
                    f"the request ran past its {budget:g} s time budget after {start} of {len(unique)} distinct inputs "
                    f"(max_request_seconds in the model config, at most {SERVER_TIMEOUT_SHARE:.0%} of {SERVER_TIMEOUT_ENV}); "
                    "send fewer rows or a smaller beam or eval_len", error_code=DEADLINE_EXCEEDED)
            batch = unique[start : start + step]
            generated.update(zip(batch, generate_texts(self.model, batch, search, **self.query_options)))
        return [generated[text] for text in texts]

    def search_with(self, params: dict[str, Any]):
        """The stored search settings with the request's decoding params (beam, length_penalty, ...) applied.

        Each param must have its setting's type: a whole number for beam, eval_len, no_repeat_ngram_size and
        min_length, a number for length_penalty and repetition_penalty (a boolean is neither); BeamConfig checks
        the ranges. MLflow's param schema checks types first when the model is loaded through MLflow; this is
        the model's own check (and the one a direct call gets).
        """
        import dataclasses

        from steps.core.common import InputError
        from steps.decoding.beam import REQUEST_OPTIONS

        changes = {}
        for name in (name for name in REQUEST_OPTIONS if name in params):
            value, whole = params[name], not isinstance(getattr(self.search, name), float)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if whole else numbers.Real):
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
                raise InputError(f"param {name} is {kind_of(value)} ({shown}); expected {'a whole number' if whole else 'a number'}")
            try:
                changes[name] = int(value) if whole else float(value)
            except OverflowError:  # a float param given as an int of hundreds of digits
                raise InputError(f"param {name} is out of range ({str(value)[:20]}...)") from None
        try:
            return dataclasses.replace(self.search, **changes) if changes else self.search
        except ValueError as exc:  # BeamConfig's range checks
            raise InputError(str(exc)) from None

    def check_bounds(self, rows: int, search: Any) -> None:
        """The request against the model's bounds (module docstring); each refusal names the model config key."""
        from steps.core.common import InputError

        bounds = self.bounds
        if rows > bounds["max_rows"]:
            raise InputError(f"the request has {rows} rows; this model takes at most {bounds['max_rows']} per request "
                             "(max_rows in the model config)")
        for name, key in (("beam", "max_beam"), ("eval_len", "max_eval_len")):
            if getattr(search, name) > bounds[key]:
                raise InputError(f"{name} {getattr(search, name)} is over this model's bound of {bounds[key]} ({key} in the model config)")
        work = rows * search.beam * search.eval_len
        if work > bounds["max_request_tokens"]:
            raise InputError(f"the request needs rows x beam x eval_len = {rows} x {search.beam} x {search.eval_len} = {work} "
                             f"search tokens; this model allows at most {bounds['max_request_tokens']} per request "
                             "(max_request_tokens in the model config): send fewer rows or a smaller beam or eval_len")

    def check_lengths(self, texts: list[str], eval_len: int) -> None:
        """An MR longer than the model's query window (seq_len - eval_len, with the request's eval_len) would be cut
        silently; say so instead."""
        from steps.core.common import InputError
        from steps.model.tokenizer import get_tokenizer

        limit = int(self.query_options.get("seq_len", 512)) - eval_len
        tokenizer = get_tokenizer()
        for row, text in enumerate(texts):
            if (n := len(tokenizer.encode(text))) > limit:
                raise InputError(f"the meaning representation in row {row} has {n} tokens; this model takes at most {limit} "
                                 f"(seq_len {self.query_options.get('seq_len', 512)} - eval_len {eval_len})")


mlflow.models.set_model(AdapterModel())
