"""GenerationEval's nltk word tokenisation, reproduced without nltk: expected tokens are nltk 3.5's (the version
GenerationEval pins) for the same lines, worked out from its Treebank rules."""

from __future__ import annotations

import pytest

from steps.metrics.webnlg_tokenize import tokenized_line, word_tokenize


@pytest.mark.parametrize(
    ("line", "tokens"),
    [
        # Whole words nltk splits even in tokenised text (any case).
        ("we cannot go", ["we", "can", "not", "go"]),
        ("Cannot", ["Can", "not"]),
        ("i am gonna win", ["i", "am", "gon", "na", "win"]),
        ("you gotta see", ["you", "got", "ta", "see"]),
        ("i wanna go", ["i", "wan", "na", "go"]),
        ("i wanna", ["i", "wan", "na"]),  # the line is padded with a space, so "wanna" at the end splits too
        ("gimme that", ["gim", "me", "that"]),
        ("lemme see", ["lem", "me", "see"]),
        # ... but only whole words.
        ("the cannon scannot gonnaa", ["the", "cannon", "scannot", "gonnaa"]),
        ("wanna-be", ["wanna-be"]),  # "wanna" needs whitespace after it
    ],
)
def test_contractions_are_split(line: str, tokens: list[str]) -> None:
    assert word_tokenize(line) == tokens


@pytest.mark.parametrize(
    ("line", "tokens"),
    [
        # Tokenised text (the recipe's --tokenize): every straight quote follows a space or starts the line, so nltk
        # reads each one as an opening quote.
        ('" the tower " is tall', ["``", "the", "tower", "``", "is", "tall"]),
        ('the " tower "', ["the", "``", "tower", "``"]),
        # Untokenised text: opening quotes (line start, after a space or a bracket) become ``, closing ones ''.
        ('he said "hi" to me', ["he", "said", "``", "hi", "''", "to", "me"]),
        ('("quoted")', ["(", "``", "quoted", "''", ")"]),
        ("it's ''fine''", ["it", "'s", "``", "fine", "''"]),
    ],
)
def test_straight_double_quotes_become_treebank_quotes(line: str, tokens: list[str]) -> None:
    assert word_tokenize(line) == tokens


@pytest.mark.parametrize(
    ("line", "tokens"),
    [
        ("the tower , which is 1,000 m tall , opened at 10:30 .",
         ["the", "tower", ",", "which", "is", "1,000", "m", "tall", ",", "opened", "at", "10:30", "."]),
        ("It isn't the U.S. Army's.", ["It", "is", "n't", "the", "U.S.", "Army", "'s", "."]),
        ("Wait... what?! (yes) -- no; $5 & 10% @home #1*",
         ["Wait", "...", "what", "?", "!", "(", "yes", ")", "--", "no", ";", "$", "5", "&", "10", "%", "@", "home", "#", "1", "*"]),
        ("the dogs' bowl", ["the", "dogs", "'", "bowl"]),
        ("'tis 'twas", ["'t", "is", "'t", "was"]),
        ("“Curly” «quotes»", ["“", "Curly", "”", "«", "quotes", "»"]),
        # One line is one sentence: only the line's final period is split off (nltk's Punkt would also split "Aarhus.").
        ("It serves Aarhus. It is in Denmark.", ["It", "serves", "Aarhus.", "It", "is", "in", "Denmark", "."]),
    ],
)
def test_untokenised_text(line: str, tokens: list[str]) -> None:
    assert word_tokenize(line) == tokens


def test_whitespace_of_any_kind_separates_and_nothing_is_left_empty() -> None:
    # nltk splits at every Unicode space, unlike the Perl BLEU script.
    assert word_tokenize("\u2009a\u00a0b\tc\r") == ["a", "b", "c"]
    assert word_tokenize("") == [] and word_tokenize("   ") == []
    assert tokenized_line('  we  cannot\u00a0say "no" ') == "we can not say `` no ''"
