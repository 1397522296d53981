"""The evaluate stage: score predictions against references with the official data-to-text metrics.

    python -m steps.evaluate REF_FILE PRED_FILE [--json metrics/eval.json] [--scores_json metrics/scores.json]
                             [--no_meteor] [--mteval python|perl]
                             [--ref_type e2e|webnlg|dart] [--predictions outputs/predictions.jsonl]
                             [--mlflow_run_file models/mlflow_run.json]
    python -m steps.evaluate --examples outputs/examples.jsonl [--base_examples outputs_base/examples.jsonl] ...

E2E (default): the official scorer's inputs (`measure_scores.py REF_FILE PRED_FILE -p`): references grouped by blank
lines (or the E2E CSV with `mr,ref` columns), one prediction per line; BLEU, NIST, METEOR, ROUGE-L, CIDEr.
WebNLG / DART: REF_FILE is a directory of reference0..referenceN-1 files (one line per instance each, as
gpt2_decode writes them); BLEU, METEOR and TER, as GenerationEval computes them.
The pipeline passes `--examples` instead: decode's examples.jsonl, one record per instance (context, prediction,
references), from which the two scorer files were derived, so nothing is aligned by line position across files.
E2E also gets the slot error rate (`SER`, `slot_errors`; steps/metrics/slot_error.py) when the contexts are known, and
with --base_examples (or --base_pred_file) the base model alone is scored the same way, under `base` (steps/metrics/report.py).
Prints the scorer's `SCORES:` block, writes the JSON atomically, and optionally logs `eval/<metric>` and a
per-example table into the finetune stage's MLflow run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steps.core.common import InputError, require_writable, run_stage, write_json
from steps.datasets.readers import DATASETS as REF_TYPES  # each dataset family has its reference layout
from steps.metrics import report, scorers
from steps.metrics.inputs import (
    Inputs,
    base_predictions_from_examples,
    check_counts,
    load_references,
    read_contexts,
    read_examples,
    read_predictions,
)

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




def check_scorer(ref_type: str, with_meteor: bool) -> None:
    if ref_type not in REF_TYPES:
        raise InputError(f"unknown --ref_type {ref_type!r}; expected one of {', '.join(REF_TYPES)}")
    if with_meteor and not scorers.java_available():
        raise InputError("`java` was not found on PATH. " + scorers.JAVA_HINT)


def load_inputs(ref_path: Path, pred_path: Path, ref_type: str = "e2e", with_meteor: bool = True, predictions_jsonl: Path | None = None) -> Inputs:
    """Read and check everything before any scoring: (predictions, references per instance, contexts or None)."""
    check_scorer(ref_type, with_meteor)
    references, mrs = load_references(ref_path, ref_type)
    predictions = read_predictions(pred_path, raw=ref_type != "e2e")
    check_counts(predictions, references, pred_path, ref_path)
    contexts = read_contexts(predictions_jsonl, len(references)) if predictions_jsonl else mrs
    return predictions, references, contexts


def score(inputs: Inputs, ref_type: str = "e2e", with_meteor: bool = True, nist_variant: str = "python", progress=None) -> tuple[dict[str, Any], Any]:
    """Compute the metrics; return (the JSON record, the per-example table)."""
    predictions, references, contexts = inputs
    if ref_type == "e2e":
        scores = scorers.e2e_scores(predictions, references, with_meteor=with_meteor, nist_variant=nist_variant, progress=progress)
        impl = "pymteval (measure_scores.py -p)" if nist_variant == "python" else "mteval-v13a-sig.pl (measure_scores.py default)"
        record: dict[str, Any] = {name: scores[name] for name in scorers.E2E_METRICS if name in scores}
        record.update(n_instances=len(references), bleu_nist_impl=impl, ptb_tokenizer=scores["ptb_tokenizer"])
    else:
        scores = scorers.generation_scores(predictions, references, with_meteor=with_meteor, progress=progress)
        record = {name: scores[name] for name in scorers.GENERATION_METRICS if name in scores}
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
    parser.add_argument("ref_file", type=Path, nargs="?", help="E2E: references grouped by blank lines (as decode writes refs.txt), or the E2E CSV "
                        "with mr,ref columns (grouped by identical MR). WebNLG/DART: directory with reference0..referenceN-1")  # fmt: skip
    parser.add_argument("pred_file", type=Path, nargs="?", help="predictions, one per line, in the references' instance order")
    parser.add_argument("--examples", type=Path, default=None,
                        help="instead of REF_FILE PRED_FILE: decode's examples.jsonl, one record per instance with its "
                        "context, prediction and references (what the pipeline scores)")  # fmt: skip
    parser.add_argument("--base_examples", type=Path, default=None,
                        help="with --examples: the decode_base stage's examples.jsonl (the base model alone, same test set), "
                        "matched by instance, scored the same way and written under `base`")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="write the evaluation record as JSON here (atomically): "
                        "scores, slot error counts, how each metric was computed")
    parser.add_argument("--scores_json", type=Path, default=None, help="also write the numbers that compare across runs "
                        "(the metrics and SER, and the base alone's) as JSON here: the DVC metric `dvc exp show` lists")
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
    args = parser.parse_args(argv)
    if args.examples is not None:
        extra = [name for name, value in (("REF_FILE", args.ref_file), ("--predictions", args.predictions),
                                          ("--base_pred_file", args.base_pred_file)) if value is not None]
        if extra:
            parser.error(f"--examples carries the references, predictions and contexts; drop {', '.join(extra)}")
    elif args.pred_file is None:
        parser.error("give REF_FILE and PRED_FILE, or --examples (decode's examples.jsonl)")
    elif args.base_examples is not None:
        parser.error("--base_examples goes with --examples; with REF_FILE PRED_FILE use --base_pred_file")
    return args


def load_run_inputs(args: argparse.Namespace) -> tuple[Inputs, list[str] | None]:
    """The stage's inputs, all read and checked before any scoring: (adapted inputs, base predictions or None)."""
    if args.examples is not None:
        check_scorer(args.ref_type, not args.no_meteor)
        keys, inputs = read_examples(args.examples, args.ref_type)
        base = None
        if args.base_examples is not None:
            base = base_predictions_from_examples(args.base_examples, keys, inputs[1], args.ref_type)
        return inputs, base
    inputs = load_inputs(args.ref_file, args.pred_file, args.ref_type, not args.no_meteor, args.predictions)
    base = None
    if args.base_pred_file:
        base = read_predictions(args.base_pred_file, raw=args.ref_type != "e2e")
        check_counts(base, inputs[1], args.base_pred_file, args.ref_file)
    return inputs, base


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    started = time.perf_counter()
    for path in (args.json, args.scores_json):
        if path:
            require_writable(Path(path).parent)  # a read-only output dir fails now, not after scoring
    inputs, base_predictions = load_run_inputs(args)
    warning = all_empty_warning(inputs[0], args.examples or args.pred_file)
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
    names = scorers.E2E_METRICS if args.ref_type == "e2e" else scorers.GENERATION_METRICS
    predictions, references, contexts = inputs
    report.add_slot_errors(record, table, contexts, predictions, args.ref_type)
    if base_predictions is not None:
        base_record, _ = score((base_predictions, references, contexts), args.ref_type, not args.no_meteor, args.nist)
        report.add_base(record, base_record, names, table, base_predictions,
                            report.slot_errors(contexts, base_predictions, args.ref_type))
    print(format_scores(record, [*names, "SER"]))
    if report.BASE_KEY in record:
        print("base model alone (no adapter):\n" + format_scores(record[report.BASE_KEY], [*names, "SER"]))
    if record.get("ptb_tokenizer") == "python-approximation":
        print("note: Java not found; ROUGE_L and CIDEr used the pure-Python approximation of the PTB tokeniser")
    if args.json:
        write_json(args.json, record)
    if args.scores_json:
        write_json(args.scores_json, report.comparable(record, names))
    if args.mlflow_run_file:
        from steps.core.tracking import log_predictions_table

        log_predictions_table(str(args.mlflow_run_file), table)
    headline = ", ".join(f"{name} {record[name]:.4f}" for name in names if name in record)
    headline += (", " + report.headline(record)) if report.headline(record) else ""
    where = f" -> {args.json}" if args.json else ""
    print(f"evaluate: {record['n_instances']} instances, {headline} in {time.perf_counter() - started:.1f}s{where}", file=sys.stderr)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
