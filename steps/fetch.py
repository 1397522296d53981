"""Fetch what a real run needs, pinned and checked: GPT-2 weights from the Hugging Face hub and the E2E, WebNLG or
DART data the original example trains on. Nothing else in the project downloads anything, and this runs only when
asked (by hand, or by the `fetch` stage when params.yaml says `fetch.enabled: true`).

    python -m steps.fetch --params params/e2e-gpt2-md.yaml    # what that params file needs: its model card, its dataset
    python -m steps.fetch --weights gpt2.md --weights_path models/pretrained/gpt2-medium/model.safetensors
    python -m steps.fetch --data webnlg --raw_dir data/raw/webnlg

Weights: `huggingface_hub.hf_hub_download` of `model.safetensors` at a pinned commit of openai-community/gpt2,
gpt2-medium or gpt2-large, kept where the hub client keeps its cache (HF_HOME; HF_ENDPOINT names a mirror). The
file's sha256 is then checked against the one pinned here (gpt2) or, where none is published, against the sha256
the hub states for that commit's file (its LFS object id, immutable for a commit). A symbolic link at the
params' `finetune.init_checkpoint` points at the checked file.
Data: the files of microsoft/LoRA's `examples/NLG/data` at a pinned commit (what the original README trains on),
each checked against its git blob id, written into `prepare.raw_dir` in the layout `steps.prepare` reads.
LORA_NLG_DATA_URL replaces https://raw.githubusercontent.com (a mirror, or a local server in tests).
A file is renamed into place only after it was checked, so a failure leaves nothing half-written. Offline or on a
mismatch, the command ends with one line saying what failed and how to put the files there by hand (exit 2).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from steps.core.common import InputError, atomic_path, run_stage, sha256_file, write_json

DATA_URL_ENV = "LORA_NLG_DATA_URL"
DATA_URL = "https://raw.githubusercontent.com"
LORA_REPO, LORA_COMMIT = "microsoft/LoRA", "c4593f060e6a368d7bb5af5273b8e42810cdef90"


@dataclass(frozen=True)
class HubFile:
    repo_id: str
    revision: str  # a commit: what it names never changes
    filename: str
    sha256: str | None  # None: not published; the hub's own sha256 for the commit's file is checked instead


@dataclass(frozen=True)
class DataFile:
    path: str  # under examples/NLG/ in microsoft/LoRA
    name: str  # the file name steps.prepare reads
    blob: str  # git blob id (sha1 of "blob <size>\0" + bytes)


WEIGHTS = {
    "gpt2.sm": HubFile("openai-community/gpt2", "607a30d783dfa663caf39e06633721c8d4cfcd7e", "model.safetensors",
                       "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"),
    "gpt2.md": HubFile("openai-community/gpt2-medium", "6dcaa7a952f72f9298047fd5137cd6e4f05f41da", "model.safetensors", None),
    "gpt2.lg": HubFile("openai-community/gpt2-large", "32b71b12589c2f8d625668d2335a01cac3249519", "model.safetensors", None),
}
DATA = {
    "e2e": [DataFile("data/e2e/train.txt", "train.txt", "2f92a2790c00a48574dcc89465a326f33d7e7cc6"),
            DataFile("data/e2e/valid.txt", "valid.txt", "94f87112e11198710d65a1d5dc7d0b8d9155a07d"),
            DataFile("data/e2e/test.txt", "test.txt", "084da9f4409d98058bcb020614afa83824440484")],
    "webnlg": [DataFile("data/webnlg_challenge_2017/train.json", "train.json", "461766d1fe902bd659b821a03f49310c22403686"),
               DataFile("data/webnlg_challenge_2017/dev.json", "dev.json", "180f096ff49a7e597dd7c507ea0c5441e839b770"),
               DataFile("data/webnlg_challenge_2017/test.json", "test.json", "7f552799b7e3b5badf95b725c20d955e0886811e")],
    "dart": [DataFile("data/dart/dart-v1.1.1-full-train.json", "dart-v1.1.1-full-train.json", "66d6ce4aeb5d01c318c7fc15d7747ef39ea320be"),
             DataFile("data/dart/dart-v1.1.1-full-dev.json", "dart-v1.1.1-full-dev.json", "e3a7a497677e7edd9c45a3aaadb3ab8fd5493f75"),
             DataFile("data/dart/dart-v1.1.1-full-test.json", "dart-v1.1.1-full-test.json", "c3de833701dcd475ff3bf0b72cd96e13aeeb6b68")],
}  # fmt: skip


def git_blob_id(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------- data


def data_url(item: DataFile) -> str:
    base = os.environ.get(DATA_URL_ENV, DATA_URL).rstrip("/")
    return f"{base}/{LORA_REPO}/{LORA_COMMIT}/examples/NLG/{item.path}"


def fetch_data(dataset: str, raw_dir: Path, say=print) -> list[dict]:
    """Every file of `dataset` into `raw_dir`, checked; files already there and right are kept (no network)."""
    if dataset not in DATA:
        raise InputError(f"no pinned source for dataset {dataset!r}; choose one of {', '.join(DATA)} (the sample needs none)")
    records = []
    for item in DATA[dataset]:
        target = raw_dir / item.name
        if target.is_file() and git_blob_id(target) == item.blob:
            say(f"fetch: {target} is there and checks out (git blob {item.blob[:12]})")
        else:
            download(data_url(item), target, item, dataset)
            say(f"fetch: {target} <- {data_url(item)} (git blob {item.blob[:12]} checked)")
        records.append({"file": str(target), "source": data_url(item), "git_blob": item.blob})
    return records


def download(url: str, target: Path, item: DataFile, dataset: str) -> None:
    by_hand = (f"put the file there by hand (from {LORA_REPO}@{LORA_COMMIT[:12]}, examples/NLG/{item.path}) and rerun, "
               f"or set {DATA_URL_ENV} to a mirror")
    with atomic_path(target) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise InputError(f"cannot download the {dataset} file {item.name} from {url} ({reason}); {by_hand}", target) from None
        found = git_blob_id(tmp)
        if found != item.blob:
            raise InputError(f"the {dataset} file {item.name} from {url} has git blob {found[:12]}, not the pinned "
                             f"{item.blob[:12]} (a changed or damaged file; nothing was written); {by_hand}", target)


# ----------------------------------------------------------------------------------------------------------- weights


def fetch_weights(card: str, link: Path, revision: str | None = None, say=print) -> dict:
    """`model.safetensors` of the card's hub repo at the pinned commit, checked; `link` points at the cached file."""
    if card not in WEIGHTS:
        raise InputError(f"no pinned hub checkpoint for model card {card!r}; choose one of {', '.join(WEIGHTS)} "
                         "(gpt2.tiny is the offline stand-in, data/base/standin.safetensors)")
    pinned = WEIGHTS[card]
    revision = revision or pinned.revision
    by_hand = (f"download {pinned.repo_id}/{pinned.filename} yourself and point finetune.init_checkpoint at it, or set "
               "HF_ENDPOINT to a mirror")
    if link.is_file():  # fetched before: checked again without the network, against the pin or the hub's blob name
        known = pinned.sha256 if revision == pinned.revision and pinned.sha256 else link.resolve().name
        if len(known) == 64 and sha256_file(link) == known:
            say(f"fetch: {link} is there and checks out (sha256 {known[:12]})")
            return {"file": str(link), "repo_id": pinned.repo_id, "revision": revision, "sha256": known}
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    except ImportError:
        raise InputError("huggingface_hub is not installed (pip install huggingface_hub); " + by_hand) from None
    try:
        expected = pinned.sha256 if revision == pinned.revision else None
        if expected is None:  # the hub's own record of the file at that commit: the LFS object id is its sha256
            expected = get_hf_file_metadata(hf_hub_url(pinned.repo_id, pinned.filename, revision=revision)).etag
        cached = Path(hf_hub_download(pinned.repo_id, pinned.filename, revision=revision))
    except Exception as exc:  # the hub client's errors: offline, not found, HTTP; one line, not its traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot download {pinned.repo_id}/{pinned.filename} at {revision[:12]} ({type(exc).__name__}: "
                         f"{first}); {by_hand}", link) from None
    if not expected or len(expected) != 64:
        raise InputError(f"the hub gave no sha256 for {pinned.repo_id}/{pinned.filename} at {revision[:12]} (ETag "
                         f"{expected!r}), so the download cannot be checked; {by_hand}", link)
    found = sha256_file(cached)
    if found != expected:
        blob = cached.resolve()
        cached.unlink(missing_ok=True)  # the hub client's copy too (its snapshot link and blob): a rerun downloads again
        blob.unlink(missing_ok=True)
        raise InputError(f"{pinned.repo_id}/{pinned.filename} at {revision[:12]} has sha256 {found[:12]}, not "
                         f"{expected[:12]} (a changed or damaged file; removed from the cache); {by_hand}", link)
    link.parent.mkdir(parents=True, exist_ok=True)
    staged = link.with_name(f".{link.name}.link")
    staged.unlink(missing_ok=True)
    staged.symlink_to(cached.resolve())
    os.replace(staged, link)  # the link appears whole, or not at all
    say(f"fetch: {link} -> {cached} ({pinned.repo_id}@{revision[:12]}, sha256 {found[:12]} checked)")
    return {"file": str(link), "repo_id": pinned.repo_id, "revision": revision, "sha256": found}


# ----------------------------------------------------------------------------------------------------------- the stage


def from_params(path: Path) -> dict:
    """What a params file needs: its model card's weights at finetune.init_checkpoint, its dataset in prepare.raw_dir."""
    import yaml

    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read the params file ({exc.strerror})", path) from None
    except yaml.YAMLError as exc:
        raise InputError(f"not valid YAML ({str(exc).splitlines()[0]})", path) from None
    if not isinstance(params, dict):
        raise InputError("expected a mapping of sections (prepare:, finetune:, ...)", path)
    fetch = params.get("fetch") or {}
    finetune, prepare = params.get("finetune") or {}, params.get("prepare") or {}
    return {"enabled": bool(fetch.get("enabled", True)),
            "weights": finetune.get("model_card") if finetune.get("model_card") in WEIGHTS else None,
            "weights_path": finetune.get("init_checkpoint"),
            "data": prepare.get("dataset") if prepare.get("dataset") in DATA else None,
            "raw_dir": prepare.get("raw_dir")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m steps.fetch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download GPT-2 weights (Hugging Face hub) and E2E/WebNLG/DART data at pinned versions, check "
        "their hashes, and put them where params.yaml expects them.",
        epilog=f"weights: {', '.join(WEIGHTS)}; data: {', '.join(DATA)}. Offline or on a mismatch: exit 2, one line.")
    parser.add_argument("--params", type=Path, default=None, help="fetch what this params file needs (finetune.model_card "
                        "-> finetune.init_checkpoint, prepare.dataset -> prepare.raw_dir)")
    parser.add_argument("--weights", choices=sorted(WEIGHTS), default=None, help="a model card's hub checkpoint")
    parser.add_argument("--weights_path", type=Path, default=None, help="where the weights' link goes (with --weights)")
    parser.add_argument("--revision", default=None, help="another hub commit or branch than the pinned one (its sha256 "
                        "is then the hub's)")
    parser.add_argument("--data", choices=sorted(DATA), default=None, help="a dataset's raw files")
    parser.add_argument("--raw_dir", type=Path, default=None, help="where the data files go (with --data)")
    parser.add_argument("--manifest", type=Path, default=None, help="write what was fetched (files, sources, hashes) "
                        "as JSON here: the fetch stage's output")
    parser.add_argument("--if_enabled", action="store_true", help="with --params: do nothing unless fetch.enabled is "
                        "true (how the fetch stage runs by default)")
    return parser


def run(args: argparse.Namespace) -> dict:
    wanted = {"enabled": True, "weights": args.weights, "weights_path": args.weights_path, "data": args.data, "raw_dir": args.raw_dir}
    if args.params is not None:
        wanted = {**from_params(args.params), **{k: v for k, v in wanted.items() if v is not None and k != "enabled"}}
    record: dict = {"enabled": wanted["enabled"] or not args.if_enabled}
    if not record["enabled"]:
        print("fetch: fetch.enabled is false; nothing to fetch (the offline default)")
    else:
        if not wanted["weights"] and not wanted["data"]:
            raise InputError("nothing to fetch: give --weights and/or --data, or a --params file whose model card "
                             f"({', '.join(WEIGHTS)}) or dataset ({', '.join(DATA)}) has a pinned source")
        for need, where in (("weights", "weights_path"), ("data", "raw_dir")):
            if wanted[need] and not wanted[where]:
                raise InputError(f"--{need} {wanted[need]} needs --{where} (where to put it)")
        if wanted["weights"]:
            record["weights"] = fetch_weights(wanted["weights"], Path(wanted["weights_path"]), args.revision)
        if wanted["data"]:
            record["data"] = fetch_data(wanted["data"], Path(wanted["raw_dir"]))
    if args.manifest:
        write_json(args.manifest, record)
    return record


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_stage(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
