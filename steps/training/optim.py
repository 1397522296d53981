"""The original trainer's AdamW and learning-rate schedules (how and why they differ: docs/fidelity.md).

AdamW is the original's variant, reproduced exactly: eps is added to the *uncorrected* sqrt(v), the bias
correction is folded into the step size, and the decoupled weight decay comes *after* the Adam update, on the updated
weights, with the scheduled lr. `torch.optim.AdamW` differs slightly (eps on the corrected sqrt(v), decay first), so
switching to it would move results off the original's; see `benchmarks/bench_optim.py` for the speed side of that.

Schedules are LR multipliers of the number of *optimizer updates* so far (the original stepped its scheduler
every micro-batch; with grad_acc = 1 the two are identical). `build_scheduler` wraps them in a `LambdaLR`, so the lr
used by update k (1-based) is base_lr * lr_multiplier(k - 1), exactly as in the original.

Plain PyTorch: no Prefect, MLflow or DVC here.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

# Every name `--scheduler` accepts. `cosine_reference` is the original cosine (kept for parity runs); `cosine` is
# the standard warmup-then-cosine, decaying over the steps after warmup.
SCHEDULES = ("linear", "constant", "cosine", "cosine_reference", "cycle", "inv_sqrt", "dev_perf", "none")

# Names that mean "no schedule, constant lr". The original accepted `inv_sqrt` and `dev_perf` but silently built
# no scheduler for them; we keep accepting them for CLI compatibility and the trainer warns.
NO_SCHEDULE = ("inv_sqrt", "dev_perf", "none")

LAYER_NORMS = ("ln_1", "ln_2", "ln_f")  # GPT-2's LayerNorm module names (the original matched `layer_norm.weight`)


# --------------------------------------------------------------------------------------------------- AdamW


class AdamW(torch.optim.Optimizer):
    """AdamW exactly as the original trainer computes it, as one multi-tensor pass per group.

    Per parameter p with gradient g and update count t = 1, 2, ...:
        m <- b1*m + (1-b1)*g ;  v <- b2*v + (1-b2)*g^2 ;  denom = sqrt(v) + eps
        step = lr * sqrt(1-b2^t) / (1-b1^t)   if correct_bias else lr
        p <- p - step * m / denom ;  then  p <- p - lr*wd*p
    Parameters whose grad is None are skipped (their moments, step count and weights stay as they are).

    The step count t is a Python int per parameter (state["step"], like the original, so parameters that miss a
    gradient now and then keep their own t). Bias corrections are computed in Python doubles, as in the original,
    so nothing reads a device value on the host (no sync) and, on CPU, results are bitwise those of the original
    per-parameter loop. The state holds only ints and tensors, so `state_dict()` loads with
    `torch.load(weights_only=True)`.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {float(lr)}: expected >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        if eps < 0.0:
            raise ValueError(f"invalid eps {eps}: expected >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}: expected >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, states = self._gather(group)
            if params:
                _update_moments(group, grads, exp_avgs, exp_avg_sqs)
                self._apply_update(group, params, exp_avgs, exp_avg_sqs, states)
        return loss

    def _gather(self, group: dict) -> tuple[list, list, list, list, list]:
        """The parameters of `group` that have a gradient, with their (lazily created) state."""
        params, grads, exp_avgs, exp_avg_sqs, states = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            states.append(state)
        return params, grads, exp_avgs, exp_avg_sqs, states

    def _apply_update(self, group: dict, params: list, exp_avgs: list, exp_avg_sqs: list, states: list) -> None:
        """Update and decay with step sizes computed on the host from int step counts (no device reads)."""
        lr = float(group["lr"])
        for state in states:
            state["step"] += 1
        sizes: dict[int, float] = {}  # usually every parameter shares one t
        neg_step_sizes = []
        for state in states:
            t = state["step"]
            if t not in sizes:
                sizes[t] = -reference_step_size(lr, group["betas"], t, group["correct_bias"])
            neg_step_sizes.append(sizes[t])
        denoms = adam_denominators(group, exp_avg_sqs)
        if len(sizes) == 1:
            torch._foreach_addcdiv_(params, exp_avgs, denoms, value=neg_step_sizes[0])
        else:
            torch._foreach_addcdiv_(params, exp_avgs, denoms, neg_step_sizes)
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(params, params, alpha=-lr * group["weight_decay"])  # after the update, on the new p


def _update_moments(group: dict, grads: list, exp_avgs: list, exp_avg_sqs: list) -> None:
    """m <- b1*m + (1-b1)*g ; v <- b2*v + (1-b2)*g*g, with the original's op order (bitwise on CPU)."""
    beta1, beta2 = group["betas"]
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)


def adam_denominators(group: dict, exp_avg_sqs: list) -> list:
    """sqrt(v) + eps: eps on the *uncorrected* sqrt(v) (the original's; torch adds it after the bias correction)."""
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, group["eps"])
    return denoms


def reference_step_size(lr: float, betas: tuple[float, float], t: int, correct_bias: bool) -> float:
    """The original's step size for update t, in Python doubles: lr * sqrt(1 - b2^t) / (1 - b1^t)."""
    if not correct_bias:
        return lr
    beta1, beta2 = betas
    return lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)


def param_groups_for(
    model_named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float, no_decay_bias: bool
) -> list[dict]:
    """Optimizer groups over the *trainable* parameters only (the original passed frozen weights too).

    With `no_decay_bias`, biases (`*.bias`) and LayerNorm weights (`ln_1`, `ln_2`, `ln_f`) get weight_decay 0;
    the original's pattern `layer_norm.weight` never matched GPT-2's names. Empty groups are left out.
    """
    decay, no_decay = [], []
    for name, p in model_named_params:
        if not p.requires_grad:
            continue
        (no_decay if no_decay_bias and _is_bias_or_layer_norm(name) else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters; mark the LoRA parameters trainable before building the optimizer")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _is_bias_or_layer_norm(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "bias" or (parts[-1] == "weight" and len(parts) > 1 and parts[-2] in LAYER_NORMS)


# --------------------------------------------------------------------------------------------------- schedules


def parse_cycle(i_steps: str | Sequence[int], i_lrs: str | Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """'0,4,8' and '0,1,0.5' -> ((0, 4, 8), (0.0, 1.0, 0.5)), validated (the original crashed or misbehaved)."""
    steps = _parse_cycle_steps(i_steps)
    try:
        lrs = tuple(float(x) for x in (i_lrs.split(",") if isinstance(i_lrs, str) else i_lrs))
    except ValueError:
        raise ValueError(f"--i_lrs must be comma-separated floats, e.g. '0,0.0002,0'; got {i_lrs!r}") from None
    if len(steps) != len(lrs):
        raise ValueError(f"--i_steps and --i_lrs need the same number of entries; got {len(steps)} steps and {len(lrs)} lrs")
    return steps, lrs


def _parse_cycle_steps(i_steps: str | Sequence[int]) -> tuple[int, ...]:
    try:
        steps = tuple(int(x) for x in (i_steps.split(",") if isinstance(i_steps, str) else i_steps))
    except ValueError:
        raise ValueError(f"--i_steps must be comma-separated integers, e.g. '0,500,1000'; got {i_steps!r}") from None
    if not steps:
        raise ValueError("--i_steps is empty; give at least one step")
    if any(b < a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"--i_steps must be non-decreasing; got {i_steps!r}")
    return steps


def cycle_max_step(i_steps: str | Sequence[int]) -> int:
    """The max_step the original forces for `cycle` (the last interval step; 0 with the default '0')."""
    return _parse_cycle_steps(i_steps)[-1]


def lr_multiplier(
    name: str,
    s: int,
    warmup_step: int,
    max_step: int | None,
    i_steps: str | Sequence[int] | None = None,
    i_lrs: str | Sequence[float] | None = None,
) -> float:
    """The schedule's value after s updates (the lr of update s+1 is base_lr times this).

    For `cycle` the value is the absolute lr (the original's `--i_lrs` are learning rates and `--lr` is ignored);
    `build_scheduler` arranges a base of 1.0 for it.
    """
    _check_name(name)
    if name in NO_SCHEDULE:
        return 1.0
    if name == "cycle":
        steps, lrs = parse_cycle(i_steps if i_steps is not None else "0", i_lrs if i_lrs is not None else "0.00025")
        return _cycle(s, steps, lrs)
    if name == "constant":
        return _warmup(s, warmup_step) if s < warmup_step else 1.0
    if name == "linear":
        if s < warmup_step:
            return _warmup(s, warmup_step)
        return max(0.0, float(max_step - s) / float(max(1, max_step - warmup_step)))
    if name == "cosine":
        if s < warmup_step:
            return _warmup(s, warmup_step)
        progress = min(1.0, float(s - warmup_step) / float(max(1, max_step - warmup_step)))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return _cosine_reference(s, warmup_step, max_step)


def _warmup(s: int, warmup_step: int) -> float:
    return float(s) / float(max(1, warmup_step))


def _cosine_reference(s: int, warmup_step: int, max_step: int) -> float:
    """The original `CosineAnnealingWarmupRestarts` (alpha 0, min_lr 0): lr 0 at s = 0 even without warmup, and
    the cosine measured from step 0 rather than from the end of warmup, so the lr jumps down at s = W."""
    if s == 0:
        return 0.0  # the original forces min_lr after construction
    if s < warmup_step:
        return float(s) / float(warmup_step)
    return 0.5 * (1.0 + math.cos(math.pi * min(s, max_step) / max_step))


def _cycle(s: int, steps: tuple[int, ...], lrs: tuple[float, ...]) -> float:
    """Piecewise-linear through (steps[k], lrs[k]), the original's +1e-6 in each interval length included."""
    if s == 0:
        return lrs[0]  # the original forces i_lrs[0] after construction
    for k in range(len(steps) - 1):
        if steps[k] <= s < steps[k + 1]:
            frac = (s - steps[k]) / (steps[k + 1] - steps[k] + 1e-6)
            frac = min(max(frac, 0.0), 1.0)
            return frac * lrs[k + 1] + (1.0 - frac) * lrs[k]
    return lrs[-1]


def _check_name(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULES)}")


def _check_lengths(name: str, warmup_step: int, max_step: int | None) -> None:
    if warmup_step < 0:
        raise ValueError(f"--warmup_step must be >= 0; got {warmup_step}")
    if name in ("linear", "cosine") and (max_step is None or max_step < 0):
        raise ValueError(f"the {name} schedule needs --max_step >= 0 (or --max_epoch to derive it); got {max_step}")
    if name == "cosine_reference" and (max_step is None or max_step < 1):
        raise ValueError(f"the cosine_reference schedule needs --max_step >= 1; got {max_step}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    warmup_step: int,
    max_step: int | None,
    i_steps: str | Sequence[int] = "0",
    i_lrs: str | Sequence[float] = "0.00025",
) -> LambdaLR:
    """A `LambdaLR` over `lr_multiplier`; call `.step()` once per optimizer update (not per micro-batch).

    Every name gives a scheduler (the no-schedule names a constant 1.0), so the trainer can always step it and
    save its state. For `cycle`, pass `max_step=cycle_max_step(i_steps)` if you want the original's overwrite, and
    note each group's `initial_lr` is set to 1.0 so that the group lr equals the interpolated `--i_lrs` value.
    Resume: build the optimizer and this scheduler as for a fresh run, then `optimizer.load_state_dict(...)` and
    `scheduler.load_state_dict(...)`; the schedule parameters come from the arguments, not from the saved state.
    """
    _check_name(name)
    _check_lengths(name, warmup_step, max_step)
    steps, lrs = parse_cycle(i_steps, i_lrs) if name == "cycle" else (None, None)
    if name == "cycle":
        for group in optimizer.param_groups:
            group["initial_lr"] = 1.0
    multiplier = functools.partial(lr_multiplier, name, warmup_step=warmup_step, max_step=max_step, i_steps=steps, i_lrs=lrs)
    return LambdaLR(optimizer, multiplier)


# --------------------------------------------------------------------------------------------------- capturable AdamW


class CapturableAdamW(AdamW):
    """The same AdamW with every number of its step on the device, so a CUDA graph can record the step.

    AdamW above keeps step counts as Python ints and computes the bias corrections on the host: exact and sync-free,
    but a graph would bake those host numbers into its kernels. Here each parameter's step count is a float32 0-d
    tensor on its device, the bias corrections are computed there, and the learning rate is read from a 0-d device
    tensor per group. Results equal AdamW's up to fp32 rounding (the step size is computed in fp32, not in doubles).

    The schedule keeps setting `group["lr"]` as a float. An eager `step()` copies it to the device tensor first; a
    captured step cannot (the copy would be recorded with the capture-time value), so whoever replays the graph calls
    `load_lr()` before each replay. `prepare()` creates every state tensor up front: a capture must find them.
    `state_dict()` saves int step counts, the format AdamW reads, so resume states move between the two either way.
    On a CPU this path is slower than AdamW's (many 0-d tensor ops): it exists for the static-shape update.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._device_lrs: list[torch.Tensor] = []

    def prepare(self) -> None:
        """Every state tensor and the device learning rates, created now (a captured step must not allocate them)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                _device_step_count(state, p)
        self.load_lr()

    def load_lr(self) -> None:
        """Copy each group's scheduled lr to its device tensor (outside any graph: a device-side fill, no sync)."""
        if not self._device_lrs:
            self._device_lrs = [torch.zeros((), dtype=torch.float32, device=g["params"][0].device) for g in self.param_groups]
        for group, lr in zip(self.param_groups, self._device_lrs):
            lr.fill_(float(group["lr"]))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        if not _capturing():
            self.load_lr()
        return super().step(closure)

    def _apply_update(self, group: dict, params: list, exp_avgs: list, exp_avg_sqs: list, states: list) -> None:
        lr = self._device_lrs[next(i for i, g in enumerate(self.param_groups) if g is group)]  # by identity: == compares tensors
        beta1, beta2 = group["betas"]
        steps = [_device_step_count(state, p) for state, p in zip(states, params)]
        torch._foreach_add_(steps, 1.0)
        denoms = adam_denominators(group, exp_avg_sqs)
        if group["correct_bias"]:
            # step_size = lr * sqrt(1 - b2^t) / (1 - b1^t), one 0-d tensor per parameter
            correction1 = torch._foreach_pow(beta1, steps)
            torch._foreach_neg_(correction1)
            torch._foreach_add_(correction1, 1.0)
            step_sizes = torch._foreach_pow(beta2, steps)
            torch._foreach_neg_(step_sizes)
            torch._foreach_add_(step_sizes, 1.0)
            torch._foreach_sqrt_(step_sizes)
            torch._foreach_div_(step_sizes, correction1)
            torch._foreach_mul_(step_sizes, lr)
            torch._foreach_div_(denoms, step_sizes)  # p - m / (denom / step) == p - step * m / denom
        else:
            torch._foreach_div_(denoms, lr)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-1.0)
        if group["weight_decay"] > 0.0:
            torch._foreach_add_(params, torch._foreach_mul(params, -lr * group["weight_decay"]))  # after the update

    def state_dict(self) -> dict:
        """The state with int step counts (one host read per parameter: call it between steps, never in a capture)."""
        saved = super().state_dict()
        saved["state"] = {key: {**state, "step": int(state["step"])} for key, state in saved["state"].items()}
        return saved


def _device_step_count(state: dict, p: torch.Tensor) -> torch.Tensor:
    """The parameter's step count as a float32 0-d tensor on its device (converted once, e.g. after a resume)."""
    step = state["step"]
    if not isinstance(step, torch.Tensor) or step.device != p.device:
        state["step"] = torch.as_tensor(float(step), dtype=torch.float32, device=p.device)
    return state["step"]


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
