"""The training update in static shapes: the step a CUDA graph records, run eagerly on a CPU, replayed on CUDA.

A CUDA graph replays fixed kernels on fixed memory. So the update it records must see the same shapes every
time and must never ask the device for a number. What this module does for that:
- Static shapes: a micro-batch is padded to a length bucket (its longest example rounded up to a multiple of
  --length_multiple tokens), and its loss positions are listed on the host and padded to a loss bucket (a multiple
  of --loss_multiple). Padding slots weigh 0 in the loss, so the sums equal the dynamic path's.
- Static memory: each bucket has its own input buffers, filled before each micro-batch; every trainable
  parameter's `.grad` is a view of one flat buffer that backward accumulates into, the all-reduce reads and the
  optimizer step zeroes; the loss meters are device tensors the step adds to.
- Nothing read on the host: the optimizer is CapturableAdamW (steps and lr on the device); the token count that
  scales the loss is known on the host before the update starts.
- LoRA dropout draws from a generator of this updater, reseeded per micro-batch from (seed, rank, step,
  micro-batch); on CUDA it is registered with every graph, so a replay draws what an eager run would.

One update: for each micro-batch, forward + backward (one graph per bucket); with several processes, the gradient
all-reduce, eager, between the graphs; then clipping, AdamW and zeroing the gradients (one more graph).
Why the all-reduce stays outside: DDP's reducer works through autograd hooks and host-side bucket bookkeeping that
a replay would skip; one all-reduce of the flat gradient (LoRA: a few hundred thousand numbers) costs one
collective per update, as DDP's single bucket would, and needs no communicator inside a graph.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from steps.model.gpt2 import GPT2
from steps.model.lora import dropout_seed, use_dropout_generator
from steps.training.data import Example, collate
from steps.training.distributed import Dist
from steps.training.loss import static_lm_loss, token_mean_scale
from steps.training.optim import CapturableAdamW

Bucket = tuple[int, int]  # (padded length, padded number of loss positions)
STATIC_INPUTS = ("input", "index", "target", "weight")  # what a micro-batch copies into its bucket's buffers


def round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


@dataclass(frozen=True)
class Shapes:
    """How micro-batches are bucketed: lengths and loss-position counts rounded up to these multiples."""

    length_multiple: int
    loss_multiple: int
    max_length: int  # the model's positions: a length bucket never exceeds them

    def bucket(self, length: int, loss_positions: int, rows: int) -> Bucket:
        padded_length = min(round_up(length, self.length_multiple), max(length, self.max_length))
        # At least one slot (a micro-batch can have no loss position), never more than the positions there are.
        padded_positions = min(round_up(max(loss_positions, 1), self.loss_multiple), rows * padded_length)
        return padded_length, max(padded_positions, loss_positions)


def static_batch(examples: list[Example], shapes: Shapes, pad_to: int | None = None) -> dict[str, Any]:
    """A micro-batch on the host in its bucket's shapes: input [B, T], and the flat loss positions `index` [P]
    with their `target` ids and `weight`s, padding slots pointing at position 0 with weight 0.

    `pad_to` (--pad fixed) makes the batch that long before bucketing, as collate does."""
    dense = collate(examples, pad_to)
    rows, length = dense["input"].shape
    positions = dense["positions"]
    padded_length, padded_positions = shapes.bucket(length, len(positions), rows)
    # Positions index the [rows, length] grid of the collated batch; re-index them into [rows, padded_length].
    index = positions // length * padded_length + positions % length
    extra = padded_positions - len(positions)
    return {
        "input": F.pad(dense["input"], (0, padded_length - length)),
        "index": F.pad(index, (0, extra)),
        "target": F.pad(dense["target"].view(-1).index_select(0, positions), (0, extra)),
        "weight": F.pad(dense["mask"].view(-1).index_select(0, positions), (0, extra)),
        "tokens": dense["mask"].sum(),
        "bucket": (padded_length, padded_positions),
    }


class StaticUpdater:
    """Runs updates on static-shape micro-batches: eagerly, or by replaying one CUDA graph per bucket.

    `meters` are the trainer's device tensors "loss", "nll" and "tokens"; the step adds to them in place, so the
    trainer must zero them in place too (a graph keeps their addresses).
    """

    optimizer_class = CapturableAdamW

    def __init__(self, model: GPT2, optimizer: CapturableAdamW, meters: dict[str, Any], env: Dist, cfg: Any, *,
                 amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler | None = None):
        """`cfg`: the trainer's TrainConfig, resolved (`--shapes static`); `scaler` is unused (fp16 cannot run here)."""
        self.model, self.optimizer, self.meters = model, optimizer, meters
        self.label_smooth, self.clip, self.amp_dtype = cfg.label_smooth, cfg.clip, amp_dtype
        self.seed, self.rank, self.world = cfg.random_seed, env.rank, env.world
        self.shapes = Shapes(cfg.length_multiple, cfg.loss_multiple, model.config.n_positions)
        self.rows = cfg.train_batch_size
        self.pad_to = cfg.seq_len if cfg.pad == "fixed" else None
        use_graphs = cfg.cuda_graphs == "on"
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.device = self.trainable[0].device
        self.flat_grad = attach_flat_grads(self.trainable)
        if self.world > 1:  # what DDP's constructor does: every rank starts from rank 0's weights
            for p in self.trainable:
                dist.broadcast(p.data, src=0)
        self.generator = torch.Generator(device=self.device)
        use_dropout_generator(model, self.generator)
        self.scale = torch.zeros((), device=self.device)  # the update's token-mean scale, as the eager path
        self.use_graphs = use_graphs
        self.buffers: dict[Bucket, dict[str, torch.Tensor]] = {}
        self.graphs: dict[Bucket, Any] = {}
        self.optimizer_graph: Any = None
        self.eager_micro_batches = 0  # micro-batches whose bucket had no graph (graphs on): run eagerly, same result
        self.capture_error = ""  # why the graphs could not be recorded, when they could not (then the update runs eagerly)
        self.build_seconds = 0.0

    def prepare(self, micro_batches: list[list[Example]], pad_to: int | None) -> list[dict[str, Any]]:
        """Host tensors in each micro-batch's bucket shapes: the update copies them into the bucket's buffers."""
        return [static_batch(examples, self.shapes, pad_to) for examples in micro_batches]

    def describe(self) -> str:
        shapes = f"static shapes (length x{self.shapes.length_multiple}, loss positions x{self.shapes.loss_multiple})"
        if self.capture_error:
            return f"{shapes}, eager: the CUDA graphs could not be recorded ({self.capture_error}); --cuda_graphs off skips trying"
        if not self.use_graphs:
            return shapes + ", eager"
        return f"{shapes}, {len(self.graphs)} CUDA graphs recorded in {self.build_seconds:.1f} s"

    def buckets_of(self, micro_batches: Iterable[list[Example]]) -> set[Bucket]:
        """The buckets these micro-batches fall in (computed from their lengths alone, on the host)."""
        return {self.shapes.bucket(self.pad_to or max(len(e.input) for e in examples), sum(1 for e in examples for m in e.mask if m),
                                   len(examples)) for examples in micro_batches}

    # -- the step bodies: exactly what a graph records

    def micro_step(self, static: dict[str, torch.Tensor]) -> None:
        """Forward and backward of one micro-batch; gradients accumulate into the flat buffer."""
        # Autocast's cast cache must be off under capture: a cached cast would outlive the graph's memory.
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            loss_sum, nll_sum = static_lm_loss(self.model, static, self.label_smooth)
        (loss_sum * self.scale).backward()
        self.meters["loss"] += loss_sum.detach()
        self.meters["nll"] += nll_sum.detach()
        self.meters["tokens"] += static["weight"].sum()

    def optimizer_step(self) -> None:
        """Clipping, AdamW and zeroing the gradients for the next update."""
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.clip)
        self.optimizer.step()
        self.flat_grad.zero_()

    # -- one update

    def run_update(self, batches: list[dict[str, Any]], step: int) -> None:
        """One optimizer update over this rank's micro-batches (host tensors from `static_batch`)."""
        self.load_scale(sum(batch["tokens"] for batch in batches))
        for i, batch in enumerate(batches):
            static = self.buffers_for(batch["bucket"], batch["input"].shape[0])
            for name in STATIC_INPUTS:
                static[name].copy_(batch[name], non_blocking=True)
            # Dropout masks depend only on (seed, rank, step, micro-batch): a resumed run draws the same ones.
            # A replay reads this seed from the generator's device state (registered with the graph).
            self.generator.manual_seed(dropout_seed(self.seed, self.rank, step, i))
            graph = self.graphs.get(batch["bucket"])
            if graph is not None:
                graph.replay()
            else:
                self.eager_micro_batches += self.use_graphs
                self.micro_step(static)
        if self.world > 1:
            # DDP's arithmetic: each rank's gradient divided by the world size, then summed.
            self.flat_grad.div_(self.world)
            dist.all_reduce(self.flat_grad)
        self.optimizer.load_lr()  # the scheduler's lr for this update, read by the captured step from the device
        if self.optimizer_graph is not None:
            self.optimizer_graph.replay()
        else:
            self.optimizer_step()

    def load_scale(self, tokens: torch.Tensor) -> None:
        """The token-mean scale of the update (steps.training.loss.token_mean_scale), as the eager path computes it.

        Every copy here is non-blocking: a blocking host-to-device copy waits for the device's queue to drain, which
        would cost the replays their head start. One process computes the scale on the host; several sum their counts
        on the device first.
        """
        if self.world == 1:
            self.scale.copy_(token_mean_scale(self.world, tokens.float()), non_blocking=True)
            return
        counts = tokens.float().reshape(1).to(self.device, non_blocking=True)
        dist.all_reduce(counts)
        self.scale.copy_(token_mean_scale(self.world, counts).reshape(()))

    def buffers_for(self, bucket: Bucket, rows: int) -> dict[str, torch.Tensor]:
        if bucket not in self.buffers:
            length, positions = bucket
            self.buffers[bucket] = {
                "input": torch.zeros(rows, length, dtype=torch.long, device=self.device),
                "index": torch.zeros(positions, dtype=torch.long, device=self.device),
                "target": torch.zeros(positions, dtype=torch.long, device=self.device),
                "weight": torch.zeros(positions, device=self.device),
            }
        return self.buffers[bucket]

    # -- CUDA graphs

    def start(self, upcoming: Callable[[], Iterable[list[Example]]]) -> None:
        """Ready to train: optimizer state on the device and, with graphs, one graph for each bucket of the `upcoming`
        micro-batches (every one the run has left), recorded now.

        Call it after a resume has loaded the optimizer state (the graphs point at that state's memory).
        """
        self.optimizer.prepare()
        if self.use_graphs:
            started = time.perf_counter()
            try:
                self.capture(sorted(self.buckets_of(upcoming())), self.rows)
            except RuntimeError as exc:
                # A capture this GPU, driver or torch build refuses must not cost the run: the same static update,
                # eagerly (the result is the same; only the speed differs). The trainer reports it.
                self.graphs.clear()
                self.optimizer_graph, self.use_graphs = None, False
                self.capture_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.build_seconds += time.perf_counter() - started

    def capture(self, buckets: list[Bucket], rows: int) -> None:
        """Warm up every body eagerly on a side stream (PyTorch's recipe: lazy initialisations happen outside the
        capture), record the graphs, then put back every value the warm-up changed."""
        for bucket in buckets:  # the static inputs first, on the main stream, where each update fills them
            self.buffers_for(bucket, rows)
        saved = self.snapshot()
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for bucket in buckets:
                    self.micro_step(self.buffers[bucket])
                self.optimizer_step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            pool = None
            for bucket in buckets:
                self.graphs[bucket] = self.record(lambda b=bucket: self.micro_step(self.buffers[b]), pool)
                pool = pool or self.graphs[bucket].pool()  # one memory pool: graphs never run at the same time
            self.optimizer_graph = self.record(self.optimizer_step, pool)
            torch.cuda.synchronize(self.device)
        finally:
            self.restore(saved)  # also after a failed capture: the eager fallback starts from the same values

    def record(self, body: Any, pool: Any) -> Any:
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)  # dropout's seed and offset are read at replay time
        with torch.cuda.graph(graph, pool=pool):
            body()
        return graph

    def snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(tensor, copy) for everything a warm-up step changes: weights, optimizer state, meters, gradients."""
        tensors = [*self.trainable, self.flat_grad]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        tensors += [v for v in self.meters.values() if isinstance(v, torch.Tensor)]
        return [(t, t.detach().clone()) for t in tensors]

    @staticmethod
    @torch.no_grad()
    def restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for tensor, copy in saved:
            tensor.copy_(copy)  # in place: the graphs hold these addresses


def attach_flat_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """One zeroed buffer holding every parameter's gradient; each `.grad` becomes a view of it."""
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1:
        raise ValueError(f"trainable parameters of several dtypes ({dtypes}); the static update keeps one gradient buffer")
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat
