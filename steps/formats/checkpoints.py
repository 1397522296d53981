"""Everything that reads or writes weights: base checkpoints, adapter files, resume state.

Only safe loaders are used: safetensors, or `torch.load(weights_only=True)` on the CPU: a pickle that needs code to load is refused. Base weights
must load completely: a missing or mis-shaped tensor is an error, never a silently random weight (the original loaded with strict=False).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from safetensors.torch import save_file

from steps.core.common import InputError, atomic_path, atomic_write, sha256_file
from steps.formats.work_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from steps.model.gpt2 import CARDS, GPT2, GPT2Config
from steps.model.lora import QKV, LoRAConfig, lora_state_dict

ADAPTER_FORMAT = "nlg-lora-adapter"
ADAPTER_VERSION = 1

# Hugging Face / the original store these as Conv1D weights, [in, out]; we use nn.Linear's [out, in].
_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Keys a GPT-2 checkpoint may hold that are not weights of ours: causal-mask buffers and the (tied) LM head.
_IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|^lm_head\..*|\.lora_[AB])$")


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file, or a PyTorch pickle with weights_only=True (never arbitrary code)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("checkpoint file not found; give the path of a model.safetensors or pytorch_model.bin file", path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except Exception as exc:
            raise InputError(f"not a readable safetensors file ({exc})", path) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"cannot load as a weights-only PyTorch file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "files that need arbitrary code to unpickle are refused; convert it to safetensors",
            path,
        ) from None
    if isinstance(obj, dict) and "model_state_dict" in obj:  # the original trainer's wrapper
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError("expected a state dict (a mapping of names to tensors)", path)
    return obj


def normalise_key(key: str) -> str:
    """Map the key spellings found in GPT-2 checkpoints to ours.

    Accepts Hugging Face GPT2Model (`h.0...`), GPT2LMHeadModel (`transformer.h.0...`), the original trainer's
    DDP dumps (`module.transformer.h.0...`) and OpenAI's TF-converted suffixes (`.g`, `.b`, `.w`).
    """
    for prefix in ("module.", "transformer."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return re.sub(r"\.(g|w)$", ".weight", re.sub(r"\.b$", ".bias", key))


def load_base_weights(model: GPT2, path: str | os.PathLike) -> list[str]:
    """Load pretrained GPT-2 weights into `model`; return the checkpoint keys that were ignored.

    Fails, naming the tensors, when a base weight is missing or has the wrong shape (for example a gpt2.md
    checkpoint with `--model_card gpt2.sm`).
    """
    raw = read_tensors(path)
    tensors: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in raw.items():
        name = normalise_key(key)
        if _IGNORED.search(name):
            ignored.append(key)
            continue
        tensors[name] = value.t() if _CONV1D.search(name) else value
    expected = {k: p for k, p in model.named_parameters() if "lora_" not in k}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(p.shape)}"
             for k, p in expected.items() if k in tensors and tensors[k].shape != p.shape]
    if missing or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing base weights (e.g. {', '.join(missing[:4])})")
        if wrong:
            problems.append(f"{len(wrong)} mis-shaped (e.g. {'; '.join(wrong[:3])})")
        hint = _guess_card(tensors)
        raise InputError(
            f"checkpoint does not match model card ({'; '.join(problems)})."
            + (f" It looks like {hint}: pass --model_card {hint}." if hint else " Is this a GPT-2 checkpoint?"),
            path,
        )
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k])
    return ignored + unexpected


def _guess_card(tensors: dict[str, torch.Tensor]) -> str | None:
    wte = tensors.get("wte.weight")
    n_layer = len({k.split(".")[1] for k in tensors if k.startswith("h.")})
    for name, cfg in CARDS.items():
        if wte is not None and wte.shape[1] == cfg.n_embd and n_layer == cfg.n_layer:
            return name
    return None


def base_identity(path: str | os.PathLike | None) -> dict[str, Any]:
    """What an adapter records about its base: the file and its sha256 (decode refuses a different base)."""
    if path is None:
        return {"path": None, "sha256": None}
    return {"path": str(path), "sha256": sha256_file(path)}


def save_hf_checkpoint(model: GPT2, path: str | os.PathLike) -> None:
    """Write the base weights in Hugging Face's GPT2Model safetensors layout (Conv1D weights as [in, out])."""
    tensors = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        tensors[name] = (p.detach().t() if _CONV1D.search(name) else p.detach()).contiguous().cpu()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------- adapters


def adapter_config(model: GPT2, model_card: str, base: dict[str, Any], step: int, **extra: Any) -> dict[str, Any]:
    cfg, lora = model.config, model.lora_config
    return {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "model_card": model_card,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "vocab_size": cfg.vocab_size,
        "r": lora.r,
        "alpha": lora.alpha,
        "targets": list(lora.targets),
        "dropout": lora.dropout,
        "base": base,
        "step": step,
        "trainable_params": sum(v.numel() for v in lora_state_dict(model).values()),
        **extra,
    }


def save_adapter(model: GPT2, out_dir: str | os.PathLike, config: dict[str, Any]) -> None:
    """Write adapter.safetensors + adapter_config.json (LoRA tensors only, never the base)."""
    out_dir = Path(out_dir)
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    with atomic_path(out_dir / ADAPTER_WEIGHTS) as tmp:
        # One metadata key only: safetensors writes its metadata map in an order that changes from process to
        # process, and DVC and users compare adapters by hash. The step lives in adapter_config.json.
        save_file(tensors, str(tmp), metadata={"format": ADAPTER_FORMAT})
    with atomic_write(out_dir / ADAPTER_CONFIG) as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def load_adapter(path: str | os.PathLike, lora_alpha: float | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an adapter: our directory (or its .safetensors file), or an original-trainer `model.<step>.pt`.

    Original files carry no config: rank, width and depth are read off the tensor shapes (q, v adapted, as the
    original always did) and alpha must be given (`lora_alpha`), exactly as the original needed it retyped.
    Either way the tensors are checked against the config (`check_adapter`): every loader of an adapter (decode,
    export, the trainer's --init_adapter) refuses the same damaged files.
    """
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_WEIGHTS
    if path.suffix == ".safetensors":
        config_path = path.with_name(ADAPTER_CONFIG)
        if not config_path.is_file():
            raise InputError(f"adapter config {ADAPTER_CONFIG} not found next to the weights", path)
        config = read_adapter_config(config_path)
        tensors = read_tensors(path)
    else:
        tensors, config = _import_original_adapter(path, lora_alpha)
    check_adapter(tensors, config, path)
    return tensors, config


# What an adapter_config.json must hold for the adapter to be rebuilt (docs/adapter-format.md lists every field).
REQUIRED_CONFIG_KEYS = {"model_card": str, "n_embd": int, "n_layer": int, "n_head": int, "r": int, "alpha": int | float,
                        "targets": list}
# The base an adapter records when it is not known (an imported adapter, or a config written without `base`).
UNKNOWN_BASE = {"path": None, "sha256": None}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_adapter_config(config_path: Path) -> dict[str, Any]:
    """adapter_config.json, checked: a damaged or incomplete one is an InputError naming what is wrong."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"unreadable adapter config ({exc}); restore it from the run's checkpoints/step_N/ or MLflow", config_path) from None
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT or config.get("version") != ADAPTER_VERSION:
        found = (config.get("format"), config.get("version")) if isinstance(config, dict) else type(config).__name__
        raise InputError(f"unsupported adapter format {found}; expected format {ADAPTER_FORMAT!r} version {ADAPTER_VERSION}", config_path)
    return check_adapter_config(config, config_path)


def check_adapter_config(config: dict[str, Any], source: str | os.PathLike) -> dict[str, Any]:
    """The values of an adapter config, checked (a hand-edited or foreign file must not reach the model builder);
    an absent or null `base` becomes UNKNOWN_BASE (the base must then be given). Returns the config."""
    bad = [key for key, kind in REQUIRED_CONFIG_KEYS.items() if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool)]
    if bad:
        raise InputError(f"adapter config lacks or has wrong types for {', '.join(bad)}; restore it from the run's checkpoints "
                         "or MLflow", source)
    name = config["model_card"]
    if name not in CARDS:
        raise InputError(f"model_card {name!r} is not a model card (one of {', '.join(CARDS)}); restore the adapter config "
                         "the trainer wrote", source)
    arch = CARDS[name]
    differ = [f"{key} {config[key]!r} ({name} has {getattr(arch, key)})" for key in ("n_embd", "n_layer", "n_head", "vocab_size")
              if key in config and (type(config[key]) is not int or config[key] != getattr(arch, key))]
    if differ:
        raise InputError(f"adapter config disagrees with its model_card {name}: {'; '.join(differ)}", source)
    if not 0 < config["r"] <= arch.n_embd:
        raise InputError(f"r {config['r']} is not a LoRA rank for {name} (1 to {arch.n_embd})", source)
    if not math.isfinite(config["alpha"]):
        raise InputError(f"alpha {config['alpha']} is not a finite number", source)
    targets = config["targets"]
    if not targets or list(targets) != [t for t in QKV if t in targets]:
        raise InputError(f"targets {targets} must be a non-empty subset of q, k, v, listed in q, k, v order", source)
    base = config.get("base")
    if base is None:
        config["base"] = dict(UNKNOWN_BASE)
    elif not (isinstance(base, dict) and isinstance(base.get("path"), str | None)
              and (base.get("sha256") is None or (isinstance(base["sha256"], str) and _SHA256.fullmatch(base["sha256"])))):
        raise InputError(f"base {json.dumps(base)[:120]} is malformed; expected {{\"path\": the base file or null, "
                         "\"sha256\": its 64 hex digits or null}, or no base key at all (unknown base)", source)
    return config


def _import_original_adapter(path: Path, lora_alpha: float | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    raw = read_tensors(path)
    tensors = {normalise_key(k): v for k, v in raw.items() if ".lora_" in k}
    if not tensors:
        raise InputError("no LoRA tensors (keys containing 'lora_A'/'lora_B') in this checkpoint", path)
    if lora_alpha is None:
        raise InputError("original-format LoRA checkpoints do not record alpha; pass --lora_alpha (the README used 32)", path)
    if not math.isfinite(lora_alpha):
        raise InputError(f"--lora_alpha {lora_alpha} is not a finite number", path)
    a0 = tensors.get("h.0.attn.c_attn.lora_A")
    if a0 is None or a0.dim() != 2:
        found = ", ".join(sorted(tensors)[:3])
        raise InputError(f"expected the original trainer's keys (transformer.h.N.attn.c_attn.lora_A/B); found {found} ...", path)
    n_layer = len({k.split(".")[1] for k in tensors})
    n_embd, r = a0.shape[1], a0.shape[0] // 2
    model_card = next((name for name, c in CARDS.items() if c.n_embd == n_embd and c.n_layer == n_layer), None)
    if model_card is None:
        raise InputError(f"LoRA tensors for n_embd={n_embd}, {n_layer} layers match no model card", path)
    cfg = CARDS[model_card]
    config = {
        "format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "model_card": model_card,
        "n_embd": n_embd, "n_layer": n_layer, "n_head": cfg.n_head, "vocab_size": cfg.vocab_size,
        "r": r, "alpha": lora_alpha, "targets": ["q", "v"], "dropout": 0.0,
        "base": dict(UNKNOWN_BASE), "step": _step_from_name(path.name),
        "imported_from": str(path),
    }
    return tensors, config


def _step_from_name(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.pt$", name)
    return int(match.group(1)) if match else None


# What a loader accepts in an adapter's tensors (docs/adapter-format.md, "What a loader refuses").
LORA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OUR_KEY = "h.{layer}.attn.c_attn.lora_{which}"


def check_adapter(tensors: dict[str, torch.Tensor], config: dict[str, Any], source: str | os.PathLike) -> None:
    """The one check of a loaded adapter, whatever its format: the shapes its config implies (`check_layout`),
    then floating-point, finite values (`check_tensor_values`)."""
    check_layout(tensors, config, source)
    check_tensor_values(tensors, source)


def check_layout(tensors: dict[str, torch.Tensor], config: dict[str, Any], source: str | os.PathLike) -> None:
    """Our tensors must have the shapes the config promises: lora_A [r*E, n] and lora_B [n*E, r] in every layer."""
    n, r, n_groups = config["n_embd"], config["r"], len(config["targets"])
    expected = {}
    for layer in range(config["n_layer"]):
        expected[OUR_KEY.format(layer=layer, which="A")] = (r * n_groups, n)
        expected[OUR_KEY.format(layer=layer, which="B")] = (n * n_groups, r)
    problems = [f"{k} missing" for k in expected if k not in tensors]
    problems += [f"{k} has shape {tuple(tensors[k].shape)}, expected {expected[k]}"
                 for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    problems += [f"unexpected tensor {k}" for k in tensors if k not in expected]
    if problems:
        raise InputError(f"adapter tensors do not match its config (r={r}, targets {','.join(config['targets'])}, "
                         f"n_embd={n}, {config['n_layer']} layers): {'; '.join(problems[:3])}; "
                         "re-save the adapter with the trainer", source)


def check_tensor_values(tensors: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Every tensor float32, float16 or bfloat16, and finite: an integer tensor is not LoRA weights, and a NaN or
    inf (a diverged training, a damaged file) would otherwise decode to empty predictions without a word."""
    for key in sorted(tensors):
        tensor = tensors[key]
        if tensor.dtype not in LORA_DTYPES:
            raise InputError(f"tensor {key} is {str(tensor.dtype).removeprefix('torch.')}; expected float32, float16 or "
                             "bfloat16 (LoRA weights are floating point)", source)
        finite = torch.isfinite(tensor)
        if not finite.all():
            what = "NaN" if torch.isnan(tensor).any() else "inf"
            raise InputError(f"tensor {key} holds {what} ({int((~finite).sum())} of {tensor.numel()} values); the adapter "
                             "is corrupt (a diverged training?); use an earlier one (checkpoints/step_N/ or best/)", source)


def stable_safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors' bytes with the metadata in sorted key order. safetensors writes its metadata map in an order
    that changes from process to process, so two keys gave two different files for the same tensors; the rest of
    the header (tensor order, offsets) is already stable and is kept as written."""
    data = safetensors_save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header with spaces to keep the data 8-byte aligned
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def lora_config_of(config: dict[str, Any]) -> LoRAConfig:
    return LoRAConfig(r=config["r"], alpha=config["alpha"], dropout=0.0, targets=tuple(config["targets"]))


def model_config_of(config: dict[str, Any]) -> GPT2Config:
    return GPT2Config(n_embd=config["n_embd"], n_layer=config["n_layer"], n_head=config["n_head"],
                      vocab_size=config.get("vocab_size", 50257))


def apply_adapter(model: GPT2, tensors: dict[str, torch.Tensor], source: str | os.PathLike = "adapter") -> None:
    """Copy LoRA tensors into the model; every LoRA parameter must be present with the right shape."""
    expected = {k: p for k, p in model.named_parameters() if "lora_" in k}
    missing = sorted(set(expected) - set(tensors))
    wrong = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    extra = sorted(set(tensors) - set(expected))
    if missing or wrong or extra:
        raise InputError(
            f"adapter does not fit the model: missing {missing[:3]}, mis-shaped {wrong[:3]}, unexpected {extra[:3]}", source
        )
    with torch.no_grad():
        for k, p in expected.items():
            p.copy_(tensors[k])


# ----------------------------------------------------------------------------------------------- resume state


def save_resume_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically write the resume state (tensors and plain Python values only: weights_only-loadable)."""
    # Through a file object: given a path, torch.save names the zip's inner folder after the (random) temporary
    # file name, so identical states would differ in bytes and DVC would see a new work dir on every run.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)


def load_resume_state(path: str | os.PathLike, data: bytes | None = None) -> dict[str, Any]:
    """The resume state (from `data`, the file's bytes, when given: another node read it); a damaged one (cut
    short by a full disk, say) is an InputError saying how to go on."""
    try:
        return torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"the resume state is damaged ({str(exc).splitlines()[0][:120]}); start over with --resume never "
                         "(or remove it), or continue from the last adapter in checkpoints/step_N/", path) from None
