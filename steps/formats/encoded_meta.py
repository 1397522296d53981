"""The encoded data files' sidecar (`<file>.meta.json`): how a file was encoded, read before training on it.

steps.encode writes it; the trainer reads it to refuse data encoded with another tokenizer or other
bos/eos flags. It lives apart from the encode stage so that reading it costs no tokenizer import, and
an edit to the encode stage does not retrain the model under DVC.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steps.core.common import InputError

META_FORMAT = "nlg-encoded"
META_VERSION = 1


def meta_path(output: str | Path) -> Path:
    """Where the sidecar of an encoded file lives: `<output>.meta.json`."""
    output = Path(output)
    return output.with_name(output.name + ".meta.json")


def read_encoded_meta(path: str | Path) -> dict[str, Any] | None:
    """The sidecar of the encoded file `path`, or None when it has none (e.g. written by the original gpt2_encode.py).

    Raises InputError when the sidecar exists but is not ours or is from a newer version, so the
    trainer never guesses. Keys: format, version, tokenizer, vocab_sha256, add_bos, add_eos, source,
    examples, max_len (longest context + completion, special tokens included), max_context_len,
    max_completion_len.
    """
    sidecar = meta_path(path)
    if not sidecar.exists():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"unreadable metadata ({exc}); re-run steps.encode to rewrite it", sidecar) from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise InputError(f'expected {{"format": "{META_FORMAT}", ...}}; re-run steps.encode', sidecar)
    if not isinstance(meta.get("version"), int) or meta["version"] > META_VERSION:
        raise InputError(f"metadata version {meta.get('version')!r} is newer than this code ({META_VERSION}); update the code", sidecar)
    return meta


def check_same_encoding(train_path: str, valid_path: str) -> None:
    """Refuse train/valid files encoded differently (another tokenizer or other bos/eos flags)."""
    metas = {p: read_encoded_meta(p) for p in (train_path, valid_path)}
    known = {p: m for p, m in metas.items() if m is not None}
    if len(known) == 2:
        keys = ("tokenizer", "vocab_sha256", "add_bos", "add_eos")
        a, b = known.values()
        diff = [k for k in keys if a.get(k) != b.get(k)]
        if diff:
            raise InputError(f"encoded with different settings than {train_path} ({', '.join(diff)}); re-encode both with steps.encode", valid_path)
    for path, meta in known.items():
        if meta.get("tokenizer", "gpt2-bpe") != "gpt2-bpe":
            raise InputError(f"encoded with tokenizer {meta.get('tokenizer')!r}, GPT-2 needs gpt2-bpe", path)
