"""Batched beam search with the original gpt2_beam.py's scoring, on a KV cache.

What is kept from the original, because it defines the reference outputs:
  - per step, on the raw logits: CTRL repetition penalty over the row's distinct generated tokens, then the eos
    ban while fewer than `min_length` tokens exist, then the no-repeat n-gram ban over generated tokens only, then
    log_softmax (renormalised over the allowed tokens);
  - candidates = cumulative beam score + log-prob, only beam 0 at step 0; top-K over K*V, sorted descending;
  - a candidate ending in an eos id is a finished hypothesis scored `score / cur_len ** length_penalty`
    (cur_len counts the generated tokens including the eos); it is kept if strictly better than the best so far,
    and its slot gets -inf, so the beam has one hypothesis fewer for one step (not HF's "2K candidates" scheme);
  - after `eval_len` steps the live rows compete with cur_len = eval_len.

What differs from the original, none of it changing an output (docs/fidelity.md, "Decoding"): rows are
indexed 0..B*K-1, so a query decoded in a batch gets what it gets alone (the original read other queries' rows
at the first step when batch > 1); the best hypothesis keeps its own length and no tokens of an older, longer
one; queries are left-padded and prefilled once, then one token per step goes through a cache with room for
eval_len more positions, in which beams reorder only their generated positions (the original padded every query
to seq_len and ran all eval_len steps); and an example stops as soon as no live beam can beat its best finished
hypothesis (see `_upper_bound`); finished examples leave the batch.

This module is plain PyTorch: the model is anything with `hidden(...)` and `logits(...)` like `steps.model.gpt2.GPT2`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from steps.model.gpt2 import KVCache
from steps.model.tokenizer import EOS_ID

NEG_INF = float("-inf")


class CausalLM(Protocol):
    """The two calls beam search needs (`steps.model.gpt2.GPT2` provides them)."""

    def hidden(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past: list[KVCache] | None = None,
    ) -> tuple[torch.Tensor, list[KVCache]]: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class BeamConfig:
    """What defines a search's result, with the original gpt2_beam.py's defaults.

    This is the one home of the decoding defaults: the decode CLI reads its defaults from these fields, and
    every other caller builds a BeamConfig (the pipeline's values live in params.yaml). `eos_token_ids` lists
    every stop id; the original's `--eos_token_id` appended to a list that starts with <|endoftext|>.
    """

    beam: int = 1
    eval_len: int = 256
    min_length: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 4
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = (EOS_ID,)
    early_stop: bool = True  # provably output-neutral; False reproduces the original's always-eval_len-steps loop
    pad_token_id: int = 0  # only fills the left padding, which attention never sees

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_token_ids", tuple(sorted(set(self.eos_token_ids))))  # a set of stop ids, in one order
        if self.beam < 1 or self.eval_len < 1:
            raise ValueError(f"beam and eval_len must be >= 1 (got beam={self.beam}, eval_len={self.eval_len})")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (got {self.repetition_penalty})")
        if not math.isfinite(self.length_penalty):  # nan made every score nan: all predictions came out empty
            raise ValueError(f"length_penalty must be a finite number (got {self.length_penalty})")
        if self.min_length < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError(f"min_length and no_repeat_ngram_size must be >= 0 (got {self.min_length}, {self.no_repeat_ngram_size})")
        if not self.eos_token_ids:
            raise ValueError("eos_token_ids must name at least one token")

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> BeamConfig:
        """The fields that `settings` names (parsed arguments, a model config); other keys are ignored."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in settings.items() if key in names})

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> BeamConfig:
        """From the original's option names, as the decode CLI's arguments and params.yaml's `decode` section give them:
        `eos_token_id` (one id or a list) is appended to the stop ids, which start with <|endoftext|> as in the
        original; numbers take their field's type (a YAML `length_penalty: 1` is the float 1.0)."""
        extra = settings.get("eos_token_id")
        extra = [] if extra is None else list(extra) if isinstance(extra, list | tuple) else [extra]
        values = {"eos_token_ids": tuple(dict.fromkeys([*cls().eos_token_ids, *extra]))}
        for field in dataclasses.fields(cls):
            value = settings.get(field.name)
            if field.name in REQUEST_OPTIONS and value is not None:
                whole_for_float = field.type == "float" and isinstance(value, int) and not isinstance(value, bool)
                values[field.name] = float(value) if whole_for_float else value
        return cls(**values)

    def as_model_config(self) -> dict[str, Any]:
        """The fields as JSON values, for a logged model's config (`from_mapping` reads them back)."""
        return {**dataclasses.asdict(self), "eos_token_ids": list(self.eos_token_ids)}


# The settings a caller may change per request (the MLflow model's params); the rest stay the model's.
REQUEST_OPTIONS = ("beam", "length_penalty", "eval_len", "no_repeat_ngram_size", "repetition_penalty", "min_length")


@dataclass
class Hypothesis:
    """The best result for one query."""

    tokens: list[int]  # generated ids, the eos included when `finished`
    score: float  # cumulative log-probability / len(tokens) ** length_penalty (-inf when nothing was found)
    finished: bool  # True: ended on an eos; False: cut at eval_len


# ----------------------------------------------------------------------------------------------- logit processors


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already generated in the row: negative logits *penalty, others /penalty.

    `history` [R, i] holds generated tokens only (the context is not penalised, as in the original). Duplicate
    tokens are harmless: each scatter writes the same value computed from the raw logit.
    """
    if penalty == 1.0 or history.shape[1] == 0:
        return logits
    seen = logits.gather(1, history)
    return logits.scatter(1, history, torch.where(seen < 0, seen * penalty, seen / penalty))


def ban_tokens(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Set the given ids to -inf in every row (used for the eos ban before `min_length`)."""
    logits = logits.clone()
    logits[:, list(token_ids)] = NEG_INF
    return logits


def ban_repeated_ngrams(logits: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid every token that would complete an n-gram already present in the row's generated tokens.

    With history h[0..i-1] the next n-gram is h[i-n+1..i-1] + t; t is banned if some window h[j..j+n-1] starts
    with the same n-1 tokens. Vectorised over rows with `unfold`, so it stays on the device.
    """
    i = history.shape[1]
    if n <= 0 or i < n:  # no complete n-gram in the history yet
        return logits
    if n == 1:  # every generated token is a 1-gram: ban them all
        return logits.scatter(1, history, NEG_INF)
    windows = history.unfold(1, n, 1)  # [R, i-n+1, n]
    prefix = history[:, i - n + 1 :]  # the last n-1 tokens, [R, n-1]
    matches = (windows[:, :, :-1] == prefix.unsqueeze(1)).all(dim=2)  # [R, i-n+1]
    rows, cols = matches.nonzero(as_tuple=True)
    if rows.numel() == 0:  # the common case: no copy of the [R, V] logits
        return logits
    logits = logits.clone()
    logits[rows, windows[rows, cols, -1]] = NEG_INF
    return logits


def process_logits(logits: torch.Tensor, history: torch.Tensor, step: int, cfg: BeamConfig) -> torch.Tensor:
    """The original's order (repetition penalty, eos ban, n-gram ban) on raw logits [R, V], in float32."""
    logits = logits.float()
    logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty)
    if step < cfg.min_length:
        logits = ban_tokens(logits, cfg.eos_token_ids)
    return ban_repeated_ngrams(logits, history, cfg.no_repeat_ngram_size)


def next_token_logprobs(logits: torch.Tensor, history: torch.Tensor, step: int, cfg: BeamConfig) -> torch.Tensor:
    """`process_logits`, then log_softmax: renormalised over the allowed tokens, as the original's log(softmax)."""
    return F.log_softmax(process_logits(logits, history, step, cfg), dim=-1)


# ----------------------------------------------------------------------------------------------- the search


def _upper_bound(scores: torch.Tensor, cur_len: int, eval_len: int, length_penalty: float) -> torch.Tensor:
    """The best normalised score any descendant of a live beam could still reach.

    A live beam has cumulative log-prob s <= 0 after cur_len tokens. Every descendant ends with some length L in
    (cur_len, eval_len] and a cumulative score s' <= s, because each further log-prob is <= 0. Its normalised score
    is s' / L**lp <= s / L**lp (L**lp > 0). For s <= 0, s / L**lp grows with L when lp > 0 (dividing a negative
    number by a larger value brings it towards 0: a longer hypothesis CAN overtake a shorter one), and shrinks with
    L when lp < 0. So the bound is s / eval_len**lp for lp > 0, s / (cur_len+1)**lp for lp < 0, and s for lp = 0.
    Float rounding of a division by a positive constant is monotone, so the float32 bound is still a bound.
    """
    length = eval_len if length_penalty > 0 else cur_len + 1
    return scores / float(length) ** length_penalty


def _left_pad(queries: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-align the queries: ids [B, T], key mask [B, T] (True = real token), positions [B, T]."""
    lengths = torch.tensor([len(q) for q in queries], device=device)
    width = int(lengths.max())
    ids = torch.full((len(queries), width), pad, dtype=torch.long, device=device)
    for row, q in enumerate(queries):
        ids[row, width - len(q) :] = torch.as_tensor(list(q), dtype=torch.long, device=device)
    offset = torch.arange(width, device=device).unsqueeze(0) - (width - lengths).unsqueeze(1)
    return ids, offset >= 0, offset.clamp(min=0)


def _fp32_logits(model: CausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head in float32 even under bf16/fp16 autocast: bf16 logits (8-bit mantissa) would create ties and
    reorder close candidates; the body of the model may run in low precision, the scores that rank beams do not."""
    with torch.autocast(hidden.device.type, enabled=False):
        return model.logits(hidden.float())


def _model_device(model: CausalLM) -> torch.device:
    try:
        return next(model.parameters()).device  # type: ignore[attr-defined]
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def beam_search(model: CausalLM, queries: Sequence[Sequence[int]], cfg: BeamConfig) -> list[Hypothesis]:
    """Decode every query together; return the best hypothesis per query, in input order.

    The batch holds B = len(queries) examples of K rows each (row b*K + k is beam k of query b). The caller picks
    the precision (wrap the call in `torch.autocast`); scores are always computed in float32.
    """
    if not queries:
        return []
    if any(len(q) == 0 for q in queries):
        raise ValueError("every query needs at least one token (E2E queries end with <|endoftext|>)")
    device = _model_device(model)
    K, n = cfg.beam, len(queries)
    eos = torch.tensor(sorted(set(cfg.eos_token_ids)), device=device)
    best: list[Hypothesis] = [Hypothesis([], NEG_INF, False) for _ in range(n)]

    ids, key_mask, positions = _left_pad(queries, cfg.pad_token_id, device)
    hidden, past = model.hidden(ids, position_ids=positions, attention_mask=None if key_mask.all() else key_mask)
    for layer in past:  # room for every token the search may generate, so each step writes in place
        layer.reserve(ids.shape[1] + cfg.eval_len)
    step_logits = _fp32_logits(model, hidden[:, -1])  # [n, V]: the step-0 distribution of each query (beam 0 only)
    vocab = step_logits.shape[-1]

    active = torch.arange(n, device=device)  # which queries are still searched; their rows are contiguous
    next_pos = positions[:, -1] + 1  # per query: position id of the first generated token
    history = torch.empty(n, 0, dtype=torch.long, device=device)
    beam_scores = torch.zeros(n, 1, device=device)  # step 0: one (beam 0) row per query
    width = 1  # rows per query in the current tensors (1 before the first top-K, then K)

    for step in range(cfg.eval_len):
        if step > 0:
            tokens = history[:, -1:]
            pos = (next_pos.repeat_interleave(width) + step - 1).unsqueeze(1)
            mask = None if key_mask.all() else key_mask
            hidden, past = model.hidden(tokens, position_ids=pos, attention_mask=mask, past=past)
            step_logits = _fp32_logits(model, hidden[:, -1])
        # The global top-K over K*V candidates can only use each row's own top K: a top-K per row, then one over
        # K*K candidates per query. (log_softmax is one fused pass; logsumexp alone took twice as long.)
        row_top, row_token = next_token_logprobs(step_logits, history, step, cfg).topk(min(K, vocab), dim=1)
        per_row = row_top.shape[1]
        candidates = (row_top + beam_scores.view(-1, 1)).view(len(active), width * per_row)
        if candidates.shape[1] < K:  # only when K > V at step 0: fill with impossible candidates
            candidates = F.pad(candidates, (0, K - candidates.shape[1]), value=NEG_INF)
        beam_scores, flat = candidates.topk(K, dim=1)  # sorted descending, like the original
        flat = flat.clamp(max=width * per_row - 1)  # padded slots (score -inf) point at a real candidate
        source_beam = flat // per_row
        token = row_token.view(len(active), width * per_row).gather(1, flat)
        source = (torch.arange(len(active), device=device) * width).unsqueeze(1) + source_beam.clamp(max=width - 1)
        source, token = source.view(-1), token.view(-1)
        history = torch.cat((history.index_select(0, source), token.unsqueeze(1)), dim=1)
        width = K

        ended = torch.isin(token, eos).view(len(active), K) & beam_scores.isfinite()
        if ended.any():
            _record(best, active, ended, beam_scores / float(step + 1) ** cfg.length_penalty, history, finished=True)
            beam_scores = beam_scores.masked_fill(ended, NEG_INF)

        keep = _still_searching(best, active, beam_scores, step + 1, cfg) if cfg.early_stop else None
        if keep is not None:
            if not keep.any():
                return best
            rows = (keep.nonzero().squeeze(1) * K).unsqueeze(1) + torch.arange(K, device=device)
            active, beam_scores, next_pos = active[keep], beam_scores[keep], next_pos[keep]
            source, history = source.view(-1, K)[keep].view(-1), history.index_select(0, rows.view(-1))
        if step + 1 < cfg.eval_len:  # move the cache rows to follow their beams (and drop finished queries)
            new_key = torch.ones(len(source), 1, dtype=torch.bool, device=device)
            key_mask = torch.cat((key_mask.index_select(0, source), new_key), dim=1)
            prompt_width = ids.shape[1] if keep is None else 0  # a query's beams share its prompt: it stays put
            for layer in past:  # (unless queries were dropped: then every position moves)
                layer.select_rows(source, same_before=prompt_width)

    live = beam_scores.isfinite()
    if live.any():
        _record(best, active, live, beam_scores / float(cfg.eval_len) ** cfg.length_penalty, history, finished=False)
    return best


def _record(
    best: list[Hypothesis], active: torch.Tensor, candidates: torch.Tensor, normalised: torch.Tensor,
    history: torch.Tensor, finished: bool,
) -> None:
    """Keep each candidate that strictly beats its query's best so far, visiting rows in order like the original."""
    K = candidates.shape[1]
    scores, queries = normalised.tolist(), active.tolist()  # one device->host copy each, not one per candidate
    for a, k in candidates.nonzero().tolist():
        score, query = scores[a][k], queries[a]
        if score > best[query].score:
            best[query] = Hypothesis(history[a * K + k].tolist(), score, finished)


def _still_searching(
    best: list[Hypothesis], active: torch.Tensor, beam_scores: torch.Tensor, cur_len: int, cfg: BeamConfig
) -> torch.Tensor | None:
    """Bool mask over the active queries that may still improve, or None when all of them may (nothing to drop).

    A query is done when it has a finished hypothesis and no live beam's `_upper_bound` exceeds it (a candidate
    must be strictly better to replace the best), or when every beam is -inf. Dropping it cannot change any output.
    """
    if cur_len >= cfg.eval_len:
        return None
    bound = _upper_bound(beam_scores, cur_len, cfg.eval_len, cfg.length_penalty).max(dim=1).values.tolist()
    keep = [b > best[int(q)].score for b, q in zip(bound, active.tolist())]
    if all(keep):
        return None
    return torch.tensor(keep, device=beam_scores.device)
