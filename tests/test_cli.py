"""Every command-line option of the stages, the flow and the benchmarks explains itself in --help."""

from __future__ import annotations

import importlib

import pytest

# steps.training.config holds the trainer's command line (python -m steps.train).
COMMANDS = ["steps.training.config", "steps.decode", "steps.encode", "steps.prepare", "pipelines.finetune", "pipelines.register",
            "benchmarks.bench_train", "benchmarks.bench_decode"]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_option_has_help_text(module):
    parser = importlib.import_module(module).build_parser()
    undocumented = [action.option_strings or action.dest for action in parser._actions if not action.help]
    assert not undocumented, f"python -m {module} --help shows no text for {undocumented}"
    assert parser.format_help().count("--") >= 2
