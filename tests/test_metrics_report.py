"""The evaluate stage's additions: slot error rate for E2E (not for triples), the base alone beside the adapter."""

from __future__ import annotations

import pandas

from steps.metrics.report import add_base, add_slot_errors, headline, mlflow_metrics, slot_errors

MRS = [
    "name : The Golden Lion | Type : pub | area : riverside",
    "name : Sakura | food : Japanese | family friendly : yes",
]
GOOD = ["The Golden Lion is a pub by the riverside .", "Sakura serves Japanese food and is kid friendly ."]
BAD = ["There is a pub .", "Sakura serves Italian food and is not family - friendly ."]


def test_ser_of_hand_made_outputs():
    assert slot_errors(MRS, GOOD).record == {
        "SER": 0.0, "slot_errors": {"missing": 0, "wrong": 0, "added": 0, "slots": 6, "examples_with_errors": 0}}  # fmt: skip
    bad = slot_errors(MRS, BAD)
    # missing name and area; wrong food and family friendly
    assert bad.record["slot_errors"] == {"missing": 2, "wrong": 2, "added": 0, "slots": 6, "examples_with_errors": 2}
    assert bad.record["SER"] == 4 / 6
    assert bad.per_example == ["missing: name, area", "wrong: food=Italian, familyFriendly=no"]


def test_no_ser_for_triples_or_without_contexts():
    triples = ["Alan_Bean | occupation | Test_pilot", "Aarhus | leader | Jacob_Bundsgaard"]
    assert slot_errors(triples, GOOD, "webnlg") is None
    assert slot_errors(triples, GOOD, "e2e") is None  # not MRs, whatever the flag says
    assert slot_errors(None, GOOD) is None


def test_record_table_and_mlflow_names_with_the_base_alone():
    record = {"BLEU": 0.5, "NIST": 3.0, "n_instances": 2, "ref_type": "e2e"}
    table = pandas.DataFrame({"context": MRS, "prediction": GOOD})
    assert add_slot_errors(record, table, MRS, GOOD, "e2e")
    add_base(record, {"BLEU": 0.01, "NIST": 0.2, "n_instances": 2}, ["BLEU", "NIST"], table, BAD, slot_errors(MRS, BAD))
    assert record["SER"] == 0.0 and record["base"]["SER"] == 4 / 6 and record["base"]["BLEU"] == 0.01
    assert "n_instances" not in record["base"]
    assert list(table.columns) == ["context", "prediction", "slot_errors", "base_prediction", "base_slot_errors"]
    assert table["slot_errors"].tolist() == ["", ""] and all(table["base_slot_errors"])
    logged = mlflow_metrics(record, ["BLEU", "NIST", "METEOR"])
    assert logged["BLEU"] == 0.5 and logged["SER"] == 0.0 and logged["base.BLEU"] == 0.01 and logged["base.SER"] == 4 / 6
    assert logged["slot_errors.slots"] == 6.0 and logged["base.slot_errors.missing"] == 2.0
    assert "n_instances" not in logged and "METEOR" not in logged
    assert headline(record) == "SER 0.0000 (base alone: BLEU 0.0100, SER 0.6667)"


def test_webnlg_record_gets_no_ser_column():
    record, table = {"BLEU": 0.4}, pandas.DataFrame({"prediction": GOOD})
    assert not add_slot_errors(record, table, ["a | b | c", "d | e | f"], GOOD, "webnlg")
    assert "SER" not in record and list(table.columns) == ["prediction"]


# ---------------------------------------------------------------- through the evaluate stage


def write_stage_inputs(tmp_path, contexts, refs, preds, base_preds):
    import json

    (tmp_path / "refs.txt").write_text("\n\n".join("\n".join(group) for group in refs) + "\n")
    (tmp_path / "preds.txt").write_text("".join(p + "\n" for p in preds))
    (tmp_path / "base.txt").write_text("".join(p + "\n" for p in base_preds))
    rows = [{"id": i, "context": c, "prediction": p} for i, (c, group, p) in enumerate(zip(contexts, refs, preds)) for _ in group]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_evaluate_stage_writes_ser_and_the_base_alone(tmp_path, monkeypatch, capsys):
    import json
    import sys
    import types

    from steps import evaluate

    refs = [["The Golden Lion is a pub by the riverside .", "There is a pub called The Golden Lion by the river ."],
            ["Sakura serves Japanese food and is kid friendly ."]]  # fmt: skip
    write_stage_inputs(tmp_path, MRS, refs, GOOD, BAD)
    calls = []
    fake = types.ModuleType("steps.core.tracking")
    fake.log_predictions_table = lambda run, table: calls.append(table)
    monkeypatch.setitem(sys.modules, "steps.core.tracking", fake)
    out, scores = tmp_path / "eval.json", tmp_path / "scores.json"
    argv = [str(tmp_path / "refs.txt"), str(tmp_path / "preds.txt"), "--no_meteor", "--json", str(out), "--scores_json", str(scores),
            "--predictions", str(tmp_path / "predictions.jsonl"), "--base_pred_file", str(tmp_path / "base.txt"),
            "--mlflow_run_file", str(tmp_path / "run.json")]  # fmt: skip
    assert evaluate.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["SER"] == 0.0 and record["slot_errors"]["slots"] == 6
    assert record["base"]["SER"] == 4 / 6 and record["base"]["slot_errors"]["missing"] == 2
    assert record["BLEU"] > 3 * record["base"]["BLEU"] and set(record["base"]) == {"BLEU", "NIST", "ROUGE_L", "CIDEr", "SER", "slot_errors"}
    # The DVC metric: the numbers that compare, the same values, nothing descriptive (counts, implementations)
    compared = json.loads(scores.read_text())
    assert compared == {**{k: record[k] for k in ("BLEU", "NIST", "ROUGE_L", "CIDEr", "SER")},
                        "base": {k: record["base"][k] for k in ("BLEU", "NIST", "ROUGE_L", "CIDEr", "SER")}}
    table = calls[0]
    metrics = mlflow_metrics(record, ["BLEU", "NIST", "ROUGE_L", "CIDEr"])  # what the register stage logs
    assert metrics["SER"] == 0.0 and metrics["base.SER"] == 4 / 6 and metrics["base.BLEU"] == record["base"]["BLEU"]
    assert table["base_slot_errors"].tolist() == ["missing: name, area", "wrong: food=Italian, familyFriendly=no"]
    captured = capsys.readouterr()
    assert "SER: 0.0000" in captured.out and "base model alone (no adapter):" in captured.out
    assert "SER 0.0000 (base alone: BLEU" in captured.err


def test_evaluate_stage_refuses_a_base_file_of_another_length(tmp_path, capsys):
    from steps import evaluate

    write_stage_inputs(tmp_path, MRS, [["a"], ["b"]], GOOD, BAD[:1])
    argv = [str(tmp_path / "refs.txt"), str(tmp_path / "preds.txt"), "--no_meteor", "--base_pred_file", str(tmp_path / "base.txt")]
    assert evaluate.main(argv) == 2
    assert "has no prediction" in capsys.readouterr().err
