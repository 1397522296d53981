"""LoRA on GPT-2's fused q/k/v projection.

The original example puts loralib's `MergedLinear` on `c_attn` with q and v adapted and k frozen. We keep its
tensor layout (so adapters convert both ways by renaming keys only) but compute the update in low rank,
`dropout(x) A_g^T B_g^T * alpha/r` per adapted slice, instead of rebuilding a dense delta-W every step as the original did.

Layout, E = number of adapted projections (2 for q, v):
    lora_A: [r * E, n_embd]   rows [g*r, (g+1)*r) belong to the g-th adapted projection
    lora_B: [n_embd * E, r]   rows [g*n, (g+1)*n) likewise
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class LoRAConfig:
    r: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        bad = [t for t in self.targets if t not in QKV]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets must be a non-empty subset of q,k,v; got {','.join(self.targets)}")
        # Canonical q, k, v order: the row layout of lora_A/lora_B depends on it.
        object.__setattr__(self, "targets", tuple(t for t in QKV if t in self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def parse_targets(text: str) -> tuple[str, ...]:
    """'q,v' -> ('q', 'v')."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


class LoRAQKV(nn.Module):
    """`nn.Linear(n, 3n)` computing q, k, v, plus a low-rank update on the adapted slices."""

    def __init__(self, n_embd: int, lora: LoRAConfig | None):
        super().__init__()
        self.n_embd = n_embd
        self.weight = nn.Parameter(torch.empty(3 * n_embd, n_embd))
        self.bias = nn.Parameter(torch.zeros(3 * n_embd))
        nn.init.normal_(self.weight, std=0.02)
        self.lora = lora if lora is not None and lora.r > 0 else None
        self.merged = False
        if self.lora is None:
            return
        n_groups, r = len(self.lora.targets), self.lora.r
        self.register_buffer("slices", torch.tensor([QKV.index(t) for t in self.lora.targets]), persistent=False)
        self.lora_A = nn.Parameter(torch.empty(r * n_groups, n_embd))
        self.lora_B = nn.Parameter(torch.zeros(n_embd * n_groups, r))
        # loralib's init: Kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(n), 1/sqrt(n)); B = 0 so training starts at W.
        # Each layer draws its own A (the original deep-copied one block, giving every layer the same A).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = LoRADropout(self.lora.dropout) if self.lora.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora is None or self.merged:
            return y
        n_groups, r, n = len(self.lora.targets), self.lora.r, self.n_embd
        # One dropout mask shared by all adapted slices, as in the original.
        a = F.linear(self.dropout(x), self.lora_A).unflatten(-1, (n_groups, r))  # [..., E, r]
        delta = torch.einsum("...er,enr->...en", a, self.lora_B.view(n_groups, n, r)) * self.lora.scaling
        return y.unflatten(-1, (3, n)).index_add(-2, self.slices, delta.to(y.dtype)).flatten(-2)

    def delta_weight(self) -> torch.Tensor:
        """The dense update for the full [3n, n] weight (zeros on non-adapted slices)."""
        n_groups, r, n = len(self.lora.targets), self.lora.r, self.n_embd
        blocks = torch.bmm(self.lora_B.view(n_groups, n, r), self.lora_A.view(n_groups, r, n)) * self.lora.scaling
        full = torch.zeros(3, n, n, dtype=blocks.dtype, device=blocks.device)
        return full.index_copy(0, self.slices, blocks).view(3 * n, n)

    @torch.no_grad()
    def merge(self) -> None:
        if self.lora is None or self.merged:
            return
        self._unmerged_weight = self.weight.detach().clone()  # kept so unmerge is exact, not W + d - d
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight)
        del self._unmerged_weight
        self.merged = False


class LoRADropout(nn.Module):
    """Inverted dropout that draws its mask from a generator the trainer owns, not from torch's global one.

    The trainer reseeds that generator before every micro-batch (`dropout_seed`), so a mask depends only on
    (seed, rank, update, micro-batch): a resumed run draws the same masks, and nothing else in the process moves
    the stream. On CUDA the generator is registered with the update's CUDA graphs: a replay reads the seed set
    just before it (philox seed and offset live in device memory), so replayed dropout follows the same rule.
    Without a generator (the model used on its own) the global one is used, like nn.Dropout.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty_like(x).bernoulli_(1.0 - self.p, generator=self.generator)
        return x * keep * (1.0 / (1.0 - self.p))


def dropout_seed(seed: int, rank: int, step: int, micro_batch: int) -> int:
    """The dropout generator's seed for one micro-batch: a stable hash (the same in every process and Python)."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{step}:{micro_batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: every torch generator accepts it


def use_dropout_generator(model: nn.Module, generator: torch.Generator | None) -> None:
    """Make every LoRA dropout of `model` draw from `generator`."""
    for module in model.modules():
        if isinstance(module, LoRADropout):
            module.generator = generator


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors (what an adapter file holds), detached and on the CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if "lora_" in k}


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze everything but the LoRA matrices (loralib's bias='none')."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
