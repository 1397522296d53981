#!/usr/bin/env bash
# Idempotent set-up: .venv with torch (the CPU build unless one is already installed), the project and its
# dev tools, and Java for METEOR. Re-running it is fast: it only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # GPU users: install their CUDA torch into .venv first (README), it is kept

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # Installing torch before the project matters: with no torch present, pip would resolve the project's
    # torch>=2.4 to the newest CUDA build (several GB) instead of the CPU wheel.
    echo "setup: installing $TORCH_SPEC"
    .venv/bin/pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
fi
stamp=.venv/.lora-nlg-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the project and its dependencies (a few minutes the first time)"
    .venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
    echo "$want" > "$stamp"
fi
if ! command -v java >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing Java (METEOR and the PTB tokenizer of the E2E scorer need it)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null
    else
        echo "setup: WARNING: java not found; METEOR needs it. Install a JRE (e.g. apt-get install default-jre-headless)" >&2
        echo "       or run the evaluate stage with --no_meteor (params.yaml: evaluate.no_meteor: true)." >&2
    fi
fi
