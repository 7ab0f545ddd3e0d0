"""Prefect orchestration of the DVC stages."""
