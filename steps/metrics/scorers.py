"""Data-to-text metrics, computed the way the official scorers compute them.

E2E (`tuetschek/e2e-metrics`, `measure_scores.py -p`, the form the LoRA README runs):
  - BLEU and NIST: our own re-implementation of the scorer's pure-Python mteval-v13a (`pymteval`), including its
    quirks, so the numbers match to the last digit. `nist_variant="perl"` reproduces the scorer's default mode instead
    (its copy of the Perl `mteval-v13a-sig.pl`, which the published E2E challenge numbers come from) for BLEU and
    NIST together; NIST differs when instances have different numbers of references, BLEU on degenerate outputs.
  - METEOR 1.5, ROUGE-L and CIDEr-D: the MS-COCO caption toolkit's definitions, after Stanford PTB tokenisation with
    lower-casing and punctuation removal. METEOR and the tokeniser are the Java jars shipped in `pycocoevalcap`;
    ROUGE-L and CIDEr-D are re-implemented here (checked against `pycocoevalcap` in the tests) because they are
    short and ours are several times faster.
WebNLG / DART (the GenerationEval script the LoRA README points to): BLEU (multi-bleu-detok: mteval tokenisation,
case-sensitive, no smoothing), METEOR 1.5 and TER (pyter's greedy shift search, as GenerationEval uses it), the
last two on nltk's word tokens (`genevel_tokenize`).

All scores are fractions (BLEU 0.6593, not 65.93), as the E2E scorer prints them. This module is plain Python:
no MLflow, Prefect or DVC.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from steps.core.common import InputError
from steps.metrics.webnlg_tokenize import tokenized_line

Tokens = list[str]
NGram = tuple[str, ...]

JAVA_HINT = (
    "Java is needed for METEOR 1.5 and the Stanford PTB tokeniser; install it with "
    "`apt-get install default-jre-headless` (any Java >= 8), or pass --no_meteor to score without METEOR "
    "(in the DVC pipeline: evaluate.no_meteor: true in params.yaml; ROUGE-L and CIDEr then use a pure-Python approximation of the PTB tokeniser)"
)

# ---------------------------------------------------------------------------------------------------------------
# mteval-v13a tokenisation (the "basic", non-international one) and n-grams
# ---------------------------------------------------------------------------------------------------------------

# The mteval symbol class: { | } ~ [ \ ] ^ _ ` space ! " # $ % & ( ) * + : ; < = > ? @ /
# Deliberately absent: ' - . , and the digits/letters; . , and - get the context-dependent rules below.
_MTEVAL_SYMBOLS = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")
_PERIOD_COMMA_AFTER_NON_DIGIT = re.compile(r"([^0-9])([\.,])")
_PERIOD_COMMA_BEFORE_NON_DIGIT = re.compile(r"([\.,])([^0-9])")
_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")
_WHITESPACE = re.compile(r"\s+")
# Perl's \s on a line read as bytes (multi-bleu-detok.perl opens its files without a UTF-8 layer): ASCII whitespace
# only, so a no-break space (C2 A0) or a thin space (E2 80 89) is part of a word there.
_ASCII_WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")


def mteval_tokenize(text: str) -> Tokens:
    """Tokenise like mteval-v13a / pymteval (case is kept; the metrics lower-case n-grams themselves).

    Quirk kept from pymteval: an empty string gives one empty token `[""]`, so an empty output counts as one word.
    """
    return _mteval_rules(text, _WHITESPACE)


def multi_bleu_tokenize(text: str) -> Tokens:
    """Tokenise one line like multi-bleu-detok.perl: mteval-v13a's rules, case kept, only ASCII whitespace separating
    words (Unicode spaces stay inside them, as in the Perl script, which reads bytes). No empty tokens."""
    return [token for token in _mteval_rules(text, _ASCII_WHITESPACE) if token]


def _mteval_rules(text: str, whitespace: re.Pattern[str]) -> Tokens:
    """mteval-v13a's tokenisation with the given notion of whitespace."""
    text = text.replace("<skipped>", "")
    text = text.replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} "
    text = _MTEVAL_SYMBOLS.sub(r" \1 ", text)
    text = _PERIOD_COMMA_AFTER_NON_DIGIT.sub(r"\1 \2 ", text)
    text = _PERIOD_COMMA_BEFORE_NON_DIGIT.sub(r" \1 \2", text)
    text = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", text)
    text = whitespace.sub(" ", text)
    return text.strip(" ").split(" ")


def ngrams(tokens: Sequence[str], n: int) -> list[NGram]:
    """All n-grams of `tokens` in order (empty when the sentence is shorter than n)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def max_ref_counts(refs: Sequence[Tokens], n: int) -> Counter[NGram]:
    """For each n-gram, its largest count in any single reference: the clipping ceiling of BLEU and NIST."""
    merged: Counter[NGram] = Counter()
    for ref in refs:
        for gram, count in Counter(ngrams(ref, n)).items():
            if count > merged[gram]:
                merged[gram] = count
    return merged


def clipped_hits(hyp: Tokens, refs: Sequence[Tokens], n: int) -> Counter[NGram]:
    """Matched n-grams of the hypothesis with their clipped counts min(count in hyp, max count in one ref)."""
    ceiling = max_ref_counts(refs, n)
    hits: Counter[NGram] = Counter()
    for gram, count in Counter(ngrams(hyp, n)).items():
        matched = min(count, ceiling.get(gram, 0))
        if matched:
            hits[gram] = matched
    return hits


def _lower(tokens: Tokens) -> Tokens:
    return [t.lower() for t in tokens]


def _lower_ascii(tokens: Tokens) -> Tokens:
    """Perl's `tr/[A-Z]/[a-z]/`: only ASCII letters change case."""
    table = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
    return [t.translate(table) for t in tokens]


def perl_mteval_tokenize(text: str) -> Tokens:
    """Words as mteval-v13a-sig.pl sees them: mteval tokenisation, ASCII letters lower-cased, and no empty token
    (an empty output has no words, where pymteval's has one empty word)."""
    return [t for t in _lower_ascii(mteval_tokenize(text)) if t]


# ---------------------------------------------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------------------------------------------

BLEU_TINY = 1e-15  # pymteval floors zero hits at this...
BLEU_SMALL = 1e-9  # ...and zero n-gram totals at this, so BLEU is always defined.


def corpus_bleu(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, variant: str = "pymteval"
) -> float:
    """Corpus BLEU with multiple references.

    All variants: mteval-v13a tokenisation, clipped n-gram hits against the per-n-gram maximum over the instance's
    references, reference length = the one closest to the hypothesis length (ties: the shorter),
    BP = exp(1 - r/c) when c < r.
    variant="pymteval" (the E2E scorer's -p mode): case-insensitive; the per-order candidate total is
    `len(hyp) - n + 1` even when negative (pymteval adds those too); an empty output is one empty word; zero hits
    and totals are floored at 1e-15 / 1e-9 so BLEU is never undefined.
    variant="perl" (the E2E scorer's default mode: its copy of mteval-v13a-sig.pl, with that script's default
    smoothing): only ASCII letters are lower-cased, an empty output has no words, totals count real n-grams (clipped
    at 0), empty references after the first are skipped when picking the closest length (the scorer pads instances
    with them); an order with no candidate n-grams adds log 1, the k-th order with candidates but no hits adds
    log(1 / (2^k total)); no output words at all gives BLEU 0.
    variant="multi-bleu-detok" (GenerationEval's BLEU for WebNLG/DART): case-sensitive, only ASCII whitespace
    separates words, totals count real n-grams, an empty output has no words, an empty reference is a 0-word
    reference (it can be the closest length), and any zero precision makes BLEU 0.
    """
    tokenizers = {"pymteval": mteval_tokenize, "perl": perl_mteval_tokenize, "multi-bleu-detok": multi_bleu_tokenize}
    if variant not in tokenizers:
        raise ValueError(f"unknown BLEU variant {variant!r}; expected 'pymteval', 'perl' or 'multi-bleu-detok'")
    python, perl = variant == "pymteval", variant == "perl"
    hits = [0] * max_n
    totals = [0] * max_n
    ref_len = 0
    tokenize = tokenizers[variant]
    for hyp_text, ref_texts in zip(hypotheses, references, strict=True):
        hyp = tokenize(hyp_text)
        refs = [tokenize(r) for r in ref_texts]
        if python:
            hyp, refs = _lower(hyp), [_lower(r) for r in refs]
        for n in range(1, max_n + 1):
            hits[n - 1] += sum(clipped_hits(hyp, refs, n).values())
            totals[n - 1] += len(hyp) - n + 1 if python else max(len(hyp) - n + 1, 0)
        lengths = [len(r) for r in refs]
        if perl:  # the script's brevity_penalty_closest keeps its current length when a reference has no words
            lengths = lengths[:1] + [length for length in lengths[1:] if length]
        ref_len += min(lengths, key=lambda length: (abs(length - len(hyp)), length))
    sys_len = totals[0]
    if python:
        log_precision = sum(math.log(max(h, BLEU_TINY) / max(t, BLEU_SMALL)) for h, t in zip(hits, totals)) / max_n
    elif perl:
        return _mteval_smoothed_bleu(hits, totals, ref_len)
    elif min(hits) == 0 or ref_len == 0:  # the Perl script prints BLEU = 0 when every closest reference is empty
        return 0.0
    else:
        log_precision = sum(math.log(h / t) for h, t in zip(hits, totals)) / max_n
    brevity = 1.0 if sys_len >= ref_len else math.exp(1.0 - ref_len / (sys_len if sys_len else 1e-5))
    return brevity * math.exp(log_precision)


def _mteval_smoothed_bleu(hits: Sequence[int], totals: Sequence[int], ref_len: int) -> float:
    """mteval-v13a-sig.pl's `bleu_score` (smoothed, its default), step for step so the result is the same double."""
    if totals[0] == 0:  # no output words: the script's length factor stays 0
        return 0.0
    log_precision = 0.0
    smooth = 1
    for h, t in zip(hits, totals):
        if t == 0:
            continue
        if h == 0:
            smooth *= 2
            log_precision += math.log(1 / (smooth * t))
        else:
            log_precision += math.log(h / t)
    return math.exp(log_precision / len(totals)) * math.exp(min(0.0, 1 - ref_len / totals[0]))


# ---------------------------------------------------------------------------------------------------------------
# NIST
# ---------------------------------------------------------------------------------------------------------------

NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # the length penalty is 0.5 when the output is 2/3 of the refs


def nist_length_penalty(ratio: float) -> float:
    """exp(-beta * ln^2(ratio)) for a system/reference length ratio below 1; no penalty at or above 1."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-NIST_BETA * math.log(ratio) ** 2)


def _info_weights(all_refs: Sequence[Sequence[Tokens]], max_n: int, perl: bool) -> dict[NGram, float]:
    """NIST information weight of every reference n-gram: log2(count(w1..wn-1) / count(w1..wn)).

    Counts pool every reference of every instance; the count of the empty prefix is the total number of reference
    words. Perl quirk (perl=True): its test `$mgram ? ... : $tot_wrds` treats the one-word prefix "0" as empty.
    """
    counts: Counter[NGram] = Counter()
    total_words = 0
    for refs in all_refs:
        for ref in refs:
            total_words += len(ref)
            for n in range(1, max_n + 1):
                counts.update(ngrams(ref, n))
    weights: dict[NGram, float] = {}
    for gram, count in counts.items():
        prefix = gram[:-1]
        empty_prefix = not prefix or (perl and prefix == ("0",))
        prefix_count = total_words if empty_prefix else counts[prefix]
        weights[gram] = math.log2(prefix_count / count)
    return weights


def mean_non_empty_references(all_refs: Sequence[Sequence[Tokens]]) -> float:
    """Mean over instances of the number of references with at least one token.

    The e2e-metrics copy of mteval-v13a-sig.pl counts a reference when its tokenised text is not empty, so the
    empty references the scorer pads instances with do not count.
    """
    return sum(1 for refs in all_refs for ref in refs if ref) / len(all_refs)


def corpus_nist(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 5, variant: str = "python"
) -> float:
    """Corpus NIST (5-grams) with multiple references.

    variant="python" is pymteval (`measure_scores.py -p`): per-order system totals `len(hyp) - n + 1` (can be
    negative), an empty output counts as one word, and the length penalty compares the system length with the sum
    over instances of each instance's mean reference length.
    variant="perl" is the copy of `mteval-v13a-sig.pl` inside e2e-metrics, as its scorer drives it: the scorer pads
    every instance to the largest reference count with empty references, and that copy (changed from stock mteval,
    which divides by the number of reference slots) divides the total reference length by the mean number of
    non-empty references per instance to get the length penalty's reference length; totals are clipped at zero; an
    empty output has no words; only ASCII letters are lower-cased.
    """
    if variant not in ("python", "perl"):
        raise ValueError(f"unknown NIST variant {variant!r}; expected 'python' or 'perl'")
    perl = variant == "perl"

    def tokenize(text: str) -> Tokens:
        return perl_mteval_tokenize(text) if perl else _lower(mteval_tokenize(text))

    hyps = [tokenize(h) for h in hypotheses]
    all_refs = [[tokenize(r) for r in refs] for refs in references]
    if len(hyps) != len(all_refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(all_refs)} reference sets")
    weights = _info_weights(all_refs, max_n, perl)

    info = [0.0] * max_n
    totals = [0] * max_n
    mean_ref_len = 0.0
    all_ref_words = 0
    for hyp, refs in zip(hyps, all_refs):
        for n in range(1, max_n + 1):
            info[n - 1] += sum(weights[g] * c for g, c in clipped_hits(hyp, refs, n).items())
            count = len(hyp) - n + 1
            totals[n - 1] += max(count, 0) if perl else count
        mean_ref_len += sum(len(r) for r in refs) / len(refs)
        all_ref_words += sum(len(r) for r in refs)

    if perl:
        score = sum(i / max(t, 1) for i, t in zip(info, totals))
        if all_ref_words == 0:  # nothing to match: Perl would divide by zero here
            return 0.0
        return score * nist_length_penalty(totals[0] / (all_ref_words / mean_non_empty_references(all_refs)))
    score = sum(i / (t if t != 0 else 1) for i, t in zip(info, totals))
    return score * nist_length_penalty(totals[0] / mean_ref_len)


# ---------------------------------------------------------------------------------------------------------------
# Java helpers: Stanford PTB tokeniser and METEOR 1.5 (the jars pycocoevalcap ships)
# ---------------------------------------------------------------------------------------------------------------

# Tokens the COCO toolkit drops after PTB tokenisation (pycocoevalcap/tokenizer/ptbtokenizer.py).
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# Characters Java's line reader (and str.splitlines) may treat as line ends; one text must stay one line.
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def pycocoevalcap_dir() -> Path:
    """Where the installed pycocoevalcap keeps its jars (imported lazily: it is only needed for the jars)."""
    spec = importlib.util.find_spec("pycocoevalcap")  # a namespace package: no __init__.py, so no __file__
    if spec is None or not spec.submodule_search_locations:
        raise InputError("pycocoevalcap is not installed; it ships the METEOR and PTB-tokeniser jars: pip install pycocoevalcap")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def java_available() -> bool:
    return shutil.which("java") is not None


def require_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise InputError("`java` was not found on PATH. " + JAVA_HINT)
    return java


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Stanford CoreNLP 3.4.1 PTBTokenizer (`-preserveLines -lowerCase`) then COCO punctuation removal.

    One Java process for all texts. Input and output are forced to UTF-8 so '£' and 'é' survive whatever the
    machine's locale is.
    """
    java = require_java()
    jar = pycocoevalcap_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    lines = [_LINE_BREAKS.sub(" ", t) for t in texts]
    with tempfile.TemporaryDirectory(prefix="ptb-") as tmp:
        path = Path(tmp) / "sentences.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        cmd = [java, "-Dfile.encoding=UTF-8", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", "-encoding", "utf-8", str(path)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed (exit {result.returncode}): {result.stderr.decode(errors='replace')[-2000:]}")
    out = result.stdout.decode("utf-8").split("\n")
    if len(out) < len(lines) or any(out[len(lines) :]):
        raise RuntimeError(f"PTBTokenizer returned {len(out)} lines for {len(lines)} inputs")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION) for line in out[: len(lines)]]


# Pure-Python stand-in for the PTB tokeniser, used only when Java is missing and METEOR is off.
_APPROX_CANNOT = re.compile(r"\bcannot\b")
_APPROX_PERIOD_RUN = re.compile(r"\.{2,}")
_APPROX_FINAL_PERIOD = re.compile(r"(?<=[^\s.])\.(?=\s|$)")
_APPROX_INITIAL_PERIOD = re.compile(r"(^|\s)\.(?=\w)")
_APPROX_CLITICS = re.compile(r"(\w)(n't|'s|'m|'d|'ll|'re|'ve)(?=\s|$|[^\w'])")
_APPROX_SYMBOLS = re.compile(r"(--|[`;:!?,$#%&*+=<>|~^\\])")
# PTB escapes brackets as -LRB- etc.; -lowerCase turns them into -lrb-, which the COCO punctuation filter (written
# for the upper-case forms) does not remove, so they stay in the official scorer's tokens.
_APPROX_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_APPROX_EDGE_HYPHEN = re.compile(r"(?<=\w)-(?=\s|$)|(?<=\s)-(?=[^\W\d])|^-(?=[^\W\d])")  # "-25" stays a number
_APPROX_OPENING_QUOTES = re.compile(r"(^|\s)'+(?!(?:s|m|d|ll|re|ve)(?:\s|$))")
_APPROX_CLOSING_QUOTES = re.compile(r"'+(?=\s|$)")


def ptb_tokenize_approx(texts: Sequence[str]) -> list[str]:
    """Approximate `ptb_tokenize` without Java, then the same punctuation removal.

    Rules, in PTB's spirit: lower-case; '£' becomes '#' and '€' '$'; "cannot" -> "can not"; split off periods at
    either end of a word (a run of them becomes "..."), the clitics n't 's 'm 'd 'll 're 've, the symbols PTB
    splits (quotes ; : ! ? , $ # % & ...; not / or @) and a hyphen at either end of a word ("-25" stays a number);
    drop quotes at word edges; brackets become -lrb- -rrb- etc. Hyphens and periods inside words
    ("family-friendly", "3.5") stay. It gives CoreNLP's exact tokens on every E2E test and dev reference and on the
    TGen outputs; it still differs on rarer cases (e.g. "center.," keeps its period in CoreNLP, "gonna").
    """
    result = []
    for text in texts:
        text = _LINE_BREAKS.sub(" ", text).lower().replace("£", "#").replace("€", "$").replace('"', " '' ")
        text = _APPROX_CANNOT.sub("can not", text)
        text = _APPROX_PERIOD_RUN.sub(" ... ", text)
        text = _APPROX_FINAL_PERIOD.sub(" . ", text)
        text = _APPROX_INITIAL_PERIOD.sub(r"\1 . ", text)
        text = _APPROX_CLITICS.sub(r"\1 \2", text)
        text = _APPROX_SYMBOLS.sub(r" \1 ", text)
        text = _APPROX_EDGE_HYPHEN.sub(" - ", text)
        text = _APPROX_OPENING_QUOTES.sub(r"\1 ", text)
        text = _APPROX_CLOSING_QUOTES.sub(" ", text)
        for bracket, escaped in _APPROX_BRACKETS.items():
            text = text.replace(bracket, f" {escaped} ")
        result.append(" ".join(w for w in text.split() if w not in PTB_PUNCTUATION))
    return result


class Meteor:
    """METEOR 1.5 (`java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm`), one Java process for a whole corpus.

    Like pycocoevalcap, each instance gets a `SCORE` line (returning its sufficient statistics) and a single `EVAL`
    line aggregates all of them, so the result is corpus-level METEOR, not a mean of sentence scores.
    """

    def __init__(self, language: str = "en", heap: str = "2G"):
        java = require_java()
        jar_dir = pycocoevalcap_dir() / "meteor"
        cmd = [java, "-Dfile.encoding=UTF-8", "-jar", f"-Xmx{heap}", "meteor-1.5.jar", "-", "-", "-stdio", "-l", language, "-norm"]
        # stderr goes to a file: an unread pipe could fill up and stall Java.
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(cmd, cwd=jar_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)

    def _readline(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.stderr.seek(0)
            err = self.stderr.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"METEOR exited unexpectedly (exit {self.process.returncode}; is the heap too small?): {err}")
        return line.decode("utf-8").strip()

    def corpus_score(
        self, hypotheses: Sequence[str], references: Sequence[Sequence[str]], keep_pipes: bool = False
    ) -> tuple[float, list[float]]:
        """Return (corpus METEOR, per-instance METEOR).

        Each instance's references are scored in the order given and METEOR keeps the first best one, so the order
        (and an empty reference) can change the corpus score. `keep_pipes`: see `_meteor_field`.
        """
        score_lines = [_meteor_score_line(h, refs, keep_pipes) for h, refs in zip(hypotheses, references, strict=True)]

        # Write all SCORE lines from a thread while this one reads the answers, so neither pipe can fill up.
        def feed() -> None:
            with contextlib.suppress(OSError):  # Java died: the reader below reports why
                for line in score_lines:
                    self.process.stdin.write(line)
                self.process.stdin.flush()

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        stats = [self._readline() for _ in score_lines]
        writer.join()
        self.process.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode("utf-8"))
        self.process.stdin.flush()
        per_instance = [float(self._readline()) for _ in stats]
        return float(self._readline()), per_instance

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a Java that already died leaves a broken pipe behind
            self.process.stdin.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        self.stderr.close()

    def __enter__(self) -> Meteor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _meteor_score_line(hypothesis: str, references: Sequence[str], keep_pipes: bool = False) -> bytes:
    """`SCORE ||| ref1 ||| ... ||| hyp`; the field separator must not appear inside a text."""
    fields = ["SCORE", *(_meteor_field(r, keep_pipes) for r in references), _meteor_field(hypothesis, keep_pipes)]
    return (" ||| ".join(fields) + "\n").encode("utf-8")


_SPACE_RUN = re.compile(" {2,}")


def _meteor_field(text: str, keep_pipes: bool) -> str:
    """One text as a field of METEOR's stdio protocol: one line, with no `|||` (the field separator) inside.

    keep_pipes=False deletes `|||`, as pycocoevalcap (the E2E scorer) does. keep_pipes=True stands every `|` alone
    instead: with -norm METEOR makes each `|` a token of its own anyway, so these are the tokens its file mode (the
    one GenerationEval runs) sees for the unchanged text, and no `|||` is left.
    """
    if keep_pipes:
        return _SPACE_RUN.sub(" ", _LINE_BREAKS.sub(" ", text).replace("|", " | ")).strip(" ")
    return _LINE_BREAKS.sub(" ", text.replace("|||", "")).replace("  ", " ")


# ---------------------------------------------------------------------------------------------------------------
# ROUGE-L and CIDEr-D (the COCO caption toolkit's definitions, on PTB-tokenised text)
# ---------------------------------------------------------------------------------------------------------------


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyro): O(len(b)) big-int steps.

    Bit i of `row` is 1 while position i of `a` is still unmatched; each zero bit is one LCS element.
    """
    positions: dict[str, int] = {}
    for i, token in enumerate(a):
        positions[token] = positions.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for token in b:
        matches = row & positions.get(token, 0)
        row = (row + matches) | (row - matches)
    return len(a) - (row & full).bit_count()


ROUGE_BETA = 1.2


def rouge_l_instance(hypothesis: str, references: Sequence[str], beta: float = ROUGE_BETA) -> float:
    """COCO ROUGE-L F of one instance: precision and recall each maximised over references independently.

    Tokens come from `split(" ")`, as in pycocoevalcap, so an empty string is one empty token.
    """
    hyp = hypothesis.split(" ")
    precision = recall = 0.0
    for reference in references:
        ref = reference.split(" ")
        common = lcs_length(ref, hyp)
        precision = max(precision, common / len(hyp))
        recall = max(recall, common / len(ref))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def corpus_rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over instances of the instance ROUGE-L F."""
    scores = [rouge_l_instance(h, refs) for h, refs in zip(hypotheses, references, strict=True)]
    return sum(scores) / len(scores)


CIDER_N = 4
CIDER_SIGMA = 6.0


def _cider_counts(text: str, max_n: int = CIDER_N) -> Counter[NGram]:
    words = text.split()
    counts: Counter[NGram] = Counter()
    for n in range(1, max_n + 1):
        counts.update(ngrams(words, n))
    return counts


def _cider_vector(counts: Counter[NGram], idf: dict[NGram, float], log_n_docs: float, max_n: int):
    """tf-idf vector per n-gram order, its norms, and the number of bigrams (CIDEr-D's 'length')."""
    vec: list[dict[NGram, float]] = [{} for _ in range(max_n)]
    norm = [0.0] * max_n
    for gram, tf in counts.items():
        weight = tf * idf.get(gram, log_n_docs)  # an n-gram absent from every reference set has df 0 -> log(N)
        vec[len(gram) - 1][gram] = weight
        norm[len(gram) - 1] += weight * weight
    bigrams = sum(c for g, c in counts.items() if len(g) == 2)
    return vec, [math.sqrt(x) for x in norm], bigrams


def cider_d_scores(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = CIDER_N, sigma: float = CIDER_SIGMA
) -> list[float]:
    """Per-instance CIDEr-D as pycocoevalcap's CiderScorer computes it.

    idf(g) = log(N) - log(max(1, df(g))), df = number of instances whose reference *set* contains g.
    Per order: clipped cosine sum(min(h, r) * r) / (|h| |r|) times exp(-delta^2 / (2 sigma^2)), delta = difference
    in bigram counts. Mean over orders, mean over references, times 10.
    """
    ref_counts = [[_cider_counts(r, max_n) for r in refs] for refs in references]
    doc_freq: Counter[NGram] = Counter()
    for counts in ref_counts:
        doc_freq.update(set().union(*counts))
    log_n_docs = math.log(float(len(references)))
    idf = {gram: log_n_docs - math.log(max(1.0, df)) for gram, df in doc_freq.items()}

    scores = []
    for hyp, refs in zip(hypotheses, ref_counts, strict=True):
        h_vec, h_norm, h_len = _cider_vector(_cider_counts(hyp, max_n), idf, log_n_docs, max_n)
        total = 0.0
        for counts in refs:
            r_vec, r_norm, r_len = _cider_vector(counts, idf, log_n_docs, max_n)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                dot = sum(min(w, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, w in h_vec[n].items())
                if h_norm[n] != 0 and r_norm[n] != 0:
                    dot /= h_norm[n] * r_norm[n]
                total += dot * penalty
        scores.append(total / max_n / len(refs) * 10.0)
    return scores


def corpus_cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    scores = cider_d_scores(hypotheses, references)
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------------------------
# TER (translation edit rate with shifts, Snover et al. 2006), with pyter's shift search as GenerationEval uses it
# ---------------------------------------------------------------------------------------------------------------

def edit_distance(hyp: Sequence[str], ref: Sequence[str]) -> int:
    """Word-level Levenshtein distance (insertions, deletions, substitutions all cost 1).

    Myers' bit-vector algorithm in Hyyro's formulation: one column of the DP table per reference word is kept as
    two bit masks (vertical +1 / -1 deltas) over the hypothesis positions, so each step is a few big-int ops.
    TER evaluates thousands of candidate shifts, so this is its hot loop.
    """
    if not hyp:
        return len(ref)
    match_masks: dict[str, int] = {}
    for i, word in enumerate(hyp):
        match_masks[word] = match_masks.get(word, 0) | (1 << i)
    full = (1 << len(hyp)) - 1
    last = 1 << (len(hyp) - 1)
    plus, minus, distance = full, 0, len(hyp)
    for word in ref:
        eq = match_masks.get(word, 0)
        xv = eq | minus
        xh = (((eq & plus) + plus) ^ plus) | eq
        h_plus = minus | (~(xh | plus) & full)
        h_minus = plus & xh
        if h_plus & last:
            distance += 1
        elif h_minus & last:
            distance -= 1
        h_plus = ((h_plus << 1) | 1) & full
        h_minus = (h_minus << 1) & full
        plus = h_minus | (~(xv | h_plus) & full)
        minus = h_plus & xv
    return distance


def _shift_candidates(hyp: Sequence[str], ref: Sequence[str]):
    """(hyp start, ref start, length) of every maximal common run that starts at different positions.

    From each pair of equal words hyp[i] == ref[j] with i != j, the run extends while the following words match.
    """
    for i, word in enumerate(hyp):
        for j, ref_word in enumerate(ref):
            if i == j or word != ref_word:
                continue
            length = 1
            while i + length < len(hyp) and j + length < len(ref) and hyp[i + length] == ref[j + length]:
                length += 1
            yield i, j, length


def _best_shift(hyp: list[str], ref: Sequence[str], current: int) -> tuple[int, list[str]]:
    """The candidate shift with the largest edit-distance gain: (gain, shifted hypothesis), or (0, hyp) if none.

    The phrase is taken out and re-inserted at the reference start position of the remaining words. Ties go to the
    lexicographically greatest shifted word list, which is what pyter's `scores.sort(); scores[-1]` picks.
    """
    best: tuple[int, list[str]] | None = None
    for start, target, length in _shift_candidates(hyp, ref):
        rest = hyp[:start] + hyp[start + length :]
        shifted = rest[:target] + hyp[start : start + length] + rest[target:]
        candidate = (current - edit_distance(shifted, ref), shifted)
        if best is None or candidate > best:
            best = candidate
    return best if best is not None else (0, hyp)


def ter_edits(hypothesis: Sequence[str], reference: Sequence[str]) -> int:
    """Edits turning the hypothesis into the reference: greedy shifts (each costs 1) while one lowers the
    Levenshtein distance, then that distance. The shift search is pyter's (GenerationEval's TER), not tercom's
    (no 10-word / 50-position limits, no alignment-based pruning).
    """
    hyp = list(hypothesis)
    shifts = 0
    current = edit_distance(hyp, reference)
    while True:
        gain, shifted = _best_shift(hyp, reference, current)
        if gain <= 0:
            return shifts + current
        hyp, current, shifts = shifted, current - gain, shifts + 1


def sentence_ter(hypothesis: str, references: Sequence[str]) -> float:
    """min over references of edits / reference length (whitespace tokens), as GenerationEval's pyter loop does.

    An empty reference scores 1, as there (so it wins over references the output is further from). A repeated
    reference is scored once (decode pads instances with copies of their first reference).
    """
    hyp = hypothesis.split()
    best = math.inf
    for reference in dict.fromkeys(references):
        ref = reference.split()
        best = min(best, ter_edits(hyp, ref) / len(ref) if ref else 1.0)
    return best


def mean_ter(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """GenerationEval's TER: the mean over instances of the sentence TER."""
    scores = [sentence_ter(h, refs) for h, refs in zip(hypotheses, references, strict=True)]
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------------------------
# Whole evaluations
# ---------------------------------------------------------------------------------------------------------------

E2E_METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
GENERATION_METRICS = ("BLEU", "METEOR", "TER")


def e2e_scores(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    with_meteor: bool = True,
    nist_variant: str = "python",
    progress=None,
) -> dict[str, object]:
    """The E2E scorer's five metrics. METEOR is absent (not 0) when `with_meteor` is False.

    `nist_variant` picks the scorer's mode for BLEU and NIST together (METEOR, ROUGE-L and CIDEr are the same in
    both): "python" = `measure_scores.py -p` (pymteval), "perl" = its default run (mteval-v13a-sig.pl), the one the
    E2E challenge's published tables come from. (The name predates BLEU following it.)

    Also returns `ptb_tokenizer`: "stanford-corenlp-3.4.1" or "python-approximation" (Java missing, METEOR off).
    `progress`, when given, is called with a short label before each metric (for a progress bar).
    The METEOR process starts first: loading its paraphrase table (~10 s) overlaps with BLEU, NIST and the PTB run.
    """
    step = progress or (lambda label: None)
    _check_instances(hypotheses, references)
    with contextlib.ExitStack() as stack:
        meteor = stack.enter_context(Meteor()) if with_meteor else None
        scores: dict[str, object] = {}
        step("BLEU")
        scores["BLEU"] = corpus_bleu(hypotheses, references, variant="perl" if nist_variant == "perl" else "pymteval")
        step("NIST")
        scores["NIST"] = corpus_nist(hypotheses, references, variant=nist_variant)

        step("PTB tokenisation")
        use_java = with_meteor or java_available()
        tokenize = ptb_tokenize if use_java else ptb_tokenize_approx
        hyp_tok, ref_tok = _tokenize_corpus(tokenize, hypotheses, references)

        if meteor is not None:
            step("METEOR")
            scores["METEOR"] = meteor.corpus_score(hyp_tok, ref_tok)[0]
    step("ROUGE_L")
    scores["ROUGE_L"] = corpus_rouge_l(hyp_tok, ref_tok)
    step("CIDEr")
    scores["CIDEr"] = corpus_cider_d(hyp_tok, ref_tok)
    scores["ptb_tokenizer"] = "stanford-corenlp-3.4.1" if use_java else "python-approximation"
    return scores


def _tokenize_corpus(tokenize, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """Tokenise hypotheses and references in one call (one Java start) and regroup the references."""
    tokens = tokenize([*hypotheses, *(r for refs in references for r in refs)])
    hyp_tok, ref_tok, offset = tokens[: len(hypotheses)], [], len(hypotheses)
    for refs in references:
        ref_tok.append(tokens[offset : offset + len(refs)])
        offset += len(refs)
    return hyp_tok, ref_tok


def generation_scores(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], with_meteor: bool = True, progress=None
) -> dict[str, object]:
    """WebNLG / DART metrics as GenerationEval computes them: BLEU (multi-bleu-detok), METEOR 1.5, TER.

    Texts are the lines as read, and each instance's references are all of its lines in reference0..N-1 in file
    order, empty ones included: BLEU counts an empty reference as a 0-word reference, TER scores it 1, METEOR
    scores it like any other. BLEU tokenises the raw lines itself; METEOR and TER get nltk 3.5's word tokens
    (`genevel_tokenize`), as GenerationEval gives them, each distinct one once: a repeat scores exactly as its first
    occurrence, and METEOR keeps the first best reference, so dropping later repeats changes nothing (and decode's
    padding with copies of reference 0 would otherwise double METEOR's work).
    """
    step = progress or (lambda label: None)
    _check_instances(hypotheses, references)
    with contextlib.ExitStack() as stack:
        meteor = stack.enter_context(Meteor()) if with_meteor else None
        scores: dict[str, object] = {}
        step("BLEU")
        scores["BLEU"] = corpus_bleu(hypotheses, references, variant="multi-bleu-detok")
        step("TER")
        hyp_words = [tokenized_line(h) for h in hypotheses]
        ref_words = [list(dict.fromkeys(tokenized_line(r) for r in dict.fromkeys(refs))) for refs in references]
        scores["TER"] = mean_ter(hyp_words, ref_words)
        if meteor is not None:
            step("METEOR")
            scores["METEOR"] = meteor.corpus_score(hyp_words, ref_words, keep_pipes=True)[0]
    return {name: scores[name] for name in GENERATION_METRICS if name in scores}


def _check_instances(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if not hypotheses:
        raise ValueError("nothing to score: no instances")
    empty = next((i for i, refs in enumerate(references) if not refs), None)
    if empty is not None:
        raise ValueError(f"instance {empty + 1} has no references")
