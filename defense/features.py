"""Hidden activations of the suspect model M, read during the forward the guard runs anyway.

The feature signal (:mod:`defense.feature_signal`) needs a few of M's hidden activations per
input. They are taken with forward hooks, so no extra forward is run, and the layers are chosen
automatically for any architecture from one probing forward:

- for each spatial resolution that M's 4-D activations (N, C, H, W) pass through, the *last*
  module that outputs it (hooks fire in post-order, so this is the outermost block that ends
  the stage: ``stages.0`` of a CIFAR ResNet, ``layer1`` of torchvision's, a ``features`` slice
  of a VGG), pooled over H and W;
- the input of the classifier: the input of the last ``nn.Linear`` that runs (the penultimate
  features), named ``<linear>:input``.

Modules that run more than once in a forward (a shared ReLU) are never chosen: their last call is
not always the stage's end. Activations are averaged over space (or tokens), so each layer gives
one vector per input whatever the input size.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
import torch.nn as nn

INPUT_SUFFIX = ":input"


def pooled(activation: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) by the mean over space; (N, T, D) -> (N, D) by the mean over tokens;
    (N, D) unchanged. Always float32."""
    activation = activation.float()
    if activation.dim() == 4:
        return activation.mean(dim=(2, 3))
    if activation.dim() == 3:
        return activation.mean(dim=1)
    return activation.flatten(1)


def _resolution(value) -> tuple[int, int] | None:
    """H, W of a 4-D tensor (None for anything else, and for a 1x1 global pool's output)."""
    if isinstance(value, torch.Tensor) and value.dim() == 4 and tuple(value.shape[2:]) != (1, 1):
        return tuple(value.shape[2:])
    return None


def find_feature_layers(model: nn.Module, example: torch.Tensor, max_stages: int = 4) -> list[str]:
    """The layers whose activations the feature signal reads, found from one forward of
    ``example`` (a normalized batch of at least one input): the ends of the last ``max_stages``
    resolutions, then the classifier's input when the model ends in an ``nn.Linear``.

    A resolution's end is read where the next resolution begins, as the *input* of the outermost
    module that takes this resolution in and gives the next one out (``stages.1:input`` of a CIFAR
    ResNet, ``features.4:input`` of a MobileNet): a boundary between blocks, so the serving
    engines keep fusing what lies inside blocks. The last resolution's end is the last module that
    outputs it."""
    calls: list[tuple[str, tuple | None, tuple | None]] = []  # post-order: (name, input resolution, output resolution)
    counts: dict[str, int] = {}
    linear_calls: list[str] = []
    handles = []

    def recorder(name: str, module: nn.Module):
        def hook(_module, inputs, output):
            counts[name] = counts.get(name, 0) + 1
            calls.append((name, _resolution(inputs[0]) if inputs else None, _resolution(output)))
            if isinstance(module, nn.Linear):
                linear_calls.append(name)
        return hook

    for name, module in model.named_modules():
        if name:  # the root's output is the logits
            handles.append(module.register_forward_hook(recorder(name, module)))
    try:
        with torch.inference_mode():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    once = [(name, given, out) for name, given, out in calls if counts[name] == 1]
    last_at_resolution: OrderedDict[tuple[int, int], str] = OrderedDict()
    for name, _, out in once:
        if out is not None:
            last_at_resolution.pop(out, None)  # keep resolutions in the order they end
            last_at_resolution[out] = name
    resolutions = list(last_at_resolution)
    ends = []
    for here, following in zip(resolutions, resolutions[1:]):
        crossing = [name for name, given, out in once if given == here and out == following]
        ends.append(crossing[-1] + INPUT_SUFFIX if crossing else last_at_resolution[here])
    if resolutions:
        ends.append(last_at_resolution[resolutions[-1]])
    layers = ends[-max_stages:] if max_stages else []
    if linear_calls and counts[linear_calls[-1]] == 1:
        layers.append(linear_calls[-1] + INPUT_SUFFIX)
    return layers


class ActivationTap:
    """Forward hooks on ``model`` that keep the pooled activations of ``layers`` from the latest
    forward: ``tap.take()`` returns them (one (N, D) tensor per layer, in order) and clears them.

    The hooks stay registered while the tap lives: the guard's forward of M fills them. What they
    keep is per thread, so two threads scoring with the same guard never read each other's."""

    def __init__(self, model: nn.Module, layers: list[str]):
        modules = dict(model.named_modules())
        missing = [layer for layer in layers if layer.removesuffix(INPUT_SUFFIX) not in modules]
        if missing:
            raise ValueError(f"the model has no layer {missing[0]!r} for the feature signal")
        self.layers = list(layers)
        self._local = threading.local()
        self._handles = []
        for layer in self.layers:
            module = modules[layer.removesuffix(INPUT_SUFFIX)]
            if layer.endswith(INPUT_SUFFIX):
                self._handles.append(module.register_forward_pre_hook(self._keep_input(layer)))
            else:
                self._handles.append(module.register_forward_hook(self._keep_output(layer)))

    @property
    def _values(self) -> dict[str, torch.Tensor]:
        if not hasattr(self._local, "values"):
            self._local.values = {}
        return self._local.values

    def _keep_output(self, layer: str):
        def hook(_module, _inputs, output):
            self._values[layer] = pooled(output)
        return hook

    def _keep_input(self, layer: str):
        def hook(_module, inputs):
            self._values[layer] = pooled(inputs[0])
        return hook

    def take(self) -> list[torch.Tensor]:
        values = self._values
        missing = [layer for layer in self.layers if layer not in values]
        if missing:
            raise RuntimeError(f"layer {missing[0]!r} did not run in the model's forward")
        self._local.values = {}
        return [values[layer] for layer in self.layers]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
