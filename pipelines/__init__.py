"""Orchestration: the Prefect finetune flow, MLflow model logging, scheduled `dvc repro` deployments.

Importing it changes nothing: each entry point (`python -m pipelines.finetune`, `.serve`, `.scheduled`)
applies the offline defaults of pipelines/settings.py itself, before Prefect reads its settings.
"""
