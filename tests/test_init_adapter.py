"""Continued training: `--init_adapter` starts LoRA from a saved adapter (ours, the original's or PEFT's) with a
fresh optimizer, exactly as if the same weights had been put into the model in memory."""

from __future__ import annotations

import torch
from helpers import tiny_run_args
from safetensors.torch import load_file

from steps.formats.checkpoints import apply_adapter, load_adapter
from steps.train import Trainer, main
from steps.training.config import parse_config
from steps.training.distributed import Dist


def test_continuing_from_a_saved_adapter_equals_starting_from_the_same_weights_in_memory(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(tiny_run_args(data, tmp_path / "first", max_step=4, lora_dropout=0.1)) == 0
    saved = tmp_path / "first"

    assert main(tiny_run_args(data, tmp_path / "continued", max_step=2, lora_dropout=0.1, init_adapter=saved)) == 0
    out = capsys.readouterr().out
    assert f"started LoRA from {saved}: rank 4, targets q,v, gpt2.tiny after 4 updates" in out

    in_memory = Trainer(parse_config(tiny_run_args(data, tmp_path / "in_memory", max_step=2, lora_dropout=0.1)),
                        Dist(0, 1, torch.device("cpu")))
    tensors, _ = load_adapter(saved)
    apply_adapter(in_memory.model, tensors)
    in_memory.fit()

    continued = load_file(tmp_path / "continued/adapter.safetensors")
    expected = load_file(tmp_path / "in_memory/adapter.safetensors")
    assert continued.keys() == expected.keys() and all(torch.equal(continued[k], expected[k]) for k in expected)
    assert not all(torch.equal(continued[k], tensors[k]) for k in tensors)  # it did train on


def test_an_adapter_of_another_rank_is_refused_naming_both(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(tiny_run_args(data, tmp_path / "first", max_step=1)) == 0
    capsys.readouterr()
    assert main(tiny_run_args(data, tmp_path / "second", lora_dim=8, init_adapter=tmp_path / "first")) == 2
    assert "the adapter does not fit this run: rank 4 (this run: 8)" in capsys.readouterr().err


def test_lora_tensors_in_the_base_checkpoint_are_named_not_silently_dropped(tmp_path, capsys):
    data = tmp_path / "data"
    args = tiny_run_args(data, tmp_path / "run", max_step=1)
    base = data / "base.safetensors"
    from safetensors.torch import save_file

    tensors = load_file(base)
    tensors["h.0.attn.c_attn.lora_A"] = torch.zeros(8, 64)
    save_file(tensors, base)
    assert main(args) == 0
    assert "its 1 LoRA tensors were skipped (start from them with --init_adapter)" in capsys.readouterr().out


def test_an_adapter_holding_nan_is_refused_before_training(tmp_path, capsys):
    """--init_adapter reads through the same checks as decode and export: a diverged adapter is not trained on."""
    from safetensors.torch import save_file

    from steps.formats.checkpoints import adapter_config, save_adapter
    from steps.model.gpt2 import CARDS, GPT2
    from steps.model.lora import LoRAConfig

    model = GPT2(CARDS["gpt2.tiny"], LoRAConfig(r=4, alpha=32))
    save_adapter(model, tmp_path / "adapter", adapter_config(model, "gpt2.tiny", {"path": None, "sha256": None}, step=3))
    tensors = load_file(tmp_path / "adapter" / "adapter.safetensors")
    tensors["h.0.attn.c_attn.lora_A"][2, 3] = float("nan")
    save_file(tensors, tmp_path / "adapter" / "adapter.safetensors", metadata={"format": "nlg-lora-adapter"})
    assert main(tiny_run_args(tmp_path / "data", tmp_path / "run", max_step=1, init_adapter=tmp_path / "adapter")) == 2
    err = capsys.readouterr().err
    assert "tensor h.0.attn.c_attn.lora_A holds NaN" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "adapter.safetensors").exists()
