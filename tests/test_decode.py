"""The decode stage: scorer-file layouts, dedup + broadcast, adapter loading, and the CLI end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import pinned_threads

import steps.decode as decode
from benchmarks.bench_decode import reference_search
from steps.core.common import InputError
from steps.decoding.beam import BeamConfig, beam_search
from steps.decoding.scorer_files import clean_text, read_predictions, write_scorer_files
from steps.decoding.scorer_files import main as decode_text_main
from steps.formats.checkpoints import adapter_config, base_identity, read_tensors, save_adapter, save_hf_checkpoint
from steps.model.gpt2 import CARDS, GPT2, GPT2Config
from steps.model.lora import LoRAConfig
from steps.model.tokenizer import EOS_ID, get_tokenizer


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


FORMATTED = [
    {"context": "name : A | food : B", "completion": "A serves B ."},
    {"context": "name : A | food : B", "completion": "B at A .<|endoftext|>junk"},
    {"context": "name : C", "completion": "C is here .\n\nstale"},
    {"context": "name : A | food : B", "completion": "  A has B .  "},
    {"context": "name : D", "completion": "D ."},
]


# ----------------------------------------------------------------------------------------------- decode_text


def test_e2e_layout_groups_by_context_in_first_appearance_order(tmp_path):
    inp = write_jsonl(tmp_path / "test.jsonl", FORMATTED)
    preds = {0: "p0", 1: "p1", 2: "p2", 3: "p3", 4: "p4"}
    groups, refs = write_scorer_files(inp, preds, tmp_path / "refs.txt", tmp_path / "preds.txt")
    assert (groups, refs) == (3, 5)
    assert (tmp_path / "refs.txt").read_text() == "A serves B .\nB at A .\nA has B .\n\nC is here .\n\nD .\n\n"
    assert (tmp_path / "preds.txt").read_text() == "p3\np2\np4\n"  # a later line of the same context overwrites


def test_multi_reference_layout_pads_with_reference_zero(tmp_path):
    inp = write_jsonl(tmp_path / "test.jsonl", FORMATTED)
    preds = {i: f"Pred {i}, done." for i in range(5)}
    write_scorer_files(inp, preds, tmp_path / "refs", tmp_path / "preds.txt", ref_type="webnlg", ref_num=3,
                       lower=True, tokenize=True)
    ref = [(tmp_path / "refs" / f"reference{i}").read_text().splitlines() for i in range(3)]
    assert ref[0] == ["a serves b .", "c is here .", "d ."]
    assert ref[1] == ["b at a .", "c is here .", "d ."]
    assert ref[2] == ["a has b .", "c is here .", "d ."]
    assert (tmp_path / "preds.txt").read_text().splitlines() == ["pred 3 , done .", "pred 2 , done .", "pred 4 , done ."]
    assert not (tmp_path / "refs" / "reference3").exists()


def test_filter_seen_unseen_and_ref_unique(tmp_path):
    rows = [dict(r, cate=i % 2 == 0) for i, r in enumerate(FORMATTED)]
    inp = write_jsonl(tmp_path / "test.jsonl", rows)
    preds = {i: f"p{i}" for i in range(5)}
    # unseen = lines 1 and 3 (cate false), both with the context "name : A | food : B": one group of two references
    write_scorer_files(inp, preds, tmp_path / "r.txt", tmp_path / "p.txt", filter="unseen")
    assert (tmp_path / "r.txt").read_text() == "B at A .\nA has B .\n\n"
    assert (tmp_path / "p.txt").read_text() == "p3\n"
    write_scorer_files(inp, preds, tmp_path / "r.txt", tmp_path / "p.txt", filter="seen")
    assert (tmp_path / "r.txt").read_text() == "A serves B .\n\nC is here .\n\nD .\n\n"
    with pytest.raises(InputError, match='boolean "cate"'):
        write_scorer_files(write_jsonl(tmp_path / "t2.jsonl", FORMATTED), preds, tmp_path / "r.txt", tmp_path / "p.txt",
                           filter="seen")
    unique = tmp_path / "unique.txt"
    unique.write_text("7\n7\n8\n9\n9\n")  # --ref_unique_file regroups lines regardless of the context string
    write_scorer_files(write_jsonl(tmp_path / "t2.jsonl", FORMATTED), preds, tmp_path / "r2.txt", tmp_path / "p2.txt",
                       ref_unique_file=unique)
    assert (tmp_path / "r2.txt").read_text() == "A serves B .\nB at A .\n\nC is here .\n\nA has B .\nD .\n\n"
    assert (tmp_path / "p2.txt").read_text() == "p1\np2\np4\n"


def test_missing_predictions_are_listed(tmp_path):
    inp = write_jsonl(tmp_path / "test.jsonl", FORMATTED)
    with pytest.raises(InputError, match=r"2 of 3 inputs have no prediction \(input line ids: 2, 4\)"):
        write_scorer_files(inp, {0: "x"}, tmp_path / "r.txt", tmp_path / "p.txt")
    with pytest.raises(InputError, match="outside the input file"):
        write_scorer_files(inp, {0: "x", 2: "y", 4: "z", 9: "w"}, tmp_path / "r.txt", tmp_path / "p.txt")
    assert not (tmp_path / "r.txt").exists()


def test_original_token_id_samples_decode_like_ours(tmp_path):
    tok = get_tokenizer()
    inp = write_jsonl(tmp_path / "test.jsonl", FORMATTED)
    texts = {0: " The A .", 2: " C, near the river.", 4: " D"}
    eval_len = 20
    original, ours = [], []
    for i, text in texts.items():
        ids = tok.encode(text) + [EOS_ID]
        original.append({"id": i, "predict": ids + [0] * (eval_len - len(ids))})  # trailing zeros, as the original
        ours.append({"id": i, "context": FORMATTED[i]["context"], "prediction": text.strip()})
    ours[1]["prediction"] = "stale"
    ours.append({"id": 2, "context": "", "prediction": "C, near the river."})  # later record for an id overwrites
    assert read_predictions(write_jsonl(tmp_path / "orig.jsonl", original)) == {0: "The A .", 2: "C, near the river.", 4: "D"}
    assert read_predictions(write_jsonl(tmp_path / "ours.jsonl", ours)) == read_predictions(tmp_path / "orig.jsonl")
    unfinished = tok.encode(" runs on and on")  # no eos: every token is kept
    assert read_predictions(write_jsonl(tmp_path / "u.jsonl", [{"id": 0, "predict": unfinished}])) == {0: "runs on and on"}
    code = decode_text_main(["--sample_file", str(tmp_path / "orig.jsonl"), "--input_file", str(inp),
                             "--output_ref_file", str(tmp_path / "r.txt"), "--output_pred_file", str(tmp_path / "p.txt")])
    assert code == 0 and (tmp_path / "p.txt").read_text() == "The A .\nC, near the river.\nD\n"


def test_decode_text_cli_errors_exit_2(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "test.jsonl", FORMATTED)
    sample = write_jsonl(tmp_path / "s.jsonl", [{"id": 0, "prediction": "x"}])
    code = decode_text_main(["--sample_file", str(sample), "--input_file", str(inp), "--output_ref_file",
                             str(tmp_path / "r.txt"), "--output_pred_file", str(tmp_path / "p.txt")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "input line ids: 2, 4" in err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": [1, 2], "completion": [3]}])
    with pytest.raises(InputError, match="formatted JSONL, not the encoded one"):
        write_scorer_files(bad, {0: "x"}, tmp_path / "r.txt", tmp_path / "p.txt")


def test_clean_text_matches_the_original_rule():
    assert clean_text(" a b <|endoftext|> c\n\nd") == "a b"
    assert clean_text(" a\n\nb <|endoftext|>") == "a"
    assert clean_text("!!!") == "!!!"


def test_real_e2e_test_set_groups_like_the_official_references(shared_data, tmp_path):
    """test.txt has 4,693 lines for 630 MRs; our grouping gives the official reference file's group sizes, in order."""
    rows = []
    for line in (shared_data / "e2e" / "test.txt").read_text(encoding="utf-8").splitlines():
        context, completion = line.strip().split("||")[:2]
        rows.append({"context": context, "completion": completion})
    inp = write_jsonl(tmp_path / "test.jsonl", rows)
    preds = {i: r["context"] for i, r in enumerate(rows)}
    groups, refs = write_scorer_files(inp, preds, tmp_path / "refs.txt", tmp_path / "preds.txt")
    assert (groups, refs) == (630, 4693)
    ours = (tmp_path / "refs.txt").read_text(encoding="utf-8").split("\n\n")[:-1]
    official = (shared_data / "e2e-eval" / "e2e_test_refs.txt").read_text(encoding="utf-8").strip("\n").split("\n\n")
    assert [len(g.splitlines()) for g in ours] == [len(g.splitlines()) for g in official]
    assert len((tmp_path / "preds.txt").read_text(encoding="utf-8").splitlines()) == 630


# ----------------------------------------------------------------------------------------------- search schedule


def peaky_model(vocab: int = 30, seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    model = GPT2(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=vocab, n_positions=64)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not (name.endswith("bias") or "ln_" in name):
                p.normal_(0, 0.6)
    return model


def test_one_search_per_unique_query_broadcast_to_every_line(monkeypatch):
    model = peaky_model()
    lines = [[1, 2, 3], [4, 5], [1, 2, 3], [6], [4, 5], [1, 2, 3], [7, 8, 9, 10]]
    cfg = BeamConfig(beam=3, eval_len=6, eos_token_ids=(0,), length_penalty=0.8)
    searched: list[tuple[int, ...]] = []

    def counting(model_, batch, cfg_):
        searched.extend(batch)
        return beam_search(model_, batch, cfg_)

    monkeypatch.setattr(decode, "beam_search", counting)
    fast = decode.search_queries(model, lines, cfg, batch_size=2)
    assert sorted(searched) == sorted({tuple(q) for q in lines}) and len(searched) == 4
    assert [len(q) for q in searched] == sorted((len(q) for q in searched), reverse=True)  # longest first
    searched.clear()
    reference = reference_search(model, lines, cfg)  # every line, batch 1, no early stop
    assert len(searched) == len(lines)
    assert [h.tokens for h in fast] == [h.tokens for h in reference]
    assert fast[0] is fast[2] is fast[5] and fast[1] is fast[4]


def test_bf16_autocast_runs_and_agrees_on_a_confident_model():
    model = peaky_model(seed=3)
    lines = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    cfg = BeamConfig(beam=3, eval_len=6, eos_token_ids=(0,), length_penalty=0.8)
    fp32 = decode.search_queries(model, lines, cfg, precision="fp32")
    bf16 = decode.search_queries(model, lines, cfg, precision="bf16")
    assert [h.tokens for h in bf16] == [h.tokens for h in fp32]
    assert [h.score for h in bf16] == pytest.approx([h.score for h in fp32], abs=0.1)


def test_make_query_left_truncates():
    assert decode.make_query(list(range(10)), seq_len=8, eval_len=4) == [6, 7, 8, 9]
    assert decode.make_query([1, 2], seq_len=8, eval_len=4) == [1, 2]
    with pytest.raises(InputError):
        decode.make_query([1], seq_len=4, eval_len=4)


def test_generate_texts_dedupes_and_cuts():
    torch.manual_seed(0)
    model = GPT2(CARDS["gpt2.tiny"]).eval()
    contexts = ["name : Blue Spice | Type : pub", "name : Zizzi", "name : Blue Spice | Type : pub"]
    cfg = BeamConfig(beam=2, eval_len=4, length_penalty=0.8, eos_token_ids=(EOS_ID, 628))
    out = decode.generate_texts(model, contexts, cfg, batch_size=2)
    assert len(out) == 3 and out[0] == out[2]
    assert all("<|endoftext|>" not in t and "\n\n" not in t and t == t.strip() for t in out)


# ----------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A random gpt2.tiny base and a random (non-zero) LoRA adapter saved the way the trainer saves them."""
    root = tmp_path_factory.mktemp("decode")
    torch.manual_seed(0)
    base = GPT2(CARDS["gpt2.tiny"])
    with torch.no_grad():  # a peakier random base than GPT-2's init: context-dependent, few near-ties in the beam
        for name, p in base.named_parameters():
            if not (name.endswith("bias") or "ln_" in name):
                p.normal_(0, 0.2)
        base.wte.weight[[EOS_ID, 628]] = 0  # near-uniform eos: a random model would otherwise stop at once (empty text)
    save_hf_checkpoint(base, root / "base.safetensors")
    model = GPT2(CARDS["gpt2.tiny"], LoRAConfig(r=4, alpha=32))
    model.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        for block in model.h:
            block.attn.c_attn.lora_B.normal_(0, 0.2)
    save_adapter(model, root / "adapter", adapter_config(model, "gpt2.tiny", base_identity(root / "base.safetensors"), step=5))
    tok = get_tokenizer()
    rows = [{"context": c, "completion": r} for c, r in [
        ("name : Blue Spice | Type : coffee shop", "Blue Spice is a coffee shop ."),
        ("name : Blue Spice | Type : coffee shop", "A coffee shop called Blue Spice ."),
        ("name : Zizzi | area : riverside", "Zizzi is by the river ."),
        ("name : Blue Spice | Type : coffee shop", "Blue Spice serves coffee ."),
    ]]
    write_jsonl(root / "test_formatted.jsonl", rows)
    write_jsonl(root / "test.jsonl", [{"context": tok.encode(r["context"]) + [EOS_ID],
                                      "completion": tok.encode(" " + r["completion"]) + [EOS_ID]} for r in rows])
    return root, model


def decode_cli(root: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "steps.decode", "--data", str(root / "test.jsonl"), "--adapter", str(root / "adapter"),
            "--init_checkpoint", str(root / "base.safetensors"), "--beam", "3", "--eval_len", "8", "--batch_size", "2",
            "--length_penalty", "0.8", "--eos_token_id", "628", "--device", "cpu", *extra]
    return subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300, env=env)


def test_decode_cli_end_to_end(trained, tmp_path):
    root, lora_model = trained
    out = tmp_path / "out"
    with pinned_threads() as env:  # the CLI's predictions are compared with an in-process search: same thread count
        done = decode_cli(root, "--input_file", str(root / "test_formatted.jsonl"), "--work_dir", str(out),
                          "--output_file", "predict.jsonl", env=env)
    assert done.returncode == 0, done.stderr
    assert "4 lines, 2 unique queries, beam 3" in done.stdout and "MRs/s" in done.stdout
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [0, 1, 2, 3]
    assert preds[0]["context"] == "name : Blue Spice | Type : coffee shop"
    assert preds[0]["prediction"] == preds[1]["prediction"] == preds[3]["prediction"]
    assert preds[0]["prediction"] and preds[2]["prediction"] and preds[0]["prediction"] != preds[2]["prediction"]
    # The same search in-process with the unmerged LoRA model: the CLI loaded base + adapter and merged correctly.
    cfg = BeamConfig(beam=3, eval_len=8, length_penalty=0.8, eos_token_ids=(EOS_ID, 628))
    with pinned_threads():
        expected = decode.generate_texts(lora_model.eval(), [p["context"] for p in preds], cfg)
    assert [p["prediction"] for p in preds] == expected
    # Scorer files: 2 groups; and the original-format file decodes to the same predictions.
    refs = (out / "refs.txt").read_text()
    assert refs == ("Blue Spice is a coffee shop .\nA coffee shop called Blue Spice .\nBlue Spice serves coffee .\n\n"
                    "Zizzi is by the river .\n\n")
    assert (out / "preds.txt").read_text().splitlines() == [expected[0], expected[2]]
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]  # the one record per MR
    assert [(e["id"], e["prediction"], len(e["references"])) for e in examples] == [(0, expected[0], 3), (2, expected[2], 1)]
    original = [json.loads(line) for line in (out / "predict.jsonl").read_text().splitlines()]
    assert all(len(o["predict"]) == 8 for o in original)
    assert read_predictions(out / "predict.jsonl") == {p["id"]: p["prediction"] for p in preds}


def test_adapter_is_applied_and_base_mismatch_refused(trained, tmp_path):
    root, lora_model = trained
    merged = decode.load_for_inference(root / "adapter", root / "base.safetensors")
    plain = decode.load_for_inference(None, root / "base.safetensors", model_card="gpt2.tiny")
    ids = torch.tensor([[1, 2, 3, EOS_ID]])
    with torch.no_grad():
        assert torch.allclose(merged(ids), lora_model.eval()(ids), atol=1e-4)
        assert not torch.allclose(merged(ids), plain(ids), atol=1e-2)
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    save_hf_checkpoint(GPT2(CARDS["gpt2.tiny"]), other)
    with pytest.raises(InputError, match="trained on base sha256"):
        decode.load_for_inference(root / "adapter", other)
    decode.load_for_inference(root / "adapter", other, ignore_base_mismatch=True)
    with pytest.raises(InputError, match="contradict the adapter config"):
        decode.load_for_inference(root / "adapter", root / "base.safetensors", lora_alpha=128)
    done = decode_cli(root, "--work_dir", str(tmp_path / "o"), "--init_checkpoint", str(other))
    assert done.returncode == 2 and done.stderr.startswith("error:") and "Traceback" not in done.stderr


def test_original_format_lora_checkpoints(trained, tmp_path):
    """A LoRA-only `model.<step>.pt` (module.transformer.* keys) and a full original checkpoint both decode."""
    root, lora_model = trained
    lora = {f"module.transformer.{k}": v for k, v in lora_model.state_dict().items() if "lora_" in k}
    torch.save(lora, tmp_path / "model.5.pt")
    ids = torch.tensor([[5, 6, 7, EOS_ID]])
    with torch.no_grad():
        expected = lora_model.eval()(ids)
        got = decode.load_for_inference(tmp_path / "model.5.pt", root / "base.safetensors", lora_alpha=32)(ids)
        assert torch.allclose(got, expected, atol=1e-4)
        with pytest.raises(InputError, match="lora_alpha"):
            decode.load_for_inference(tmp_path / "model.5.pt", root / "base.safetensors")
        # end-of-epoch file: the whole (HF-layout) state dict plus LoRA, under DDP names, in the trainer's wrapper
        full = {f"module.transformer.{k}": v for k, v in read_tensors(root / "base.safetensors").items()} | lora
        torch.save({"model_state_dict": full}, tmp_path / "model.10.pt")
        got = decode.load_for_inference(None, tmp_path / "model.10.pt", lora_alpha=32)(ids)
        assert torch.allclose(got, expected, atol=1e-4)
