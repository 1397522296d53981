"""steps.formats.work_dir: the one list of what the trainer writes in its work dir, and the set-aside and restore the finetune
flow does between runs with it."""

from __future__ import annotations

from helpers import tiny_run_args

from steps.formats.work_dir import WorkDir
from steps.train import main


def test_every_file_the_trainer_writes_is_named_by_the_contract(tmp_path):
    work = WorkDir(tmp_path / "run")
    assert main(tiny_run_args(tmp_path / "data", work.root, max_step=4, eval_interval=2, save_interval=2)) == 0
    named = {path.relative_to(work.root).parts[0] for path in work.trainer_outputs()}
    assert {path.name for path in work.root.iterdir()} <= named
    written = [work.adapter, work.adapter_config, work.best / work.adapter.name, work.checkpoint(2) / work.adapter.name,
               work.resume_state, work.train_log, work.valid_log, work.summary, work.status]
    assert [path for path in written if not path.is_file()] == []
    assert not work.lock.is_relative_to(work.root) and not work.previous.is_relative_to(work.root)  # a DVC output holds neither


def test_clean_removes_only_trainer_outputs(tmp_path):
    work = WorkDir(tmp_path)
    for path in (work.adapter, work.summary, work.checkpoint(4) / "adapter.safetensors", work.resume_state, tmp_path / "notes.txt"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    work.clean()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_set_aside_then_restore_brings_the_last_outputs_back(tmp_path):
    work = WorkDir(tmp_path / "run")
    work.root.mkdir()
    work.adapter.write_text("good")
    work.set_aside()
    assert not work.adapter.exists() and (work.previous / work.adapter.name).read_text() == "good"
    work.adapter.write_text("refused run")
    assert work.restore_previous() and work.adapter.read_text() == "good" and not work.previous.exists()
    assert not work.restore_previous()  # nothing set aside any more
