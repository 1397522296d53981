"""What the evaluate stage reads: references and predictions in the scorers' file layouts, or decode's examples.jsonl.

Every reader checks what it reads and names the file and line of the first problem (steps.core.common.InputError).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from steps.core.common import InputError, iter_jsonl

# CSV column names accepted for the MR and the reference (the E2E release uses "mr" and "ref").
MR_COLUMNS = re.compile(r"(mr|src|source|meaning[_ .-]?representation)s?", re.I)
REF_COLUMNS = re.compile(r"(ref(erence)?|trg|tgt|target|human[_ .-]?ref(erence)?)s?", re.I)
REFERENCE_FILE = re.compile(r"reference(\d+)")

Inputs = tuple[list[str], list[list[str]], list[str] | None]  # predictions, references per instance, contexts



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


def read_examples(path: Path, ref_type: str = "e2e") -> tuple[list[tuple[int, str]], Inputs]:
    """Decode's examples.jsonl, one record per instance: ((id, context) per instance, (predictions, references,
    contexts)), read as the scorer reads the files derived from it (E2E: stripped; WebNLG/DART: as written)."""
    _check_file(path)
    keys, predictions, references = [], [], []
    for line, record in iter_jsonl(path):
        refs = record.get("references") if isinstance(record, dict) else None
        if (not isinstance(record, dict) or not isinstance(record.get("id"), int) or not isinstance(record.get("context"), str)
                or not isinstance(record.get("prediction"), str) or not isinstance(refs, list) or not refs
                or not all(isinstance(ref, str) for ref in refs)):
            raise InputError('expected {"id": int, "context": str, "prediction": str, "references": [str, ...]} '
                             "(decode's examples.jsonl)", path, line)
        if ref_type == "e2e":
            refs = [ref.strip() for ref in refs]
            if not all(refs):
                raise InputError("an E2E reference is empty; every reference needs text", path, line)
        elif references and len(refs) != len(references[0]):
            raise InputError(f"has {len(refs)} references but the first instance has {len(references[0])}; WebNLG/DART "
                             "instances all carry ref_num references (decode pads them)", path, line)
        keys.append((record["id"], record["context"]))
        predictions.append(record["prediction"].strip() if ref_type == "e2e" else record["prediction"])
        references.append(refs)
    if not keys:
        raise InputError("no examples; decode the test set first", path)
    if len(set(keys)) != len(keys):
        raise InputError("an (id, context) pair appears twice; is it two files joined?", path)
    return keys, (predictions, references, [context for _, context in keys])


def base_predictions_from_examples(path: Path, keys: Sequence[tuple[int, str]], references: Sequence[list[str]], ref_type: str) -> list[str]:
    """The base model's predictions from its examples.jsonl, matched to `keys` by instance id and context (not by line
    position); its instances and references must be the adapted model's."""
    base_keys, (predictions, base_refs, _) = read_examples(path, ref_type)
    by_key = {key: (prediction, refs) for key, prediction, refs in zip(base_keys, predictions, base_refs)}
    missing = [key for key in keys if key not in by_key]
    if missing or len(by_key) != len(keys):
        what = f"instance {missing[0][0]} ({missing[0][1]!r}) is missing" if missing else "it has instances the other has not"
        raise InputError(f"is not the same test set as the adapted model's examples: {what}", path)
    changed = next((key for key, refs in zip(keys, references) if by_key[key][1] != refs), None)
    if changed is not None:
        raise InputError(f"instance {changed[0]} has other references than in the adapted model's examples; decode both "
                         "with the same test set and reference options", path)
    return [by_key[key][0] for key in keys]
