"""The trainer's configuration: `TrainConfig`, where every option is declared once (the original gpt2_ft.py's
name and default, its type, help, choices, range, and whether it enters the resume fingerprint), and what is
derived from it: the command line, the check of values from the command line or from params.yaml, and the
fingerprint that decides whether a run may resume.

`python -m steps.train` checks its options before any compute, and the finetune flow checks params.yaml's
`finetune` section with the same function before it starts anything, so the two can never disagree.
Adding an option is one `option(...)` field here plus its use.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from steps.core.common import DEFAULT_SEQ_LEN, InputError, sha256_file
from steps.core.runtime import PRECISIONS
from steps.formats.peft import PEFT_WEIGHTS, PEFT_WEIGHTS_BIN
from steps.formats.work_dir import ADAPTER_WEIGHTS
from steps.model.gpt2 import CARDS
from steps.training.optim import NO_SCHEDULE, SCHEDULES, cycle_max_step

CODE_ROOT = Path(__file__).resolve().parents[2]  # the checkout: steps/ lives here
REQUIRED = object()  # the default of an option that has none: the command line must give it


@dataclass(frozen=True)
class Limit:
    """A numeric option's valid range; `low_open`/`high_open` exclude the bound itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        def shown(bound: float) -> str:
            return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"

        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {shown(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {shown(self.high)}")
        return "a finite number " + " and ".join(parts) if parts else "a finite number"

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))


AT_LEAST_ONE = Limit(low=1)
NON_NEGATIVE = Limit(low=0)
POSITIVE = Limit(low=0, low_open=True)
PROBABILITY = Limit(low=0, high=1, high_open=True)


@dataclass(frozen=True)
class Option:
    """What the one declaration of a trainer option says besides its name, type and default (the TrainConfig field).

    `limit`: the range a number must be in (a value outside would crash later, a division by zero at the first
    log line, or worse, train on nothing and report a perfect loss). `fingerprint`: the option changes what is
    computed, so a resume state written under another value is refused (intervals and output paths do not).
    """

    help: str
    group: str
    choices: tuple[str, ...] | None = None
    limit: Limit | None = None
    fingerprint: bool = False


def option(default: Any, help: str, group: str, *, choices: Sequence[str] | None = None, limit: Limit | None = None,
           fingerprint: bool = False, default_factory: Any = None) -> Any:
    """A TrainConfig field that is a trainer option: everything about it in one place."""
    meta = {"option": Option(help, group, tuple(choices) if choices else None, limit, fingerprint), "required": default is REQUIRED}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=None if default is REQUIRED else default, metadata=meta)


DATA, MODEL, OPTIMIZER, RUN = "data", "model", "optimizer and schedule (counted in optimizer updates)", "run"
FAST = "GPU fast path: static shapes and CUDA graphs (docs/training.md#the-gpu-fast-path)"


@dataclass(frozen=True)
class TrainConfig:
    """Every trainer option, declared once: name (the original gpt2_ft.py's), type, default, help, choices, range,
    and whether it enters the resume fingerprint. The command line, the range check, the params.yaml check and
    the fingerprint are all derived from these fields."""

    train_data: str = option(REQUIRED, "encoded training JSONL ({'context': [ids], 'completion': [ids]})", DATA)
    valid_data: str = option(REQUIRED, "encoded validation JSONL", DATA)
    train_batch_size: int = option(8, "examples per micro-batch per process", DATA, limit=AT_LEAST_ONE, fingerprint=True)
    valid_batch_size: int = option(4, "validation examples per batch per process", DATA, limit=AT_LEAST_ONE)
    grad_acc: int = option(1, "micro-batches per optimizer update", DATA, limit=AT_LEAST_ONE, fingerprint=True)
    seq_len: int = option(DEFAULT_SEQ_LEN, "maximum tokens per example (longer ones are truncated)", DATA,
                          limit=Limit(low=2), fingerprint=True)  # one context and one completion token at least
    obj: str = option("clm", "clm: loss on completion tokens only; jlm: on every next token", DATA, choices=("clm", "jlm"),
                      fingerprint=True)
    pad: str = option("batch", "pad each batch to its longest example, or to --seq_len as the original did", DATA,
                      choices=("batch", "fixed"))
    bucket_window: int = option(0, "sort each window of this many shuffled examples by length before batching (less "
                                "padding); 0 keeps plain shuffling", DATA, limit=NON_NEGATIVE, fingerprint=True)
    truncation: str = option("fix", "fix: cut the context from the left so every completion token is trained; reference: "
                             "keep the first seq_len tokens, as the original did", DATA, choices=("fix", "reference"), fingerprint=True)
    model_card: str = option("gpt2.md", "architecture", MODEL, choices=tuple(CARDS), fingerprint=True)
    init_checkpoint: str | None = option(None, "pretrained GPT-2 weights: Hugging Face model.safetensors or pytorch_model.bin", MODEL)
    init_adapter: str | None = option(None, "start LoRA from this adapter (this project's directory, the original trainer's "
                                      "model.<step>.pt, or a PEFT directory) instead of a fresh init; the optimizer starts fresh", MODEL)
    lora_dim: int = option(0, "LoRA rank r; 0 trains the full model, as in the original", MODEL, limit=NON_NEGATIVE, fingerprint=True)
    lora_alpha: float = option(128, "LoRA alpha; the update is scaled by alpha / r", MODEL, limit=POSITIVE, fingerprint=True)
    lora_dropout: float = option(0.0, "dropout on the LoRA branch input", MODEL, limit=PROBABILITY, fingerprint=True)
    lora_targets: str = option("q,v", "which of the fused q,k,v projections get LoRA", MODEL, fingerprint=True)
    lr: float = option(1e-5, "peak learning rate", OPTIMIZER, limit=POSITIVE, fingerprint=True)
    weight_decay: float = option(0.01, "decoupled weight decay, applied after the Adam step", OPTIMIZER, limit=NON_NEGATIVE,
                                 fingerprint=True)
    correct_bias: bool = option(False, "Adam bias correction (off by default, as in the original; its README turns it on)",
                                OPTIMIZER, fingerprint=True)
    adam_epislon: float = option(1e-6, "Adam epsilon (the original's spelling)", OPTIMIZER, limit=POSITIVE, fingerprint=True)
    adam_beta1: float = option(0.9, "Adam decay of the gradient mean", OPTIMIZER, limit=PROBABILITY, fingerprint=True)
    adam_beta2: float = option(0.98, "Adam decay of the squared-gradient mean (the original's default 0.98; its README and "
                               "the paper's recipe use 0.999)", OPTIMIZER, limit=PROBABILITY, fingerprint=True)
    no_decay_bias: bool = option(False, "no weight decay on biases and LayerNorm weights", OPTIMIZER, fingerprint=True)
    scheduler: str = option("linear", "learning-rate schedule; inv_sqrt and dev_perf mean a constant rate, as in the original",
                            OPTIMIZER, choices=SCHEDULES, fingerprint=True)
    warmup_step: int = option(0, "updates of linear warmup", OPTIMIZER, limit=NON_NEGATIVE, fingerprint=True)
    max_step: int | None = option(None, "total updates (default: from --max_epoch)", OPTIMIZER, limit=AT_LEAST_ONE, fingerprint=True)
    max_epoch: int | None = option(None, "epochs, used when --max_step is not given", OPTIMIZER, limit=AT_LEAST_ONE, fingerprint=True)
    i_steps: str = option("0", "cycle schedule: comma-separated update counts", OPTIMIZER, fingerprint=True)
    i_lrs: str = option("0.00025", "cycle schedule: comma-separated learning rates at those updates (absolute; --lr is "
                        "ignored)", OPTIMIZER, fingerprint=True)
    clip: float = option(0.0, "global gradient-norm clipping; 0 turns it off", OPTIMIZER, limit=NON_NEGATIVE, fingerprint=True)
    label_smooth: float = option(0.0, "uniform label smoothing over the vocabulary", OPTIMIZER, limit=PROBABILITY, fingerprint=True)
    precision: str = option("fp32", "autocast precision; LoRA weights and optimizer state stay fp32. auto: bf16 where the "
                            "hardware computes it natively (recent GPUs, CPUs with AVX512-BF16/AMX), else fp32", RUN,
                            choices=PRECISIONS, fingerprint=True)
    device: str = option("auto", "auto: CUDA when available", RUN, choices=("auto", "cpu", "cuda"))
    random_seed: int = option(10, "seeds LoRA init, data order and dropout; with the same seed a resumed run repeats an "
                              "uninterrupted one exactly", RUN, limit=Limit(low=0, high=2**32 - 1), fingerprint=True)  # 1e23 overflowed in torch
    log_interval: int = option(100, "updates between log lines and MLflow metrics", RUN, limit=AT_LEAST_ONE)
    eval_interval: int = option(2000, "updates between validations", RUN, limit=AT_LEAST_ONE)
    save_interval: int = option(500, "updates between checkpoints (adapter + resume state)", RUN, limit=AT_LEAST_ONE)
    work_dir: str = option(None, "output directory", RUN, default_factory=lambda: os.environ.get("PT_OUTPUT_DIR", "gpt2_model"))
    resume: str = option("auto", "auto: continue from work_dir/resume/state.pt when it exists", RUN, choices=("auto", "never"))
    plots_dir: str | None = option(None, "also write train_loss.csv, valid_loss.csv and loss.png here (the pipeline's DVC plots)", RUN)
    summary_file: str | None = option(None, "also write the summary's numbers that compare across runs (best_valid_loss, "
                                             "final_train_loss) as JSON here (the pipeline's DVC metric)", RUN)
    machine_file: str | None = option(None, "also write where the run computed (CPU model and ISA or GPU, torch, threads, "
                                      "precision) here as JSON: results are reproducible to the bit on the same kind of machine", RUN)
    cuda_graphs: str = option("auto", "record each update (forward, backward, AdamW) as CUDA graphs, one per length bucket, "
                              "and replay them. auto: on for a CUDA device when the settings allow it (static shapes, LoRA, not "
                              "fp16), else off; on: the same, and an error where they do not allow it; off: the eager update",
                              FAST, choices=("auto", "on", "off"), fingerprint=True)
    shapes: str = option("auto", "static: pad each micro-batch's length up to a multiple of --length_multiple and its loss "
                         "positions up to a multiple of --loss_multiple (padding weighs 0), the fixed shapes a graph replays; "
                         "dynamic: each batch in its own shape, the reference path; auto: static exactly when CUDA graphs are on",
                         FAST, choices=("auto", "static", "dynamic"), fingerprint=True)
    length_multiple: int = option(16, "static shapes: lengths are rounded up to a multiple of this", FAST, limit=AT_LEAST_ONE,
                                  fingerprint=True)
    loss_multiple: int = option(64, "static shapes: the loss positions of a micro-batch are padded to a multiple of this", FAST,
                                limit=AT_LEAST_ONE, fingerprint=True)


def spec(name: str) -> Option:
    return OPTIONS[name].metadata["option"]


def kind(name: str) -> type:
    """The option's value type: int, float, str or bool (a flag); None is allowed where the field's type says so."""
    return KINDS[str(OPTIONS[name].type)]


def default(name: str) -> Any:
    f = OPTIONS[name]
    return f.default_factory() if f.default_factory is not MISSING else f.default


OPTIONS: dict[str, Field] = {f.name: f for f in fields(TrainConfig)}
KINDS = {"int": int, "int | None": int, "float": float, "float | None": float, "str": str, "str | None": str, "bool": bool}
LIMITS: dict[str, Limit] = {name: spec(name).limit for name in OPTIONS if spec(name).limit is not None}
FINGERPRINT_OPTIONS = [name for name in OPTIONS if spec(name).fingerprint]
# Accepted for command-line compatibility with the original; they do nothing here.
DEAD_OPTIONS = ("platform", "local_rank", "local-rank", "rank", "world_size", "roll_interval", "roll_lr", "roll_step", "eval_epoch")


def build_parser() -> argparse.ArgumentParser:
    """`python -m steps.train`'s command line, derived from TrainConfig's declarations."""
    p = argparse.ArgumentParser(
        prog="python -m steps.train",
        description="Fine-tune GPT-2 with LoRA on encoded NLG data. Same arguments as the original gpt2_ft.py; "
        "launch with torchrun for several processes (gloo on CPU, NCCL on GPU, chosen automatically).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in OPTIONS:
        option_spec, option_kind = spec(name), kind(name)
        group = groups.get(option_spec.group) or groups.setdefault(option_spec.group, p.add_argument_group(option_spec.group))
        help_text = option_spec.help + (f" (one of: {', '.join(option_spec.choices)})" if option_spec.choices else "")
        if option_spec.limit is not None and (option_spec.limit.low is not None or option_spec.limit.high is not None):
            help_text += f" ({option_spec.limit.describe().removeprefix('a finite number ')})"
        if option_kind is bool:
            group.add_argument(f"--{name}", action="store_true", help=help_text)
        else:
            group.add_argument(f"--{name}", type=option_kind, default=default(name), help=help_text,
                               required=OPTIONS[name].metadata["required"])
    groups[RUN].add_argument("--fp16", action="store_true", help="same as --precision fp16 (the original's flag)")
    for dead in DEAD_OPTIONS:
        groups[RUN].add_argument(f"--{dead}", default=None, help=argparse.SUPPRESS)
    return p


def option_problems(values: Mapping[str, Any], name: Any = lambda key: f"--{key}") -> list[str]:
    """What is wrong with `values` (option -> value: its type, choice or range), one message per bad option, named
    by `name(option)`. Keys that are not options are not looked at.

    The trainer's command line and the finetune flow's params.yaml check (`name=lambda k: f"finetune.{k}"`) both
    call it, so the two can never disagree.
    """
    problems = []
    for key, value in values.items():
        if key not in OPTIONS or value is None:
            continue
        option_spec, option_kind = spec(key), kind(key)
        if option_kind is bool:
            ok, expected = isinstance(value, bool), "true or false"
        elif option_kind is str:  # params.yaml may give a scalar or a list (`i_steps: [0, 500]`): the CLI joins them
            ok, expected = isinstance(value, str | int | float | list) and not isinstance(value, bool), "a string"
        else:
            ok = isinstance(value, int if option_kind is int else int | float) and not isinstance(value, bool)
            expected = "a whole number" if option_kind is int else "a number"
        if not ok:
            problems.append(f"{name(key)} = {value!r}: expected {expected}")
        elif option_spec.choices and value not in option_spec.choices:
            problems.append(f"{name(key)} = {value!r}: expected one of {', '.join(option_spec.choices)}")
        elif option_spec.limit is not None and not option_spec.limit.admits(float(value)):
            problems.append(f"{name(key)} = {value!r}: expected {option_spec.limit.describe()}")
    return problems


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The command line as a TrainConfig; a bad choice or a value outside its range is an InputError naming the option."""
    args = build_parser().parse_args(argv)
    if args.fp16:
        args.precision = "fp16"
    values = {name: getattr(args, name) for name in OPTIONS}
    problems = option_problems(values)
    if problems:
        raise InputError("; ".join(problems))
    return TrainConfig(**values)


# ---------------------------------------------------------------------------------------------- resume fingerprint

def module_file(dotted: str) -> Path | None:
    """The source file of a project module (`steps.training.data` -> steps/training/data.py; a package -> its
    __init__.py), or None when it is not one of this checkout's files."""
    if "." not in dotted:
        return None  # steps/__init__.py itself: empty, and no stage's result depends on it
    base = CODE_ROOT.joinpath(*dotted.split("."))
    return next((path for path in (base.with_suffix(".py"), base / "__init__.py") if path.is_file()), None)


def imported_modules(path: Path, packages: tuple[str, ...] = ("steps",)) -> set[str]:
    """The dotted names of the `packages` modules one file imports anywhere in it (inside functions too); in
    `from steps.x import y`, y may be a module, so `steps.x.y` is named as well (`module_file` tells which exist)."""
    dotted: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in packages:
            dotted |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            dotted |= {alias.name for alias in node.names if alias.name.split(".")[0] in packages}
    return dotted


def trainer_sources(entry: str = "steps.train") -> list[Path]:
    """The entry module's file and every steps module it imports, directly or not, packages' __init__ included (read
    from the source, so the flow and the trainer find the same files whatever else their processes have imported)."""
    found: set[Path] = set()
    todo = [entry]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in found:
            continue
        found.add(path)
        todo += imported_modules(path)
    return sorted(found)


def code_sha256() -> str:
    """The trainer's code (steps/train.py and the steps modules it imports): a resume state from other code is
    not resumed. Other modules (decoding, evaluation) may change without invalidating a training."""
    digest = hashlib.sha256()
    for path in trainer_sources():
        digest.update(path.relative_to(CODE_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def adapter_weights(path: str) -> Path:
    """The tensor file of an adapter given as a directory (ours or PEFT's) or as a file."""
    path = Path(path)
    if path.is_dir():
        return next((path / name for name in (ADAPTER_WEIGHTS, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN) if (path / name).is_file()),
                    path / ADAPTER_WEIGHTS)
    return path


def fingerprint(cfg: TrainConfig, world: int | str) -> dict[str, Any]:
    """What makes two trainings the same: settings, world size, the bytes of the data and base, the code.

    The one fingerprint of a run: the trainer stores it in its resume state and resumes only when it is
    equal; the finetune flow resumes its MLflow run only under the same one (`fingerprint_digest`).
    """
    return {
        **{key: getattr(cfg, key) for key in FINGERPRINT_OPTIONS},
        "world_size": world,
        "train_data_sha256": sha256_file(cfg.train_data),
        "valid_data_sha256": sha256_file(cfg.valid_data),
        "init_checkpoint_sha256": sha256_file(cfg.init_checkpoint) if cfg.init_checkpoint else None,
        "init_adapter_sha256": sha256_file(adapter_weights(cfg.init_adapter)) if cfg.init_adapter else None,
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
