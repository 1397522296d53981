"""The evaluate stage: score predictions against references with the official data-to-text metrics.

    python -m steps.evaluate REF_FILE PRED_FILE [--json metrics/eval.json] [--no_meteor] [--mteval python|perl]
                             [--ref_type e2e|webnlg|dart] [--predictions outputs/predictions.jsonl]
                             [--mlflow_run_file models/mlflow_run.json]

E2E (default): the official scorer's inputs (`measure_scores.py REF_FILE PRED_FILE -p`): references grouped by blank
lines (or the E2E CSV with `mr,ref` columns), one prediction per line; BLEU, NIST, METEOR, ROUGE-L, CIDEr.
WebNLG / DART: REF_FILE is a directory of reference0..referenceN-1 files (one line per instance each, as
gpt2_decode writes them); BLEU, METEOR and TER, as GenerationEval computes them.
E2E also gets the slot error rate (`SER`, `slot_errors`; steps/metrics/slot_error.py) when the contexts are known, and
with --base_pred_file the base model alone is scored the same way, under `base` (steps/metrics/report.py).
Prints the scorer's `SCORES:` block, writes the JSON atomically, and optionally logs `eval/<metric>` and a
per-example table into the finetune stage's MLflow run.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steps.core.common import InputError, iter_jsonl, require_writable, run_stage, write_json
from steps.datasets.readers import DATASETS as REF_TYPES  # each dataset family has its reference layout
from steps.metrics import report as eval_extra
from steps.metrics import scorers as e2e_metrics

# CSV column names accepted for the MR and the reference (the E2E release uses "mr" and "ref").
MR_COLUMNS = re.compile(r"(mr|src|source|meaning[_ .-]?representation)s?", re.I)
REF_COLUMNS = re.compile(r"(ref(erence)?|trg|tgt|target|human[_ .-]?ref(erence)?)s?", re.I)
REFERENCE_FILE = re.compile(r"reference(\d+)")


# ---------------------------------------------------------------------------------------------------------------
# Reading references and predictions
# ---------------------------------------------------------------------------------------------------------------


def read_text_lines(path: Path) -> list[str]:
    """Stripped lines of a UTF-8 text file (a final newline does not add an empty line), as the E2E scorer reads."""
    _check_file(path)
    try:
        with open(path, encoding="utf-8", newline=None) as f:
            return [line.strip() for line in f]
    except UnicodeDecodeError as exc:
        raise InputError(f"invalid UTF-8 ({exc.reason} at byte {exc.start}); re-save the file as UTF-8", path) from None


def read_raw_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file as GenerationEval and multi-bleu-detok.perl see them: split at "\\n" only and not
    stripped (a final newline ends the last line; it does not add an empty one).

    Carriage returns and Unicode spaces stay in the text, for each metric to treat as its original does: the Perl
    BLEU script splits words at ASCII whitespace only (a no-break space is part of a word), nltk at any whitespace.
    """
    _check_file(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"invalid UTF-8 ({exc.reason} at byte {exc.start}); re-save the file as UTF-8", path) from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise InputError("file not found; check the path (did the decode stage run?)", path)


def read_grouped_references(path: Path) -> list[list[str]]:
    """The E2E scorer's multi-reference text form: one reference per line, instances separated by one empty line.

    As in the scorer, a trailing empty group is dropped, and a file with no empty line at all is a single-reference
    file (one instance per line).
    """
    groups: list[list[str]] = [[]]
    for line in read_text_lines(path):
        if line:
            groups[-1].append(line)
        else:
            groups.append([])
    if not groups[-1]:
        groups.pop()
    if len(groups) == 1:
        return [[line] for line in groups[0]]
    return groups


def read_csv_references(path: Path) -> tuple[list[str], list[list[str]]]:
    """The E2E CSV/TSV form (`mr,ref` columns): references grouped by identical MR, in order of first appearance."""
    import pandas

    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        frame = pandas.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError("file not found; check the path", path) from None
    except (UnicodeDecodeError, pandas.errors.ParserError, pandas.errors.EmptyDataError) as exc:
        raise InputError(f"cannot read it as a CSV with a header row ({exc}); expected columns `mr,ref`", path) from None
    mr_column = _find_column(frame.columns, MR_COLUMNS, "meaning representation (e.g. `mr`)", path)
    ref_column = _find_column(frame.columns, REF_COLUMNS, "reference (e.g. `ref`)", path)
    grouped: dict[str, list[str]] = {}
    for row_number, (mr, ref) in enumerate(zip(frame[mr_column], frame[ref_column]), start=2):
        if not ref.strip():
            raise InputError(f"empty reference in column `{ref_column}`; every row needs a reference text", path, row_number)
        grouped.setdefault(mr, []).append(ref.strip())
    return list(grouped), list(grouped.values())


def _find_column(columns: Sequence[str], pattern: re.Pattern[str], what: str, path: Path) -> str:
    matches = [c for c in columns if pattern.fullmatch(str(c).strip())]
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(matches)
        raise InputError(f"expected exactly one {what} column, found {found} among columns {list(columns)}", path, 1)
    return matches[0]


def read_reference_dir(path: Path) -> list[list[str]]:
    """WebNLG/DART references: files reference0..referenceN-1, line j of each holding one reference of instance j.

    Instance j gets line j of every file, in file order, as GenerationEval passes them, copies (gpt2_decode pads
    instances with fewer references by repeating reference 0) and blank lines (GenerationEval's own layout pads
    them with blank lines) included. Blank references count there: multi-bleu-detok takes one as a 0-word
    reference when it picks the closest reference length, GenerationEval's TER scores it 1, and METEOR keeps the
    first of equally good references. An instance that is blank in every file has no reference and is refused.
    """
    files = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := REFERENCE_FILE.fullmatch(p.name)))
    if not files or files[0][0] != 0:
        raise InputError("expected files reference0, reference1, ... (one reference per line each), as gpt2_decode writes them", path)
    columns = [read_raw_lines(p) for _, p in files]
    for (_, p), column in zip(files, columns):
        if len(column) != len(columns[0]):
            raise InputError(f"has {len(column)} lines but {files[0][1].name} has {len(columns[0])}; every reference file "
                             "needs one line per instance", p)
    rows = [list(row) for row in zip(*columns)]
    blank = next((j for j, row in enumerate(rows) if not any(ref.strip() for ref in row)), None)
    if blank is not None:
        names = ", ".join(p.name for _, p in files)
        raise InputError(
            f"line {blank + 1} is blank in every reference file ({names}), so instance {blank + 1} has no reference; "
            "each instance needs a reference in at least one file (are the files misaligned, or is an instance left over?)",
            files[0][1],
            blank + 1,
        )
    return rows


def load_references(ref_path: Path, ref_type: str) -> tuple[list[list[str]], list[str] | None]:
    """References per instance, and the MRs when the file carries them (the CSV form)."""
    if ref_type == "e2e":
        if ref_path.is_dir():
            raise InputError("is a directory; for E2E give the grouped reference file or the CSV (use --ref_type webnlg|dart "
                             "for reference0..N files)", ref_path)
        if ref_path.suffix.lower() in (".csv", ".tsv"):
            mrs, refs = read_csv_references(ref_path)
            return refs, mrs
        return read_grouped_references(ref_path), None
    if not ref_path.is_dir():
        raise InputError(f"for --ref_type {ref_type} REF_FILE must be a directory of reference0..referenceN-1 files", ref_path)
    return read_reference_dir(ref_path), None


def read_predictions(path: Path, raw: bool = False) -> list[str]:
    """One prediction per line; empty lines are (empty) predictions, as in the scorer.

    raw=True (WebNLG/DART) keeps the lines unstripped, as GenerationEval reads them (see `read_raw_lines`).
    """
    predictions = read_raw_lines(path) if raw else read_text_lines(path)
    if not predictions:
        raise InputError("the prediction file is empty; expected one prediction per line (did the decode stage finish?)", path)
    return predictions


def check_counts(predictions: Sequence[str], references: Sequence[Sequence[str]], pred_path: Path, ref_path: Path) -> None:
    """Same number of instances on both sides, and references for each; name the first instance that lacks one."""
    missing_refs = next((i for i, refs in enumerate(references) if not refs), None)
    if missing_refs is not None:
        raise InputError(f"instance {missing_refs + 1} has no references", ref_path)
    if len(predictions) < len(references):
        raise InputError(
            f"instance {len(predictions) + 1} has no prediction: {pred_path} has {len(predictions)} lines but "
            f"{ref_path} has {len(references)} instances; predictions must be in the references' order, one per line",
            pred_path,
        )
    if len(predictions) > len(references):
        raise InputError(
            f"instance {len(references) + 1} has no references: {ref_path} has {len(references)} instances but "
            f"{pred_path} has {len(predictions)} lines (E2E references are grouped by blank lines)",
            ref_path,
        )


def read_contexts(path: Path, n_instances: int) -> list[str]:
    """The distinct `context` strings of predictions.jsonl, in order of first appearance (the references' order)."""
    contexts: dict[str, None] = {}
    for line, record in iter_jsonl(path):
        context = record.get("context") if isinstance(record, dict) else None
        if not isinstance(context, str):
            raise InputError('expected an object with a string "context" field on every line', path, line)
        contexts.setdefault(context, None)
    if len(contexts) != n_instances:
        raise InputError(f"has {len(contexts)} distinct contexts but the references have {n_instances} instances; "
                         "pass the predictions.jsonl of this test set", path)
    return list(contexts)


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def all_empty_warning(predictions: Sequence[str], pred_path: Path) -> str | None:
    """One line for stderr when every prediction is empty: the scores are then valid but say nothing about a model
    (typically decode stopped every output at once, or the wrong file was given)."""
    if any(p.strip() for p in predictions):
        return None
    return (
        f"warning: every prediction in {pred_path} is empty ({len(predictions)} lines); the scores below are those of "
        "empty outputs (check the decode stage's outputs and options)"
    )


def format_scores(scores: dict[str, Any], names: Sequence[str]) -> str:
    """The scorer's block: `SCORES:`, a rule, one `NAME: x.xxxx` line per metric, a blank line."""
    lines = ["SCORES:", "=============="]
    lines += [f"{name}: {scores[name]:.4f}" for name in names if name in scores]
    return "\n".join(lines) + "\n"


def build_table(contexts: Sequence[str] | None, predictions: Sequence[str], references: Sequence[Sequence[str]]):
    """Per-example table for MLflow: context, prediction, references (newline-joined)."""
    import pandas

    return pandas.DataFrame(
        {
            "context": list(contexts) if contexts is not None else [""] * len(predictions),
            "prediction": [p.strip() for p in predictions],
            "references": ["\n".join(distinct_references(refs)) for refs in references],
        }
    )


def distinct_references(references: Sequence[str]) -> list[str]:
    """An instance's references for people to read: stripped, without blanks and repeats, in order."""
    return list(dict.fromkeys(ref.strip() for ref in references if ref.strip()))


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------


Inputs = tuple[list[str], list[list[str]], list[str] | None]  # predictions, references per instance, contexts


def load_inputs(ref_path: Path, pred_path: Path, ref_type: str = "e2e", with_meteor: bool = True, predictions_jsonl: Path | None = None) -> Inputs:
    """Read and check everything before any scoring: (predictions, references per instance, contexts or None)."""
    if ref_type not in REF_TYPES:
        raise InputError(f"unknown --ref_type {ref_type!r}; expected one of {', '.join(REF_TYPES)}")
    if with_meteor and not e2e_metrics.java_available():
        raise InputError("`java` was not found on PATH. " + e2e_metrics.JAVA_HINT)
    references, mrs = load_references(ref_path, ref_type)
    predictions = read_predictions(pred_path, raw=ref_type != "e2e")
    check_counts(predictions, references, pred_path, ref_path)
    contexts = read_contexts(predictions_jsonl, len(references)) if predictions_jsonl else mrs
    return predictions, references, contexts


def score(inputs: Inputs, ref_type: str = "e2e", with_meteor: bool = True, nist_variant: str = "python", progress=None) -> tuple[dict[str, Any], Any]:
    """Compute the metrics; return (the JSON record, the per-example table)."""
    predictions, references, contexts = inputs
    if ref_type == "e2e":
        scores = e2e_metrics.e2e_scores(predictions, references, with_meteor=with_meteor, nist_variant=nist_variant, progress=progress)
        impl = "pymteval (measure_scores.py -p)" if nist_variant == "python" else "mteval-v13a-sig.pl (measure_scores.py default)"
        record: dict[str, Any] = {name: scores[name] for name in e2e_metrics.E2E_METRICS if name in scores}
        record.update(n_instances=len(references), bleu_nist_impl=impl, ptb_tokenizer=scores["ptb_tokenizer"])
    else:
        scores = e2e_metrics.generation_scores(predictions, references, with_meteor=with_meteor, progress=progress)
        record = {name: scores[name] for name in e2e_metrics.GENERATION_METRICS if name in scores}
        record.update(n_instances=len(references), bleu_impl="multi-bleu-detok (mteval tokenisation, case-sensitive)")
    record["ref_type"] = ref_type
    return record, build_table(contexts, predictions, references)


def evaluate(
    ref_path: Path,
    pred_path: Path,
    ref_type: str = "e2e",
    with_meteor: bool = True,
    nist_variant: str = "python",
    predictions_jsonl: Path | None = None,
    progress=None,
) -> tuple[dict[str, Any], Any]:
    """Score PRED against REF in one call; return (the JSON record, the per-example table)."""
    inputs = load_inputs(ref_path, pred_path, ref_type, with_meteor, predictions_jsonl)
    return score(inputs, ref_type, with_meteor, nist_variant, progress)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m steps.evaluate",
        description="Score predictions with the official E2E metrics (BLEU, NIST, METEOR, ROUGE-L, CIDEr) "
        "or the WebNLG/DART ones (BLEU, METEOR, TER). Scores are fractions, as the E2E scorer prints them.",
    )
    parser.add_argument("ref_file", type=Path, help="E2E: references grouped by blank lines (as decode writes refs.txt), or the E2E CSV "
                        "with mr,ref columns (grouped by identical MR). WebNLG/DART: directory with reference0..referenceN-1")  # fmt: skip
    parser.add_argument("pred_file", type=Path, help="predictions, one per line, in the references' instance order")
    parser.add_argument("--json", type=Path, default=None, help="write the scores as JSON here (atomically)")
    parser.add_argument("--no_meteor", action="store_true", help="skip METEOR (it needs Java); METEOR is then absent from the output, not 0")
    parser.add_argument("--ref_type", choices=REF_TYPES, default="e2e", help="dataset family: which reference layout and metric set (default: e2e)")
    parser.add_argument("--mteval", "--nist", dest="nist", choices=("python", "perl"), default="python",
                        help="E2E BLEU and NIST: python = the scorer's -p mode, as the LoRA README runs it (default); "
                        "perl = the scorer's default mode (its copy of mteval-v13a-sig.pl), which the published E2E "
                        "challenge tables come from. --nist is the older name of the same option")  # fmt: skip
    parser.add_argument("--predictions", type=Path, default=None,
                        help="decode's predictions.jsonl; its 'context' fields fill the context column of the MLflow table")  # fmt: skip
    parser.add_argument("--mlflow_run_file", type=Path, default=None,
                        help='JSON {"run_id": ..., "tracking_uri": ...} from the finetune stage: log the per-example table '
                        "into that run (the register stage logs the scores)")  # fmt: skip
    parser.add_argument("--base_pred_file", type=Path, default=None,
                        help="predictions of the base model alone (the decode_base stage's preds.txt, same instances and "
                        "search settings): scored against the same references and written under `base`")  # fmt: skip
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    started = time.perf_counter()
    if args.json:
        require_writable(Path(args.json).parent)  # a read-only output dir fails now, not after scoring
    inputs = load_inputs(args.ref_file, args.pred_file, args.ref_type, not args.no_meteor, args.predictions)
    base_predictions = None
    if args.base_pred_file:  # checked before any scoring, like the rest
        base_predictions = read_predictions(args.base_pred_file, raw=args.ref_type != "e2e")
        check_counts(base_predictions, inputs[1], args.base_pred_file, args.ref_file)
    warning = all_empty_warning(inputs[0], args.pred_file)
    if warning:
        print(warning, file=sys.stderr)
    labels = ["BLEU", "NIST", "PTB tokenisation", "METEOR", "ROUGE_L", "CIDEr"] if args.ref_type == "e2e" else ["BLEU", "TER", "METEOR"]
    if args.no_meteor:
        labels.remove("METEOR")
    with tqdm(total=len(labels), desc="evaluate", unit="metric", file=sys.stderr, leave=False) as bar:

        def progress(label: str) -> None:
            """Called as each metric starts: close the previous step, show the current one."""
            if label != labels[0]:
                bar.update(1)
            bar.set_postfix_str(label)

        record, table = score(inputs, args.ref_type, not args.no_meteor, args.nist, progress)
        bar.update(bar.total - bar.n)
    names = e2e_metrics.E2E_METRICS if args.ref_type == "e2e" else e2e_metrics.GENERATION_METRICS
    predictions, references, contexts = inputs
    eval_extra.add_slot_errors(record, table, contexts, predictions, args.ref_type)
    if base_predictions is not None:
        base_record, _ = score((base_predictions, references, contexts), args.ref_type, not args.no_meteor, args.nist)
        eval_extra.add_base(record, base_record, names, table, base_predictions,
                            eval_extra.slot_errors(contexts, base_predictions, args.ref_type))
    print(format_scores(record, [*names, "SER"]))
    if eval_extra.BASE_KEY in record:
        print("base model alone (no adapter):\n" + format_scores(record[eval_extra.BASE_KEY], [*names, "SER"]))
    if record.get("ptb_tokenizer") == "python-approximation":
        print("note: Java not found; ROUGE_L and CIDEr used the pure-Python approximation of the PTB tokeniser")
    if args.json:
        write_json(args.json, record)
    if args.mlflow_run_file:
        from steps.core.tracking import log_predictions_table

        log_predictions_table(str(args.mlflow_run_file), table)
    headline = ", ".join(f"{name} {record[name]:.4f}" for name in names if name in record)
    headline += (", " + eval_extra.headline(record)) if eval_extra.headline(record) else ""
    where = f" -> {args.json}" if args.json else ""
    print(f"evaluate: {record['n_instances']} instances, {headline} in {time.perf_counter() - started:.1f}s{where}", file=sys.stderr)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
