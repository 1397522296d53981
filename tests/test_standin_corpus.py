"""The stand-in base's pretraining corpus: copying is the only way to predict its names, it never pairs a restaurant
MR with its text, it keeps the probe's domain out, and a seed gives the same documents everywhere."""

from __future__ import annotations

import random

from steps import sample_data
from steps.datasets import standin_corpus


def test_same_seed_same_documents_other_seed_others():
    assert standin_corpus.documents(0, 300) == standin_corpus.documents(0, 300)
    assert standin_corpus.documents(0, 100) == standin_corpus.documents(0, 300)[:100]
    assert standin_corpus.documents(1, 100) != standin_corpus.documents(0, 100)


def test_record_texts_state_every_field_of_their_record():
    """A record document: the record, a newline, then a text in which every value of the record appears."""
    rng = random.Random(7)
    for _ in range(300):
        record, parts = rng.choice(standin_corpus.DOMAINS)(rng)
        text = standin_corpus.sentences(parts)
        missing = [v for v in record.values() if v not in text]
        assert not missing, (record, text)


def test_names_are_invented_so_they_must_be_copied():
    """Thousands of distinct names in a few thousand documents: no name is common enough to memorise."""
    rng = random.Random(3)
    names = [rng.choice(standin_corpus.DOMAINS)(rng)[0].get("name") for _ in range(3000)]
    names = [n for n in names if n]
    assert len(set(names)) > 0.95 * len(names)


def test_no_restaurant_mr_and_no_split_reference_in_the_corpus():
    """The E2E MR syntax never appears (the adapter learns the MR -> text task), nor any reference of the sample."""
    docs = standin_corpus.documents(0, 3000)
    assert not any(" : " in d or " | " in d or "||" in d for d in docs)
    references = {ref for lines in sample_data.generate_sample(0, 600, 30, 24).values() for _, ref in lines}
    assert not any(part in references for d in docs for part in d.split("\n"))
    restaurant_docs = [d for d in docs if "\n" not in d]
    assert 0.2 < len(restaurant_docs) / len(docs) < 0.4  # RESTAURANT_SHARE, with the records as the rest


def test_the_probe_domain_is_held_out():
    docs = standin_corpus.documents(0, 3000)
    assert not any("launched" in d or "home port" in d for d in docs)
    probes = standin_corpus.probe_records(0, 20)
    assert len({name for _, name in probes}) == 20
    assert all(prompt.endswith("\n") and (" " + name) in prompt and " " not in name for prompt, name in probes)
    known = standin_corpus.probe_records(0, 50, unseen_domain=False)
    records = {prompt for prompt, _ in known}
    assert len(records) == 50 and not any(doc.startswith(record) for doc in docs for record in records)  # none is in the corpus


def test_same_documents_whatever_the_string_hashing():
    """No set order leaks into the corpus: two processes with different hash seeds write the same documents."""
    import os
    import subprocess
    import sys

    code = "from steps.datasets import standin_corpus as c; print(repr(c.documents(0, 200)))"
    outputs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, check=True,
                              capture_output=True, text=True).stdout for seed in ("1", "2")}
    assert len(outputs) == 1


def test_the_corpus_holds_every_token_of_the_sample_references():
    """The base trains only the rows of its corpus's tokens (steps.make_base); the adapter can write only what the
    base can, so every token of every reference of the default sample must be among them."""
    from steps.model.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    corpus_tokens = {t for doc in standin_corpus.documents(0, 60_000) for t in tokenizer.encode(doc)}
    references = {ref for lines in sample_data.generate_sample(0, 600, 30, 24).values() for _, ref in lines}
    missing = {t for ref in references for t in tokenizer.encode(ref)} - corpus_tokens
    assert not missing, [tokenizer.decode([t]) for t in missing]
