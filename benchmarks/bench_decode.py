"""Decoding speed: beam search over the E2E test set, this project's decoder vs reference-equivalent mode.

The README's settings: beam 10, length penalty 0.8, no-repeat 4-grams, repetition penalty 1.0, stop ids
{50256, 628}, eval_len 64, queries = the MR ids + 50256, left-truncated to seq_len - eval_len = 448.

  ours       steps.decode.search_queries at the project's defaults: one search per unique MR (4,693 lines,
             630 MRs), MRs sorted by length and decoded --batch_size at a time on a KV cache, a search ends as soon
             as nothing can beat its best finished hypothesis; bf16 autocast on a GPU, fp32 on the CPU
  reference  search_queries(reference_mode=True): the original's schedule, every line searched on its own at
             batch 1, always eval_len steps, nothing shared between lines; fp32. The original also re-ran the full
             512-padded query K times at step 0; that extra cost is NOT charged here, so the ratio is conservative.

Both modes use the same weights and give the same hypotheses up to float rounding; the share of lines whose
predicted token ids are identical in the two modes is reported.

Weights: no pretrained checkpoint exists here, so the base is random. A random GPT-2 gives a nearly uniform
next-token distribution and never ends a hypothesis, so every search would run all eval_len steps - unlike a
trained model, whose E2E outputs end after about 25 tokens. `--stop_after` emulates that: from the N-th
generated token on, the eos logit gets +50 (one add on one logit column, no change to the work per step), so every
hypothesis ends with N tokens. `auto` sets N to the mean length of the test references in tokens (eos included);
0 turns the emulation off (the fast path's worst case: no early stop at all). A comma list runs several settings.

The reference mode is slow (seconds per line on a CPU), so it decodes --reference_lines lines spread over the run and
its total is projected from the per-line time; --mrs limits the run to N distinct MRs spread over the file (all
their lines).
Speed-ups compare the two modes on the same lines.

    .venv/bin/python benchmarks/bench_decode.py                                    # CPU: gpt2.sm, 96 MRs, 24 reference lines
    .venv/bin/python benchmarks/bench_decode.py --device cuda --model_card gpt2.md --mrs 0 --reference_lines 200
    .venv/bin/python benchmarks/bench_decode.py --tiny                             # seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `benchmarks` and `steps` importable

import torch
from torch import nn

from benchmarks import common
from steps.beam import KV, BeamConfig, Hypothesis
from steps.common import InputError
from steps.decode import make_query, search_queries
from steps.model import CARDS, GPT2, card

EOS_BIAS = 50.0  # added to the eos logit once a hypothesis reaches --stop_after tokens: eos then wins every beam


class StopAfter(nn.Module):
    """A model wrapper whose hypotheses end after `length` generated tokens, as a trained model's would.

    beam_search calls `hidden` once without a cache (the prompt) and then once per generated token, each followed
    by `logits`; counting those calls gives the index of the token being chosen, the same for every row.
    """

    def __init__(self, model: GPT2, length: int, eos: int = common.EOS):
        super().__init__()
        self.model, self.length, self.eos = model, length, eos
        self.config = model.config
        self.step = 0

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, past: list[KV] | None = None) -> tuple[torch.Tensor, list[KV]]:
        self.step = 0 if past is None else self.step + 1
        return self.model.hidden(input_ids, position_ids=position_ids, attention_mask=attention_mask, past=past)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.logits(hidden)
        if self.step + 1 >= self.length:  # choosing the length-th token: make it eos
            logits[..., self.eos] += EOS_BIAS
        return logits


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
    p.add_argument("--tiny", action="store_true", help="smoke-test size: gpt2.tiny, 4 MRs, 3 reference lines, eval_len 12, "
                   "--stop_after 5,0 unless given")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/out/decode_<device>_<card>.json)")
    return p


def apply_tiny(args: argparse.Namespace) -> None:
    args.model_card, args.mrs, args.reference_lines, args.eval_len = "gpt2.tiny", 4, 3, 12
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


def timed_search(model: nn.Module, queries: list[list[int]], cfg: BeamConfig, batch_size: int, precision: str,
                 reference: bool, device: torch.device) -> tuple[list[Hypothesis], float]:
    """Hypotheses and wall seconds; one query is searched first, untimed, so one-time set-up costs stay out."""
    search_queries(model, queries[:1], dataclasses.replace(cfg, eval_len=2), 1, precision, reference)
    common.sync(device)
    started = time.perf_counter()
    hyps = search_queries(model, queries, cfg, batch_size, precision, reference, progress=True)
    common.sync(device)
    return hyps, time.perf_counter() - started


def run_setting(base: GPT2, stop_after: int, queries: list[list[int]], precisions: list[str], args: argparse.Namespace,
                device: torch.device) -> list[dict[str, Any]]:
    """The reference on --reference_lines queries spread over the run, ours on all of them in each precision; one row each."""
    model = StopAfter(base, stop_after) if stop_after > 0 else base
    cfg = BeamConfig(beam=args.beam, eval_len=args.eval_len, length_penalty=args.length_penalty,
                     no_repeat_ngram_size=args.no_repeat_ngram_size, repetition_penalty=1.0, eos_token_ids=(common.EOS, 628))
    n_sample = min(args.reference_lines or len(queries), len(queries))
    picked = list(range(0, len(queries), len(queries) // n_sample))[:n_sample]  # spread over the run's MRs
    sample = [queries[i] for i in picked]
    reference, reference_s = timed_search(model, sample, cfg, 1, "fp32", True, device)
    per_line = reference_s / len(sample)
    n_mrs = len(set(map(tuple, queries)))
    rows = []
    for precision in precisions:
        ours, ours_s = timed_search(model, queries, cfg, args.batch_size, precision, False, device)
        rows.append({
            "stop_after": stop_after, "precision": precision, "lines": len(queries), "mrs": n_mrs,
            "ours_s": ours_s, "ours_mrs_per_s": n_mrs / ours_s, "ours_lines_per_s": len(queries) / ours_s,
            "reference_lines_decoded": len(sample), "reference_measured_s": reference_s, "reference_s_per_line": per_line,
            "reference_s": per_line * len(queries), "reference_projected": len(sample) < len(queries),
            "reference_mrs_per_s": n_mrs / (per_line * len(queries)), "speedup": per_line * len(queries) / ours_s,
            "identical_share": sum(ours[i].tokens == b.tokens for i, b in zip(picked, reference)) / len(sample),
            "mean_generated_tokens": statistics.mean(len(h.tokens) for h in ours),
            "ended_on_eos_share": statistics.mean(h.finished for h in ours),
        })
    return rows


def add_full_set_projection(row: dict[str, Any], total_lines: int, total_mrs: int) -> None:
    """Whole test set: ours scales with the number of MRs, the reference with the number of lines."""
    row["full_ours_s"] = row["ours_s"] / row["mrs"] * total_mrs
    row["full_reference_s"] = row["reference_s_per_line"] * total_lines
    row["full_speedup"] = row["full_reference_s"] / row["full_ours_s"]
    row["full_ours_mrs_per_s"] = total_mrs / row["full_ours_s"]
    row["full_reference_mrs_per_s"] = total_mrs / row["full_reference_s"]


# ---------------------------------------------------------------------------------------------- report


def print_report(rows: list[dict[str, Any]], context: dict[str, Any], machine: dict[str, Any]) -> None:
    where = machine.get("gpu") or f"{machine['host_cpu']}, {machine['torch_threads']} threads"
    print(f"\nDecoding, {context['model_card']}, beam {context['beam']}, eval_len {context['eval_len']}, {context['data']} "
          f"({where}; torch {machine['torch']}, load average {machine['load_average_1m']})\n")
    headers = ["eos emulation", "ours", "lines / MRs run", "ours s", "reference s", "speed-up", "identical",
               "mean tokens", f"full set ({context['total_lines']} / {context['total_mrs']}): ours s", "reference s",
               "ours MRs/s", "reference MRs/s", "speed-up"]
    table = []
    for r in rows:
        reference = common.number(r["reference_s"]) + (f" (from {r['reference_lines_decoded']} lines)" if r["reference_projected"] else "")
        table.append([
            f"after {r['stop_after']} tokens" if r["stop_after"] else "off", r["precision"], f"{r['lines']} / {r['mrs']}",
            r["ours_s"], reference, f"{r['speedup']:.1f}x", f"{100 * r['identical_share']:.0f}%", r["mean_generated_tokens"],
            r["full_ours_s"], r["full_reference_s"], r["full_ours_mrs_per_s"], r["full_reference_mrs_per_s"], f"{r['full_speedup']:.1f}x",
        ])
    print(common.markdown_table(headers, table))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.tiny:
        apply_tiny(args)
    if min(args.beam, args.eval_len, args.batch_size) < 1 or args.mrs < 0 or args.reference_lines < 0:
        raise InputError("--beam, --eval_len and --batch_size must be >= 1; --mrs and --reference_lines >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    cfg = card(args.model_card)
    queries, mean_ref_tokens, source, total_lines, total_mrs = load_queries(args)
    stops = stop_settings(args.stop_after, mean_ref_tokens, args.eval_len)
    machine = common.machine_info(str(device))
    torch.manual_seed(args.seed)
    base = GPT2(cfg).eval().to(device)
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
          f"ours {r['ours_mrs_per_s']:.2f} MRs/s, reference-equivalent {r['reference_mrs_per_s']:.3f} MRs/s, {r['speedup']:.1f}x "
          f"on these lines, {r['full_speedup']:.1f}x projected to the whole set; {100 * r['identical_share']:.0f}% identical "
          f"predictions -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
