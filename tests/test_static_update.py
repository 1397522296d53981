"""The trainer's static-shape update (steps/training/static_update.py) against the dynamic path it must reproduce, the LoRA
dropout rule that makes graphs and resumes exact, and the --cuda_graphs / --shapes choices.

Everything but the capture itself runs on a CPU; the CUDA-only tests (skipped elsewhere) compare replayed graphs with the eager
static step and run only where a CUDA device is present (benchmarks/gpu.sh says how to run them on a GPU box)."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import pinned_threads, tiny_run_args, write_encoded

from steps.core.common import InputError
from steps.formats.checkpoints import read_tensors
from steps.model.gpt2 import CARDS, GPT2
from steps.model.lora import LoRAConfig, LoRADropout, dropout_seed, mark_only_lora_trainable
from steps.train import Trainer, main
from steps.training.config import parse_config, resolve_fast_path
from steps.training.data import build_examples, collate, load_encoded
from steps.training.distributed import Dist
from steps.training.loss import masked_lm_loss, static_lm_loss
from steps.training.static_update import Shapes, static_batch

REPO = Path(__file__).resolve().parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: CUDA graphs are recorded and replayed there only")


def lora_model(seed: int = 0) -> GPT2:
    """gpt2.tiny with LoRA whose B is non-zero, so LoRA's gradients and the adapters' effect are not trivially zero."""
    torch.manual_seed(seed)
    model = GPT2(CARDS["gpt2.tiny"], LoRAConfig(r=4, alpha=32))
    with torch.no_grad():
        for block in model.h:
            block.attn.c_attn.lora_B.normal_(std=0.05)
    mark_only_lora_trainable(model)
    return model


def examples(tmp_path: Path, n: int = 6, seed: int = 3, seq_len: int = 512):
    return build_examples(load_encoded(write_encoded(tmp_path / f"d{seed}.jsonl", n, seed=seed)), seq_len)


def adapter(work_dir: Path) -> dict[str, torch.Tensor]:
    return read_tensors(work_dir / "adapter.safetensors")


# ---------------------------------------------------------------------------------------------- static shapes


def test_static_batch_pads_to_its_buckets_and_keeps_every_loss_position(tmp_path):
    batch_examples = examples(tmp_path)
    dense = collate(batch_examples)
    static = static_batch(batch_examples, Shapes(length_multiple=16, loss_multiple=64, max_length=1024))
    rows, length = dense["input"].shape
    padded_length, padded_positions = static["bucket"]
    assert padded_length % 16 == 0 and length <= padded_length < length + 16
    assert padded_positions == 64 * -(-len(dense["positions"]) // 64)
    assert static["input"].shape == (rows, padded_length) and static["index"].shape == (padded_positions,)
    n = len(dense["positions"])
    # The listed positions are the same tokens in the wider grid, with their targets; the padding slots weigh 0.
    assert torch.equal(static["input"].view(-1)[static["index"][:n]], dense["input"].view(-1)[dense["positions"]])
    assert torch.equal(static["target"][:n], dense["target"].view(-1)[dense["positions"]])
    assert static["weight"][:n].eq(1).all() and static["weight"][n:].eq(0).all()
    assert static["tokens"] == dense["mask"].sum()


def test_a_bucket_never_exceeds_the_model_positions_nor_drops_a_position():
    shapes = Shapes(length_multiple=48, loss_multiple=64, max_length=1024)
    assert shapes.bucket(1000, 10, 1) == (1008, 64)
    assert shapes.bucket(1020, 3000, 4)[0] == 1024  # 1056 would exceed the 1024 positions
    assert shapes.bucket(3, 0, 1) == (48, 48)  # no loss position: one slot at least, never more than rows x length


def test_static_loss_and_gradients_equal_the_dynamic_path(tmp_path):
    """The static formulation (padded length, listed and padded loss positions) against masked_lm_loss, the
    reference: the same sums and the same LoRA gradients to fp32 rounding."""
    batch_examples = examples(tmp_path, n=5)
    results = []
    for loss_fn, batch in ((masked_lm_loss, collate(batch_examples)),
                           (static_lm_loss, static_batch(batch_examples, Shapes(16, 64, 1024)))):
        model = lora_model()
        loss_sum, nll_sum = loss_fn(model, batch, 0.1)
        loss_sum.backward()
        results.append((loss_sum.detach(), nll_sum.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    (loss_a, nll_a, grads_a), (loss_b, nll_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    torch.testing.assert_close(nll_b, nll_a, rtol=1e-6, atol=0)
    assert len(grads_a) == 4 and all(g.abs().sum() > 0 for g in grads_a)
    for a, b in zip(grads_a, grads_b):  # fp32 rounding of sums over other shapes, relative to the gradient's scale
        assert (b - a).abs().max() <= 1e-5 * a.abs().max()


@pytest.mark.parametrize("layout", [dict(train_batch_size=8),
                                    pytest.param(dict(train_batch_size=4, grad_acc=2, clip=0.5), marks=pytest.mark.slow)])
def test_static_training_equals_dynamic_training(tmp_path, layout):
    """The whole trainer, a few updates: the same logged losses and the same adapter as the dynamic path, to fp32
    rounding (the static path also runs the capturable AdamW, whose step size is computed in fp32)."""
    runs = {}
    for shapes in ("dynamic", "static"):
        work = tmp_path / shapes
        assert main(tiny_run_args(tmp_path / "data", work, max_step=6, log_interval=1, shapes=shapes, **layout)) == 0
        runs[shapes] = work
    a, b = adapter(runs["dynamic"]), adapter(runs["static"])
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith("lora_B"))  # it really trained
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    logs = [list(csv.DictReader((runs[s] / "train_log.csv").read_text().splitlines())) for s in ("dynamic", "static")]
    assert len(logs[0]) == len(logs[1]) == 6
    for row_a, row_b in zip(*logs):
        assert float(row_b["loss"]) == pytest.approx(float(row_a["loss"]), rel=1e-5)


def test_a_refused_capture_falls_back_to_the_same_update_eagerly(tmp_path, capsys):
    """When recording the graphs raises (here: a CPU, where torch.cuda.Stream does), the run goes on eagerly with the
    same static update, says so, and ends with the adapter of a run that never tried graphs."""
    eager = tmp_path / "eager"
    assert main(tiny_run_args(tmp_path / "data", eager, max_step=3, shapes="static", lora_dropout=0.1)) == 0
    trainer = Trainer(parse_config(tiny_run_args(tmp_path / "data", tmp_path / "fallback", max_step=3, shapes="static",
                                                 lora_dropout=0.1)), Dist(0, 1, torch.device("cpu")))
    trainer.updater.use_graphs = True  # what --cuda_graphs on asks for on a GPU
    capsys.readouterr()
    trainer.fit()
    assert "eager: the CUDA graphs could not be recorded (RuntimeError: " in capsys.readouterr().out
    assert not trainer.updater.graphs and trainer.updater.optimizer_graph is None
    a, b = adapter(eager), adapter(tmp_path / "fallback")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_in_static_shapes_equal_one_dynamic_process(tmp_path):
    """DDP without DDP's wrapper: each rank's flat gradient all-reduced between the backward and the optimizer step
    (outside any graph) gives the one-process update, as the reference path's DDP does."""
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    assert main(tiny_run_args(tmp_path / "data", single, max_step=3, train_batch_size=8, clip=0.5)) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "steps.train"]
    args = tiny_run_args(tmp_path / "data", ranks, max_step=3, train_batch_size=4, clip=0.5, shapes="static")
    done = subprocess.run(torchrun + args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world 2" in done.stdout and "static shapes" in done.stdout
    a, b = adapter(single), adapter(ranks)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- LoRA dropout


def test_lora_dropout_masks_are_a_function_of_seed_rank_step_and_micro_batch():
    dropout = LoRADropout(0.5).train()
    dropout.generator = torch.Generator()
    x = torch.ones(4, 16, 32)
    global_state = torch.get_rng_state()

    def mask(seed: int, rank: int, step: int, micro: int) -> torch.Tensor:
        dropout.generator.manual_seed(dropout_seed(seed, rank, step, micro))
        return dropout(x) != 0

    assert torch.equal(mask(10, 0, 7, 1), mask(10, 0, 7, 1))
    others = [mask(11, 0, 7, 1), mask(10, 1, 7, 1), mask(10, 0, 8, 1), mask(10, 0, 7, 0)]
    assert all(not torch.equal(mask(10, 0, 7, 1), other) for other in others)
    assert torch.equal(torch.get_rng_state(), global_state)  # torch's global generator is left alone
    kept = mask(10, 0, 7, 1).float().mean().item()
    y = dropout(x)
    assert 0.4 < kept < 0.6 and torch.equal(y[y != 0], torch.full_like(y[y != 0], 2.0))  # inverted scaling


def test_dropout_seed_is_stable_across_processes():
    """A plain hash: resuming in another process (or another Python) must find the same seeds."""
    assert dropout_seed(10, 0, 0, 0) == dropout_seed(10, 0, 0, 0) < 2**63
    code = "from steps.model.lora import dropout_seed; print(dropout_seed(110, 3, 26290, 1))"
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    assert int(other.stdout) == dropout_seed(110, 3, 26290, 1)


def train_until(args: list[str], steps: int) -> None:
    """The trainer's own loop, stopped after `steps` updates: what a crash leaves (checkpoints up to there)."""
    trainer = Trainer(parse_config(args), Dist(0, 1, torch.device("cpu")))
    trainer.work.root.mkdir(parents=True, exist_ok=True)
    trainer.updater.start(lambda: trainer.upcoming_micro_batches(trainer.max_step))
    trainer.model.train()
    while trainer.step < steps:
        trainer.run_one_update()


@pytest.mark.parametrize("shapes", ["dynamic", "static"])
def test_resume_with_lora_dropout_repeats_an_uninterrupted_run_exactly(tmp_path, shapes):
    settings = dict(max_step=8, save_interval=4, log_interval=2, eval_interval=100, lora_dropout=0.1, shapes=shapes)
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    with pinned_threads():
        assert main(tiny_run_args(tmp_path / "data", reference, **settings)) == 0
        train_until(tiny_run_args(tmp_path / "data", interrupted, **settings), steps=6)  # saved at 4, lost 5 and 6
        assert main(tiny_run_args(tmp_path / "data", interrupted, **settings)) == 0
    a, b = adapter(reference), adapter(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: the same masks were drawn after the resume
    no_dropout = tmp_path / "no_dropout"
    with pinned_threads():
        assert main(tiny_run_args(tmp_path / "data", no_dropout, **{**settings, "lora_dropout": 0.0})) == 0
    assert not all(torch.equal(a[k], v) for k, v in adapter(no_dropout).items())  # dropout was really on


def test_a_resume_under_other_shapes_is_refused(tmp_path):
    """The two paths agree to fp32 rounding, not bitwise: a resume state of one is not continued by the other."""
    work = tmp_path / "run"
    assert main(tiny_run_args(tmp_path / "data", work, max_step=2, shapes="static")) == 0
    other = Trainer(parse_config(tiny_run_args(tmp_path / "data", work, max_step=2, shapes="dynamic")), Dist(0, 1, torch.device("cpu")))
    with pytest.raises(InputError, match=r"different settings, data or code \(shapes\)"):
        other.maybe_resume()


@pytest.mark.parametrize("pad", ["batch", "fixed"])
def test_the_planned_buckets_cover_every_update(tmp_path, pad):
    """Graphs are recorded for the buckets of the host-side plan before training: every update must fall in them."""
    args = tiny_run_args(tmp_path / "data", tmp_path / "run", max_step=13, shapes="static", bucket_window=16,
                         length_multiple=8, loss_multiple=16, pad=pad, seq_len=60)
    trainer = Trainer(parse_config(args), Dist(0, 1, torch.device("cpu")))
    planned = trainer.updater.buckets_of(trainer.upcoming_micro_batches(trainer.max_step))
    seen = set()
    for _ in range(trainer.max_step):  # nothing trained: only the batches are built
        seen |= {batch["bucket"] for batch in trainer.next_update_batches()}
    assert seen == planned and len(planned) > 1
    assert all(length == 64 for length, _ in planned) == (pad == "fixed")  # --pad fixed: seq_len 60 rounded up to 8


# ---------------------------------------------------------------------------------------------- the options


def config(**overrides):
    return replace(parse_config(["--train_data", "t", "--valid_data", "v", "--lora_dim", "4"]), **overrides)


@pytest.mark.parametrize(
    ("overrides", "device", "expected"),
    [
        ({}, "cuda", ("on", "static")),
        ({}, "cpu", ("off", "dynamic")),
        ({"shapes": "static"}, "cpu", ("off", "static")),
        ({"shapes": "dynamic"}, "cuda", ("off", "dynamic")),
        ({"precision": "fp16"}, "cuda", ("off", "dynamic")),
        ({"lora_dim": 0}, "cuda", ("off", "dynamic")),
        ({"cuda_graphs": "off"}, "cuda", ("off", "dynamic")),
        ({"cuda_graphs": "off", "shapes": "static"}, "cuda", ("off", "static")),
    ],
)
def test_auto_turns_graphs_on_only_where_they_can_run(overrides, device, expected):
    resolved = resolve_fast_path(config(**overrides), device)
    assert (resolved.cuda_graphs, resolved.shapes) == expected
    assert resolve_fast_path(resolved, device) == resolved  # resolving twice changes nothing


@pytest.mark.parametrize(
    ("overrides", "device", "message"),
    [
        ({"cuda_graphs": "on"}, "cpu", "the run is on cpu, and CUDA graphs need a CUDA device"),
        ({"cuda_graphs": "on", "shapes": "dynamic"}, "cuda", "--shapes dynamic"),
        ({"cuda_graphs": "on", "precision": "fp16"}, "cuda", "use bf16"),
        ({"shapes": "static", "precision": "fp16"}, "cpu", "--shapes static cannot be honoured"),
    ],
)
def test_asking_for_what_cannot_run_is_an_input_error(overrides, device, message):
    with pytest.raises(InputError, match=message):
        resolve_fast_path(config(**overrides), device)


def test_cuda_graphs_on_a_cpu_fails_before_any_compute(tmp_path, capsys):
    work = tmp_path / "run"
    assert main(tiny_run_args(tmp_path / "data", work, device="cpu", cuda_graphs="on")) == 2
    err = capsys.readouterr().err
    assert "--cuda_graphs on cannot be honoured: the run is on cpu" in err and "--cuda_graphs auto" in err
    assert not (work / "checkpoints").exists()


def test_the_multiples_must_be_positive(tmp_path, capsys):
    assert main(tiny_run_args(tmp_path / "data", tmp_path / "run", length_multiple=0)) == 2
    assert "--length_multiple = 0: expected a finite number >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- CUDA only


def cuda_trainer(tmp_path: Path, graphs: str, **overrides) -> Trainer:
    args = tiny_run_args(tmp_path / "data", tmp_path / graphs, device="cuda", shapes="static", cuda_graphs=graphs,
                         lora_dropout=0.1, precision="fp32", **overrides)
    trainer = Trainer(parse_config(args), Dist(0, 1, torch.device("cuda", torch.cuda.current_device())))
    trainer.updater.start(lambda: trainer.upcoming_micro_batches(trainer.max_step))
    trainer.model.train()
    return trainer


@CUDA
def test_replayed_graphs_equal_the_eager_static_update_with_dropout(tmp_path):
    """The same updates eagerly and replayed: philox dropout reseeded per micro-batch draws the same masks."""
    eager, graphed = cuda_trainer(tmp_path, "off", max_step=6), cuda_trainer(tmp_path, "on", max_step=6)
    assert len(graphed.updater.graphs) >= 1 and graphed.updater.optimizer_graph is not None
    for _ in range(6):
        eager.train_update(eager.next_update_batches())
        graphed.train_update(graphed.next_update_batches())
    assert graphed.updater.eager_micro_batches == 0  # every micro-batch was a replay
    for (name, a), b in zip(eager.model.named_parameters(), graphed.model.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(graphed.meter["loss"], eager.meter["loss"], rtol=1e-6, atol=0)


@CUDA
def test_graphs_leave_the_state_as_the_warm_up_found_it(tmp_path):
    """Recording runs every body once for real (the warm-up); the weights and optimizer state must be put back."""
    trainer = cuda_trainer(tmp_path, "off")
    before = copy.deepcopy([p.detach() for p in trainer.trainable])
    graphed = cuda_trainer(tmp_path, "on")
    assert all(torch.equal(a, b) for a, b in zip(before, [p.detach() for p in graphed.trainable]))
    assert all(int(s["step"]) == 0 for s in graphed.optimizer.state.values()) and graphed.meter["tokens"].item() == 0
