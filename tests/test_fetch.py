"""steps.fetch against servers on 127.0.0.1: one in the Hugging Face hub's URL layout (the real huggingface_hub client
pointed at it through HF_ENDPOINT) and one serving files where raw.githubusercontent.com serves microsoft/LoRA's
(LORA_NLG_DATA_URL). The client downloads and the command checks; a tampered or missing file, or no network, ends
in one line and leaves nothing behind. No real download runs here."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from steps import fetch

REPO = Path(__file__).resolve().parents[1]
SHARED_E2E = REPO.parent / "shared" / "data" / "e2e"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@contextmanager
def serving(routes: dict[str, tuple[bytes, dict[str, str]]]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 answering HEAD and GET for `routes` (path -> (body, extra headers)); 404 else."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self, with_body: bool) -> None:
            path = self.path.split("?")[0]
            if path not in routes:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body, headers = routes[path]
            self.send_response(200)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.answer(False)

        def do_GET(self) -> None:
            self.answer(True)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def hub_file(card: str, body: bytes, claimed: bytes | None = None) -> dict[str, tuple[bytes, dict[str, str]]]:
    """The card's pinned file as the hub serves an LFS file: its sha256 (of `claimed`, to tamper) as the linked ETag."""
    pinned = fetch.WEIGHTS[card]
    sha = hashlib.sha256(claimed if claimed is not None else body).hexdigest()
    headers = {"X-Repo-Commit": pinned.revision, "ETag": '"0000"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(body))}
    return {f"/{pinned.repo_id}/resolve/{pinned.revision}/{pinned.filename}": (body, headers)}


def run_fetch(tmp_path: Path, *args: str, endpoint: str = "", data_url: str = "") -> subprocess.CompletedProcess:
    """The command in its own process (huggingface_hub reads HF_ENDPOINT at import), the hub cache in tmp_path."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1", "PYTHONPATH": str(REPO),
           "HF_ENDPOINT": endpoint or "http://127.0.0.1:9", fetch.DATA_URL_ENV: data_url or "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "steps.fetch", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


WEIGHTS = b"not really GPT-2, but bytes with a sha256" * 1000


def test_weights_download_through_the_hub_client_are_checked_and_linked(tmp_path):
    with serving(hub_file("gpt2.md", WEIGHTS)) as url:
        done = run_fetch(tmp_path, "--weights", "gpt2.md", "--weights_path", "pretrained/md/model.safetensors",
                         "--manifest", "fetched.json", endpoint=url)
    assert done.returncode == 0, done.stderr
    link = tmp_path / "pretrained/md/model.safetensors"
    assert link.is_symlink() and link.read_bytes() == WEIGHTS
    assert str(link.resolve()).startswith(str(tmp_path / "hf"))  # the file lives in the hub client's cache, once
    record = json.loads((tmp_path / "fetched.json").read_text())["weights"]
    assert record == {"file": "pretrained/md/model.safetensors", "repo_id": "openai-community/gpt2-medium",
                      "revision": fetch.WEIGHTS["gpt2.md"].revision, "sha256": hashlib.sha256(WEIGHTS).hexdigest()}
    # Again, with no network: the linked file is checked against the sha256 the hub named it by, and kept.
    again = run_fetch(tmp_path, "--weights", "gpt2.md", "--weights_path", "pretrained/md/model.safetensors",
                      "--manifest", "again.json")
    assert again.returncode == 0 and "is there and checks out" in again.stdout, again.stderr
    assert json.loads((tmp_path / "again.json").read_text())["weights"] == record


def test_a_weights_file_that_is_not_what_the_hub_says_is_refused_and_removed(tmp_path):
    with serving(hub_file("gpt2.md", WEIGHTS, claimed=b"other bytes")) as url:
        done = run_fetch(tmp_path, "--weights", "gpt2.md", "--weights_path", "m/model.safetensors", endpoint=url)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "has sha256" in done.stderr and "removed from the cache" in done.stderr and "HF_ENDPOINT" in done.stderr
    assert not (tmp_path / "m").exists()
    assert not [p for p in (tmp_path / "hf").rglob("*") if p.is_file() and p.read_bytes() == WEIGHTS]


def test_the_pinned_sha256_wins_over_what_a_server_claims(tmp_path):
    """gpt2's sha256 is pinned here: a server (a mirror, or a compromised one) agreeing with its own bytes is refused."""
    with serving(hub_file("gpt2.sm", WEIGHTS)) as url:
        done = run_fetch(tmp_path, "--weights", "gpt2.sm", "--weights_path", "sm/model.safetensors", endpoint=url)
    assert done.returncode == 2 and f"not {fetch.WEIGHTS['gpt2.sm'].sha256[:12]}" in done.stderr, done.stderr
    assert not (tmp_path / "sm").exists()


def test_offline_or_a_missing_file_is_one_line_saying_how_to_bring_it(tmp_path):
    done = run_fetch(tmp_path, "--weights", "gpt2.lg", "--weights_path", "lg/model.safetensors")  # nothing listens
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "cannot download openai-community/gpt2-large/model.safetensors" in done.stderr
    assert "download openai-community/gpt2-large/model.safetensors yourself" in done.stderr
    with serving({}) as url:  # a hub that has no such file at that commit
        done = run_fetch(tmp_path, "--weights", "gpt2.lg", "--weights_path", "lg/model.safetensors", endpoint=url)
    assert (done.returncode == 2 and "EntryNotFound" in done.stderr) or "NotFound" in done.stderr, done.stderr
    assert not (tmp_path / "lg").exists()


def data_route(item: fetch.DataFile) -> str:
    return f"/{fetch.LORA_REPO}/{fetch.LORA_COMMIT}/examples/NLG/{item.path}"


@pytest.mark.skipif(not SHARED_E2E.is_dir(), reason="the real E2E valid/test files are not here (../shared/data/e2e)")
def test_the_real_e2e_files_match_their_pinned_git_blobs_and_are_fetched(tmp_path, monkeypatch):
    """The pinned ids are those of the files the original README trains on: the real valid/test files check out and
    are fetched; files already in place are kept without asking the network; a tampered train.txt is refused
    before anything is written."""
    train, valid, test = fetch.DATA["e2e"]
    routes = {data_route(item): ((SHARED_E2E / item.name).read_bytes(), {}) for item in (valid, test)}
    routes[data_route(train)] = (b"name : X||X is tampered .\n", {})
    said: list[str] = []
    with serving(routes) as url:
        done = run_fetch(tmp_path, "--data", "e2e", "--raw_dir", "raw", data_url=url)
        assert done.returncode == 2 and "not the pinned 2f92a2790c00" in done.stderr, done.stderr
        assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())  # nothing half-written
        monkeypatch.setitem(fetch.DATA, "e2e", [valid, test])  # the real files this checkout has (no train.txt here)
        monkeypatch.setenv(fetch.DATA_URL_ENV, url)
        records = fetch.fetch_data("e2e", tmp_path / "raw2", say=said.append)
    for item in (valid, test):
        assert (tmp_path / "raw2" / item.name).read_bytes() == (SHARED_E2E / item.name).read_bytes()
    assert [r["git_blob"] for r in records] == [valid.blob, test.blob]
    said.clear()
    fetch.fetch_data("e2e", tmp_path / "raw2", say=said.append)  # the server is gone: nothing asked of the network
    assert said == [f"fetch: {tmp_path / 'raw2/valid.txt'} is there and checks out (git blob 94f87112e111)",
                    f"fetch: {tmp_path / 'raw2/test.txt'} is there and checks out (git blob 084da9f4409d)"]


def test_a_tampered_data_file_is_refused_and_offline_is_one_line(tmp_path):
    train = fetch.DATA["webnlg"][0]
    with serving({data_route(train): (b'{"entries": []}', {})}) as url:
        done = run_fetch(tmp_path, "--data", "webnlg", "--raw_dir", "raw", data_url=url)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "git blob" in done.stderr and "examples/NLG/data/webnlg_challenge_2017/train.json" in done.stderr
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
    done = run_fetch(tmp_path, "--data", "dart", "--raw_dir", "raw")  # nothing listens
    assert done.returncode == 2 and "cannot download the dart file dart-v1.1.1-full-train.json" in done.stderr, done.stderr


def test_the_paper_profile_switches_the_stage_on_and_the_default_leaves_it_off(tmp_path):
    assert fetch.from_params(REPO / "params/e2e-gpt2-md.yaml") == {
        "enabled": True, "weights": "gpt2.md", "weights_path": "models/pretrained/gpt2-medium/model.safetensors",
        "data": "e2e", "raw_dir": "data/raw/e2e"}
    assert fetch.from_params(REPO / "params.yaml")["enabled"] is False
    done = run_fetch(tmp_path, "--params", str(REPO / "params.yaml"), "--if_enabled", "--manifest", "fetched.json")
    assert done.returncode == 0 and "nothing to fetch" in done.stdout, done.stderr
    assert json.loads((tmp_path / "fetched.json").read_text()) == {"enabled": False}
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["fetch"]
    assert stage["cmd"] == "python -m steps.fetch --params params.yaml --if_enabled --manifest data/fetched.json"
