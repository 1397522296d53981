"""dvc.yaml's finetune and register stages depend on every file their commands run: the trainer's modules (the same set
the resume fingerprint hashes) and the project modules each entry point imports, directly or through others (the
pyfunc model's code too, which the register stage logs). A missing one means an edit that changes a stage's result
does not rerun it."""

from __future__ import annotations

from pathlib import Path

import yaml

from steps.training.config import imported_modules, module_file, trainer_sources

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "steps")


def project_imports(path: str) -> set[str]:
    """The project modules one file imports anywhere in it (also inside functions), as repository paths."""
    files = (module_file(dotted) for dotted in imported_modules(REPO / path, PACKAGES))
    return {file.relative_to(REPO).as_posix() for file in files if file is not None}


def runs(*entry_points: str) -> set[str]:
    """Every project module the entry points reach through imports."""
    seen: set[str] = set()
    todo = list(entry_points)
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += project_imports(path)
    return seen


def stage_deps(name: str) -> set[str]:
    """The stage's deps, a directory standing for every file in it (dvc.yaml names the code's packages)."""
    deps = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]["deps"])
    return deps | {path.relative_to(REPO).as_posix() for dep in deps if (REPO / dep).is_dir() for path in (REPO / dep).rglob("*.py")}


def test_finetune_stage_depends_on_all_the_code_it_runs():
    trainer = {path.relative_to(REPO).as_posix() for path in trainer_sources()}
    needed = trainer | runs("pipelines/finetune.py")
    assert "pipelines/finetune_flow.py" in needed and "pipelines/register.py" not in needed
    assert needed <= stage_deps("finetune"), sorted(needed - stage_deps("finetune"))


def test_register_stage_depends_on_all_the_code_it_runs_and_logs():
    needed = runs("pipelines/register.py", "pipelines/pyfunc_model.py")  # the model's code is a file it logs, not an import
    assert {"pipelines/packaging.py", "steps/decode.py", "steps/decoding/beam.py"} <= needed
    assert needed <= stage_deps("register"), sorted(needed - stage_deps("register"))


def test_the_trainer_does_not_run_the_export_command():
    """Editing the export CLI (its help text, say) must not change the trainer's code hash: that would rerun the
    finetune stage and refuse every resume state."""
    assert "steps/export.py" not in {path.relative_to(REPO).as_posix() for path in trainer_sources()} | runs("pipelines/finetune.py")
    assert "steps/export.py" not in stage_deps("finetune")


def test_every_stage_depends_on_all_the_code_its_command_runs():
    """Every stage's `python -m <module>` and what it imports: an edit to any of them reruns the stage."""
    import re

    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        module = re.search(r"python -m ([\w.]+)", stage["cmd"]).group(1)
        needed = runs(module.replace(".", "/") + ".py")
        assert needed <= stage_deps(name), f"{name}: {sorted(needed - stage_deps(name))}"
