"""Evaluation: image-quality metrics and the exact shapes alignment oracle."""
