"""The raw NLG datasets, read and checked: E2E (the original repo's MR||ref text files or the official CSV
release), WebNLG 2017 JSON and DART JSON, each turned into `Example(context, completion)` per split.

Contexts and completions come out exactly as the original converters wrote them (docs/data.md), and
every problem in a raw file is an InputError that names the file, the line or entry, and what was expected.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.core.common import InputError

SPLITS = ("train", "valid", "test")
DATASETS = ("e2e", "webnlg", "dart")

E2E_TXT_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
E2E_CSV_FILES = {"train": "trainset.csv", "valid": "devset.csv", "test": "testset_w_refs.csv"}
WEBNLG_FILES = {"train": "train.json", "valid": "dev.json", "test": "test.json"}
DART_FILES = {split: f"dart-v1.1.1-full-{name}.json" for split, name in (("train", "train"), ("valid", "dev"), ("test", "test"))}

# CSV slot name -> the attribute name used in the original repo's text files, in E2E's order.
E2E_SLOTS = {
    "name": "name",
    "eatType": "Type",
    "food": "food",
    "priceRange": "price",
    "customer rating": "customer rating",
    "area": "area",
    "familyFriendly": "family friendly",
    "near": "near",
}
WEBNLG_SEEN_CATEGORIES = frozenset(
    ["Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument", "SportsTeam", "University", "WrittenWork"]
)


@dataclass
class Example:
    context: str
    completion: str
    cate: bool | None = None  # WebNLG only: True for the ten categories seen in training

    def to_json(self) -> str:
        record: dict[str, Any] = {"context": self.context, "completion": self.completion}
        if self.cate is not None:
            record["cate"] = self.cate
        return json.dumps(record)


@dataclass
class Split:
    """One split's examples, where they came from, and what was left out on purpose."""

    examples: list[Example]
    source: str
    skipped: int = 0
    skip_reason: str = ""
    stats: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- reading helpers


def read_utf8(path: Path) -> str:
    """The whole file as text, or an InputError naming the line of the first bad byte."""
    if not path.is_file():
        raise InputError("file not found", path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # tolerate a BOM (spreadsheet exports add one)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"invalid UTF-8 ({exc.reason}); re-save the file as UTF-8", path, line) from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON ({exc.msg} at column {exc.colno})", path, exc.lineno) from None


def require_text(value: Any, what: str, path: Path, line: int | None = None, where: str = "") -> str:
    """A non-empty string, or a clear error (an empty MR or reference would train on nothing)."""
    if not isinstance(value, str):
        raise InputError(f"{where}expected {what} to be a string, got {type(value).__name__}", path, line)
    if not value.strip():
        raise InputError(f"{where}empty {what}; remove the line or fill it in", path, line)
    return value


# ---------------------------------------------------------------- E2E text files (format_converting_e2e.py)


def read_e2e_txt(path: Path) -> Split:
    """`MR||ref` lines -> examples, exactly like the original: strip the line, split on `||`, keep fields 0 and 1."""
    examples, blank = [], 0
    lines = read_utf8(path).split("\n")
    if lines[-1] == "":  # the piece after the final newline is not a line
        lines.pop()
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            blank += 1
            continue
        if "||" not in line:
            raise InputError("expected `MR||reference` (no `||` found)", path, number)
        fields = line.split("||")
        context = require_text(fields[0], "MR", path, number)
        completion = require_text(fields[1], "reference", path, number)
        examples.append(Example(context, completion))
    return Split(examples, str(path), blank, "blank lines")


# ---------------------------------------------------------------- E2E CSV release

CLITIC = re.compile(r"(?<=[^\W\d_])'(s|t|re|ve|ll|m|d)(?![^\W\d_])", re.IGNORECASE)
HYPHEN_IN_WORD = re.compile(r"(?<=[^\W_])-(?=[^\W_])")
ALWAYS_SPLIT = re.compile(r"""([£$€,;:!?"()])""")
DOT_RUN = re.compile(r"\.{2,}")
FINAL_DOT = re.compile(r"(?<=[^\s.])\.(?=\s|$)")
CLITIC_MARK = "\x00"


def tokenize_e2e(text: str) -> str:
    """Word-tokenise like the original repo's E2E text files (their valid.txt conventions).

    Measured on the dev set (docs/data.md): whitespace collapsed; `'s 't 're 've 'll 'm 'd`
    split off as clitics (`isn 't`, `It 's`); other apostrophes are quotes and stand alone;
    a hyphen between two letters/digits becomes ` - `; `£ , ; : ! ? " ( )` stand alone;
    a run of dots stands alone; a single dot ending a word is split off (`£30.` -> `£ 30 .`)
    but not one inside (`30.99`) or starting it (`.price`).
    """
    text = " ".join(text.split())
    text = CLITIC.sub(lambda m: " " + CLITIC_MARK + m.group(1), text)
    text = text.replace("'", " ' ").replace(CLITIC_MARK, "'")
    text = HYPHEN_IN_WORD.sub(" - ", text)
    text = ALWAYS_SPLIT.sub(r" \1 ", text)
    text = DOT_RUN.sub(lambda m: f" {m.group()} ", text)
    text = FINAL_DOT.sub(" .", text)
    return " ".join(text.split())


MR_SLOT = re.compile(r"([^\[\],]+)\[([^\]]*)\]")


def render_e2e_mr(mr: str, path: Path, line: int) -> str:
    """`name[Alimentum], priceRange[£20-25]` -> `name : Alimentum | price : £ 20 - 25` (slot order kept)."""
    parts, end = [], 0
    for match in MR_SLOT.finditer(mr):
        between = mr[end : match.start()]
        if between.strip(" ,") or (parts and "," not in between):
            raise InputError(f"cannot parse MR {mr!r}: expected `slot[value], slot[value], ...`", path, line)
        slot, value = match.group(1).strip(), match.group(2)
        if slot not in E2E_SLOTS:
            raise InputError(f"unknown slot {slot!r} in MR; expected one of {', '.join(E2E_SLOTS)}", path, line)
        if not value.strip():
            raise InputError(f"empty value for slot {slot!r} in MR", path, line)
        parts.append(f"{E2E_SLOTS[slot]} : {tokenize_e2e(value)}")
        end = match.end()
    if not parts or mr[end:].strip(" ,"):
        raise InputError(f"cannot parse MR {mr!r}: expected `slot[value], slot[value], ...`", path, line)
    return " | ".join(parts)


def read_e2e_csv(path: Path) -> Split:
    """The official E2E release (columns mr, ref) -> examples in the text files' rendering."""
    import pandas as pd  # imported here: only the CSV path needs it, and it costs ~1 s to import

    text = read_utf8(path)
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"malformed CSV ({exc}); expected the E2E release with columns mr,ref", path) from None
    columns = {str(c).strip().lower(): c for c in table.columns}
    if "mr" not in columns or "ref" not in columns:
        found = ", ".join(map(str, table.columns)) or "none"
        raise InputError(f"expected columns mr and ref (the official E2E CSV release); found: {found}", path, 1)
    examples = []
    line = 2  # line 1 is the header; quoted fields may span lines, so count their newlines
    for mr, ref in zip(table[columns["mr"]], table[columns["ref"]]):
        require_text(mr, "MR", path, line)
        require_text(ref, "reference", path, line)
        examples.append(Example(render_e2e_mr(mr, path, line), tokenize_e2e(ref)))
        line += 1 + mr.count("\n") + ref.count("\n")
    return Split(examples, str(path))


# ---------------------------------------------------------------- WebNLG and DART JSON


def triples_to_context(triples: list[tuple[str, str, str]]) -> str:
    return " | ".join(f"{s} : {p} : {o}" for s, p, o in triples)


def read_webnlg(path: Path) -> Split:
    """WebNLG 2017 JSON -> one example per "good" lexicalisation (format_converting_webnlg.py)."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise InputError('expected a JSON object with an "entries" list (the WebNLG JSON release)', path)
    examples, skipped = [], 0
    for index, wrapper in enumerate(data["entries"]):
        where = f"entries[{index}]: "
        if not isinstance(wrapper, dict) or len(wrapper) != 1:
            raise InputError(f'{where}expected {{"<id>": {{...}}}} with one key', path)
        entry = next(iter(wrapper.values()))
        try:
            category = entry["category"]
            triples = [(t["subject"], t["property"], t["object"]) for t in entry["modifiedtripleset"]]
            lexicalisations = [(lex["comment"], lex["lex"]) for lex in entry["lexicalisations"]]
        except (KeyError, TypeError) as exc:
            raise InputError(f"{where}missing or malformed field {exc}; expected category, modifiedtripleset, lexicalisations", path) from None
        for triple in triples:
            for value in triple:
                require_text(value, "triple element", path, where=where)
        context = require_text(triples_to_context(triples), "triple set", path, where=where)
        for comment, lex in lexicalisations:
            if comment != "good":
                skipped += 1
                continue
            examples.append(Example(context, require_text(lex, "lexicalisation", path, where=where), category in WEBNLG_SEEN_CATEGORIES))
    return Split(examples, str(path), skipped, 'lexicalisations not marked "good"')


def dart_triple(triple: Any) -> tuple[str, str, str]:
    """One DART triple: a list [subject, predicate, object], the release's only layout. A dict or any other
    container is refused: unpacking a {"s":..,"p":..,"o":..} dict would silently yield its keys."""
    if not isinstance(triple, list) or len(triple) != 3:
        raise ValueError(f"triple {json.dumps(triple)[:80]} is not a list [subject, predicate, object]")
    return triple[0], triple[1], triple[2]


def read_dart(path: Path) -> Split:
    """DART JSON -> one example per annotation, relations lower-cased (format_converting_dart.py)."""
    data = read_json(path)
    if not isinstance(data, list):
        raise InputError("expected a JSON list of {tripleset, annotations} (the DART release)", path)
    examples, skipped = [], 0
    for index, entry in enumerate(data):
        where = f"entry {index}: "
        try:
            triples = [dart_triple(t) for t in entry["tripleset"]]
            texts = [annotation["text"] for annotation in entry["annotations"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}malformed entry ({exc}); expected tripleset [[s, p, o], ...] and annotations [{{text}}]", path) from None
        for triple in triples:
            for value in triple:
                require_text(value, "triple element", path, where=where)
        context = require_text(triples_to_context([(s, p.lower(), o) for s, p, o in triples]), "triple set", path, where=where)
        if not texts:
            skipped += 1
        examples += [Example(context, require_text(text, "annotation text", path, where=where)) for text in texts]
    return Split(examples, str(path), skipped, "entries without annotations")


# ---------------------------------------------------------------- datasets


def missing_split_error(raw_dir: Path, files: dict[str, str], split: str, what: str) -> InputError:
    expected = ", ".join(files.values())
    return InputError(
        f"missing {files[split]} for the {split} split; {what} in {raw_dir} needs {expected} "
        "(the dataset is chosen in params.yaml)",
        raw_dir / files[split],
    )


def e2e_format(raw_dir: Path, choice: str) -> str:
    """`txt` if the original repo's text files are there, else `csv` (the official release)."""
    if choice != "auto":
        return choice
    if any((raw_dir / name).exists() for name in E2E_TXT_FILES.values()):
        return "txt"
    if any((raw_dir / name).exists() for name in E2E_CSV_FILES.values()):
        return "csv"
    raise InputError(
        f"no E2E files found; expected either {', '.join(E2E_TXT_FILES.values())} (MR||ref text) "
        f"or {', '.join(E2E_CSV_FILES.values())} (official CSV release)",
        raw_dir,
    )


def read_dataset(dataset: str, raw_dir: Path, fmt: str = "auto") -> tuple[dict[str, Split], str]:
    """All three splits of a raw dataset, and a short label of the form that was read."""
    if not raw_dir.is_dir():
        raise InputError(f"raw data directory not found; put the {dataset} release there or change prepare.raw_dir", raw_dir)
    if dataset == "e2e":
        fmt = e2e_format(raw_dir, fmt)
        files, reader, what = (E2E_TXT_FILES, read_e2e_txt, "E2E text") if fmt == "txt" else (E2E_CSV_FILES, read_e2e_csv, "the E2E CSV release")
        label = f"e2e ({fmt})"
    elif dataset == "webnlg":
        files, reader, what, label = WEBNLG_FILES, read_webnlg, "WebNLG", "webnlg"
    elif dataset == "dart":
        files, reader, what, label = DART_FILES, read_dart, "DART", "dart"
    else:
        raise InputError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    for split in SPLITS:
        if not (raw_dir / files[split]).is_file():
            raise missing_split_error(raw_dir, files, split, what)
    return {split: reader(raw_dir / files[split]) for split in SPLITS}, label
