"""The ``fused`` engine's forwards (:mod:`defense.engine`): eager copies of the three models with each
BatchNorm folded into the convolution before it and channels-last weights."""

from __future__ import annotations

import copy
from typing import Callable

import torch

from defense.guard import Guard


def fused_forwards(guard: Guard) -> Callable:
    """The ``fused`` engine's forwards: uint8 images -> the three models' logits and M's tapped
    activations, each model with its BatchNorms folded into the convolutions before them
    (``torch.fx``) and channels-last weights; M stays eager when the feature signal's hooks sit on it."""
    from torch.fx.experimental.optimization import fuse

    models = []
    tapped = guard.feature_detector is not None
    for module in (guard.model, guard.backdoor_expert, guard.auxiliary_model):
        if tapped and module is guard.model:
            models.append(module)  # eager: the feature layers' hooks sit on its modules
        else:
            models.append(fuse(copy.deepcopy(module).eval()).to(memory_format=torch.channels_last))
    normalizer = guard.normalizer

    def forwards(images_uint8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = normalizer(images_uint8).contiguous(memory_format=torch.channels_last)
        return (*(model(inputs) for model in models), *guard.activations())

    return forwards
