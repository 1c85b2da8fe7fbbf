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


def find_feature_layers(model: nn.Module, example: torch.Tensor, max_stages: int = 4) -> list[str]:
    """The layers whose activations the feature signal reads, found from one forward of
    ``example`` (a normalized batch of at least one input). The last ``max_stages`` resolutions'
    stage ends, then the classifier's input when the model ends in an ``nn.Linear``."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    counts: dict[str, int] = {}
    linear_calls: list[str] = []
    handles = []

    def recorder(name: str, module: nn.Module):
        def hook(_module, _inputs, output):
            counts[name] = counts.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                calls.append((name, tuple(output.shape)))
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
    last_at_resolution: OrderedDict[tuple[int, int], str] = OrderedDict()
    for name, shape in calls:
        if len(shape) == 4 and counts[name] == 1 and shape[2:] != (1, 1):  # 1x1: a global pool, = the classifier's input
            last_at_resolution.pop(shape[2:], None)  # keep resolutions in the order they end
            last_at_resolution[shape[2:]] = name
    stages = list(last_at_resolution.values())[-max_stages:] if max_stages else []
    layers = [name for name in stages]
    if linear_calls and counts[linear_calls[-1]] == 1:
        layers.append(linear_calls[-1] + INPUT_SUFFIX)
    return layers


class ActivationTap:
    """Forward hooks on ``model`` that keep the pooled activations of ``layers`` from the latest
    forward: ``tap.take()`` returns them (one (N, D) tensor per layer, in order) and clears them.

    The hooks stay registered while the tap lives: the guard's forward of M fills them."""

    def __init__(self, model: nn.Module, layers: list[str]):
        modules = dict(model.named_modules())
        missing = [layer for layer in layers if layer.removesuffix(INPUT_SUFFIX) not in modules]
        if missing:
            raise ValueError(f"the model has no layer {missing[0]!r} for the feature signal")
        self.layers = list(layers)
        self._values: dict[str, torch.Tensor] = {}
        self._handles = []
        for layer in self.layers:
            module = modules[layer.removesuffix(INPUT_SUFFIX)]
            if layer.endswith(INPUT_SUFFIX):
                self._handles.append(module.register_forward_pre_hook(self._keep_input(layer)))
            else:
                self._handles.append(module.register_forward_hook(self._keep_output(layer)))

    def _keep_output(self, layer: str):
        def hook(_module, _inputs, output):
            self._values[layer] = pooled(output)
        return hook

    def _keep_input(self, layer: str):
        def hook(_module, inputs):
            self._values[layer] = pooled(inputs[0])
        return hook

    def take(self) -> list[torch.Tensor]:
        missing = [layer for layer in self.layers if layer not in self._values]
        if missing:
            raise RuntimeError(f"layer {missing[0]!r} did not run in the model's forward")
        values = [self._values[layer] for layer in self.layers]
        self._values = {}
        return values

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
