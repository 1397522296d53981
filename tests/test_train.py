"""The trainer end to end on gpt2.tiny: outputs, loss, equivalences (grad_acc, DDP), resume after kill -9, errors."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import pinned_threads, tiny_run_args, write_base

from steps.formats.checkpoints import load_adapter, load_base_weights, load_resume_state, read_tensors
from steps.model.gpt2 import CARDS, GPT2
from steps.model.lora import LoRAConfig
from steps.train import main
from steps.training.data import build_examples, collate, load_encoded
from steps.training.loss import masked_lm_loss

REPO = Path(__file__).resolve().parents[1]


def adapter_tensors(work_dir: Path) -> dict[str, torch.Tensor]:
    return read_tensors(work_dir / "adapter.safetensors")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_training_learns_and_writes_every_output(tmp_path):
    work = tmp_path / "run"
    assert main(tiny_run_args(tmp_path / "data", work, max_step=30, lr=3e-2, log_interval=5, eval_interval=10, save_interval=10)) == 0
    train_log = read_csv(work / "train_log.csv")
    assert [int(r["step"]) for r in train_log] == [5, 10, 15, 20, 25, 30]
    assert float(train_log[-1]["nll"]) < float(train_log[0]["nll"]) - 0.2  # a random tiny base learns slowly, but it learns
    assert all(float(r["loss"]) > float(r["nll"]) for r in train_log)  # label smoothing adds to the NLL here
    valid_log = read_csv(work / "valid_log.csv")
    assert [int(r["step"]) for r in valid_log] == [10, 20, 30]
    valid_losses = [float(r["valid_loss"]) for r in valid_log]
    assert valid_losses == sorted(valid_losses, reverse=True)
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["step_10", "step_20", "step_30"]
    tensors, config = load_adapter(work)
    assert set(tensors) == {f"h.{i}.attn.c_attn.lora_{m}" for i in range(2) for m in "AB"}  # LoRA only, never the base
    assert config["step"] == 30 and config["r"] == 4 and config["alpha"] == 32 and config["model_card"] == "gpt2.tiny"
    assert config["base"]["sha256"] and len(config["base"]["sha256"]) == 64
    assert (work / "best" / "adapter.safetensors").is_file()
    summary = json.loads((work / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["best_valid_loss"] == pytest.approx(min(float(r["valid_loss"]) for r in valid_log))


def test_lora_dim_0_fine_tunes_the_whole_model_as_the_original_default(tmp_path):
    work = tmp_path / "full"
    args = tiny_run_args(tmp_path / "data", work, lora_dim=0, lr=1e-3, max_step=12, log_interval=4, eval_interval=12, save_interval=12)
    assert main(args) == 0
    train_log = read_csv(work / "train_log.csv")
    assert float(train_log[-1]["nll"]) < float(train_log[0]["nll"])
    assert not (work / "adapter.safetensors").exists()  # no LoRA: the output is a whole model in the base's format
    base, tuned = GPT2(CARDS["gpt2.tiny"]), GPT2(CARDS["gpt2.tiny"])
    load_base_weights(base, tmp_path / "data" / "base.safetensors")
    load_base_weights(tuned, work / "model.safetensors")
    changed = {name for (name, a), b in zip(base.state_dict().items(), tuned.state_dict().values()) if not torch.equal(a, b)}
    assert {"h.0.mlp.c_fc.weight", "h.1.attn.c_attn.weight", "wte.weight"} <= changed  # every kind of weight trained


def test_masked_loss_equals_direct_label_smoothed_cross_entropy(tmp_path):
    from helpers import write_encoded

    torch.manual_seed(0)
    model = GPT2(CARDS["gpt2.tiny"], LoRAConfig(r=2, alpha=4))
    pairs = load_encoded(write_encoded(tmp_path / "d.jsonl", 6, seed=3))
    batch = collate(build_examples(pairs, 512))
    eps = 0.1
    loss_sum, nll_sum = masked_lm_loss(model, batch, eps)
    with torch.no_grad():
        logp = F.log_softmax(model(batch["input"]), dim=-1)  # every position, like the original
        nll = -logp.gather(-1, batch["target"].unsqueeze(-1)).squeeze(-1)
        smooth = -logp.mean(dim=-1)
        per_token = (1 - eps) * nll + eps * smooth
        m = batch["mask"]
        expected = (per_token * m).sum() / (m.sum() + 1e-4)  # REFERENCE 4.3 reduction
    assert torch.allclose(loss_sum / (m.sum() + 1e-4), expected, rtol=1e-5)
    assert torch.allclose(nll_sum, (nll * m).sum(), rtol=1e-5)


def test_fixed_padding_gives_the_same_losses_as_dynamic_padding(tmp_path):
    dynamic, fixed = tmp_path / "dyn", tmp_path / "fixed"
    assert main(tiny_run_args(tmp_path / "data", dynamic, max_step=4, seq_len=64)) == 0
    assert main(tiny_run_args(tmp_path / "data", fixed, max_step=4, seq_len=64, pad="fixed")) == 0
    a, b = adapter_tensors(dynamic), adapter_tensors(fixed)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    for r1, r2 in zip(read_csv(dynamic / "train_log.csv"), read_csv(fixed / "train_log.csv")):
        assert float(r1["loss"]) == pytest.approx(float(r2["loss"]), rel=1e-5)


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    full, accumulated = tmp_path / "full", tmp_path / "acc"
    assert main(tiny_run_args(tmp_path / "data", full, max_step=3, train_batch_size=8)) == 0
    assert main(tiny_run_args(tmp_path / "data", accumulated, max_step=3, train_batch_size=4, grad_acc=2)) == 0
    a, b = adapter_tensors(full), adapter_tensors(accumulated)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B"))  # it really trained


def _run(args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "PYTHONPATH": str(REPO)}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(tiny_run_args(tmp_path / "data", single, max_step=3, train_batch_size=8, lora_dropout=0.0)) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "steps.train"]
    result = _run(torchrun + tiny_run_args(tmp_path / "data", ddp, max_step=3, train_batch_size=4, lora_dropout=0.0))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world 2" in result.stdout
    a, b = adapter_tensors(single), adapter_tensors(ddp)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    v1, v2 = read_csv(single / "valid_log.csv"), read_csv(ddp / "valid_log.csv")
    assert float(v1[-1]["valid_loss"]) == pytest.approx(float(v2[-1]["valid_loss"]), rel=1e-5)  # sharded + all-reduced


@pytest.mark.slow
def test_resume_after_kill_equals_an_uninterrupted_run(tmp_path):
    args = dict(max_step=60, save_interval=5, log_interval=5, eval_interval=20, lora_dropout=0.1)
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    with pinned_threads() as env:  # bitwise comparison below: the same thread count here and in the subprocesses
        assert main(tiny_run_args(tmp_path / "data", reference, **args)) == 0
    cmd = [sys.executable, "-m", "steps.train", *tiny_run_args(tmp_path / "data", interrupted, **args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = interrupted / "resume" / "state.pt"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "summary.json").exists(), "the run finished before it could be killed"
    result = _run(cmd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    a, b = adapter_tensors(reference), adapter_tensors(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise, fp32 on CPU
    steps = [int(r["step"]) for r in read_csv(interrupted / "train_log.csv")]
    assert steps == list(range(5, 61, 5))  # no duplicated or lost log rows across the restart


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model_card": "gpt2.xl"}, "--model_card = 'gpt2.xl': expected one of gpt2.sm"),
        ({"lora_dim": 4096}, "exceeds the model width"),
        ({"model_card": "gpt2.sm"}, "does not match model card"),
        ({"train_data": "/nonexistent/train.jsonl"}, "file not found"),
    ],
)
def test_bad_input_fails_before_any_compute(tmp_path, capsys, override, message):
    assert main(tiny_run_args(tmp_path / "data", tmp_path / "run", **override)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_base_for_another_card_names_the_right_card(tmp_path, capsys):
    other = write_base(tmp_path / "md.safetensors", card="gpt2.tiny")
    assert main(tiny_run_args(tmp_path / "data", tmp_path / "run", init_checkpoint=other, model_card="gpt2.sm")) == 2
    assert "pass --model_card gpt2.tiny" in capsys.readouterr().err


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    work = tmp_path / "run"
    code = main(tiny_run_args(tmp_path / "data", work, lr=1e30, warmup_step=0, max_step=20, log_interval=1, save_interval=1))
    assert code == 3
    assert "loss became" in capsys.readouterr().err
    assert not (work / "adapter.safetensors").exists()


def test_divergence_after_good_updates_keeps_their_checkpoints(tmp_path, capsys):
    # Four updates at a sane lr (checkpoints at 2 and 4), then the cycle schedule jumps to 1e30 and the loss blows up.
    work = tmp_path / "run"
    args = tiny_run_args(tmp_path / "data", work, scheduler="cycle", i_steps="0,4,5,20", i_lrs="0.002,0.002,1e30,1e30",
                         warmup_step=0, max_step=None, log_interval=1, eval_interval=100, save_interval=2)
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "loss became" in err and str(work / "resume") in err
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert all(t.isfinite().all() for t in read_tensors(work / "checkpoints" / "step_4" / "adapter.safetensors").values())
    state = load_resume_state(work / "resume" / "state.pt")
    assert state["step"] == 4 and all(t.isfinite().all() for t in state["trainable"].values())
    assert not (work / "adapter.safetensors").exists()


def test_train_and_valid_encoded_differently_are_refused(tmp_path, capsys):
    from steps.encode import main as encode_main

    formatted = tmp_path / "f.jsonl"
    formatted.write_text('{"context": "name : A | Type : pub", "completion": "A is a pub ."}\n' * 4)
    data = tmp_path / "enc"
    assert encode_main(["--input", str(formatted), "--output", str(data / "train.jsonl"), "--add_bos", "--add_eos"]) == 0
    assert encode_main(["--input", str(formatted), "--output", str(data / "valid.jsonl"), "--add_bos"]) == 0
    code = main(tiny_run_args(tmp_path / "data", tmp_path / "run", train_data=data / "train.jsonl", valid_data=data / "valid.jsonl"))
    assert code == 2
    assert "encoded with different settings" in capsys.readouterr().err


def test_frozen_weights_stored_in_bf16_give_the_same_losses_and_grads_as_autocast(tmp_path):
    import copy

    from helpers import write_encoded

    torch.manual_seed(0)
    model = GPT2(CARDS["gpt2.tiny"], LoRAConfig(r=4, alpha=32))
    from steps.model.lora import mark_only_lora_trainable

    mark_only_lora_trainable(model)
    with torch.no_grad():
        for block in model.h:
            block.attn.c_attn.lora_B.normal_(std=0.01)
    stored = copy.deepcopy(model)
    stored.store_frozen_matrices_in(torch.bfloat16)
    assert stored.h[0].mlp.c_fc.weight.dtype == torch.bfloat16 and stored.h[0].ln_1.weight.dtype == torch.float32
    batch = collate(build_examples(load_encoded(write_encoded(tmp_path / "d.jsonl", 6, seed=4)), 512))
    results = []
    for m in (model, stored):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = masked_lm_loss(m, batch, 0.1)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in m.parameters() if p.requires_grad]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.slow
def test_ctrl_c_stops_the_trainer_in_seconds_and_the_rerun_resumes(tmp_path):
    """SIGINT to the trainer's process group (what Ctrl-C sends): a one-line message, exit 130 within seconds,
    the checkpoints kept, and the next run continues from the last one."""
    argv = [sys.executable, "-m", "steps.train", *tiny_run_args(tmp_path / "data", tmp_path / "run", max_step=100000,
                                                               log_interval=1, save_interval=2, eval_interval=100000)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:
        if "| step      4/" in line:
            break
    os.killpg(proc.pid, signal.SIGINT)
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - started < 30
    assert err.strip().splitlines()[-1].startswith("error: interrupted") and "Traceback" not in err
    assert (tmp_path / "run/resume/state.pt").is_file()
    rerun = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    resumed = next((line for line in rerun.stdout if line.startswith("resumed from")), "")
    os.killpg(rerun.pid, signal.SIGINT)
    rerun.communicate(timeout=60)
    assert re.search(r"at update ([2-9]|\d\d+)", resumed), resumed


@pytest.mark.parametrize("override", [{"grad_acc": 10**12}, {"train_batch_size": 10**12}, {"train_batch_size": 41}])
def test_an_update_larger_than_the_training_set_is_refused_in_one_line(tmp_path, capsys, override):
    """--grad_acc 1e12 used to end in a traceback from trying to allocate 8 TB for the epoch plan."""
    assert main(tiny_run_args(tmp_path / "data", tmp_path / "run", **override)) == 2
    err = capsys.readouterr().err
    assert "examples is more than the 40 training examples; lower --train_batch_size or --grad_acc" in err and err.count("\n") == 1
