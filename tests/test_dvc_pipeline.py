"""`dvc repro` and DVC experiments end to end in a throw-away git repository, on a tiny configuration.

Every stage runs for real (sample -> prepare -> encode -> finetune flow -> decode, decode_base -> evaluate -> register) in a
fresh git repository holding a copy of this checkout, as a user's clone would. Then, as DVC users work:
commit the results (metrics and plots are committed with git, models and data are in the DVC cache); a second
`dvc repro` does nothing; two `dvc exp run -S ...` experiments rerun only what depends on the parameter and
`dvc exp show` lists every metric for the workspace, the commit and both experiments; `dvc exp apply`, a commit,
then `dvc metrics diff` / `dvc params diff` / `dvc plots diff` against the previous commit report the change;
`dvc exp branch` makes a branch of an experiment; a decoding experiment reruns decode, evaluate and register only,
and the new model version carries the new decoding settings; and a `git clone` of the result, with no DVC cache,
reproduces every stage offline to the same bytes (`git status` clean: dvc.lock, metrics and plots unchanged).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ["fetch", "sample", "prepare", "encode", "finetune", "decode", "decode_base", "evaluate", "register"]
FETCHED = "data/fetched.json"  # the fetch stage's record, in git: `{"enabled": false}` by default
SCORES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
TRAIN_SUMMARY = ("best_valid_loss", "final_train_loss")
METRIC_FILES = ("metrics/scores.json", "metrics/train_summary.json")  # what `dvc exp show` and `dvc metrics diff` compare
RECORD_FILES = ("metrics/eval.json", "metrics/register.json")  # committed beside them: the full records, not metrics
PLOT_FILES = ("plots/train_loss.csv", "plots/valid_loss.csv", "plots/loss.png")
MACHINE_FILE = "metrics/machine.json"  # committed, but no metric: where the numbers were computed
RUN_FILE = "models/mlflow_run.json"
# A test's setup may run one of the shared fixtures below: a full `dvc repro`, or two experiments (9 minutes on a
# loaded 2-core machine), more than the suite's default per-test timeout allows.
pytestmark = pytest.mark.timeout(1800)

TINY = {
    "sample": {"train_mrs": 40, "valid_mrs": 4, "test_mrs": 3},
    "finetune": {"max_step": 8, "warmup_step": 2, "log_interval": 4, "eval_interval": 4, "save_interval": 4, "train_batch_size": 4},
    "flow": {"retry_delay_seconds": 0},
    "decode": {"beam": 2, "eval_len": 8, "batch_size": 4},
}


def copy_working_tree(target: Path) -> None:
    """Tracked and untracked-but-not-ignored files: what a commit of this checkout would hold."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def dvc(project: Path, *args: str, timeout: int = 600, columns: int | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "PREFECT_API_URL")}
    if columns is not None:  # the terminal width tables are drawn for
        env["COLUMNS"] = str(columns)
    env.update({
        "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),  # stage commands call `python`
        "PREFECT_HOME": str(project / ".prefect"),
        "DVC_NO_ANALYTICS": "1",
    })
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return result


def dvc_json(project: Path, *args: str) -> dict | list:
    return json.loads(dvc(project, *args, "--json").stdout)


def git(project: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=project, check=True, capture_output=True, text=True).stdout


def set_params(params_file: Path, values: dict[str, dict]) -> None:
    """Change values the way `dvc exp run -S` does (DVC's own YAML round trip: comments and layout kept)."""
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(params_file) as params:
        for section, changes in values.items():
            params[section].update(changes)


def exp_show(project: Path) -> dict[str, dict]:
    """`dvc exp show --json` as {name: {"params": ..., "metrics": ..., "error": ...}} for the workspace, each
    commit (by its short sha) and each experiment (by its name)."""
    rows = {}

    def add(entry: dict, name: str) -> None:
        data = entry.get("data") or {}
        rows[name] = {
            "params": (data.get("params") or {}).get("params.yaml", {}).get("data", {}),
            "metrics": {path: (found.get("data") or {}) for path, found in (data.get("metrics") or {}).items()},
            "error": entry.get("error") or data.get("error") or (data.get("params") or {}).get("params.yaml", {}).get("error"),
        }

    for baseline in dvc_json(project, "exp", "show"):
        add(baseline, baseline["rev"] if baseline["rev"] == "workspace" else baseline["rev"][:7])
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                add(rev, rev.get("name") or experiment.get("name") or rev["rev"][:7])
    return rows


def metrics_of(row: dict) -> dict[str, float]:
    """The scores and train-summary values `dvc exp show` lists for one row."""
    return {**{name: row["metrics"].get("metrics/scores.json", {}).get(name) for name in SCORES},
            **{name: row["metrics"].get("metrics/train_summary.json", {}).get(name) for name in TRAIN_SUMMARY}}


def tiny_project(root: Path) -> Path:
    """A git repository holding this checkout's tracked and unignored files, with the TINY settings, committed."""
    root.mkdir()
    copy_working_tree(root)
    set_params(root / "params.yaml", TINY)
    git(root, "init", "-q")
    git(root, "config", "user.name", "test")  # dvc exp run and exp branch commit
    git(root, "config", "user.email", "test@example.com")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "copy of the project")
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return tiny_project(tmp_path_factory.mktemp("repro") / "project")


# The slow tests share one project and walk it through a user's session. Each step that changes the project is a
# module fixture that records what its tests check, so the tests pass in any order (and alone).


@pytest.fixture(scope="module")
def baseline(project) -> dict:
    """`dvc repro`, then commit what git tracks (dvc.lock, metrics, plots), as the README says; a second `dvc repro`."""
    result = dvc(project, "repro")
    state = {
        "log": result.stdout + result.stderr,
        "lock": yaml.safe_load((project / "dvc.lock").read_text())["stages"],
        "status": dvc_json(project, "status"),
        "scores": json.loads((project / "metrics/eval.json").read_text()),
        "summary": json.loads((project / "metrics/train_summary.json").read_text()),
        "run_record": json.loads((project / RUN_FILE).read_text()),
        "register": json.loads((project / "metrics/register.json").read_text()),
    }
    state["aliases"] = registry_aliases(state["run_record"]["tracking_uri"])  # now: later tests register more versions
    git(project, "add", "-A")
    git(project, "commit", "-qm", "baseline: dvc repro")
    state["git_status"] = git(project, "status", "--porcelain", "--untracked-files=all")
    lock_text = (project / "dvc.lock").read_text()
    again = dvc(project, "repro")
    state["second_log"] = again.stdout + again.stderr
    state["lock_unchanged_by_second_repro"] = (project / "dvc.lock").read_text() == lock_text
    state["head"] = git(project, "rev-parse", "--short=7", "HEAD").strip()
    return state


@pytest.mark.slow
def test_every_stage_runs_and_writes_its_outputs(baseline, project):
    for stage in STAGES[1:]:
        assert f"Running stage '{stage}'" in baseline["log"], stage
    # fetch: its record (`{"enabled": false}`) is committed and the copy changed nothing it depends on
    assert "Stage 'fetch' didn't change, skipping" in baseline["log"]
    assert json.loads((project / FETCHED).read_text()) == {"enabled": False}
    for path in ["data/raw/sample/train.txt", "data/formatted/test.jsonl", "data/encoded/train.jsonl",
                 "models/finetune/adapter.safetensors", "models/finetune/checkpoints/step_4/adapter.safetensors",
                 "outputs/predictions.jsonl", "outputs/examples.jsonl", "outputs/refs.txt", "outputs/preds.txt",
                 "plots/loss.png", RUN_FILE, "outputs_base/examples.jsonl"]:
        assert (project / path).is_file(), path
    for metric in SCORES:
        assert isinstance(baseline["scores"][metric], float), metric
        assert isinstance(baseline["scores"]["base"][metric], float), metric  # the base alone, scored the same way
    assert baseline["scores"]["n_instances"] == 3  # test_mrs
    # The shipped base trained only the rows of its corpus's tokens; the adapted model writes with those alone.
    from steps.model.tokenizer import get_tokenizer

    manifest = json.loads((project / "data/base/standin.json").read_text())
    predictions = [json.loads(line)["prediction"] for line in (project / "outputs/predictions.jsonl").read_text().splitlines()]
    assert {t for text in predictions for t in get_tokenizer().encode(text)} <= set(manifest["loss_vocab"])
    summary = baseline["summary"]
    assert set(summary) == set(TRAIN_SUMMARY) and all(isinstance(summary[key], float) for key in TRAIN_SUMMARY), summary
    assert json.loads((project / "models/finetune/summary.json").read_text())["steps"] == 8  # the whole summary
    assert (project / "plots/train_loss.csv").read_text().splitlines()[0] == "step,loss,nll"
    assert [row.split(",")[0] for row in (project / "plots/valid_loss.csv").read_text().splitlines()[1:]] == ["4", "8"]


@pytest.mark.slow
def test_every_file_the_run_wrote_is_readable_by_group_and_others(baseline, project):
    """All writers, one rule (the umask's 0644): adapters and checkpoints were written 0600 by safetensors' own file."""
    written = [path for folder in ("data", "models", "outputs", "outputs_base", "metrics", "plots", "mlruns")
               for path in (project / folder).rglob("*") if path.is_file()]
    assert len(written) > 20
    mask = os.umask(0o022)
    os.umask(mask)
    readable = 0o044 & ~mask  # what the umask lets every file be (0o044 with the usual 022)
    private = [str(path.relative_to(project)) for path in written if path.stat().st_mode & readable != readable]
    assert private == []


@pytest.mark.slow
def test_lock_file_records_every_stage(baseline):
    lock = baseline["lock"]
    assert sorted(lock) == sorted(STAGES)
    finetune_outs = {out["path"]: out for out in lock["finetune"]["outs"]}
    assert finetune_outs["models/finetune"]["md5"].endswith(".dir")
    assert set(finetune_outs) == {"models/finetune", "metrics/train_summary.json", MACHINE_FILE, *PLOT_FILES}  # not the run file
    assert RUN_FILE not in {dep["path"] for dep in lock["evaluate"]["deps"]}
    assert lock["finetune"]["params"]["params.yaml"]["finetune"]["lora_dim"] == 4
    assert lock["decode"]["params"]["params.yaml"]["decode"]["beam"] == 2
    assert lock["register"]["params"]["params.yaml"]["decode"]["beam"] == 2  # the registered model's decoding settings
    assert baseline["status"] == {}


@pytest.mark.slow
def test_git_holds_metrics_and_plots_and_nothing_machine_specific(baseline, project):
    """Committed: dvc.lock, metrics, plots. Ignored: DVC-cached outputs, the run file, the MLflow and Prefect stores.
    No tracked output holds this machine's paths, its host name, or a time."""
    assert baseline["git_status"] == ""  # everything a repro writes is either committed or ignored
    assert set(git(project, "ls-files", "metrics", "plots").split()) == {*METRIC_FILES, *RECORD_FILES, *PLOT_FILES, MACHINE_FILE}
    for ignored in (RUN_FILE, "mlflow.db", "models/finetune/adapter.safetensors", "outputs/preds.txt", "data/encoded/train.jsonl"):
        assert git(project, "check-ignore", ignored).strip() == ignored
    tracked = [project / name for name in ("dvc.lock", *METRIC_FILES, *RECORD_FILES, MACHINE_FILE, "plots/train_loss.csv", "plots/valid_loss.csv")]
    tracked += [path for folder in ("data/encoded", "models/finetune", "outputs") for path in (project / folder).rglob("*")
                if path.suffix in (".json", ".jsonl", ".csv", ".txt")]
    host = socket.gethostname()
    for path in tracked:
        text = path.read_text()
        assert str(project.parent) not in text, f"{path} holds an absolute path"
        assert len(host) < 4 or host not in text, f"{path} holds the host name {host}"
    for path in [*(project / name for name in (*METRIC_FILES, *RECORD_FILES)), *(project / "models/finetune").glob("*.json")]:
        keys = " ".join(json.loads(path.read_text())).lower()
        assert not any(word in keys for word in ("time", "wall", "seconds", "date", "host")), f"{path}: {keys}"


@pytest.mark.slow
def test_second_repro_does_nothing(baseline):
    output = baseline["second_log"]
    assert "Running stage" not in output
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in output
    assert "Data and pipelines are up to date." in output
    assert baseline["lock_unchanged_by_second_repro"]


@pytest.mark.slow
def test_metrics_and_plots_show(baseline, project):
    metrics = dvc_json(project, "metrics", "show")
    data = metrics[""]["data"] if "" in metrics else next(iter(metrics.values()))["data"]
    assert set(data) == set(METRIC_FILES)  # numbers that compare; the descriptive records are not metrics
    scores = data["metrics/scores.json"]["data"]
    assert set(scores) == {*SCORES, "SER", "base"} and set(scores["base"]) == {*SCORES, "SER"}
    assert all(isinstance(v, float) for v in [*(scores[k] for k in SCORES), *scores["base"].values()])
    assert set(data["metrics/train_summary.json"]["data"]) == set(TRAIN_SUMMARY)  # steps, params, world: in the work dir
    plots = dvc_json(project, "plots", "show")
    rendered = plots.get("data", plots)
    train_points = rendered["plots/train_loss.csv"][0]["content"]["data"]["values"]
    assert [int(point["step"]) for point in train_points] == [4, 8]
    assert "plots/valid_loss.csv" in rendered


@pytest.mark.slow
def test_evaluation_reached_the_finetune_mlflow_run(baseline, project):
    from mlflow import MlflowClient

    record = baseline["run_record"]
    assert record["tracking_uri"] == f"sqlite:///{project / 'mlflow.db'}"
    run = MlflowClient(tracking_uri=record["tracking_uri"]).get_run(record["run_id"])
    scores = baseline["scores"]
    assert {name: run.data.metrics[f"eval/{name}"] for name in SCORES} == pytest.approx({name: scores[name] for name in SCORES})
    assert (project / "mlruns").is_dir() and not any((project / "models/finetune").rglob("MLmodel"))  # artifacts outside DVC outs


def registry_aliases(uri: str) -> dict[str, tuple[int, str, float]]:
    """@candidate and @champion of the registered model: (version, run id, its BLEU tag)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = {alias: client.get_model_version_by_alias("lora-nlg-adapter", alias) for alias in ("candidate", "champion")}
    return {alias: (int(v.version), v.run_id, float(v.tags["BLEU"])) for alias, v in versions.items()}


@pytest.mark.slow
def test_register_stage_made_the_evaluated_adapter_the_first_champion(baseline):
    record, report = baseline["run_record"], baseline["register"]
    for alias, (version, run_id, bleu) in baseline["aliases"].items():
        assert (version, run_id) == (report["version"], record["run_id"]) == (1, record["run_id"]), alias
        assert bleu == pytest.approx(baseline["scores"]["BLEU"], rel=1e-5)
    assert report["reason"].startswith("v1 is the first champion")


@pytest.fixture(scope="module")
def experiments(baseline, project) -> dict:
    """Two experiments with different params: `dvc exp run -S finetune.lora_dim=8`, then `... lora_dim=2`."""
    state = {}
    for name, rank in (("rank8", 8), ("rank2", 2)):
        result = dvc(project, "exp", "run", "-S", f"finetune.lora_dim={rank}", "--name", name)
        state[name] = result.stdout + result.stderr
        if name == "rank8":  # the workspace now holds this experiment's results and its params.yaml
            state["rank8 params diff"] = git(project, "diff", "--unified=0", "params.yaml")
    state["rows"] = exp_show(project)
    state["readme_table"] = dvc(project, *readme_exp_show()[1:], "--no-pager", columns=TERMINAL).stdout
    state["adapter_rank"] = json.loads((project / "models/finetune/adapter_config.json").read_text())["r"]
    state["run_record"] = json.loads((project / RUN_FILE).read_text())
    return state


@pytest.mark.slow
def test_experiment_reruns_only_what_depends_on_the_parameter(experiments):
    # evaluate is not among them: DVC skips it when a new adapter happens to decode exactly as the last one did (it
    # can, on some CPUs); the register stage, which reruns for every new adapter, logs the scores to its run.
    for name in ("rank8", "rank2"):
        for stage in ("finetune", "decode", "register"):
            assert f"Running stage '{stage}'" in experiments[name], (name, stage)
        for stage in ("sample", "prepare", "encode", "decode_base"):
            assert f"Running stage '{stage}'" not in experiments[name], (name, stage)
    assert experiments["adapter_rank"] == 2  # the workspace holds the last experiment
    from mlflow import MlflowClient

    record = experiments["run_record"]
    run = MlflowClient(tracking_uri=record["tracking_uri"]).get_run(record["run_id"])
    assert run.data.params["finetune.lora_dim"] == "2" and "eval/BLEU" in run.data.metrics and "eval/base.BLEU" in run.data.metrics


@pytest.mark.slow
def test_exp_run_set_param_changes_only_that_line_of_params_yaml(experiments):
    diff = experiments["rank8 params diff"]
    changed = [line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert [line.split("#")[0].rstrip() for line in changed] == ["-  lora_dim: 4", "+  lora_dim: 8"], diff


@pytest.mark.slow
def test_exp_show_lists_every_metric_for_workspace_commit_and_experiments(baseline, experiments):
    rows, head = experiments["rows"], baseline["head"]
    assert {"workspace", head, "rank8", "rank2"} <= set(rows), sorted(rows)
    for name in ("workspace", head, "rank8", "rank2"):
        assert rows[name]["error"] is None, (name, rows[name]["error"])
        values = metrics_of(rows[name])
        assert all(isinstance(value, float) for value in values.values()), (name, values)  # never DVC's "!"
    assert {name: rows[name]["params"]["finetune"]["lora_dim"] for name in ("workspace", head, "rank8", "rank2")} == {
        "workspace": 2, head: 4, "rank8": 8, "rank2": 2}
    final_losses = {name: metrics_of(rows[name])["final_train_loss"] for name in (head, "rank8", "rank2")}
    assert len(set(final_losses.values())) == 3, final_losses  # three trainings, three results
    committed = {**baseline["scores"], **baseline["summary"]}
    assert metrics_of(rows[head]) == {name: committed[name] for name in (*SCORES, *TRAIN_SUMMARY)}  # read from git
    assert metrics_of(rows["workspace"]) == metrics_of(rows["rank2"])


TERMINAL = 160  # columns: a terminal the README's table must fit


def readme_exp_show() -> list[str]:
    """The README's `dvc exp show` command, as a user types it."""
    import shlex

    line = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("dvc exp show"))
    return shlex.split(line.split("   #")[0])


@pytest.mark.slow
def test_the_readme_exp_show_table_fits_a_terminal_with_the_changed_param_and_the_scores(experiments):
    """Metrics files hold numbers that compare, so the README's command shows what changed and the scores, no file
    hashes, on one screen: nothing elided (rich's `…`), no line wider than the terminal."""
    table = experiments["readme_table"]
    lines = table.splitlines()
    assert "…" not in table and max(map(len, lines)) <= TERMINAL, table
    header = " ".join(line for line in lines[:4] if "Experiment" in line or "lora_dim" in line)
    for column in ("lora_dim", "BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "SER", "final_train_loss"):
        assert column in header, (column, table)
    assert "/" not in header and "base." not in header, table  # no file columns; the base alone did not change
    assert all(name in table for name in ("workspace", "rank8", "rank2")), table


@pytest.fixture(scope="module")
def applied(experiments, project) -> dict:
    """`dvc exp apply rank8`, commit it, then diff against the previous commit; `dvc exp branch rank2`."""
    dvc(project, "exp", "apply", "rank8")
    state = {
        "adapter_rank": json.loads((project / "models/finetune/adapter_config.json").read_text())["r"],
        "status": dvc_json(project, "status"),
        "workspace_metrics_diff": dvc_json(project, "metrics", "diff"),  # the workspace against HEAD, before committing
    }
    git(project, "add", "-A")
    git(project, "commit", "-qm", "rank 8")
    state["metrics_diff"] = dvc_json(project, "metrics", "diff", "HEAD~1")
    state["params_diff"] = dvc_json(project, "params", "diff", "HEAD~1")
    state["plots_diff"] = dvc_json(project, "plots", "diff", "HEAD~1")
    dvc(project, "exp", "branch", "rank2", "rank2-branch")
    state["branch_params"] = yaml.safe_load(git(project, "show", "rank2-branch:params.yaml"))
    state["branch_scores"] = json.loads(git(project, "show", "rank2-branch:metrics/eval.json"))
    return state


@pytest.mark.slow
def test_exp_apply_then_commit_then_metrics_params_and_plots_diff(baseline, experiments, applied):
    assert applied["adapter_rank"] == 8 and applied["status"] == {}  # the experiment's outputs, checked out from the cache
    assert "final_train_loss" in applied["workspace_metrics_diff"]["metrics/train_summary.json"]
    change = applied["metrics_diff"]["metrics/train_summary.json"]["final_train_loss"]
    assert change["old"] == pytest.approx(baseline["summary"]["final_train_loss"])
    assert change["new"] == pytest.approx(metrics_of(experiments["rows"]["rank8"])["final_train_loss"])
    assert applied["params_diff"]["params.yaml"]["finetune.lora_dim"] == {"old": 4, "new": 8, "diff": 4}
    rendered = applied["plots_diff"].get("data", applied["plots_diff"])
    revisions = {point["rev"] for plot in rendered["plots/train_loss.csv"] for point in plot["content"]["data"]["values"]}
    assert len(revisions) == 2, revisions  # HEAD~1's curve and the workspace's, both read from git


@pytest.mark.slow
def test_exp_branch_holds_the_experiment(applied):
    assert applied["branch_params"]["finetune"]["lora_dim"] == 2
    assert all(isinstance(applied["branch_scores"][name], float) for name in SCORES)


@pytest.mark.slow
def test_a_fresh_clone_reproduces_the_committed_results(applied, project, tmp_path):
    """`git clone` + `dvc repro` with no DVC cache and no remote: the stages rerun offline and write the same bytes,
    so dvc.lock, the metrics and the plots are unchanged (no absolute path, time or host in any output)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / ".dvc/cache").exists()
    result = dvc(clone, "repro")
    for stage in STAGES[1:-2]:
        assert f"Running stage '{stage}'" in result.stdout, stage
    # fetch's record is in git and nothing it depends on changed, so it is skipped; decode wrote the same outputs/
    # and metrics/eval.json is in git: DVC has nothing to rerun evaluate for, nor
    # register (metrics/register.json is in git); `dvc repro -f register` registers the adapter in the clone's own store
    assert "Stage 'fetch' didn't change, skipping" in result.stdout
    assert "Stage 'evaluate' didn't change, skipping" in result.stdout
    assert "Stage 'register' didn't change, skipping" in result.stdout
    assert git(clone, "status", "--porcelain") == "", git(clone, "diff")


@pytest.fixture(scope="module")
def decoding_experiment(applied, project) -> dict:
    """`dvc exp run -S decode.beam=3` on the committed rank-8 workspace: the registered model's settings change too."""
    from mlflow import MlflowClient
    from mlflow.models import get_model_info

    from pipelines.packaging import fluent_store

    log = dvc(project, "exp", "run", "-S", "decode.beam=3", "--name", "beam3")
    record = json.loads((project / RUN_FILE).read_text())
    client = MlflowClient(tracking_uri=record["tracking_uri"], registry_uri=record["tracking_uri"])
    candidate = client.get_model_version_by_alias("lora-nlg-adapter", "candidate")
    with fluent_store(record["tracking_uri"]):  # reading a logged model goes through MLflow's process-wide store
        config = get_model_info(candidate.source).flavors["python_function"]["config"]
    rank8_runs = client.search_runs([record["experiment_id"]], filter_string="params.`finetune.lora_dim` = '8'")
    return {"log": log.stdout + log.stderr, "report": json.loads((project / "metrics/register.json").read_text()),
            "candidate": candidate, "config": config, "rank8_runs": rank8_runs}


@pytest.mark.slow
def test_a_decoding_experiment_registers_a_version_with_the_new_settings(decoding_experiment):
    """Issue 13's stale-settings bug, through DVC: finetune does not rerun, register does, and says beam 3."""
    log = decoding_experiment["log"]
    # evaluate reruns only when the new beam changes the predictions (on this tiny model it may not); register always.
    for stage in ("decode", "register"):
        assert f"Running stage '{stage}'" in log, stage
    assert "Running stage 'finetune'" not in log
    assert decoding_experiment["config"]["beam"] == 3
    assert int(decoding_experiment["candidate"].version) == decoding_experiment["report"]["version"]
    # The workspace holds the applied rank-8 adapter while the run file names the last training (rank 2): the version
    # belongs to the run that trained it.
    assert decoding_experiment["candidate"].run_id in {run.info.run_id for run in decoding_experiment["rank8_runs"]}


# ----------------------------------------------------------------------------- fast: params files


def test_e2e_profile_is_a_drop_in_params_file_with_the_paper_recipe():
    """params/e2e-gpt2-md.yaml replaces params.yaml (same sections and keys) and holds the paper's E2E recipe."""
    from pipelines.finetune import trainer_argv
    from steps.training.config import parse_config

    default = yaml.safe_load((REPO / "params.yaml").read_text())
    profile = yaml.safe_load((REPO / "params/e2e-gpt2-md.yaml").read_text())
    assert {k: sorted(v) for k, v in profile.items()} == {k: sorted(v) for k, v in default.items()}
    args = parse_config(trainer_argv(profile["finetune"]))
    recipe = {"model_card": "gpt2.md", "train_batch_size": 8, "grad_acc": 1, "seq_len": 512, "lr": 2e-4, "scheduler": "linear",
              "warmup_step": 500, "max_epoch": 5, "max_step": None, "correct_bias": True, "adam_beta1": 0.9, "adam_beta2": 0.999,
              "adam_epislon": 1e-6, "weight_decay": 0.01, "clip": 0.0, "lora_dim": 4, "lora_alpha": 32, "lora_dropout": 0.1,
              "lora_targets": "q,v", "label_smooth": 0.1, "obj": "clm", "random_seed": 110}
    assert {key: getattr(args, key) for key in recipe} == recipe
    decode = {"beam": 10, "length_penalty": 0.8, "no_repeat_ngram_size": 4, "repetition_penalty": 1.0, "eos_token_id": 628, "eval_len": 64}
    assert {key: profile["decode"][key] for key in decode} == decode
    assert profile["prepare"]["dataset"] == "e2e" and profile["flow"]["torchrun"]["nproc_per_node"] == 1


def test_default_params_drive_every_stage_command():
    """Each ${section.key} in dvc.yaml exists in params.yaml, and every trainer flag is one steps.train accepts."""
    import re

    from pipelines.finetune import trainer_argv
    from steps.training.config import parse_config

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    stages = json.dumps(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])  # without the comments
    for ref in re.findall(r"\$\{([^}]+)\}", stages):
        node = params
        for part in ref.split("."):
            assert isinstance(node, dict) and part in node, f"dvc.yaml uses ${{{ref}}} but params.yaml lacks it"
            node = node[part]
    parse_config(trainer_argv(params["finetune"]))  # raises SystemExit on an unknown flag


def test_committed_lock_file_records_exactly_the_stages_of_dvc_yaml():
    """dvc repro never drops a removed stage's entry from dvc.lock: a stale one would be committed forever."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    assert sorted(lock) == sorted(stages) == sorted(STAGES)


@pytest.mark.parametrize("dataset, ref_file, no_meteor", [("e2e", "outputs/refs.txt", False), ("webnlg", "outputs/refs", True)])
def test_dataset_and_meteor_settings_reach_the_stage_commands(tmp_path, monkeypatch, dataset, ref_file, no_meteor):
    """DVC itself renders the decode and evaluate commands from params.yaml (the README's switches)."""
    from dvc.repo import Repo

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["dataset"] = params["decode"]["ref_type"] = dataset
    params["decode"]["ref_file"], params["evaluate"]["no_meteor"] = ref_file, no_meteor
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    Repo.init(str(tmp_path), no_scm=True)
    monkeypatch.chdir(tmp_path)  # DVC resolves stage names against the working directory
    repo = Repo(str(tmp_path))
    decode, evaluate = (repo.stage.collect(name)[0] for name in ("decode", "evaluate"))
    assert f"--ref_type {dataset} --output_ref_file {ref_file} " in decode.cmd
    assert evaluate.cmd.startswith("python -m steps.evaluate --examples outputs/examples.jsonl --base_examples "
                                   f"outputs_base/examples.jsonl --ref_type {dataset} ")
    assert ("--no_meteor" in evaluate.cmd.split()) == no_meteor
    # The run file only names the local MLflow run (absolute store path, run id): passed to evaluate, not a dependency.
    assert "--mlflow_run_file models/mlflow_run.json" in evaluate.cmd
    assert "models/mlflow_run.json" not in {dep.def_path for dep in evaluate.deps}


@pytest.mark.parametrize("name", ["params.yaml", "params/e2e-gpt2-md.yaml"])
def test_params_files_are_in_the_form_dvc_exp_run_writes_back(tmp_path, name):
    """`dvc exp run -S key=value` rewrites the params file through DVC's YAML round trip: the committed files are
    already in that form (comments kept), so an experiment's `git diff params.yaml` is the changed value only."""
    from dvc.utils.hydra import apply_overrides  # what `dvc exp run -S` calls

    original = (REPO / name).read_text()
    copy = tmp_path / "params.yaml"
    copy.write_text(original)
    rank = yaml.safe_load(original)["finetune"]["lora_dim"]
    apply_overrides(copy, [f"finetune.lora_dim={rank}"])
    assert copy.read_text() == original, "rewrite the file in the form DVC writes (see the header of params.yaml)"
    apply_overrides(copy, [f"finetune.lora_dim={rank * 2}"])
    changed = [(old, new) for old, new in zip(original.splitlines(), copy.read_text().splitlines(), strict=True) if old != new]
    assert [(old.split("#")[0].rstrip(), new.split("#")[0].rstrip()) for old, new in changed] == [
        (f"  lora_dim: {rank}", f"  lora_dim: {rank * 2}")]
    assert changed[0][0].partition("#")[2] == changed[0][1].partition("#")[2]  # its comment too


def test_small_metrics_and_plots_go_to_git_and_the_rest_to_the_dvc_cache(tmp_path, monkeypatch):
    """DVC's convention: `cache: false` outputs (metrics, plots) are committed with git, so `dvc exp show`,
    `dvc metrics diff` and `dvc plots diff` find them at every commit; cached outputs are git-ignored. The MLflow run
    file is local bookkeeping: neither an output nor a dependency, and git-ignored."""
    from dvc.repo import Repo

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    git(tmp_path, "init", "-q")
    Repo.init(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    stages = Repo(str(tmp_path)).index.stages

    def ignored(path: str) -> bool:  # a directory output is ignored as a folder (`/models/` only matches folders)
        return any(subprocess.run(["git", "check-ignore", "-q", name], cwd=tmp_path).returncode == 0 for name in (path, path + "/"))

    outs = {str(out.def_path): out for stage in stages for out in stage.outs}
    in_git = {path for path, out in outs.items() if not out.use_cache}
    assert in_git == {*METRIC_FILES, *RECORD_FILES, *PLOT_FILES, MACHINE_FILE, FETCHED}
    assert {path for path in in_git if outs[path].metric} == set(METRIC_FILES)
    assert {path for path in in_git if outs[path].plot} == set(PLOT_FILES)
    assert not any(ignored(path) for path in in_git), [path for path in in_git if ignored(path)]
    assert all(ignored(path) for path in set(outs) - in_git), [path for path in set(outs) - in_git if not ignored(path)]
    run_file = yaml.safe_load((REPO / "params.yaml").read_text())["tracking"]["run_file"]
    assert run_file not in outs and run_file not in {str(dep.def_path) for stage in stages for dep in stage.deps}
    assert ignored(run_file) and ignored("mlflow.db") and ignored("mlruns/") and ignored(".prefect/")
