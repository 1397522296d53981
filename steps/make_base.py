"""The offline stand-in for pretrained GPT-2 weights: a seeded `gpt2.tiny` pretrained on restaurant descriptions.

Real users fine-tune a GPT-2 that was pretrained on web text; the offline default has no such weights (no hub
access). So this stage makes its own: a seeded random base, then a language model trained on the sample's
pretraining corpus (descriptions only, from MRs in no split; steps.sample_data) with the trainer in its
full-training mode (`steps.train --lora_dim 0`, the original's own mode). Each text is one document, as GPT-2 saw
its documents: `<|endoftext|>` before it (an empty context with the encode stage's separator) and after it, every
text token in the loss. The fine-tuning stage then adapts this base with LoRA, exactly as it adapts a real GPT-2.

The result is written in Hugging Face's safetensors layout, so it goes through the same loading path as a user's
`model.safetensors`, and its sha256 pins the base an adapter belongs to. Beside it: `pretrain.json` (the settings
and the losses) and the trainer's loss logs.

    python -m steps.make_base --output models/base/model.safetensors                   # random init only
    python -m steps.make_base --output models/base/model.safetensors --corpus data/raw/pretrain.txt --updates 300

`--for_checkpoint PATH`: pretrain only when PATH (the fine-tuning stage's init_checkpoint) is `--output`. When the
fine-tuning starts from real weights, nothing uses this base: the stage then writes the random init in a second.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from steps import reports
from steps.checkpoints import save_hf_checkpoint, sha256_file
from steps.common import InputError, atomic_path, run_stage, write_json
from steps.model import CARDS, GPT2, card

SUMMARY_FILE = "pretrain.json"
LOGS = ("train_log.csv", "valid_log.csv")  # the trainer's loss logs, copied next to the weights
# The trainer's optimizer settings for pretraining: the paper's AdamW (betas 0.9/0.999, bias correction, decay
# 0.01), no label smoothing (plain LM loss). Only what changes the cost/quality trade-off is a stage option.
TRAINER_SETTINGS = ["--correct_bias", "--adam_beta1", "0.9", "--adam_beta2", "0.999", "--weight_decay", "0.01",
                    "--label_smooth", "0", "--scheduler", "linear", "--obj", "clm", "--bucket_window", "1024",
                    "--resume", "never"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_card", default="gpt2.tiny", help=f"architecture: one of {', '.join(CARDS)}")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the random init and of the pretraining's data order")
    p.add_argument("--output", required=True, help="where to write model.safetensors (pretrain.json and the logs go beside it)")
    p.add_argument("--corpus", default=None, help="pretraining texts, one per line (steps.sample_data --corpus_file); "
                   "without it the base stays random")
    p.add_argument("--updates", type=int, default=0, help="pretraining optimizer updates (0: the random init only)")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate (linear warmup, then linear decay to 0)")
    p.add_argument("--warmup", type=int, default=20, help="warmup updates")
    p.add_argument("--batch_size", type=int, default=4, help="examples (of --pack texts each) per update")
    p.add_argument("--pack", type=int, default=4, help="texts per example, each ended by <|endoftext|> (GPT-2's packing)")
    p.add_argument("--valid_texts", type=int, default=200, help="the corpus's last texts, held out to measure the LM loss")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="trainer autocast (auto: bf16 "
                   "where the hardware has it natively)")
    p.add_argument("--for_checkpoint", default=None, help="the fine-tuning's init_checkpoint: pretrain only when it is "
                   "--output (otherwise real weights are used and this base is not)")
    return p


def write_random_base(model_card: str, seed: int, output: str | os.PathLike) -> int:
    """The seeded random init in Hugging Face layout; returns the number of parameters."""
    cfg = card(model_card)
    with torch.random.fork_rng(devices=[]):  # callers (tests) keep their RNG state
        torch.manual_seed(seed)
        model = GPT2(cfg)
    save_hf_checkpoint(model, output)
    return sum(p.numel() for p in model.parameters())


def read_corpus(path: str | os.PathLike, valid_texts: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): the file's non-blank lines, the last `valid_texts` held out."""
    path = Path(path)
    if not path.is_file():
        raise InputError("pretraining corpus not found (the sample stage writes it: steps.sample_data --corpus_file)", path)
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if valid_texts < 1 or len(texts) < valid_texts + 1:
        raise InputError(f"{len(texts)} texts cannot give {valid_texts} held-out texts and at least one to train on; "
                         "write a bigger corpus or lower --valid_texts", path)
    return texts[:-valid_texts], texts[-valid_texts:]


def encode_corpus(train: list[str], valid: list[str], out_dir: Path, pack: int = 1) -> tuple[Path, Path]:
    """Encoded JSONL for the trainer: `pack` texts per example, each ended by <|endoftext|>, after a lone one.

    GPT-2 was pretrained on documents packed into long windows, separated by <|endoftext|>, so it learned that
    a new document starts after that token whatever came before. Packing gives the stand-in the same habit,
    which is what the fine-tuning relies on: there the text follows an MR and the encode stage's <|endoftext|>.
    Every text token, and each end token, is in the loss (the clm objective on an `<|endoftext|>` context).
    """
    from dataclasses import replace

    from steps.encode import encode_file, write_encoded
    from steps.tokenizer import EOS_ID, get_tokenizer

    if pack < 1:
        raise InputError(f"--pack must be >= 1 (got {pack})")
    tokenizer = get_tokenizer()
    results = []
    for name, texts in (("train", train), ("valid", valid)):
        source = out_dir / f"{name}.formatted.jsonl"
        source.write_text("".join(json.dumps({"context": "", "completion": t}, ensure_ascii=False) + "\n" for t in texts),
                          encoding="utf-8")
        encoded = encode_file(source, out_dir / f"{name}.jsonl", tokenizer, add_bos=True, add_eos=True)
        completions = [json.loads(line)["completion"] for line in encoded.lines]  # each " text" + <|endoftext|>
        packed = [list(itertools.chain.from_iterable(completions[i : i + pack])) for i in range(0, len(completions), pack)]
        lines = [json.dumps({"context": [EOS_ID], "completion": ids}) for ids in packed]
        meta = encoded.meta | {"examples": len(lines), "max_len": 1 + max(map(len, packed)),
                               "max_completion_len": max(map(len, packed)), "texts_per_example": pack}  # fmt: skip
        results.append(replace(encoded, lines=lines, meta=meta, total_lengths=[1 + len(ids) for ids in packed]))
    write_encoded(results)
    return out_dir / "train.jsonl", out_dir / "valid.jsonl"


def trainer_command(args: argparse.Namespace, init: Path, train: Path, valid: Path, work_dir: Path) -> list[str]:
    every = max(1, args.updates // 10)
    return [
        sys.executable, "-m", "steps.train", "--train_data", str(train), "--valid_data", str(valid),
        "--model_card", args.model_card, "--init_checkpoint", str(init), "--lora_dim", "0",
        "--lr", repr(args.lr), "--warmup_step", str(min(args.warmup, args.updates)), "--max_step", str(args.updates),
        "--train_batch_size", str(args.batch_size), "--valid_batch_size", "32", "--random_seed", str(args.seed),
        "--precision", args.precision, "--log_interval", str(every), "--eval_interval", str(max(every, args.updates // 4)),
        "--save_interval", str(args.updates + 1), "--work_dir", str(work_dir), *TRAINER_SETTINGS,
    ]  # fmt: skip


def held_out_loss(checkpoint: Path, model_card: str, valid: Path) -> float:
    """Token-mean NLL of `checkpoint` on the held-out texts (the trainer's validation loss, for the random init)."""
    from steps.checkpoints import load_base_weights
    from steps.data import build_examples, collate, load_encoded
    from steps.loss import masked_lm_loss

    with torch.random.fork_rng(devices=[]):  # the init is overwritten; callers keep their RNG state
        model = GPT2(card(model_card))
    load_base_weights(model, checkpoint)
    model.eval()
    examples = build_examples(load_encoded(valid), model.config.n_positions, "clm")
    total = tokens = 0.0
    with torch.inference_mode():
        for start in range(0, len(examples), 32):
            batch = collate(examples[start : start + 32], None)
            total += masked_lm_loss(model, batch, 0.0)[1].item()
            tokens += batch["mask"].sum().item()
    return total / tokens


def pretrain(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """Random init -> the trainer in full-training mode on the corpus -> `output`; returns the summary."""
    train_texts, valid_texts = read_corpus(args.corpus, args.valid_texts)
    with tempfile.TemporaryDirectory(prefix="make_base.") as tmp:
        tmp_dir = Path(tmp)
        init = tmp_dir / "init.safetensors"
        write_random_base(args.model_card, args.seed, init)
        train, valid = encode_corpus(train_texts, valid_texts, tmp_dir, args.pack)
        init_loss = held_out_loss(init, args.model_card, valid)
        work_dir = tmp_dir / "work"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # no MLflow run of its own
        result = subprocess.run(trainer_command(args, init, train, valid, work_dir), env=env)
        if result.returncode != 0:
            raise InputError(f"the pretraining run (steps.train --lora_dim 0) failed with exit status {result.returncode}; "
                             "its messages are above")
        with atomic_path(output) as target:
            shutil.copyfile(work_dir / "model.safetensors", target)
        for name in LOGS:
            shutil.copyfile(work_dir / name, output.parent / name)
        final = reports.read_rows(work_dir / "valid_log.csv")[-1]  # the trainer validates the final model last
        summary = json.loads((work_dir / "summary.json").read_text(encoding="utf-8"))
    loss = float(final["valid_loss"])
    return {
        "model_card": args.model_card, "seed": args.seed, "corpus": str(args.corpus),
        "train_texts": len(train_texts), "held_out_texts": len(valid_texts), "updates": args.updates,
        "batch_size": args.batch_size, "pack": args.pack, "lr": args.lr, "warmup": min(args.warmup, args.updates),
        "epochs": round(args.updates * args.batch_size * args.pack / len(train_texts), 3),
        # Rounded: the init's loss is summed in this process with whatever thread split the machine's load gives, and
        # its last bits must not change the stage's output (dvc.lock) between two runs of the same settings.
        "held_out_loss_init": round(init_loss, 6), "held_out_loss": round(loss, 6),
        "held_out_ppl": round(math.exp(min(loss, 50)), 4), "final_train_loss": round(summary["final_train_loss"], 6),
    }  # fmt: skip


def run(args: argparse.Namespace) -> str:
    start = time.perf_counter()
    output = Path(args.output)
    for name, value in (("--updates", args.updates), ("--batch_size", args.batch_size - 1), ("--warmup", args.warmup)):
        if value < 0:
            raise InputError(f"{name} must be {'>= 1' if name == '--batch_size' else '>= 0'}")
    used = args.for_checkpoint is None or Path(args.for_checkpoint).resolve() == output.resolve()
    for stale in (SUMMARY_FILE, *LOGS):
        (output.parent / stale).unlink(missing_ok=True)
    if args.corpus and args.updates > 0 and used:
        summary = pretrain(args, output)
        write_json(output.parent / SUMMARY_FILE, summary)
        what = (f"pretrained on {summary['train_texts']} texts for {args.updates} updates ({summary['epochs']:g} epochs): "
                f"held-out LM loss {summary['held_out_loss_init']:.3f} -> {summary['held_out_loss']:.3f} nats/token")
    else:
        n = write_random_base(args.model_card, args.seed, output)
        reason = ("the fine-tuning starts from " + str(args.for_checkpoint)) if not used else "no --corpus / --updates 0"
        what = f"random init, {n:,} parameters, not pretrained ({reason})"
    return (f"make_base: {args.model_card} (seed {args.seed}) {what} -> {output} (sha256 {sha256_file(output)[:12]}, "
            f"{time.perf_counter() - start:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_stage(lambda: print(run(args)))


if __name__ == "__main__":
    sys.exit(main())
