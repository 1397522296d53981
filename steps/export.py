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
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from steps.core.common import InputError, atomic_write, run_stage, sha256_file, write_json
from steps.formats.adapters import read_adapter
from steps.formats.checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_WEIGHTS,
    apply_adapter,
    load_base_weights,
    lora_config_of,
    model_config_of,
    save_hf_checkpoint,
    stable_safetensors_bytes,
)
from steps.formats.peft import default_base_model, write_peft
from steps.model.gpt2 import GPT2, GPT2Config
from steps.model.tokenizer import EOS_ID

FORMATS = ("peft", "merged", "nlg")
HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"


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
    """Our adapter directory (adapter.safetensors + adapter_config.json), as the trainer writes it: the same one
    metadata key, so the same tensors give the same bytes (the step is in adapter_config.json)."""
    with atomic_write(out_dir / ADAPTER_WEIGHTS, "wb") as f:
        f.write(stable_safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": ADAPTER_FORMAT}))
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
