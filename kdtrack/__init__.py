"""kdtrack: knowledge-distillation experiments as tracked MLflow runs."""

__version__ = "0.1.0"
