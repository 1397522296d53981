"""The benchmark scripts keep measuring the right thing: their loss formulations agree with the trainer's, the FLOP
count matches a FLOP counter, the eos emulation ends hypotheses where it says, and each script runs at a tiny size."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench_decode, bench_train, common
from steps.decode import search_queries
from steps.decoding.beam import BeamConfig
from steps.model.gpt2 import CARDS, GPT2
from steps.model.lora import LoRAConfig, mark_only_lora_trainable
from steps.model.tokenizer import EOS_ID
from steps.training.data import build_examples, collate
from steps.training.loss import LossModule, masked_lm_loss

REPO = Path(__file__).resolve().parents[1]


def random_examples(n: int, seed: int, seq_len: int = 64):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        context = [rng.randrange(50000) for _ in range(rng.randint(3, 20))] + [EOS_ID]
        completion = [rng.randrange(50000) for _ in range(rng.randint(2, 15))] + [EOS_ID]
        pairs.append((context, completion))
    return build_examples(pairs, seq_len)


def tiny_lora_model(seed: int = 0) -> GPT2:
    """gpt2.tiny with LoRA whose B is non-zero, so the adapters change the result (B = 0 at init would hide them)."""
    torch.manual_seed(seed)
    model = GPT2(CARDS["gpt2.tiny"], LoRAConfig(r=4, alpha=32, dropout=0.0))
    with torch.no_grad():
        for block in model.h:
            block.attn.c_attn.lora_B.normal_(std=0.05)
    mark_only_lora_trainable(model)
    return model


# ---------------------------------------------------------------------------------------------- training variants


def test_reference_loss_on_512_padding_equals_the_trainers_loss():
    """(b) pays for padding and a full LM head, but must compute the same loss as (a) (fp32 rounding)."""
    model = tiny_lora_model()
    examples = random_examples(6, seed=1)
    ours = LossModule(model, 0.1).train()
    reference = bench_train.ReferenceLossModule(model, 0.1).train()
    loss_a, nll_a = ours(collate(examples))
    loss_b, nll_b = reference(collate(examples, pad_to=64))
    assert torch.allclose(loss_a, loss_b, rtol=1e-5)
    assert torch.allclose(nll_a, nll_b, rtol=1e-5)
    assert not torch.allclose(loss_a, nll_a, rtol=1e-4)  # label smoothing is really on (small for a random model)


def test_peft_baseline_loss_equals_ours_on_the_same_weights():
    """(c)'s batches (HF label shift, -100 off the loss) and loss give our number when the weights are ours."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = GPT2(CARDS["gpt2.tiny"]).eval()
    cfg = ours.config
    hf = transformers.GPT2LMHeadModel._from_config(
        transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                                n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        attn_implementation="sdpa").eval()
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    state = {f"transformer.{k}": (v.t() if k.endswith(conv1d) else v) for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("lm_head") or k.endswith("attn.bias") for k in missing)
    examples = random_examples(4, seed=3)
    batch = collate(examples)
    with torch.no_grad():
        loss_sum, _ = masked_lm_loss(ours, batch, 0.1)
        hf_mean, tokens = bench_train.hf_loss(hf, bench_train.hf_batch(examples, torch.device("cpu")), 0.1, amp=False)
    assert tokens == batch["mask"].sum()
    assert torch.allclose(hf_mean, loss_sum / batch["mask"].sum(), rtol=1e-5)


def test_flop_formula_matches_a_flop_counter_for_the_frozen_base_and_head():
    """4N per token for a frozen base (no weight gradients) + 4CV per loss position, counted by torch itself."""
    torch.manual_seed(0)
    cfg = CARDS["gpt2.tiny"]
    model = GPT2(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    model.wpe.weight.requires_grad_(True)  # gradients flow through every block's input, none into frozen weights
    examples = random_examples(3, seed=4)
    n = max(len(e.input) for e in examples)
    examples = [e for e in examples if len(e.input) == n] or examples[:1]  # no padding: every position is real
    batch = collate(examples)
    with FlopCounterMode(display=False) as counter:
        loss, _ = masked_lm_loss(model, batch, 0.1)
        loss.backward()
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for op, v in counts.items() if "attention" not in str(op))
    positions = int(batch["mask"].sum())
    expected = bench_train.update_flops(cfg, [len(e.input) for e in examples], positions)
    attention = 6 * cfg.n_layer * cfg.n_embd * sum(len(e.input) * (len(e.input) + 1) for e in examples)
    assert matmuls == expected - attention


# ---------------------------------------------------------------------------------------------- decoding


def test_eos_emulation_ends_every_hypothesis_and_both_modes_agree():
    torch.manual_seed(0)
    base = GPT2(CARDS["gpt2.tiny"]).eval()
    rng = random.Random(5)
    queries = [[rng.randrange(50000) for _ in range(rng.randint(3, 9))] + [EOS_ID] for _ in range(3)]
    queries = queries + queries[:2]  # repeated MRs, as in E2E
    cfg = BeamConfig(beam=4, eval_len=9, length_penalty=0.8, eos_token_ids=(EOS_ID, 628))
    plain = search_queries(base, queries, cfg, batch_size=4, precision="fp32")
    assert all(not h.finished and len(h.tokens) == 9 for h in plain)  # why the emulation exists: a random model never stops
    model = bench_decode.StopAfter(base, 5)
    fast = search_queries(model, queries, cfg, batch_size=4, precision="fp32")
    reference = bench_decode.reference_search(model, queries, cfg)
    assert [h.tokens for h in fast] == [h.tokens for h in reference]
    assert all(h.finished and len(h.tokens) == 5 and h.tokens[-1] == EOS_ID for h in fast)


def test_original_step_zero_runs_the_padded_beams_and_changes_no_prediction():
    torch.manual_seed(0)
    base = GPT2(CARDS["gpt2.tiny"]).eval()
    shapes = []

    class Spy(torch.nn.Module):  # records what the original design sends through the model
        def __init__(self):
            super().__init__()
            self.model, self.config = base, base.config

        def hidden(self, input_ids, **kwargs):
            shapes.append(("hidden", tuple(input_ids.shape)))
            return base.hidden(input_ids, **kwargs)

        def logits(self, hidden):
            shapes.append(("logits", tuple(hidden.shape[:-1])))
            return base.logits(hidden)

    query = [[11, 22, 33, 44, EOS_ID]]
    cfg = BeamConfig(beam=3, eval_len=4, length_penalty=0.8, eos_token_ids=(EOS_ID, 628))
    original = bench_decode.OriginalStepZero(Spy(), beam=3, seq_len=40)
    got = bench_decode.reference_search(original, query, cfg)
    assert shapes[:2] == [("hidden", (3, 40)), ("logits", (3, 40))]  # K copies, padded to seq_len, LM head everywhere
    assert ("hidden", (3, 1)) in shapes  # then ordinary one-token steps
    plain = bench_decode.reference_search(base, query, cfg)
    assert [h.tokens for h in got] == [h.tokens for h in plain]
    assert got[0].score == pytest.approx(plain[0].score, abs=1e-5)


def test_e2e_pairs_fall_back_to_the_generated_sample(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "SHARED_E2E", tmp_path / "absent")
    pairs, source = common.e2e_pairs("test", sample_mrs=5)
    assert source.startswith("generated sample") and len({mr for mr, _ in pairs}) == 5
    encoded = common.encode_e2e(pairs[:2])
    assert all(context[-1] == EOS_ID and completion[-1] == EOS_ID for context, completion in encoded)


@pytest.mark.slow
def test_bench_decode_tiny_run(tmp_path):
    out = tmp_path / "decode.json"
    assert bench_decode.main(["--tiny", "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["stop_after"] for r in rows] == [5, 0]
    assert all(r["identical_share"] == 1.0 and r["speedup"] > 0 for r in rows)  # fp32 both ways: same predictions
    assert all(r["original_identical_share"] == 1.0 for r in rows)  # the original's step 0 changes the cost only
    assert rows[0]["mean_generated_tokens"] == 5 and rows[0]["ended_on_eos_share"] == 1.0
    assert rows[1]["mean_generated_tokens"] == 12  # no emulation: every search runs eval_len steps


def test_bench_decode_rejects_bad_options(capsys):
    assert bench_decode.main(["--tiny", "--stop_after", "soon"]) == 2
    assert "--stop_after" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the scripts, end to end


def _env_one_thread() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_bench_train_tiny_run(tmp_path):
    out = tmp_path / "train.json"
    done = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--tiny", "--variants", "ours_fp32,ours_bucket,reference,peft_fp32",
                           "--out", str(out)], cwd=REPO, env=_env_one_thread(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    results = {r["variant"]: r for r in report["results"]}
    assert all("error" not in r and r["examples_per_s"] > 0 for r in results.values())
    assert results["reference"]["padding_share"] > results["ours_fp32"]["padding_share"] > results["ours_bucket"]["padding_share"]
    assert report["summary"]["parity_nll_abs_diff_fp32"] < 1e-4
    assert "| (b) reference-equivalent" in done.stdout and "bench_train:" in done.stdout


@pytest.mark.slow
def test_gpu_script_tiny_run_on_cpu(tmp_path):
    env = {**_env_one_thread(), "BENCH_TINY": "1", "BENCH_DEVICE": "cpu", "BENCH_OUT": str(tmp_path),
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "4/4 steps done" in done.stdout  # the graph check (skipped tests on a CPU) and the three benchmarks
    assert "== graph_check: ok" in done.stdout  # replayed graphs vs eager (skipped, with their reason, without CUDA)
    for name in ("train_b8.json", "train_b64.json", "decode.json"):
        assert json.loads((tmp_path / name).read_text())["results"]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "train_b8.json").read_text())["results"]}
    assert "CUDA device" in rows["ours_graph"]["skipped"]  # no graphs on a CPU, and the table says why
    static = rows["ours_static"]  # the trainer's static-shape update, the step a graph would record, run eagerly
    assert "error" not in static and static["shapes"] == "static" and static["cuda_graphs"] == "off" and static["examples_per_s"] > 0
    assert "skipped: needs a CUDA device" in done.stdout
