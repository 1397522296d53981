"""The project's AdamW with its whole step on the device, so a CUDA graph can record it (bench_train's graph variant).

steps.optim.AdamW keeps the step count t as a Python int and computes the bias corrections on the host: exact and
sync-free, but a graph would bake those host numbers in. Here t is a float32 0-d tensor per parameter on its device
and all the bias-correction arithmetic runs there. Give `lr` as a 0-d tensor on the parameter device: `LambdaLR`
updates a tensor lr in place (`fill_`), which a captured graph sees; a Python float lr would be baked into the graph.
Results equal steps.optim.AdamW's up to fp32 rounding (the step size is computed in fp32).

On a CPU this path is slower (many 0-d tensor ops; see bench_optim.py): it exists for CUDA graphs only.
"""

from __future__ import annotations

import torch

from steps.optim import AdamW, adam_denominators


class CapturableAdamW(AdamW):
    """steps.optim.AdamW with device-side step counts and step sizes (graph-capturable).

    Resuming works both ways: int step counts from a steps.optim.AdamW state become device tensors on the next
    step, and `state_dict()` saves them as ints again, the format steps.optim.AdamW reads.
    """

    def _apply_update(self, group: dict, params: list, exp_avgs: list, exp_avg_sqs: list, states: list) -> None:
        lr = group["lr"]
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
            torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-1.0)
        elif isinstance(lr, torch.Tensor):
            torch._foreach_div_(denoms, lr)
            torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-1.0)
        else:
            torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-lr)
        if group["weight_decay"] > 0.0:
            decay = torch._foreach_mul(params, -lr * group["weight_decay"])  # a 0-d tensor when lr is one
            torch._foreach_add_(params, decay)

    def state_dict(self) -> dict:
        """The state with int step counts (one host read per parameter: call it outside a captured graph)."""
        saved = super().state_dict()
        saved["state"] = {key: {**state, "step": int(state["step"])} for key, state in saved["state"].items()}
        return saved


def _device_step_count(state: dict, p: torch.Tensor) -> torch.Tensor:
    """The parameter's step count as a float32 0-d tensor on its device (converted once, e.g. after a resume)."""
    step = state["step"]
    if not isinstance(step, torch.Tensor) or step.device != p.device:
        state["step"] = torch.as_tensor(float(step), dtype=torch.float32, device=p.device)
    return state["step"]
