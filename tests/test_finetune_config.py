"""pipelines/finetune_config.py: params.yaml's finetune and flow sections as the trainer's and torchrun's command
lines, and the stage's refusal of bad params before anything starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_trainer_flags_follow_the_params_section():
    from pipelines.finetune import trainer_argv
    from steps.training.config import parse_config

    section = {"train_data": "t.jsonl", "valid_data": "v.jsonl", "lr": 0.0002, "correct_bias": True, "no_decay_bias": False,
               "max_epoch": None, "max_step": 7, "lora_targets": ["q", "v"], "adam_epislon": 1e-06}
    argv = trainer_argv(section)
    assert argv == ["--train_data", "t.jsonl", "--valid_data", "v.jsonl", "--lr", "0.0002", "--correct_bias", "--max_step", "7",
                    "--lora_targets", "q,v", "--adam_epislon", "1e-06"]
    parsed = parse_config(argv)  # the trainer's own parser is the reference
    assert (parsed.lr, parsed.correct_bias, parsed.no_decay_bias, parsed.max_epoch, parsed.max_step) == (0.0002, True, False, None, 7)


def test_torchrun_command_single_node_and_multi_node():
    from torch.distributed.run import get_args_parser

    from pipelines.finetune import torchrun_argv

    single = torchrun_argv({"nproc_per_node": 2, "nnodes": 1, "node_rank": 0, "master_addr": "", "master_port": 0, "rdzv_endpoint": ""})
    # --standalone meets on localhost: torchrun through the wrapper whose stores listen on loopback only
    assert single[:3] == [sys.executable, "-m", "pipelines.loopback_torchrun"] and single[-2:] == ["-m", "steps.train"]
    args = get_args_parser().parse_args([*single[3:-2], "-m", "steps.train"])
    assert args.standalone and args.nproc_per_node == "2" and args.local_addr == "127.0.0.1"

    multi = torchrun_argv({"nproc_per_node": 8, "nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.1", "master_port": 29500,
                           "rdzv_backend": "", "rdzv_endpoint": "", "rdzv_id": ""})
    assert multi[:3] == [sys.executable, "-m", "torch.distributed.run"]  # another machine's address: torchrun as it is
    args = get_args_parser().parse_args([*multi[3:-2], "-m", "steps.train"])
    assert not args.standalone and args.local_addr is None
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port) == ("2", 1, "10.0.0.1", 29500)


@pytest.mark.parametrize(("torchrun", "loopback"), [
    ({"rdzv_endpoint": "127.0.0.1:29400"}, True), ({"rdzv_endpoint": "[::1]:29400"}, True), ({"rdzv_endpoint": "localhost"}, True),
    ({"master_addr": "127.0.0.2", "master_port": 1}, True), ({}, True),  # no endpoint: --standalone, on localhost
    ({"rdzv_endpoint": "10.0.0.1:29400"}, False), ({"rdzv_endpoint": "node0:29400"}, False), ({"master_addr": "node0"}, False),
])  # fmt: skip
def test_only_a_loopback_rendezvous_keeps_torchrun_on_loopback_and_the_others_are_warned(torchrun, loopback):
    from pipelines.finetune_config import rendezvous_on_loopback
    from pipelines.trainer_launch import exposure_warning

    assert rendezvous_on_loopback(torchrun) == loopback
    if not loopback:  # what the flow prints before it launches torchrun for other machines
        warning = exposure_warning(torchrun)
        assert warning.startswith("warning: torchrun's rendezvous store at ") and "unauthenticated" in warning
        assert torchrun.get("rdzv_endpoint", torchrun.get("master_addr")).split(":")[0] in warning


def test_bad_params_fail_fast_with_status_2(tmp_path, capsys):
    from pipelines.finetune import main

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["flow"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["--params", str(tmp_path / "params.yaml"), "--project_dir", str(tmp_path)]) == 2
    assert "missing section 'flow:'" in capsys.readouterr().err
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["--params", str(tmp_path / "params.yaml"), "--project_dir", str(tmp_path)]) == 2
    assert "does not exist; run the earlier stages first" in capsys.readouterr().err
    assert main(["--params", str(tmp_path / "absent.yaml"), "--project_dir", str(tmp_path)]) == 2
    assert "params file not found" in capsys.readouterr().err


def test_refused_params_under_dvc_say_how_to_get_the_committed_metrics_back(tmp_path, capsys, monkeypatch):
    """`dvc exp run -S finetune.lr=abc` deletes the stage's committed metric and plot files before the stage refuses the
    value (DVC removes outputs first and cannot restore `cache: false` ones): the one line says how to."""
    from pipelines.finetune import main

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["finetune"]["lr"] = "abc"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    argv = ["--params", str(tmp_path / "params.yaml"), "--project_dir", str(tmp_path)]
    assert main(argv) == 2
    assert "git checkout" not in capsys.readouterr().err  # run by hand: nothing was deleted
    monkeypatch.setenv("DVC_STAGE", "finetune")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "finetune.lr = 'abc': expected a number" in err and "`git checkout -- metrics plots` brings them back" in err
    assert err.count("\n") == 1
