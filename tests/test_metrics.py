"""Metric implementations against hand-computed values (from the formulas) and against pycocoevalcap."""

from __future__ import annotations

import math
import random

import pytest

from steps.metrics import scorers as m

needs_java = pytest.mark.skipif(not m.java_available(), reason="java is not installed")


# ---------------------------------------------------------------- mteval tokenisation


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("Hello, world.", ["Hello", ",", "world", "."]),
        ("It costs 3.5 or 1,000 pounds.", ["It", "costs", "3.5", "or", "1,000", "pounds", "."]),
        ("£20-25 and e-mail", ["£20", "-", "25", "and", "e-mail"]),  # '-' splits only after a digit; '£' is no symbol
        ("it's (cheap)!", ["it's", "(", "cheap", ")", "!"]),
        ("a &amp; b &quot;c&quot;", ["a", "&", "b", '"', "c", '"']),
        ("  spaced\tout  ", ["spaced", "out"]),
        ("", [""]),  # pymteval quirk: an empty line is one empty token
    ],
)
def test_mteval_tokenize(text: str, tokens: list[str]) -> None:
    assert m.mteval_tokenize(text) == tokens


def test_multi_bleu_tokenize_splits_on_ascii_whitespace_only() -> None:
    # multi-bleu-detok.perl reads bytes: a no-break space or a thin space is part of a word there, and is not
    # stripped from either end of the line; tabs, CR and vertical tab are whitespace.
    assert m.multi_bleu_tokenize("the\u00a0cat sat.") == ["the\u00a0cat", "sat", "."]
    assert m.multi_bleu_tokenize("\u2009a b\u2009") == ["\u2009a", "b\u2009"]
    assert m.multi_bleu_tokenize(" a\tb\rc\x0bd ") == ["a", "b", "c", "d"]
    assert m.multi_bleu_tokenize("   ") == []
    # pymteval (Python) splits and strips on every Unicode space.
    assert m.mteval_tokenize("\u2009the\u00a0cat\u2009") == ["the", "cat"]


# ---------------------------------------------------------------- BLEU


def test_bleu_perfect_match_is_one() -> None:
    assert m.corpus_bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0, abs=1e-12)


def test_bleu_brevity_penalty() -> None:
    # Every n-gram of the 4-word hypothesis is in the 6-word reference: precisions 1, BP = exp(1 - 6/4).
    assert m.corpus_bleu(["the cat sat on"], [["the cat sat on the mat"]]) == pytest.approx(math.exp(1 - 6 / 4), rel=1e-12)


def test_bleu_closest_reference_length_ties_go_to_the_shorter() -> None:
    # c = 5, references of 4 and 6 words are equally close; the shorter one (4) gives c > r, so BP = 1.
    assert m.corpus_bleu(["a b c d e"], [["a b c d", "a b c d e f"]]) == pytest.approx(1.0, abs=1e-12)
    # With only the 6-word reference, BP = exp(1 - 6/5).
    assert m.corpus_bleu(["a b c d e"], [["a b c d e f"]]) == pytest.approx(math.exp(1 - 6 / 5), rel=1e-12)


def test_bleu_clipping_and_zero_floors() -> None:
    # "the" matches at most once (clipped by the reference count); higher orders have no hits and use pymteval's floors.
    expected = math.exp((math.log(1 / 4) + math.log(1e-15 / 3) + math.log(1e-15 / 2) + math.log(1e-15 / 1)) / 4)
    assert m.corpus_bleu(["the the the the"], [["the cat"]]) == pytest.approx(expected, rel=1e-12)
    assert m.corpus_bleu(["the the the the"], [["the cat"]], variant="multi-bleu-detok") == 0.0


def test_bleu_clips_against_the_best_single_reference_not_the_sum() -> None:
    # "a" appears once in each reference: the ceiling is 1, not 2. p1 = 1/2, p2..p4 floored.
    expected = math.exp((math.log(1 / 2) + math.log(1e-15 / 1) + math.log(1e-15 / 1e-9) + math.log(1e-15 / 1e-9)) / 4)
    assert m.corpus_bleu(["a a"], [["a b", "b a"]]) == pytest.approx(expected, rel=1e-12)


def test_bleu_is_case_insensitive_in_pymteval_and_case_sensitive_in_multi_bleu_detok() -> None:
    assert m.corpus_bleu(["The Cat Sat Down"], [["the cat sat down"]]) == pytest.approx(1.0)
    assert m.corpus_bleu(["The Cat Sat Down"], [["the cat sat down"]], variant="multi-bleu-detok") == 0.0
    # "The" vs "the": p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0 -> multi-bleu-detok gives 0.
    assert m.corpus_bleu(["The cat sat down"], [["the cat sat down"]], variant="multi-bleu-detok") == 0.0
    expected = math.exp((math.log(4 / 5) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert m.corpus_bleu(["The cat sat down ."], [["the cat sat down ."]], variant="multi-bleu-detok") == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="variant"):
        m.corpus_bleu(["a"], [["a"]], variant="sacre")


def test_multi_bleu_detok_keeps_unicode_spaces_inside_words() -> None:
    # Hypothesis "a b c d e f g<NBSP>h" is 7 words to the Perl script against the 8-word reference:
    # p1 = 6/7, p2 = 5/6, p3 = 4/5, p4 = 3/4, BP = exp(1 - 8/7). (The script itself prints 70.1396726800.)
    expected = math.exp(1 - 8 / 7) * (6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25
    bleu = m.corpus_bleu(["a b c d e f g\u00a0h"], [["a b c d e f g h"]], variant="multi-bleu-detok")
    assert bleu == pytest.approx(expected, rel=1e-12)
    assert bleu == pytest.approx(0.701396726800, abs=1e-12)
    # A leading thin space makes "<THIN SPACE>a" a word that matches nothing: p = 4/5, 3/4, 2/3, 1/2 (Perl: 66.874...).
    expected = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert m.corpus_bleu(["\u2009a b c d e"], [["a b c d e"]], variant="multi-bleu-detok") == pytest.approx(expected, rel=1e-12)


def test_multi_bleu_detok_counts_an_empty_reference_as_zero_words() -> None:
    # Instance 1: the blank reference (0 words, 4 away) is closer to the 4-word output than the 10-word one (6 away);
    # instance 2: "x" (1 word). Reference length 0 + 1 = 1 <= 8 system words, so BP = 1 and every precision is 1.
    hyps = ["a b c d", "a b c d"]
    refs = [["a b c d e f g h i j", ""], ["a b c d e f g h i j", "x"]]
    assert m.corpus_bleu(hyps, refs, variant="multi-bleu-detok") == pytest.approx(1.0, abs=1e-12)
    # Without the blank reference: r = 10 + 1, BP = exp(1 - 11/8).
    refs_without_blank = [["a b c d e f g h i j"], ["a b c d e f g h i j", "x"]]
    expected = math.exp(1 - 11 / 8)
    assert m.corpus_bleu(hyps, refs_without_blank, variant="multi-bleu-detok") == pytest.approx(expected, rel=1e-12)
    # When every closest reference is blank the script prints BLEU = 0 (and exits 1).
    assert m.corpus_bleu(["a b c d"], [["a b c d e f g h i j", " "]], variant="multi-bleu-detok") == 0.0


def test_bleu_adds_negative_ngram_totals_of_short_hypotheses_like_pymteval() -> None:
    # hyp1 = ref1 has 6 words; hyp2 = ref2 has 1 word and contributes 1-n+1 (< 0) candidate n-grams for n >= 3.
    # p1 = 7/7, p2 = 5/5, p3 = 4/(4-1), p4 = 3/(3-2); c = r = 7 so BP = 1; BLEU = (4/3 * 3)^(1/4) = sqrt(2).
    assert m.corpus_bleu(["a b c d e f", "x"], [["a b c d e f"], ["x"]]) == pytest.approx(math.sqrt(2), rel=1e-12)
    # multi-bleu-detok counts only real n-grams: every precision is 1.
    assert m.corpus_bleu(["a b c d e f", "x"], [["a b c d e f"], ["x"]], variant="multi-bleu-detok") == pytest.approx(1.0)


# The E2E scorer's default (Perl) run: mteval-v13a-sig.pl's smoothed BLEU. Checked against the script itself on
# degenerate E2E systems in tests/test_evaluate.py; here each rule by hand.


def test_perl_bleu_empty_output_has_no_words_and_only_ascii_letters_are_lower_cased() -> None:
    # Instance 1: "CAFÉ" becomes "cafÉ", not "café": hits 2/3 (au, lait), 1/2 (au lait), 0/1 (the first order without
    # hits: 1/(2*1)); no 4-grams at all, so order 4 adds log 1. Instance 2: the empty output adds no words; the
    # closest reference to 0 words is "x y" (2). c = 3, r = 3 + 2 = 5.
    hyps, refs = ["CAFÉ au lait", ""], [["café au lait"], ["x y"]]
    expected = math.exp((math.log(2 / 3) + math.log(1 / 2) + math.log(1 / 2)) / 4) * math.exp(1 - 5 / 3)
    assert m.corpus_bleu(hyps, refs, variant="perl") == pytest.approx(expected, rel=1e-12)
    # pymteval lower-cases "É" and counts the empty output as one word: a different number.
    assert m.corpus_bleu(hyps, refs) != pytest.approx(expected, rel=1e-3)
    assert m.perl_mteval_tokenize("") == [] and m.mteval_tokenize("") == [""]
    assert m.corpus_bleu(["", ""], refs, variant="perl") == 0.0  # no output words: the script's length factor is 0


def test_perl_bleu_totals_count_real_ngrams_and_zero_hits_are_smoothed() -> None:
    # Totals are clipped at 0 (pymteval's negative ones give sqrt 2 here): every precision is 1.
    assert m.corpus_bleu(["a b c d e f", "x"], [["a b c d e f"], ["x"]], variant="perl") == pytest.approx(1.0, abs=1e-12)
    # The k-th order with n-grams but no hits counts 1 / (2^k total) hits: p = 1/4, 1/(2*3), 1/(4*2), 1/(8*1).
    expected = math.exp((math.log(1 / 4) + math.log(1 / 6) + math.log(1 / 8) + math.log(1 / 8)) / 4)
    assert m.corpus_bleu(["the the the the"], [["the cat"]], variant="perl") == pytest.approx(expected, rel=1e-12)


def test_perl_bleu_skips_empty_padding_references_after_the_first() -> None:
    # The scorer pads instances with empty references; the script's closest-length rule skips them, so r = 4 and
    # BP = exp(1 - 4/2) (orders 3 and 4 have no n-grams: log 1).
    assert m.corpus_bleu(["a b"], [["a b c d", ""]], variant="perl") == pytest.approx(math.exp(-1), rel=1e-12)
    assert m.corpus_bleu(["a b"], [["a b c d"]], variant="perl") == pytest.approx(math.exp(-1), rel=1e-12)
    # ...but the first reference's length is where it starts: 0 and 4 are equally far from 2, the shorter stays.
    assert m.corpus_bleu(["a b"], [["", "a b c d"]], variant="perl") == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------- NIST

# Two instances: ("a b c" | refs "a b c", "a b d e") and ("a" | ref "a b"). Reference words pooled: 9;
# counts a:3 b:3 c:1 d:1 e:1, "a b":3, "b c":1, "a b c":1. Information: info(a) = info(b) = log2(9/3),
# info(c) = log2 9, info(a b) = log2(3/3) = 0, info(b c) = log2(3/1), info(a b c) = log2(3/1).
# Matched information: n=1: 5 log2 3 (inst 1: 4 log2 3, inst 2: log2 3); n=2: log2 3; n=3: log2 3.
NIST_HYPS = ["a b c", "a"]
NIST_REFS = [["a b c", "a b d e"], ["a b"]]
LOG2_3 = math.log2(3)


def test_nist_python_variant_by_hand() -> None:
    # pymteval: system n-gram totals n=1: 3+1, n=2: 2+0, n=3: 1+(-1) = 0 (divide by 1 instead); n=4,5 have no hits.
    score = 5 * LOG2_3 / 4 + LOG2_3 / 2 + LOG2_3 / 1
    # Length penalty: system 4 words vs the sum of per-instance mean reference lengths, (3+4)/2 + 2 = 5.5.
    penalty = math.exp(-m.NIST_BETA * math.log(4 / 5.5) ** 2)
    assert m.corpus_nist(NIST_HYPS, NIST_REFS) == pytest.approx(score * penalty, rel=1e-12)


def test_nist_perl_variant_by_hand() -> None:
    # Perl: totals clipped at 0 (n=3: 1+0 = 1); the reference length is all reference words (9) divided by the
    # mean number of non-empty references per instance ((2 + 1) / 2), not by the 2 slots stock mteval would use.
    score = 5 * LOG2_3 / 4 + LOG2_3 / 2 + LOG2_3 / 1
    penalty = math.exp(-m.NIST_BETA * math.log(4 / (9 / 1.5)) ** 2)
    assert m.corpus_nist(NIST_HYPS, NIST_REFS, variant="perl") == pytest.approx(score * penalty, rel=1e-12)


# Degenerate systems on a second small corpus, where the three length-penalty rules give three different answers.
# References: instance 1 "a b c" and "a d", instance 2 "a b e f". Pooled: 9 words, a:3 b:2 c:d:e:f:1, "a b":2, so
# info(a) = log2(9/3), info(b) = log2(9/2), info(a b) = log2(3/2). Mean non-empty references: (2 + 1) / 2 = 1.5,
# so Perl's reference length is 9 / 1.5 = 6 (stock mteval: 9 / 2 = 4.5; pymteval: (3+2)/2 + 4 = 6.5).
DEGENERATE_REFS = [["a b c", "a d"], ["a b e f"]]


def test_nist_perl_one_sentence_repeated_for_every_instance() -> None:
    # "a b" twice: per instance a, b and "a b" match. Totals n=1: 4, n=2: 2, n>=3: 0 (divided by 1).
    score = 2 * (math.log2(3) + math.log2(4.5)) / 4 + 2 * math.log2(1.5) / 2
    # System 4 words against 6: ratio 2/3, where the penalty is exactly 0.5 (stock mteval's 4.5 would give 0.94).
    assert m.corpus_nist(["a b", "a b"], DEGENERATE_REFS, variant="perl") == pytest.approx(0.5 * score, rel=1e-12)


def test_nist_perl_with_empty_outputs() -> None:
    # The first output is empty (no words in Perl); the second matches a, b, "a b" of instance 2.
    score = (math.log2(3) + math.log2(4.5)) / 2 + math.log2(1.5) / 1
    penalty = math.exp(-m.NIST_BETA * math.log(2 / 6) ** 2)
    assert m.corpus_nist(["", "a b"], DEGENERATE_REFS, variant="perl") == pytest.approx(score * penalty, rel=1e-12)
    assert m.corpus_nist(["", ""], DEGENERATE_REFS, variant="perl") == 0.0


def test_nist_perl_counts_only_non_empty_references() -> None:
    # The scorer pads instances with empty references; they add no words and are not counted, so padding instance 2
    # changes nothing (the mean stays 1.5, not 2).
    padded = [["a b c", "a d"], ["a b e f", ""]]
    assert m.mean_non_empty_references([[["a"], ["b"]], [["c"], []]]) == 1.5
    assert m.corpus_nist(["a b", "a b"], padded, variant="perl") == m.corpus_nist(["a b", "a b"], DEGENERATE_REFS, variant="perl")


def test_nist_beta_halves_the_score_at_two_thirds_length() -> None:
    assert m.nist_length_penalty(2 / 3) == pytest.approx(0.5, rel=1e-12)
    assert m.nist_length_penalty(1.2) == 1.0


def test_nist_empty_hypothesis_counts_one_word_in_python_and_none_in_perl() -> None:
    # One reference "a b": python sees hyp [""]: no hits, totals 1, 0, -1, ...; Perl sees no words at all.
    assert m.corpus_nist([""], [["a b"]]) == 0.0
    assert m.corpus_nist([""], [["a b"]], variant="perl") == 0.0
    with pytest.raises(ValueError, match="variant"):
        m.corpus_nist(["a"], [["a"]], variant="fortran")


# ---------------------------------------------------------------- ROUGE-L


def _lcs_dp(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def test_lcs_length_matches_dynamic_programming() -> None:
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 15))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 15))]
        assert m.lcs_length(a, b) == _lcs_dp(a, b)


def test_rouge_l_maximises_precision_and_recall_independently() -> None:
    # LCS("a b c d", "a c d e f") = 3: P = 3/4, R = 3/5. LCS with "b c" = 2: P = 2/4, R = 2/2.
    # Pmax = 3/4 (first ref), Rmax = 1 (second ref): F = (1 + 1.44) P R / (R + 1.44 P).
    p, r = 0.75, 1.0
    expected = (1 + 1.2**2) * p * r / (r + 1.2**2 * p)
    assert m.rouge_l_instance("a b c d", ["a c d e f", "b c"]) == pytest.approx(expected, rel=1e-12)
    assert m.rouge_l_instance("x y", ["a b"]) == 0.0
    assert m.rouge_l_instance("a b", ["a b"]) == pytest.approx(1.0)


# ---------------------------------------------------------------- CIDEr-D


def test_cider_d_by_hand() -> None:
    # N = 2 instances, every n-gram has df <= 1, so every idf is ln 2 (an unseen n-gram also gets ln 2).
    # Instance 1, hyp "a b" vs ref "a b c": order 1 cosine 2/(sqrt2 sqrt3), order 2 cosine 1/sqrt2, orders 3-4: 0;
    # bigram counts 1 vs 2 -> penalty exp(-1/72). Score = 10 * mean over the 4 orders * penalty.
    first = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    scores = m.cider_d_scores(["a b", "x"], [["a b c"], ["y"]])
    assert scores == pytest.approx([first, 0.0], rel=1e-12)
    # A perfect two-word match scores 10 * (1 + 1 + 0 + 0) / 4 = 5.
    assert m.cider_d_scores(["a b", "c"], [["a b"], ["d"]])[0] == pytest.approx(5.0, rel=1e-12)


def _random_corpus(seed: int, n: int = 40) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    words = ["a", "b", "c", "d", "e", "f", "g", "h", "the", "pub", "near", "city", "centre", "riverside"]

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))

    return [sentence() for _ in range(n)], [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rouge_and_cider_match_pycocoevalcap(seed: int) -> None:
    pytest.importorskip("numpy")
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    hyps, refs = _random_corpus(seed)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    assert m.corpus_rouge_l(hyps, refs) == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-12)
    assert m.corpus_cider_d(hyps, refs) == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)


# ---------------------------------------------------------------- TER


def _levenshtein_dp(a: list[str], b: list[str]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y))
        previous = current
    return previous[-1]


def test_bit_parallel_edit_distance_matches_dynamic_programming() -> None:
    rng = random.Random(1)
    for _ in range(1000):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 14))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 14))]
        assert m.edit_distance(a, b) == _levenshtein_dp(a, b)


def test_ter_by_hand() -> None:
    # One block shift fixes everything: 1 edit over 4 reference words (Levenshtein alone would need 4).
    assert m.sentence_ter("a b c d", ["c d a b"]) == pytest.approx(1 / 4)
    # One substitution, no useful shift.
    assert m.sentence_ter("a x c", ["a b c"]) == pytest.approx(1 / 3)
    # Minimum over references; an empty reference scores 1 as in GenerationEval.
    assert m.sentence_ter("a b", ["a b c d", "a b"]) == 0.0
    assert m.sentence_ter("a b", [""]) == 1.0
    # Shift "c" to the front (1) then delete "x" (1): 2 edits over 3 words.
    assert m.sentence_ter("a b x c", ["c a b"]) == pytest.approx(2 / 3)
    assert m.mean_ter(["a b c d", "a x c"], [["c d a b"], ["a b c"]]) == pytest.approx((1 / 4 + 1 / 3) / 2)


def test_ter_an_empty_reference_wins_when_the_output_is_far_from_the_others() -> None:
    # Against "a": 1 substitution + 2 deletions over 1 word = 3; against the blank reference: 1.
    assert m.sentence_ter("x y z", ["a", " "]) == 1.0
    assert m.sentence_ter("x y z", ["a"]) == 3.0


def test_generation_ter_sees_nltk_tokens() -> None:
    # GenerationEval tokenises with nltk before TER: "cannot" is "can not", a straight quote is ``, so these are
    # exact matches there (TER 0); split on whitespace each would cost 2 edits over 4 reference words.
    scores = m.generation_scores(["we cannot go", '" the tower "'], [["we can not go"], ["`` the tower ``"]], with_meteor=False)
    assert scores["TER"] == 0.0
    assert m.mean_ter(["we cannot go", '" the tower "'], [["we can not go"], ["`` the tower ``"]]) == pytest.approx((2 / 4 + 2 / 4) / 2)


def test_ter_never_exceeds_plain_edit_rate() -> None:
    hyps, refs = _random_corpus(3, n=30)
    for hyp, ref_set in zip(hyps, refs):
        ref = ref_set[0]
        assert m.sentence_ter(hyp, [ref]) <= _levenshtein_dp(hyp.split(), ref.split()) / len(ref.split()) + 1e-12


# ---------------------------------------------------------------- PTB tokenisation and METEOR (Java)

PTB_CASES = [
    "The Phoenix's prices are £20-£25.",
    'A coffee shop "The Punter" serving food, isn\'t it?',
    "Kid friendly, .Blue Spice is in the city center., near Café Sicilia..",
    "It's not family -friendly; prices: less than £20 (cheap) - 5 out of 5...",
    "Ratings...but the £-25 range",
]


@needs_java
def test_ptb_tokenizer_lowercases_splits_and_drops_punctuation() -> None:
    out = m.ptb_tokenize(["The Phoenix's prices are £20-£25.", "Hello,   World!", ""])
    assert out == ["the phoenix 's prices are # 20 # 25", "hello world", ""]


@needs_java
def test_python_ptb_approximation_agrees_with_corenlp_on_tricky_cases() -> None:
    assert m.ptb_tokenize_approx(PTB_CASES) == m.ptb_tokenize(PTB_CASES)


@needs_java
def test_meteor_is_corpus_level_and_orders_outputs() -> None:
    refs = [["the pub is near the river"], ["a cheap family friendly restaurant"]]
    with m.Meteor() as meteor:
        perfect, per_instance = meteor.corpus_score(["the pub is near the river", "a cheap family friendly restaurant"], refs)
        worse, _ = meteor.corpus_score(["the pub river", "a restaurant ||| cheap"], refs)  # '|||' must not break the protocol
        uneven, uneven_parts = meteor.corpus_score(["the pub is near the river", "restaurant"], refs)
    assert 0.9 < perfect <= 1.0 and len(per_instance) == 2
    assert worse < perfect
    # Corpus-level aggregation of statistics is not the mean of the sentence scores.
    assert uneven != pytest.approx(sum(uneven_parts) / 2, abs=1e-6)


def test_meteor_field_keeps_pipes_as_tokens_without_the_separator() -> None:
    # GenerationEval's file mode keeps "|||" (METEOR's -norm makes each "|" a token); the stdio protocol needs it gone.
    assert m._meteor_field("a|||||b ||| c", keep_pipes=True) == "a | | | | | b | | | c"
    assert m._meteor_field("a ||| b", keep_pipes=False) == "a b"  # pycocoevalcap (E2E) deletes it


@needs_java
def test_meteor_keeps_pipes_like_genevals_file_mode() -> None:
    # With -norm the file mode sees "zork ||| quux" as the five tokens of the reference: a perfect match, 1.0.
    with m.Meteor() as meteor:
        kept, _ = meteor.corpus_score(["zork ||| quux"], [["zork | | | quux"]], keep_pipes=True)
        dropped, _ = meteor.corpus_score(["zork ||| quux"], [["zork | | | quux"]])
    assert kept == 1.0
    assert dropped < 0.5


@needs_java
def test_meteor_keeps_the_first_best_reference_even_when_it_is_empty() -> None:
    # Instance 2 matches nothing; METEOR keeps the first of its equally bad references. Corpus statistics: the exact
    # match of instance 1 adds no fragmentation (chunks only count for imperfect segments), so METEOR = Fmean =
    # P R / (0.15 R + 0.85 P) with P = 4 matches / 5 output words and R = 4 / (4 + length of the kept reference).
    def fmean(p: float, r: float) -> float:
        return p * r / (0.15 * r + 0.85 * p)

    hyps = ["zork quux blarg frob", "xyzzy"]
    with m.Meteor() as meteor:
        blank_first, _ = meteor.corpus_score(hyps, [["zork quux blarg frob"], [" ", "plugh plover"]], keep_pipes=True)
        words_first, _ = meteor.corpus_score(hyps, [["zork quux blarg frob"], ["plugh plover", " "]], keep_pipes=True)
    assert blank_first == pytest.approx(fmean(4 / 5, 4 / 4), rel=1e-12)
    assert words_first == pytest.approx(fmean(4 / 5, 4 / 6), rel=1e-12)


@needs_java
def test_meteor_failure_reports_javas_message(tmp_path, monkeypatch) -> None:
    (tmp_path / "meteor").mkdir()
    monkeypatch.setattr(m, "pycocoevalcap_dir", lambda: tmp_path)  # no jar there: Java exits at once
    with pytest.raises(RuntimeError, match=r"METEOR exited unexpectedly.*meteor-1\.5\.jar"), m.Meteor() as meteor:
        meteor.corpus_score(["a"], [["a"]])


def test_instance_checks() -> None:
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        m.e2e_scores(["a", "b"], [["a"]], with_meteor=False)
    with pytest.raises(ValueError, match="instance 2 has no references"):
        m.e2e_scores(["a", "b"], [["a"], []], with_meteor=False)
