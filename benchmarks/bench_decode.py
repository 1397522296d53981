"""Decoding speed: beam search over the E2E test set, this project's decoder vs reference-equivalent mode.

The README's settings: beam 10, length penalty 0.8, no-repeat 4-grams, repetition penalty 1.0, stop ids
{<|endoftext|>, "\\n\\n" (628)}, eval_len 64, queries = the MR ids + <|endoftext|>, left-truncated to
seq_len - eval_len = 448.

  ours       steps.decode.search_queries at the project's defaults: one search per unique MR (4,693 lines,
             630 MRs), MRs sorted by length and decoded --batch_size at a time on a preallocated KV cache, a search
             ends as soon as nothing can beat its best finished hypothesis; bf16 autocast on a GPU, fp32 on the CPU
  reference  `reference_search`: the original's schedule, every line searched on its own at batch 1, always
             eval_len steps, nothing shared between lines; fp32 (the "schedule" columns)
  original   the same plus the original design's first step, the "original design" columns: the query
             right-padded to seq_len (512), repeated for each of the K beams and run in full, with the LM head on
             every one of those K x 512 positions (on a CPU that alone costs more than the rest of the search).
             The extra rows and positions are then dropped, so the search is unchanged. Still not charged: the
             original's per-step attention over all 512 cache positions and its reorder of the whole cache.

Both references use the same weights as ours and give the same hypotheses up to float rounding; the share of lines
whose predicted token ids are identical to ours is reported.

Weights: no pretrained checkpoint exists here, so the base is random. A random GPT-2 gives a nearly uniform
next-token distribution and never ends a hypothesis, so every search would run all eval_len steps - unlike a
trained model, whose E2E outputs end after about 25 tokens. `--stop_after` emulates that: from the N-th
generated token on, the eos logit gets +50 (one add on one logit column, no change to the work per step), so every
hypothesis ends with N tokens. `auto` sets N to the mean length of the test references in tokens (eos included);
0 turns the emulation off (the fast path's worst case: no early stop at all). A comma list runs several settings.

The references are slow (seconds per line on a CPU), so they decode --reference_lines and --original_lines lines
spread over the run and their totals are projected from the per-line time; --mrs limits the run to N distinct MRs
spread over the file (all their lines).

    .venv/bin/python benchmarks/bench_decode.py                                    # CPU: gpt2.sm, 96 MRs, 24 + 6 reference lines
    .venv/bin/python benchmarks/bench_decode.py --device cuda --model_card gpt2.md --mrs 0 --reference_lines 200
    .venv/bin/python benchmarks/bench_decode.py --tiny                             # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script: `benchmarks`, `steps` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from benchmarks import common
from steps.core.common import InputError, run_stage
from steps.decode import make_query, search_queries
from steps.decoding.beam import BeamConfig, Hypothesis
from steps.model.gpt2 import CARDS, GPT2, KVCache, card
from steps.model.tokenizer import EOS_ID

Search = Callable[[nn.Module, list[list[int]], BeamConfig], list[Hypothesis]]  # queries -> best hypothesis per query
EOS_BIAS = 50.0  # added to the eos logit once a hypothesis reaches --stop_after tokens: eos then wins every beam


class StopAfter(nn.Module):
    """A model wrapper whose hypotheses end after `length` generated tokens, as a trained model's would.

    beam_search calls `hidden` once without a cache (the prompt) and then once per generated token, each followed
    by `logits`; counting those calls gives the index of the token being chosen, the same for every row.
    """

    def __init__(self, model: GPT2, length: int, eos: int = EOS_ID):
        super().__init__()
        self.model, self.length, self.eos = model, length, eos
        self.config = model.config
        self.step = 0

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, past: list[KVCache] | None = None) -> tuple[torch.Tensor, list[KVCache]]:
        self.step = 0 if past is None else self.step + 1
        return self.model.hidden(input_ids, position_ids=position_ids, attention_mask=attention_mask, past=past)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.logits(hidden)
        if self.step + 1 >= self.length:  # choosing the length-th token: make it eos
            logits[..., self.eos] += EOS_BIAS
        return logits


class OriginalStepZero(nn.Module):
    """A model wrapper that charges the original's first step (the padded prompt) and then behaves like the model.

    The original expanded each query to its K beams, right-padded to seq_len, and ran all K x seq_len positions
    through the model and the LM head. Right padding leaves the real positions' values unchanged (causal
    attention), so after paying for that work the wrapper returns the first row and the real positions: the
    search, and its result up to float rounding, stay the same. For batch-1 searches (the reference schedule).
    """

    def __init__(self, model: nn.Module, beam: int, seq_len: int):
        super().__init__()
        self.model, self.beam, self.seq_len = model, beam, seq_len
        self.config = model.config

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, past: list[KVCache] | None = None) -> tuple[torch.Tensor, list[KVCache]]:
        if past is not None:
            return self.model.hidden(input_ids, position_ids=position_ids, attention_mask=attention_mask, past=past)
        n, length = input_ids.shape
        if n != 1 or attention_mask is not None:
            raise ValueError("OriginalStepZero models the original's batch-1 schedule: one unpadded query at a time")
        padded = F.pad(input_ids, (0, max(0, self.seq_len - length))).repeat(self.beam, 1)  # the original pads with 0
        hidden, past = self.model.hidden(padded)
        self.model.logits(hidden)  # the original's LM head ran on all K x seq_len positions; only one was used
        return hidden[:1, :length], [KVCache(layer.k[:1, :, :length], layer.v[:1, :, :length]) for layer in past]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)


def reference_search(model: nn.Module, queries: list[list[int]], cfg: BeamConfig, progress: bool = False) -> list[Hypothesis]:
    """The original's schedule: every line searched on its own (batch 1; a repeated MR is searched again), always
    all eval_len steps, in fp32. The same hypotheses as `search_queries`, only slower."""
    cfg = dataclasses.replace(cfg, early_stop=False)
    lines = tqdm(queries, unit="line", desc="reference", disable=not progress, dynamic_ncols=True)
    return [search_queries(model, [query], cfg, batch_size=1, precision="fp32")[0] for query in lines]


# ---------------------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_card", default="gpt2.sm", help=f"architecture: {', '.join(CARDS)} (default gpt2.sm)")
    p.add_argument("--data", default=None, help="E2E MR||ref test file (default ../shared/data/e2e/test.txt, else the "
                   "generated sample's test split)")
    p.add_argument("--mrs", type=int, default=96, help="decode the lines of N distinct MRs, evenly spaced over the file "
                   "(0: the whole set; default 96, about a sixth of E2E test)")
    p.add_argument("--reference_lines", type=int, default=24, help="lines decoded in reference mode, evenly spaced over the "
                   "run; its total is projected from their mean time (0: every line of the run; default 24)")
    p.add_argument("--original_lines", type=int, default=6, help="lines decoded with the original design's step 0 (see "
                   "above), evenly spaced over the run (0: every line; default 6)")
    p.add_argument("--stop_after", default="auto", help="eos emulation (see above): auto, N tokens, 0 = off, or a "
                   "comma list such as auto,0 (default auto)")
    p.add_argument("--batch_size", type=int, default=16, help="unique MRs per batch in our mode (default 16, params.yaml)")
    p.add_argument("--beam", type=int, default=10, help="beam width (default 10, the README's)")
    p.add_argument("--length_penalty", type=float, default=0.8, help="finished score = log-prob / length**this "
                   "(default 0.8, the README's)")
    p.add_argument("--no_repeat_ngram_size", type=int, default=4, help="ban repeating generated n-grams of this size "
                   "(default 4)")
    p.add_argument("--eval_len", type=int, default=64, help="maximum generated tokens (default 64)")
    p.add_argument("--seq_len", type=int, default=512, help="query = last seq_len - eval_len context ids (default 512)")
    p.add_argument("--precision", default="auto", help="our mode's precision: auto (the default: bf16 on GPU, fp32 on "
                   "CPU), fp32 or bf16, or a comma list (one row each); the reference mode is always fp32")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random base weights")
    p.add_argument("--init_checkpoint", default=None, help="trained weights instead of the random base: a model.safetensors "
                   "(e.g. the shipped data/base/standin.safetensors), of the architecture --model_card names (e.g. gpt2.tiny)")
    p.add_argument("--adapter", default=None, help="with --init_checkpoint: a LoRA adapter directory merged into it "
                   "(e.g. models/finetune). A trained model ends its own hypotheses: use --stop_after 0")
    p.add_argument("--tiny", action="store_true", help="smoke-test size: gpt2.tiny, 4 MRs, 3 reference lines, eval_len 12, "
                   "--stop_after 5,0 unless given")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/out/decode_<device>_<card>.json)")
    return p


def apply_tiny(args: argparse.Namespace) -> None:
    args.model_card, args.mrs, args.reference_lines, args.original_lines, args.eval_len = "gpt2.tiny", 4, 3, 2, 12
    if args.stop_after == "auto":  # E2E's mean would exceed eval_len 12: stop early enough to see the emulation
        args.stop_after = "5,0"


# ---------------------------------------------------------------------------------------------- data


def load_queries(args: argparse.Namespace) -> tuple[list[list[int]], float, str, int, int]:
    """The run's queries (one per line, file order), the mean reference length in tokens, the source, line and MR counts."""
    pairs, source = common.e2e_pairs("test", args.data, sample_mrs=60)
    encoded = common.encode_e2e(pairs)
    mean_ref_tokens = statistics.mean(len(completion) for _, completion in encoded)
    all_mrs = list(dict.fromkeys(mr for mr, _ in pairs))
    stride = max(1, len(all_mrs) // args.mrs) if args.mrs else 1
    chosen = set(all_mrs[::stride][: args.mrs] if args.mrs else all_mrs)  # spread over the file, not its first block
    queries = [make_query(context, args.seq_len, args.eval_len) for (mr, _), (context, _) in zip(pairs, encoded) if mr in chosen]
    return queries, mean_ref_tokens, source, len(pairs), len(all_mrs)


def stop_settings(text: str, mean_ref_tokens: float, eval_len: int) -> list[int]:
    values = []
    for item in text.split(","):
        item = item.strip()
        if item == "auto":
            values.append(min(eval_len, round(mean_ref_tokens)))
        elif item.isdigit():
            values.append(int(item))
        else:
            raise InputError(f"--stop_after takes auto, a number of tokens or 0, comma-separated; got {item!r}")
    return values


# ---------------------------------------------------------------------------------------------- timing


def timed_search(search: Search, model: nn.Module, queries: list[list[int]], cfg: BeamConfig,
                 device: torch.device) -> tuple[list[Hypothesis], float]:
    """`search`'s hypotheses and wall seconds; one query is searched first, untimed, so one-time set-up costs stay out."""
    search(model, queries[:1], dataclasses.replace(cfg, eval_len=2))
    common.sync(device)
    started = time.perf_counter()
    hyps = search(model, queries, cfg)
    common.sync(device)
    return hyps, time.perf_counter() - started


def spread(queries: list[list[int]], count: int) -> list[int]:
    """Indices of `count` queries evenly spaced over the run (all of them for 0)."""
    count = min(count or len(queries), len(queries))
    return list(range(0, len(queries), len(queries) // count))[:count]


def time_reference(model: nn.Module, queries: list[list[int]], count: int, cfg: BeamConfig,
                   device: torch.device) -> tuple[list[int], list[Hypothesis], float]:
    """The reference schedule on `count` lines spread over the run: their indices, hypotheses and seconds per line."""
    picked = spread(queries, count)
    reference = functools.partial(reference_search, progress=True)
    hyps, seconds = timed_search(reference, model, [queries[i] for i in picked], cfg, device)
    return picked, hyps, seconds / len(picked)


def identical_share(ours: list[Hypothesis], picked: list[int], reference: list[Hypothesis]) -> float:
    return sum(ours[i].tokens == r.tokens for i, r in zip(picked, reference)) / len(picked)


def run_setting(base: GPT2, stop_after: int, queries: list[list[int]], precisions: list[str], args: argparse.Namespace,
                device: torch.device) -> list[dict[str, Any]]:
    """Both references on lines spread over the run, ours on all of them in each precision; one row per precision."""
    model = StopAfter(base, stop_after) if stop_after > 0 else base
    original = OriginalStepZero(base, args.beam, args.seq_len)
    original = StopAfter(original, stop_after) if stop_after > 0 else original
    cfg = BeamConfig(beam=args.beam, eval_len=args.eval_len, length_penalty=args.length_penalty,
                     no_repeat_ngram_size=args.no_repeat_ngram_size, repetition_penalty=1.0, eos_token_ids=(EOS_ID, 628))
    picked, reference, per_line = time_reference(model, queries, args.reference_lines, cfg, device)
    original_picked, original_hyps, original_per_line = time_reference(original, queries, args.original_lines, cfg, device)
    n_mrs = len(set(map(tuple, queries)))
    rows = []
    for precision in precisions:
        ours_search = functools.partial(search_queries, batch_size=args.batch_size, precision=precision, progress=True)
        ours, ours_s = timed_search(ours_search, model, queries, cfg, device)
        rows.append({
            "stop_after": stop_after, "precision": precision, "lines": len(queries), "mrs": n_mrs,
            "ours_s": ours_s, "ours_mrs_per_s": n_mrs / ours_s, "ours_lines_per_s": len(queries) / ours_s,
            "reference_lines_decoded": len(picked), "reference_s_per_line": per_line,
            "reference_s": per_line * len(queries), "reference_mrs_per_s": n_mrs / (per_line * len(queries)),
            "speedup": per_line * len(queries) / ours_s, "identical_share": identical_share(ours, picked, reference),
            "original_lines_decoded": len(original_picked), "original_s_per_line": original_per_line,
            "original_s": original_per_line * len(queries), "original_speedup": original_per_line * len(queries) / ours_s,
            "original_identical_share": identical_share(ours, original_picked, original_hyps),
            "mean_generated_tokens": statistics.mean(len(h.tokens) for h in ours),
            "ended_on_eos_share": statistics.mean(h.finished for h in ours),
        })
    return rows


def add_full_set_projection(row: dict[str, Any], total_lines: int, total_mrs: int) -> None:
    """Whole test set: ours scales with the number of MRs, the references with the number of lines."""
    row["full_ours_s"] = row["ours_s"] / row["mrs"] * total_mrs
    row["full_ours_mrs_per_s"] = total_mrs / row["full_ours_s"]
    for name in ("reference", "original"):
        row[f"full_{name}_s"] = row[f"{name}_s_per_line"] * total_lines
        row[f"full_{name}_mrs_per_s"] = total_mrs / row[f"full_{name}_s"]
    row["full_speedup"] = row["full_reference_s"] / row["full_ours_s"]
    row["full_original_speedup"] = row["full_original_s"] / row["full_ours_s"]


# ---------------------------------------------------------------------------------------------- report


def print_report(rows: list[dict[str, Any]], context: dict[str, Any], machine: dict[str, Any]) -> None:
    where = machine.get("gpu") or f"{machine['host_cpu']}, {machine['torch_threads']} threads"
    print(f"\nDecoding, {context['model_card']}, beam {context['beam']}, eval_len {context['eval_len']}, {context['data']} "
          f"({where}; torch {machine['torch']}, load average {machine['load_average_1m']})\n")
    headers = ["eos emulation", "ours", "lines / MRs run", "ours s", "s per line: schedule", "original design",
               "identical: schedule", "original design", "mean tokens",
               f"full set ({context['total_lines']} / {context['total_mrs']}): ours s", "schedule s", "original design s",
               "ours MRs/s", "speed-up vs schedule", "vs original design"]
    table = []
    for r in rows:
        table.append([
            f"after {r['stop_after']} tokens" if r["stop_after"] else "off", r["precision"], f"{r['lines']} / {r['mrs']}",
            r["ours_s"], f"{common.number(r['reference_s_per_line'])} ({r['reference_lines_decoded']} lines)",
            f"{common.number(r['original_s_per_line'])} ({r['original_lines_decoded']} lines)",
            f"{100 * r['identical_share']:.0f}%", f"{100 * r['original_identical_share']:.0f}%", r["mean_generated_tokens"],
            r["full_ours_s"], r["full_reference_s"], r["full_original_s"], r["full_ours_mrs_per_s"],
            f"{r['full_speedup']:.1f}x", f"{r['full_original_speedup']:.1f}x",
        ])
    print(common.markdown_table(headers, table))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return run_stage(lambda: run(args))
    finally:
        torch.set_num_threads(threads)  # --threads is for this run only: a caller in the same process keeps its own


def trained_or_random(args: argparse.Namespace, cfg: Any, device: torch.device) -> GPT2:
    """The weights to decode with: --init_checkpoint (+ --adapter), else the seeded random base of --model_card."""
    if args.init_checkpoint:
        from steps.decode import load_for_inference

        return load_for_inference(args.adapter, args.init_checkpoint, device, model_card=args.model_card).eval()
    if args.adapter:
        raise InputError("--adapter needs --init_checkpoint, the base it was trained on")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return GPT2(cfg).eval().to(device)


def run(args: argparse.Namespace) -> None:
    if args.tiny:
        apply_tiny(args)
    if min(args.beam, args.eval_len, args.batch_size) < 1 or min(args.mrs, args.reference_lines, args.original_lines) < 0:
        raise InputError("--beam, --eval_len and --batch_size must be >= 1; --mrs, --reference_lines and --original_lines >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    cfg = card(args.model_card)
    queries, mean_ref_tokens, source, total_lines, total_mrs = load_queries(args)
    stops = stop_settings(args.stop_after, mean_ref_tokens, args.eval_len)
    machine = common.machine_info(str(device))
    base = trained_or_random(args, cfg, device)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    precisions = [("bf16" if device.type == "cuda" else "fp32") if p == "auto" else p for p in precisions]
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions):
        raise InputError(f"--precision takes auto, fp32 and bf16, comma-separated; got {args.precision!r}")
    rows = [row for stop in stops for row in run_setting(base, stop, queries, precisions, args, device)]
    for row in rows:
        add_full_set_projection(row, total_lines, total_mrs)
    context = {"model_card": args.model_card, "beam": args.beam, "eval_len": args.eval_len, "length_penalty": args.length_penalty,
               "no_repeat_ngram_size": args.no_repeat_ngram_size, "batch_size": args.batch_size, "data": source,
               "total_lines": total_lines, "total_mrs": total_mrs, "mean_reference_tokens": mean_ref_tokens}
    print_report(rows, context, machine)
    out = Path(args.out or common.OUT_DIR / f"decode_{device.type}_{args.model_card}.json")
    common.save_results(out, {"benchmark": "decode", "machine": machine, "settings": context, "results": rows})
    r = rows[0]
    print(f"\nbench_decode: {r['lines']} lines / {r['mrs']} MRs on {device} ({args.model_card}, beam {args.beam}, {r['precision']}): "
          f"ours {r['ours_mrs_per_s']:.2f} MRs/s; projected to the whole set {r['full_speedup']:.1f}x the reference schedule "
          f"and {r['full_original_speedup']:.1f}x the original design; {100 * r['identical_share']:.0f}% identical "
          f"predictions -> {out}")


if __name__ == "__main__":
    sys.exit(main())
