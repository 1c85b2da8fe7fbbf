"""The bare model (normalizer + M, no guard) as a user without a guard would serve it: eager, and
the best bare engine on CPU, TorchScript traced, frozen and optimized for inference
(``torch.jit.freeze`` + ``torch.jit.optimize_for_inference``: BatchNorm folded, oneDNN
convolutions). M's feature-signal hooks are left out of both: the bare model taps nothing."""

from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch
import torch.nn as nn

from defense.guard import Guard


def _untapped(module: nn.Module) -> nn.Module:
    """A copy of ``module`` without forward hooks (the guard's feature taps)."""
    module = copy.deepcopy(module).eval()
    for child in module.modules():
        child._forward_hooks.clear()
        child._forward_pre_hooks.clear()
    return module


def bare_eager(guard: Guard) -> Callable[[torch.Tensor], torch.Tensor]:
    model, normalizer = _untapped(guard.model), guard.normalizer

    @torch.inference_mode()
    def forward(images_uint8: torch.Tensor) -> torch.Tensor:
        return model(normalizer(images_uint8))

    return forward


def bare_torchscript(guard: Guard, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """normalizer + M traced on ``example`` (uint8), frozen and optimized for inference."""
    bare = nn.Sequential(copy.deepcopy(guard.normalizer), _untapped(guard.model)).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        optimized = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(bare, example, check_trace=False)))

    @torch.inference_mode()
    def forward(images_uint8: torch.Tensor) -> torch.Tensor:
        return optimized(images_uint8)

    return forward
