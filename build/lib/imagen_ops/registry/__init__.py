"""MLflow: experiment tracking, the pyfunc model, champion / challenger promotion.

MLflow is imported lazily inside functions, so the core runs where MLflow is not installed.
"""
