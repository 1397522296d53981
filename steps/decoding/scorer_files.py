"""Predictions -> the files the scorers read: the original gpt2_decode.py's layouts and grouping, with clear errors.

    python -m steps.decoding.scorer_files --sample_file outputs/predictions.jsonl --input_file data/formatted/test.jsonl \\
        --output_ref_file outputs/refs.txt --output_pred_file outputs/preds.txt

References come from the formatted JSONL (`{"context": str, "completion": str[, "cate": bool]}`), grouped by the
exact context string (or by `--ref_unique_file`), in order of first appearance. Predictions come from either our
`predictions.jsonl` (`{"id", "context", "prediction"}`) or the original's beam output (`{"id", "predict": [ids]}`);
`id` is the 0-based line index in the data file. Layouts:
  e2e:          ref file = each group's references one per line, then one empty line; pred file = one line per group.
  webnlg, dart: ref "file" is a directory of reference0..reference{ref_num-1}; line j of file f is group j's f-th
                reference, or its reference 0 when it has fewer; pred file = one line per group.
`steps.decode` calls `write_scorer_files` directly, so the grouping rule lives only here. It also writes
`examples.jsonl`, one record per instance (`{"id", "context", "prediction", "references"}`): the scorer files are
derived from those records, and `steps.evaluate --examples` reads them instead of the three files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from steps.core.common import InputError, atomic_write, iter_jsonl, run_stage
from steps.datasets.readers import DATASETS
from steps.model.tokenizer import EOS_TOKEN

REF_TYPES = DATASETS  # each dataset family has its reference layout
FILTERS = ("all", "seen", "unseen")
EXAMPLES_FILE = "examples.jsonl"  # the name decode gives the per-instance records in its work dir


def clean_text(text: str) -> str:
    """Cut at the first <|endoftext|>, then at the first blank line, then strip (the original's rule)."""
    return text.split(EOS_TOKEN, 1)[0].split("\n\n", 1)[0].strip()


def post_process(text: str, lower: bool = False, tokenize: bool = False) -> str:
    """`--lower` first, then `--tokenize`: split around every non-word character and re-join with single spaces."""
    if lower:
        text = text.lower()
    if tokenize:
        text = " ".join(part for part in re.split(r"(\W)", text) if part.strip())
    return text


def _one_line(text: str) -> str:
    """A stray single newline inside a text would shift every later line of a scorer file; make it a space."""
    return re.sub(r"\s*\n\s*", " ", text)


@dataclass
class References:
    """The references of a formatted file, grouped the way the scorer needs them."""

    line_keys: list[Hashable]  # the grouping key of every line (kept by --filter or not), by line index
    groups: dict[Hashable, list[str]] = field(default_factory=dict)  # kept lines' references, first-appearance order
    first_line: dict[Hashable, int] = field(default_factory=dict)  # the first line index of each group
    contexts: dict[Hashable, str] = field(default_factory=dict)  # the context text of each group's first line
    path: str = ""


def read_references(
    input_file: str | os.PathLike,
    filter: str = "all",
    ref_unique_file: str | os.PathLike | None = None,
    lower: bool = False,
    tokenize: bool = False,
) -> References:
    """Read the formatted JSONL and group its references by context string (or --ref_unique_file), as gpt2_decode.py."""
    if filter not in FILTERS:
        raise InputError(f"unknown --filter {filter!r}; choose one of {', '.join(FILTERS)}")
    unique_ids = _read_ref_unique(ref_unique_file) if ref_unique_file else None
    refs = References(line_keys=[], path=str(input_file))
    for index, (line, item) in enumerate(iter_jsonl(input_file)):
        if not isinstance(item, dict) or not isinstance(item.get("context"), str) or not isinstance(item.get("completion"), str):
            raise InputError('expected {"context": str, "completion": str} (the formatted JSONL, not the encoded one)', input_file, line)
        if unique_ids is not None and index >= len(unique_ids):
            raise InputError(f"--ref_unique_file has {len(unique_ids)} lines but the input file has more", input_file, line)
        key = item["context"] if unique_ids is None else unique_ids[index]
        refs.line_keys.append(key)
        if not _kept(item, filter, input_file, line):
            continue
        refs.groups.setdefault(key, []).append(post_process(_one_line(clean_text(item["completion"])), lower, tokenize))
        refs.first_line.setdefault(key, index)
        refs.contexts.setdefault(key, item["context"])
    if unique_ids is not None and len(unique_ids) != len(refs.line_keys):
        raise InputError(f"--ref_unique_file has {len(unique_ids)} lines but the input file has {len(refs.line_keys)}",
                         ref_unique_file)
    if not refs.groups:
        raise InputError(f"no references kept (filter {filter!r}); check the file and --filter", input_file)
    return refs


def _kept(item: dict, filter: str, path: str | os.PathLike, line: int) -> bool:
    if filter == "all":
        return True
    if not isinstance(item.get("cate"), bool):
        raise InputError(f'--filter {filter} needs a boolean "cate" field (WebNLG seen/unseen); use --filter all', path, line)
    return item["cate"] == (filter == "seen")


def _read_ref_unique(path: str | os.PathLike) -> list[int]:
    path = Path(path)
    if not path.is_file():
        raise InputError("--ref_unique_file not found", path)
    values = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            values.append(int(text.strip()))
        except ValueError:
            raise InputError(f"expected one integer per line, got {text.strip()!r}", path, number) from None
    return values


def read_predictions(sample_file: str | os.PathLike, tokenizer=None) -> dict[int, str]:
    """Line index -> cleaned prediction text, from our predictions.jsonl or the original's {id, predict: [ids]} file.

    A later record for the same id overwrites an earlier one, as in the original. `tokenizer` (anything with
    `decode(ids) -> str`) is needed only for the original's token-id format; the default is our GPT-2 BPE.
    """
    predictions: dict[int, str] = {}
    for line, item in iter_jsonl(sample_file):
        if not isinstance(item, dict) or not isinstance(item.get("id"), int):
            raise InputError('expected {"id": int, "prediction": str} or {"id": int, "predict": [ids]}', sample_file, line)
        if isinstance(item.get("prediction"), str):
            text = item["prediction"]
        elif isinstance(item.get("predict"), list) and all(isinstance(t, int) for t in item["predict"]):
            if tokenizer is None:
                from steps.model.tokenizer import get_tokenizer

                tokenizer = get_tokenizer()
            text = tokenizer.decode(item["predict"])  # all ids: trailing zeros and stale tails go with the cut
        else:
            raise InputError('expected a "prediction" string or a "predict" list of token ids', sample_file, line)
        predictions[item["id"]] = clean_text(text)
    return predictions


def predictions_by_group(
    refs: References, predictions: dict[int, str], sample_file: str = "the predictions",
    lower: bool = False, tokenize: bool = False,
) -> list[str]:
    """One prediction per reference group, in group order; an error lists what is missing (the original stopped
    with a bare KeyError)."""
    by_key: dict[Hashable, str] = {}
    for index, text in predictions.items():
        if not 0 <= index < len(refs.line_keys):
            raise InputError(f"prediction id {index} is outside the input file's {len(refs.line_keys)} lines "
                             f"({refs.path}); do the predictions belong to this input file?", sample_file)
        by_key[refs.line_keys[index]] = post_process(_one_line(text), lower, tokenize)
    missing = [refs.first_line[key] for key in refs.groups if key not in by_key]
    if missing:
        shown = ", ".join(str(i) for i in missing[:20]) + (", ..." if len(missing) > 20 else "")
        raise InputError(f"{len(missing)} of {len(refs.groups)} inputs have no prediction (input line ids: {shown}); "
                         f"decode every line of {refs.path} (or check that the two files belong together)", sample_file)
    return [by_key[key] for key in refs.groups]


def write_e2e(groups: Sequence[list[str]], preds: Sequence[str], ref_file: str | os.PathLike, pred_file: str | os.PathLike) -> None:
    """E2E scorer layout: references one per line with an empty line after each group; predictions one per line."""
    for number, group in enumerate(groups):
        if any(not ref for ref in group):
            raise InputError(f"reference group {number} has an empty reference, which would split its group in the "
                             "e2e layout; remove empty completions from the input file", ref_file)
    with atomic_write(ref_file) as f:
        for group in groups:
            f.write("".join(ref + "\n" for ref in group) + "\n")
    _write_lines(pred_file, preds)


def write_multi_ref(references: Sequence[list[str]], preds: Sequence[str], ref_dir: str | os.PathLike, pred_file: str | os.PathLike) -> None:
    """GenerationEval layout (WebNLG, DART): ref_dir/reference0..N-1, line j of file f = instance j's f-th reference."""
    ref_dir = Path(ref_dir)
    if ref_dir.exists() and not ref_dir.is_dir():
        raise InputError("for webnlg/dart the reference output is a directory, but a file exists there", ref_dir)
    ref_dir.mkdir(parents=True, exist_ok=True)
    for f in range(len(references[0])):
        _write_lines(ref_dir / f"reference{f}", [group[f] for group in references])
    _write_lines(pred_file, preds)


def padded(group: list[str], ref_num: int) -> list[str]:
    """gpt2_decode's multi-reference rule: exactly ref_num references, the missing ones filled with reference 0."""
    return [group[f] if f < len(group) else group[0] for f in range(ref_num)]


def _write_lines(path: str | os.PathLike, lines: Sequence[str]) -> None:
    with atomic_write(path) as f:
        f.write("".join(line + "\n" for line in lines))


def build_examples(refs: References, preds: Sequence[str], ref_type: str = "e2e", ref_num: int = 4) -> list[dict]:
    """One record per scored instance: {"id", "context", "prediction", "references"}, in the scorer's order.

    `id` is the instance's first line in the input file; `references` are what the scorer reads for it (WebNLG/DART:
    ref_num of them, padded with reference 0 as gpt2_decode's files are)."""
    if ref_type != "e2e" and ref_num < 1:
        raise InputError(f"--ref_num must be >= 1 (got {ref_num})")
    return [
        {"id": refs.first_line[key], "context": refs.contexts[key], "prediction": pred,
         "references": group if ref_type == "e2e" else padded(group, ref_num)}
        for (key, group), pred in zip(refs.groups.items(), preds)
    ]


def write_examples(examples: Sequence[dict], path: str | os.PathLike) -> None:
    with atomic_write(path) as f:
        f.write("".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples))


def write_scorer_files(
    input_file: str | os.PathLike,
    predictions: dict[int, str],
    ref_file: str | os.PathLike,
    pred_file: str | os.PathLike,
    ref_type: str = "e2e",
    ref_num: int = 4,
    filter: str = "all",
    ref_unique_file: str | os.PathLike | None = None,
    lower: bool = False,
    tokenize: bool = False,
    sample_file: str = "the predictions",
    examples_file: str | os.PathLike | None = None,
) -> tuple[int, int]:
    """Group and match; write the examples (when `examples_file` is given) and, from them, the scorer's files.
    Return (instances, reference lines). `predictions`: line index -> text."""
    if ref_type not in REF_TYPES:
        raise InputError(f"unknown --ref_type {ref_type!r}; choose one of {', '.join(REF_TYPES)}")
    refs = read_references(input_file, filter, ref_unique_file, lower, tokenize)
    examples = build_examples(refs, predictions_by_group(refs, predictions, sample_file, lower, tokenize), ref_type, ref_num)
    if examples_file is not None:
        write_examples(examples, examples_file)
    references = [example["references"] for example in examples]
    preds = [example["prediction"] for example in examples]
    if ref_type == "e2e":
        write_e2e(references, preds, ref_file, pred_file)
    else:
        write_multi_ref(references, preds, ref_file, pred_file)
    return len(examples), sum(len(group) for group in refs.groups.values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Turn beam-search predictions into the reference/prediction files the E2E and GenerationEval scorers "
        "read (the original gpt2_decode.py's options and layouts).",
    )
    parser.add_argument("--vocab", default=None, help="directory with encoder.json + vocab.bpe, used to decode the "
                        "original's token-id sample files (default: the GPT-2 files of an installed package)")
    parser.add_argument("--sample_file", required=True, help="predictions: our predictions.jsonl or the original's "
                        '{"id", "predict": [ids]} beam output')
    parser.add_argument("--input_file", required=True, help="the formatted JSONL the predictions were made from "
                        '({"context", "completion"}; its line i is prediction id i)')
    parser.add_argument("--output_ref_file", required=True, help="e2e: the reference file; webnlg/dart: a directory "
                        "for reference0..N-1 (created)")
    parser.add_argument("--output_pred_file", required=True, help="one prediction per reference group")
    parser.add_argument("--output_examples", default=None, help='optional: also write one JSON record per instance, '
                        '{"id", "context", "prediction", "references"} (what steps.evaluate --examples reads)')
    parser.add_argument("--ref_unique_file", default=None, help="optional: one integer per input line, used as the "
                        "grouping key instead of the context string")
    parser.add_argument("--ref_type", default="e2e", choices=REF_TYPES, help="output layout (default e2e)")
    parser.add_argument("--ref_num", type=int, default=4, help="webnlg/dart: number of reference files (default 4; the "
                        "README uses 6)")
    parser.add_argument("--tokenize", action="store_true", help="split around non-word characters, single-space joined")
    parser.add_argument("--lower", action="store_true", help="lower-case references and predictions")
    parser.add_argument("--filter", default="all", choices=FILTERS, help='keep all lines, or only WebNLG lines whose '
                        '"cate" is true (seen) / false (unseen)')
    return parser


def run(args: argparse.Namespace) -> str:
    """The stage; returns the summary line."""
    tokenizer = None
    if args.vocab is not None:
        from steps.model.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(args.vocab)
    predictions = read_predictions(args.sample_file, tokenizer)
    n_groups, n_refs = write_scorer_files(
        args.input_file, predictions, args.output_ref_file, args.output_pred_file, args.ref_type, args.ref_num,
        args.filter, args.ref_unique_file, args.lower, args.tokenize, sample_file=args.sample_file,
        examples_file=args.output_examples,
    )
    return (f"scorer_files: {len(predictions)} predictions -> {n_groups} groups, {n_refs} references ({args.ref_type}): "
            f"{args.output_ref_file}, {args.output_pred_file}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_stage(lambda: print(run(args)))


if __name__ == "__main__":
    sys.exit(main())
