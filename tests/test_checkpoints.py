"""Adapter files: round trip, the original trainer's LoRA checkpoints, resume-state safety."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from steps.checkpoints import adapter_config, apply_adapter, base_identity, load_adapter, save_adapter
from steps.common import InputError
from steps.lora import LoRAConfig, lora_state_dict
from steps.model import CARDS, GPT2


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
])
def test_damaged_adapter_config_is_a_clear_error(tmp_path, damage, match):
    adapter = saved_adapter(tmp_path)
    config = adapter / "adapter_config.json"
    config.write_text(damage(config.read_text()))
    with pytest.raises(InputError, match=match):
        load_adapter(adapter)


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

    script = ("import sys, torch; from steps.checkpoints import adapter_config, save_adapter; from steps.lora import LoRAConfig; "
              "from steps.model import CARDS, GPT2; torch.manual_seed(0); m = GPT2(CARDS['gpt2.tiny'], LoRAConfig(r=4, alpha=32)); "
              "save_adapter(m, sys.argv[1], adapter_config(m, 'gpt2.tiny', {'path': None, 'sha256': None}, step=3))")
    digests = set()
    for i in range(6):  # separate processes: the order of a hash map changes between them, not within one
        subprocess.run([sys.executable, "-c", script, str(tmp_path / str(i))], check=True)
        digests.add(hashlib.sha256((tmp_path / str(i) / "adapter.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_truncated_resume_state_is_a_clear_error(tmp_path):
    from steps.checkpoints import load_resume_state, save_resume_state

    save_resume_state(tmp_path / "state.pt", {"step": 3, "weights": torch.zeros(1000)})
    data = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"the resume state is damaged.*--resume never"):
        load_resume_state(tmp_path / "state.pt")


def test_equal_resume_states_are_equal_bytes(tmp_path):
    """The work dir is a DVC output: the same training must give the same bytes (the temp name used to leak in)."""
    from steps.checkpoints import save_resume_state

    state = {"step": 3, "trainable": {"w": torch.arange(10.0)}}
    save_resume_state(tmp_path / "a.pt", state)
    save_resume_state(tmp_path / "b.pt", state)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
