"""Raw -> formatted JSONL: exact bytes per dataset form, CSV/text equivalence, and every input error."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from steps import prepare
from steps.core.common import InputError
from steps.datasets import readers as datasets
from steps.sample_data import generate_sample, write_text_files

SPLIT_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl")

# Three MRs in both raw forms: the CSV release and the original repo's pre-tokenised text (as in valid.txt).
CSV_ROWS = [
    ("name[Alimentum], area[city centre], familyFriendly[no]", "Alimentum isn't family-friendly but it's in the city centre."),
    ("name[Blue Spice], eatType[pub], priceRange[£20-25], near[Café Sicilia]", 'The pub "Blue Spice" costs £20-25, near Café Sicilia...'),
    ("name[The Mill], customer rating[5 out of 5], area[riverside]", "The Mill's rating: 5 out of 5; it's by the riverside!"),
]
TXT_LINES = [
    "name : Alimentum | area : city centre | family friendly : no||Alimentum isn 't family - friendly but it 's in the city centre . ",
    'name : Blue Spice | Type : pub | price : £ 20 - 25 | near : Café Sicilia||The pub " Blue Spice " costs £ 20 - 25 , near Café Sicilia ... ',
    "name : The Mill | customer rating : 5 out of 5 | area : riverside||The Mill 's rating : 5 out of 5 ; it 's by the riverside ! ",
]


def csv_text(rows) -> str:
    quote = lambda s: '"' + s.replace('"', '""') + '"'  # noqa: E731
    return "mr,ref\n" + "".join(f"{quote(mr)},{quote(ref)}\n" for mr, ref in rows)


def write_e2e_txt(raw: Path, lines=TXT_LINES) -> Path:
    raw.mkdir(parents=True, exist_ok=True)
    for name in datasets.E2E_TXT_FILES.values():
        (raw / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return raw


def write_e2e_csv(raw: Path, rows=CSV_ROWS) -> Path:
    raw.mkdir(parents=True, exist_ok=True)
    for name in datasets.E2E_CSV_FILES.values():
        (raw / name).write_text(csv_text(rows), encoding="utf-8")
    return raw


def run_prepare(*args) -> int:
    return prepare.main([str(a) for a in args])


def expected_jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# ---------------------------------------------------------------- E2E text


def test_summary_gives_counts_and_word_length_spreads_per_split(tmp_path, capsys):
    assert run_prepare("--dataset", "e2e", "--raw_dir", write_e2e_txt(tmp_path / "raw"), "--out_dir", tmp_path / "out") == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}

    def spread(texts):
        words = [len(t.split()) for t in texts]
        return f"{min(words)}/{statistics.median(words):g}/{max(words)}"

    contexts, completions = zip(*(line.split("||") for line in TXT_LINES))
    for split in ("train", "valid", "test"):
        assert rows[split][1:] == ["3", str(len(set(contexts))), spread(contexts), spread(completions), "0"]


def test_e2e_txt_exact_bytes(tmp_path):
    raw = write_e2e_txt(tmp_path / "raw")
    assert run_prepare("--dataset", "e2e", "--raw_dir", raw, "--out_dir", tmp_path / "out") == 0
    text = (tmp_path / "out" / "valid.jsonl").read_text(encoding="ascii")  # json.dumps escapes non-ASCII
    first = (
        '{"context": "name : Alimentum | area : city centre | family friendly : no", '
        '"completion": "Alimentum isn \'t family - friendly but it \'s in the city centre ."}\n'
    )
    assert text.startswith(first)
    assert "\\u00a3 20 - 25" in text and "Caf\\u00e9 Sicilia" in text
    assert text.count("\n") == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(SPLIT_FILES)


def test_original_form_like_format_converting_e2e(tmp_path, capsys):
    src = tmp_path / "train.txt"
    # Leading/trailing whitespace of the line is stripped; the context is kept as is (inner space too);
    # fields after a second `||` are dropped, as in the original.
    src.write_text("  name : A | food : French ||A is French . ||extra\r\nname : B||B é £\n", encoding="utf-8")
    out = tmp_path / "out" / "train_formatted.jsonl"
    assert run_prepare(src, out) == 0
    assert out.read_bytes() == (
        b'{"context": "name : A | food : French ", "completion": "A is French . "}\n'
        b'{"context": "name : B", "completion": "B \\u00e9 \\u00a3"}\n'
    )
    assert "input 2" in capsys.readouterr().out


def test_blank_lines_are_skipped_and_counted(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("a||b\n\n   \nc||d\n", encoding="utf-8")
    assert run_prepare(src, tmp_path / "out.jsonl") == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2
    assert "2 rejected (blank lines)" in capsys.readouterr().out


# ---------------------------------------------------------------- E2E CSV


@pytest.mark.parametrize(
    ("raw", "tokenised"),
    [  # pairs taken from the official devset.csv and the original repo's valid.txt
        ("Alimentum isn't family-friendly but it is in riverside.", "Alimentum isn 't family - friendly but it is in riverside ."),
        ("called 'Aromi' has an average customer rating.", "called ' Aromi ' has an average customer rating ."),
        ("price range of £20-£25 and it is not kids-friendly.", "price range of £ 20- £ 25 and it is not kids - friendly ."),
        ("serves Chinese food .price £20-£25.", "serves Chinese food .price £ 20- £ 25 ."),
        ("prices from £30.99, high profile", "prices from £ 30.99 , high profile"),
        ("low ratings...but it is riverside", "low ratings ... but it is riverside"),
        ("not family-friendly.. It provides", "not family - friendly .. It provides"),
        ("you will find Browns Cambridge- a family-friendly", "you will find Browns Cambridge- a family - friendly"),
        ("It is not family -friendly, however", "It is not family -friendly , however"),
        ("The Wrestlers' is a coffee shop", "The Wrestlers ' is a coffee shop"),
        ("If you're in the area, I've heard you'll like it", "If you 're in the area , I 've heard you 'll like it"),
        ('coffee shop "The Punter" serving', 'coffee shop " The Punter " serving'),
        ("Fitzbillies: a low-cost  family place; good food!", "Fitzbillies : a low - cost family place ; good food !"),
    ],
)
def test_tokenize_e2e_matches_text_files(raw, tokenised):
    assert datasets.tokenize_e2e(raw) == tokenised


def test_render_e2e_mr():
    mr = "name[Alimentum], eatType[pub], priceRange[£20-25], customer rating[3 out of 5], familyFriendly[yes], near[Café Rouge]"
    expected = "name : Alimentum | Type : pub | price : £ 20 - 25 | customer rating : 3 out of 5 | family friendly : yes | near : Café Rouge"
    assert datasets.render_e2e_mr(mr, Path("x.csv"), 2) == expected
    assert datasets.render_e2e_mr("name[A], priceRange[more than £30]", Path("x.csv"), 2) == "name : A | price : more than £ 30"


def test_csv_and_txt_give_identical_output(tmp_path):
    assert run_prepare("--dataset", "e2e", "--raw_dir", write_e2e_csv(tmp_path / "csv"), "--out_dir", tmp_path / "a") == 0
    assert run_prepare("--dataset", "e2e", "--raw_dir", write_e2e_txt(tmp_path / "txt"), "--out_dir", tmp_path / "b") == 0
    for name in SPLIT_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_e2e_format_auto_prefers_txt_and_can_be_forced(tmp_path):
    raw = write_e2e_txt(tmp_path / "raw")
    write_e2e_csv(raw, rows=[("name[Other]", "Other.")])
    assert run_prepare("--dataset", "e2e", "--raw_dir", raw, "--out_dir", tmp_path / "auto") == 0
    assert "Alimentum" in (tmp_path / "auto" / "train.jsonl").read_text()
    assert run_prepare("--dataset", "e2e", "--raw_dir", raw, "--out_dir", tmp_path / "csv", "--e2e_format", "csv") == 0
    assert (tmp_path / "csv" / "train.jsonl").read_text() == expected_jsonl([{"context": "name : Other", "completion": "Other ."}])


def test_csv_equals_text_on_the_real_dev_and_test_sets(shared_data):
    """Measured result documented in docs/data.md: every MR identical; references differ only where noted."""
    for csv_name, txt_name, n_lines, n_mrs, refs_equal in [
        ("devset.csv", "valid.txt", 4672, 547, 4671),
        ("testset_w_refs.csv", "test.txt", 4693, 630, 4567),
    ]:
        from_csv = datasets.read_e2e_csv(shared_data / "e2e-csv" / csv_name).examples
        from_txt = datasets.read_e2e_txt(shared_data / "e2e" / txt_name).examples
        assert len(from_csv) == len(from_txt) == n_lines
        csv_mrs = {e.context for e in from_csv}
        assert len(csv_mrs) == n_mrs
        assert csv_mrs == {e.context for e in from_txt}
        assert all(a.context == b.context for a, b in zip(from_csv, from_txt))
        assert sum(a.completion == b.completion for a, b in zip(from_csv, from_txt)) == refs_equal
        # Nothing is lost or invented: the texts are equal once whitespace is removed.
        assert all(a.completion.replace(" ", "") == b.completion.replace(" ", "") for a, b in zip(from_csv, from_txt))


# ---------------------------------------------------------------- WebNLG and DART

WEBNLG = {
    "entries": [
        {
            "1": {
                "category": "Airport",
                "modifiedtripleset": [
                    {"subject": "Aarhus_Airport", "property": "cityServed", "object": '"Aarhus, Denmark"'},
                    {"subject": "Aarhus_Airport", "property": "elevationAboveTheSeaLevel_(in_metres)", "object": "25.0"},
                ],
                "lexicalisations": [
                    {"comment": "good", "lex": "Aarhus Airport serves Aarhus, Denmark; it is 25 m high.", "xml_id": "Id1"},
                    {"comment": "toFix", "lex": "broken", "xml_id": "Id2"},
                    {"comment": "good", "lex": "Zürich-style café", "xml_id": "Id3"},
                ],
            }
        },
        {"2": {"category": "Artist", "modifiedtripleset": [{"subject": "A", "property": "genre", "object": "B"}],
               "lexicalisations": [{"comment": "good", "lex": "A plays B."}]}},
    ]
}  # fmt: skip
DART = [
    {
        "tripleset": [["Mars Hill College", "JOINED", "1973"], ["Mars Hill College", "LOCATION", "Mars Hill, North Carolina"]],
        "subtree_was_extended": True,
        "annotations": [{"source": "WikiSQL", "text": "A school from Mars Hill joined in 1973."}, {"source": "x", "text": "Two é"}],
    },
    {"tripleset": [["[TABLECONTEXT]", "[TITLE]", "Films"]], "annotations": [{"source": "y", "text": "Films."}]},
]


def write_json_splits(raw: Path, files: dict[str, str], data) -> Path:
    raw.mkdir(parents=True, exist_ok=True)
    for name in files.values():
        (raw / name).write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    return raw


def test_webnlg_exact_bytes(tmp_path, capsys):
    raw = write_json_splits(tmp_path / "raw", datasets.WEBNLG_FILES, WEBNLG)
    assert run_prepare("--dataset", "webnlg", "--raw_dir", raw, "--out_dir", tmp_path / "out") == 0
    context = 'Aarhus_Airport : cityServed : "Aarhus, Denmark" | Aarhus_Airport : elevationAboveTheSeaLevel_(in_metres) : 25.0'
    assert (tmp_path / "out" / "test.jsonl").read_text() == expected_jsonl(
        [
            {"context": context, "completion": "Aarhus Airport serves Aarhus, Denmark; it is 25 m high.", "cate": True},
            {"context": context, "completion": "Zürich-style café", "cate": True},
            {"context": "A : genre : B", "completion": "A plays B.", "cate": False},
        ]
    )
    assert '"cate": true}' in (tmp_path / "out" / "test.jsonl").read_text()
    assert "3 rejected" in capsys.readouterr().out  # one "toFix" per split


def test_dart_exact_bytes(tmp_path):
    raw = write_json_splits(tmp_path / "raw", datasets.DART_FILES, DART)
    assert run_prepare("--dataset", "dart", "--raw_dir", raw, "--out_dir", tmp_path / "out") == 0
    context = "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina"
    assert (tmp_path / "out" / "valid.jsonl").read_text() == expected_jsonl(
        [
            {"context": context, "completion": "A school from Mars Hill joined in 1973."},
            {"context": context, "completion": "Two é"},
            {"context": "[TABLECONTEXT] : [title] : Films", "completion": "Films."},
        ]
    )


def test_real_webnlg_and_dart_counts(shared_data):
    webnlg = datasets.read_webnlg(shared_data / "webnlg" / "dev.json")
    assert (len(webnlg.examples), webnlg.skipped) == (2258, 10)  # 2,268 lexicalisations, 10 marked "toFix"
    assert all(e.cate for e in webnlg.examples)  # the dev set holds only seen categories
    dart = datasets.read_dart(shared_data / "dart" / "dart-v1.1.1-full-dev.json")
    assert (len(dart.examples), len({e.context for e in dart.examples})) == (6980, 2721)


# ---------------------------------------------------------------- sample


def test_sample_text_files_convert_line_for_line(tmp_path):
    generated = generate_sample(seed=5, train_mrs=40)
    write_text_files(generated, tmp_path / "raw")
    assert run_prepare("--dataset", "e2e", "--raw_dir", tmp_path / "raw", "--out_dir", tmp_path / "out") == 0
    for split, lines in generated.items():
        rows = [json.loads(line) for line in (tmp_path / "out" / f"{split}.jsonl").read_text().splitlines()]
        assert [(r["context"], r["completion"]) for r in rows] == lines


# ---------------------------------------------------------------- errors: message names file and line, no output


def assert_fails(capsys, out_dir: Path, *args, match: str) -> None:
    assert run_prepare(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err, err
    assert not out_dir.exists() or not any(out_dir.iterdir())


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("a||b\nno separator here\n", "valid.txt:2: expected `MR||reference`"),
        ("a||b\n||ref\n", "valid.txt:2: empty MR"),
        ("a||b\nc||d\nname : x||   \n", "valid.txt:3: empty reference"),
    ],
)
def test_bad_e2e_text(tmp_path, capsys, content, match):
    raw = write_e2e_txt(tmp_path / "raw")
    (raw / "valid.txt").write_text(content, encoding="utf-8")
    assert_fails(capsys, tmp_path / "out", "--dataset", "e2e", "--raw_dir", raw, "--out_dir", tmp_path / "out", match=match)


def test_invalid_utf8_names_the_line(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_bytes(b"a||b\nc||d \xff\xfe\n")
    assert_fails(capsys, tmp_path / "out", src, tmp_path / "out" / "x.jsonl", match="in.txt:2: invalid UTF-8")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("meaning,text\nname[A],A.\n", "devset.csv:1: expected columns mr and ref"),
        ('mr,ref\n"name[A]","A."\n"","B."\n', "devset.csv:3: empty MR"),
        ('mr,ref\n"name[A]","A\non two lines."\n"name[B]",""\n', "devset.csv:4: empty reference"),
        ("mr,ref\nname[A] eatType[pub],A.\n", "devset.csv:2: cannot parse MR"),
        ("mr,ref\nstars[5],A.\n", "devset.csv:2: unknown slot 'stars'"),
    ],
)
def test_bad_e2e_csv(tmp_path, capsys, content, match):
    raw = write_e2e_csv(tmp_path / "raw")
    (raw / "devset.csv").write_text(content, encoding="utf-8")
    assert_fails(capsys, tmp_path / "out", "--dataset", "e2e", "--raw_dir", raw, "--out_dir", tmp_path / "out", match=match)


def test_malformed_json_names_the_line(tmp_path, capsys):
    raw = write_json_splits(tmp_path / "raw", datasets.WEBNLG_FILES, WEBNLG)
    (raw / "test.json").write_text('{"entries": [\n  {"1": \n  oops}\n]}', encoding="utf-8")
    assert_fails(capsys, tmp_path / "out", "--dataset", "webnlg", "--raw_dir", raw, "--out_dir", tmp_path / "out",
                 match="test.json:3: malformed JSON")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([{"tripleset": [["a", "b"]], "annotations": []}], "entry 0: malformed entry"),
        ([{"tripleset": [["a", "b", "c"]], "annotations": [{"text": " "}]}], "entry 0: empty annotation text"),
        ({"entries": []}, "expected a JSON list"),
        # A dict per triple used to be unpacked into its keys and written as "s : p : o" for every triple.
        ([{"tripleset": [{"s": "Mars Hill", "p": "joined", "o": "1973"}], "annotations": [{"text": "x"}]}],
         "is not a list [subject, predicate, object]"),
    ],
)
def test_bad_dart(tmp_path, capsys, data, match):
    raw = write_json_splits(tmp_path / "raw", datasets.DART_FILES, DART)
    (raw / datasets.DART_FILES["train"]).write_text(json.dumps(data), encoding="utf-8")
    assert_fails(capsys, tmp_path / "out", "--dataset", "dart", "--raw_dir", raw, "--out_dir", tmp_path / "out", match=match)


def test_bad_webnlg_entry(tmp_path, capsys):
    raw = write_json_splits(tmp_path / "raw", datasets.WEBNLG_FILES, WEBNLG)
    broken = {"entries": [{"1": {"category": "City", "lexicalisations": []}}]}
    (raw / "dev.json").write_text(json.dumps(broken), encoding="utf-8")
    assert_fails(capsys, tmp_path / "out", "--dataset", "webnlg", "--raw_dir", raw, "--out_dir", tmp_path / "out",
                 match="entries[0]: missing or malformed field 'modifiedtripleset'")


def test_unknown_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_prepare("--dataset", "wikibio", "--raw_dir", tmp_path, "--out_dir", tmp_path / "out")
    assert exc.value.code == 2 and "invalid choice: 'wikibio'" in capsys.readouterr().err
    with pytest.raises(InputError, match="unknown dataset 'wikibio'"):
        datasets.read_dataset("wikibio", tmp_path)


def test_missing_split_names_the_expected_file(tmp_path, capsys):
    raw = write_json_splits(tmp_path / "raw", datasets.WEBNLG_FILES, WEBNLG)
    (raw / "test.json").unlink()
    assert_fails(capsys, tmp_path / "out", "--dataset", "webnlg", "--raw_dir", raw, "--out_dir", tmp_path / "out",
                 match="missing test.json for the test split")
    assert_fails(capsys, tmp_path / "out", "--dataset", "e2e", "--raw_dir", tmp_path / "empty_dir_missing", "--out_dir", tmp_path / "out",
                 match="raw data directory not found")
    (tmp_path / "nothing").mkdir()
    assert_fails(capsys, tmp_path / "out", "--dataset", "e2e", "--raw_dir", tmp_path / "nothing", "--out_dir", tmp_path / "out", match="trainset.csv")


def test_failing_later_split_leaves_earlier_outputs_untouched(tmp_path, capsys):
    """train and valid read fine, test fails: no new file appears and the old ones keep their bytes."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("old\n")
    raw = write_e2e_txt(tmp_path / "raw")
    (raw / "test.txt").write_text("a||b\nbroken\n", encoding="utf-8")
    assert run_prepare("--dataset", "e2e", "--raw_dir", raw, "--out_dir", out) == 2
    assert "test.txt:2" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"]
    assert (out / "train.jsonl").read_text() == "old\n"


def test_write_failure_midway_renames_nothing(tmp_path, monkeypatch):
    """Even a failure while writing the last split (after the others were written) publishes nothing."""
    raw = tmp_path / "raw"
    write_text_files(generate_sample(1, 5, 2, 2), raw)
    splits, _ = datasets.read_dataset("e2e", raw)
    original = datasets.Example.to_json

    def explode_in_test(self):
        if self.context == splits["test"].examples[-1].context:
            raise OSError("disk full")
        return original(self)

    monkeypatch.setattr(datasets.Example, "to_json", explode_in_test)
    with pytest.raises(OSError):
        prepare.write_splits(splits, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
