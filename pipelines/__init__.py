"""Orchestration: the Prefect finetune flow, MLflow model logging, scheduled `dvc repro` deployments.

Importing the package sets the offline defaults (no telemetry, a generous ephemeral-server start-up
timeout, PREFECT_HOME in the checkout) before any submodule imports prefect or mlflow.
"""

from pipelines.settings import apply_env_defaults

apply_env_defaults()
