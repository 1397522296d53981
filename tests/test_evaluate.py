"""The evaluate stage: official E2E numbers on the shared test set, input forms, errors, JSON and MLflow hand-off."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from steps import e2e_metrics, evaluate
from steps.common import InputError

needs_java = pytest.mark.skipif(not e2e_metrics.java_available(), reason="java is not installed")

# measure_scores.py -p on sys_tgen_baseline.txt vs e2e_test_refs.txt (shared/data/e2e-eval/README.md).
OFFICIAL_PY = {"BLEU": 0.659272, "NIST": 8.592267, "METEOR": 0.448260, "ROUGE_L": 0.685023, "CIDEr": 2.233846}
OFFICIAL_PERL_NIST = 8.6094  # the default (Perl mteval) row; published with 4 decimals
# e2e-metrics' own mteval/mteval-v13a-sig.pl run on the scorer's SGML layout (every instance padded to 45 reference
# slots with empty references), its printf widened to 10 decimals: NIST of systems made from sys_tgen_baseline.txt.
PERL_SCRIPT_NIST = {
    "tgen": 8.6093776203,
    "all_empty": 0.0,
    "first_line_repeated": 0.1353387980,  # the first TGen output for every one of the 630 MRs
    "every_other_line_empty": 1.1745818941,
    "first_four_words": 0.0000024365,  # each output cut to its first 4 words: the length penalty dominates
}


def degenerate_system(name: str, tgen: list[str]) -> list[str]:
    if name == "tgen":
        return tgen
    if name == "all_empty":
        return [""] * len(tgen)
    if name == "first_line_repeated":
        return [tgen[0]] * len(tgen)
    if name == "every_other_line_empty":
        return [text if i % 2 == 0 else "" for i, text in enumerate(tgen)]
    return [" ".join(text.split()[:4]) for text in tgen]


def e2e_eval_files(shared_data: Path) -> tuple[Path, Path]:
    folder = shared_data / "e2e-eval"
    return folder / "e2e_test_refs.txt", folder / "sys_tgen_baseline.txt"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- acceptance on the official test set


@pytest.mark.slow
@needs_java
def test_reproduces_the_official_scorer_on_the_e2e_test_set(shared_data: Path, tmp_path: Path, capsys) -> None:
    refs, preds = e2e_eval_files(shared_data)
    out = tmp_path / "metrics" / "eval.json"
    assert evaluate.main([str(refs), str(preds), "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    for name, official in OFFICIAL_PY.items():
        # The official row has 6 decimals; we reproduce every one of them.
        assert record[name] == pytest.approx(official, abs=5e-7), name
    assert record["n_instances"] == 630
    assert record["bleu_nist_impl"].startswith("pymteval")
    assert record["ptb_tokenizer"] == "stanford-corenlp-3.4.1"
    stdout = capsys.readouterr().out
    assert "SCORES:\n==============\nBLEU: 0.6593\nNIST: 8.5923\nMETEOR: 0.4483\nROUGE_L: 0.6850\nCIDEr: 2.2338\n" in stdout


def test_csv_references_and_perl_nist_match_the_grouped_text_form(shared_data: Path) -> None:
    refs, preds = e2e_eval_files(shared_data)
    csv_refs = shared_data / "e2e-csv" / "testset_w_refs.csv"
    grouped, _ = evaluate.evaluate(refs, preds, with_meteor=False)
    from_csv, table = evaluate.evaluate(csv_refs, preds, with_meteor=False, nist_variant="perl")
    for name in ("BLEU", "ROUGE_L", "CIDEr"):
        assert from_csv[name] == grouped[name], name
    assert grouped["NIST"] == pytest.approx(OFFICIAL_PY["NIST"], abs=5e-7)
    # Perl NIST: the published 4-decimal number, and the Perl script's own 10 decimals.
    assert round(from_csv["NIST"], 4) == OFFICIAL_PERL_NIST
    assert from_csv["NIST"] == pytest.approx(PERL_SCRIPT_NIST["tgen"], abs=1e-9)
    assert from_csv["bleu_nist_impl"] == "pymteval BLEU, mteval-v13a.pl NIST"
    assert "METEOR" not in from_csv
    # The CSV carries the MRs: they fill the table's context column, in the references' order.
    assert table["context"][0] == "name[Blue Spice], eatType[coffee shop], area[city centre]"
    assert len(table) == 630


@pytest.mark.parametrize("system", sorted(PERL_SCRIPT_NIST))
def test_perl_nist_matches_the_perl_script_on_degenerate_systems(shared_data: Path, system: str) -> None:
    refs, preds = e2e_eval_files(shared_data)
    references = evaluate.read_grouped_references(refs)
    hypotheses = degenerate_system(system, evaluate.read_text_lines(preds))
    nist = e2e_metrics.corpus_nist(hypotheses, references, variant="perl")
    assert nist == pytest.approx(PERL_SCRIPT_NIST[system], abs=1e-9)


def test_python_tokenizer_fallback_gives_the_official_rouge_and_cider(shared_data: Path, monkeypatch, capsys) -> None:
    refs, preds = e2e_eval_files(shared_data)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # no Java anywhere
    assert evaluate.main([str(refs), str(preds), "--no_meteor"]) == 0
    captured = capsys.readouterr()
    assert "ROUGE_L: 0.6850\nCIDEr: 2.2338" in captured.out
    assert "METEOR" not in captured.out
    assert "pure-Python approximation" in captured.out


# ---------------------------------------------------------------- reading inputs


def test_grouped_reference_file_rules(tmp_path: Path) -> None:
    grouped = write(tmp_path / "refs.txt", "a b\n a c \n\nd e\n\n\n")
    # Lines are stripped; only the last (empty) group is dropped, as in the scorer: two trailing blank lines leave
    # one empty instance behind, which check_counts then reports.
    assert evaluate.read_grouped_references(grouped) == [["a b", "a c"], ["d e"], []]
    assert evaluate.read_grouped_references(write(tmp_path / "r2.txt", "a b\na c\n\nd e\n")) == [["a b", "a c"], ["d e"]]
    # No empty line at all: a single-reference file, one instance per line (as the scorer treats it).
    assert evaluate.read_grouped_references(write(tmp_path / "single.txt", "x\ny\n")) == [["x"], ["y"]]


def test_consecutive_blank_lines_make_an_instance_without_references(tmp_path: Path) -> None:
    refs = write(tmp_path / "refs.txt", "a b\n\n\nd e\n")
    preds = write(tmp_path / "preds.txt", "a b\nq\nd e\n")
    with pytest.raises(InputError, match="instance 2 has no references"):
        evaluate.evaluate(refs, preds, with_meteor=False)


def test_csv_groups_by_identical_mr_in_order_of_first_appearance(tmp_path: Path) -> None:
    csv = write(tmp_path / "refs.csv", 'mr,ref\n"m1","one a"\n"m2","two a"\n"m1","one b"\n')
    assert evaluate.read_csv_references(csv) == (["m1", "m2"], [["one a", "one b"], ["two a"]])
    bad = write(tmp_path / "bad.csv", "meaning,text\nm1,one\n")
    with pytest.raises(InputError, match="meaning representation"):
        evaluate.read_csv_references(bad)


def test_webnlg_reference_directory(tmp_path: Path) -> None:
    ref_dir = tmp_path / "refs"
    ref_dir.mkdir()
    write(ref_dir / "reference0", "the cat sat on the mat\nx y z w\n")
    write(ref_dir / "reference1", "a cat sat on the mat\nx y z w\n")  # instance 2 padded with its reference 0
    preds = write(tmp_path / "preds.txt", "the cat sat on the mat\nw x y z\n")
    # Every file's line, in file order, copies included (METEOR's choice among equal references depends on order).
    assert evaluate.read_reference_dir(ref_dir) == [["the cat sat on the mat", "a cat sat on the mat"], ["x y z w", "x y z w"]]
    record, table = evaluate.evaluate(ref_dir, preds, ref_type="webnlg", with_meteor=False)
    # TER: instance 1 exact (0), instance 2 one shift of "w" over 4 words -> mean 1/8.
    assert record["TER"] == pytest.approx(1 / 8)
    assert set(record) >= {"BLEU", "TER", "n_instances"} and "METEOR" not in record and "NIST" not in record
    assert record["BLEU"] == pytest.approx(e2e_metrics.corpus_bleu(
        ["the cat sat on the mat", "w x y z"], [["the cat sat on the mat", "a cat sat on the mat"], ["x y z w"]],
        variant="multi-bleu-detok"))  # fmt: skip
    assert table["references"][1] == "x y z w"  # people read each distinct reference once


def test_webnlg_blank_padding_counts_as_in_generationeval(tmp_path: Path) -> None:
    # GenerationEval's layout: instances with fewer references are padded with blank lines (here " " and "").
    ref_dir = tmp_path / "refs"
    ref_dir.mkdir()
    write(ref_dir / "reference0", "a b c d e f g h i j\na b c d e f g h i j\na\n")
    write(ref_dir / "reference1", " \nx\n\n")
    preds = write(tmp_path / "preds.txt", "a b c d\na b c d\nx y z\n")
    record, _ = evaluate.evaluate(ref_dir, preds, ref_type="webnlg", with_meteor=False)
    # BLEU: the closest reference lengths are 0 (the blank one), 1 ("x") and 1 ("a"): r = 2 < c = 11, BP = 1;
    # hits/totals per order 8/11, 6/8, 4/5, 2/2. (multi-bleu-detok.perl on these files prints 81.2759656403.)
    assert record["BLEU"] == pytest.approx((8 / 11 * 6 / 8 * 4 / 5 * 2 / 2) ** 0.25, rel=1e-12)
    assert record["BLEU"] == pytest.approx(0.812759656403, abs=1e-12)
    # TER: 6 edits / 10 words for the first two; "x y z" is 3 edits from "a" but 1 from the blank reference.
    assert record["TER"] == pytest.approx((0.6 + 0.6 + 1.0) / 3, rel=1e-12)


def test_webnlg_lines_are_read_as_generationeval_reads_them(tmp_path: Path) -> None:
    ref_dir = tmp_path / "refs"
    ref_dir.mkdir()
    (ref_dir / "reference0").write_bytes(b"a b c d e\r\n")
    preds = tmp_path / "preds.txt"
    preds.write_bytes("\u2009a b c d e\r\n".encode())  # a leading thin space, CRLF
    record, _ = evaluate.evaluate(ref_dir, preds, ref_type="webnlg", with_meteor=False)
    # The Perl BLEU script reads bytes: the thin space is part of the word "<THIN SPACE>a", so p = 4/5, 3/4, 2/3, 1/2
    # (it prints 66.8740304976); nltk splits at it, so TER sees the reference's own words.
    assert record["BLEU"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, rel=1e-12)
    assert record["TER"] == 0.0
    # Lines end at "\n" only, as in both originals; nothing is stripped.
    lone_cr = write(tmp_path / "cr.txt", "a\rb\n c \n")
    assert evaluate.read_predictions(lone_cr, raw=True) == ["a\rb", " c "]
    assert evaluate.read_predictions(lone_cr) == ["a", "b", "c"]  # the E2E scorer's reading


def test_webnlg_reference_directory_errors(tmp_path: Path) -> None:
    ref_dir = tmp_path / "refs"
    ref_dir.mkdir()
    with pytest.raises(InputError, match="reference0"):
        evaluate.read_reference_dir(ref_dir)
    write(ref_dir / "reference0", "a\nb\n")
    write(ref_dir / "reference1", "a\n")
    with pytest.raises(InputError, match="has 1 lines"):
        evaluate.read_reference_dir(ref_dir)
    with pytest.raises(InputError, match="must be a directory"):
        evaluate.load_references(ref_dir / "reference0", "dart")
    write(ref_dir / "reference0", "a\n \n")
    write(ref_dir / "reference1", "b\n\n")
    with pytest.raises(InputError, match=r"reference0:2: line 2 is blank in every reference file \(reference0, reference1\)"):
        evaluate.read_reference_dir(ref_dir)
    with pytest.raises(InputError, match="--ref_type webnlg"):
        evaluate.load_references(ref_dir, "e2e")


# ---------------------------------------------------------------- errors


def test_fewer_predictions_than_instances_names_the_first_missing_one(tmp_path: Path) -> None:
    refs = write(tmp_path / "refs.txt", "a\n\nb\n\nc\n")
    preds = write(tmp_path / "preds.txt", "a\nb\n")
    with pytest.raises(InputError, match=r"instance 3 has no prediction.*2 lines.*3 instances"):
        evaluate.evaluate(refs, preds, with_meteor=False)


def test_more_predictions_than_instances_names_the_first_without_references(tmp_path: Path) -> None:
    refs = write(tmp_path / "refs.txt", "a\n\nb\n")
    preds = write(tmp_path / "preds.txt", "a\nb\nc\nd\n")
    with pytest.raises(InputError, match="instance 3 has no references"):
        evaluate.evaluate(refs, preds, with_meteor=False)


def test_empty_prediction_file(tmp_path: Path, capsys) -> None:
    refs = write(tmp_path / "refs.txt", "a\n\nb\n")
    preds = write(tmp_path / "preds.txt", "")
    assert evaluate.main([str(refs), str(preds), "--no_meteor"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "prediction file is empty" in err


@pytest.mark.parametrize("ref_type", ["e2e", "webnlg"])
def test_all_empty_predictions_are_scored_with_a_one_line_warning(tmp_path: Path, capsys, ref_type: str) -> None:
    if ref_type == "e2e":
        refs = write(tmp_path / "refs.txt", "a b\n\nc d\n")
    else:
        refs = tmp_path / "refs"
        refs.mkdir()
        write(refs / "reference0", "a b\nc d\n")
    preds = write(tmp_path / "preds.txt", "\n \t\n")
    assert evaluate.main([str(refs), str(preds), "--no_meteor", "--ref_type", ref_type]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: every prediction in {preds} is empty (2 lines); the scores below are those of empty outputs "
                        "(check the decode stage's outputs and options)"]  # fmt: skip
    assert "BLEU: 0.0000" in captured.out
    # One non-empty prediction is enough to silence it.
    write(preds, "\nc d\n")
    assert evaluate.main([str(refs), str(preds), "--no_meteor", "--ref_type", ref_type]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_empty_lines_are_empty_predictions(tmp_path: Path) -> None:
    refs = write(tmp_path / "refs.txt", "a b c d\n\nb\n")
    preds = write(tmp_path / "preds.txt", "a b c d\n\n")
    record, _ = evaluate.evaluate(refs, preds, with_meteor=False)
    assert record["n_instances"] == 2


def test_missing_java_says_how_to_install_it(tmp_path: Path, monkeypatch, capsys) -> None:
    refs = write(tmp_path / "refs.txt", "a\n\nb\n")
    preds = write(tmp_path / "preds.txt", "a\nb\n")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert evaluate.main([str(refs), str(preds)]) == 2
    err = capsys.readouterr().err
    assert "apt-get install default-jre-headless" in err and "--no_meteor" in err


def test_missing_reference_file(tmp_path: Path, capsys) -> None:
    preds = write(tmp_path / "preds.txt", "a\n")
    assert evaluate.main([str(tmp_path / "nope.txt"), str(preds), "--no_meteor"]) == 2
    assert "file not found" in capsys.readouterr().err


# ---------------------------------------------------------------- JSON and MLflow hand-off


def test_json_output_and_mlflow_table(tmp_path: Path, monkeypatch, capsys) -> None:
    refs = write(tmp_path / "refs.txt", "the pub is near the river\nthe pub near the river\n\na cheap family restaurant\n")
    preds = write(tmp_path / "preds.txt", "the pub is near the river\na cheap restaurant\n")
    jsonl = tmp_path / "predictions.jsonl"
    rows = [{"id": 0, "context": "mr one"}, {"id": 1, "context": "mr one"}, {"id": 2, "context": "mr two"}]
    write(jsonl, "".join(json.dumps(r) + "\n" for r in rows))
    run_file = write(tmp_path / "run.json", json.dumps({"run_id": "abc", "tracking_uri": "sqlite:///x.db"}))
    calls = []
    fake = types.ModuleType("steps.tracking")
    fake.log_evaluation = lambda run, metrics, table: calls.append((run, metrics, table))
    monkeypatch.setitem(sys.modules, "steps.tracking", fake)

    out = tmp_path / "eval.json"
    argv = [str(refs), str(preds), "--no_meteor", "--json", str(out), "--predictions", str(jsonl), "--mlflow_run_file", str(run_file)]
    assert evaluate.main(argv) == 0
    record = json.loads(out.read_text())
    assert list(record)[:4] == ["BLEU", "NIST", "ROUGE_L", "CIDEr"] and "METEOR" not in record
    assert record["n_instances"] == 2
    (run, metrics, table) = calls[0]
    assert run == str(run_file)
    assert metrics == {name: record[name] for name in ("BLEU", "NIST", "ROUGE_L", "CIDEr")}  # tracking adds "eval/"
    assert list(table.columns) == ["context", "prediction", "references"]
    assert table.to_dict("records")[1] == {"context": "mr two", "prediction": "a cheap restaurant", "references": "a cheap family restaurant"}
    assert table["references"][0] == "the pub is near the river\nthe pub near the river"
    assert "evaluate: 2 instances" in capsys.readouterr().err


def test_predictions_jsonl_must_match_the_instances(tmp_path: Path) -> None:
    jsonl = write(tmp_path / "predictions.jsonl", json.dumps({"context": "only one"}) + "\n")
    with pytest.raises(InputError, match="1 distinct contexts but the references have 2"):
        evaluate.read_contexts(jsonl, 2)
    write(jsonl, json.dumps({"id": 3}) + "\n")
    with pytest.raises(InputError, match='"context"'):
        evaluate.read_contexts(jsonl, 1)


def test_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    text = capsys.readouterr().out
    for option in ("--json", "--no_meteor", "--ref_type", "--nist", "--predictions", "--mlflow_run_file"):
        assert option in text
