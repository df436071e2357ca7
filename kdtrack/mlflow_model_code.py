"""The code of kdtrack's MLflow model ("models from code"): MLflow runs this file when it loads the model."""
from mlflow.models import set_model

from kdtrack.mlflow_model import CheckpointModel

set_model(CheckpointModel())
