"""Entry point MLflow executes to load a registered fedhealth model (models-from-code).

Logged as the model's code, so that loading it runs this file instead of unpickling an
object (see :mod:`fedhealth.registry.pyfunc_model`).
"""

from mlflow.models import set_model

from fedhealth.registry.pyfunc_model import FedHealthModel

set_model(FedHealthModel())
