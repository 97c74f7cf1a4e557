"""Usage: ``from cnnlab.models import get_model, list_models``.

Importing this package registers every built-in model; add a module here and import it below.
"""

from cnnlab.models import alexnet, densenet, googlenet, lenet, nin, resnet, sequential, vgg  # noqa: F401  (register models)
from cnnlab.models.registry import ModelArgumentError, get_entry, get_model, list_models, register_model

__all__ = ["ModelArgumentError", "get_entry", "get_model", "list_models", "register_model"]
