"""steps.training.config: each trainer option is declared once (a TrainConfig field), and the command line, its
`--help`, the value checks of the CLI and of params.yaml, and the resume fingerprint all come from that one
declaration."""

from __future__ import annotations

import math
import re

import pytest

from pipelines.finetune_config import check_trainer_section
from steps.core.common import InputError
from steps.training.config import (
    FINGERPRINT_OPTIONS,
    LIMITS,
    OPTIONS,
    TrainConfig,
    build_parser,
    kind,
    option_problems,
    parse_config,
    spec,
)

REQUIRED = ["--train_data", "t.jsonl", "--valid_data", "v.jsonl"]


def squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)  # argparse wraps help lines at spaces and hyphens


def bad_value(name: str):
    """A value the declaration refuses: below the range, outside the choices, or of the wrong type."""
    limit = spec(name).limit
    if limit is not None and limit.low is not None:
        return limit.low - 1
    if spec(name).choices:
        return "not-a-choice"
    return math.nan if kind(name) in (int, float) else {"a": 1}


def test_the_parser_is_derived_from_the_declarations():
    assert parse_config(REQUIRED) == TrainConfig(train_data="t.jsonl", valid_data="v.jsonl")  # every default from the fields
    parser_options = {action.dest for action in build_parser()._actions if action.help != "==SUPPRESS=="} - {"help", "fp16"}
    assert parser_options == set(OPTIONS)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_reaches_help_the_checks_and_the_fingerprint(name):
    help_text = squeezed(build_parser().format_help())
    declared = spec(name)
    assert f"--{name}" in help_text and squeezed(declared.help) in help_text
    assert all(choice in help_text for choice in declared.choices or ())
    assert (name in FINGERPRINT_OPTIONS) == declared.fingerprint
    assert (name in LIMITS) == (declared.limit is not None)
    value = bad_value(name)
    assert [problem for problem in option_problems({name: value}) if problem.startswith(f"--{name} = ")], value
    with pytest.raises(InputError, match=rf"finetune\.{name} = "):
        check_trainer_section({name: value}, "params.yaml")


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("max_step", 600.0, "expected a whole number"),  # argparse would have refused "600.0" inside the flow
    ("random_seed", True, "expected a whole number"),
    ("lr", "abc", "expected a number"),
    ("correct_bias", "yes", "expected true or false"),
    ("scheduler", "warp", "expected one of linear, constant, cosine"),
    ("model_card", "gpt2.xl", "expected one of gpt2.sm"),
])
def test_params_values_of_the_wrong_type_are_named(key, value, expected):
    with pytest.raises(InputError, match=re.escape(f"finetune.{key} = {value!r}: {expected}")):
        check_trainer_section({key: value}, "params.yaml")


def test_values_params_files_write_are_accepted():
    check_trainer_section({"lora_alpha": 32, "lr": 2e-4, "i_steps": [0, 500], "i_lrs": "0.00025", "correct_bias": True,
                           "max_step": None, "init_adapter": None}, "params.yaml")


def test_a_bad_choice_on_the_command_line_is_one_line_not_a_usage_message():
    with pytest.raises(InputError, match=r"--scheduler = 'warp': expected one of linear"):
        parse_config([*REQUIRED, "--scheduler", "warp"])
