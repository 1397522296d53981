"""scripts/show_predictions.py: the README's sample of the default run, read from the decode stages' files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
try:
    import show_predictions
finally:
    sys.path.pop(0)

MR_A = "name : The Eagle | Type : pub | food : Italian | area : riverside"
MR_B = "name : Bibimbap House | Type : restaurant | food : Chinese | area : city centre"


def write_predictions(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "context": c, "prediction": p}) + "\n" for i, (c, p) in enumerate(pairs)))
    return path


def test_one_block_per_mr_with_both_models_and_their_slot_errors(tmp_path, capsys):
    adapted = write_predictions(tmp_path / "adapted.jsonl", [
        (MR_A, "The Eagle is an Italian pub by the riverside ."), (MR_A, "The Eagle is an Italian pub by the riverside ."),
        (MR_B, "Bibimbap House is a restaurant in the city centre ."),
    ])  # fmt: skip
    base = write_predictions(tmp_path / "base.jsonl", [(MR_A, "The ."), (MR_A, "The ."), (MR_B, "The .")])
    assert show_predictions.main(["--predictions", str(adapted), "--base_predictions", str(base), "-n", "5"]) == 0
    out = capsys.readouterr().out
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 2  # an MR's several test lines share one prediction: shown once
    assert blocks[0].splitlines() == [
        f"MR:      {MR_A}",
        "adapted: The Eagle is an Italian pub by the riverside .   [no slot error]",
        "base:    The .   [missing: name, eatType, food, area]",
    ]
    assert "adapted: Bibimbap House is a restaurant in the city centre .   [missing: food]" in blocks[1]


def test_without_base_predictions_only_the_adapted_model_is_shown(tmp_path, capsys):
    adapted = write_predictions(tmp_path / "adapted.jsonl", [(MR_A, "The Eagle ."), (MR_B, "x")])
    assert show_predictions.main(["--predictions", str(adapted), "--base_predictions", str(tmp_path / "none.jsonl"),
                                  "-n", "1"]) == 0
    assert "base:" not in (out := capsys.readouterr().out) and out.count("MR:") == 1


def test_missing_predictions_file_is_a_clear_error(tmp_path, capsys):
    assert show_predictions.main(["--predictions", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err

