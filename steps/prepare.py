"""Raw NLG datasets -> formatted JSONL, one `{"context": str, "completion": str}` per line.

Two forms:

    python -m steps.prepare --dataset e2e --raw_dir data/raw/e2e --out_dir data/formatted   # train/valid/test.jsonl
    python -m steps.prepare data/e2e/train.txt data/e2e/train_formatted.jsonl             # the original converter

Datasets (read by steps/datasets/readers.py):
- e2e: the original repo's `MR||ref` text files (context kept unchanged), or the official CSV
  release, whose MRs and references are rendered in the text files' style so that a model
  trained on one form accepts the other (see docs/data.md for how close the two are).
- webnlg: WebNLG 2017 JSON; only "good" lexicalisations; `cate` = seen category.
- dart: DART JSON; relations lower-cased; one line per annotation.
The offline sample (steps/sample_data.py) is written as E2E text files and read as `e2e`.

Lines are written with Python's default `json.dumps` (ASCII-escaped, keys in order), exactly
like the original converters, so the bytes match theirs. All splits are read and checked
first and then renamed into place together: a failure leaves no new output at all.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

from steps.core.common import InputError, atomic_write, run_stage
from steps.datasets.readers import DATASETS, Split, read_dataset, read_e2e_txt


def check_not_empty(splits: dict[str, Split]) -> None:
    for name, split in splits.items():
        if not split.examples:
            raise InputError(f"the {name} split has no examples; expected at least one", split.source)


def write_splits(splits: dict[str, Split], out_dir: Path) -> None:
    """Write every split to a temp file; rename them all only after all were written."""
    with contextlib.ExitStack() as stack:
        for name, split in splits.items():
            f = stack.enter_context(atomic_write(out_dir / f"{name}.jsonl"))
            f.writelines(example.to_json() + "\n" for example in split.examples)


def split_stats(split: Split) -> dict[str, float]:
    """Counts and length spreads in words (this stage runs before tokenisation; encode reports tokens)."""
    contexts = [e.context for e in split.examples]
    stats: dict[str, float] = {"examples": len(split.examples), "unique_contexts": len(set(contexts)), "skipped": split.skipped}
    for side, texts in (("context", contexts), ("completion", [e.completion for e in split.examples])):
        words = [len(t.split()) for t in texts]
        stats |= {f"{side}_words_min": min(words), f"{side}_words_median": statistics.median(words), f"{side}_words_max": max(words)}
    return stats


def print_summary(splits: dict[str, Split], label: str, out: str) -> None:
    print(f"{'split':<6} {'examples':>9} {'contexts':>9} {'context words min/median/max':>29} "
          f"{'completion words min/median/max':>32} {'rejected':>9}")
    for name, split in splits.items():
        s = split.stats = split_stats(split)
        spreads = [f"{s[f'{side}_words_min']}/{s[f'{side}_words_median']:g}/{s[f'{side}_words_max']}" for side in ("context", "completion")]
        print(f"{name:<6} {s['examples']:>9,} {s['unique_contexts']:>9,} {spreads[0]:>29} {spreads[1]:>32} {s['skipped']:>9,}")
    reasons = sorted({s.skip_reason for s in splits.values() if s.skipped})
    skipped = sum(s.skipped for s in splits.values())
    counts = ", ".join(f"{name} {len(s.examples):,}" for name, s in splits.items())
    detail = f" ({'; '.join(reasons)})" if reasons else ""
    print(f"prepare: {label} -> {out}: {counts} examples; {skipped:,} rejected{detail}")


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "Convert a raw NLG dataset to formatted JSONL ({context, completion}). Either "
            "`--dataset NAME --raw_dir DIR --out_dir DIR` for train/valid/test.jsonl, or "
            "`INPUT OUTPUT` to convert one E2E MR||ref text file like the original format_converting_e2e.py."
        ),
    )
    parser.add_argument("input", nargs="?", help="original form: an E2E `MR||ref` text file")
    parser.add_argument("output", nargs="?", help="original form: the formatted JSONL file to write")
    parser.add_argument("--dataset", choices=DATASETS,
                        help="which raw dataset to read (the offline sample is e2e: python -m steps.sample_data writes its files)")
    parser.add_argument("--raw_dir", help="directory with the raw release files (default: data/raw/<dataset>)")
    parser.add_argument("--out_dir", default="data/formatted", help="where train.jsonl, valid.jsonl and test.jsonl go")
    parser.add_argument(
        "--e2e_format",
        choices=("auto", "txt", "csv"),
        default="auto",
        help="e2e only: read the MR||ref text files (txt) or the official CSV release (csv); auto prefers txt",
    )
    return parser


def convert_one_file(input_path: Path, output_path: Path) -> None:
    split = read_e2e_txt(input_path)
    check_not_empty({"input": split})
    with atomic_write(output_path) as f:
        f.writelines(example.to_json() + "\n" for example in split.examples)
    print_summary({"input": split}, f"e2e text {input_path}", str(output_path))


def run(args: argparse.Namespace) -> None:
    if args.input is not None:
        if args.output is None or args.dataset is not None:
            raise InputError("the original form takes exactly INPUT OUTPUT and no --dataset")
        convert_one_file(Path(args.input), Path(args.output))
        return
    if args.dataset is None:
        raise InputError(f"give --dataset ({', '.join(DATASETS)}) or the two paths INPUT OUTPUT")
    raw_dir = Path(args.raw_dir or f"data/raw/{args.dataset}")
    splits, label = read_dataset(args.dataset, raw_dir, args.e2e_format)
    check_not_empty(splits)
    write_splits(splits, Path(args.out_dir))
    print_summary(splits, label, args.out_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_stage(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
