"""The word tokenisation GenerationEval applies before METEOR and TER, without nltk.

GenerationEval (the WebNLG/DART scorer the LoRA README points to) passes every hypothesis and reference through
`nltk.word_tokenize` (nltk 3.5, the version it pins) and re-joins the tokens with spaces. Even on text that is
already tokenised this changes a few things: some whole words are split (`cannot` -> `can not`, `gonna` ->
`gon na`, likewise `gotta`, `wanna`, `gimme`, `lemme`) and straight double quotes become Treebank quotes (two
backquotes when opening, two apostrophes when closing). Those change METEOR and TER, so we reproduce the tokeniser's
rules here, in the order nltk 3.5 applies them, on one line at a time.

What is not reproduced: `word_tokenize` first splits the text into sentences with the Punkt model (downloadable nltk
data), then tokenises each sentence. The only rule that depends on where a sentence ends is the one that splits off
a sentence-final period, so on an untokenised line holding several sentences nltk also separates the period of each
inner sentence ("Denmark. It" -> "Denmark . It") where we keep it attached ("Denmark." stays one token). Tokenised
text (the recipe's `--tokenize` output, where every period already stands alone) is not affected.
"""

from __future__ import annotations

import re

Rule = tuple[re.Pattern[str], str]


def _rules(*pairs: tuple[str, str]) -> tuple[Rule, ...]:
    return tuple((re.compile(pattern), replacement) for pattern, replacement in pairs)


# Opening quotes: typographic ones and runs of backquotes stand alone; a straight double quote (or two apostrophes)
# at the start of the line or after a space or an opening bracket becomes two backquotes; an apostrophe before a
# one-letter word that is not a clitic ('x, not 's 'm 'd 't) is split from it.
_OPENING_QUOTES = _rules(
    (r"([«“‘„]|`+)", r" \1 "),
    (r'^"', "``"),
    (r"(``)", r" \1 "),
    (r"""([ (\[{<])("|'')""", r"\1 `` "),
    (r"(?i)(')(?!re|ve|ll|m|t|s|d)(\w)\b", r"\1 \2"),
)

# The period that ends the line (unless it follows another period), possibly followed by closing brackets and
# quotes. nltk applies two variants of this rule (the first also accepts typographic closing quotes and spaces).
_FINAL_PERIOD_WIDE = r"""([^.])(\.)([\])}>"'»”’ ]*)\s*$"""
_FINAL_PERIOD_NARROW = r"""([^.])(\.)([\])}>"']*)\s*$"""

_PUNCTUATION = _rules(
    (_FINAL_PERIOD_WIDE, r"\1 \2 \3 "),
    (r"([:,])([^\d])", r" \1 \2"),  # a comma or colon not followed by a digit ("1,000" and "10:30" stay whole)
    (r"([:,])$", r" \1 "),
    (r"\.{2,}", r" \g<0> "),  # an ellipsis
    (r"[;@#$%&]", r" \g<0> "),
    (_FINAL_PERIOD_NARROW, r"\1 \2\3 "),
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),  # an apostrophe that closes a word ("the dogs' bowl")
    (r"\*", r" \g<0> "),
)

_BRACKETS = _rules((r"[\]\[(){}<>]", r" \g<0> "))
_DOUBLE_DASH = _rules((r"--", r" -- "))

# Closing quotes (the line is padded with a space at each end first): any straight double quote left over closes,
# as two apostrophes; the clitics 's 'm 'd 'll 're 've n't are split from their word.
_CLOSING_QUOTES = _rules(
    (r"([»”’])", r" \1 "),
    (r'"', " '' "),
    (r"(\S)('')", r"\1 \2 "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
)

# Whole words written as two (Robert MacIntyre's contraction list, as nltk 3.5 has it), in nltk's order.
_SPLIT_WORDS = (("can", "not"), ("d", "'ye"), ("gim", "me"), ("gon", "na"), ("got", "ta"), ("lem", "me"), ("mor", "'n"))
_CONTRACTIONS = _rules(
    *((rf"(?i)\b({first})({second})\b", r" \1 \2 ") for first, second in _SPLIT_WORDS),
    (r"(?i)\b(wan)(na)\s", r" \1 \2 "),  # "wanna" only when whitespace follows
    (r"(?i) ('t)(is)\b", r" \1 \2 "),
    (r"(?i) ('t)(was)\b", r" \1 \2 "),
)


def _apply(rules: tuple[Rule, ...], text: str) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def word_tokenize(line: str) -> list[str]:
    """nltk 3.5's `word_tokenize` on one line taken as one sentence (see the module docstring for the difference)."""
    text = _apply(_OPENING_QUOTES, line)
    text = _apply(_PUNCTUATION, text)
    text = _apply(_BRACKETS, text)
    text = _apply(_DOUBLE_DASH, text)
    text = _apply(_CLOSING_QUOTES, f" {text} ")
    return _apply(_CONTRACTIONS, text).split()


def tokenized_line(line: str) -> str:
    """The tokens re-joined with single spaces: what GenerationEval hands to METEOR and splits again for TER."""
    return " ".join(word_tokenize(line))
