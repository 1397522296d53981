"""Every numeric option of the trainer and the decoder: 0, a negative value, nan and inf are either valid or
refused in one line with exit status 2, before any compute. The finetune flow's params check reads the same
range table, so the two never disagree."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import tiny_run_args

from pipelines.finetune_config import check_trainer_section
from steps import decode, train
from steps.core.common import InputError
from steps.training.config import LIMITS, build_parser

REPO = Path(__file__).resolve().parents[1]

PROBES = [0, -1, math.nan, math.inf]
INT_OPTIONS = {a.dest for a in build_parser()._actions if a.type is int}


def cases(refused_only: bool = False) -> list[tuple[str, float]]:
    return [(key, value) for key in LIMITS for value in PROBES if not (refused_only and LIMITS[key].admits(value))]


@pytest.mark.parametrize(("key", "value"), cases(refused_only=True))
def test_trainer_refuses_a_bad_value_in_one_line_before_compute(tmp_path, capsys, key, value):
    text = str(int(value)) if math.isfinite(value) else str(value)
    code = None
    try:
        code = train.main(tiny_run_args(tmp_path / "data", tmp_path / "run", **{key: text}))
    except SystemExit as exc:  # argparse refusing "nan" for an int option: its own usage line, status 2
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--{key}" in err or (key in INT_OPTIONS and "invalid int value" in err)
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


@pytest.mark.parametrize(("key", "value"), cases())
def test_flow_params_check_agrees_with_the_trainer(key, value):
    section = {key: int(value) if key in INT_OPTIONS and math.isfinite(value) else value}
    if LIMITS[key].admits(float(value)):
        check_trainer_section(section, "params.yaml")  # no error
    else:
        with pytest.raises(InputError, match=rf"finetune\.{key} = "):
            check_trainer_section(section, "params.yaml")


def test_unknown_key_and_bad_choice_are_named_with_a_suggestion():
    with pytest.raises(InputError) as caught:
        check_trainer_section({"lora_dmi": 8, "scheduler": "warp"}, "params.yaml")
    message = str(caught.value)
    assert "finetune.lora_dmi is not a trainer option (did you mean one of: lora_dim" in message
    assert "finetune.scheduler = 'warp': expected one of linear" in message


@pytest.mark.parametrize(("flag", "value"), [("--length_penalty", "nan"), ("--length_penalty", "inf"), ("--beam", "0"),
                                             ("--repetition_penalty", "0"), ("--eval_len", "0"), ("--min_length", "-1")])
def test_decode_search_options_refused_before_loading_anything(tmp_path, capsys, flag, value):
    argv = ["--data", str(tmp_path / "missing.jsonl"), "--adapter", str(tmp_path / "missing"), flag, value]
    assert decode.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad search option") and err.count("\n") == 1, err


@pytest.mark.parametrize(("change", "expected"), [
    ({"flow": {"torchrun": {"nproc_per_node": "cpu"}}}, "flow.torchrun.nproc_per_node = 'cpu': expected a whole number >= 1"),
    ({"flow": {"torchrun": {"nproc_per_node": "abc"}}}, "flow.torchrun.nproc_per_node = 'abc'"),
    ({"flow": {"retries": -1}}, "flow.retries = -1: expected a whole number >= 0"),
    ({"flow": {"retry_delay_seconds": "soon"}}, "flow.retry_delay_seconds = 'soon'"),
    ({"finetune": {"random_seed": 10**23}}, "finetune.random_seed = 100000000000000000000000: expected a finite number >= 0 and <= 4294967295"),
    ({"finetune": {"random_seed": "1e23"}}, "finetune.random_seed = '1e23': expected a whole number"),  # YAML 1.1 reads 1e23 as a string
])
def test_flow_and_trainer_params_are_typed_and_checked_before_anything_starts(tmp_path, change, expected):
    """Each used to start a run that failed later (three retries of an overflow, 103 s of torchrun launches for 'abc')."""
    import yaml

    from pipelines.finetune_config import load_config

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in change.items():
        for key, value in values.items():
            if isinstance(value, dict):
                params[section][key].update(value)
            else:
                params[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(InputError) as caught:
        load_config(tmp_path / "params.yaml", tmp_path)
    assert expected in str(caught.value)


def test_a_key_given_twice_in_params_yaml_is_refused_naming_both_lines(tmp_path):
    from pipelines.settings import load_params

    (tmp_path / "params.yaml").write_text("finetune:\n  lr: 0.01\n  lora_dim: 4\n  lr: 0.0002\n")
    with pytest.raises(InputError, match=r"params.yaml:4: .*key 'lr' is given twice \(first on line 2\)"):
        load_params(tmp_path / "params.yaml")
