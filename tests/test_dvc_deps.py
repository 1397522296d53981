"""dvc.yaml's finetune stage depends on every file its command runs: the trainer's modules (the same set the resume
fingerprint hashes) and the pipelines modules. A missing one means an edit that changes training does not rerun it."""

from __future__ import annotations

from pathlib import Path

import yaml

from steps.train_config import trainer_sources

REPO = Path(__file__).resolve().parents[1]


def test_finetune_stage_depends_on_all_the_code_it_runs():
    deps = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune"]["deps"])
    trainer = {f"steps/{path.name}" for path in trainer_sources()}
    flow = {f"pipelines/{path.name}" for path in (REPO / "pipelines").glob("*.py")} - {"pipelines/__init__.py", "pipelines/serve.py",
                                                                                      "pipelines/scheduled.py"}
    assert trainer | flow <= deps, sorted((trainer | flow) - deps)
