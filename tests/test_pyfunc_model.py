"""The served pyfunc model refuses what it should (issue 22): input values that are not strings, request params of
the wrong type, and requests over the bounds its model config states (rows, beam, eval_len, rows x beam x eval_len,
seconds), each in one line with no stack trace; decoding stops when the request's time budget is spent.

One tiny model (a random gpt2.tiny base, an adapter on it, the model config packaging.model_config_for writes) is
saved once with mlflow.pyfunc.save_model, loaded through MLflow as a server loads it, and served once by a real
`mlflow models serve` on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import write_adapter, write_base

MR = "name : The Eagle | Type : coffee shop"
DECODE = {"beam": 2, "length_penalty": 0.8, "no_repeat_ngram_size": 4, "repetition_penalty": 1.0, "eos_token_id": 628,
          "min_length": 0, "eval_len": 8, "seq_len": 128, "batch_size": 4}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """The model saved as the register stage logs it (same code, config, signature), without a tracking store."""
    import mlflow

    from pipelines import packaging
    from pipelines.finetune_config import FinetuneConfig

    root = tmp_path_factory.mktemp("pyfunc-model")
    base = write_base(root / "base.safetensors")
    write_adapter(base, root / "adapter", step=1)
    cfg = FinetuneConfig(root, root / "params.yaml", {}, {"init_checkpoint": str(base), "model_card": "gpt2.tiny", "work_dir": "adapter"},
                         {}, {}, dict(DECODE), "")
    config = packaging.model_config_for(cfg, json.loads((root / "adapter/adapter_config.json").read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(str(root / "model"), python_model=str(packaging.PYFUNC_MODEL_FILE), artifacts={"adapter": str(root / "adapter")},
                                 code_paths=[str(packaging.staged_code(Path(tmp)))], model_config=config,
                                 signature=packaging.model_signature(config), input_example=frame(MR),
                                 pip_requirements=packaging.pip_requirements())
    return {"path": root / "model", "config": config}


def load(path: Path, **overrides):
    """The saved model through mlflow.pyfunc (schema and params checks included), sys.path as it was before."""
    import mlflow

    before = list(sys.path)
    try:
        return mlflow.pyfunc.load_model(str(path), model_config=overrides or None)
    finally:
        sys.path[:] = before  # loading adds the model's code dir


@pytest.fixture(scope="module")
def model(saved):
    return load(saved["path"])


def refusal(call, code: str = "INVALID_PARAMETER_VALUE") -> str:
    """The one-line message of the MlflowException `call` raises (the scoring server answers it with its status)."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as caught:
        call()
    assert caught.value.error_code == code, caught.value.message
    assert "\n" not in caught.value.message and "Traceback" not in caught.value.message
    return caught.value.message


def frame(*values) -> pd.DataFrame:
    return pd.DataFrame({"meaning_representation": list(values)})


def test_the_logged_config_states_the_request_bounds(saved):
    from pipelines.pyfunc_model import BOUND_KEYS

    config = saved["config"]
    assert {key: config[key] for key in BOUND_KEYS} == {
        "max_rows": 256, "max_beam": 16, "max_eval_len": 127, "max_request_tokens": 256 * 2 * 8, "max_request_seconds": 50.0}


@pytest.mark.parametrize(("value", "kind"), [(5, "an int"), (["a", "b"], "a list"), ({"a": 1}, "an object (dict)"), (True, "a boolean"),
                                             (2.5, "a float")])
def test_a_value_that_is_not_a_string_is_refused_naming_its_row_and_type(model, value, kind):
    # As a JSON request arrives: an object column holding whatever each row was (it used to be decoded as str(value)).
    message = refusal(lambda: model.predict(frame(MR, value)))
    assert message == f"row 1 of 'meaning_representation' is {kind}; expected a string (a meaning representation)"
    message = refusal(lambda: model.unwrap_python_model().predict(None, [MR, MR, value]))
    assert message == f"row 2 of the input list is {kind}; expected a string (a meaning representation)"


@pytest.mark.parametrize(("params", "expected"), [
    ({"beam": "abc"}, "param beam is a str ('abc'); expected a whole number"),
    ({"beam": 2.5}, "param beam is a float (2.5); expected a whole number"),
    ({"eval_len": True}, "param eval_len is a boolean (True); expected a whole number"),
    ({"length_penalty": "x"}, "param length_penalty is a str ('x'); expected a number"),
    ({"length_penalty": 10**400}, "param length_penalty is out of range (10000000000000000000...)"),
    ({"beam": 0}, "beam and eval_len must be >= 1 (got beam=0, eval_len=8)"),
    ({"beam": -3}, "beam and eval_len must be >= 1 (got beam=-3, eval_len=8)"),
    ({"min_length": -1}, "min_length and no_repeat_ngram_size must be >= 0 (got -1, 4)"),
])
def test_request_params_of_the_wrong_type_or_range_are_refused_in_one_line(model, params, expected):
    # The model's own check (MLflow's param schema refuses the wrong types first when called through MLflow).
    assert refusal(lambda: model.unwrap_python_model().predict(None, frame(MR), params)) == expected


def test_requests_over_the_bounds_are_refused_naming_the_bound_and_its_config_key(model):
    assert refusal(lambda: model.predict(frame(MR), params={"beam": 1_000_000})) == \
        "beam 1000000 is over this model's bound of 16 (max_beam in the model config)"  # it used to allocate ~20 GB
    assert refusal(lambda: model.predict(frame(MR), params={"eval_len": 10**11})) == \
        "eval_len 100000000000 is over this model's bound of 127 (max_eval_len in the model config)"  # it was a traceback
    assert refusal(lambda: model.predict(frame(*[f"{MR} {i}" for i in range(257)]))) == \
        "the request has 257 rows; this model takes at most 256 per request (max_rows in the model config)"
    message = refusal(lambda: model.predict(frame(*[f"{MR} {i}" for i in range(200)]), params={"beam": 16}))
    assert message.startswith("the request needs rows x beam x eval_len = 200 x 16 x 8 = 25600 search tokens; this model allows at "
                              "most 4096 per request (max_request_tokens in the model config)")
    # The query window counts the request's eval_len, not the stored one (the generation used to fail with a traceback).
    assert refusal(lambda: model.predict(frame("name : X | " * 10), params={"eval_len": 100})) == \
        "the meaning representation in row 0 has 41 tokens; this model takes at most 28 (seq_len 128 - eval_len 100)"
    assert len(model.predict(frame(MR), params={"beam": 16, "eval_len": 4})) == 1  # at the bounds: decoded


def test_a_model_logged_without_bounds_gets_defaults_and_a_load_time_config_can_change_them(saved):
    from pipelines.pyfunc_model import request_bounds
    from steps.core.common import InputError

    old = {key: value for key, value in saved["config"].items() if not key.startswith("max_")}
    assert request_bounds(old) == {key: saved["config"][key] for key in request_bounds(old)}
    assert request_bounds({"beam": 20, "eval_len": 300, "seq_len": 1024})["max_beam"] == 20  # the model's own beam always fits
    assert request_bounds({**old, "max_eval_len": 5000})["max_eval_len"] == 127  # never more than seq_len - 1
    with pytest.raises(InputError, match=r"max_rows = 0: expected a whole number > 0"):
        request_bounds({**old, "max_rows": 0})
    with pytest.raises(InputError, match=r"max_beam = 1 refuses the model's own beam \(2\)"):
        request_bounds({**old, "max_beam": 1})
    strict = load(saved["path"], max_beam=3)
    assert refusal(lambda: strict.predict(frame(MR), params={"beam": 4})) == "beam 4 is over this model's bound of 3 (max_beam in the model config)"


def test_decoding_stops_when_the_time_budget_is_spent(saved, monkeypatch):
    from pipelines.pyfunc_model import SERVER_TIMEOUT_ENV, time_budget

    hurried = load(saved["path"], max_request_seconds=1e-6)
    message = refusal(lambda: hurried.predict(frame(*[f"{MR} {i}" for i in range(12)])), code="DEADLINE_EXCEEDED")  # HTTP 504
    assert message.startswith("the request ran past its 1e-06 s time budget after 4 of 12 distinct inputs (max_request_seconds")
    # The scoring server's own timeout (504 after it, while the work went on): the budget ends at 80% of it.
    monkeypatch.setenv(SERVER_TIMEOUT_ENV, "10")
    assert time_budget({"max_request_seconds": 50.0}) == 8.0 and time_budget({"max_request_seconds": 5.0}) == 5.0
    monkeypatch.delenv(SERVER_TIMEOUT_ENV)
    assert time_budget({"max_request_seconds": 50.0}) == 50.0


def test_an_unexpected_failure_is_one_line_and_its_traceback_stays_in_the_log(model, monkeypatch, caplog):
    monkeypatch.setattr(model.unwrap_python_model(), "model", None)
    assert refusal(lambda: model.predict(frame(MR)), code="INTERNAL_ERROR") == \
        "the model failed on this request (AttributeError); the server's log has the details"
    assert "Traceback" in caplog.text


# ----------------------------------------------------------------------------- the real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.slow
def test_the_server_answers_bad_requests_with_400_in_one_line_without_a_stack_trace(saved, model, tmp_path):
    from pipelines.shell import python_env  # the venv's bin first on PATH: MLflow starts `uvicorn` from it

    port = free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115  (open for the server's whole life)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(saved["path"]), "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)], env=python_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).status == 200:
                    break
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        good = {"dataframe_records": [{"meaning_representation": MR}]}
        assert post(url, good) == (200, json.dumps({"predictions": model.predict(frame(MR))}))
        bad = {
            "row 0 of 'meaning_representation' is an int": {"dataframe_records": [{"meaning_representation": 5}]},
            "row 1 of 'meaning_representation' is an object (dict)": {"dataframe_split": {"columns": ["meaning_representation"],
                                                                                          "data": [[MR], [{"a": 1}]]}},
            "(max_beam in the model config)": {**good, "params": {"beam": 1_000_000}},
            "(max_eval_len in the model config)": {**good, "params": {"eval_len": 10**11}},
            "beam and eval_len must be >= 1": {**good, "params": {"beam": 0}},
        }
        for expected, body in bad.items():
            status, text = post(url, body)
            answer = json.loads(text)
            assert status == 400 and expected in answer["message"], (status, text)
            assert "\n" not in answer["message"] and "stack_trace" not in answer and "Traceback" not in text and ".py" not in text, text
        assert post(url, good) == (200, json.dumps({"predictions": model.predict(frame(MR))}))  # still serving
    finally:
        server.terminate()
        server.wait(30)
        log.close()
