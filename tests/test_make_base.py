"""The stand-in base: the seeded random init, a build (loss over the corpus's tokens, rows it never uses left as
initialised, resumable, with its manifest), and the shipped file: what its manifest says, and that it copies."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from steps import make_base
from steps.core.common import sha256_file

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data/base/standin.safetensors"
SMALL_BUILD = ["--documents", "400", "--held_out", "40", "--batch_size", "4", "--window", "32", "--lr", "0.01",
               "--warmup", "2", "--probe_every", "1000", "--storage", "fp32"]  # fmt: skip


def test_random_init_is_seeded_and_in_hf_layout(tmp_path):
    a, b, c = (tmp_path / f"{name}.safetensors" for name in "abc")
    for path, seed in ((a, "0"), (b, "0"), (c, "1")):
        assert make_base.main(["--output", str(path), "--seed", seed]) == 0
    assert sha256_file(a) == sha256_file(b) != sha256_file(c)
    tensors = load_file(a)
    assert tensors["wte.weight"].shape == (50257, 128) and "h.0.attn.c_attn.weight" in tensors


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    output = out / "standin.safetensors"
    assert make_base.main(["--output", str(output), "--updates", "30", "--work_dir", str(out / "work"), *SMALL_BUILD]) == 0
    return output


def test_build_lowers_the_held_out_loss_and_writes_its_manifest(small_build):
    manifest = json.loads(make_base.manifest_path(small_build).read_text())
    assert manifest["sha256"] == sha256_file(small_build)
    assert manifest["held_out_loss"] < manifest["held_out_loss_init"] - 0.5  # measured 7.29 -> 6.32 in these 30 updates
    assert manifest["settings"]["updates"] == 30 and manifest["command"].startswith("python -m steps.make_base --output")
    assert manifest["built_on"]["cpu"]["model"] and manifest["built_on"]["threads"] == 1
    assert manifest["copy_probe"]["records"] == manifest["copy_probe_unseen_domain"]["records"] == 100
    assert len(manifest["loss_vocab"]) > 100
    assert not (small_build.parent / "work" / make_base.STATE_FILE).exists()  # a finished build leaves no resume state


def test_rows_outside_the_corpus_are_exactly_the_init(small_build, tmp_path):
    """Tokens the corpus never uses, and positions past the window, keep their initial values to the bit."""
    init = tmp_path / "init.safetensors"
    assert make_base.main(["--output", str(init)]) == 0
    built, start = load_file(small_build), load_file(init)
    used = torch.tensor(json.loads(make_base.manifest_path(small_build).read_text())["loss_vocab"])
    unused = torch.ones(50257, dtype=torch.bool)
    unused[used] = False
    assert built["wte.weight"][unused].equal(start["wte.weight"][unused])
    assert not built["wte.weight"][used].equal(start["wte.weight"][used])
    assert built["wpe.weight"][32:].equal(start["wpe.weight"][32:]) and not built["wpe.weight"][:32].equal(start["wpe.weight"][:32])


@pytest.mark.slow  # three small builds in subprocesses: about 40 s
def test_an_interrupted_build_resumes_to_the_same_bytes(tmp_path):
    """Killed after a resume state was written, a rerun continues from it and ends with the uninterrupted build's file."""
    args = ["--updates", "40", "--save_every", "10", *SMALL_BUILD]
    straight = tmp_path / "straight.safetensors"
    assert make_base.main(["--output", str(straight), "--work_dir", str(tmp_path / "w1"), *args]) == 0
    resumed, work = tmp_path / "resumed.safetensors", tmp_path / "w2"
    cmd = [sys.executable, "-m", "steps.make_base", "--output", str(resumed), "--work_dir", str(work), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (work / make_base.STATE_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (work / make_base.STATE_FILE).exists() and not resumed.exists()
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    assert "resuming at update" in run.stdout
    assert sha256_file(resumed) == sha256_file(straight)


def test_a_resume_state_of_other_settings_is_refused(tmp_path, capsys):
    work = tmp_path / "work"
    settings = make_base.BuildSettings(documents=400, held_out=40, updates=10, batch_size=4, window=32)
    model = make_base.random_model(settings)
    optimizer = make_base.AdamW(model.parameters())
    make_base.save_state(work / make_base.STATE_FILE, settings, model, optimizer, torch.Generator(), {"step": 5, "curve": [], "seconds": 0.0})
    assert make_base.main(["--output", str(tmp_path / "b.safetensors"), "--work_dir", str(work), "--updates", "12", *SMALL_BUILD]) == 2
    assert "a build with other settings" in capsys.readouterr().err


def test_bad_settings_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "b.safetensors")
    assert make_base.main(["--output", out, "--updates", "5"]) == 2
    assert "needs --work_dir" in capsys.readouterr().err
    assert make_base.main(["--output", out, "--window", "1024"]) == 2
    assert "--window 1024 must be below" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the shipped base


def shipped_manifest() -> dict:
    return json.loads(make_base.manifest_path(SHIPPED).read_text())


def test_the_shipped_base_is_what_its_manifest_says():
    manifest = shipped_manifest()
    assert manifest["format"] == make_base.MANIFEST_FORMAT and manifest["sha256"] == sha256_file(SHIPPED)
    assert manifest["command"].startswith("python -m steps.make_base ")
    tensors = load_file(SHIPPED)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())  # half the bytes of fp32
    assert manifest["built_on"]["cpu"]["model"] and manifest["built_on"]["torch"]


@pytest.mark.slow  # two hundred greedy decodes of the shipped base: about 20 s
def test_the_shipped_base_copies_names_from_records_it_never_saw():
    """The copy probe, rerun on the shipped file: no adapter, records whose invented names no document holds; nearly
    every one of the corpus's domains gets its name into the text, and the unseen domain gives the manifest's count."""
    from steps.decode import load_for_inference

    manifest = shipped_manifest()
    model = load_for_inference(None, SHIPPED, model_card=manifest["settings"]["model_card"])
    known = make_base.copy_probe(model, new_tokens=24, unseen_domain=False)
    assert known["rate"] >= 0.9, known["examples"]
    assert abs(known["copied"] - manifest["copy_probe"]["copied"]) <= 3  # the manifest's own count, up to argmax ties
    unseen = make_base.copy_probe(model)
    assert abs(unseen["copied"] - manifest["copy_probe_unseen_domain"]["copied"]) <= 3


def loss_vocab() -> set[int]:
    return set(shipped_manifest()["loss_vocab"])


@pytest.mark.slow  # beam 10 over the sample's 24 test MRs with the base alone: about 15 s
def test_rows_the_corpus_never_used_never_win_when_decoding_the_test_set():
    """The shipped base keeps GPT-2's 50,257 rows, but only the corpus's few thousand were trained: decoding the
    default test set (the pipeline's beam settings, no adapter) emits none of the others."""
    import yaml

    from steps import sample_data
    from steps.decode import load_for_inference, search_queries
    from steps.decoding.beam import BeamConfig
    from steps.model.tokenizer import EOS_ID, get_tokenizer

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    sample, decode = params["sample"], params["decode"]
    test = sample_data.generate_sample(sample["seed"], sample["train_mrs"], sample["valid_mrs"], sample["test_mrs"])["test"]
    tokenizer = get_tokenizer()
    queries = [tokenizer.encode(mr) + [EOS_ID] for mr in dict.fromkeys(mr for mr, _ in test)]
    cfg = BeamConfig(beam=decode["beam"], eval_len=decode["eval_len"], length_penalty=decode["length_penalty"],
                     no_repeat_ngram_size=decode["no_repeat_ngram_size"], eos_token_ids=(EOS_ID, decode["eos_token_id"]))
    model = load_for_inference(None, SHIPPED, model_card=shipped_manifest()["settings"]["model_card"])
    emitted = {token for hyp in search_queries(model, queries, cfg, precision="fp32") for token in hyp.tokens}
    assert len(emitted) > 20 and emitted <= loss_vocab() | {EOS_ID}, sorted(emitted - loss_vocab())
