"""Export to PEFT and to merged Hugging Face GPT-2, import from PEFT: logits against transformers + peft.

Everything runs on a random gpt2.tiny base written by transformers itself (no downloads).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from steps import export
from steps.core.common import InputError
from steps.formats import peft as peft_format
from steps.formats.checkpoints import adapter_config, base_identity, load_adapter, load_base_weights, save_adapter
from steps.model.gpt2 import CARDS, GPT2
from steps.model.lora import LoRAConfig

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = CARDS["gpt2.tiny"]
TARGET_SETS = [("q", "v"), ("q", "k", "v"), ("k",)]


def random_hf_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=TINY.vocab_size, n_positions=TINY.n_positions, n_embd=TINY.n_embd,
                                  n_layer=TINY.n_layer, n_head=TINY.n_head, layer_norm_epsilon=TINY.layer_norm_epsilon)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and ones LayerNorms: randomise everything so parity means something
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A Hugging Face GPT-2 directory (config.json + model.safetensors) with random weights."""
    path = tmp_path_factory.mktemp("hf_base")
    random_hf_model().save_pretrained(path)
    return path


def load_hf(path: Path):
    return transformers.GPT2LMHeadModel.from_pretrained(path).eval()


def make_our_adapter(base_dir: Path, out: Path, targets=("q", "v"), r: int = 4, alpha: float = 32, seed: int = 1) -> GPT2:
    """A trained-looking adapter (B nonzero) on the base, saved in our format; returns the unmerged model."""
    torch.manual_seed(seed)
    model = GPT2(TINY, LoRAConfig(r=r, alpha=alpha, targets=targets))
    load_base_weights(model, base_dir / "model.safetensors")
    with torch.no_grad():
        for block in model.h:
            block.attn.c_attn.lora_B.normal_(0, 0.5)
    save_adapter(model, out, adapter_config(model, "gpt2.tiny", base_identity(base_dir / "model.safetensors"), step=7, epoch=2))
    return model.eval()


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (2, 13), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def run_export(*args) -> int:
    return export.main([str(a) for a in args])


# ----------------------------------------------------------------------------------------------- ours -> PEFT


@pytest.mark.parametrize("targets", TARGET_SETS, ids=lambda t: ",".join(t))
def test_peft_export_gives_our_logits(tmp_path, base_dir, targets):
    ours = make_our_adapter(base_dir, tmp_path / "ours", targets)
    assert run_export("--adapter", tmp_path / "ours", "--format", "peft", "--output", tmp_path / "peft") == 0
    peft_model = peft.PeftModel.from_pretrained(load_hf(base_dir), tmp_path / "peft").eval()
    ids = token_ids()
    with torch.no_grad():
        expected, got, base = ours(ids), peft_model(ids).logits, load_hf(base_dir)(ids).logits
    assert max_diff(base, expected) > 1e-3  # the adapter moves logits 10x the tolerance: agreement is not vacuous
    assert max_diff(got, expected) < 1e-4
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 4 * len(targets) and config["lora_alpha"] / config["r"] == 32 / 4
    assert config["base_model_name_or_path"] == str(base_dir.resolve())  # the base file sits in an HF directory


def test_peft_export_has_peft_key_names_and_loads_without_missing_keys(tmp_path, base_dir):
    make_our_adapter(base_dir, tmp_path / "ours")
    run_export("--adapter", tmp_path / "ours", "--format", "peft", "--output", tmp_path / "peft")
    written = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    config = peft.LoraConfig.from_pretrained(tmp_path / "peft")
    reference = peft.get_peft_model_state_dict(peft.get_peft_model(load_hf(base_dir), config))
    assert set(written) == set(reference)
    assert all(written[k].shape == reference[k].shape for k in reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(load_hf(base_dir), tmp_path / "peft")
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    state = peft.get_peft_model_state_dict(loaded)
    assert all(torch.equal(state[k], written[k]) for k in written)


def test_merged_export_loads_in_transformers_with_our_logits(tmp_path, base_dir):
    ours = make_our_adapter(base_dir, tmp_path / "ours", ("q", "k", "v"))
    # No --init_checkpoint: the base path recorded in the adapter config is used.
    assert run_export("--adapter", tmp_path / "ours", "--format", "merged", "--output", tmp_path / "merged") == 0
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "merged").iterdir()}
    merged = load_hf(tmp_path / "merged")
    ids = token_ids(1)
    with torch.no_grad():
        diff = max_diff(merged(ids).logits, ours(ids))
    assert diff < 1e-4


# ----------------------------------------------------------------------------------------------- PEFT -> ours


@pytest.mark.parametrize("targets", TARGET_SETS, ids=lambda t: ",".join(t))
def test_round_trip_ours_peft_ours_is_exact(tmp_path, base_dir, targets):
    make_our_adapter(base_dir, tmp_path / "ours", targets, r=3, alpha=7.5)
    original_tensors, original_config = load_adapter(tmp_path / "ours")
    run_export("--adapter", tmp_path / "ours", "--format", "peft", "--output", tmp_path / "peft")
    tensors, config = peft_format.read_peft_adapter(tmp_path / "peft")
    assert config == original_config
    assert set(tensors) == set(original_tensors)
    assert all(torch.equal(tensors[k], original_tensors[k]) for k in tensors)
    # and through the CLI back into our directory format, which the decoder reads
    assert run_export("--adapter", tmp_path / "peft", "--format", "nlg", "--output", tmp_path / "back") == 0
    back_tensors, back_config = load_adapter(tmp_path / "back")
    assert back_config == original_config
    assert all(torch.equal(back_tensors[k], original_tensors[k]) for k in original_tensors)


def test_peft_resaved_export_imports_in_the_compact_layout(tmp_path, base_dir):
    """PEFT's own save drops our metadata: the block structure of B alone recovers targets and rank."""
    make_our_adapter(base_dir, tmp_path / "ours", ("q", "v"))
    original_tensors, _ = load_adapter(tmp_path / "ours")
    run_export("--adapter", tmp_path / "ours", "--format", "peft", "--output", tmp_path / "peft")
    peft.PeftModel.from_pretrained(load_hf(base_dir), tmp_path / "peft").save_pretrained(tmp_path / "resaved")
    tensors, config = peft_format.read_peft_adapter(tmp_path / "resaved")
    assert (config["targets"], config["r"], config["alpha"]) == (["q", "v"], 4, 32)
    assert all(torch.equal(tensors[k], original_tensors[k]) for k in original_tensors)


def peft_trained_adapter(base_dir: Path, out: Path, zero_k: bool = False, **lora_kwargs) -> torch.nn.Module:
    """An adapter as PEFT trains it: rank 4 on all of c_attn, B dense (k rows too, unless zero_k)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, **lora_kwargs)
    model = peft.get_peft_model(load_hf(base_dir), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
                if zero_k:
                    p[TINY.n_embd : 2 * TINY.n_embd] = 0
    model.save_pretrained(out)
    return model.eval()


@pytest.mark.parametrize("case", ["dense", "rslora", "zero-k"])
def test_peft_trained_adapter_imports_with_its_logits(tmp_path, base_dir, case):
    peft_model = peft_trained_adapter(base_dir, tmp_path / "peft", zero_k=case == "zero-k", use_rslora=case == "rslora")
    tensors, config = peft_format.read_peft_adapter(tmp_path / "peft")
    # rank 4 on c_attn: q, k, v (or q, v when k is untouched) at rank 4 with A shared by the slices
    assert config["targets"] == (["q", "v"] if case == "zero-k" else ["q", "k", "v"]) and config["r"] == 4
    # PEFT recorded the local base directory: its weights file becomes the adapter's base (path and sha256)
    assert config["base"] == base_identity(base_dir / "model.safetensors")
    ours = export.adapted_model(tensors, config, init_checkpoint=None)
    ids = token_ids(2)
    with torch.no_grad():
        assert max_diff(ours(ids), peft_model(ids).logits) < 1e-4


# ----------------------------------------------------------------------------------------------- errors


def test_missing_adapter_exits_2_with_one_line(tmp_path, capsys):
    assert run_export("--adapter", tmp_path / "nope", "--format", "peft", "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_our_adapter_with_wrong_rank_layout_is_refused(tmp_path, base_dir, capsys):
    make_our_adapter(base_dir, tmp_path / "ours")
    config_path = tmp_path / "ours" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "r": 2}))  # tensors are rank 4
    assert run_export("--adapter", tmp_path / "ours", "--format", "peft", "--output", tmp_path / "peft") == 2
    assert "do not match its config" in capsys.readouterr().err


def test_peft_rank_that_disagrees_with_its_tensors_is_refused(tmp_path, base_dir):
    peft_trained_adapter(base_dir, tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": 8}))
    with pytest.raises(InputError, match="r is 8 but the tensors have rank 4") as info:
        peft_format.read_peft_adapter(tmp_path / "peft")
    assert "adapter_config.json" in str(info.value)


def test_peft_adapter_beyond_c_attn_or_with_dora_is_refused(tmp_path, base_dir):
    peft_trained_adapter(base_dir, tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight": torch.zeros(4, TINY.n_embd)}, weights)
    with pytest.raises(InputError, match=r"not LoRA A/B of attn\.c_attn.*mlp\.c_fc"):
        peft_format.read_peft_adapter(tmp_path / "peft")
    save_file(tensors, weights)
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": True}))
    with pytest.raises(InputError, match="DoRA"):
        peft_format.read_peft_adapter(tmp_path / "peft")


def test_peft_dir_without_config_and_merge_on_another_base_are_refused(tmp_path, base_dir, capsys):
    peft_trained_adapter(base_dir, tmp_path / "peft")
    (tmp_path / "peft" / "adapter_config.json").unlink()
    with pytest.raises(InputError, match=r"adapter_config\.json not found"):
        peft_format.read_peft_adapter(tmp_path / "peft")
    make_our_adapter(base_dir, tmp_path / "ours")
    other = tmp_path / "other"
    random_hf_model(seed=5).save_pretrained(other)
    code = run_export("--adapter", tmp_path / "ours", "--format", "merged", "--output", tmp_path / "merged",
                      "--init_checkpoint", other / "model.safetensors")
    assert code == 2 and "sha256" in capsys.readouterr().err
    assert not (tmp_path / "merged" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------- refused on load


def corrupt(adapter: Path, key: str = "h.1.attn.c_attn.lora_B", value=None, dtype=None) -> None:
    path = adapter / "adapter.safetensors"
    tensors = load_file(path)
    if dtype is not None:
        tensors[key] = (tensors[key] * 100).to(dtype)
    else:
        tensors[key].view(-1)[7] = value
    save_file(tensors, path, metadata={"format": "nlg-lora-adapter"})


def edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))


DAMAGE = {
    "int64": (lambda a: corrupt(a, dtype=torch.int64),
              r"adapter\.safetensors: tensor h\.1\.attn\.c_attn\.lora_B is int64; expected float32, float16 or bfloat16"),
    "nan": (lambda a: corrupt(a, value=float("nan")),
            r"tensor h\.1\.attn\.c_attn\.lora_B holds NaN .*the adapter is corrupt \(a diverged training\?\)"),
    "inf": (lambda a: corrupt(a, value=float("inf")), r"tensor h\.1\.attn\.c_attn\.lora_B holds inf"),
    "card": (lambda a: edit_config(a, model_card="../x"), r"adapter_config\.json: model_card '\.\./x' is not a model card"),
    "base": (lambda a: edit_config(a, base="../base.safetensors"), r"adapter_config\.json: base .* is malformed"),
}


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_adapter_is_refused_by_every_export_in_one_line(tmp_path, base_dir, capsys, fmt, damage):
    make_our_adapter(base_dir, tmp_path / "ours")
    apply, match = DAMAGE[damage]
    apply(tmp_path / "ours")
    code = run_export("--adapter", tmp_path / "ours", "--format", fmt, "--output", tmp_path / "out",
                      "--init_checkpoint", base_dir / "model.safetensors")
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


def test_peft_adapter_with_nan_or_int_tensors_is_refused_naming_its_key(tmp_path, base_dir):
    peft_trained_adapter(base_dir, tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"
    damaged = tensors[key].clone()
    damaged[0, 0] = float("nan")
    save_file({**tensors, key: damaged}, weights)
    with pytest.raises(InputError, match=rf"{re.escape(key)} holds NaN"):
        peft_format.read_peft_adapter(tmp_path / "peft")
    save_file({**tensors, key: tensors[key].to(torch.int32)}, weights)
    with pytest.raises(InputError, match=rf"{re.escape(key)} is int32"):
        peft_format.read_peft_adapter(tmp_path / "peft")


def test_adapter_config_without_base_exports_with_an_unknown_base(tmp_path, base_dir, capsys):
    """No `base` reads as {"path": null, "sha256": null}: the nlg export records that, merged needs --init_checkpoint."""
    make_our_adapter(base_dir, tmp_path / "ours")
    edit_config(tmp_path / "ours", base=...)
    assert run_export("--adapter", tmp_path / "ours", "--format", "nlg", "--output", tmp_path / "nlg") == 0
    assert json.loads((tmp_path / "nlg" / "adapter_config.json").read_text())["base"] == {"path": None, "sha256": None}
    assert run_export("--adapter", tmp_path / "ours", "--format", "merged", "--output", tmp_path / "merged") == 2
    assert "no base weights: pass --init_checkpoint" in capsys.readouterr().err
    assert run_export("--adapter", tmp_path / "ours", "--format", "merged", "--output", tmp_path / "merged",
                      "--init_checkpoint", base_dir / "model.safetensors") == 0


# ----------------------------------------------------------------------------------------------- reproducible


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_exports_of_one_adapter_are_byte_identical(tmp_path, base_dir, fmt):
    """Every file, every run, wherever it is written (safetensors used to order two metadata keys at random)."""
    make_our_adapter(base_dir, tmp_path / "ours")
    source = tmp_path / "ours"
    if fmt == "nlg":  # from PEFT back to ours: the round trip must also give the trainer's own bytes
        run_export("--adapter", source, "--format", "peft", "--output", tmp_path / "peft")
        source = tmp_path / "peft"
    outputs = [tmp_path / f"run{i}" / ("deeper" if i % 2 else "") for i in range(6)]  # different places, different depths
    for out in outputs:
        assert run_export("--adapter", source, "--format", fmt, "--output", out) == 0
    files = sorted(p.name for p in outputs[0].iterdir())
    assert files and all(sorted(p.name for p in out.iterdir()) == files for out in outputs)
    for name in files:
        assert len({(out / name).read_bytes() for out in outputs}) == 1, name
    if fmt == "nlg":
        assert (outputs[0] / "adapter.safetensors").read_bytes() == (tmp_path / "ours" / "adapter.safetensors").read_bytes()
        assert json.loads((outputs[0] / "adapter_config.json").read_text()) == json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
