"""The evaluate stage: official E2E numbers on the shared test set, input forms, errors, JSON and MLflow hand-off."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from steps import evaluate
from steps.core.common import InputError
from steps.metrics import inputs, scorers

needs_java = pytest.mark.skipif(not scorers.java_available(), reason="java is not installed")

# measure_scores.py -p on sys_tgen_baseline.txt vs e2e_test_refs.txt (shared/data/e2e-eval/README.md).
OFFICIAL_PY = {"BLEU": 0.659272, "NIST": 8.592267, "METEOR": 0.448260, "ROUGE_L": 0.685023, "CIDEr": 2.233846}
OFFICIAL_PERL_NIST = 8.6094  # the default (Perl mteval) row; published with 4 decimals
# (BLEU, NIST) from e2e-metrics' own mteval/mteval-v13a-sig.pl (tuetschek/e2e-metrics at 1b9c4d8), run as its
# measure_scores.py default mode runs it: its create_mteval_file() writes ref/tst/src .sgm files (every instance
# padded to 45 reference slots with empty references), then `perl mteval/mteval-v13a-sig.pl -r mteval_ref.sgm
# -s mteval_src.sgm -t mteval_sys.sgm -f mteval_log.txt`, with the printf of the script's "NIST score = ... BLEU
# score = ..." line widened from %.4f to %.17e (the unmodified script prints these rounded to 4 decimals), on
# e2e_test_refs.txt and the systems degenerate_system() makes from sys_tgen_baseline.txt.
PERL_SCRIPT = {
    "tgen": (6.59271932781785308e-01, 8.60937762033735332e00),
    "all_empty": (0.0, 0.0),
    "first_line_repeated": (8.96924186617790720e-02, 1.35338798010768729e-01),  # TGen's first output for every MR
    "every_other_line_empty": (3.04026617023602674e-01, 1.17458189414201253e00),
    "first_four_words": (1.30496033816715675e-02, 2.43645539881092571e-06),  # the length penalties dominate
    "every_20th_kept": (1.13239547671388633e-07, 1.26355530697271603e-16),  # 598 of 630 outputs empty
    "first_word": (2.22080337610545189e-09, 1.10163501219048152e-19),
    "upper_case": (6.39282691197076369e-01, 8.42866655083303762e00),  # CAFÉ: Perl lower-cases it to "cafÉ"
    "non_ascii_caps": (6.10259980170982486e-01, 7.98860001855170232e00),
    "mixed_stress": (3.88836179502169310e-01, 3.49889310092913863e00),
}
# METEOR, ROUGE_L, CIDEr that measure_scores.py's COCO evaluation (its run_coco_eval) gives for the same systems.
PERL_MODE_COCO = {
    "every_20th_kept": (0.025001689968169406, 0.03455385417421916, 0.12035054182366255),
    "mixed_stress": (0.2939012339459878, 0.42104142783660786, 1.1173660440659803),
}


def _stressed(i: int, text: str) -> str:
    """Empty, one word, upper case (non-ASCII letters too), non-ASCII capitals appended, unchanged, in turn."""
    return ["", text.split()[0], text.upper(), text + " ÉCOLE Ölmühle CAFÉ café", text][i % 5]


def degenerate_system(name: str, tgen: list[str]) -> list[str]:
    systems = {
        "tgen": lambda: tgen,
        "all_empty": lambda: [""] * len(tgen),
        "first_line_repeated": lambda: [tgen[0]] * len(tgen),
        "every_other_line_empty": lambda: [text if i % 2 == 0 else "" for i, text in enumerate(tgen)],
        "first_four_words": lambda: [" ".join(text.split()[:4]) for text in tgen],
        "every_20th_kept": lambda: [text if i % 20 == 0 else "" for i, text in enumerate(tgen)],
        "first_word": lambda: [text.split()[0] for text in tgen],
        "upper_case": lambda: [text.upper() for text in tgen],
        "non_ascii_caps": lambda: [f"ÉCOLE {text} Ölmühle" for text in tgen],
        "mixed_stress": lambda: [_stressed(i, text) for i, text in enumerate(tgen)],
    }
    return systems[name]()


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
    for name in ("ROUGE_L", "CIDEr"):
        assert from_csv[name] == grouped[name], name
    assert grouped["NIST"] == pytest.approx(OFFICIAL_PY["NIST"], abs=5e-7)
    # Perl NIST: the published 4-decimal number, and the Perl script's own 10 decimals.
    assert round(from_csv["NIST"], 4) == OFFICIAL_PERL_NIST
    assert from_csv["NIST"] == pytest.approx(PERL_SCRIPT["tgen"][1], abs=1e-12)
    assert from_csv["BLEU"] == pytest.approx(PERL_SCRIPT["tgen"][0], abs=1e-12)
    assert from_csv["bleu_nist_impl"] == "mteval-v13a-sig.pl (measure_scores.py default)"
    assert "METEOR" not in from_csv
    # The CSV carries the MRs: they fill the table's context column, in the references' order.
    assert table["context"][0] == "name[Blue Spice], eatType[coffee shop], area[city centre]"
    assert len(table) == 630


@pytest.mark.parametrize("system", sorted(PERL_SCRIPT))
def test_perl_mode_bleu_and_nist_match_the_perl_script_on_degenerate_systems(shared_data: Path, system: str) -> None:
    refs, preds = e2e_eval_files(shared_data)
    references = inputs.read_grouped_references(refs)
    hypotheses = degenerate_system(system, inputs.read_text_lines(preds))
    bleu, nist = PERL_SCRIPT[system]
    assert scorers.corpus_bleu(hypotheses, references, variant="perl") == pytest.approx(bleu, rel=1e-12, abs=1e-15)
    assert scorers.corpus_nist(hypotheses, references, variant="perl") == pytest.approx(nist, rel=1e-12, abs=1e-15)


@pytest.mark.slow
@needs_java
@pytest.mark.parametrize("system", sorted(PERL_MODE_COCO))
def test_mteval_perl_mode_gives_all_five_perl_scorer_numbers(shared_data: Path, tmp_path: Path, system: str) -> None:
    refs, preds = e2e_eval_files(shared_data)
    system_file = write(tmp_path / "sys.txt", "".join(line + "\n" for line in degenerate_system(system, inputs.read_text_lines(preds))))
    record, _ = evaluate.evaluate(refs, system_file, nist_variant="perl")
    expected = dict(zip(scorers.E2E_METRICS, PERL_SCRIPT[system] + PERL_MODE_COCO[system], strict=True))
    for name, value in expected.items():
        assert record[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    assert evaluate.parse_args([str(refs), str(system_file), "--mteval", "perl"]).nist == "perl"


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
    assert inputs.read_grouped_references(grouped) == [["a b", "a c"], ["d e"], []]
    assert inputs.read_grouped_references(write(tmp_path / "r2.txt", "a b\na c\n\nd e\n")) == [["a b", "a c"], ["d e"]]
    # No empty line at all: a single-reference file, one instance per line (as the scorer treats it).
    assert inputs.read_grouped_references(write(tmp_path / "single.txt", "x\ny\n")) == [["x"], ["y"]]


def test_consecutive_blank_lines_make_an_instance_without_references(tmp_path: Path) -> None:
    refs = write(tmp_path / "refs.txt", "a b\n\n\nd e\n")
    preds = write(tmp_path / "preds.txt", "a b\nq\nd e\n")
    with pytest.raises(InputError, match="instance 2 has no references"):
        evaluate.evaluate(refs, preds, with_meteor=False)


def test_csv_groups_by_identical_mr_in_order_of_first_appearance(tmp_path: Path) -> None:
    csv = write(tmp_path / "refs.csv", 'mr,ref\n"m1","one a"\n"m2","two a"\n"m1","one b"\n')
    assert inputs.read_csv_references(csv) == (["m1", "m2"], [["one a", "one b"], ["two a"]])
    bad = write(tmp_path / "bad.csv", "meaning,text\nm1,one\n")
    with pytest.raises(InputError, match="meaning representation"):
        inputs.read_csv_references(bad)


def test_webnlg_reference_directory(tmp_path: Path) -> None:
    ref_dir = tmp_path / "refs"
    ref_dir.mkdir()
    write(ref_dir / "reference0", "the cat sat on the mat\nx y z w\n")
    write(ref_dir / "reference1", "a cat sat on the mat\nx y z w\n")  # instance 2 padded with its reference 0
    preds = write(tmp_path / "preds.txt", "the cat sat on the mat\nw x y z\n")
    # Every file's line, in file order, copies included (METEOR's choice among equal references depends on order).
    assert inputs.read_reference_dir(ref_dir) == [["the cat sat on the mat", "a cat sat on the mat"], ["x y z w", "x y z w"]]
    record, table = evaluate.evaluate(ref_dir, preds, ref_type="webnlg", with_meteor=False)
    # TER: instance 1 exact (0), instance 2 one shift of "w" over 4 words -> mean 1/8.
    assert record["TER"] == pytest.approx(1 / 8)
    assert set(record) >= {"BLEU", "TER", "n_instances"} and "METEOR" not in record and "NIST" not in record
    assert record["BLEU"] == pytest.approx(scorers.corpus_bleu(
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
    assert inputs.read_predictions(lone_cr, raw=True) == ["a\rb", " c "]
    assert inputs.read_predictions(lone_cr) == ["a", "b", "c"]  # the E2E scorer's reading


def test_webnlg_reference_directory_errors(tmp_path: Path) -> None:
    ref_dir = tmp_path / "refs"
    ref_dir.mkdir()
    with pytest.raises(InputError, match="reference0"):
        inputs.read_reference_dir(ref_dir)
    write(ref_dir / "reference0", "a\nb\n")
    write(ref_dir / "reference1", "a\n")
    with pytest.raises(InputError, match="has 1 lines"):
        inputs.read_reference_dir(ref_dir)
    with pytest.raises(InputError, match="must be a directory"):
        inputs.load_references(ref_dir / "reference0", "dart")
    write(ref_dir / "reference0", "a\n \n")
    write(ref_dir / "reference1", "b\n\n")
    with pytest.raises(InputError, match=r"reference0:2: line 2 is blank in every reference file \(reference0, reference1\)"):
        inputs.read_reference_dir(ref_dir)
    with pytest.raises(InputError, match="--ref_type webnlg"):
        inputs.load_references(ref_dir, "e2e")


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
    fake = types.ModuleType("steps.core.tracking")
    fake.log_predictions_table = lambda run, table: calls.append((run, table))
    monkeypatch.setitem(sys.modules, "steps.core.tracking", fake)

    out = tmp_path / "eval.json"
    argv = [str(refs), str(preds), "--no_meteor", "--json", str(out), "--predictions", str(jsonl), "--mlflow_run_file", str(run_file)]
    assert evaluate.main(argv) == 0
    record = json.loads(out.read_text())
    assert list(record)[:4] == ["BLEU", "NIST", "ROUGE_L", "CIDEr"] and "METEOR" not in record
    assert record["n_instances"] == 2
    (run, table) = calls[0]
    assert run == str(run_file)
    assert list(table.columns) == ["context", "prediction", "references"]
    assert table.to_dict("records")[1] == {"context": "mr two", "prediction": "a cheap restaurant", "references": "a cheap family restaurant"}
    assert table["references"][0] == "the pub is near the river\nthe pub near the river"
    assert "evaluate: 2 instances" in capsys.readouterr().err


def test_predictions_jsonl_must_match_the_instances(tmp_path: Path) -> None:
    jsonl = write(tmp_path / "predictions.jsonl", json.dumps({"context": "only one"}) + "\n")
    with pytest.raises(InputError, match="1 distinct contexts but the references have 2"):
        inputs.read_contexts(jsonl, 2)
    write(jsonl, json.dumps({"id": 3}) + "\n")
    with pytest.raises(InputError, match='"context"'):
        inputs.read_contexts(jsonl, 1)


def test_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    text = capsys.readouterr().out
    for option in ("--json", "--scores_json", "--no_meteor", "--ref_type", "--mteval", "--nist", "--predictions", "--mlflow_run_file", "--examples",
                   "--base_examples"):
        assert option in text


# ---------------------------------------------------------------- one record per instance (decode's examples.jsonl)

FORMATTED = [  # three test lines, two MRs: what prepare writes and decode reads
    {"context": "name : A | food : Thai", "completion": "A serves Thai food ."},
    {"context": "name : A | food : Thai", "completion": "Thai food at A ."},
    {"context": "name : B | area : riverside", "completion": "B is by the river ."},
]
OUTPUTS = {0: "A serves Thai food .", 1: "A serves Thai food .", 2: "B is near the river ."}


def _decoded(tmp_path: Path, name: str, predictions: dict[int, str], ref_type: str = "e2e") -> Path:
    """What decode leaves in its work dir: examples.jsonl and the scorer files derived from it."""
    from steps.decoding.scorer_files import write_scorer_files

    formatted = write(tmp_path / "test.jsonl", "".join(json.dumps(r) + "\n" for r in FORMATTED))
    out = tmp_path / name
    out.mkdir()
    refs = out / ("refs" if ref_type != "e2e" else "refs.txt")
    write_scorer_files(formatted, predictions, refs, out / "preds.txt", ref_type, ref_num=3, examples_file=out / "examples.jsonl")
    return out


@pytest.mark.parametrize("ref_type", ["e2e", "webnlg"])
def test_examples_score_exactly_as_the_scorer_files_derived_from_them(tmp_path: Path, ref_type: str) -> None:
    out = _decoded(tmp_path, "outputs", OUTPUTS, ref_type)
    records = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert [(r["id"], r["context"], r["prediction"]) for r in records] == [
        (0, FORMATTED[0]["context"], OUTPUTS[0]), (2, FORMATTED[2]["context"], OUTPUTS[2])]
    expected = ["A serves Thai food .", "Thai food at A ."] + ([] if ref_type == "e2e" else ["A serves Thai food ."])
    assert records[0]["references"] == expected  # WebNLG/DART: ref_num of them, padded with the first, as the files
    refs = out / ("refs" if ref_type != "e2e" else "refs.txt")
    from_files, _ = evaluate.evaluate(refs, out / "preds.txt", ref_type, with_meteor=False)
    keys, examples = inputs.read_examples(out / "examples.jsonl", ref_type)
    from_examples, table = evaluate.score(examples, ref_type, with_meteor=False)
    assert from_examples == from_files
    assert keys == [(0, FORMATTED[0]["context"]), (2, FORMATTED[2]["context"])]
    assert list(table["context"]) == [FORMATTED[0]["context"], FORMATTED[2]["context"]]


def test_base_examples_are_matched_by_instance_not_by_line(tmp_path: Path) -> None:
    adapted = _decoded(tmp_path, "outputs", OUTPUTS)
    base = _decoded(tmp_path, "outputs_base", {0: "A .", 1: "A .", 2: "B ."})
    lines = (base / "examples.jsonl").read_text().splitlines()
    argv = ["--examples", str(adapted / "examples.jsonl"), "--base_examples", str(base / "examples.jsonl"), "--no_meteor"]
    in_order = evaluate.run(evaluate.parse_args([*argv, "--json", str(tmp_path / "a.json")]))
    write(base / "examples.jsonl", "\n".join(reversed(lines)) + "\n")  # another order: the same instances
    reversed_order = evaluate.run(evaluate.parse_args(argv))
    assert reversed_order["base"] == in_order["base"] and in_order["base"]["BLEU"] < in_order["BLEU"]
    assert json.loads((tmp_path / "a.json").read_text()) == in_order

    write(base / "examples.jsonl", lines[0] + "\n")
    with pytest.raises(InputError, match=r"not the same test set.*instance 2 \('name : B"):
        evaluate.run(evaluate.parse_args(argv))
    other = json.loads(lines[1]) | {"references": ["B is on the river ."]}
    write(base / "examples.jsonl", lines[0] + "\n" + json.dumps(other) + "\n")
    with pytest.raises(InputError, match="instance 2 has other references"):
        evaluate.run(evaluate.parse_args(argv))


def test_a_bad_examples_line_names_file_and_line(tmp_path: Path, capsys) -> None:
    good = {"id": 0, "context": "c", "prediction": "p", "references": ["r"]}
    bad = write(tmp_path / "examples.jsonl", json.dumps(good) + "\n" + json.dumps(good | {"references": "r", "id": 1}) + "\n")
    assert evaluate.main(["--examples", str(bad), "--no_meteor"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and '"references": [str, ...]' in err
    write(bad, json.dumps(good) + "\n" + json.dumps(good) + "\n")
    assert evaluate.main(["--examples", str(bad), "--no_meteor"]) == 2
    assert "appears twice" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["refs.txt", "--examples", "e.jsonl"], "drop REF_FILE"),
    (["--examples", "e.jsonl", "--base_pred_file", "b.txt"], "drop --base_pred_file"),
    (["refs.txt", "preds.txt", "--base_examples", "b.jsonl"], "--base_examples goes with --examples"),
    ([], "give REF_FILE and PRED_FILE, or --examples"),
])  # fmt: skip
def test_examples_mode_and_file_mode_do_not_mix(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
