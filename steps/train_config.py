"""The trainer's configuration: its command line (the original gpt2_ft.py names and defaults), the typed
`TrainConfig` built from it, the valid range of every numeric option, and the fingerprint that decides
whether a run may resume.

The range table is the one place those limits live: `python -m steps.train` checks it before any compute,
and the finetune flow checks params.yaml's `finetune` section against it before it starts anything, so
the two can never disagree.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from steps.common import DEFAULT_SEQ_LEN, InputError
from steps.model import CARDS
from steps.optim import NO_SCHEDULE, cycle_max_step

SCHEDULERS = ["linear", "cosine", "cosine_reference", "constant", "cycle", "inv_sqrt", "dev_perf", "none"]
STEPS_DIR = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m steps.train",
        description="Fine-tune GPT-2 with LoRA on encoded NLG data. Same arguments as the original gpt2_ft.py; "
        "launch with torchrun for several processes (gloo on CPU, NCCL on GPU, chosen automatically).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--train_data", required=True, help="encoded training JSONL ({'context': [ids], 'completion': [ids]})")
    data.add_argument("--valid_data", required=True, help="encoded validation JSONL")
    data.add_argument("--train_batch_size", type=int, default=8, help="examples per micro-batch per process")
    data.add_argument("--valid_batch_size", type=int, default=4, help="validation examples per batch per process")
    data.add_argument("--grad_acc", type=int, default=1, help="micro-batches per optimizer update")
    data.add_argument("--seq_len", type=int, default=DEFAULT_SEQ_LEN, help="maximum tokens per example (longer ones are truncated)")
    data.add_argument("--obj", default="clm", choices=["clm", "jlm"], help="clm: loss on completion tokens only; jlm: on every next token")
    data.add_argument("--pad", default="batch", choices=["batch", "fixed"], help="pad each batch to its longest example, or to --seq_len as the original did")
    data.add_argument("--bucket_window", type=int, default=0,
                      help="sort each window of this many shuffled examples by length before batching (less padding); 0 keeps plain shuffling")
    data.add_argument("--truncation", default="fix", choices=["fix", "reference"],
                      help="fix: cut the context from the left so every completion token is trained; reference: keep the first seq_len tokens, as the original did")
    model = p.add_argument_group("model")
    model.add_argument("--model_card", default="gpt2.md", help=f"architecture: {', '.join(CARDS)}")
    model.add_argument("--init_checkpoint", default=None, help="pretrained GPT-2 weights: Hugging Face model.safetensors or pytorch_model.bin")
    model.add_argument("--init_adapter", default=None, help="start LoRA from this adapter (this project's directory, the original "
                       "trainer's model.<step>.pt, or a PEFT directory) instead of a fresh init; the optimizer starts fresh")
    model.add_argument("--lora_dim", type=int, default=0, help="LoRA rank r; 0 trains the full model, as in the original")
    model.add_argument("--lora_alpha", type=float, default=128, help="LoRA alpha; the update is scaled by alpha / r")
    model.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA branch input")
    model.add_argument("--lora_targets", default="q,v", help="which of the fused q,k,v projections get LoRA")
    opt = p.add_argument_group("optimizer and schedule (counted in optimizer updates)")
    opt.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    opt.add_argument("--weight_decay", type=float, default=0.01, help="decoupled weight decay, applied after the Adam step")
    opt.add_argument("--correct_bias", action="store_true", help="Adam bias correction (off by default, as in the original; its README turns it on)")
    opt.add_argument("--adam_epislon", type=float, default=1e-6, help="Adam epsilon (the original's spelling)")
    opt.add_argument("--adam_beta1", type=float, default=0.9, help="Adam decay of the gradient mean")
    opt.add_argument("--adam_beta2", type=float, default=0.98, help="Adam decay of the squared-gradient mean (the "
                     "original's default 0.98; its README and the paper's recipe use 0.999)")
    opt.add_argument("--no_decay_bias", action="store_true", help="no weight decay on biases and LayerNorm weights")
    opt.add_argument("--scheduler", default="linear", choices=SCHEDULERS,
                     help="learning-rate schedule; inv_sqrt and dev_perf mean a constant rate, as in the original")
    opt.add_argument("--warmup_step", type=int, default=0, help="updates of linear warmup")
    opt.add_argument("--max_step", type=int, default=None, help="total updates (default: from --max_epoch)")
    opt.add_argument("--max_epoch", type=int, default=None, help="epochs, used when --max_step is not given")
    opt.add_argument("--i_steps", default="0", help="cycle schedule: comma-separated update counts")
    opt.add_argument("--i_lrs", default="0.00025", help="cycle schedule: comma-separated learning rates at those updates (absolute; --lr is ignored)")
    opt.add_argument("--clip", type=float, default=0.0, help="global gradient-norm clipping; 0 turns it off")
    opt.add_argument("--label_smooth", type=float, default=0.0, help="uniform label smoothing over the vocabulary")
    run = p.add_argument_group("run")
    run.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "auto"],
                     help="autocast precision; LoRA weights and optimizer state stay fp32. auto: bf16 where the hardware "
                     "computes it natively (recent GPUs, CPUs with AVX512-BF16/AMX), else fp32")
    run.add_argument("--fp16", action="store_true", help="same as --precision fp16 (the original's flag)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    run.add_argument("--random_seed", type=int, default=10, help="seeds LoRA init, data order and dropout; with the same "
                     "seed a resumed run repeats an uninterrupted one exactly")
    run.add_argument("--log_interval", type=int, default=100, help="updates between log lines and MLflow metrics")
    run.add_argument("--eval_interval", type=int, default=2000, help="updates between validations")
    run.add_argument("--save_interval", type=int, default=500, help="updates between checkpoints (adapter + resume state)")
    run.add_argument("--work_dir", default=os.environ.get("PT_OUTPUT_DIR", "gpt2_model"), help="output directory")
    run.add_argument("--resume", default="auto", choices=["auto", "never"], help="auto: continue from work_dir/resume/state.pt when it exists")
    run.add_argument("--plots_dir", default=None, help="also write train_loss.csv, valid_loss.csv and loss.png here (the pipeline's DVC plots)")
    run.add_argument("--summary_file", default=None, help="also write the run summary JSON here (the pipeline's DVC metric)")
    run.add_argument("--machine_file", default=None, help="also write where the run computed (CPU model and ISA or GPU, torch, "
                     "threads, precision) here as JSON: results are reproducible to the bit on the same kind of machine")
    fast = p.add_argument_group("GPU fast path: static shapes and CUDA graphs (docs/training.md#the-gpu-fast-path)")
    fast.add_argument("--cuda_graphs", default="auto", choices=["auto", "on", "off"],
                      help="record each update (forward, backward, AdamW) as CUDA graphs, one per length bucket, and replay "
                      "them. auto: on for a CUDA device when the settings allow it (static shapes, LoRA, not fp16), else off; "
                      "on: the same, and an error where they do not allow it; off: the eager update")
    fast.add_argument("--shapes", default="auto", choices=["auto", "static", "dynamic"],
                      help="static: pad each micro-batch's length up to a multiple of --length_multiple and its loss positions "
                      "up to a multiple of --loss_multiple (padding weighs 0), the fixed shapes a graph replays; dynamic: each "
                      "batch in its own shape, the reference path; auto: static exactly when CUDA graphs are on")
    fast.add_argument("--length_multiple", type=int, default=16, help="static shapes: lengths are rounded up to a multiple of this")
    fast.add_argument("--loss_multiple", type=int, default=64,
                      help="static shapes: the loss positions of a micro-batch are padded to a multiple of this")
    # Accepted for command-line compatibility with the original; they do nothing here.
    for dead in ("--platform", "--local_rank", "--local-rank", "--rank", "--world_size", "--roll_interval", "--roll_lr", "--roll_step", "--eval_epoch"):
        run.add_argument(dead, default=None, help=argparse.SUPPRESS)
    return p


@dataclass(frozen=True)
class TrainConfig:
    """Every trainer option, typed; the defaults live in build_parser only (one home)."""

    # data
    train_data: str
    valid_data: str
    train_batch_size: int
    valid_batch_size: int
    grad_acc: int
    seq_len: int
    obj: str
    pad: str
    bucket_window: int
    truncation: str
    # model
    model_card: str
    init_checkpoint: str | None
    init_adapter: str | None
    lora_dim: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str
    # optimizer and schedule
    lr: float
    weight_decay: float
    correct_bias: bool
    adam_epislon: float
    adam_beta1: float
    adam_beta2: float
    no_decay_bias: bool
    scheduler: str
    warmup_step: int
    max_step: int | None
    max_epoch: int | None
    i_steps: str
    i_lrs: str
    clip: float
    label_smooth: float
    # run
    precision: str
    device: str
    random_seed: int
    log_interval: int
    eval_interval: int
    save_interval: int
    work_dir: str
    resume: str
    plots_dir: str | None
    summary_file: str | None
    machine_file: str | None
    # GPU fast path
    cuda_graphs: str
    shapes: str
    length_multiple: int
    loss_multiple: int


@dataclass(frozen=True)
class Limit:
    """A numeric option's valid range; `low_open`/`high_open` exclude the bound itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return "a finite number " + " and ".join(parts) if parts else "a finite number"

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))


AT_LEAST_ONE = Limit(low=1)
NON_NEGATIVE = Limit(low=0)
PROBABILITY = Limit(low=0, high=1, high_open=True)
# Every numeric option and what it admits. A value outside would crash later (a division by zero at the
# first log line) or, worse, train on nothing and report a perfect loss.
LIMITS: dict[str, Limit] = {
    "train_batch_size": AT_LEAST_ONE, "valid_batch_size": AT_LEAST_ONE, "grad_acc": AT_LEAST_ONE,
    "seq_len": Limit(low=2),  # one context and one completion token at least: below that no position has a loss
    "bucket_window": NON_NEGATIVE, "lora_dim": NON_NEGATIVE, "lora_alpha": Limit(low=0, low_open=True),
    "lora_dropout": PROBABILITY, "lr": Limit(low=0, low_open=True), "weight_decay": NON_NEGATIVE,
    "adam_epislon": Limit(low=0, low_open=True), "adam_beta1": PROBABILITY, "adam_beta2": PROBABILITY,
    "warmup_step": NON_NEGATIVE, "max_step": AT_LEAST_ONE, "max_epoch": AT_LEAST_ONE, "clip": NON_NEGATIVE,
    "label_smooth": PROBABILITY, "log_interval": AT_LEAST_ONE, "eval_interval": AT_LEAST_ONE,
    "save_interval": AT_LEAST_ONE, "random_seed": Limit(), "length_multiple": AT_LEAST_ONE, "loss_multiple": AT_LEAST_ONE,
}


def option_problems(values: Mapping[str, Any], name: Any = lambda key: f"--{key}") -> list[str]:
    """What is wrong with `values` (option -> value), one message per bad option, named by `name(option)`.

    The finetune flow passes its params.yaml values with `name=lambda k: f"finetune.{k}"`.
    """
    problems = []
    for key, limit in LIMITS.items():
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not limit.admits(float(value)):
            problems.append(f"{name(key)} = {value!r}: expected {limit.describe()}")
    card_name = values.get("model_card")
    if card_name is not None and card_name not in CARDS:
        problems.append(f"{name('model_card')} = {card_name!r}: unknown model card; expected one of {', '.join(CARDS)}")
    return problems


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The command line as a TrainConfig; a value outside its range is an InputError naming the option."""
    args = build_parser().parse_args(argv)
    if args.fp16:
        args.precision = "fp16"
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    problems = option_problems(values)
    if problems:
        raise InputError("; ".join(problems))
    return TrainConfig(**values)


# ---------------------------------------------------------------------------------------------- resume fingerprint

# Options that change what is computed: a resume state written under other values is refused. Intervals
# and output paths are not among them (changing how often to log does not change the training).
FINGERPRINT_OPTIONS = [
    "train_batch_size", "grad_acc", "clip", "seq_len", "model_card", "lora_dim", "lora_alpha", "lora_dropout",
    "lora_targets", "label_smooth", "lr", "weight_decay", "scheduler", "warmup_step", "max_epoch", "max_step", "obj",
    "random_seed", "correct_bias", "adam_beta1", "adam_beta2", "adam_epislon", "no_decay_bias", "i_steps", "i_lrs",
    "precision", "truncation", "bucket_window", "cuda_graphs", "shapes", "length_multiple", "loss_multiple",
]


def sha256_of(path: str | os.PathLike | None, chunk: int = 1 << 22) -> str | None:
    if not path:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def trainer_sources(entry: str = "train") -> list[Path]:
    """steps/<entry>.py and every steps module it imports, directly or not (read from the source, so the flow
    and the trainer find the same files whatever else their processes have imported)."""
    found: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in found or not (STEPS_DIR / f"{name}.py").is_file():
            continue
        found.add(name)
        tree = ast.parse((STEPS_DIR / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "steps":
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("steps."):
                todo.append(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                todo += [alias.name.split(".")[1] for alias in node.names if alias.name.startswith("steps.")]
    return [STEPS_DIR / f"{name}.py" for name in sorted(found)]


def code_sha256() -> str:
    """The trainer's code (steps/train.py and the steps modules it imports): a resume state from other code is
    not resumed. Other modules (decoding, evaluation) may change without invalidating a training."""
    digest = hashlib.sha256()
    for path in trainer_sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def adapter_weights(path: str) -> Path:
    """The tensor file of an adapter given as a directory (ours or PEFT's) or as a file."""
    path = Path(path)
    if path.is_dir():
        return next((path / name for name in ("adapter.safetensors", "adapter_model.safetensors", "adapter_model.bin")
                     if (path / name).is_file()), path / "adapter.safetensors")
    return path


def fingerprint(cfg: TrainConfig, world: int | str) -> dict[str, Any]:
    """What makes two trainings the same: settings, world size, the bytes of the data and base, the code.

    The one fingerprint of a run: the trainer stores it in its resume state and resumes only when it is
    equal; the finetune flow resumes its MLflow run only under the same one (`fingerprint_digest`).
    """
    return {
        **{key: getattr(cfg, key) for key in FINGERPRINT_OPTIONS},
        "world_size": world,
        "train_data_sha256": sha256_of(cfg.train_data),
        "valid_data_sha256": sha256_of(cfg.valid_data),
        "init_checkpoint_sha256": sha256_of(cfg.init_checkpoint),
        "init_adapter_sha256": sha256_of(adapter_weights(cfg.init_adapter)) if cfg.init_adapter else None,
        "code_sha256": code_sha256(),
    }


def fingerprint_digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def resolve_max_step(cfg: TrainConfig, updates_per_epoch: int) -> int:
    if cfg.scheduler == "cycle":
        return cycle_max_step(cfg.i_steps)  # the original overwrites max_step with the last cycle step
    if cfg.max_step is not None:
        return cfg.max_step
    if cfg.max_epoch is None:
        raise InputError("give --max_step or --max_epoch (the original crashed without either)")
    return cfg.max_epoch * updates_per_epoch


# ---------------------------------------------------------------------------------------------- the GPU fast path


def static_shape_blockers(cfg: TrainConfig) -> list[str]:
    """Why this configuration cannot train in static shapes (empty when it can)."""
    if cfg.precision == "fp16":
        return ["--precision fp16 needs a GradScaler, which decides on the host whether to skip a step; use bf16"]
    return []


def graph_blockers(cfg: TrainConfig, device_type: str) -> list[str]:
    """Why this configuration cannot replay CUDA graphs on this device (empty when it can)."""
    reasons = []
    if device_type != "cuda":
        reasons.append(f"the run is on {device_type}, and CUDA graphs need a CUDA device")
    if cfg.shapes == "dynamic":
        reasons.append("--shapes dynamic asks for each batch in its own shape, and a graph replays fixed shapes")
    if cfg.lora_dim == 0:
        reasons.append("--lora_dim 0 trains the whole model, and the capture saves and restores every trainable tensor "
                       "around its warm-up (graphs are made for LoRA's few)")
    return reasons + static_shape_blockers(cfg)


def resolve_fast_path(cfg: TrainConfig, device_type: str) -> TrainConfig:
    """`--cuda_graphs` and `--shapes` resolved for this device: on/off and static/dynamic, never auto.

    Asking for what cannot be done (graphs on a CPU, static shapes with fp16) is an InputError that says why.
    Resolving resolved values changes nothing, so the trainer may call it on any config.
    """
    blockers = graph_blockers(cfg, device_type)
    if cfg.cuda_graphs == "on" and blockers:
        raise InputError(f"--cuda_graphs on cannot be honoured: {'; '.join(blockers)}. Use --cuda_graphs auto (on wherever "
                         "it can be) or off")
    graphs = "on" if cfg.cuda_graphs in ("on", "auto") and not blockers else "off"
    if cfg.shapes == "static" and static_shape_blockers(cfg):
        raise InputError(f"--shapes static cannot be honoured: {static_shape_blockers(cfg)[0]}")
    shapes = cfg.shapes if cfg.shapes != "auto" else ("static" if graphs == "on" else "dynamic")
    return replace(cfg, cuda_graphs=graphs, shapes=shapes)


def setup_warnings(cfg: TrainConfig, n_trainable: int) -> list[str]:
    """What a user running the trainer by hand may not have meant (the original's defaults), said loudly."""
    warnings = []
    if not cfg.init_checkpoint:
        warnings.append("WARNING: no --init_checkpoint: training starts from RANDOM weights, not a pretrained GPT-2")
    if cfg.lora_dim == 0:
        warnings.append(f"WARNING: --lora_dim 0 fine-tunes the FULL model ({n_trainable:,} trainable parameters); each checkpoint "
                        f"is the whole model, about {4 * n_trainable / 1e9:.2f} GB in fp32. Give --lora_dim 4 for LoRA")
    if cfg.scheduler in NO_SCHEDULE:
        warnings.append(f"warning: --scheduler {cfg.scheduler} means a constant learning rate (as in the original)")
    return warnings
