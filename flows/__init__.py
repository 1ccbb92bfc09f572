"""Prefect flows: scheduled retraining of the cascade (run from the project root)."""
