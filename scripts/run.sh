#!/usr/bin/env bash
# Set up if needed (scripts/setup.sh), then run a command inside the project environment:
#   bash scripts/run.sh dvc repro        # the pipeline
#   bash scripts/run.sh pytest           # the tests
# It puts .venv/bin first on PATH (DVC stage commands call `python`) and sets offline-friendly defaults.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export DO_NOT_TRACK=${DO_NOT_TRACK:-true}
export MLFLOW_DISABLE_TELEMETRY=${MLFLOW_DISABLE_TELEMETRY:-true}
export PREFECT_SERVER_ANALYTICS_ENABLED=${PREFECT_SERVER_ANALYTICS_ENABLED:-false}
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120}
export DVC_NO_ANALYTICS=${DVC_NO_ANALYTICS:-1}
exec "$@"
