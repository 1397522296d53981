"""The LoRA GPT-2 trainer: `python -m steps.train ...` alone, or `torchrun --nproc_per_node N -m steps.train ...`.

Command-line compatible with the original gpt2_ft.py (same argument names and defaults), with its bugs fixed:
the schedule counts optimizer updates (Q1), gradient accumulation skips the all-reduce on non-final
micro-batches (Q4), batches are padded to their own length (Q5), validation is sharded without duplicates and
all-reduced into a true token mean (Q8, Q9), checkpoints are adapters only, plus a separate resume state (Q12).

One change in semantics, on purpose: the loss of an update is the token mean over the whole update (all
micro-batches on all ranks). So batch 8 equals batch 4 x grad_acc 2 equals 2 processes x batch 4, exactly.
With one process and grad_acc 1 it is the original's per-batch token mean.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from steps import checkpoints as ckpt
from steps.common import DEFAULT_SEQ_LEN, InputError, write_json
from steps.data import Example, build_examples, collate, epoch_updates, load_encoded, shard_sequential
from steps.encoded_meta import check_same_encoding
from steps.lora import LoRAConfig, mark_only_lora_trainable, parse_targets
from steps.model import CARDS, GPT2, card
from steps.optim import NO_SCHEDULE, AdamW, build_scheduler, cycle_max_step, param_groups_for

LABEL_SMOOTH_MIN = 1e-4  # the original switches label smoothing on above this value
TRAIN_LOG_FIELDS = ["step", "epoch", "lr", "loss", "nll", "ppl", "tokens_per_s", "ms_per_update"]
VALID_LOG_FIELDS = ["step", "valid_loss", "valid_ppl", "best_valid_loss"]
# Arguments that change what is computed: a resume state written under other values is refused.
FINGERPRINT_ARGS = [
    "train_data", "train_batch_size", "grad_acc", "clip", "seq_len", "model_card", "init_checkpoint", "lora_dim",
    "lora_alpha", "lora_dropout", "lora_targets", "label_smooth", "lr", "weight_decay", "scheduler", "warmup_step",
    "max_epoch", "max_step", "obj", "random_seed", "correct_bias", "adam_beta1", "adam_beta2", "adam_epislon",
    "no_decay_bias", "i_steps", "i_lrs", "precision", "truncation", "bucket_window",
]


# ---------------------------------------------------------------------------------------------- arguments


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
                      help="fix: cut the context from the left so every completion token is trained; reference: keep the first seq_len tokens (Q7)")
    model = p.add_argument_group("model")
    model.add_argument("--model_card", default="gpt2.md", help=f"architecture: {', '.join(CARDS)}")
    model.add_argument("--init_checkpoint", default=None, help="pretrained GPT-2 weights: Hugging Face model.safetensors or pytorch_model.bin")
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
    opt.add_argument("--scheduler", default="linear", choices=["linear", "cosine", "cosine_reference", "constant", "cycle", "inv_sqrt", "dev_perf", "none"],
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
    # Accepted for command-line compatibility with the original; they do nothing here.
    for dead in ("--platform", "--local_rank", "--local-rank", "--rank", "--world_size", "--roll_interval", "--roll_lr", "--roll_step", "--eval_epoch"):
        run.add_argument(dead, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.fp16:
        args.precision = "fp16"
    return args


# ---------------------------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Sum small tensors over ranks in one collective."""
        flat = torch.stack([t.detach().float().reshape(()) for t in tensors]).to(self.device)
        if self.world > 1:
            dist.all_reduce(flat)
        return list(flat.unbind())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device_choice: str) -> Dist:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); no process group for a single process (Q16)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, device)


def resolve_precision(choice: str, device: torch.device) -> str:
    """`auto` -> bf16 when the device has native bf16 matmuls (then about twice as fast as fp32), else fp32."""
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


# ---------------------------------------------------------------------------------------------- loss


def masked_lm_loss(model: GPT2, batch: dict[str, torch.Tensor], label_smooth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over loss-mask positions of the label-smoothed loss and of the plain NLL (REFERENCE 4.3).

    The LM head runs only on masked positions: with the clm objective most positions are context, and the
    vocabulary projection is the biggest matmul of the model. Per token, with z the logits:
        nll = logsumexp(z) - z[y],  smooth = logsumexp(z) - mean(z),  loss = (1 - e) * nll + e * smooth
    which is the original's (1 - e) * -logp[y] + e * mean_v(-logp[v]).
    """
    hidden, _ = model.hidden(batch["input"])
    positions = batch["positions"]  # flat indices of the mask's nonzero positions (steps.data.collate)
    logits = model.logits(hidden.flatten(0, 1).index_select(0, positions)).float()
    targets = batch["target"].view(-1).index_select(0, positions)
    weights = batch["mask"].view(-1).index_select(0, positions)
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if label_smooth > LABEL_SMOOTH_MIN:
        loss = (1.0 - label_smooth) * nll + label_smooth * (lse - logits.mean(dim=-1))
    else:
        loss = nll
    return (loss * weights).sum(), (nll * weights).sum()


class LossModule(nn.Module):
    """Wraps the model so DDP's forward hook sees the whole loss computation."""

    def __init__(self, model: GPT2, label_smooth: float):
        super().__init__()
        self.model = model
        self.label_smooth = label_smooth

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return masked_lm_loss(self.model, batch, self.label_smooth if self.training else 0.0)


# ---------------------------------------------------------------------------------------------- set-up


def load_data(args: argparse.Namespace, vocab_size: int) -> tuple[list[Example], list[Example]]:
    check_same_encoding(args.train_data, args.valid_data)
    train_pairs = load_encoded(args.train_data, vocab_size)
    valid_pairs = load_encoded(args.valid_data, vocab_size)
    train = build_examples(train_pairs, args.seq_len, args.obj, args.truncation)
    valid = build_examples(valid_pairs, args.seq_len, "clm", args.truncation)  # validation is always clm, as in the original
    return train, valid


def build_model(args: argparse.Namespace) -> GPT2:
    cfg = card(args.model_card)
    lora = None
    if args.lora_dim > 0:
        if args.lora_dim > cfg.n_embd:
            raise InputError(f"--lora_dim {args.lora_dim} exceeds the model width n_embd={cfg.n_embd} of {args.model_card}")
        lora = LoRAConfig(r=args.lora_dim, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=parse_targets(args.lora_targets))
    elif args.lora_dim < 0:
        raise InputError(f"--lora_dim must be >= 0, got {args.lora_dim}")
    torch.manual_seed(args.random_seed)  # LoRA A init (and the base, when no checkpoint is given)
    model = GPT2(cfg, lora)
    if args.init_checkpoint:
        ckpt.load_base_weights(model, args.init_checkpoint)
    if lora is not None:
        mark_only_lora_trainable(model)
    return model


def resolve_max_step(args: argparse.Namespace, updates_per_epoch: int) -> int:
    if args.scheduler == "cycle":
        return cycle_max_step(args.i_steps)  # the original overwrites max_step with the last cycle step
    if args.max_step is not None:
        return args.max_step
    if args.max_epoch is None:
        raise InputError("give --max_step or --max_epoch (the original crashed without either)")
    return args.max_epoch * updates_per_epoch


def fingerprint(args: argparse.Namespace, world: int) -> dict[str, Any]:
    return {**{k: getattr(args, k) for k in FINGERPRINT_ARGS}, "world_size": world}


# ---------------------------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, args: argparse.Namespace, env: Dist):
        self.args, self.env = args, env
        self.work_dir = Path(args.work_dir)
        self.model = build_model(args)
        self.train_set, self.valid_set = load_data(args, self.model.config.vocab_size)
        self.model.to(env.device)
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        if self.amp_dtype is not None and self.model.lora_config is not None:
            self.model.store_frozen_matrices_in(self.amp_dtype)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        loss_module = LossModule(self.model, args.label_smooth)
        if env.world > 1:
            loss_module = nn.parallel.DistributedDataParallel(
                loss_module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                broadcast_buffers=False, gradient_as_bucket_view=True)
        self.loss_module = loss_module
        self.optimizer = AdamW(
            param_groups_for(self.model.named_parameters(), args.weight_decay, args.no_decay_bias),
            lr=args.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epislon,
            weight_decay=args.weight_decay, correct_bias=args.correct_bias)
        self.lengths = [len(e.input) for e in self.train_set]
        self.updates_per_epoch = len(self.epoch_plan(1))
        self.max_step = resolve_max_step(args, self.updates_per_epoch)
        try:
            self.scheduler = build_scheduler(self.optimizer, args.scheduler, args.warmup_step, self.max_step, args.i_steps, args.i_lrs)
        except ValueError as exc:
            raise InputError(f"bad schedule settings: {exc}") from None
        if args.scheduler in NO_SCHEDULE:
            self.log(f"warning: --scheduler {args.scheduler} means a constant learning rate (as in the original)")
        if self.max_step <= 0:
            raise InputError(f"nothing to train: max_step is {self.max_step} (with --scheduler cycle it is the last of --i_steps)")
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=args.precision == "fp16")
        self.step = 0  # optimizer updates done
        self.epoch = 1  # epochs count from 1, as in the original
        self.update_in_epoch = 0  # updates of the current epoch already done
        self._plan: list[list[list[int]]] = []
        self._plan_epoch = -1
        self.best_valid = math.inf
        self.base = ckpt.base_identity(args.init_checkpoint) if env.main else None
        self.tracker = _tracker(env.rank)
        self._reset_meters()

    # -- bookkeeping

    def _reset_meters(self) -> None:
        zero = torch.zeros((), device=self.env.device)
        self.meter = {"loss": zero.clone(), "nll": zero.clone(), "tokens": zero.clone(), "updates": 0, "seconds": 0.0}

    def log(self, message: str) -> None:
        if self.env.main:
            print(message, flush=True)

    # -- data

    def epoch_plan(self, epoch: int) -> list[list[list[int]]]:
        a = self.args
        return epoch_updates(self.lengths, a.train_batch_size, self.env.world, self.env.rank, a.random_seed, epoch, a.grad_acc, a.bucket_window)

    def next_update_batches(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of this rank's next update; (epoch, update_in_epoch) is what the resume state records."""
        if self.update_in_epoch >= self.updates_per_epoch:
            self.epoch += 1
            self.update_in_epoch = 0
        if self._plan_epoch != self.epoch:
            self._plan, self._plan_epoch = self.epoch_plan(self.epoch), self.epoch
        micro_batches = self._plan[self.update_in_epoch]
        self.update_in_epoch += 1
        pad_to = self.args.seq_len if self.args.pad == "fixed" else None
        return [{k: v.to(self.env.device, non_blocking=True) for k, v in collate([self.train_set[i] for i in indices], pad_to).items()}
                for indices in micro_batches]

    # -- one update

    def train_update(self, group: list[dict[str, torch.Tensor]]) -> None:
        args, env = self.args, self.env
        # The denominator is the number of loss tokens in the whole update, over all micro-batches and ranks,
        # plus the original's 1e-4; DDP averages gradients over ranks, hence the factor world.
        tokens = sum(b["mask"].sum() for b in group)
        (global_tokens,) = env.all_sum(tokens)
        scale = env.world / (global_tokens + 1e-4)
        for i, batch in enumerate(group):
            # Dropout masks depend only on (seed, rank, step, micro-batch): a resumed run draws the same ones.
            torch.manual_seed(hash((args.random_seed, env.rank, self.step, i)) % (2**63))
            sync = i == len(group) - 1
            with self._no_sync(sync), torch.autocast(env.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss_sum, nll_sum = self.loss_module(batch)
            self.scaler.scale(loss_sum * scale).backward()
            self.meter["loss"] += loss_sum.detach()
            self.meter["nll"] += nll_sum.detach()
            self.meter["tokens"] += batch["mask"].sum()
        if args.clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, args.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def _no_sync(self, sync: bool):
        if self.env.world > 1 and not sync:
            return self.loss_module.no_sync()
        return contextlib.nullcontext()

    # -- evaluation, logging, checkpoints

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted validation NLL over the whole set, each example counted once (Q8, Q9)."""
        self.loss_module.eval()
        total = torch.zeros((), device=self.env.device)
        tokens = torch.zeros((), device=self.env.device)
        pad_to = self.args.seq_len if self.args.pad == "fixed" else None
        for indices in shard_sequential(len(self.valid_set), self.args.valid_batch_size, self.env.world, self.env.rank):
            batch = {k: v.to(self.env.device) for k, v in collate([self.valid_set[i] for i in indices], pad_to).items()}
            with torch.autocast(self.env.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                _, nll_sum = masked_lm_loss(self.model, batch, 0.0)
            total += nll_sum
            tokens += batch["mask"].sum()
        self.loss_module.train()
        total, tokens = self.env.all_sum(total, tokens)
        return (total / tokens.clamp(min=1)).item()

    def write_log_row(self, name: str, fields: list[str], row: dict[str, Any]) -> None:
        path = self.work_dir / name
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            if new:
                writer.writeheader()
            writer.writerow({k: row[k] for k in fields})

    def report_training(self) -> None:
        loss, nll, tokens = self.env.all_sum(self.meter["loss"], self.meter["nll"], self.meter["tokens"])
        loss, nll, tokens = loss.item(), nll.item(), tokens.item()
        self.check_finite(loss)
        n = max(1, self.meter["updates"])
        seconds = max(self.meter["seconds"], 1e-9)
        row = {
            "step": self.step, "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0],
            "loss": loss / max(tokens, 1), "nll": nll / max(tokens, 1),
            "tokens_per_s": tokens / seconds, "ms_per_update": 1000 * seconds / n,
        }
        row["ppl"] = math.exp(min(row["nll"], 50))
        if self.env.main:
            self.write_log_row("train_log.csv", TRAIN_LOG_FIELDS, row)
            self.tracker.log_metrics({f"train/{k}": float(row[k]) for k in TRAIN_LOG_FIELDS if k not in ("step", "epoch")}, self.step)
            self.log(f"| epoch {row['epoch']:3d} | step {self.step:6d}/{self.max_step} | lr {row['lr']:.3g} | "
                     f"ms/update {row['ms_per_update']:7.1f} | loss {row['loss']:.4f} | nll {row['nll']:.4f} | "
                     f"ppl {row['ppl']:9.2f} | tokens/s {row['tokens_per_s']:9.0f}")
        self._reset_meters()

    def report_validation(self) -> None:
        valid = self.evaluate()
        self.check_finite(valid)
        improved = valid < self.best_valid
        self.best_valid = min(self.best_valid, valid)
        if self.env.main:
            row = {"step": self.step, "valid_loss": valid, "valid_ppl": math.exp(min(valid, 50)), "best_valid_loss": self.best_valid}
            self.write_log_row("valid_log.csv", VALID_LOG_FIELDS, row)
            self.tracker.log_metrics({"valid/loss": valid, "valid/ppl": row["valid_ppl"]}, self.step)
            self.log(f"| eval at step {self.step:6d} | valid loss {valid:.4f} | valid ppl {row['valid_ppl']:.2f} | best {self.best_valid:.4f}"
                     + (" (new best)" if improved else ""))
            if improved:
                self.save_adapter(self.work_dir / "best")

    def check_finite(self, value: float) -> None:
        if not math.isfinite(value):
            raise FloatingPointError(
                f"loss became {value} at update {self.step}; stopping without saving. The last good checkpoint is in "
                f"{self.work_dir / 'resume'} (lower --lr, set --clip, or use --precision bf16 instead of fp16)")

    def adapter_metadata(self) -> dict[str, Any]:
        return ckpt.adapter_config(self.model, self.args.model_card, self.base, self.step, epoch=self.epoch)

    def save_adapter(self, out_dir: Path) -> None:
        if self.model.lora_config is None:  # full fine-tuning: the "adapter" is the whole model
            ckpt.save_hf_checkpoint(self.model, out_dir / "model.safetensors")
        else:
            ckpt.save_adapter(self.model, out_dir, self.adapter_metadata())

    def save_checkpoint(self) -> None:
        """Adapter for this step + resume state; a crash later costs at most one save interval."""
        self.check_finite(sum(p.detach().float().sum().item() for p in self.trainable))
        if not self.env.main:
            return
        step_dir = self.work_dir / "checkpoints" / f"step_{self.step}"
        self.save_adapter(step_dir)
        ckpt.save_resume_state(self.work_dir / "resume" / "state.pt", self.resume_state())
        self.tracker.log_artifacts(step_dir, f"checkpoints/step_{self.step}")

    def resume_state(self) -> dict[str, Any]:
        return {
            "fingerprint": fingerprint(self.args, self.env.world),
            "step": self.step, "epoch": self.epoch, "update_in_epoch": self.update_in_epoch, "best_valid": self.best_valid,
            "trainable": {k: p.detach().cpu() for k, p in self.model.named_parameters() if p.requires_grad},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "meter": {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in self.meter.items()},
        }

    def maybe_resume(self) -> None:
        path = self.work_dir / "resume" / "state.pt"
        if self.args.resume == "never" or not path.is_file():
            return
        state = ckpt.load_resume_state(path)
        if state["fingerprint"] != fingerprint(self.args, self.env.world):
            changed = [k for k, v in fingerprint(self.args, self.env.world).items() if state["fingerprint"].get(k) != v]
            raise InputError(f"resume state was written with different settings ({', '.join(changed)}); "
                             "use another --work_dir, or --resume never to start over", path)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in state["trainable"].items():
                params[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.update_in_epoch = state["step"], state["epoch"], state["update_in_epoch"]
        self.best_valid = state["best_valid"]
        self.meter = {k: (v.to(self.env.device) if torch.is_tensor(v) else v) for k, v in state["meter"].items()}
        for name in ("train_log.csv", "valid_log.csv"):  # forget log rows written after the state we resume from
            _truncate_log(self.work_dir / name, self.step)
        self.log(f"resumed from {path} at update {self.step} (epoch {self.epoch}, update {self.update_in_epoch} of it)")

    # -- main loop

    def fit(self) -> dict[str, Any]:
        args = self.args
        if self.env.main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self.maybe_resume()
        self.env.barrier()
        n_trainable = sum(p.numel() for p in self.trainable)
        self.log(f"train: {len(self.train_set)} examples, valid: {len(self.valid_set)} | {args.model_card} | trainable params "
                 f"{n_trainable:,} | world {self.env.world} on {self.env.device} | {self.updates_per_epoch} updates/epoch, "
                 f"max_step {self.max_step} | precision {args.precision}")
        truncated = sum(e.truncated for e in self.train_set)
        if truncated:
            self.log(f"warning: {truncated} training examples longer than --seq_len {args.seq_len} were truncated ({args.truncation})")
        started = time.perf_counter()
        self.loss_module.train()
        while self.step < self.max_step:
            t0 = time.perf_counter()
            self.train_update(self.next_update_batches())
            if self.env.device.type == "cuda" and self.step % args.log_interval == 0:
                torch.cuda.synchronize()
            self.meter["seconds"] += time.perf_counter() - t0
            self.meter["updates"] += 1
            if self.step % args.log_interval == 0:
                self.report_training()
            if self.step % args.eval_interval == 0:
                self.report_validation()
            if self.step % args.save_interval == 0 and self.step < self.max_step:
                self.save_checkpoint()
        if self.meter["updates"]:
            self.report_training()
        if self.step % args.eval_interval != 0:
            self.report_validation()
        self.save_checkpoint()
        summary = {
            "steps": self.step, "epochs": self.epoch, "best_valid_loss": self.best_valid,
            "best_valid_ppl": math.exp(min(self.best_valid, 50)), "trainable_params": n_trainable,
            "world_size": self.env.world, "wall_s": round(time.perf_counter() - started, 2),
        }
        if self.env.main:
            self.save_adapter(self.work_dir)
            write_json(self.work_dir / "summary.json", summary)
            self.log(f"done: {self.step} updates, best valid loss {self.best_valid:.4f} (ppl {summary['best_valid_ppl']:.2f}), "
                     f"adapter in {self.work_dir}")
        self.tracker.close()
        return summary


def _truncate_log(path: Path, step: int) -> None:
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        fields = rows[0].keys() if rows else None
    if fields is None:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["step"]) <= step)


class _NullTracker:
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str) -> None: ...
    def close(self) -> None: ...


def _tracker(rank: int):
    """MLflow logging through steps.tracking on rank 0 when a run id is in the environment; otherwise nothing."""
    if rank != 0 or not os.environ.get("MLFLOW_RUN_ID"):
        return _NullTracker()
    from steps.tracking import RunLogger

    return RunLogger.from_env(rank)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = setup_distributed(args.device)
    args.precision = resolve_precision(args.precision, env.device)  # resolved first: the resume fingerprint records it
    try:
        Trainer(args, env).fit()
        return 0
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    finally:
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
