"""GPT-2, readable top to bottom.

Same architecture and numerics as the original LoRA example's model.py (and Hugging Face's GPT-2):
pre-LayerNorm blocks, tanh-approximated GELU, learned positions, LM head tied to the token embedding,
no dropout anywhere (the only dropout lives in the LoRA branch). Weights use `nn.Linear`'s (out, in)
layout; `steps.formats.checkpoints` transposes Hugging Face's Conv1D (in, out) weights on load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from steps.model.lora import LoRAConfig, LoRAQKV


class KVCache:
    """One layer's keys and values, each [batch, heads, positions, head_dim], for step-by-step decoding.

    A forward pass without a cache returns the prompt's keys and values wrapped as they are (no copy).
    `reserve` then moves them once into buffers with room for the whole generation, and each later step writes its
    new position in place. (Concatenating instead copies the whole cache in every layer at every step: beam search
    over E2E, 160 beam rows of GPT-2 S on a CPU, ran 1.2x slower that way.)
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.length = k.shape[2]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def cached(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the keys and values of every position written so far."""
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` positions: the cached ones are copied once into larger buffers."""
        if capacity > self.capacity:
            self.k, self.v = self._copied(self.k, capacity), self._copied(self.v, capacity)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions after the cached ones; return views of everything cached so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; {end} were asked for (reserve more)")
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        self.length = end
        return self.cached()

    def select_rows(self, rows: torch.Tensor, same_before: int = 0) -> None:
        """Row i takes the contents of old row rows[i] (beam search: the cache follows its beams).

        The caller promises that positions < `same_before` are equal in each row and its source row (every beam
        of a query shares the query's prompt), so only later positions are copied, in place. When the number of
        rows changes, all cached positions are copied into new buffers.
        """
        if rows.numel() != self.k.shape[0]:
            self.k, self.v = self._copied(self.k, self.capacity, rows), self._copied(self.v, self.capacity, rows)
        elif same_before < self.length:
            moved = slice(same_before, self.length)
            for buffer in (self.k, self.v):
                buffer[:, :, moved] = buffer[:, :, moved].index_select(0, rows)

    def _copied(self, buffer: torch.Tensor, capacity: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """A new buffer of `capacity` positions holding the cached positions of `rows` (default: every row)."""
        cached = buffer[:, :, : self.length]
        if rows is not None:
            cached = cached.index_select(0, rows)
        B, H, _, D = cached.shape
        out = buffer.new_empty(B, H, capacity, D)
        out[:, :, : self.length] = cached
        return out


@dataclass(frozen=True)
class GPT2Config:
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    vocab_size: int = 50257
    n_positions: int = 1024
    layer_norm_epsilon: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# The original's model cards, plus a tiny one for tests and CPU demos (same vocabulary, so real token ids work).
CARDS: dict[str, GPT2Config] = {
    "gpt2.sm": GPT2Config(n_embd=768, n_layer=12, n_head=12),
    "gpt2.md": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2.lg": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2.tiny": GPT2Config(n_embd=128, n_layer=2, n_head=2),
}


def card(name: str) -> GPT2Config:
    """Look up a model card by name, with an error that lists the choices."""
    if name not in CARDS:
        from steps.core.common import InputError

        raise InputError(f"unknown model card {name!r}; choose one of {', '.join(CARDS)}")
    return CARDS[name]


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, lora: LoRAConfig | None):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = LoRAQKV(cfg.n_embd, lora)  # fused q, k, v projection with optional LoRA on some of them
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None, attn_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, KVCache]:
        B, T, C = x.shape  # batch, new positions, channels
        q, k, v = self.c_attn(x).split(C, dim=2)  # each [B, T, C]
        # [B, T, C] -> [B, T, n_head, head_dim] -> [B, n_head, T, head_dim]: each head attends on its own
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            cache = KVCache(k, v)  # this call's keys and values, kept for a later step
        else:
            k, v = cache.append(k, v)  # [B, n_head, cached + T, head_dim]
        # Without a mask: plain causal attention over T positions, or one new token attending to the whole cache.
        # (`hidden` passes a mask whenever several new tokens follow a cache, or the batch is left-padded.)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1)
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, n_head, T, head_dim] -> [B, T, n_head, head_dim] -> [B, T, C]
        return self.c_proj(y), cache


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, lora: LoRAConfig | None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, lora)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None, attn_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, KVCache]:
        a, cache = self.attn(self.ln_1(x), cache, attn_mask)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, cache


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config, lora: LoRAConfig | None = None):
        super().__init__()
        self.config = cfg
        self.lora_config = lora
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg, lora) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self._head_weight: torch.Tensor | None = None  # low-precision copy of wte for the LM head (training only)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02) weights, zero biases. LoRA keeps its own init (A Kaiming, B zero).

        Pretrained weights overwrite all of this; it matters for random bases (tests, the offline demo).
        """
        for name, p in self.named_parameters():
            if "lora_" in name:
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln_" in name:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)

    def hidden(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past: list[KVCache] | None = None,
    ) -> tuple[torch.Tensor, list[KVCache]]:
        """Final hidden states [B, T, C] (after ln_f) and the per-layer KV cache.

        `attention_mask` ([B, T_total] bool, True = real token) is only needed for left-padded batches;
        without it attention is plain causal (right padding is harmless: padded positions come last).
        `past`: the cache a previous call returned (with room reserved for T more positions); it is extended in
        place and returned. Without `past`, the returned cache holds this call's positions.
        """
        B, T = input_ids.shape
        past_len = 0 if past is None else past[0].length
        if position_ids is None:
            if past_len + T > self.config.n_positions:  # host integers: no device sync in the hot path
                raise ValueError(f"sequence of {past_len + T} tokens exceeds n_positions={self.config.n_positions}")
            position_ids = torch.arange(past_len, past_len + T, device=input_ids.device).unsqueeze(0)
        x = self.wte(input_ids) + self.wpe(position_ids)
        if attention_mask is None and past is not None and T > 1:  # several new tokens over a cache: causal with offset
            attention_mask = torch.ones(B, past_len + T, dtype=torch.bool, device=input_ids.device)
        mask = None if attention_mask is None else _attention_bias(attention_mask, T)
        caches = []
        for i, block in enumerate(self.h):
            x, cache = block(x, None if past is None else past[i], mask)
            caches.append(cache)
        return self.ln_f(x), caches

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tied LM head: hidden @ wte^T. Called only on the positions that need logits."""
        head = self.wte.weight if self._head_weight is None else self._head_weight
        return F.linear(hidden, head)

    def store_frozen_matrices_in(self, dtype: torch.dtype) -> None:
        """Keep the frozen weight matrices in `dtype` (bf16/fp16) for autocast training.

        Autocast casts a weight that does not require grad again at every use: for GPT-2 S on a CPU those casts
        took a third of a bf16 step. Casting once gives the very same bf16 values, so losses are unchanged.
        Biases, LayerNorms and the embedding lookups stay fp32 (autocast keeps those ops in fp32); the LM head
        gets its own low-precision copy of the tied embedding.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear | LoRAQKV) and not module.weight.requires_grad:
                module.weight.data = module.weight.data.to(dtype)
        if not self.wte.weight.requires_grad:
            self._head_weight = self.wte.weight.detach().to(dtype)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.logits(self.hidden(input_ids, **kwargs)[0])

    def merge_lora(self) -> None:
        """Fold every LoRA update into its base weight (inference: no extra matmuls)."""
        for block in self.h:
            block.attn.c_attn.merge()

    def unmerge_lora(self) -> None:
        """Undo `merge_lora` exactly (the unmerged weight is restored bit for bit)."""
        for block in self.h:
            block.attn.c_attn.unmerge()


def _attention_bias(key_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean [B, 1, T, T_total] mask: causal over the last q_len positions, padding keys hidden.

    A query always sees itself, so a padding query never has an empty row (SDPA would return NaN there);
    its output is unused anyway.
    """
    t_total = key_mask.shape[1]
    q_pos = torch.arange(t_total - q_len, t_total, device=key_mask.device).unsqueeze(1)
    k_pos = torch.arange(t_total, device=key_mask.device).unsqueeze(0)
    causal = k_pos <= q_pos
    allowed = causal.unsqueeze(0) & key_mask.unsqueeze(1)
    allowed = allowed | (k_pos == q_pos).unsqueeze(0)
    return allowed.unsqueeze(1)

