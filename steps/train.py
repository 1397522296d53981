"""The LoRA GPT-2 trainer: `python -m steps.train ...` alone, or `torchrun --nproc_per_node N -m steps.train ...`.

Command-line compatible with the original gpt2_ft.py (same option names and defaults; steps/training/config.py),
with its bugs fixed (docs/fidelity.md): the schedule counts optimizer updates, gradient accumulation skips
the all-reduce on non-final micro-batches, batches are padded to their own length, validation is sharded
without duplicates and all-reduced into a true token mean, and checkpoints are adapters only, with a
separate resume state.

One change in semantics, on purpose: the loss of an update is the token mean over the whole update (all
micro-batches on all ranks). So batch 8 equals batch 4 x grad_acc 2 equals 2 processes x batch 4, exactly.
With one process and grad_acc 1 it is the original's per-batch token mean.

Each update runs in dynamic shapes (steps/training/dynamic_update.py, the reference) or, with --shapes static, in length
buckets (steps/training/static_update.py), eagerly or replayed from CUDA graphs (docs/training.md, "The GPU fast path").

What the work dir gets: steps/formats/work_dir.py.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from steps.core import runtime
from steps.core.common import InputError, TrainingDiverged, run_stage, write_json
from steps.core.process import claim_outputs, die_with_parent  # the work dir's lock; ending with the launcher
from steps.core.tracking import RunLogger
from steps.formats import checkpoints as ckpt
from steps.formats.adapters import start_from_adapter
from steps.formats.work_dir import WorkDir
from steps.model.gpt2 import GPT2, card
from steps.model.lora import LoRAConfig, mark_only_lora_trainable, parse_targets
from steps.training import reports, status
from steps.training.config import TrainConfig, fingerprint, parse_config, resolve_fast_path, resolve_max_step, setup_warnings
from steps.training.data import EpochPlan, Example, collate, epoch_updates, load_splits, require_examples_for_update, shard_sequential
from steps.training.distributed import Dist, resolve_precision, setup_distributed, shutdown
from steps.training.dynamic_update import DynamicUpdater
from steps.training.loss import masked_lm_loss
from steps.training.optim import build_scheduler, param_groups_for
from steps.training.static_update import StaticUpdater

# ---------------------------------------------------------------------------------------------- set-up


def build_model(cfg: TrainConfig) -> tuple[GPT2, list[str]]:
    """The model to train, and notes on what it was loaded from (logged at start)."""
    model_cfg = card(cfg.model_card)
    if cfg.seq_len > model_cfg.n_positions:
        raise InputError(f"--seq_len {cfg.seq_len} exceeds the {model_cfg.n_positions} positions of {cfg.model_card}")
    lora = None
    if cfg.lora_dim > 0:
        if cfg.lora_dim > model_cfg.n_embd:
            raise InputError(f"--lora_dim {cfg.lora_dim} exceeds the model width n_embd={model_cfg.n_embd} of {cfg.model_card}")
        lora = LoRAConfig(r=cfg.lora_dim, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=parse_targets(cfg.lora_targets))
    torch.manual_seed(cfg.random_seed)  # LoRA A init (and the base, when no checkpoint is given)
    model = GPT2(model_cfg, lora)
    notes = []
    if cfg.init_checkpoint:
        skipped = [k for k in ckpt.load_base_weights(model, cfg.init_checkpoint) if "lora_" in k]
        if skipped:
            notes.append(f"note: --init_checkpoint loads base weights only; its {len(skipped)} LoRA tensors were skipped "
                         "(start from them with --init_adapter)")
    if cfg.init_adapter:
        notes.append(start_from_adapter(model, cfg.init_adapter, cfg.model_card, cfg.lora_alpha))
    if lora is not None:
        mark_only_lora_trainable(model)
    return model, notes


# ---------------------------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, cfg: TrainConfig, env: Dist):
        # Precision, shapes and CUDA graphs resolved for this device first: the fingerprint records the result.
        cfg = replace(cfg, precision=resolve_precision(cfg.precision, env.device))
        cfg = resolve_fast_path(cfg, env.device.type)
        self.cfg, self.env = cfg, env
        self.work = WorkDir(cfg.work_dir)
        self.model, self.notes = build_model(cfg)
        self.train_set, self.valid_set = load_splits(cfg.train_data, cfg.valid_data, cfg.seq_len, cfg.obj, cfg.truncation,
                                                    self.model.config.vocab_size)
        self.model.to(env.device)
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        if self.amp_dtype is not None and self.model.lora_config is not None:
            self.model.store_frozen_matrices_in(self.amp_dtype)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # The update: dynamic shapes (the reference, steps/training/dynamic_update.py) or static ones (steps/training/static_update.py).
        updater_class = StaticUpdater if cfg.shapes == "static" else DynamicUpdater
        self.optimizer = updater_class.optimizer_class(
            param_groups_for(self.model.named_parameters(), cfg.weight_decay, cfg.no_decay_bias),
            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epislon,
            weight_decay=cfg.weight_decay, correct_bias=cfg.correct_bias)
        self.lengths = [len(e.input) for e in self.train_set]
        require_examples_for_update(len(self.train_set), env.world, cfg.train_batch_size, cfg.grad_acc, cfg.train_data)
        self.updates_per_epoch = len(self.epoch_plan(1))
        self.max_step = resolve_max_step(cfg, self.updates_per_epoch)
        try:
            self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, cfg.warmup_step, self.max_step, cfg.i_steps, cfg.i_lrs)
        except ValueError as exc:
            raise InputError(f"bad schedule settings: {exc}") from None
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
        # Optimizer updates done; the epoch (counted from 1, as in the original) and the updates of it already done.
        self.step, self.epoch, self.update_in_epoch = 0, 1, 0
        self._plan: EpochPlan = []
        self._plan_epoch = -1
        self.best_valid = math.inf
        self.last_train_loss = math.nan
        self.fingerprint = fingerprint(cfg, env.world)
        self.base = ckpt.base_identity(cfg.init_checkpoint) if env.main else None
        self.tracker = RunLogger.from_env(env.rank)  # MLflow on rank 0 when the flow set MLFLOW_RUN_ID; else a no-op
        self.progress: tqdm | None = None
        zero = torch.zeros((), device=env.device)
        self.meter: dict[str, Any] = {"loss": zero.clone(), "nll": zero.clone(), "tokens": zero.clone(), "updates": 0, "seconds": 0.0}
        self.updater = updater_class(self.model, self.optimizer, self.meter, env, cfg, amp_dtype=self.amp_dtype, scaler=self.scaler)

    # -- bookkeeping

    def _reset_meters(self) -> None:
        """Zero the meters in place: a captured update adds to these very tensors."""
        for key in ("loss", "nll", "tokens"):
            self.meter[key].zero_()
        self.meter["updates"], self.meter["seconds"] = 0, 0.0

    def log(self, message: str) -> None:
        if self.env.main:
            tqdm.write(message, file=sys.stdout)  # above the progress bar, when there is one
            sys.stdout.flush()

    # -- data

    def epoch_plan(self, epoch: int) -> EpochPlan:
        c = self.cfg
        return epoch_updates(self.lengths, c.train_batch_size, self.env.world, self.env.rank, c.random_seed, epoch, c.grad_acc, c.bucket_window)

    def next_update_batches(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of this rank's next update; (epoch, update_in_epoch) is what the resume state records."""
        if self.update_in_epoch >= self.updates_per_epoch:
            self.epoch += 1
            self.update_in_epoch = 0
        if self._plan_epoch != self.epoch:
            self._plan, self._plan_epoch = self.epoch_plan(self.epoch), self.epoch
        micro_batches = self._plan[self.update_in_epoch]
        self.update_in_epoch += 1
        pad_to = self.cfg.seq_len if self.cfg.pad == "fixed" else None
        return self.updater.prepare([[self.train_set[i] for i in indices] for indices in micro_batches], pad_to)

    def upcoming_micro_batches(self, until_step: int) -> Iterator[list[Example]]:
        """The examples of every micro-batch of this rank's updates from now to `until_step`, from the plan alone."""
        epoch, update = self.epoch, self.update_in_epoch
        plans: dict[int, EpochPlan] = {}
        for _ in range(self.step, until_step):
            if update >= self.updates_per_epoch:
                epoch, update = epoch + 1, 0
            for indices in plans.setdefault(epoch, self.epoch_plan(epoch))[update]:
                yield [self.train_set[i] for i in indices]
            update += 1

    # -- one update

    def train_update(self, group: list[dict[str, Any]]) -> None:
        self.updater.run_update(group, self.step)
        self.scheduler.step()
        self.step += 1

    # -- evaluation, logging, checkpoints

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted validation NLL over the whole set, each example counted once on one rank."""
        self.model.eval()
        total = torch.zeros((), device=self.env.device)
        tokens = torch.zeros((), device=self.env.device)
        pad_to = self.cfg.seq_len if self.cfg.pad == "fixed" else None
        for indices in shard_sequential(len(self.valid_set), self.cfg.valid_batch_size, self.env.world, self.env.rank):
            batch = {k: v.to(self.env.device) for k, v in collate([self.valid_set[i] for i in indices], pad_to).items()}
            with torch.autocast(self.env.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                _, nll_sum = masked_lm_loss(self.model, batch, 0.0)
            total += nll_sum
            tokens += batch["mask"].sum()
        self.model.train()
        total, tokens = self.env.all_sum(total, tokens)
        return (total / tokens).item()  # load_data made sure tokens > 0

    def report_training(self) -> None:
        loss, nll, tokens = self.env.all_sum(self.meter["loss"], self.meter["nll"], self.meter["tokens"])
        loss, nll, tokens = loss.item(), nll.item(), tokens.item()
        self.check_finite(loss)
        seconds = max(self.meter["seconds"], 1e-9)
        row = {"step": self.step, "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0],
               "loss": loss / max(tokens, 1), "nll": nll / max(tokens, 1)}
        row["ppl"] = math.exp(min(row["nll"], 50))
        speed = {"tokens_per_s": tokens / seconds, "ms_per_update": 1000 * seconds / max(1, self.meter["updates"])}
        self.last_train_loss = row["loss"]
        if self.env.main:
            reports.append_row(self.work.train_log, reports.TRAIN_LOG_FIELDS, row)
            metrics = {f"train/{k}": float(v) for k, v in {**row, **speed}.items() if k not in ("step", "epoch")}
            self.tracker.log_metrics(metrics, self.step)  # timings go to MLflow only: tracked files stay reproducible
            self.log(f"| epoch {row['epoch']:3d} | step {self.step:6d}/{self.max_step} | lr {row['lr']:.3g} | "
                     f"ms/update {speed['ms_per_update']:7.1f} | loss {row['loss']:.4f} | nll {row['nll']:.4f} | "
                     f"ppl {row['ppl']:9.2f} | tokens/s {speed['tokens_per_s']:9.0f}")
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        self._reset_meters()

    def report_validation(self) -> None:
        valid = self.evaluate()
        self.check_finite(valid)
        improved = valid < self.best_valid
        self.best_valid = min(self.best_valid, valid)
        if self.env.main:
            row = {"step": self.step, "valid_loss": valid, "valid_ppl": math.exp(min(valid, 50)), "best_valid_loss": self.best_valid}
            reports.append_row(self.work.valid_log, reports.VALID_LOG_FIELDS, row)
            self.tracker.log_metrics({"valid/loss": valid, "valid/ppl": row["valid_ppl"]}, self.step)
            self.log(f"| eval at step {self.step:6d} | valid loss {valid:.4f} | valid ppl {row['valid_ppl']:.2f} | best {self.best_valid:.4f}"
                     + (" (new best)" if improved else ""))
            if improved:
                self.save_adapter(self.work.best)

    def check_finite(self, value: float) -> None:
        if math.isfinite(value):
            return
        resume = self.work.resume_state
        kept = (f"the last good checkpoint is {resume}" if resume.is_file()
                else "no checkpoint was written yet")
        raise TrainingDiverged(f"loss became {value} at update {self.step}; stopping without saving ({kept}). "
                               "Lower --lr, set --clip, or use --precision bf16 instead of fp16")

    def save_adapter(self, out_dir: Path) -> None:
        if self.model.lora_config is None:  # full fine-tuning: the "adapter" is the whole model
            ckpt.save_hf_checkpoint(self.model, WorkDir(out_dir).full_model)
        else:
            config = ckpt.adapter_config(self.model, self.cfg.model_card, self.base, self.step, epoch=self.epoch)
            ckpt.save_adapter(self.model, out_dir, config)

    def save_checkpoint(self) -> None:
        """Adapter for this step + resume state; a crash later costs at most one save interval."""
        self.check_finite(sum(p.detach().float().sum().item() for p in self.trainable))
        if not self.env.main:
            return
        step_dir = self.work.checkpoint(self.step)
        self.save_adapter(step_dir)
        ckpt.save_resume_state(self.work.resume_state, self.resume_state())
        self.tracker.log_artifacts(step_dir, step_dir.relative_to(self.work.root).as_posix())

    def resume_state(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "step": self.step, "epoch": self.epoch, "update_in_epoch": self.update_in_epoch, "best_valid": self.best_valid,
            "last_train_loss": self.last_train_loss,
            "trainable": {k: p.detach().cpu() for k, p in self.model.named_parameters() if p.requires_grad},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "meter": {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in self.meter.items()},
        }

    def maybe_resume(self) -> None:
        path = self.work.resume_state
        data = None if self.cfg.resume == "never" else self.env.read_on_main(path)  # rank 0's file, on every node
        if data is None:
            return
        state = ckpt.load_resume_state(path, data)
        if state.get("fingerprint") != self.fingerprint:
            recorded = state.get("fingerprint") or {}
            changed = [k for k, v in self.fingerprint.items() if recorded.get(k) != v]
            raise InputError(f"resume state was written with different settings, data or code ({', '.join(changed)}); "
                             "use another --work_dir, or --resume never to start over", path)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, v in state["trainable"].items():
                params[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.update_in_epoch = state["step"], state["epoch"], state["update_in_epoch"]
        self.best_valid, self.last_train_loss = state["best_valid"], state.get("last_train_loss", math.nan)
        for key, value in state["meter"].items():  # in place: the static update adds to these tensors
            if torch.is_tensor(value):
                self.meter[key].copy_(value)
            else:
                self.meter[key] = value
        if self.env.main:
            for log in (self.work.train_log, self.work.valid_log):  # forget log rows written after the state we resume from
                reports.truncate_after(log, self.step)
        self.log(f"resumed from {path} at update {self.step} (epoch {self.epoch}, update {self.update_in_epoch} of it)")

    # -- main loop

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.env.main:
            self.work.root.mkdir(parents=True, exist_ok=True)
        self.maybe_resume()
        self.updater.start(lambda: self.upcoming_micro_batches(self.max_step))  # after the resume: graphs use its optimizer state
        if self.env.main:
            status.write_status(self.work, "running")
        self.env.barrier()
        n_trainable = sum(p.numel() for p in self.trainable)
        self.log(f"train: {len(self.train_set)} examples, valid: {len(self.valid_set)} | {cfg.model_card} | trainable params "
                 f"{n_trainable:,} | world {self.env.world} on {self.env.device} | {self.updates_per_epoch} updates/epoch, "
                 f"max_step {self.max_step} | precision {cfg.precision} | {self.updater.describe()}")
        for warning in [*self.notes, *setup_warnings(cfg, n_trainable)]:
            self.log(warning)
        truncated = sum(e.truncated for e in self.train_set)
        if truncated:
            self.log(f"warning: {truncated} training examples longer than --seq_len {cfg.seq_len} were truncated ({cfg.truncation})")
        started = time.perf_counter()
        self.model.train()
        # A bar for people at a terminal; logs and pipes get the interval lines only.
        self.progress = tqdm(total=self.max_step, initial=self.step, unit="update", dynamic_ncols=True,
                             disable=not (self.env.main and sys.stderr.isatty()))
        with self.progress:
            while self.step < self.max_step:
                self.run_one_update()
        if self.meter["updates"]:
            self.report_training()
        if self.step % cfg.eval_interval != 0:
            self.report_validation()
        self.save_checkpoint()
        summary = {
            "steps": self.step, "epochs": self.epoch, "best_valid_loss": self.best_valid,
            "best_valid_ppl": math.exp(min(self.best_valid, 50)), "final_train_loss": self.last_train_loss,
            "trainable_params": n_trainable, "world_size": self.env.world,
        }
        if self.env.main:
            self.finish(summary, time.perf_counter() - started)
        self.tracker.close()
        return summary

    def run_one_update(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.train_update(self.next_update_batches())
        if self.env.device.type == "cuda" and self.step % cfg.log_interval == 0:
            torch.cuda.synchronize()
        self.meter["seconds"] += time.perf_counter() - t0
        self.meter["updates"] += 1
        if self.progress is not None:
            self.progress.update(1)
        if self.step % cfg.log_interval == 0:
            self.report_training()
        if self.step % cfg.eval_interval == 0:
            self.report_validation()
        if self.step % cfg.save_interval == 0 and self.step < self.max_step:
            self.save_checkpoint()

    def finish(self, summary: dict[str, Any], seconds: float) -> None:
        """Rank 0: the final adapter, the summary, the plots, and status `completed`."""
        self.save_adapter(self.work.root)
        # Where it ran, in the work dir's summary (and from there in the MLflow run): last bits differ between CPU kinds.
        machine = {"precision": self.cfg.precision, "machine": runtime.machine()}
        write_json(self.work.summary, {**summary, **machine})
        if self.cfg.machine_file:
            write_json(self.cfg.machine_file, machine)
        if self.cfg.summary_file:  # the numbers that compare across runs; the rest describes the run (work dir, MLflow)
            write_json(self.cfg.summary_file, {key: summary[key] for key in ("best_valid_loss", "final_train_loss")})
        if self.cfg.plots_dir:
            reports.write_plots(self.work, self.cfg.plots_dir)
            self.tracker.log_artifacts(self.cfg.plots_dir, "plots")
        self.tracker.log_metrics({"train/wall_s": seconds}, self.step)
        status.write_status(self.work, "completed", 0)
        self.log(f"done: {self.step} updates in {seconds:.0f} s, best valid loss {self.best_valid:.4f} "
                 f"(ppl {summary['best_valid_ppl']:.2f}), adapter in {self.work}")


# ---------------------------------------------------------------------------------------------- entry point


def train(cfg: TrainConfig) -> None:
    die_with_parent()
    env = setup_distributed(cfg.device)
    if env.main:  # after the rendezvous: on several nodes, rank 0 is known only then (steps/training/distributed.py)
        claim_outputs(cfg.work_dir, cfg.plots_dir, cfg.summary_file and Path(cfg.summary_file).parent)
    try:
        Trainer(cfg, env).fit()
    finally:
        shutdown(env)


def main(argv: list[str] | None = None) -> int:
    parsed: list[TrainConfig] = []

    def body() -> None:
        parsed.append(parse_config(argv))
        train(parsed[0])

    return run_stage(body, on_failure=lambda exc, code: status.record_failure(parsed[0].work_dir if parsed else None, exc, code))


if __name__ == "__main__":
    runtime.keep_large_allocations()  # here, not in main(): tests call main() in their own process
    sys.exit(main())
