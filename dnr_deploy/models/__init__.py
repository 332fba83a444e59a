"""Model builders: every architecture is created by name through the registry."""

from dnr_deploy.models.external import ModelSpecError
from dnr_deploy.models.registry import (
    check_model_spec,
    create_model,
    list_models,
    register_model,
)

# Importing the architecture modules files their builders in the registry.
from dnr_deploy.models import resnet, small, vgg  # noqa: E402,F401  isort: skip

__all__ = ["ModelSpecError", "check_model_spec", "create_model", "list_models", "register_model"]
