"""Adapter files: round trip, the original trainer's LoRA checkpoints, resume-state safety."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers import write_base
from safetensors.torch import load_file, save_file

from steps.core.common import InputError
from steps.formats.checkpoints import (
    adapter_config,
    apply_adapter,
    base_identity,
    load_adapter,
    save_adapter,
    stable_safetensors_bytes,
)
from steps.model.gpt2 import CARDS, GPT2
from steps.model.lora import LoRAConfig, lora_state_dict


def trained_like_model(seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    model = GPT2(CARDS["gpt2.tiny"], LoRAConfig(r=4, alpha=32))
    with torch.no_grad():
        for block in model.h:
            block.attn.c_attn.lora_B.normal_()
    return model


def test_adapter_round_trip_restores_the_same_logits(tmp_path):
    model = trained_like_model()
    base_file = tmp_path / "base.bin"
    base_file.write_bytes(b"pretend base")
    save_adapter(model, tmp_path / "adapter", adapter_config(model, "gpt2.tiny", base_identity(base_file), step=7))
    tensors, config = load_adapter(tmp_path / "adapter")
    assert config["r"] == 4 and config["alpha"] == 32 and config["targets"] == ["q", "v"] and config["step"] == 7
    assert config["base"]["sha256"] == hashlib.sha256(b"pretend base").hexdigest()
    assert config["trainable_params"] == 2 * (8 * 128 + 256 * 4)
    fresh = GPT2(CARDS["gpt2.tiny"], LoRAConfig(r=4, alpha=32))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k}, strict=False)
    apply_adapter(fresh, tensors)
    ids = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_original_trainer_checkpoints_import(tmp_path):
    model = trained_like_model()
    # model.<step>.pt as gpt2_ft.py writes it: {"model_state_dict": lora_state_dict} with DDP's module. prefix
    original = {"model_state_dict": {f"module.transformer.{k}": v for k, v in lora_state_dict(model).items()}}
    torch.save(original, tmp_path / "model.1000.pt")
    tensors, config = load_adapter(tmp_path / "model.1000.pt", lora_alpha=32)
    assert config["model_card"] == "gpt2.tiny" and config["r"] == 4 and config["step"] == 1000
    assert all(torch.equal(tensors[k], v) for k, v in lora_state_dict(model).items())
    # ... and without the module. prefix (a non-DDP dump)
    torch.save({"model_state_dict": {f"transformer.{k}": v for k, v in lora_state_dict(model).items()}}, tmp_path / "model.5.pt")
    assert set(load_adapter(tmp_path / "model.5.pt", lora_alpha=32)[0]) == set(tensors)
    with pytest.raises(InputError, match="lora_alpha"):
        load_adapter(tmp_path / "model.1000.pt")


def test_adapter_for_another_shape_is_refused(tmp_path):
    model = trained_like_model()
    save_adapter(model, tmp_path / "a", adapter_config(model, "gpt2.tiny", base_identity(None), step=1))
    tensors, _ = load_adapter(tmp_path / "a")
    with pytest.raises(InputError, match="does not fit"):
        apply_adapter(GPT2(CARDS["gpt2.tiny"], LoRAConfig(r=8, alpha=32)), tensors)


def test_unknown_adapter_format_is_refused(tmp_path):
    model = trained_like_model()
    save_adapter(model, tmp_path / "a", adapter_config(model, "gpt2.tiny", base_identity(None), step=1))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    cfg["version"] = 99
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="unsupported adapter format"):
        load_adapter(tmp_path / "a")


def saved_adapter(tmp_path):
    model = trained_like_model()
    save_adapter(model, tmp_path / "adapter", adapter_config(model, "gpt2.tiny", {"path": None, "sha256": None}, step=1))
    return tmp_path / "adapter"


@pytest.mark.parametrize(("damage", "match"), [
    (lambda text: text[: len(text) // 2], "unreadable adapter config"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "r"}), "lacks or has wrong types for r"),
    (lambda text: json.dumps({**json.loads(text), "targets": "q,v"}), "lacks or has wrong types for targets"),
    (lambda text: json.dumps({**json.loads(text), "model_card": "../x"}), r"model_card '\.\./x' is not a model card"),
    (lambda text: json.dumps({**json.loads(text), "n_embd": 64}), r"disagrees with its model_card gpt2\.tiny: n_embd 64"),
    (lambda text: json.dumps({**json.loads(text), "targets": ["v", "q"]}), "listed in q, k, v order"),
    (lambda text: json.dumps({**json.loads(text), "targets": ["q", "x"]}), "subset of q, k, v"),
    (lambda text: json.dumps({**json.loads(text), "alpha": float("nan")}), "alpha nan is not a finite number"),
    (lambda text: json.dumps({**json.loads(text), "r": 0}), "r 0 is not a LoRA rank"),
    (lambda text: json.dumps({**json.loads(text), "base": "/some/base.safetensors"}), "base .* is malformed"),
    (lambda text: json.dumps({**json.loads(text), "base": {"path": 3, "sha256": None}}), "base .* is malformed"),
    (lambda text: json.dumps({**json.loads(text), "base": {"path": None, "sha256": "abc"}}), "base .* is malformed"),
])
def test_damaged_adapter_config_is_a_clear_error(tmp_path, damage, match):
    adapter = saved_adapter(tmp_path)
    config = adapter / "adapter_config.json"
    config.write_text(damage(config.read_text()))
    with pytest.raises(InputError, match=match):
        load_adapter(adapter)


def with_value(value: float, at: int = 5):
    """A change to one tensor: element `at` set to `value` (NaN, inf)."""
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[at] = value
        return t
    return change


CORRUPT_TENSORS = {
    "int64": (lambda t: (t * 100).to(torch.int64), r"tensor h\.1\.attn\.c_attn\.lora_B is int64; expected float32, float16 or bfloat16"),
    "float64": (lambda t: t.double(), r"tensor h\.1\.attn\.c_attn\.lora_B is float64; expected float32"),
    "nan": (with_value(float("nan")), r"tensor h\.1\.attn\.c_attn\.lora_B holds NaN \(1 of 1024 values\); the adapter is corrupt"),
    "inf": (with_value(float("inf")), r"tensor h\.1\.attn\.c_attn\.lora_B holds inf"),
    "-inf": (with_value(float("-inf")), r"tensor h\.1\.attn\.c_attn\.lora_B holds inf"),
}


def corrupt_tensor(adapter, change, key: str = "h.1.attn.c_attn.lora_B") -> None:
    path = adapter / "adapter.safetensors"
    tensors = load_file(path)
    tensors[key] = change(tensors[key])
    save_file(tensors, path, metadata={"format": "nlg-lora-adapter"})


@pytest.mark.parametrize("case", CORRUPT_TENSORS)
def test_corrupt_adapter_tensors_are_refused_by_every_loader_naming_the_tensor(tmp_path, case):
    """An integer tensor, or a NaN/inf (the NaN one used to decode to empty predictions without a word)."""
    from steps.decode import load_for_inference

    change, match = CORRUPT_TENSORS[case]
    adapter = saved_adapter(tmp_path)
    corrupt_tensor(adapter, change)
    with pytest.raises(InputError, match=match):
        load_adapter(adapter)
    base = write_base(tmp_path / "base.safetensors")
    with pytest.raises(InputError, match=match):
        load_for_inference(adapter, base)
    # the original trainer's model.<step>.pt goes through the same check
    tensors = {f"module.transformer.{k}": v for k, v in load_file(adapter / "adapter.safetensors").items()}
    torch.save({"model_state_dict": tensors}, tmp_path / "model.3.pt")
    with pytest.raises(InputError, match=match):
        load_adapter(tmp_path / "model.3.pt", lora_alpha=32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapters_are_accepted(tmp_path, dtype):
    adapter = saved_adapter(tmp_path)
    corrupt_tensor(adapter, lambda t: t.to(dtype))
    tensors, _ = load_adapter(adapter)
    assert tensors["h.1.attn.c_attn.lora_B"].dtype == dtype


def test_card_outside_the_model_cards_is_refused_by_decode(tmp_path):
    from steps.decode import load_for_inference

    adapter = saved_adapter(tmp_path)
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_card": "../x"}))
    with pytest.raises(InputError, match=r"adapter_config\.json: model_card '\.\./x' is not a model card"):
        load_for_inference(adapter, write_base(tmp_path / "base.safetensors"))


def test_config_without_base_reads_as_an_unknown_base(tmp_path):
    """It used to be a KeyError in decode; now the documented default: the base must be passed."""
    from steps.decode import load_for_inference

    model = trained_like_model()
    save_adapter(model, tmp_path / "adapter", adapter_config(model, "gpt2.tiny", {"path": None, "sha256": None}, step=1))
    config_path = tmp_path / "adapter" / "adapter_config.json"
    written = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({k: v for k, v in written.items() if k != "base"}))
    _, config = load_adapter(tmp_path / "adapter")
    assert config == written and config["base"] == {"path": None, "sha256": None}
    base = write_base(tmp_path / "base.safetensors")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # decodes with the base given, the adapter applied
        assert not torch.equal(load_for_inference(tmp_path / "adapter", base)(ids), load_for_inference(None, base, "cpu", "gpt2.tiny")(ids))
    with pytest.raises(InputError, match="no base weights: pass --init_checkpoint"):
        load_for_inference(tmp_path / "adapter", None)


def test_two_metadata_keys_give_the_same_bytes_every_time():
    """safetensors writes its metadata map in an order that changes from call to call; stable_safetensors_bytes sorts it."""
    from safetensors.torch import load, save

    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    metadata = {"nlg_lora_adapter_config": json.dumps({"r": 4}) + ' café \\ / \n\t\x01', "format": "pt"}
    data = stable_safetensors_bytes(tensors, metadata)
    assert all(stable_safetensors_bytes(tensors, metadata) == data for _ in range(30))
    assert data in {save(tensors, metadata=metadata) for _ in range(40)}  # one of safetensors' own orders, byte for byte
    loaded = load(data)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_original_checkpoint_with_other_keys_is_a_clear_error(tmp_path):
    path = tmp_path / "model.10.pt"
    torch.save({"transformer.h.0.attn.c_attn.lora_X": torch.zeros(8, 64)}, path)
    with pytest.raises(InputError, match="expected the original trainer's keys"):
        load_adapter(path, lora_alpha=32)


@pytest.mark.slow
def test_every_adapter_save_gives_the_same_bytes(tmp_path):
    """DVC and users compare adapters by hash: safetensors' metadata order used to vary from process to process."""
    import subprocess
    import sys

    script = ("import sys, torch; from steps.formats.checkpoints import adapter_config, save_adapter; from steps.model.lora import LoRAConfig; "
              "from steps.model.gpt2 import CARDS, GPT2; torch.manual_seed(0); m = GPT2(CARDS['gpt2.tiny'], LoRAConfig(r=4, alpha=32)); "
              "save_adapter(m, sys.argv[1], adapter_config(m, 'gpt2.tiny', {'path': None, 'sha256': None}, step=3))")
    digests = set()
    for i in range(6):  # separate processes: the order of a hash map changes between them, not within one
        subprocess.run([sys.executable, "-c", script, str(tmp_path / str(i))], check=True)
        digests.add(hashlib.sha256((tmp_path / str(i) / "adapter.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_truncated_resume_state_is_a_clear_error(tmp_path):
    from steps.formats.checkpoints import load_resume_state, save_resume_state

    save_resume_state(tmp_path / "state.pt", {"step": 3, "weights": torch.zeros(1000)})
    data = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"the resume state is damaged.*--resume never"):
        load_resume_state(tmp_path / "state.pt")


def test_equal_resume_states_are_equal_bytes(tmp_path):
    """The work dir is a DVC output: the same training must give the same bytes (the temp name used to leak in)."""
    from steps.formats.checkpoints import save_resume_state

    state = {"step": 3, "trainable": {"w": torch.arange(10.0)}}
    save_resume_state(tmp_path / "a.pt", state)
    save_resume_state(tmp_path / "b.pt", state)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
