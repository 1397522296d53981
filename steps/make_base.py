"""Write a randomly initialised GPT-2 base checkpoint in Hugging Face's safetensors layout.

The offline default pipeline has no pretrained weights (no hub access), so it trains on a seeded random
`gpt2.tiny` base written by this stage. It goes through exactly the loading path real users take with
their Hugging Face `model.safetensors`, and its sha256 pins the base an adapter belongs to.
"""

from __future__ import annotations

import argparse
import sys

import torch

from steps.checkpoints import save_hf_checkpoint, sha256_file
from steps.common import run_stage
from steps.model import CARDS, GPT2, card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_card", default="gpt2.tiny", help=f"architecture: one of {', '.join(CARDS)}")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for the random init (same seed, same file)")
    parser.add_argument("--output", required=True, help="where to write model.safetensors")
    args = parser.parse_args(argv)
    return run_stage(lambda: write_random_base(args.model_card, args.seed, args.output))


def write_random_base(model_card: str, seed: int, output: str) -> None:
    cfg = card(model_card)
    with torch.random.fork_rng(devices=[]):  # callers (tests) keep their RNG state
        torch.manual_seed(seed)
        model = GPT2(cfg)
    save_hf_checkpoint(model, output)
    n = sum(p.numel() for p in model.parameters())
    print(f"make_base: {model_card} random init (seed {seed}), {n:,} parameters -> {output} (sha256 {sha256_file(output)[:12]})")


if __name__ == "__main__":
    sys.exit(main())
