"""Formatted JSONL -> encoded JSONL of GPT-2 token ids (the original gpt2_encode.py; docs/fidelity.md#encoding-conventions).

    python -m steps.encode --input data/formatted/train.jsonl --output data/encoded/train.jsonl --add_bos --add_eos
    python -m steps.encode --input_dir data/formatted --output_dir data/encoded --add_bos --add_eos

Per line: context ids = encode(context), then <|endoftext|> if --add_bos (appended AFTER the context: the
original's separator, despite the name); completion ids = encode(" " + completion) (the leading space
is always added), then <|endoftext|> if --add_eos. Output `{"context": [ids], "completion": [ids]}` with the
default json separators, one line per input line, same order: byte-identical to the original.

Each output also gets `<output>.meta.json` recording the tokenizer, vocabulary hash and flags, so the
trainer can refuse data encoded differently from what it expects (`read_encoded_meta`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from steps.core.common import DEFAULT_SEQ_LEN, InputError, atomic_write, iter_jsonl, require_writable, run_stage
from steps.formats.encoded_meta import META_FORMAT, META_VERSION, meta_path
from steps.model.tokenizer import Tokenizer, get_tokenizer

CHUNK = 4096  # completions encoded per batch call; also the progress-bar step
PROGRESS_MIN_LINES = 10_000


@dataclass
class Encoded:
    """One encoded split, held in memory until every split succeeded."""

    source: Path
    output: Path
    lines: list[str]
    meta: dict[str, Any]
    unique_contexts: int
    total_lengths: list[int]
    seconds: float


def read_formatted(path: Path) -> list[tuple[str, str]]:
    """(context, completion) pairs, with errors naming file and line for anything else."""
    pairs = []
    for number, record in iter_jsonl(path):
        if not isinstance(record, dict):
            raise InputError(f'expected a JSON object {{"context": str, "completion": str}}, got {type(record).__name__}', path, number)
        for key in ("context", "completion"):
            if key not in record:
                raise InputError(f'missing key "{key}"; expected {{"context": str, "completion": str}} (steps.prepare output)', path, number)
            if not isinstance(record[key], str):
                hint = " (this file looks already encoded)" if isinstance(record[key], list) else ""
                raise InputError(f'"{key}" must be a string, got {type(record[key]).__name__}{hint}', path, number)
        pairs.append((record["context"], record["completion"]))
    if not pairs:
        raise InputError("no examples; expected one JSON object per line", path)
    return pairs


def encode_pairs(
    pairs: list[tuple[str, str]], tok: Tokenizer, add_bos: bool, add_eos: bool, progress: tqdm
) -> tuple[list[list[int]], list[list[int]], int]:
    """Token ids for every pair; each distinct context is encoded once (E2E repeats MRs ~8x)."""
    bos = [tok.eos_id] if add_bos else []
    eos = [tok.eos_id] if add_eos else []
    unique = list(dict.fromkeys(context for context, _ in pairs))
    encoded = dict(zip(unique, tok.encode_batch(unique)))
    contexts = [encoded[context] + bos for context, _ in pairs]
    completions: list[list[int]] = []
    for start in range(0, len(pairs), CHUNK):
        chunk = [" " + completion for _, completion in pairs[start : start + CHUNK]]
        completions += [ids + eos for ids in tok.encode_batch(chunk)]
        progress.update(len(chunk))
    return contexts, completions, len(unique)


def encode_file(source: Path, output: Path, tok: Tokenizer, add_bos: bool, add_eos: bool) -> Encoded:
    start = time.perf_counter()
    pairs = read_formatted(source)
    with tqdm(total=len(pairs), desc=f"encode {source.name}", unit="line", disable=len(pairs) < PROGRESS_MIN_LINES) as bar:
        contexts, completions, unique = encode_pairs(pairs, tok, add_bos, add_eos, bar)
    lines = [json.dumps({"context": c, "completion": p}) for c, p in zip(contexts, completions)]
    totals = [len(c) + len(p) for c, p in zip(contexts, completions)]
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "tokenizer": "gpt2-bpe",
        "vocab_sha256": tok.vocab_sha256,
        "add_bos": add_bos,
        "add_eos": add_eos,
        "source": str(source),
        "examples": len(lines),
        "max_len": max(totals),
        "max_context_len": max(map(len, contexts)),
        "max_completion_len": max(map(len, completions)),
    }
    return Encoded(source, output, lines, meta, unique, totals, time.perf_counter() - start)


def write_encoded(results: list[Encoded]) -> None:
    """Write every data file and sidecar to temp files; rename them all only when all were written."""
    with contextlib.ExitStack() as stack:
        for result in results:
            # Entered meta first: the stack renames in reverse, so the data lands before its sidecar.
            meta_file = stack.enter_context(atomic_write(meta_path(result.output)))
            data_file = stack.enter_context(atomic_write(result.output))
            data_file.writelines(line + "\n" for line in result.lines)
            json.dump(result.meta, meta_file, indent=2)
            meta_file.write("\n")


def summary_line(result: Encoded) -> str:
    tokens = sum(result.total_lengths)
    seconds = max(result.seconds, 1e-9)
    return (
        f"encode: {result.source} -> {result.output}: {len(result.lines):,} lines ({result.unique_contexts:,} unique contexts), "
        f"tokens/example min {min(result.total_lengths)} median {statistics.median(result.total_lengths):g} "
        f"max {max(result.total_lengths)}, {sum(n > DEFAULT_SEQ_LEN for n in result.total_lengths):,} over {DEFAULT_SEQ_LEN} "
        f"(the trainer's default --seq_len cuts their context); {len(result.lines) / seconds:,.0f} lines/s, "
        f"{tokens / seconds:,.0f} tokens/s"
    )


def plan_jobs(args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """(input, output) pairs from either --input/--output or --input_dir/--output_dir."""
    if args.input_dir is not None:
        if args.input is not None or args.output is not None or args.output_dir is None:
            raise InputError("use either --input_dir with --output_dir, or --input with --output")
        input_dir = Path(args.input_dir)
        if not input_dir.is_dir():
            raise InputError("input directory not found (did steps.prepare run?)", input_dir)
        sources = sorted(input_dir.glob("*.jsonl"))
        if not sources:
            raise InputError("no *.jsonl files to encode; expected train.jsonl, valid.jsonl, test.jsonl", input_dir)
        return [(source, Path(args.output_dir) / source.name) for source in sources]
    if args.input is None or args.output is None or args.output_dir is not None:
        raise InputError("use either --input with --output, or --input_dir with --output_dir")
    return [(Path(args.input), Path(args.output))]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Encode formatted JSONL ({context, completion} text) to GPT-2 token ids, like the original gpt2_encode.py.",
    )
    parser.add_argument("--input", help="one formatted JSONL file")
    parser.add_argument("--output", help="the encoded JSONL file to write (a <output>.meta.json sidecar is written next to it)")
    parser.add_argument("--input_dir", help="encode every *.jsonl in this directory (e.g. data/formatted)")
    parser.add_argument("--output_dir", help="where the encoded files go, same names (e.g. data/encoded)")
    parser.add_argument("--vocab", help="directory with encoder.json and vocab.bpe (default: the packaged GPT-2 files)")
    parser.add_argument("--add_bos", action="store_true", help="append <|endoftext|> AFTER the context (the original's separator)")
    parser.add_argument("--add_eos", action="store_true", help="append <|endoftext|> after the completion")
    return parser


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    jobs = plan_jobs(args)
    for directory in {output.parent for _, output in jobs}:
        require_writable(directory)  # before encoding, not after
    tok = get_tokenizer(args.vocab)
    results = [encode_file(source, output, tok, args.add_bos, args.add_eos) for source, output in jobs]
    write_encoded(results)
    for result in results:
        print(summary_line(result))
    lines = sum(len(r.lines) for r in results)
    flags = f"add_bos={args.add_bos} add_eos={args.add_eos}"
    print(f"encode: {len(results)} file(s), {lines:,} lines in {time.perf_counter() - start:.2f} s ({flags}, vocab {tok.vocab_sha256[:12]})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_stage(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
