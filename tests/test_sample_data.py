"""The synthetic E2E-style sample: deterministic, MR-disjoint splits, references that state their MR."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from itertools import groupby

import pytest

from steps.core.common import InputError
from steps.datasets import readers as datasets
from steps.sample_data import SLOT_ORDER, generate_sample, main


def parse_mr(rendered: str) -> dict[str, str]:
    return dict(part.split(" : ", 1) for part in rendered.split(" | "))


@pytest.fixture(scope="module")
def sample():
    return generate_sample(seed=0)


def test_sizes_and_timing():
    start = time.perf_counter()
    splits = generate_sample(seed=0)
    assert time.perf_counter() - start < 1.0
    assert 2000 <= len(splits["train"]) <= 4000
    assert 200 <= len(splits["valid"]) <= 600 and 200 <= len(splits["test"]) <= 600
    assert len({mr for mr, _ in splits["train"]}) == 600


def test_same_seed_same_bytes_across_processes(tmp_path):
    """Byte-identical files, even with different string hashing (no set order leaks out)."""
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        cmd = [sys.executable, "-m", "steps.sample_data", "--out_dir", str(out), "--seed", "7", "--train_mrs", "50"]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        outputs.append([(out / f"{name}.txt").read_bytes() for name in ("train", "valid", "test")])
    assert outputs[0] == outputs[1]


def test_different_seed_different_data(sample):
    assert generate_sample(seed=1) != sample
    assert generate_sample(seed=0) == sample


def test_splits_share_no_mr(sample):
    mrs = {split: {mr for mr, _ in lines} for split, lines in sample.items()}
    assert not mrs["train"] & mrs["valid"] and not mrs["train"] & mrs["test"] and not mrs["valid"] & mrs["test"]


def test_references_of_an_mr_are_contiguous_and_distinct(sample):
    for lines in sample.values():
        groups = [(mr, [ref for _, ref in group]) for mr, group in groupby(lines, key=lambda line: line[0])]
        assert len(groups) == len({mr for mr, _ in groups})  # each MR appears in one block
        assert all(len(refs) == len(set(refs)) for _, refs in groups)
    assert all(len(refs) >= 5 for _, refs in ((mr, [r for _, r in g]) for mr, g in groupby(sample["test"], key=lambda x: x[0])))


def test_mr_format_and_slot_order(sample):
    for mr, _ in sample["train"]:
        slots = parse_mr(mr)
        assert list(slots) == [s for s in SLOT_ORDER if s in slots]
        assert "name" in slots and len(slots) >= 3


def test_references_mention_their_values(sample):
    """Every reference names the venue, and states the area and the landmark when the MR has them."""
    for lines in sample.values():
        for mr, ref in lines:
            slots = parse_mr(mr)
            assert slots["name"] in ref
            if "near" in slots:
                assert slots["near"] in ref
            if "area" in slots:
                assert any(word in ref for word in ("city", "centre", "river")), ref
            if "price" in slots and "£" in slots["price"]:
                assert slots["price"].split("£")[1].strip() in ref
            if "food" in slots and slots["food"] != "Fast food":
                assert slots["food"] in ref
            assert ref.endswith(" .") and ref[0].isupper()


def test_references_use_the_text_files_tokenisation(sample):
    """Re-tokenising like the E2E text files changes nothing: the sample is already in that style."""
    for lines in sample.values():
        for mr, ref in lines:
            assert datasets.tokenize_e2e(ref) == ref
            assert all(datasets.tokenize_e2e(value) == value for value in parse_mr(mr).values())


def test_empty_split_is_a_clear_error():
    with pytest.raises(InputError, match="at least one MR"):
        generate_sample(seed=0, valid_mrs=0)


def test_cli_writes_mr_ref_lines(tmp_path, capsys):
    assert main(["--out_dir", str(tmp_path), "--seed", "3", "--train_mrs", "10", "--valid_mrs", "2", "--test_mrs", "2"]) == 0
    lines = (tmp_path / "train.txt").read_text(encoding="utf-8").splitlines()
    assert all(line.count("||") == 1 for line in lines)
    assert "sample_data: wrote train" in capsys.readouterr().out
