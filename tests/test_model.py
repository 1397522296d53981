"""GPT-2 parity with Hugging Face transformers, LoRA merge/unmerge, base-weight loading errors."""

from __future__ import annotations

import pytest
import torch

from steps.core.common import InputError
from steps.formats.checkpoints import load_base_weights, read_tensors, save_hf_checkpoint
from steps.model.gpt2 import CARDS, GPT2, GPT2Config
from steps.model.lora import LoRAConfig, mark_only_lora_trainable

transformers = pytest.importorskip("transformers")

SMALL = GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=1000, n_positions=128)


def hf_model(cfg: GPT2Config, seed: int = 0):
    torch.manual_seed(seed)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
    )
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and ones LayerNorms: randomise everything so parity is meaningful
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "lmhead-bin"])
def test_logits_match_transformers(tmp_path, fmt):
    hf = hf_model(SMALL)
    if fmt == "safetensors":
        hf.transformer.save_pretrained(tmp_path, safe_serialization=True)
        path = tmp_path / "model.safetensors"
    elif fmt == "bin":  # the original's gpt2-*-pytorch_model.bin: GPT2Model keys, Conv1D layout
        path = tmp_path / "pytorch_model.bin"
        torch.save(hf.transformer.state_dict(), path)
    else:  # GPT2LMHeadModel keys (transformer.* + lm_head.weight): silently ignored by the original, loaded here
        path = tmp_path / "pytorch_model.bin"
        torch.save(hf.state_dict(), path)
    ours = GPT2(SMALL).eval()
    load_base_weights(ours, path)
    ids = torch.randint(0, SMALL.vocab_size, (3, 17))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max().item() < 1e-4


def test_kv_cache_and_left_padding_match_full_forward():
    torch.manual_seed(0)
    model = GPT2(SMALL, LoRAConfig(r=2, alpha=8)).eval()
    ids = torch.randint(0, SMALL.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(ids)
        _, past = model.hidden(ids[:, :6])
        for layer in past:
            layer.reserve(9)
        step = model.logits(model.hidden(ids[:, 6:], past=past)[0])
        assert torch.allclose(step, full[:, 6:], atol=1e-5)
        # Row 1 left-padded by 3: same logits for its real tokens given explicit positions and a key mask.
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[1:, :6]], dim=1)
        mask = torch.tensor([[False] * 3 + [True] * 6])
        pos = (torch.arange(9) - 3).clamp(min=0).unsqueeze(0)
        out = model(padded, position_ids=pos, attention_mask=mask)
        assert torch.allclose(out[:, 3:], full[1:, :6], atol=1e-5)


def test_preallocated_cache_matches_concatenation_and_follows_row_moves():
    torch.manual_seed(0)
    model = GPT2(SMALL).eval()
    ids = torch.randint(0, SMALL.vocab_size, (3, 10))
    with torch.no_grad():
        full = model(ids)
        _, cache = model.hidden(ids[:, :4])
        for layer in cache:
            assert layer.capacity == 4  # the prompt's keys and values as they came, not copied
            layer.reserve(10)
        for t in range(4, 10):  # token by token through the in-place buffers
            hidden, returned = model.hidden(ids[:, t : t + 1], past=cache)
            assert all(a is b for a, b in zip(returned, cache))
            assert torch.allclose(model.logits(hidden)[:, 0], full[:, t], atol=1e-5)
        assert cache[0].length == 10 and cache[0].cached()[0].shape == (3, SMALL.n_head, 10, SMALL.head_dim)
        with pytest.raises(ValueError, match="holds 10 positions"):
            model.hidden(ids[:, :1], past=cache)
        # Rows follow a permutation (only positions >= 4 are copied: the caller vouches the first 4 are equal)
        # and then shrink to two rows (everything is copied).
        layer = cache[1]
        keys = layer.cached()[0].clone()
        shared = keys[:, :, :4].clone()
        layer.k[:, :, :4] = shared[0]  # make the promise true: every row has row 0's first 4 positions
        layer.select_rows(torch.tensor([2, 0, 1]), same_before=4)
        after = layer.cached()[0]
        assert torch.equal(after[:, :, 4:], keys[[2, 0, 1], :, 4:]) and torch.equal(after[:, :, :4], shared[[0, 0, 0]])
        layer.select_rows(torch.tensor([1, 1]))
        assert torch.equal(layer.cached()[0][:, :, 4:], keys[[0, 0], :, 4:]) and layer.k.shape[2] == 10


def test_lora_merge_unmerge_is_exact_and_zero_init_is_identity():
    torch.manual_seed(0)
    base = GPT2(SMALL).eval()
    model = GPT2(SMALL, LoRAConfig(r=4, alpha=32, targets=("q", "v"))).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    ids = torch.randint(0, SMALL.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))  # B = 0: the adapter starts as the identity
        for block in model.h:
            block.attn.c_attn.lora_B.normal_()
        weights = [b.attn.c_attn.weight.clone() for b in model.h]
        unmerged = model(ids)
        model.merge_lora()
        merged = model(ids)
        model.unmerge_lora()
        assert (merged - unmerged).abs().max() < 1e-4 * unmerged.abs().max()
        assert all(torch.equal(w, b.attn.c_attn.weight) for w, b in zip(weights, model.h))
        assert torch.equal(model(ids), unmerged)


def test_lora_update_only_touches_adapted_slices():
    torch.manual_seed(0)
    model = GPT2(SMALL, LoRAConfig(r=2, alpha=4, targets=("v", "q")))
    c_attn = model.h[0].attn.c_attn
    with torch.no_grad():
        c_attn.lora_B.normal_()
    x = torch.randn(5, SMALL.n_embd)
    delta = c_attn(x) - torch.nn.functional.linear(x, c_attn.weight, c_attn.bias)
    n, r = SMALL.n_embd, 2
    assert delta[:, n : 2 * n].abs().max() == 0  # k untouched
    a, b = c_attn.lora_A, c_attn.lora_B
    expected_q = x @ a[:r].T @ b[:n].T * 2.0
    expected_v = x @ a[r:].T @ b[n:].T * 2.0
    assert torch.allclose(delta[:, :n], expected_q, atol=1e-5)
    assert torch.allclose(delta[:, 2 * n :], expected_v, atol=1e-5)


def test_lora_layers_are_initialised_independently():
    model = GPT2(SMALL, LoRAConfig(r=2, alpha=4))
    assert not torch.equal(model.h[0].attn.c_attn.lora_A, model.h[1].attn.c_attn.lora_A)


def test_trainable_parameter_counts_match_the_reference():
    for name, expected in [("gpt2.md", 393_216), ("gpt2.sm", 147_456)]:
        with torch.device("meta"):
            model = GPT2(CARDS[name], LoRAConfig(r=4, alpha=32))
        mark_only_lora_trainable(model)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_missing_or_misshaped_base_weights_fail_clearly(tmp_path):
    model = GPT2(SMALL)
    path = tmp_path / "model.safetensors"
    save_hf_checkpoint(model, path)
    tensors = read_tensors(path)
    del tensors["h.1.mlp.c_fc.weight"]
    torch.save(tensors, tmp_path / "partial.bin")
    with pytest.raises(InputError, match=r"missing base weights.*h\.1\.mlp\.c_fc\.weight"):
        load_base_weights(GPT2(SMALL), tmp_path / "partial.bin")
    wider = GPT2Config(n_embd=128, n_layer=3, n_head=4, vocab_size=1000, n_positions=128)
    with pytest.raises(InputError, match="mis-shaped"):
        load_base_weights(GPT2(wider), path)


def test_unsafe_pickles_are_refused(tmp_path):
    import pickle

    path = tmp_path / "evil.bin"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path.write_bytes(pickle.dumps({"wte.weight": Evil()}))
    with pytest.raises(InputError, match="weights-only"):
        load_base_weights(GPT2(SMALL), path)
