"""The offline stand-in for pretrained GPT-2 weights: a small GPT-2 pretrained to copy from a record.

Real users fine-tune a GPT-2 that was pretrained on web text; offline there are no such weights. The project ships
a stand-in built by this module once, long and cheaply (`data/base/`, with a manifest saying how): a seeded
`gpt2.tiny` trained as a plain language model on documents that can only be predicted by copying names and values
from a record above them (steps.datasets.standin_corpus). The default pipeline adapts that file; it never pretrains.

Two cheap tricks make hours of 2-core pretraining enough:
- **The loss runs over the corpus's own token set** (a few thousand of GPT-2's 50,257 tokens): the LM head is
  most of a 128-wide model's work. The model keeps GPT-2's full vocabulary and layout; the rows of tokens the
  corpus never uses (and positions past the training window) are put back to their seeded initial values at the
  end, so they are exactly as initialised (weight decay would otherwise have shrunk them), and they never win at
  decoding (tests/test_make_base.py checks it on the decoded test set).
- **Large allocations are kept** instead of being returned to the OS at every free (steps.core.runtime).

A **copy probe** measures what the fine-tuning needs before any LoRA: greedy decoding, with the full vocabulary, of
records no document holds, of the corpus's own domains (a hit: the record's name in the text) and of a domain the
corpus never contains (ships; a hit: the ship's invented name in the text). The curve tracks the second.

    python -m steps.make_base --output /tmp/random.safetensors                 # the seeded random init only (seconds)
    python -m steps.make_base --output data/base/standin.safetensors --updates 12000 --work_dir .standin-build

A long build saves its state every `--save_every` updates in `--work_dir` and resumes from it when rerun with the
same settings (an interrupted build loses at most that much). The manifest (`<output>.json`) records the sha256,
the exact command, the settings, the machine it ran on, the loss curve and the copy probe.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from steps.core import runtime
from steps.core.common import InputError, atomic_path, run_stage, sha256_file, write_json
from steps.datasets import standin_corpus
from steps.formats.checkpoints import load_base_weights, save_hf_checkpoint
from steps.model.gpt2 import CARDS, GPT2, card
from steps.training.optim import AdamW

MANIFEST_FORMAT = "lora-nlg-standin-base"
STATE_FILE = "build_state.pt"  # the build's own work dir, not a trainer's (steps/formats/work_dir.py)


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides the built weights (the resume state is refused under other values)."""

    model_card: str = "gpt2.tiny"
    seed: int = 0
    documents: int = 400_000  # generated documents; the last `held_out` are never trained on
    held_out: int = 2_000
    updates: int = 0  # 0: the seeded random init only
    batch_size: int = 16  # windows per update
    window: int = 128  # tokens per window, cut anywhere in the packed stream (documents joined by <|endoftext|>)
    lr: float = 3e-3
    warmup: int = 200
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * this at the last update
    weight_decay: float = 0.01
    storage: str = "bf16"  # dtype of the shipped file: bf16 halves it; fp32 keeps every bit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m steps.make_base", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="where to write model.safetensors (the manifest goes to <output>.json)")
    helps = {
        "model_card": f"architecture: one of {', '.join(CARDS)}",
        "seed": "seeds the random init, the corpus and the order of the windows",
        "documents": "corpus documents generated (records of other domains with their texts, restaurant descriptions)",
        "held_out": "the corpus's last documents, never trained on: the held-out LM loss",
        "updates": "pretraining updates (0: write the seeded random init only)",
        "batch_size": "windows per update",
        "window": "tokens per training window",
        "lr": "peak learning rate (linear warmup, then cosine decay)",
        "warmup": "warmup updates",
        "min_lr_ratio": "the learning rate at the last update, as a fraction of --lr",
        "weight_decay": "AdamW's decoupled weight decay",
        "storage": "dtype of the written weights (bf16 or fp32)",
    }
    for f in fields(BuildSettings):
        p.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=helps[f.name],
                       choices=("bf16", "fp32") if f.name == "storage" else None)
    p.add_argument("--work_dir", default=None, help="where a long build keeps its resume state (required with --updates)")
    p.add_argument("--save_every", type=int, default=500, help="updates between resume states")
    p.add_argument("--probe_every", type=int, default=1000, help="updates between held-out loss and copy-probe reports")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the same bits on every run of one machine)")
    return p


def settings_from(args: argparse.Namespace) -> BuildSettings:
    s = BuildSettings(**{f.name: getattr(args, f.name) for f in fields(BuildSettings)})
    card(s.model_card)
    for name in ("documents", "batch_size", "window"):
        if getattr(s, name) < 1:
            raise InputError(f"--{name} must be >= 1 (got {getattr(s, name)})")
    if s.updates < 0 or s.warmup < 0 or not 0 <= s.held_out < s.documents:
        raise InputError("--updates and --warmup must be >= 0, and --held_out between 0 and --documents - 1")
    if not (s.lr > 0 and 0 <= s.min_lr_ratio <= 1 and s.weight_decay >= 0):
        raise InputError("--lr must be > 0, --min_lr_ratio in [0, 1], --weight_decay >= 0")
    if s.window >= card(s.model_card).n_positions:
        raise InputError(f"--window {s.window} must be below the {card(s.model_card).n_positions} positions of {s.model_card}")
    return s


def random_model(s: BuildSettings) -> GPT2:
    with torch.random.fork_rng(devices=[]):  # callers (tests) keep their RNG state
        torch.manual_seed(s.seed)
        return GPT2(card(s.model_card))


def write_random_base(model_card: str, seed: int, output: str | Path) -> int:
    """The seeded random init in Hugging Face layout (fp32); returns the number of parameters."""
    model = random_model(BuildSettings(model_card=model_card, seed=seed))
    save_hf_checkpoint(model, output)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Corpus:
    train: torch.Tensor  # the packed token stream
    held_out: torch.Tensor
    vocab: torch.Tensor  # sorted token ids the corpus uses: the loss's softmax runs over these rows only
    remap: torch.Tensor  # token id -> its index in `vocab` (-1 outside)


def build_corpus(s: BuildSettings) -> Corpus:
    from steps.model.tokenizer import EOS_ID, get_tokenizer

    tokenizer = get_tokenizer()
    docs = standin_corpus.documents(s.seed, s.documents)
    ids = [[*tokenizer.encode(doc), EOS_ID] for doc in docs]
    cut = len(ids) - s.held_out
    train = torch.tensor([EOS_ID] + [t for doc in ids[:cut] for t in doc])
    held_out = torch.tensor([EOS_ID] + [t for doc in ids[cut:] for t in doc])
    vocab = torch.unique(torch.cat([train, held_out]))  # sorted
    remap = torch.full((card(s.model_card).vocab_size,), -1, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    if len(train) <= s.window + 1:
        raise InputError(f"the corpus has {len(train)} training tokens, fewer than one window of {s.window}; raise --documents")
    return Corpus(train, held_out, vocab, remap)


def subset_loss(model: GPT2, tokens: torch.Tensor, corpus: Corpus) -> torch.Tensor:
    """Mean next-token NLL of [B, T+1] `tokens`, the softmax taken over the corpus's token set only."""
    hidden, _ = model.hidden(tokens[:, :-1])
    logits = F.linear(hidden, model.wte.weight.index_select(0, corpus.vocab))
    return F.cross_entropy(logits.flatten(0, 1), corpus.remap[tokens[:, 1:]].flatten())


def held_out_loss(model: GPT2, corpus: Corpus, window: int) -> float:
    """Token-mean NLL over the held-out stream in consecutive windows (the training's own loss)."""
    n = (len(corpus.held_out) - 1) // window
    if n == 0:
        return math.nan
    starts = torch.arange(n) * window
    tokens = corpus.held_out[starts[:, None] + torch.arange(window + 1)]
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        losses = [subset_loss(model, tokens[i : i + 64], corpus) * len(tokens[i : i + 64]) for i in range(0, n, 64)]
    model.train(was_training)
    return float(sum(losses) / n)


def copy_probe(model: GPT2, seed: int = 0, count: int = 100, new_tokens: int = 16, unseen_domain: bool = True) -> dict[str, Any]:
    """Greedy continuations (full vocabulary) of records no document holds (of a domain the corpus never contains,
    or of its own domains): how often the text copies the record's name."""
    from steps.model.tokenizer import EOS_ID, get_tokenizer

    tokenizer = get_tokenizer()
    was_training = model.training
    model.eval()
    hits, examples = 0, []
    with torch.inference_mode():
        for prompt, name in standin_corpus.probe_records(seed, count, unseen_domain):
            ids = torch.tensor([[EOS_ID, *tokenizer.encode(prompt)]])
            hidden, past = model.hidden(ids)
            for layer in past:
                layer.reserve(ids.shape[1] + new_tokens)
            out: list[int] = []
            for _ in range(new_tokens):
                token = int(model.logits(hidden[:, -1]).argmax(-1))
                if token == EOS_ID:
                    break
                out.append(token)
                hidden, past = model.hidden(torch.tensor([[token]]), past=past)
            text = tokenizer.decode(out)
            hits += name in text
            if len(examples) < 3:
                examples.append({"record": prompt.strip(), "text": text.strip()})
    model.train(was_training)
    return {"records": count, "copied": hits, "rate": hits / count, "examples": examples}


# ---------------------------------------------------------------------------------------------- the build


def lr_at(s: BuildSettings, step: int) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at `s.updates` (a function of the step alone)."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.updates - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def restore_unused_rows(model: GPT2, init: GPT2, corpus: Corpus, window: int) -> None:
    """Token rows the corpus never uses, and positions past the window, back to their initial values."""
    unused = corpus.remap < 0
    with torch.no_grad():
        model.wte.weight[unused] = init.wte.weight[unused]
        model.wpe.weight[window:] = init.wpe.weight[window:]


def pretrain(s: BuildSettings, work_dir: Path, save_every: int, probe_every: int) -> tuple[GPT2, dict[str, Any]]:
    corpus = build_corpus(s)
    init = random_model(s)
    model = random_model(s)
    optimizer = AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=s.weight_decay)
    generator = torch.Generator().manual_seed(s.seed)
    state = {"step": 0, "curve": [], "seconds": 0.0}
    state_path = work_dir / STATE_FILE
    if state_path.is_file():
        saved = torch.load(state_path, weights_only=True)
        if saved["settings"] != json.dumps(asdict(s), sort_keys=True):
            raise InputError(f"{state_path} is a build with other settings; delete {work_dir} to start over, or rerun with "
                             f"its settings: {saved['settings']}")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        state = {"step": saved["step"], "curve": json.loads(saved["curve"]), "seconds": saved["seconds"]}
        print(f"make_base: resuming at update {state['step']} of {s.updates} from {state_path}", flush=True)
    else:
        state["curve"].append({"step": 0, "held_out_loss": held_out_loss(model, corpus, s.window), "copy_rate": 0.0})
    print(f"make_base: {s.model_card}, {len(corpus.train):,} training tokens, {len(corpus.vocab):,} of "
          f"{card(s.model_card).vocab_size:,} token ids in the loss, {s.updates} updates of {s.batch_size} x {s.window} tokens",
          flush=True)
    offsets = torch.arange(s.window + 1)
    model.train()
    started = time.perf_counter() - state["seconds"]
    with tqdm(total=s.updates, initial=state["step"], unit="update", dynamic_ncols=True, disable=not sys.stderr.isatty()) as bar:
        while state["step"] < s.updates:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(s, state["step"])
            starts = torch.randint(0, len(corpus.train) - s.window - 1, (s.batch_size,), generator=generator)
            loss = subset_loss(model, corpus.train[starts[:, None] + offsets], corpus)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state["step"] += 1
            bar.update(1)
            if not math.isfinite(loss.item()):
                raise InputError(f"the pretraining loss is {loss.item()} at update {state['step']}; lower --lr")
            step = state["step"]
            if step % probe_every == 0 or step == s.updates:
                point = {"step": step, "train_loss": round(loss.item(), 4), "held_out_loss": held_out_loss(model, corpus, s.window),
                         "copy_rate": copy_probe(model)["rate"], "seconds": round(time.perf_counter() - started, 1)}
                state["curve"].append(point)
                tqdm.write(f"make_base: update {step}: train {point['train_loss']:.3f}, held-out {point['held_out_loss']:.3f} "
                           f"nats/token, copy probe {point['copy_rate']:.0%} ({point['seconds']:.0f} s)", file=sys.stdout)
                sys.stdout.flush()
            if step % save_every == 0 and step < s.updates:
                state["seconds"] = time.perf_counter() - started
                save_state(state_path, s, model, optimizer, generator, state)
    state["seconds"] = time.perf_counter() - started
    restore_unused_rows(model, init, corpus, s.window)
    report = {"training_tokens": len(corpus.train), "loss_vocab": corpus.vocab.tolist(), "curve": state["curve"],
              "held_out_loss_init": state["curve"][0]["held_out_loss"], "held_out_loss": held_out_loss(model, corpus, s.window),
              "train_seconds": round(state["seconds"], 1)}  # fmt: skip
    return model, report


def save_state(path: Path, s: BuildSettings, model: GPT2, optimizer: AdamW, generator: torch.Generator, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({"settings": json.dumps(asdict(s), sort_keys=True), "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "step": state["step"],
                    "curve": json.dumps(state["curve"]), "seconds": state["seconds"]}, tmp)


def manifest_path(output: Path) -> Path:
    return output.with_suffix(".json")


def run(args: argparse.Namespace, argv: list[str]) -> str:
    start = time.perf_counter()
    s = settings_from(args)
    output = Path(args.output)
    if s.updates == 0:
        n = write_random_base(s.model_card, s.seed, output)
        return f"make_base: {s.model_card} (seed {s.seed}) random init, {n:,} parameters -> {output} (sha256 {sha256_file(output)[:12]})"
    if not args.work_dir:
        raise InputError("a build (--updates > 0) needs --work_dir, where it keeps its resume state")
    if args.save_every < 1 or args.probe_every < 1 or args.threads < 1:
        raise InputError("--save_every, --probe_every and --threads must be >= 1")
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    with runtime.torch_threads(args.threads):
        model, report = pretrain(s, work_dir, args.save_every, args.probe_every)
    if s.storage == "bf16":
        model.to(torch.bfloat16)
    save_hf_checkpoint(model, output)
    shipped = random_model(s)  # the written file as a user loads it (bf16 values in an fp32 model)
    load_base_weights(shipped, output)
    with runtime.torch_threads(args.threads):
        report["copy_probe"] = copy_probe(shipped, new_tokens=24, unseen_domain=False)
        report["copy_probe_unseen_domain"] = copy_probe(shipped)
    manifest = {
        "format": MANIFEST_FORMAT, "file": output.name, "sha256": sha256_file(output), "settings": asdict(s),
        "command": "python -m steps.make_base " + shlex.join(argv), "built_on": runtime.machine(args.threads),
        **report,
    }  # fmt: skip
    write_json(manifest_path(output), manifest)
    with contextlib.suppress(FileNotFoundError):
        (work_dir / STATE_FILE).unlink()
    known, unseen = report["copy_probe"], report["copy_probe_unseen_domain"]
    return (f"make_base: {s.model_card} pretrained for {s.updates} updates: held-out LM loss {report['held_out_loss_init']:.3f} -> "
            f"{report['held_out_loss']:.3f} nats/token; copy probe: the name copied from {known['copied']}/{known['records']} new "
            f"records, {unseen['copied']}/{unseen['records']} of an unseen domain -> {output} (sha256 {manifest['sha256'][:12]}, "
            f"{time.perf_counter() - start:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    return run_stage(lambda: print(run(args, argv)))


if __name__ == "__main__":
    runtime.keep_large_allocations()  # here, not in main(): tests call main() in their own process
    sys.exit(main())
