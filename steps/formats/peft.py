"""The PEFT LoRA format for GPT-2's fused `c_attn`, both ways: our adapter as a PEFT directory, and a PEFT
directory (ours, or trained with PEFT) as our adapter, exactly or not at all.

Our LoRA adapts E of the three slices q, k, v of `c_attn`, each slice g with its own rank-r pair (A_g, B_g)
and the scaling alpha/r. PEFT adapts the whole `c_attn` with one pair (A, B) of rank R and the scaling
lora_alpha/R. Stacking the A_g gives A (R = E*r rows); B [3n, R] holds B_g in slice g's rows and group g's
columns, zeros elsewhere, so B @ A is exactly our block update; lora_alpha = alpha*E keeps the scaling.
docs/export.md has the details and the limits.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from steps.core.common import InputError, atomic_write, write_json
from steps.formats.checkpoints import (
    ADAPTER_FORMAT,
    ADAPTER_VERSION,
    OUR_KEY,
    UNKNOWN_BASE,
    base_identity,
    check_adapter,
    check_adapter_config,
    check_tensor_values,
    read_tensors,
    stable_safetensors_bytes,
)
from steps.model.gpt2 import CARDS
from steps.model.lora import QKV

PEFT_CONFIG = "adapter_config.json"  # the same name as ours: a directory holds one kind or the other
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"  # what PEFT wrote before safetensors became its default
# Our full adapter config rides in the safetensors metadata of an exported PEFT file, so importing our own export
# gives back the very same config (and layout). PEFT rewrites the metadata when it saves, so a file that PEFT
# has re-saved (say, after more training) carries none, and is read from its tensors alone.
METADATA_KEY = "nlg_lora_adapter_config"

# PEFT keys for GPT-2's c_attn: GPT2LMHeadModel under PeftModelForCausalLM (`base_model.model.transformer.h.N...`),
# also GPT2Model (`base_model.model.h.N...`) and the adapter-named spelling (`lora_A.default.weight`).
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.)?h\.(\d+)\.attn\.c_attn\.lora_([AB])(?:\.default)?\.weight$")


def peft_key(layer: int, which: str) -> str:
    """The key PEFT's `get_peft_model_state_dict` uses for GPT2LMHeadModel's c_attn LoRA tensors."""
    return f"base_model.model.transformer.h.{layer}.attn.c_attn.lora_{which}.weight"


# ----------------------------------------------------------------------------------------------- reading any adapter


def is_peft_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / PEFT_WEIGHTS).is_file() or (path / PEFT_WEIGHTS_BIN).is_file())


# ----------------------------------------------------------------------------------------------- ours -> PEFT


# ----------------------------------------------------------------------------------------------- merged / ours


def to_peft_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our per-slice blocks as one rank-(E*r) LoRA on the whole c_attn (B zero outside each slice's own block)."""
    n, r = config["n_embd"], config["r"]
    out = {}
    for layer in range(config["n_layer"]):
        lora_a = tensors[OUR_KEY.format(layer=layer, which="A")]
        lora_b = tensors[OUR_KEY.format(layer=layer, which="B")]
        full_b = lora_b.new_zeros(3 * n, r * len(config["targets"]))
        for g, target in enumerate(config["targets"]):
            s = QKV.index(target)
            full_b[s * n : (s + 1) * n, g * r : (g + 1) * r] = lora_b[g * n : (g + 1) * n]
        out[peft_key(layer, "A")] = lora_a.contiguous()
        out[peft_key(layer, "B")] = full_b
    return out


def peft_config(config: dict[str, Any], base_model: str | None) -> dict[str, Any]:
    """adapter_config.json for PEFT: keys every PEFT release since 0.12 knows (newer ones fill in the rest)."""
    n_groups = len(config["targets"])
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "revision": None,
        "inference_mode": True,
        "r": config["r"] * n_groups,
        "lora_alpha": config["alpha"] * n_groups,  # PEFT scales by lora_alpha / (E*r) = alpha / r
        "lora_dropout": config.get("dropout", 0.0),
        "target_modules": ["c_attn"],
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores weights [in, out]; PEFT transposes its delta on merge
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_peft(tensors: dict[str, torch.Tensor], config: dict[str, Any], out_dir: Path, base_model: str | None) -> None:
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config)}  # two keys: written in sorted order, same bytes every run
    with atomic_write(out_dir / PEFT_WEIGHTS, "wb") as f:
        f.write(stable_safetensors_bytes(to_peft_tensors(tensors, config), metadata=metadata))
    write_json(out_dir / PEFT_CONFIG, peft_config(config, base_model))


def default_base_model(init_checkpoint: str | os.PathLike | None) -> str | None:
    """A base checkpoint inside a Hugging Face model directory (one with config.json) names that directory."""
    if init_checkpoint and (Path(init_checkpoint).parent / "config.json").is_file():
        return str(Path(init_checkpoint).parent.resolve())
    return None


# ----------------------------------------------------------------------------------------------- PEFT -> ours


def read_peft_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a PEFT LoRA adapter for GPT-2's c_attn as our adapter tensors and config, exactly.

    Our own export comes back as it went out (same tensors, same config). An adapter trained with PEFT (rank R,
    all of c_attn) becomes: targets = the slices its B touches, with one of two exact layouts. If B is
    block-diagonal (slice g uses only columns [g*R/E, (g+1)*R/E)), rank R/E with A's row blocks as the A_g;
    otherwise rank R with A repeated for every target (more tensor memory, same update).
    Anything else (other modules, DoRA, trained biases, per-layer scalings) cannot be represented and is refused.
    """
    path = Path(path)
    config_path, weights_path = _peft_files(path)
    peft_cfg = _read_json(config_path)
    _check_peft_config(peft_cfg, config_path)
    raw, metadata = _read_peft_tensors(weights_path)
    layers = _peft_layers(raw, weights_path)
    check_tensor_values(raw, weights_path)  # named as in the file, before any arithmetic spreads a NaN
    n_embd = next(iter(layers.values()))[0].shape[1]
    ours = _metadata_config(metadata)
    if ours and (ours["n_embd"] != n_embd or ours["model_card"] not in CARDS):
        ours = None  # not the file our export wrote: read the tensors alone
    model_card = ours["model_card"] if ours else _card_for(n_embd, weights_path)
    n_layer = ours["n_layer"] if ours else CARDS[model_card].n_layer
    rank, lora_alpha, denominator = _rank_and_scaling(layers, peft_cfg, n_layer, config_path, weights_path)
    blocks = [_layer_blocks(layers, i, rank, n_embd) for i in range(n_layer)]
    same_scaling = ours and math.isclose(ours["alpha"] / ours["r"], lora_alpha / denominator, rel_tol=1e-9)
    if same_scaling and _is_our_layout(blocks, ours, n_embd):
        tensors = _compact_tensors(blocks, ours["targets"], ours["r"], n_embd)
        check_adapter(tensors, ours, weights_path)
        return tensors, ours
    targets = _touched_targets(blocks, n_embd)
    r = rank // len(targets)
    if rank % len(targets) == 0 and _is_block_diagonal(blocks, targets, r, n_embd):
        tensors = _compact_tensors(blocks, targets, r, n_embd)
    else:
        r, tensors = rank, _repeated_a_tensors(blocks, targets, n_embd)
    cfg = CARDS[model_card]
    config = {
        "format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "model_card": model_card,
        "n_embd": n_embd, "n_layer": n_layer, "n_head": cfg.n_head, "vocab_size": cfg.vocab_size,
        # alpha / r must equal PEFT's lora_alpha / denominator; for plain LoRA with r == rank, alpha = lora_alpha
        "r": r, "alpha": lora_alpha * r / denominator, "targets": list(targets), "dropout": float(peft_cfg.get("lora_dropout") or 0.0),
        "base": _peft_base(peft_cfg.get("base_model_name_or_path")), "step": None,
        "trainable_params": sum(t.numel() for t in tensors.values()),
        "imported_from": str(path), "peft_base_model_name_or_path": peft_cfg.get("base_model_name_or_path"),
    }
    check_adapter(tensors, config, weights_path)
    return tensors, config


def _peft_files(path: Path) -> tuple[Path, Path]:
    if not path.is_dir():
        raise InputError("expected a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)", path)
    config_path = path / PEFT_CONFIG
    weights = next((path / name for name in (PEFT_WEIGHTS, PEFT_WEIGHTS_BIN) if (path / name).is_file()), None)
    if weights is None:
        raise InputError(f"no {PEFT_WEIGHTS} (or {PEFT_WEIGHTS_BIN}) in this directory; give the directory that "
                         "PEFT's save_pretrained wrote", path)
    if not config_path.is_file():
        raise InputError(f"{PEFT_CONFIG} not found next to {weights.name}; PEFT's save_pretrained writes both", path)
    return config_path, weights


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON ({exc}); expected PEFT's adapter_config.json", path) from None
    if not isinstance(obj, dict):
        raise InputError("expected a JSON object (PEFT's adapter_config.json)", path)
    return obj


def _check_peft_config(cfg: dict[str, Any], path: Path) -> None:
    """Refuse PEFT features whose result is not a plain LoRA update (which modules it adapts, the tensors tell)."""
    if cfg.get("peft_type") != "LORA":
        raise InputError(f"peft_type is {cfg.get('peft_type')!r}; only LoRA adapters (peft_type LORA) can be imported", path)
    unsupported = {
        "use_dora": "DoRA (use_dora)", "lora_bias": "a LoRA bias (lora_bias)", "modules_to_save": "modules_to_save",
        "trainable_token_indices": "trainable tokens", "layer_replication": "layer_replication",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    }
    used = [what for key, what in unsupported.items() if cfg.get(key)]
    if cfg.get("bias", "none") != "none":
        used.append(f"trained biases (bias={cfg['bias']!r})")
    if used:
        raise InputError(f"this adapter uses {', '.join(used)}, which our adapter format (LoRA tensors of c_attn only) "
                         "cannot represent; export it from PEFT without these options, or merge it in PEFT instead", path)


def _read_peft_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    metadata: dict[str, str] = {}
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
        except Exception as exc:
            raise InputError(f"not a readable safetensors file ({exc})", path) from None
    return read_tensors(path), metadata


def _peft_layers(raw: dict[str, torch.Tensor], path: Path) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (A [R, n], B [3n, R])} from PEFT keys; any other tensor means modules we cannot hold."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    others = []
    for key, value in raw.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            others.append(key)
            continue
        found.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if others:
        raise InputError(f"{len(others)} tensors are not LoRA A/B of attn.c_attn (e.g. {', '.join(sorted(others)[:3])}); "
                         "only c_attn LoRA can be imported", path)
    if not found:
        raise InputError("no LoRA tensors (…attn.c_attn.lora_A/lora_B.weight) in this file", path)
    layers = {}
    for layer, pair in sorted(found.items()):
        if set(pair) != {"A", "B"}:
            raise InputError(f"layer {layer} has lora_{''.join(pair)} but not both lora_A and lora_B", path)
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or b.shape[0] != 3 * a.shape[1]:
            raise InputError(f"layer {layer}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a LoRA pair "
                             "for c_attn (expected A [R, n_embd] and B [3*n_embd, R])", path)
        layers[layer] = (a, b)
    return layers


def _metadata_config(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The config our export stored in the file, if it is there and readable."""
    try:
        config = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        return None
    try:
        return check_adapter_config(config, METADATA_KEY)
    except InputError:
        return None  # damaged or foreign: the tensors alone decide


def _card_for(n_embd: int, path: Path) -> str:
    card = next((name for name, c in CARDS.items() if c.n_embd == n_embd), None)
    if card is None:
        widths = ", ".join(f"{name} {c.n_embd}" for name, c in CARDS.items())
        raise InputError(f"LoRA tensors of width n_embd={n_embd} match no model card ({widths})", path)
    return card


def _rank_and_scaling(layers: dict[int, tuple[torch.Tensor, torch.Tensor]], cfg: dict[str, Any], n_layer: int,
                      config_path: Path, weights_path: Path) -> tuple[int, float, float]:
    """(rank, lora_alpha, d) with PEFT's scaling lora_alpha / d, the same in every layer (our format has one alpha/r).

    d is the rank, or its square root for rank-stabilised LoRA (use_rslora).
    """
    ranks = {i: a.shape[0] for i, (a, _) in layers.items()}
    if len(set(ranks.values())) != 1:
        raise InputError(f"layers have different LoRA ranks ({sorted(set(ranks.values()))}, rank_pattern); our format "
                         "has one rank for all layers", weights_path)
    rank = next(iter(ranks.values()))
    if not cfg.get("rank_pattern") and cfg.get("r") not in (None, rank):
        raise InputError(f"r is {cfg.get('r')} but the tensors have rank {rank}; the config does not belong to "
                         f"{weights_path.name}", config_path)
    bad_alpha = {k: v for k, v in (cfg.get("alpha_pattern") or {}).items() if v != cfg.get("lora_alpha")}
    if bad_alpha:
        raise InputError(f"alpha_pattern {bad_alpha} gives layers different scalings; our format has one alpha for "
                         "all layers", config_path)
    _check_layers_present(layers, cfg, n_layer, weights_path)
    alpha = cfg.get("lora_alpha", 8)  # PEFT's default lora_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise InputError(f"lora_alpha {alpha!r} is not a finite number", config_path)
    alpha = float(alpha)
    return rank, alpha, math.sqrt(rank) if cfg.get("use_rslora") else float(rank)


def _check_layers_present(layers: dict, cfg: dict[str, Any], n_layer: int, path: Path) -> None:
    """Layers PEFT left out on purpose (layers_to_transform) read as zero updates; others must all be there."""
    beyond = [i for i in layers if i >= n_layer]
    if beyond:
        raise InputError(f"LoRA tensors for layer {beyond[0]}, but the model has {n_layer} layers", path)
    wanted = cfg.get("layers_to_transform")
    wanted = set(range(n_layer)) if wanted is None else {wanted} if isinstance(wanted, int) else set(wanted)
    missing = sorted(wanted - set(layers))
    if missing:
        raise InputError(f"no LoRA tensors for layers {missing[:5]} (expected all {n_layer}); the file is incomplete", path)


def _layer_blocks(layers: dict, layer: int, rank: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one layer; a layer PEFT did not adapt is a zero pair (an exact zero update)."""
    if layer in layers:
        return layers[layer]
    a, b = next(iter(layers.values()))
    return a.new_zeros(rank, n), b.new_zeros(3 * n, rank)


def _touched_targets(blocks: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> tuple[str, ...]:
    """The slices whose rows of B are nonzero in some layer; all three when B is zero everywhere."""
    touched = tuple(t for s, t in enumerate(QKV) if any(b[s * n : (s + 1) * n].any() for _, b in blocks))
    return touched or QKV


def _is_block_diagonal(blocks: list, targets: Sequence[str], r: int, n: int) -> bool:
    """B is zero outside (slice of target g) x (columns of group g), and zero in untargeted slices, in every layer."""
    for _, b in blocks:
        expected = torch.zeros_like(b, dtype=torch.bool)
        for g, target in enumerate(targets):
            s = QKV.index(target)
            expected[s * n : (s + 1) * n, g * r : (g + 1) * r] = True
        if b[~expected].any():
            return False
    return True


def _is_our_layout(blocks: list, config: dict[str, Any], n: int) -> bool:
    r, targets = config["r"], config["targets"]
    if config["n_embd"] != n or blocks[0][0].shape[0] != r * len(targets):
        return False
    return _is_block_diagonal(blocks, targets, r, n)


def _compact_tensors(blocks: list, targets: Sequence[str], r: int, n: int) -> dict[str, torch.Tensor]:
    tensors = {}
    for layer, (a, b) in enumerate(blocks):
        slices = [b[QKV.index(t) * n : (QKV.index(t) + 1) * n, g * r : (g + 1) * r] for g, t in enumerate(targets)]
        tensors[OUR_KEY.format(layer=layer, which="A")] = a.clone()
        tensors[OUR_KEY.format(layer=layer, which="B")] = torch.cat(slices).contiguous()
    return tensors


def _repeated_a_tensors(blocks: list, targets: Sequence[str], n: int) -> dict[str, torch.Tensor]:
    tensors = {}
    for layer, (a, b) in enumerate(blocks):
        tensors[OUR_KEY.format(layer=layer, which="A")] = torch.cat([a] * len(targets)).contiguous()
        tensors[OUR_KEY.format(layer=layer, which="B")] = torch.cat(
            [b[QKV.index(t) * n : (QKV.index(t) + 1) * n] for t in targets]).contiguous()
    return tensors


def _peft_base(name: str | None) -> dict[str, Any]:
    """The base file when base_model_name_or_path is a local Hugging Face directory; unknown otherwise."""
    if name and Path(name).is_dir():
        for file in ("model.safetensors", "pytorch_model.bin"):
            if (Path(name) / file).is_file():
                return base_identity(Path(name) / file)
    return dict(UNKNOWN_BASE)
