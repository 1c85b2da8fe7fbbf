"""A registry of architectures, by name, in the style of timm: builders register themselves.

``create_model("cifar_resnet18", num_classes=10)`` finds a registered builder; any other name
falls through to ``torchvision.models`` (``resnet18``, ``vgg16_bn``, ``vit_b_16``, ...).
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
import torchvision

from defense.errors import UserError

ModelBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(builder: ModelBuilder) -> ModelBuilder:
    """Decorator: register ``builder`` under its function name. Builders take ``num_classes``."""
    name = builder.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = builder
    return builder


def registered_models() -> list[str]:
    """Names of this package's own architectures (torchvision's come on top of these)."""
    return sorted(_REGISTRY)


def is_known_architecture(name: str) -> bool:
    return name in _REGISTRY or name in torchvision.models.list_models(module=torchvision.models)


def create_model(name: str, num_classes: int) -> nn.Module:
    """Build an untrained model by architecture name."""
    if name in _REGISTRY:
        return _REGISTRY[name](num_classes=num_classes)
    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise UserError(
        f"--model: unknown architecture {name!r}; use one of {', '.join(registered_models())}, "
        "a torchvision.models name (e.g. resnet18), 'package.module:factory', or a TorchScript file"
    )
