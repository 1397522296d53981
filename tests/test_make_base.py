"""The base stage: a random init, or a language model pretrained on the sample's corpus with the trainer's
full-training mode; skipped when the fine-tuning starts from other weights."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from steps import make_base
from steps.checkpoints import sha256_file
from steps.sample_data import pretraining_corpus, write_corpus


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "pretrain.txt"
    write_corpus(pretraining_corpus(0, 90, set()), path)
    return path


def pretrain_args(corpus_file, output, *extra: str) -> list[str]:
    return ["--model_card", "gpt2.tiny", "--seed", "0", "--output", str(output), "--corpus", str(corpus_file),
            "--updates", "8", "--batch_size", "2", "--pack", "4", "--lr", "0.01", "--warmup", "2", "--valid_texts", "16",
            "--precision", "fp32", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(corpus_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("base") / "model.safetensors"
    assert make_base.main(pretrain_args(corpus_file, output, "--for_checkpoint", str(output))) == 0
    return output


@pytest.mark.slow  # the shared `pretrained` fixture: about 30 s
def test_pretraining_reduces_the_held_out_lm_loss(pretrained):
    summary = json.loads((pretrained.parent / make_base.SUMMARY_FILE).read_text())
    assert summary["updates"] == 8 and summary["train_texts"] == 74 and summary["held_out_texts"] == 16 and summary["pack"] == 4
    # Measured on texts the training never saw, against the same model before its first update.
    assert summary["held_out_loss"] < summary["held_out_loss_init"] - 0.5
    for log in make_base.LOGS:
        assert (pretrained.parent / log).read_text().startswith("step,")


@pytest.mark.slow  # the shared `pretrained` fixture: about 30 s
def test_pretrained_base_is_a_full_hf_checkpoint_that_differs_from_the_init(pretrained, tmp_path):
    random_init = tmp_path / "init.safetensors"
    assert make_base.main(["--model_card", "gpt2.tiny", "--seed", "0", "--output", str(random_init)]) == 0
    trained, init = load_file(pretrained), load_file(random_init)
    assert trained.keys() == init.keys() and not any(".lora_" in k for k in trained)
    assert not trained["wte.weight"].equal(init["wte.weight"])
    assert held_out(pretrained) < held_out(random_init)


def held_out(checkpoint) -> float:
    """The stage's own measure, recomputed: token-mean NLL on fresh corpus texts (not the held-out ones)."""
    import tempfile
    from pathlib import Path

    texts = [text for _, text in pretraining_corpus(9, 20, set())]
    with tempfile.TemporaryDirectory() as tmp:
        _, valid = make_base.encode_corpus(texts[:10], texts[10:], Path(tmp))
        return make_base.held_out_loss(checkpoint, "gpt2.tiny", valid)


def test_no_pretraining_when_the_finetuning_starts_from_other_weights(corpus_file, tmp_path, capsys):
    """init_checkpoint elsewhere (real GPT-2 weights): the stage writes the random init only, in a second."""
    skipped, plain = tmp_path / "skipped" / "model.safetensors", tmp_path / "plain" / "model.safetensors"
    real = tmp_path / "gpt2-medium" / "model.safetensors"
    assert make_base.main(pretrain_args(corpus_file, skipped, "--for_checkpoint", str(real))) == 0
    assert "not pretrained (the fine-tuning starts from" in capsys.readouterr().out
    assert make_base.main(["--model_card", "gpt2.tiny", "--seed", "0", "--output", str(plain)]) == 0
    assert sha256_file(skipped) == sha256_file(plain)  # the seeded random init, byte for byte
    assert not (skipped.parent / make_base.SUMMARY_FILE).exists()


def test_too_small_corpus_is_a_clear_error(tmp_path, capsys):
    corpus = tmp_path / "pretrain.txt"
    corpus.write_text("The Eagle is a pub .\n")
    assert make_base.main(pretrain_args(corpus, tmp_path / "model.safetensors")) == 2
    assert "held-out texts" in capsys.readouterr().err
