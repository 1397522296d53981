"""An adapter in any format this project reads: its own directory (adapter.safetensors + adapter_config.json),
the original trainer's `model.<step>.pt`, or a PEFT LoRA directory; and starting a training from one.

The trainer imports this module, not the export command: editing the export CLI never changes the trainer's code
hash (which would rerun the finetune stage and invalidate every resume state).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from steps.core.common import InputError
from steps.formats.checkpoints import ADAPTER_WEIGHTS, apply_adapter, load_adapter
from steps.formats.peft import PEFT_WEIGHTS, is_peft_dir, read_peft_adapter
from steps.model.gpt2 import GPT2


def read_adapter(path: str | os.PathLike, lora_alpha: float | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Our adapter directory, an original-trainer `model.<step>.pt`, or a PEFT LoRA directory -> (tensors, our config).

    Every path ends in `steps.formats.checkpoints.check_adapter`: shapes as the config implies, float tensors, no NaN or inf.
    """
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
    return load_adapter(path, lora_alpha=lora_alpha)


def start_from_adapter(model: GPT2, path: str | os.PathLike, model_card: str, lora_alpha: float) -> str:
    """Load an adapter into `model`'s LoRA weights for further training; it must have the model's rank, targets and
    width. Returns the line the trainer logs about what it loaded."""
    expected = model.lora_config
    if expected is None:
        raise InputError("--init_adapter needs LoRA (--lora_dim > 0); full fine-tuning starts from --init_checkpoint", path)
    tensors, config = read_adapter(path, lora_alpha=lora_alpha)
    found = {"rank": config["r"], "targets": tuple(config["targets"]), "n_embd": config["n_embd"], "n_layer": config["n_layer"]}
    wanted = {"rank": expected.r, "targets": tuple(expected.targets), "n_embd": model.config.n_embd, "n_layer": model.config.n_layer}
    differ = [f"{key} {found[key]} (this run: {wanted[key]})" for key in wanted if found[key] != wanted[key]]
    if differ:
        raise InputError(f"the adapter does not fit this run: {'; '.join(differ)}; set --lora_dim, --lora_targets and "
                         f"--model_card to the adapter's (it was trained on {config.get('model_card')})", path)
    apply_adapter(model, tensors, path)
    step = f" after {config['step']} updates" if config.get("step") is not None else ""
    return (f"started LoRA from {path}: rank {config['r']}, targets {','.join(config['targets'])}, {config.get('model_card', model_card)}"
            f"{step}; the optimizer and the schedule start fresh")
