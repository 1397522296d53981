"""Adapters out to (and in from) the Hugging Face ecosystem: PEFT LoRA directories and merged GPT-2 checkpoints.

    python -m steps.export --adapter models/finetune --format peft   --output exports/peft
    python -m steps.export --adapter models/finetune --format merged --output exports/merged
    python -m steps.export --adapter exports/peft    --format nlg    --output models/imported

The mapping (docs/export.md has the details). Our LoRA adapts E of the three slices q, k, v of GPT-2's fused
`c_attn`, each slice g with its own rank-r pair (A_g, B_g) and the scaling alpha/r. PEFT adapts the whole
`c_attn` with one pair (A, B) of rank R and the scaling lora_alpha/R. Stacking the A_g gives A (R = E*r rows);
B [3n, R] holds B_g in slice g's rows and group g's columns, zeros elsewhere, so B @ A is exactly our block
update. lora_alpha = alpha*E keeps the scaling. The same algebra read backwards imports PEFT adapters.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from steps.checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_VERSION,
    ADAPTER_WEIGHTS,
    apply_adapter,
    base_identity,
    load_adapter,
    load_base_weights,
    lora_config_of,
    model_config_of,
    read_tensors,
    save_hf_checkpoint,
    sha256_file,
)
from steps.common import InputError, atomic_write, run_stage, write_json
from steps.lora import QKV
from steps.model import CARDS, GPT2, GPT2Config
from steps.tokenizer import EOS_ID

FORMATS = ("peft", "merged", "nlg")
PEFT_CONFIG = "adapter_config.json"  # the same name as ours: a directory holds one kind or the other
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"  # what PEFT wrote before safetensors became its default
HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
# Our full adapter config rides in the safetensors metadata of an exported PEFT file, so importing our own export
# gives back the very same config (and layout). PEFT rewrites the metadata when it saves, so a file that PEFT
# has re-saved (say, after more training) carries none, and is read from its tensors alone.
METADATA_KEY = "nlg_lora_adapter_config"

# PEFT keys for GPT-2's c_attn: GPT2LMHeadModel under PeftModelForCausalLM (`base_model.model.transformer.h.N...`),
# also GPT2Model (`base_model.model.h.N...`) and the adapter-named spelling (`lora_A.default.weight`).
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.)?h\.(\d+)\.attn\.c_attn\.lora_([AB])(?:\.default)?\.weight$")
_OUR_KEY = "h.{layer}.attn.c_attn.lora_{which}"


def peft_key(layer: int, which: str) -> str:
    """The key PEFT's `get_peft_model_state_dict` uses for GPT2LMHeadModel's c_attn LoRA tensors."""
    return f"base_model.model.transformer.h.{layer}.attn.c_attn.lora_{which}.weight"


# ----------------------------------------------------------------------------------------------- reading any adapter


def is_peft_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / PEFT_WEIGHTS).is_file() or (path / PEFT_WEIGHTS_BIN).is_file())


def read_adapter(path: str | os.PathLike, lora_alpha: float | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our adapter directory, an original-trainer `model.<step>.pt`, or a PEFT LoRA directory -> (tensors, our config)."""
    path = Path(path)
    if not path.exists():
        raise InputError("adapter not found; give our adapter directory (adapter.safetensors + adapter_config.json), "
                         "an original model.<step>.pt, or a PEFT directory (adapter_model.safetensors + adapter_config.json)",
                         path)
    if is_peft_dir(path):
        return read_peft_adapter(path)
    if path.is_dir() and not (path / ADAPTER_WEIGHTS).is_file():
        raise InputError(f"neither {ADAPTER_WEIGHTS} (this project's adapter) nor {PEFT_WEIGHTS} (a PEFT adapter) is in "
                         "this directory; give the directory the trainer or PEFT's save_pretrained wrote", path)
    tensors, config = load_adapter(path, lora_alpha=lora_alpha)
    check_layout(tensors, config, path)
    return tensors, config


def check_layout(tensors: dict[str, torch.Tensor], config: dict[str, Any], source: str | os.PathLike) -> None:
    """Our tensors must have the shapes the config promises: lora_A [r*E, n] and lora_B [n*E, r] in every layer."""
    n, r, n_groups = config["n_embd"], config["r"], len(config["targets"])
    expected = {}
    for layer in range(config["n_layer"]):
        expected[_OUR_KEY.format(layer=layer, which="A")] = (r * n_groups, n)
        expected[_OUR_KEY.format(layer=layer, which="B")] = (n * n_groups, r)
    problems = [f"{k} missing" for k in expected if k not in tensors]
    problems += [f"{k} has shape {tuple(tensors[k].shape)}, expected {expected[k]}"
                 for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    problems += [f"unexpected tensor {k}" for k in tensors if k not in expected]
    if problems:
        raise InputError(f"adapter tensors do not match its config (r={r}, targets {','.join(config['targets'])}, "
                         f"n_embd={n}, {config['n_layer']} layers): {'; '.join(problems[:3])}; "
                         "re-save the adapter with the trainer", source)


# ----------------------------------------------------------------------------------------------- ours -> PEFT


def to_peft_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our per-slice blocks as one rank-(E*r) LoRA on the whole c_attn (B zero outside each slice's own block)."""
    n, r = config["n_embd"], config["r"]
    out = {}
    for layer in range(config["n_layer"]):
        lora_a = tensors[_OUR_KEY.format(layer=layer, which="A")]
        lora_b = tensors[_OUR_KEY.format(layer=layer, which="B")]
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
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config)}
    with atomic_write(out_dir / PEFT_WEIGHTS, "wb") as f:
        f.write(safetensors_bytes(to_peft_tensors(tensors, config), metadata=metadata))
    write_json(out_dir / PEFT_CONFIG, peft_config(config, base_model))


def default_base_model(init_checkpoint: str | os.PathLike | None) -> str | None:
    """A base checkpoint inside a Hugging Face model directory (one with config.json) names that directory."""
    if init_checkpoint and (Path(init_checkpoint).parent / HF_CONFIG).is_file():
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
        check_layout(tensors, ours, weights_path)
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
    keys = ("format", "model_card", "n_embd", "n_layer", "r", "alpha", "targets")
    if not isinstance(config, dict) or not all(k in config for k in keys) or config["format"] != ADAPTER_FORMAT:
        return None
    return config


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
    alpha = float(cfg.get("lora_alpha", 8))  # PEFT's default lora_alpha
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
        tensors[_OUR_KEY.format(layer=layer, which="A")] = a.clone()
        tensors[_OUR_KEY.format(layer=layer, which="B")] = torch.cat(slices).contiguous()
    return tensors


def _repeated_a_tensors(blocks: list, targets: Sequence[str], n: int) -> dict[str, torch.Tensor]:
    tensors = {}
    for layer, (a, b) in enumerate(blocks):
        tensors[_OUR_KEY.format(layer=layer, which="A")] = torch.cat([a] * len(targets)).contiguous()
        tensors[_OUR_KEY.format(layer=layer, which="B")] = torch.cat(
            [b[QKV.index(t) * n : (QKV.index(t) + 1) * n] for t in targets]).contiguous()
    return tensors


def _peft_base(name: str | None) -> dict[str, Any]:
    """The base file when base_model_name_or_path is a local Hugging Face directory; unknown otherwise."""
    if name and Path(name).is_dir():
        for file in ("model.safetensors", "pytorch_model.bin"):
            if (Path(name) / file).is_file():
                return base_identity(Path(name) / file)
    return {"path": None, "sha256": None}


# ----------------------------------------------------------------------------------------------- merged / ours


def adapted_model(tensors: dict[str, torch.Tensor], config: dict[str, Any], init_checkpoint: str | os.PathLike | None,
                  ignore_base_mismatch: bool = False, source: str | os.PathLike = "adapter") -> GPT2:
    """Base weights + adapter (not merged), in eval mode; the base must be the one the adapter was trained on."""
    recorded = (config.get("base") or {}).get("path")
    if init_checkpoint is None and recorded and Path(recorded).is_file():
        init_checkpoint = recorded
    if init_checkpoint is None:
        where = f" (the recorded {recorded} does not exist here)" if recorded else ""
        raise InputError(f"no base weights{where}: pass --init_checkpoint, the GPT-2 model.safetensors or "
                         "pytorch_model.bin the adapter was trained on", source)
    expected_sha = (config.get("base") or {}).get("sha256")
    if expected_sha and not ignore_base_mismatch and sha256_file(init_checkpoint) != expected_sha:
        raise InputError(f"the adapter was trained on a base with sha256 {expected_sha[:12]}... but {init_checkpoint} "
                         "differs; pass the right --init_checkpoint, or --ignore_base_mismatch if you know the weights "
                         "are the same", source)
    model = GPT2(model_config_of(config), lora_config_of(config))
    load_base_weights(model, init_checkpoint)
    apply_adapter(model, tensors, source)
    return model.eval()


def hf_config(cfg: GPT2Config) -> dict[str, Any]:
    """config.json of a Hugging Face GPT-2 with our architecture (the fields of the hub's gpt2 configs)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # the tanh approximation, as in our MLP
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "resid_pdrop": 0.1,  # GPT-2's standard training dropouts; off in eval mode, so logits do not depend on them
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "initializer_range": 0.02,
        "bos_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": True,
    }


def write_merged(model: GPT2, out_dir: Path) -> None:
    """The adapter folded into c_attn, written as a GPT2LMHeadModel directory (config.json + model.safetensors)."""
    model.merge_lora()
    save_hf_checkpoint(model, out_dir / HF_WEIGHTS)
    write_json(out_dir / HF_CONFIG, hf_config(model.config))


def write_nlg(tensors: dict[str, torch.Tensor], config: dict[str, Any], out_dir: Path) -> None:
    """Our adapter directory (adapter.safetensors + adapter_config.json), as the trainer writes it."""
    metadata = {"format": ADAPTER_FORMAT, "step": str(config.get("step"))}
    with atomic_write(out_dir / ADAPTER_WEIGHTS, "wb") as f:
        f.write(safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    write_json(out_dir / ADAPTER_CONFIG, config)


# ----------------------------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Convert a LoRA adapter: to a PEFT adapter directory, to a merged Hugging "
                                "Face GPT-2 directory, or (from PEFT) to this project's adapter format.")
    p.add_argument("--adapter", required=True, help="adapter to convert: our directory (adapter.safetensors + "
                   "adapter_config.json), an original-trainer model.<step>.pt, or a PEFT LoRA directory "
                   "(adapter_model.safetensors + adapter_config.json)")
    p.add_argument("--format", required=True, choices=FORMATS, help="peft: a directory PeftModel.from_pretrained "
                   "loads; merged: config.json + model.safetensors that GPT2LMHeadModel.from_pretrained loads (needs the "
                   "base weights); nlg: this project's adapter directory (e.g. to decode a PEFT-trained adapter)")
    p.add_argument("--output", required=True, help="output directory (created; files of the same name are replaced)")
    p.add_argument("--init_checkpoint", default=None, help="base GPT-2 weights (model.safetensors or pytorch_model.bin) "
                   "for --format merged; default: the base path recorded in the adapter config")
    p.add_argument("--base_model", default=None, help="base_model_name_or_path written into the PEFT adapter_config.json "
                   "(a hub id such as gpt2-medium, or a local directory); default: the base checkpoint's directory "
                   "when it holds a config.json, else none")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha, needed only for original-trainer "
                   ".pt adapters, which do not record it (the original README used 32)")
    p.add_argument("--ignore_base_mismatch", action="store_true", help="with --format merged, merge even if "
                   "--init_checkpoint's sha256 differs from the base the adapter was trained on")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    out_dir = Path(args.output)
    source = Path(args.adapter)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("--output must be a directory, and this is a file", out_dir)
    if out_dir.resolve() == (source if source.is_dir() else source.parent).resolve():
        raise InputError("--output is the adapter's own directory; both formats use adapter_config.json, so "
                         "choose another directory", out_dir)
    tensors, config = read_adapter(source, lora_alpha=args.lora_alpha)
    targets = ",".join(config["targets"])
    if args.format == "peft":
        base_model = args.base_model or default_base_model(args.init_checkpoint or (config.get("base") or {}).get("path"))
        write_peft(tensors, config, out_dir, base_model)
        n_groups = len(config["targets"])
        print(f"export: PEFT LoRA on c_attn, rank {config['r'] * n_groups} (targets {targets} x r {config['r']}), "
              f"lora_alpha {config['alpha'] * n_groups} -> {out_dir}")
    elif args.format == "merged":
        model = adapted_model(tensors, config, args.init_checkpoint, args.ignore_base_mismatch, source)
        write_merged(model, out_dir)
        print(f"export: {config['model_card']} with the adapter merged (targets {targets}, r {config['r']}, "
              f"alpha {config['alpha']}) -> {out_dir / HF_WEIGHTS}")
    else:
        write_nlg(tensors, config, out_dir)
        print(f"export: adapter with targets {targets}, r {config['r']}, alpha {config['alpha']} -> {out_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
