"""The served model's code, logged as text with every model version (MLflow's
models-from-code): loading a model runs this file, never an unpickled object."""

from mlflow.models import set_model

from imagen_ops.registry.pyfunc import ImagenModel

set_model(ImagenModel())
