"""Small builders shared by tests: tiny encoded datasets and random base checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from steps.formats.checkpoints import save_hf_checkpoint
from steps.model.gpt2 import CARDS, GPT2

EOS = 50256
PINNED_THREADS = 1  # torch threads on both sides of a bitwise comparison between two runs


@contextlib.contextmanager
def pinned_threads(threads: int = PINNED_THREADS) -> Iterator[dict[str, str]]:
    """For a bitwise comparison between a run in this process and one in a subprocess: a matmul's reduction order,
    hence its last bits, depends on the torch thread count. Inside the block this process uses `threads`; the value
    is the environment to give the subprocess (OMP_NUM_THREADS, which torch reads at start). The count is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield {**os.environ, "OMP_NUM_THREADS": str(threads)}
    finally:
        torch.set_num_threads(before)


def write_encoded(path: Path, n: int, seed: int, vocab: int = 2000) -> Path:
    """n random context/completion pairs in the encoded format (context ends with the bos separator)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            context = [rng.randrange(vocab) for _ in range(rng.randint(3, 12))] + [EOS]
            completion = [rng.randrange(vocab) for _ in range(rng.randint(2, 9))] + [EOS]
            f.write(json.dumps({"context": context, "completion": completion}) + "\n")
    return path


def write_base(path: Path, card: str = "gpt2.tiny", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_hf_checkpoint(GPT2(CARDS[card]), path)
    return path


def write_adapter(base: Path, work_dir: Path, step: int = 12) -> Path:
    """A LoRA adapter on `base` (gpt2.tiny, rank 4, q and v) with non-zero B, as after training, in the trainer's format."""
    from steps.formats.checkpoints import adapter_config, base_identity, load_base_weights, save_adapter
    from steps.model.lora import LoRAConfig

    torch.manual_seed(3)
    model = GPT2(CARDS["gpt2.tiny"], LoRAConfig(r=4, alpha=32, targets=("q", "v")))
    load_base_weights(model, base)
    with torch.no_grad():
        for block in model.h:
            block.attn.c_attn.lora_B.normal_(0, 0.5)
    save_adapter(model, work_dir, adapter_config(model, "gpt2.tiny", base_identity(base), step=step))
    return work_dir


def tiny_run_args(tmp: Path, work_dir: Path, **overrides) -> list[str]:
    """Trainer arguments for a few fast updates of gpt2.tiny with the paper's LoRA recipe."""
    tmp.mkdir(parents=True, exist_ok=True)
    train = tmp / "train.jsonl"
    valid = tmp / "valid.jsonl"
    base = tmp / "base.safetensors"
    if not train.exists():
        write_encoded(train, 40, seed=1)
        write_encoded(valid, 10, seed=2)
        write_base(base)
    values = {
        "train_data": train, "valid_data": valid, "model_card": "gpt2.tiny", "init_checkpoint": base,
        "lora_dim": 4, "lora_alpha": 32, "lora_dropout": 0.0, "label_smooth": 0.1, "lr": 2e-3,
        "adam_beta2": 0.999, "train_batch_size": 8, "valid_batch_size": 4, "max_step": 6, "warmup_step": 2,
        "log_interval": 2, "eval_interval": 3, "save_interval": 3, "random_seed": 1, "work_dir": work_dir,
    }
    values.update(overrides)
    args = ["--correct_bias"]
    for key, value in values.items():
        if value is not None:
            args += [f"--{key}", str(value)]
    return args
