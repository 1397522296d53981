"""The register stage through its real code, on a real MLflow sqlite store: versions, tags, aliases on merit, and the
decoding settings taken from params.yaml when the stage runs (the stale-settings bug of issue 13).

One small project (a random gpt2.tiny base, an adapter on it, an MLflow run as the finetune flow leaves it, the
references decode wrote) is shared; each test registers under its own model name, so they pass in any order.
The scores are the stage's input file (metrics/eval.json), written by each test as the evaluate stage would.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import write_adapter, write_base

REPO = Path(__file__).resolve().parents[1]
REFS = "e2e references, grouped by blank lines\nThe Eagle is a coffee shop.\n\nZizzi serves Italian food.\n"
SCORES = {"BLEU": 0.40, "NIST": 3.1, "METEOR": 0.30, "ROUGE_L": 0.50, "CIDEr": 1.20, "SER": 0.10}


def encoded_records(texts: list[tuple[str, str]]) -> str:
    from steps.model.tokenizer import EOS_ID, get_tokenizer

    tokenizer = get_tokenizer()
    return "".join(json.dumps({"context": tokenizer.encode(mr) + [EOS_ID], "completion": tokenizer.encode(ref) + [EOS_ID]}) + "\n"
                   for mr, ref in texts)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """What the stages before register leave behind: params.yaml, data, base, adapter, refs, and the finetune run."""
    from mlflow import MlflowClient

    from steps.core.tracking import write_run_file

    root = tmp_path_factory.mktemp("register-project")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["decode"].update(beam=2, eval_len=6, batch_size=4)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "data/encoded").mkdir(parents=True)
    pairs = [("name : The Eagle | Type : coffee shop", "The Eagle is a coffee shop."), ("name : Zizzi | food : Italian", "Zizzi is Italian.")]
    for split in ("train", "valid"):
        (root / f"data/encoded/{split}.jsonl").write_text(encoded_records(pairs))
    (root / "data/base").mkdir(parents=True)
    base = write_base(root / "data/base/standin.safetensors")
    write_adapter(base, root / "models/finetune")
    (root / "models/finetune/summary.json").write_text(json.dumps({"steps": 12, "best_valid_loss": 9.5}))
    (root / "outputs").mkdir()
    (root / "outputs/refs.txt").write_text(REFS)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("register-test", artifact_location=(root / "mlruns").as_uri())
    run_id = client.create_run(experiment_id, run_name="finetune").info.run_id
    client.set_terminated(run_id, status="FINISHED")  # as the finetune flow leaves it
    write_run_file(root / "models/mlflow_run.json", run_id=run_id, tracking_uri=uri, experiment_id=experiment_id, fingerprint="x",
                   project_dir=str(root))
    return root


@pytest.fixture(autouse=True)
def store_for_reads(project, monkeypatch):
    """The test's own reads of logged models go through MLflow's process-wide store: point it at the project's for the
    test (undone after it; the stage sets its own store), with a copy of sys.path (loading model info may extend it)."""
    uri = f"sqlite:///{project / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture(scope="module")
def client(project):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_file(project: Path) -> dict:
    return json.loads((project / "models/mlflow_run.json").read_text())


def register_with(project: Path, capsys, model: str, scores: dict[str, float], *overrides: str) -> tuple[dict, str]:
    """Write the scores as the evaluate stage would, run the stage, return (metrics/register.json, its summary line)."""
    from pipelines import register

    (project / "metrics").mkdir(exist_ok=True)
    (project / "metrics/eval.json").write_text(json.dumps({**scores, "n_instances": 2, "ref_type": "e2e"}))
    argv = ["--params", str(project / "params.yaml"), "--project_dir", str(project), "--set", f"register.model={model}"]
    for item in overrides:
        argv += ["--set", item]
    code = register.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads((project / "metrics/register.json").read_text()), out.strip().splitlines()[-1]


def alias_version(client, model: str, alias: str) -> int:
    return int(client.get_model_version_by_alias(model, alias).version)


def test_first_version_is_champion_a_better_one_takes_over_a_worse_one_does_not(project, client, capsys):
    first, line = register_with(project, capsys, "merit", SCORES)
    assert first["version"] == 1 and first["aliases_moved"] == "@candidate @champion" and first["champion_version"] == 1
    assert line == "register: merit v1 -> @candidate @champion; v1 is the first champion (BLEU 0.4000)"

    second, line = register_with(project, capsys, "merit", {**SCORES, "BLEU": 0.41})
    assert (second["version"], second["champion_version"], second["aliases_moved"]) == (2, 2, "@candidate @champion")
    assert line.endswith("v2 takes champion from v1: BLEU 0.4100 > 0.4000")

    third, line = register_with(project, capsys, "merit", {**SCORES, "BLEU": 0.39, "CIDEr": 9.0})  # better CIDEr is not the metric
    assert (third["version"], third["champion_version"], third["aliases_moved"]) == (3, 2, "@candidate")
    assert third["reason"] == "champion stays v2: BLEU 0.4100 >= 0.3900 of v3"
    assert line == "register: merit v3 -> @candidate; champion stays v2: BLEU 0.4100 >= 0.3900 of v3"
    assert (alias_version(client, "merit", "candidate"), alias_version(client, "merit", "champion")) == (3, 2)

    tie, _ = register_with(project, capsys, "merit", {**SCORES, "BLEU": 0.41})  # a tie keeps the champion
    assert tie["champion_version"] == 2 and tie["reason"] == "champion stays v2: BLEU 0.4100 >= 0.4100 of v4"


def test_version_carries_scores_base_and_test_data_hashes_and_its_run(project, client, capsys):
    report, _ = register_with(project, capsys, "tags", SCORES)
    version = client.get_model_version("tags", report["version"])
    tags = version.tags
    assert {name: float(tags[name]) for name in SCORES} == SCORES
    # Independent hashes of the files themselves.
    assert tags["base_sha256"] == hashlib.sha256((project / "data/base/standin.safetensors").read_bytes()).hexdigest()
    assert tags["test_data_sha256"] == hashlib.sha256(REFS.encode()).hexdigest()
    assert tags["test_data"] == "outputs/refs.txt" and tags["best_valid_loss"] == "9.5"
    assert tags["run_id"] == version.run_id == run_file(project)["run_id"]
    assert "run_id" not in report  # metrics/register.json is committed: nothing in it may differ between clones
    logged = client.get_logged_model(version.source.removeprefix("models:/"))  # the version's source model: scores as its metrics
    assert {m.key: m.value for m in logged.metrics} == {f"eval/{name}": value for name, value in SCORES.items()}
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"  # reopened to log the model, finished again
    assert logged.source_run_id == version.run_id and logged.name == "adapter"


def test_registering_needs_no_training_data_on_disk(project, client, capsys):
    """The stage registers what was trained and evaluated: a machine that has the adapter and the scores, but not
    the (possibly large, private) training set, can register it."""
    report, _ = register_with(project, capsys, "no-train-data", SCORES, "finetune.train_data=data/encoded/not-here.jsonl")
    assert client.get_model_version("no-train-data", report["version"]).tags["test_data"] == "outputs/refs.txt"


def test_other_test_data_does_not_compete_and_the_candidate_still_moves(project, client, capsys):
    register_with(project, capsys, "data", SCORES)
    refs = project / "outputs/refs.txt"
    try:
        refs.write_text(REFS + "\nA third reference set.\n")
        report, _ = register_with(project, capsys, "data", {**SCORES, "BLEU": 0.99})
    finally:
        refs.write_text(REFS)
    assert report["aliases_moved"] == "@candidate" and report["champion_version"] == 1
    assert report["reason"].startswith("champion stays v1: not comparable, v1 was scored on other test data (test_data_sha256 ")
    assert (alias_version(client, "data", "candidate"), alias_version(client, "data", "champion")) == (2, 1)


def test_a_champion_set_by_hand_without_scores_stays_and_the_stage_says_why(project, client, capsys):
    register_with(project, capsys, "manual", SCORES)
    by_hand = client.create_model_version("manual", client.get_model_version("manual", 1).source)  # as the UI's Register model
    client.set_registered_model_alias("manual", "champion", by_hand.version)
    report, _ = register_with(project, capsys, "manual", {**SCORES, "BLEU": 0.9})
    assert (report["version"], report["champion_version"]) == (3, 2)
    assert report["reason"] == "champion stays v2: not comparable, v2 has no test_data_sha256 tag (registered by hand?)"


def test_slot_error_rate_is_better_when_lower(project, client, capsys):
    register_with(project, capsys, "ser", SCORES, "register.metric=SER")
    better, _ = register_with(project, capsys, "ser", {**SCORES, "SER": 0.05, "BLEU": 0.1}, "register.metric=SER")
    assert better["champion_version"] == 2 and better["reason"] == "v2 takes champion from v1: SER 0.0500 < 0.1000"
    worse, _ = register_with(project, capsys, "ser", {**SCORES, "SER": 0.2, "BLEU": 0.9}, "register.metric=SER")
    assert worse["champion_version"] == 2 and worse["reason"] == "champion stays v2: SER 0.0500 <= 0.2000 of v3"


def test_registered_decoding_settings_follow_params_yaml_when_the_stage_runs(project, client, capsys):
    """Issue 13's bug: the finetune stage does not depend on `decode`, so settings packed at training time went stale.
    The register stage reads them when it runs: after decode.beam changes, the new version says the new beam."""
    from mlflow.models import get_model_info

    def registered_config(version: int) -> dict:
        model_uri = client.get_model_version("beam", version).source
        return get_model_info(model_uri).flavors["python_function"]["config"]

    params_file = project / "params.yaml"
    original = params_file.read_text()
    first, _ = register_with(project, capsys, "beam", SCORES)
    try:
        params = yaml.safe_load(original)
        params["decode"].update(beam=3, length_penalty=1.1)
        params["encode"]["add_bos"] = False
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))  # as `dvc exp run -S decode.beam=3` would
        second, _ = register_with(project, capsys, "beam", SCORES)
    finally:
        params_file.write_text(original)
    old, new = registered_config(first["version"]), registered_config(second["version"])
    assert (old["beam"], old["length_penalty"], old["add_bos"]) == (2, 0.8, True)
    assert (new["beam"], new["length_penalty"], new["add_bos"]) == (3, 1.1, False)


def test_dvc_yaml_gives_the_register_stage_the_decoding_params_and_the_scores(tmp_path, monkeypatch):
    """DVC reruns the stage when what it packs into the model changes: `decode`, `encode.add_bos`, the scores, the adapter."""
    import shutil

    from dvc.repo import Repo

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    Repo.init(str(tmp_path), no_scm=True)
    monkeypatch.chdir(tmp_path)
    repo = Repo(str(tmp_path))
    stage = repo.stage.collect("register")[0]
    params = {key for dep in stage.deps if hasattr(dep, "params") for key in (dep.params or [])}
    assert {"decode", "encode.add_bos", "register"} <= params
    paths = {str(dep.def_path) for dep in stage.deps}
    assert {"metrics/eval.json", "outputs/refs.txt", "models/finetune/adapter.safetensors", "models/finetune/adapter_config.json"} <= paths
    assert [str(out.def_path) for out in stage.outs] == ["metrics/register.json"] and not stage.outs[0].metric and not stage.outs[0].use_cache
    order = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert order[-1] == "register" and order.index("evaluate") < order.index("register")


# ----------------------------------------------------------------------------- bad input: exit 2, one line, nothing registered


@pytest.mark.parametrize("override, scores, message", [
    ("register.metric=BLUE", SCORES, "register.metric = 'BLUE': expected one of BLEU, NIST"),
    ("register.champion_alias=candidate", SCORES, "are the same alias"),
    ("register.metric=TER", SCORES, "register.metric is TER but the scores hold only BLEU, NIST, METEOR, ROUGE_L, CIDEr, SER"),
    ("register.metric=BLEU", None, "no scores to register; run the evaluate stage first"),
    # a false champion: a bool is an int to Python, 7.5 is no BLEU, NaN is no score at all
    ("register.metric=BLEU", {**SCORES, "BLEU": True}, "BLEU = True: expected a finite number from 0 to 1"),
    ("register.metric=BLEU", {**SCORES, "BLEU": 7.5}, "BLEU = 7.5: expected a finite number from 0 to 1"),
    ("register.metric=SER", {**SCORES, "SER": float("nan")}, "SER = nan: expected a finite number >= 0"),
    ("register.metric=BLEU", {**SCORES, "CIDEr": "high"}, "CIDEr = 'high': expected a finite number >= 0"),
])
def test_bad_settings_or_missing_scores_fail_before_anything_is_logged(project, client, capsys, override, scores, message):
    from pipelines import register

    eval_json = project / "metrics/eval.json"
    eval_json.parent.mkdir(exist_ok=True)
    eval_json.unlink(missing_ok=True)
    if scores is not None:
        eval_json.write_text(json.dumps(scores))
    code = register.main(["--params", str(project / "params.yaml"), "--project_dir", str(project), "--set", "register.model=refused",
                          "--set", override])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not client.search_registered_models(filter_string="name = 'refused'")


def test_a_run_file_of_another_project_is_refused(project, client, capsys, tmp_path):
    from pipelines import register
    from steps.core.tracking import write_run_file

    copy = tmp_path / "copy"
    for name in ("params.yaml", "data/encoded/train.jsonl", "data/encoded/valid.jsonl", "data/base/standin.safetensors"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((project / name).read_bytes())
    (copy / "metrics").mkdir()
    (copy / "metrics/eval.json").write_text(json.dumps(SCORES))
    record = run_file(project)  # a `cp -r` of a project carries its run file, which names the original's store
    write_run_file(copy / "models/mlflow_run.json", **record)
    code = register.main(["--params", str(copy / "params.yaml"), "--project_dir", str(copy), "--set", "register.model=copied"])
    err = capsys.readouterr().err
    assert code == 2 and f"written for the project at {project}, not this one" in err, err
    assert not client.search_registered_models(filter_string="name = 'copied'")


def test_an_applied_experiments_adapter_is_registered_with_the_run_that_trained_it(project, client, capsys):
    """After `dvc exp apply`, the work dir holds one experiment's adapter while the run file names the last training:
    the run is found by the adapter's sha256, which the finetune flow tags on its run; no such run is refused."""
    from pipelines import register

    record = run_file(project)
    sha = hashlib.sha256((project / "models/finetune/adapter.safetensors").read_bytes()).hexdigest()
    own = client.create_run(record["experiment_id"], run_name="applied-experiment").info.run_id
    client.set_tag(own, "adapter_sha256", sha)
    client.set_terminated(own, status="FINISHED")
    client.set_tag(record["run_id"], "adapter_sha256", "0" * 64)  # the run file's run trained another adapter
    try:
        report, _ = register_with(project, capsys, "applied", SCORES)
        assert client.get_model_version("applied", report["version"]).run_id == own
        client.set_tag(own, "adapter_sha256", "1" * 64)  # and now no run trained it
        code = register.main(["--params", str(project / "params.yaml"), "--project_dir", str(project), "--set", "register.model=orphan"])
        assert code == 2 and f"(sha256 {sha[:12]}...) was not trained by run {record['run_id']}" in capsys.readouterr().err
    finally:
        client.delete_tag(record["run_id"], "adapter_sha256")
        client.delete_tag(own, "adapter_sha256")


def test_the_fluent_store_leaves_no_uri_behind_that_the_caller_had_only_in_its_environment(tmp_path, monkeypatch):
    """The stage points MLflow's fluent API at the project's store for one block. A caller that had the URIs only in
    its environment (this module's autouse fixture does, as a test or a Prefect worker may) must find MLflow's own
    variables unset afterwards: otherwise, once the environment is undone, later clients in the process still read
    this store (in a shuffled suite, the flow tests' registry lookups did)."""
    import mlflow

    from pipelines.packaging import fluent_store

    before = os.environ["MLFLOW_REGISTRY_URI"]
    with fluent_store(f"sqlite:///{tmp_path / 'other.db'}"):
        assert mlflow.get_registry_uri().endswith("other.db")
    assert os.environ["MLFLOW_REGISTRY_URI"] == before
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_REGISTRY_URI")
    for uri in (mlflow.get_registry_uri(), mlflow.get_tracking_uri()):  # MLflow's default again, neither store above
        assert uri != before and not uri.endswith("other.db"), uri
