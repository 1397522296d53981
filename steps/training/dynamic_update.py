"""The training update in dynamic shapes, the reference path: each micro-batch in its own shape, DDP's all-reduce with
several processes, the original's AdamW with its step counted on the host, a GradScaler for fp16.

It has the interface of steps.training.static_update.StaticUpdater (`optimizer_class`, `prepare`, `start`, `run_update`,
`describe`), so the trainer runs either without asking which.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from steps.model.gpt2 import GPT2
from steps.model.lora import dropout_seed, use_dropout_generator
from steps.training.data import Example, collate
from steps.training.distributed import Dist
from steps.training.loss import LossModule, token_mean_scale
from steps.training.optim import AdamW


class DynamicUpdater:
    optimizer_class = AdamW
    use_graphs = False  # graphs replay fixed shapes, which this path does not have

    def __init__(self, model: GPT2, optimizer: AdamW, meters: dict[str, Any], env: Dist, cfg: Any, *,
                 amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler):
        self.model, self.optimizer, self.meters, self.env = model, optimizer, meters, env
        self.clip, self.seed, self.amp_dtype, self.scaler = cfg.clip, cfg.random_seed, amp_dtype, scaler
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        loss_module = LossModule(model, cfg.label_smooth)
        if env.world > 1:
            loss_module = nn.parallel.DistributedDataParallel(
                loss_module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                broadcast_buffers=False, gradient_as_bucket_view=True)
        self.loss_module = loss_module
        self.generator = torch.Generator(device=env.device)
        use_dropout_generator(model, self.generator)

    def prepare(self, micro_batches: list[list[Example]], pad_to: int | None) -> list[dict[str, torch.Tensor]]:
        """Each micro-batch collated to its own length, on the device."""
        return [{k: v.to(self.env.device, non_blocking=True) for k, v in collate(examples, pad_to).items()}
                for examples in micro_batches]

    def start(self, upcoming: Any) -> None:
        """Nothing to prepare ahead (the static path records its graphs here)."""

    def describe(self) -> str:
        return "dynamic shapes"

    def run_update(self, group: list[dict[str, torch.Tensor]], step: int) -> None:
        """One optimizer update over this rank's micro-batches, scaled to the update's token mean (all ranks)."""
        (global_tokens,) = self.env.all_sum(sum(b["mask"].sum() for b in group))
        scale = token_mean_scale(self.env.world, global_tokens)
        for i, batch in enumerate(group):
            # Dropout masks depend only on (seed, rank, step, micro-batch): a resumed run draws the same ones.
            self.generator.manual_seed(dropout_seed(self.seed, self.env.rank, step, i))
            last = i == len(group) - 1
            no_sync = self.loss_module.no_sync() if self.env.world > 1 and not last else contextlib.nullcontext()
            with no_sync, torch.autocast(self.env.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss_sum, nll_sum = self.loss_module(batch)
            self.scaler.scale(loss_sum * scale).backward()
            self.meters["loss"] += loss_sum.detach()
            self.meters["nll"] += nll_sum.detach()
            self.meters["tokens"] += batch["mask"].sum()
        if self.clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
