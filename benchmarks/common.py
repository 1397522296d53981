"""What the benchmark scripts share: the data they time, the machine they ran on, peak memory, tables, JSON.

Benchmarks are scripts, not tests: they print a markdown table and write JSON under benchmarks/out/ (git-ignored).
Each script runs from the repository root (`python benchmarks/bench_train.py ...`) and puts the root on sys.path,
so `steps` imports without installing the project.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402  (after the sys.path fix on purpose)
from tqdm import tqdm  # noqa: E402

from steps.core.common import InputError, write_json  # noqa: E402
from steps.encode import encode_pairs  # noqa: E402
from steps.model.tokenizer import get_tokenizer  # noqa: E402
from steps.prepare import read_e2e_txt  # noqa: E402
from steps.sample_data import generate_sample  # noqa: E402

SHARED_E2E = REPO.parent / "shared" / "data" / "e2e"
OUT_DIR = REPO / "benchmarks" / "out"

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched against
# torch.cuda.get_device_name(); `--peak_tflops` overrides. Order matters: the first substring that matches wins.
BF16_PEAK_TFLOPS = [
    ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4),
    ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0),
]


# ---------------------------------------------------------------------------------------------- data


def e2e_pairs(split: str, path: str | None = None, sample_mrs: int = 600) -> tuple[list[tuple[str, str]], str]:
    """(MR, reference) text pairs of one E2E split and where they came from.

    `path` wins; otherwise the real file ../shared/data/e2e/<split>.txt when present, else the generated sample
    (steps.sample_data) with `sample_mrs` MRs in that split, so the benchmarks also run in a bare checkout.
    """
    source = Path(path) if path else SHARED_E2E / f"{split}.txt"
    if path or source.is_file():
        examples = read_e2e_txt(source).examples
        return [(e.context, e.completion) for e in examples], str(source)
    counts = {"train_mrs": 1, "valid_mrs": 1, "test_mrs": 1, f"{split}_mrs": sample_mrs}
    lines = generate_sample(seed=0, **counts)[split]
    return lines, f"generated sample ({split}, {sample_mrs} MRs)"


def encode_e2e(pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids as steps.encode writes them: context + [<|endoftext|>], ' ' + completion + [<|endoftext|>]."""
    with tqdm(total=len(pairs), disable=True) as quiet:
        contexts, completions, _ = encode_pairs(pairs, get_tokenizer(), add_bos=True, add_eos=True, progress=quiet)
    return list(zip(contexts, completions))


def write_encoded_jsonl(pairs: list[tuple[list[int], list[int]]], path: Path) -> Path:
    """The encoded-file format the trainer reads ({"context": [ids], "completion": [ids]} per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for context, completion in pairs:
            f.write(json.dumps({"context": context, "completion": completion}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- machine and memory


def machine_info(device: str, threads: int = 0) -> dict[str, Any]:
    """Everything a reader needs to compare two result files: machine, card, versions, date, load.

    `threads`: the torch thread count the timed code used, when it runs in other processes (0: this one's).
    """
    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host_cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": _git_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    for name in ("transformers", "peft"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def bf16_peak_tflops(device_name: str) -> float | None:
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but this torch build sees no CUDA device; use --device cpu")
    return device


# ---------------------------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get a sensible number of digits, None prints as '-'."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return number(value) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def number(value: float) -> str:
    """3 significant digits below 100, whole numbers with thousands separators above."""
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def save_results(path: str | Path, results: dict[str, Any]) -> Path:
    path = Path(path)
    write_json(path, results)
    return path


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator
