"""Training speed, side by side in one run: this project, the original design, and transformers + peft.

Every variant trains GPT-2 with the paper's E2E recipe (LoRA r=4 on q,v, alpha 32, LoRA dropout 0.1, label
smoothing 0.1, batch 8, lr 2e-4, AdamW with bias correction, linear schedule with 500 warm-up updates) on the same
updates of the same data: the real E2E dev set (../shared/data/e2e/valid.txt) when present, else the generated
sample. Weights are random (no pretrained checkpoint here); speed does not depend on their values.

Variants (each in its own subprocess, so peak memory is per variant):
  ours        (a)  this project at its defaults: steps.train.Trainer.train_update with the pipeline's settings from
                   params.yaml (finetune: precision auto = bf16 where the hardware has it natively, else fp32;
                   bucket_window 1024: length-sorted windows, little padding); batches padded to their own length,
                   LM head and loss only on the loss positions
  ours_fp32   (a)  the trainer's correct-by-construction default: fp32, no bucketing (the same updates as (b) and (c),
                   so its first-batch loss is compared with (b)'s: the fp32 parity check)
  ours_bf16   (a') fp32 default + --precision bf16 (autocast), no bucketing
  ours_bucket (a') fp32 with the pipeline's --bucket_window
  ours_static (a'') the pipeline's defaults + --shapes static --cuda_graphs off: the trainer's static-shape update
                   (lengths rounded up to 16, loss positions to 64, capturable AdamW) run eagerly: what graphs replay,
                   without them
  ours_graph  (a'') the pipeline's defaults + --cuda_graphs on: the trainer's static-shape update recorded as CUDA
                   graphs (forward + backward per bucket, then the optimizer) and replayed. Needs a CUDA device: on a
                   CPU the row is skipped, with that reason
  reference   (b)  reference-equivalent: the same trainer with every sequence padded to 512 (--pad fixed), fp32,
                   no compile, and the loss computed as the original did: LM head and log_softmax on all B x 512
                   positions, then masked
  peft_fp32   (c)  transformers GPT2LMHeadModel (SDPA attention, dropout 0 like the original model) + peft LoRA on
                   the fused c_attn: one rank-4 pair for q, k and v together (so k is adapted too, unlike the recipe's
                   separate q and v pairs; the trainable count is the same, 4rC per layer), dynamic right padding,
                   labels -100 on context and padding, label smoothing over the full logits as HF's Trainer does,
                   torch AdamW (fused), fp32
  peft_bf16   (c)  the same under bf16 autocast; "(c) at its best" is the faster of the two

Every unbucketed variant sees exactly the same examples in each update (the plan of steps.training.data.epoch_updates); the
bucketed ones (ours, ours_bucket, ours_static, ours_graph) see the trainer's bucketed plan of the same data. examples/s compare
directly either way (every update holds `--batch` examples). The first `--warmup` updates are not timed.

FLOPs (for achieved TFLOP/s and model FLOPs utilisation, MFU = achieved / the card's dense bf16 peak). Per update,
over the real (non-padding) tokens only, with L layers, width C, vocabulary V, sequence lengths n_i and P loss
positions:
    4 * (12 L C^2) * sum(n_i)       the frozen base: 2N forward + 2N backward for the input gradients only (no
                                    weight gradients), N = 12 L C^2 weights in the matmuls (not 6N: nothing of the
                                    base is trained; LoRA adds about 0.3% and is left out)
  + 4 * C * V * P                   the tied LM head on the loss positions: forward and input-gradient backward
  + 6 * L * C * sum(n_i (n_i + 1))  causal attention: QK^T and AV, 4 n C per token forward over n/2 keys on average,
                                    backward twice the forward
Padding and the LM head on non-loss positions are not counted: they are not useful work.

    .venv/bin/python benchmarks/bench_train.py                              # CPU: gpt2.sm, batch 8, (a) (a') (b) (c)
    .venv/bin/python benchmarks/bench_train.py --device cuda --model_card gpt2.md --batch 64 --variants ours,ours_graph,peft_bf16
    .venv/bin/python benchmarks/bench_train.py --tiny                       # seconds: gpt2.tiny, 2 timed updates
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script: `benchmarks`, `steps` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from benchmarks import common
from steps.core.common import InputError
from steps.model.gpt2 import CARDS, GPT2, GPT2Config, card
from steps.model.tokenizer import EOS_ID
from steps.training.data import Example, build_examples, epoch_updates


def pipeline_defaults() -> dict[str, Any]:
    """The finetune settings of params.yaml that change speed (the single source of the pipeline's defaults)."""
    defaults = {"precision": "fp32", "pad": "batch", "bucket_window": 0}  # the trainer CLI's, if params.yaml is absent
    path = common.REPO / "params.yaml"
    if path.is_file():
        finetune = yaml.safe_load(path.read_text()).get("finetune", {})
        defaults.update({k: finetune[k] for k in defaults if finetune.get(k) is not None})
    return defaults


PIPELINE = pipeline_defaults()
VARIANTS = {
    "ours": f"(a) ours, pipeline defaults ({PIPELINE['precision']}, bucket_window {PIPELINE['bucket_window']})",
    "ours_fp32": "(a) ours, fp32, no bucketing",
    "ours_bf16": "(a') ours, bf16, no bucketing",
    "ours_bucket": f"(a') ours, fp32, bucket_window {PIPELINE['bucket_window']}",
    "ours_static": f"(a'') ours, pipeline defaults ({PIPELINE['precision']}, bucket_window {PIPELINE['bucket_window']}) + static shapes, eager",
    "ours_graph": f"(a'') ours, pipeline defaults ({PIPELINE['precision']}, bucket_window {PIPELINE['bucket_window']}) + CUDA graphs",
    "reference": "(b) reference-equivalent (pad 512, fp32, full LM head)",
    "peft_fp32": "(c) transformers + peft, fp32",
    "peft_bf16": "(c) transformers + peft, bf16 autocast",
}
CPU_DEFAULT = "ours,ours_fp32,ours_bf16,ours_bucket,reference,peft_fp32,peft_bf16"
GPU_DEFAULT = "ours,ours_fp32,ours_static,ours_graph,reference,peft_bf16"
NEEDS_CUDA = {"ours_graph": "needs a CUDA device (CUDA graphs); this run is on {device}"}

# The paper's E2E recipe (the LoRA README's GPT-2 M run); the schedule length is its 5 epochs.
RECIPE = dict(lora_dim=4, lora_alpha=32, lora_dropout=0.1, label_smooth=0.1, lr=2e-4, weight_decay=0.01,
              adam_beta1=0.9, adam_beta2=0.999, adam_epislon=1e-6, warmup_step=500, max_step=26290, seq_len=512)
PAPER_UPDATES = 26290
# The trainer's settings per variant: --precision (auto is resolved per device), --pad, --bucket_window, --shapes,
# --cuda_graphs. Every variant but peft's times steps.train.Trainer.train_update itself.
DEFAULTS = (PIPELINE["precision"], PIPELINE["pad"], int(PIPELINE["bucket_window"]))
TRAINER_VARIANTS = {
    "ours": (*DEFAULTS, "dynamic", "off"),
    "ours_fp32": ("fp32", "batch", 0, "dynamic", "off"), "ours_bf16": ("bf16", "batch", 0, "dynamic", "off"),
    "ours_bucket": ("fp32", "batch", int(PIPELINE["bucket_window"]), "dynamic", "off"),
    "ours_static": (*DEFAULTS, "static", "off"), "ours_graph": (*DEFAULTS, "static", "on"),
    "reference": ("fp32", "fixed", 0, "dynamic", "off"),
}


# ---------------------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=None, help=f"comma-separated, from {', '.join(VARIANTS)} "
                   f"(default on CPU: {CPU_DEFAULT}; on GPU: {GPU_DEFAULT})")
    p.add_argument("--model_card", default="gpt2.sm", help=f"architecture: {', '.join(CARDS)} (default gpt2.sm)")
    p.add_argument("--batch", type=int, default=8, help="examples per update (default 8, the paper's)")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates first, per variant (default 3)")
    p.add_argument("--updates", type=int, default=10, help="timed updates per variant (default 10)")
    p.add_argument("--ref_warmup", type=int, default=2, help="untimed updates of the slow reference variant (default 2)")
    p.add_argument("--ref_updates", type=int, default=3, help="timed updates of the reference variant (default 3; ~24 s "
                   "each for the original on 2 CPU cores)")
    p.add_argument("--rounds", type=int, default=1, help="run every variant this many times, rounds interleaved, and "
                   "keep each one's fastest (for shared, noisy machines; default 1)")
    p.add_argument("--data", default=None, help="E2E MR||ref text file to train on (default: ../shared/data/e2e/valid.txt, "
                   "else the generated sample)")
    p.add_argument("--max_examples", type=int, default=0, help="use only the first N examples (0: all)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per variant (0: torch's default)")
    p.add_argument("--seed", type=int, default=110, help="data order and init seed (default 110, the README's)")
    p.add_argument("--peak_tflops", type=float, default=None, help="the card's dense bf16 peak for MFU (default: looked "
                   "up from the GPU name)")
    p.add_argument("--tiny", action="store_true", help="smoke-test size: gpt2.tiny, 1+2 updates (reference 1+1), 64 examples")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/out/train_<device>_<card>_b<batch>.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--settings", default=None, help=argparse.SUPPRESS)  # internal: the worker's settings file
    return p


def apply_tiny(args: argparse.Namespace) -> None:
    args.model_card, args.warmup, args.updates, args.ref_warmup, args.ref_updates = "gpt2.tiny", 1, 2, 1, 1
    args.max_examples = args.max_examples or 64


# ---------------------------------------------------------------------------------------------- FLOPs


def update_flops(cfg: GPT2Config, lengths: list[int], loss_positions: int) -> float:
    """Model FLOPs of one update (see the module docstring): frozen base 4N per token, LM head, causal attention."""
    L, C, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size
    base = 4 * 12 * L * C * C * sum(lengths)
    head = 4 * C * V * loss_positions
    attention = 6 * L * C * sum(n * (n + 1) for n in lengths)
    return float(base + head + attention)


# ---------------------------------------------------------------------------------------------- the plan


def update_plan(examples: list[Example], batch: int, seed: int, count: int, bucket_window: int = 0) -> list[list[int]]:
    """The example indices of the first `count` updates, exactly as the trainer orders them (epochs 1, 2, ...)."""
    lengths = [len(e.input) for e in examples]
    plan: list[list[int]] = []
    epoch = 1
    while len(plan) < count:
        plan += [update[0] for update in epoch_updates(lengths, batch, 1, 0, seed, epoch, bucket_window=bucket_window)]
        epoch += 1
    return plan[:count]


def plan_counts(examples: list[Example], plan: list[list[int]]) -> dict[str, list[int]]:
    """Per update: real tokens, loss positions and the per-example lengths (for FLOPs)."""
    return {
        "tokens": [sum(len(examples[i].input) for i in u) for u in plan],
        "loss_positions": [sum(sum(examples[i].mask) for i in u) for u in plan],
        "padded_tokens": [len(u) * max(len(examples[i].input) for i in u) for u in plan],
    }


# ---------------------------------------------------------------------------------------------- our trainer


class ReferenceLossModule(nn.Module):
    """The original's loss: LM head and log_softmax on every position of the padded batch, then the mask.

    Returns the same (loss sum, nll sum) pair as steps.train.LossModule, so the trainer's update uses it unchanged.
    """

    def __init__(self, model: GPT2, label_smooth: float):
        super().__init__()
        self.model = model
        self.label_smooth = label_smooth

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, _ = self.model.hidden(batch["input"])
        logprobs = F.log_softmax(self.model.logits(hidden).float(), dim=-1)
        nll = -logprobs.gather(-1, batch["target"].unsqueeze(-1)).squeeze(-1)
        eps = self.label_smooth if self.training else 0.0
        loss = (1.0 - eps) * nll - eps * logprobs.mean(dim=-1) if eps > 1e-4 else nll
        mask = batch["mask"]
        return (loss * mask).sum(), (nll * mask).sum()


def trainer_args(encoded: Path, settings: dict[str, Any], variant: str, work_dir: str):
    from steps.training.config import parse_config
    from steps.training.distributed import resolve_precision

    precision, pad, bucket_window, shapes, graphs = TRAINER_VARIANTS[variant]
    precision = resolve_precision(precision, torch.device(settings["device"]))  # as steps.train.main does
    argv = ["--shapes", shapes, "--cuda_graphs", graphs, "--train_data", str(encoded), "--valid_data", str(encoded),
            "--model_card", settings["model_card"],
            "--train_batch_size", str(settings["batch"]), "--random_seed", str(settings["seed"]), "--correct_bias",
            "--precision", precision, "--pad", pad, "--bucket_window", str(bucket_window), "--work_dir", work_dir,
            "--device", settings["device_type"], "--scheduler", "linear", "--log_interval", "1000000", "--eval_interval", "1000000"]
    for key, value in RECIPE.items():
        argv += [f"--{key}", str(value)]
    return parse_config(argv)


def make_trainer(settings: dict[str, Any], variant: str, work_dir: str):
    from steps.train import Trainer
    from steps.training.distributed import Dist

    args = trainer_args(Path(settings["encoded"]), settings, variant, work_dir)
    return Trainer(args, Dist(0, 1, torch.device(settings["device"])))


@torch.no_grad()
def first_batch_loss(loss_module: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Token-mean NLL of one batch without dropout: the fp32 parity number between variants (same init seed)."""
    loss_module.eval()
    _, nll_sum = loss_module(batch)
    loss_module.train()
    return (nll_sum / batch["mask"].sum()).item()


def run_trainer_variant(variant: str, settings: dict[str, Any], plan: list[list[int]], work_dir: str) -> dict[str, Any]:
    """(a), (a'), (a''), (b): time Trainer.train_update on the trainer's own batches (collate and transfer included).

    With static shapes, the trainer's updater starts as in Trainer.fit; with graphs, every bucket of the timed updates
    is recorded before the clock starts, and the record time is scaled to the buckets of the paper's whole run.
    """
    trainer = make_trainer(settings, variant, work_dir)
    if [u[0] for u in trainer.epoch_plan(1)[: len(plan)]] != plan[: trainer.updates_per_epoch]:
        raise RuntimeError("the trainer's update plan differs from the benchmark's: the variants would not see the same data")
    static = trainer.cfg.shapes == "static"
    if variant == "reference":
        trainer.updater.loss_module = ReferenceLossModule(trainer.model, trainer.cfg.label_smooth)
    trainer.model.train()
    parity = None
    if trainer.cfg.precision == "fp32" and not static:
        parity = first_batch_loss(trainer.updater.loss_module, trainer.next_update_batches()[0])
        trainer.update_in_epoch = 0  # replay the plan from its first update
    warmup, timed = settings["warmup"], settings["updates"]
    graphs = start_static_updater(trainer, warmup + timed)
    if static:  # the positions a static update computes: rows x the length bucket
        graphs["padded_tokens"] = [len(u) * trainer.updater.shapes.bucket(max(trainer.lengths[i] for i in u), 0, len(u))[0]
                                   for u in plan[warmup : warmup + timed]]
    times = time_updates(lambda: trainer.train_update(trainer.next_update_batches()), warmup, timed, trainer.env.device)
    meter = trainer.meter
    return {"times": times, "mean_loss": (meter["loss"] / meter["tokens"]).item(), "parity_nll": parity,
            "trainable_params": sum(p.numel() for p in trainer.trainable), "precision": trainer.cfg.precision,
            "shapes": trainer.cfg.shapes, "cuda_graphs": trainer.cfg.cuda_graphs, **graphs}


def start_static_updater(trainer, updates: int) -> dict[str, Any]:
    """Start the static-shape updater as Trainer.fit does; with graphs, the numbers of the recording."""
    if trainer.cfg.shapes != "static":
        return {}
    use_graphs = trainer.updater.use_graphs
    trainer.updater.start(lambda: trainer.upcoming_micro_batches(updates))
    if not use_graphs:
        return {"graphs": 0}
    graphs = len(trainer.updater.graphs)
    paper_buckets = len(trainer.updater.buckets_of(trainer.upcoming_micro_batches(PAPER_UPDATES)))  # host-side plan only
    return {"graphs": graphs, "graph_build_s": round(trainer.updater.build_seconds, 2),
            "paper_run_graphs": paper_buckets,
            "paper_run_graph_build_s": round(trainer.updater.build_seconds / max(graphs, 1) * paper_buckets, 2)}


# ---------------------------------------------------------------------------------------------- transformers + peft


def peft_model(cfg: GPT2Config, device: torch.device, seed: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    hf_config = HFConfig(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, layer_norm_epsilon=cfg.layer_norm_epsilon,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # the original GPT-2 of the recipe has no dropout
    torch.manual_seed(seed)
    base = GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa")
    lora = LoraConfig(r=RECIPE["lora_dim"], lora_alpha=RECIPE["lora_alpha"], lora_dropout=RECIPE["lora_dropout"],
                      target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    return get_peft_model(base, lora).to(device).train()


def hf_batch(examples: list[Example], device: torch.device) -> dict[str, torch.Tensor]:
    """What a right-padding data collator gives: ids padded with eos, attention mask, labels -100 off the loss."""
    T = max(len(e.input) for e in examples)
    ids = torch.full((len(examples), T), EOS_ID, dtype=torch.long)
    attention = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input)
        ids[row, :n] = torch.tensor(e.input)
        attention[row, :n] = 1
        trained = torch.tensor(e.mask[: n - 1], dtype=torch.bool)  # position t trains token t+1 (HF shifts inside)
        labels[row, 1:n] = torch.where(trained, ids[row, 1:n], -100)
    return {k: v.to(device, non_blocking=True) for k, v in {"input_ids": ids, "attention_mask": attention, "labels": labels}.items()}


def hf_loss(model: nn.Module, batch: dict[str, torch.Tensor], label_smooth: float, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean label-smoothed loss over the full logits, as HF's Trainer computes it; and the loss token count."""
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=label_smooth)
    return loss, (labels != -100).sum()


def run_peft_variant(variant: str, settings: dict[str, Any], examples: list[Example], plan: list[list[int]]) -> dict[str, Any]:
    """(c): a plain transformers + peft loop with their best ordinary settings."""
    from transformers import get_linear_schedule_with_warmup

    device = torch.device(settings["device"])
    model = peft_model(card(settings["model_card"]), device, settings["seed"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_torch_adamw(trainable, device)
    scheduler = get_linear_schedule_with_warmup(optimizer, RECIPE["warmup_step"], RECIPE["max_step"])
    amp = variant == "peft_bf16"
    meter = {"loss": torch.zeros((), device=device), "tokens": torch.zeros((), device=device)}
    queue = iter(plan)

    def one_update() -> None:
        loss, tokens = hf_loss(model, hf_batch([examples[i] for i in next(queue)], device), RECIPE["label_smooth"], amp)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        meter["loss"] += loss.detach() * tokens
        meter["tokens"] += tokens

    times = time_updates(one_update, settings["warmup"], settings["updates"], device)
    return {"times": times, "mean_loss": (meter["loss"] / meter["tokens"]).item(), "parity_nll": None,
            "trainable_params": sum(p.numel() for p in trainable)}


def make_torch_adamw(params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """torch's AdamW, fused when this build has the kernel for the device (the fastest of its modes)."""
    kwargs = dict(lr=RECIPE["lr"], betas=(RECIPE["adam_beta1"], RECIPE["adam_beta2"]), eps=RECIPE["adam_epislon"],
                  weight_decay=RECIPE["weight_decay"])
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


# ---------------------------------------------------------------------------------------------- timing and the worker


def time_updates(one_update: Callable[[], None], warmup: int, timed: int, device: torch.device) -> list[float]:
    """Seconds per timed update. On a GPU only the total is exact (no sync per update): each entry is the mean."""
    for _ in tqdm(range(warmup), desc="warm-up", leave=False, file=sys.stderr, disable=warmup < 2):
        one_update()
    common.sync(device)
    times = []
    started = time.perf_counter()
    for _ in tqdm(range(timed), desc="timed", leave=False, file=sys.stderr):
        t0 = time.perf_counter()
        one_update()
        if device.type == "cpu":
            times.append(time.perf_counter() - t0)
    common.sync(device)
    total = time.perf_counter() - started
    return times if device.type == "cpu" else [total / timed] * timed


def run_worker(variant: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One variant in this process; returns its measured numbers."""
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    device = torch.device(settings["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the reference-equivalent and parity runs)
        torch.cuda.reset_peak_memory_stats(device)
    is_reference = variant == "reference"
    settings = {**settings, "warmup": settings["ref_warmup"] if is_reference else settings["warmup"],
                "updates": settings["ref_updates"] if is_reference else settings["updates"]}
    records = [json.loads(line) for line in Path(settings["encoded"]).read_text().splitlines()]
    pairs = [(r["context"], r["completion"]) for r in records]
    examples = build_examples(pairs, RECIPE["seq_len"])
    bucket_window = TRAINER_VARIANTS[variant][2] if variant in TRAINER_VARIANTS else 0
    plan = update_plan(examples, settings["batch"], settings["seed"], settings["warmup"] + settings["updates"], bucket_window)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as work_dir:
        if variant in TRAINER_VARIANTS:
            measured = run_trainer_variant(variant, settings, plan, work_dir)
        else:
            measured = run_peft_variant(variant, settings, examples, plan)
    measured["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                else common.peak_rss_mib())
    counts = plan_counts(examples, plan[settings["warmup"]:])
    return summarise(variant, settings, measured, counts, examples, plan[settings["warmup"]:])


def summarise(variant: str, settings: dict[str, Any], measured: dict[str, Any], counts: dict[str, list[int]],
              examples: list[Example], timed_plan: list[list[int]]) -> dict[str, Any]:
    times = measured.pop("times")
    seconds = sum(times)
    n = len(times)
    cfg = card(settings["model_card"])
    flops = sum(update_flops(cfg, [len(examples[i].input) for i in u], lp) for u, lp in zip(timed_plan, counts["loss_positions"]))
    computed = measured.pop("padded_tokens", counts["padded_tokens"])
    computed = computed if variant != "reference" else [len(u) * RECIPE["seq_len"] for u in timed_plan]
    result = {
        "variant": variant, "label": VARIANTS[variant].replace("(auto,", f"(auto = {measured.get('precision')},"),
        "timed_updates": n, "seconds": round(seconds, 3),
        "ms_per_update": 1000 * seconds / n, "ms_per_update_median": 1000 * statistics.median(times),
        "examples_per_s": settings["batch"] * n / seconds, "tokens_per_s": sum(counts["tokens"]) / seconds,
        "padding_share": 1 - sum(counts["tokens"]) / sum(computed),
        "achieved_tflops": flops / seconds / 1e12, "model_flops_per_update": flops / n, **measured,
    }
    peak = settings.get("peak_tflops")
    result["mfu"] = result["achieved_tflops"] / peak if peak else None
    return result


# ---------------------------------------------------------------------------------------------- the parent


def run_variant(variant: str, settings_file: Path, result_file: Path) -> dict[str, Any]:
    """Run one variant in a fresh interpreter (its own peak memory), its progress bars on our stderr."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--settings", str(settings_file)]
    done = subprocess.run([*cmd, "--out", str(result_file)], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0 or not result_file.is_file():
        return {"variant": variant, "label": VARIANTS[variant], "error": f"worker exited with status {done.returncode}"}
    return json.loads(result_file.read_text())


def skipped_variant(variant: str, device_type: str) -> dict[str, Any] | None:
    """A row for a variant this device cannot run (CUDA graphs on a CPU), with the reason; None when it can run."""
    if variant in NEEDS_CUDA and device_type != "cuda":
        return {"variant": variant, "label": VARIANTS[variant], "skipped": NEEDS_CUDA[variant].format(device=device_type)}
    return None


def measured(result: dict[str, Any] | None) -> bool:
    return bool(result) and "error" not in result and "skipped" not in result


def best_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of a variant's rounds (on a shared machine the slower ones measured other people's load)."""
    good = [r for r in runs if measured(r)]
    if not good:
        return runs[0]
    best = dict(max(good, key=lambda r: r["examples_per_s"]))
    best["rounds_examples_per_s"] = [round(r["examples_per_s"], 4) for r in good]
    return best


def ratios(results: dict[str, dict[str, Any]], device_type: str) -> dict[str, Any]:
    """The issue's target ratios from this run's numbers (None where a variant is missing or failed)."""
    def ok(name: str) -> dict[str, Any] | None:
        r = results.get(name)
        return r if measured(r) else None

    ours = ok("ours")
    candidates = [ok(name) for name in VARIANTS if name.startswith("ours")]
    fastest_ours = max((r for r in candidates if r), key=lambda r: r["examples_per_s"], default=None)
    peft = [r for r in (ok("peft_fp32"), ok("peft_bf16")) if r]
    best_peft = max(peft, key=lambda r: r["examples_per_s"]) if peft else None
    ref = ok("reference")
    out: dict[str, Any] = {
        "best_ours": fastest_ours["variant"] if fastest_ours else None,
        "best_peft": best_peft["variant"] if best_peft else None,
        "ours_vs_reference": common.ratio(fastest_ours and fastest_ours["examples_per_s"], ref and ref["examples_per_s"]),
        "ours_vs_best_peft": common.ratio(fastest_ours and fastest_ours["examples_per_s"], best_peft and best_peft["examples_per_s"]),
        "defaults_vs_reference": common.ratio(ok("ours") and ok("ours")["examples_per_s"], ref and ref["examples_per_s"]),
        "defaults_vs_best_peft": common.ratio(ok("ours") and ok("ours")["examples_per_s"], best_peft and best_peft["examples_per_s"]),
        "fp32_vs_reference": common.ratio(ok("ours_fp32") and ok("ours_fp32")["examples_per_s"], ref and ref["examples_per_s"]),
        "peak_mem_vs_reference": common.ratio(ours and ours["peak_mem_mib"], ref and ref["peak_mem_mib"]),
        "parity_nll_reference": ref["parity_nll"] if ref else None,
    }
    fp32 = ok("ours_fp32")  # fp32, same init seed, same first batch as (b): equal to fp32 rounding
    if fp32 and ref:
        out["parity_nll_abs_diff_fp32"] = abs(fp32["parity_nll"] - ref["parity_nll"])
    if fastest_ours:
        out["paper_run_minutes"] = fastest_ours["ms_per_update"] * PAPER_UPDATES / 60000 + fastest_ours.get("paper_run_graph_build_s", 0) / 60
    return out


def print_report(results: list[dict[str, Any]], summary: dict[str, Any], settings: dict[str, Any], machine: dict[str, Any]) -> None:
    gpu = settings["device_type"] == "cuda"
    headers = ["variant", "examples/s", "tokens/s", "ms/update", "peak mem MiB", "padding", "loss"]
    headers += ["TFLOP/s", "MFU"] if gpu else []
    rows = []
    for r in results:
        if "error" in r or "skipped" in r:
            note = f"failed: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
            rows.append([r["label"], note, *[None] * (len(headers) - 2)])
            continue
        row = [r["label"], r["examples_per_s"], r["tokens_per_s"], r["ms_per_update"], r["peak_mem_mib"],
               f"{100 * r['padding_share']:.0f}%", r["mean_loss"]]
        row += [r["achieved_tflops"], f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else None] if gpu else []
        rows.append(row)
    where = machine.get("gpu") or f"{machine['host_cpu']}, {machine['torch_threads']} threads"
    print(f"\nTraining, {settings['model_card']}, batch {settings['batch']}, {settings['data']} ({where}; torch {machine['torch']}, "
          f"load average {machine['load_average_1m']})\n")
    print(common.markdown_table(headers, rows))
    print()
    for key, value in summary.items():
        if value is not None:
            print(f"- {key}: {value:.3g}" if isinstance(value, float) else f"- {key}: {value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.worker:
            settings = json.loads(Path(args.settings).read_text())
            result = run_worker(args.worker, settings)
            common.save_results(args.out, result)
            return 0
        return run_all(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run_all(args: argparse.Namespace) -> int:
    if args.tiny:
        apply_tiny(args)
    card(args.model_card)  # unknown card: InputError now, not in every worker
    device = common.resolve_device(args.device)
    variants = [v.strip() for v in (args.variants or (GPU_DEFAULT if device.type == "cuda" else CPU_DEFAULT)).split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise InputError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if min(args.batch, args.updates, args.ref_updates, args.rounds) < 1 or min(args.warmup, args.ref_warmup) < 0:
        raise InputError("--batch, --updates, --ref_updates and --rounds must be >= 1, the warm-ups >= 0")
    pairs, source = common.e2e_pairs("valid", args.data)
    if args.max_examples:
        pairs = pairs[: args.max_examples]
    peak = args.peak_tflops or (common.bf16_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    machine = common.machine_info(str(device), threads=args.threads)
    out = Path(args.out or common.OUT_DIR / f"train_{device.type}_{args.model_card}_b{args.batch}.json")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        encoded = common.write_encoded_jsonl(common.encode_e2e(pairs), Path(tmp) / "train.jsonl")
        settings = {"encoded": str(encoded), "model_card": args.model_card, "batch": args.batch, "warmup": args.warmup,
                    "updates": args.updates, "ref_warmup": args.ref_warmup, "ref_updates": args.ref_updates,
                    "device": str(device), "device_type": device.type, "threads": args.threads, "seed": args.seed,
                    "rounds": args.rounds,
                    "peak_tflops": peak, "data": f"{source} ({len(pairs)} examples)"}
        settings_file = Path(tmp) / "settings.json"
        settings_file.write_text(json.dumps(settings))
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        jobs = [(r, v) for r in range(args.rounds) for v in variants]  # rounds interleaved: a load spike hits all variants
        for round_, variant in tqdm(jobs, desc="variants", unit="variant", file=sys.stderr):
            skipped = skipped_variant(variant, device.type)
            runs[variant].append(skipped or run_variant(variant, settings_file, Path(tmp) / f"{variant}_{round_}.json"))
        results = [best_round(runs[v]) for v in variants]
    summary = ratios({r["variant"]: r for r in results}, device.type)
    print_report(results, summary, settings, machine)
    common.save_results(out, {"benchmark": "train", "machine": machine, "settings": {k: v for k, v in settings.items() if k != "encoded"},
                              "results": results, "summary": summary})
    failed = [r["variant"] for r in results if "error" in r]
    skipped = [r["variant"] for r in results if "skipped" in r]
    best = summary.get("best_ours")
    versus = [f"{summary[key]:.2f}x {name}" for key, name in (("ours_vs_reference", "the reference-equivalent"),
                                                               ("ours_vs_best_peft", "transformers+peft at its best"))
              if summary.get(key) is not None]
    print(f"\nbench_train: {len(results) - len(failed) - len(skipped)}/{len(results)} variants on {device} ({args.model_card}, batch {args.batch}); "
          f"fastest ours: {best}" + (f", {' and '.join(versus)}" if versus else "") + f" -> {out}"
          + (f"; skipped: {', '.join(skipped)}" if skipped else "") + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
