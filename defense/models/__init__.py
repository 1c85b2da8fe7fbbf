"""Architectures (a registry) and loading of the user's model."""

from defense.models import cifar  # noqa: F401  (registers the CIFAR architectures)
from defense.models.loading import ModelSpec, instantiate, load_user_model, load_weights, parse_model_spec
from defense.models.registry import create_model, register_model, registered_models

__all__ = [
    "ModelSpec",
    "create_model",
    "instantiate",
    "load_user_model",
    "load_weights",
    "parse_model_spec",
    "register_model",
    "registered_models",
]
