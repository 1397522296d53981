"""pipelines/settings.py: where the MLflow store is, and how the stage checks it before anything starts."""

from __future__ import annotations

import time

import pytest

from tests.test_finetune_flow import make_project, write_params


def test_tracking_uri_is_made_absolute_and_env_wins(tmp_path, monkeypatch):
    from pipelines.settings import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri({"tracking_uri": "sqlite:///mlflow.db"}, tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking_uri({"tracking_uri": "http://127.0.0.1:5000"}, tmp_path) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert tracking_uri({"tracking_uri": "sqlite:///mlflow.db"}, tmp_path) == "sqlite:////elsewhere/m.db"


def test_a_dead_tracking_server_fails_in_seconds_naming_the_uri(tmp_path, capsys):
    import socket

    from pipelines.finetune import main

    make_project(tmp_path)
    params = write_params(tmp_path, "dead", "models/dead", "models/dead_run.json")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    code = main(["--params", str(params), "--project_dir", str(tmp_path), "--set", f"tracking.tracking_uri=http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and f"the MLflow tracking server http://127.0.0.1:{port} does not answer" in err
    assert time.monotonic() - started < 20
    assert not (tmp_path / "models/dead").exists()  # nothing started, nothing touched


def test_a_locked_sqlite_store_is_waited_for_within_a_stated_bound(tmp_path):
    import sqlite3
    import threading

    from pipelines.settings import check_tracking_store
    from steps.core.common import InputError

    store = tmp_path / "mlflow.db"
    holder = sqlite3.connect(store, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN IMMEDIATE")  # another process writing
    said: list[str] = []
    with pytest.raises(InputError, match="stayed locked by another process for 1 s"):
        check_tracking_store(f"sqlite:///{store}", wait_s=1, say=said.append)
    assert said and "waiting up to 1 s" in said[0]
    releaser = threading.Timer(1.0, holder.rollback)
    releaser.start()
    started = time.monotonic()
    check_tracking_store(f"sqlite:///{store}", wait_s=30, say=said.append)  # returns once the writer is done
    assert 0.5 < time.monotonic() - started < 30
    releaser.join()
    holder.close()


def test_a_damaged_sqlite_store_is_one_line_saying_what_to_do(tmp_path):
    """It used to end the flow and the register stage with sqlite3's traceback ("file is not a database")."""
    from pipelines.settings import check_tracking_store
    from steps.core.common import InputError

    store = tmp_path / "mlflow.db"
    store.write_bytes(b"not a database, just bytes " * 100)
    with pytest.raises(InputError, match=r"the MLflow store is damaged \(file is not a database\); move it aside \(mv mlflow.db"):
        check_tracking_store(f"sqlite:///{store}")
