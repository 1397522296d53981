"""Per-step time of our reference AdamW against torch.optim.AdamW, on GPT-2 M sized LoRA parameters.

48 tensors, as the trainer sees them for GPT-2 M with r=4 on q,v: 24 layers x lora_A [8, 1024] and lora_B [2048, 4].
Only the optimizer step is timed (gradients are fixed random tensors).

    .venv/bin/python benchmarks/bench_optim.py                 # CPU
    .venv/bin/python benchmarks/bench_optim.py --device cuda   # on a GPU machine

Measured on the 2-core CPU dev box (torch 2.13 CPU, shared, --threads 1, median us/step): original loop 875,
ours 712, ours capturable 2411 (steps.training.optim.CapturableAdamW, then in benchmarks/; many 0-d tensor ops: meant for CUDA graphs only),
torch foreach 885, torch fused 273. torch's fused kernel is ~2.6x faster on CPU but computes a different formula
(eps after the bias correction, weight decay before the update; docs/fidelity.md); at well under 1 ms per update
the optimizer is not where CPU time goes, so the trainer keeps the original's exact AdamW.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script: `benchmarks`, `steps` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from steps.training.optim import AdamW, CapturableAdamW

SETTINGS = dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)


def lora_parameters(device: str, n_layer: int = 24, n_embd: int = 1024, r: int = 4) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    params = []
    for _ in range(n_layer):
        params.append(nn.Parameter(torch.randn(2 * r, n_embd, generator=g).to(device)))
        params.append(nn.Parameter(torch.randn(2 * n_embd, r, generator=g).to(device)))
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-3
    return params


class OriginalLoop:
    """The reference trainer's AdamW as it was written: one Python iteration and ~8 small ops per parameter."""

    def __init__(self, params: list[nn.Parameter], lr, betas, eps, weight_decay):
        self.params, self.lr, self.betas, self.eps, self.wd = params, lr, betas, eps, weight_decay
        self.state = [dict(step=0, m=torch.zeros_like(p), v=torch.zeros_like(p)) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        for p, st in zip(self.params, self.state):
            st["step"] += 1
            st["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
            st["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = st["v"].sqrt().add_(self.eps)
            step_size = self.lr * math.sqrt(1 - b2 ** st["step"]) / (1 - b1 ** st["step"])
            p.addcdiv_(st["m"], denom, value=-step_size)
            p.add_(p, alpha=-self.lr * self.wd)


def candidates(device: str) -> dict[str, Callable[[list[nn.Parameter]], object]]:
    return {
        "original per-parameter loop": lambda ps: OriginalLoop(ps, **SETTINGS),
        "ours (steps.training.optim.AdamW)": lambda ps: AdamW(ps, correct_bias=True, **SETTINGS),
        "ours, capturable": lambda ps: CapturableAdamW(ps, correct_bias=True, **SETTINGS),
        "torch AdamW foreach=True": lambda ps: torch.optim.AdamW(ps, foreach=True, **SETTINGS),
        "torch AdamW fused=True": lambda ps: torch.optim.AdamW(ps, fused=True, **SETTINGS),
    }


def time_steps(optimizer, steps: int, warmup: int, device: str) -> list[float]:
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        optimizer.step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    parser.add_argument("--steps", type=int, default=300, help="timed optimizer steps per candidate (default: 300)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first, to create state and warm caches (default: 20)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for name, make in candidates(args.device).items():
        params = lora_parameters(args.device)
        try:
            optimizer = make(params)
            times = time_steps(optimizer, args.steps, args.warmup, args.device)
        except (RuntimeError, ValueError) as exc:  # e.g. fused AdamW unsupported on this device or build
            rows.append((name, None, None, str(exc).splitlines()[0][:60]))
            continue
        rows.append((name, statistics.median(times) * 1e6, min(times) * 1e6, ""))

    numel = sum(p.numel() for p in lora_parameters("cpu"))
    print(f"AdamW step, 48 LoRA tensors ({numel:,} values), device={args.device}, torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, {args.steps} steps")
    print(f"{'candidate':32} {'median us':>10} {'min us':>10}  note")
    ours = next(r[1] for r in rows if r[0].startswith("ours (steps"))
    for name, median, fastest, note in rows:
        if median is None:
            print(f"{name:32} {'-':>10} {'-':>10}  unavailable: {note}")
        else:
            print(f"{name:32} {median:10.1f} {fastest:10.1f}  {median / ours:.2f}x ours")
    timed = [r for r in rows if r[1] is not None]
    best = min(timed, key=lambda r: r[1])
    print(f"summary: fastest is {best[0]} at {best[1]:.1f} us/step; ours {ours:.1f} us/step")


if __name__ == "__main__":
    main()
