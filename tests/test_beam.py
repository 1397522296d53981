"""Beam search against independent references: exhaustive search, greedy decoding, hand-computed logit processing.

The references here run the model without a KV cache and without padding (one full forward per prefix) and
process logits with plain-Python code, so they share nothing with `steps.decoding.beam` but the model weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from steps.decoding.beam import (
    REQUEST_OPTIONS,
    BeamConfig,
    apply_repetition_penalty,
    ban_repeated_ngrams,
    beam_search,
    next_token_logprobs,
)
from steps.model.gpt2 import GPT2, GPT2Config, KVCache
from steps.model.tokenizer import EOS_ID

NEG_INF = float("-inf")


def peaky_model(vocab: int, seed: int, std: float = 0.6, n_layer: int = 1) -> GPT2:
    """A tiny random GPT-2 with a small vocabulary and large weights: confident, tie-free distributions.

    Biases and LayerNorms keep their neutral init so the next-token distribution depends on the context.
    """
    torch.manual_seed(seed)
    model = GPT2(GPT2Config(n_embd=16, n_layer=n_layer, n_head=2, vocab_size=vocab, n_positions=64)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not (name.endswith("bias") or "ln_" in name):
                p.normal_(0, std)
    return model


# ----------------------------------------------------------------------------------------------- plain-Python reference


def naive_process(logits: list[float], history: list[int], step: int, cfg: BeamConfig) -> list[float]:
    """The original's order, written the obvious way: penalty, eos ban, n-gram ban, then log of softmax."""
    out = list(logits)
    if cfg.repetition_penalty != 1.0:
        for t in set(history):
            out[t] = out[t] * cfg.repetition_penalty if out[t] < 0 else out[t] / cfg.repetition_penalty
    if step < cfg.min_length:
        for e in cfg.eos_token_ids:
            out[e] = NEG_INF
    n = cfg.no_repeat_ngram_size
    if n > 0 and len(history) >= n:
        prefix = tuple(history[len(history) - n + 1 :])
        for j in range(len(history) - n + 1):
            if tuple(history[j : j + n - 1]) == prefix:
                out[history[j + n - 1]] = NEG_INF
    top = max(out)
    total = sum(math.exp(x - top) for x in out if x != NEG_INF)
    return [x - top - math.log(total) if x != NEG_INF else NEG_INF for x in out]


def step_logprobs(model: GPT2, query: list[int], prefix: list[int], cfg: BeamConfig) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([query + prefix]))[0, -1].tolist()
    return naive_process(logits, prefix, len(prefix), cfg)


def exhaustive_search(model: GPT2, query: list[int], cfg: BeamConfig) -> tuple[list[int], float]:
    """Score every possible output (ended by the first eos, or cut at eval_len) and return the best."""
    vocab = model.config.vocab_size
    eos = set(cfg.eos_token_ids)
    best: tuple[list[int], float] = ([], NEG_INF)
    frontier: list[tuple[list[int], float]] = [([], 0.0)]
    for length in range(1, cfg.eval_len + 1):
        grown = []
        for prefix, total in frontier:
            logprobs = step_logprobs(model, query, prefix, cfg)
            for t in range(vocab):
                if logprobs[t] == NEG_INF:
                    continue
                seq, score = [*prefix, t], total + logprobs[t]
                if t in eos or length == cfg.eval_len:
                    normalised = score / length**cfg.length_penalty
                    if normalised > best[1]:
                        best = (seq, normalised)
                else:
                    grown.append((seq, score))
        frontier = grown
    return best


def greedy(model: GPT2, query: list[int], cfg: BeamConfig) -> list[int]:
    out: list[int] = []
    for _ in range(cfg.eval_len):
        logprobs = step_logprobs(model, query, out, cfg)
        out.append(max(range(len(logprobs)), key=logprobs.__getitem__))
        if out[-1] in cfg.eos_token_ids:
            break
    return out


# ----------------------------------------------------------------------------------------------- processors


def test_repetition_penalty_matches_ctrl_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    history = torch.tensor([[0, 1, 1], [4, 4, 4]])
    got = apply_repetition_penalty(logits, history, 2.0)
    expected = torch.tensor([[1.0, -2.0, 0.5, -3.0, 1.0], [1.0, 1.0, 1.0, 1.0, 0.5]])  # each token once, even repeated
    assert torch.equal(got, expected)
    assert torch.equal(apply_repetition_penalty(logits, history, 1.0), logits)


def test_no_repeat_ngram_bans_exactly_the_completing_tokens():
    # history 5 1 2 5 1 -> bigrams (5,1) (1,2) (2,5) (5,1); trigram ban: last two (5,1) were followed by 2.
    history = torch.tensor([[5, 1, 2, 5, 1], [0, 0, 0, 0, 0], [1, 2, 3, 4, 6]])
    logits = torch.zeros(3, 8)
    got = ban_repeated_ngrams(logits, history, 3)
    banned = [set(torch.nonzero(row == NEG_INF).view(-1).tolist()) for row in got]
    assert banned == [{2}, {0}, set()]
    # bigram: the last token 1 was followed by 2 earlier; 5 followed by 1
    banned2 = [set(torch.nonzero(row == NEG_INF).view(-1).tolist()) for row in ban_repeated_ngrams(logits, history, 2)]
    assert banned2 == [{2}, {0}, set()]
    assert torch.equal(ban_repeated_ngrams(logits, history[:, :2], 3), logits)  # no complete trigram yet


def test_processing_order_matches_plain_python():
    torch.manual_seed(3)
    cfg = BeamConfig(beam=2, eval_len=8, min_length=7, no_repeat_ngram_size=2, repetition_penalty=1.7, eos_token_ids=(1, 4))
    logits = torch.randn(4, 9) * 3
    history = torch.randint(0, 9, (4, 6))
    got = next_token_logprobs(logits, history, 6, cfg)
    for row in range(4):
        expected = naive_process(logits[row].tolist(), history[row].tolist(), 6, cfg)
        for g, e in zip(got[row].tolist(), expected):
            assert (g == e == NEG_INF) or abs(g - e) < 1e-5
    assert (got[:, [1, 4]] == NEG_INF).all()  # eos banned before min_length


# ----------------------------------------------------------------------------------------------- search vs references

SETTINGS = [
    dict(length_penalty=0.8, no_repeat_ngram_size=4),
    dict(length_penalty=1.0, no_repeat_ngram_size=2, repetition_penalty=1.5),
    dict(length_penalty=0.0, no_repeat_ngram_size=0, min_length=2),
    dict(length_penalty=-0.5, no_repeat_ngram_size=2),
    dict(length_penalty=2.0, no_repeat_ngram_size=0, repetition_penalty=0.7),
]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("early_stop", [True, False])
def test_full_width_beam_equals_exhaustive_search(setting, early_stop):
    # V=4, one eos, eval_len 4: at most 4 * 3**3 = 108 finite candidates per step, so a 128-wide beam never prunes
    # a live path and must find the exhaustive optimum (reference beam search is not exact search in general).
    model = peaky_model(vocab=4, seed=1)
    cfg = BeamConfig(beam=128, eval_len=4, eos_token_ids=(3,), early_stop=early_stop, **setting)
    queries = [[0, 1, 2], [2], [1, 1, 0, 2, 2]]
    results = beam_search(model, queries, cfg)
    for query, got in zip(queries, results):
        tokens, score = exhaustive_search(model, query, cfg)
        assert got.tokens == tokens
        assert got.score == pytest.approx(score, abs=1e-4)
        assert got.finished == (tokens[-1] == 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_one_is_greedy(seed):
    model = peaky_model(vocab=12, seed=seed, n_layer=2)
    cfg = BeamConfig(beam=1, eval_len=10, eos_token_ids=(0, 5), no_repeat_ngram_size=3, repetition_penalty=1.2)
    queries = [[3, 4, 7], [9], [1, 2, 3, 4, 6, 8]]
    for query, got in zip(queries, beam_search(model, queries, cfg)):
        assert got.tokens == greedy(model, query, cfg)


def test_eos_handling_length_and_no_stale_tail():
    # Make token 0 the eos and overwhelmingly likely first: the result is just [eos] (an empty text, as the original allows).
    model = peaky_model(vocab=6, seed=4)
    cfg = BeamConfig(beam=3, eval_len=5, eos_token_ids=(0,), no_repeat_ngram_size=0)
    always_eos = beam_search(_Biased(model, 0, 50.0), [[1, 2]], cfg)[0]
    assert always_eos.tokens == [0] and always_eos.finished
    assert always_eos.score == pytest.approx(0.0, abs=1e-4)  # log(1) / 1**lp
    # Never eos: every hypothesis is cut at eval_len with exactly eval_len tokens.
    never = beam_search(_Biased(model, 0, -1e9), [[1, 2]], cfg)[0]
    assert len(never.tokens) == 5 and 0 not in never.tokens and not never.finished
    # min_length forbids the eos early even when it dominates.
    late = beam_search(_Biased(model, 0, 50.0), [[1, 2]], BeamConfig(beam=3, eval_len=5, eos_token_ids=(0,), min_length=3,
                                                                     no_repeat_ngram_size=0))[0]
    assert late.tokens[-1] == 0 and len(late.tokens) == 4


class _Biased:
    """Wraps a model and adds a constant to one token's logit."""

    def __init__(self, model: GPT2, token: int, bias: float):
        self.model, self.token, self.bias = model, token, bias

    def parameters(self):
        return self.model.parameters()

    def hidden(self, *args, **kwargs):
        return self.model.hidden(*args, **kwargs)

    def logits(self, hidden):
        out = self.model.logits(hidden).clone()
        out[..., self.token] += self.bias
        return out


class _Counting(_Biased):
    def __init__(self, model: GPT2):
        super().__init__(model, 0, 0.0)
        self.calls = 0

    def hidden(self, *args, **kwargs):
        self.calls += 1
        return self.model.hidden(*args, **kwargs)


@pytest.mark.parametrize("length_penalty", [0.8, 1.0, 0.0, -0.5])
def test_early_stop_changes_nothing_but_the_work(length_penalty):
    model = peaky_model(vocab=24, seed=5, std=0.5, n_layer=2)
    queries = [list(range(1, 1 + (i % 5) + 1)) for i in range(12)]
    base = dict(beam=4, eval_len=16, length_penalty=length_penalty, eos_token_ids=(0, 7), no_repeat_ngram_size=3)
    with_stop, without = _Counting(model), _Counting(model)
    fast = beam_search(with_stop, queries, BeamConfig(**base, early_stop=True))
    slow = beam_search(without, queries, BeamConfig(**base, early_stop=False))
    assert [(h.tokens, h.finished) for h in fast] == [(h.tokens, h.finished) for h in slow]
    assert [h.score for h in fast] == pytest.approx([h.score for h in slow], abs=1e-5)
    assert without.calls == 16
    if length_penalty <= 0:  # the bound is tight enough to stop here (lp > 0 must wait for longer hypotheses)
        assert with_stop.calls < without.calls


class MarkovLM:
    """A toy model for the CausalLM protocol: the next-token distribution depends on the last token only."""

    def __init__(self, probs: list[list[float]]):
        self.table = torch.tensor(probs).log()  # [V, V]: row = last token

    def parameters(self):
        return iter([self.table])

    def hidden(self, input_ids, position_ids=None, attention_mask=None, past=None):
        ids = input_ids.float()[:, None, :, None]  # a stand-in cache that beam search must reorder correctly
        if past is None:
            past = [KVCache(ids, ids)]
        else:
            past[0].append(ids, ids)
        return torch.nn.functional.one_hot(input_ids, self.table.shape[0]).float(), past

    def logits(self, hidden):
        return hidden @ self.table


def test_early_stop_waits_for_longer_hypotheses_when_length_penalty_is_positive():
    # After the query, eos (3) has p=0.9: [3] scores log 0.9 = -0.105. The other path starts at p=0.1 (s = -2.3) and
    # then alternates 1, 2 almost surely. At eval_len 40 and lp 1 it ends at about -2.34 / 40 = -0.06 and wins,
    # although its score at the moment [3] finished was far below -0.105: a bound that ignores the growing length
    # (s / (cur_len+1)**lp) would stop after the first step and return [3].
    model = _Counting(MarkovLM([[0.0001, 0.0998, 0.0001, 0.9], [0.0005, 0.0005, 0.998, 0.001],
                                [0.0005, 0.998, 0.0005, 0.001], [0.25, 0.25, 0.25, 0.25]]))
    base = dict(beam=2, eval_len=40, eos_token_ids=(3,), no_repeat_ngram_size=0)
    for early_stop in (True, False):
        got = beam_search(model, [[0]], BeamConfig(length_penalty=1.0, early_stop=early_stop, **base))[0]
        assert got.tokens == [1, 2] * 20 and not got.finished
    # With lp = 0 the same state is provably final: the search stops right after the first step.
    model.calls = 0
    got = beam_search(model, [[0]], BeamConfig(length_penalty=0.0, **base))[0]
    assert got.tokens == [3] and got.score == pytest.approx(math.log(0.9), abs=1e-5)
    assert model.calls == 1  # the prefill only


class _CacheSpy:
    """Passes every call through to a GPT2 and records the cache objects beam search hands it."""

    def __init__(self, model: GPT2):
        self.model, self.pasts = model, []

    def parameters(self):
        return self.model.parameters()

    def hidden(self, input_ids, **kwargs):
        self.pasts.append(kwargs.get("past"))
        return self.model.hidden(input_ids, **kwargs)

    def logits(self, hidden):
        return self.model.logits(hidden)


def test_decoding_writes_each_token_into_one_preallocated_cache():
    # The speed of the search rests on this: after the prefill every step extends the same buffers in place.
    spy = _CacheSpy(peaky_model(vocab=30, seed=3))
    cfg = BeamConfig(beam=3, eval_len=6, eos_token_ids=(0,), no_repeat_ngram_size=0, early_stop=False)
    beam_search(spy, [[4, 5, 6], [7]], cfg)
    prefill, steps = spy.pasts[0], spy.pasts[1:]
    assert prefill is None and len(steps) == cfg.eval_len - 1
    layers = steps[0]
    assert all(isinstance(layer, KVCache) for layer in layers)
    assert all(past[0] is layers[0] for past in steps)  # the same object throughout: no per-step copies
    assert layers[0].k.shape[:3] == (6, 2, 3 + cfg.eval_len) and layers[0].length == 3 + cfg.eval_len - 1


class _FirstStepRowBug(_Biased):
    """Reproduces the original's batching bug: at step 0 query b reads the logits of expanded row b, i.e. query b // K."""

    def __init__(self, model: GPT2, beam: int):
        super().__init__(model, 0, 0.0)
        self.beam = beam

    def logits(self, hidden):
        out = self.model.logits(hidden)
        if self._prefill:
            out = out[torch.arange(out.shape[0]) // self.beam]
        return out

    def hidden(self, input_ids, **kwargs):
        self._prefill = kwargs.get("past") is None
        return self.model.hidden(input_ids, **kwargs)


def test_batched_equals_one_at_a_time_and_no_row_indexing_bug():
    # The setting the original's bug was measured in: 4 queries, beam 3, eval_len 6, batch 2 vs batch 1; plus
    # different query lengths.
    model = peaky_model(vocab=40, seed=0, std=0.6, n_layer=2)
    queries = [[5, 6, 7, 8, 9, 10, 11], [21], [13, 14, 15], [30, 31, 32, 33, 34]]
    cfg = BeamConfig(beam=3, eval_len=6, eos_token_ids=(0,), no_repeat_ngram_size=4, length_penalty=0.8)
    alone = [beam_search(model, [q], cfg)[0] for q in queries]
    for batch in (2, 4):
        together = [h for i in range(0, 4, batch) for h in beam_search(model, queries[i : i + batch], cfg)]
        assert [h.tokens for h in together] == [h.tokens for h in alone]
        assert [h.score for h in together] == pytest.approx([h.score for h in alone], abs=1e-5)
    # The same comparison catches the original's bug: with it, ids 1 and 3 differ and ids 0 and 2 match, as measured
    # on the original code.
    buggy = _FirstStepRowBug(model, cfg.beam)
    bugged = [h.tokens for i in (0, 2) for h in beam_search(buggy, queries[i : i + 2], cfg)]
    assert [b == a.tokens for b, a in zip(bugged, alone)] == [True, False, True, False]


def test_k_larger_than_vocab_and_empty_input():
    model = peaky_model(vocab=3, seed=7)
    cfg = BeamConfig(beam=8, eval_len=3, eos_token_ids=(2,), no_repeat_ngram_size=0)
    got = beam_search(model, [[0, 1]], cfg)[0]
    assert (got.tokens, pytest.approx(got.score, abs=1e-4)) == exhaustive_search(model, [0, 1], cfg)
    assert beam_search(model, [], cfg) == []
    with pytest.raises(ValueError):
        beam_search(model, [[]], cfg)


def test_exhaustive_reference_is_not_trivial():
    """Guard for the references themselves: outputs vary with the setting, so agreement above means something."""
    model = peaky_model(vocab=4, seed=1)
    outs = {tuple(exhaustive_search(model, [0, 1, 2], BeamConfig(beam=1, eval_len=4, eos_token_ids=(3,), **s))[0])
            for s in SETTINGS}
    assert len(outs) >= 2
    assert any(len(o) > 1 for o in outs)


def test_one_search_from_the_decode_cli_params_yaml_and_the_logged_model_config():
    """The decode stage's arguments, params.yaml's decode section and the registered model's config are read by the one
    BeamConfig declaration, so the served model searches exactly as the decode stage did."""
    import yaml

    from steps.decode import build_parser

    decode = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["decode"]
    argv = ["--data", "d.jsonl", *(f"--{k}={decode[k]}" for k in REQUEST_OPTIONS), f"--eos_token_id={decode['eos_token_id']}"]
    from_cli = BeamConfig.from_settings(vars(build_parser().parse_args(argv)))
    from_params = BeamConfig.from_settings(decode)
    assert from_cli == from_params and set(from_params.eos_token_ids) == {EOS_ID, decode["eos_token_id"]}
    assert BeamConfig.from_mapping(from_params.as_model_config()) == from_params  # the logged config reads back the same
    assert isinstance(BeamConfig.from_settings({"length_penalty": 1}).length_penalty, float)  # YAML's 1 is a float setting
