"""M, B and M' merged into one network: each layer runs the three models side by side as channel groups.

The backdoor expert and the auxiliary model are finetuned copies of M: the same layers, other weights.
:func:`merge_models` rewrites M's ``torch.fx`` graph so that every activation holds the three models'
activations stacked along the channel dimension (M's first, then B's, then M''s; the same for M and B
alone, two groups):

- a convolution on the shared input becomes one convolution with three times the output channels; a
  convolution on stacked activations becomes a grouped convolution (``groups`` times 3) whose
  weights are the three models' stacked;
- a BatchNorm gets the three models' statistics stacked; a linear layer the three models' weights as
  one batched product (one linear layer with stacked rows on the shared input);
- what acts on each channel alone (activations, pooling, dropout in eval mode, adding two stacked
  tensors) is kept as it is, and flattening keeps each model's features in one contiguous block.

One forward of the merged network is fewer, wider operations than three forwards: compact CIFAR
ResNet, one image, 2.33 ms on one thread against 3.6 ms for the three forwards in a row and 2.5 ms
for the parallel graph on two threads (``python -m bench.parallel_forwards``). oneDNN's grouped
convolutions lose at larger batches, and a large model loses more from one thread than it gains, so
the engine uses merged graphs for small batches, where timing at load finds them no slower
(:mod:`defense.engine`). Where a small batch has two cores, it merges M and B alone and runs M'
beside them on a second thread (one image: 1.78 ms against 2.24 ms for the three merged on one
thread, :mod:`defense.jit_graphs`).

A graph with anything else (a module or function not listed in this file, a concatenation, a reshape
other than flattening, a softmax) is not merged: :func:`merge_models` returns None and the engine
keeps its other graphs. A module called twice (a shared ReLU) is merged once. The engine also
checks the merged graph against the eager guard, like every graph it builds.
"""

from __future__ import annotations

import copy
import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from defense.features import INPUT_SUFFIX, pooled

SHARED, STACKED = "shared", "stacked"  # an activation: the one input all models read, or theirs side by side
# modules that act on each channel alone and have no weights: kept as they are
_PER_CHANNEL_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                        nn.LeakyReLU, nn.ELU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                        nn.AdaptiveMaxPool2d)
_PER_CHANNEL_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.gelu, torch.sigmoid,
                          torch.tanh, F.leaky_relu, F.elu, F.dropout, F.max_pool2d, F.avg_pool2d,
                          F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_ELEMENTWISE = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul}
_PER_CHANNEL_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}


class Unmergeable(Exception):
    """The graph holds something :func:`merge_models` does not rewrite."""


class StackedLinear(nn.Module):
    """G linear layers on the G models' stacked features (N, G * F) -> (N, G * out)."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.groups = len(layers)
        self.weight = nn.Parameter(torch.stack([layer.weight.detach() for layer in layers]))  # (G, out, F)
        bias = [layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_features) for layer in layers]
        self.bias = nn.Parameter(torch.stack(bias))  # (G, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise Unmergeable("a linear layer on more than (batch, features)")
        stacked = x.reshape(x.shape[0], self.groups, -1).transpose(0, 1)  # (G, N, F)
        out = torch.baddbmm(self.bias.unsqueeze(1), stacked, self.weight.transpose(1, 2))  # (G, N, out)
        return out.transpose(0, 1).reshape(x.shape[0], -1)


def _joined(modules: list[nn.Module], name: str) -> nn.Parameter:
    """The modules' parameter ``name`` concatenated along its first dimension (M's first)."""
    return nn.Parameter(torch.cat([getattr(module, name).detach() for module in modules]))


def _stacked_conv(convs: list[nn.Conv2d], shared_input: bool) -> nn.Conv2d:
    first = convs[0]
    if first.padding_mode != "zeros" or (shared_input and first.groups != 1):
        raise Unmergeable("a convolution this merge does not rewrite")
    groups = first.groups if shared_input else first.groups * len(convs)
    in_channels = first.in_channels if shared_input else first.in_channels * len(convs)
    conv = nn.Conv2d(in_channels, first.out_channels * len(convs), first.kernel_size, first.stride, first.padding,
                     first.dilation, groups, bias=first.bias is not None)
    conv.weight = _joined(convs, "weight")
    if first.bias is not None:
        conv.bias = _joined(convs, "bias")
    return conv


def _stacked_batchnorm(norms: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    first = norms[0]
    if not first.track_running_stats or first.running_mean is None:
        raise Unmergeable("a BatchNorm without running statistics")
    norm = nn.BatchNorm2d(first.num_features * len(norms), first.eps, first.momentum, first.affine)
    norm.running_mean = torch.cat([n.running_mean for n in norms])
    norm.running_var = torch.cat([n.running_var for n in norms])
    if first.affine:
        norm.weight, norm.bias = _joined(norms, "weight"), _joined(norms, "bias")
    return norm.eval()


def _stacked_linear(layers: list[nn.Linear], shared_input: bool) -> nn.Module:
    if not shared_input:
        return StackedLinear(layers)
    linear = nn.Linear(layers[0].in_features, layers[0].out_features * len(layers), bias=layers[0].bias is not None)
    linear.weight = _joined(layers, "weight")
    if layers[0].bias is not None:
        linear.bias = _joined(layers, "bias")
    return linear


def _stack_module(modules: list[nn.Module], shared_input: bool) -> tuple[nn.Module, bool]:
    """The merged module for the models' ``modules`` at one node, and whether it reads the shared
    input as it is (else the input is stacked first)."""
    first = modules[0]
    if any(type(m) is not type(first) for m in modules):
        raise Unmergeable("the models differ in their layers")
    if type(first) is nn.Conv2d:
        return _stacked_conv(modules, shared_input), shared_input
    if type(first) is nn.Linear:
        return _stacked_linear(modules, shared_input), shared_input
    if type(first) is nn.BatchNorm2d:
        return _stacked_batchnorm(modules), False
    if isinstance(first, _PER_CHANNEL_MODULES) and not any(True for _ in first.parameters()):
        return copy.deepcopy(first), True
    if type(first) is nn.Flatten and first.start_dim == 1 and first.end_dim == -1:
        return copy.deepcopy(first), True
    raise Unmergeable(f"a {type(first).__name__} layer")


class _HooklessTracer(fx.Tracer):
    """``torch.fx``'s tracer, skipping modules' hooks (the guard's activation tap sits on M's modules and
    reads values, which a symbolic trace cannot give it), and recording the graph node of each
    module's input and output (``io``), so that a feature layer that is a block, not one operation,
    is found in the flat graph."""

    def __init__(self):
        super().__init__()
        self.io: dict[str, tuple[fx.Node | None, fx.Node | None]] = {}

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict):
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path):
            output = self.create_proxy("call_module", path, args, kwargs)
        else:
            output = m.forward(*args, **kwargs)
        first = args[0] if args else None
        self.io[path] = (first.node if isinstance(first, fx.Proxy) else None,
                         output.node if isinstance(output, fx.Proxy) else None)
        return output


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [arg for arg in (*node.args, *node.kwargs.values()) if isinstance(arg, fx.Node)]


def merge_models(models: list[nn.Module], taps: list[str] = ()) -> nn.Module | None:
    """One network computing ``models`` (two or more of one architecture, eval mode: M, B and M', or M
    and B) in one pass: normalized inputs in, ``(each model's logits in order, *the first model's
    pooled activations at taps)`` out, the taps named as :mod:`defense.features` names them. None where
    the graph holds something not merged here."""
    try:
        return _merge(models, list(taps))
    except (Unmergeable, fx.proxy.TraceError, TypeError, RuntimeError, ValueError, AttributeError,
            NotImplementedError):
        return None


def _merge(models: list[nn.Module], taps: list[str]) -> nn.Module:
    groups = len(models)
    if groups < 2:
        raise ValueError("merging needs two models or more")
    tracer = _HooklessTracer()
    traced = tracer.trace(models[0])
    named = [dict(model.named_modules()) for model in models]
    if any([(k, type(m)) for k, m in n.items()] != [(k, type(m)) for k, m in named[0].items()] for n in named):
        raise Unmergeable("the models differ in their layers")
    tapped: dict[str, fx.Node] = {}
    for tap in taps:
        node = tracer.io.get(tap.removesuffix(INPUT_SUFFIX), (None, None))[0 if tap.endswith(INPUT_SUFFIX) else 1]
        if node is None:
            raise Unmergeable(f"the feature layer {tap} is not in the graph")
        tapped[tap] = node
    graph, env, layout, root = fx.Graph(), {}, {}, nn.Module()
    made: dict[tuple[str, bool], tuple[str, bool]] = {}  # (M's module, input shared) -> (merged name, reads it as is)

    def stacked(node: fx.Node) -> fx.Node:
        """``node``'s merged value with the models' channels side by side."""
        if layout[node] == STACKED:
            return env[node]
        return graph.call_function(torch.cat, ([env[node]] * groups, 1))

    for node in traced.nodes:
        if node.op == "placeholder":
            env[node], layout[node] = graph.placeholder(node.name), SHARED
        elif node.op == "call_module":
            source = node.args[0] if node.args else None
            if len(_tensor_args(node)) != 1 or not isinstance(source, fx.Node):
                raise Unmergeable("a module with more than one input")
            key = (node.target, layout[source] == SHARED)
            if key not in made:  # a module called twice (a shared ReLU) is merged once
                module, reads_shared = _stack_module([n[node.target] for n in named], layout[source] == SHARED)
                made[key] = (f"m{len(root._modules)}", reads_shared)
                root.add_module(made[key][0], module)
            name, reads_shared = made[key]
            module = root.get_submodule(name)
            value = env[source] if (reads_shared or layout[source] == STACKED) else stacked(source)
            env[node] = graph.call_module(name, (value,))
            per_channel = isinstance(module, (*_PER_CHANNEL_MODULES, nn.Flatten))
            layout[node] = layout[source] if per_channel else STACKED
        elif node.op in ("call_function", "call_method"):
            env[node], layout[node] = _merge_function(graph, node, env, layout, stacked)
        elif node.op == "output":
            logits = node.args[0]
            if not isinstance(logits, fx.Node) or layout[logits] != STACKED:
                raise Unmergeable("the output is not one tensor of the models' logits")
            parts = graph.call_function(torch.chunk, (env[logits], groups, 1))
            outputs = [graph.call_function(operator.getitem, (parts, k)) for k in range(groups)]
            for tap in taps:
                source = tapped[tap]
                value = env[source]
                if layout[source] == STACKED:
                    value = graph.call_function(torch.chunk, (value, groups, 1))
                    value = graph.call_function(operator.getitem, (value, 0))
                outputs.append(graph.call_function(pooled, (value,)))
            graph.output(tuple(outputs))
        else:
            raise Unmergeable(f"a graph node of kind {node.op}")
    merged = fx.GraphModule(root, graph)
    return merged.eval()


def _merge_function(graph: fx.Graph, node: fx.Node, env: dict, layout: dict,
                    stacked: Callable[[fx.Node], fx.Node]) -> tuple[fx.Node, str]:
    """A function or method call of M's graph, rewritten for stacked activations."""
    inputs = _tensor_args(node)
    kinds = {layout[arg] for arg in inputs}
    target = node.target
    per_channel = (node.op == "call_function" and target in _PER_CHANNEL_FUNCTIONS) or \
        (node.op == "call_method" and target in _PER_CHANNEL_METHODS)
    if per_channel and len(inputs) == 1:
        pass
    elif node.op == "call_function" and target in _ELEMENTWISE:
        if len(kinds) > 1:  # the shared input beside stacked activations: stack it
            args = tuple(stacked(a) if isinstance(a, fx.Node) else a for a in node.args)
            return graph.call_function(target, args, dict(node.kwargs)), STACKED
    elif _is_flatten(node) or _is_spatial_mean(node):
        pass
    elif node.op == "call_method" and target == "size" and node.args[1:] in ((0,),) and not node.kwargs:
        return graph.call_method("size", (env[node.args[0]], 0)), SHARED
    elif _is_batch_flatten_view(node, layout):
        pass
    else:
        raise Unmergeable(f"{node.op} {getattr(target, '__name__', target)}")
    args = tuple(env[a] if isinstance(a, fx.Node) else a for a in node.args)
    kwargs = {k: env[v] if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
    made = graph.call_function(target, args, kwargs) if node.op == "call_function" else \
        graph.call_method(target, args, kwargs)
    return made, (STACKED if STACKED in kinds else SHARED)


def _is_flatten(node: fx.Node) -> bool:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    flatten = (node.op == "call_function" and node.target is torch.flatten) or \
        (node.op == "call_method" and node.target == "flatten")
    return flatten and start == 1 and end == -1


def _is_spatial_mean(node: fx.Node) -> bool:
    """``x.mean((2, 3))`` or ``torch.mean(x, [2, 3])``: dims after the channels only."""
    mean = (node.op == "call_function" and node.target is torch.mean) or \
        (node.op == "call_method" and node.target == "mean")
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else dims
    return mean and isinstance(dims, (tuple, list)) and all(isinstance(d, int) and d >= 2 for d in dims)


def _is_batch_flatten_view(node: fx.Node, layout: dict) -> bool:
    """``x.view(x.size(0), -1)`` (or reshape): each model's features stay one contiguous block."""
    if node.op != "call_method" or node.target not in ("view", "reshape") or node.kwargs or len(node.args) != 3:
        return False
    size, rest = node.args[1], node.args[2]
    return isinstance(size, fx.Node) and size.op == "call_method" and size.target == "size" and rest == -1 \
        and layout.get(size) == SHARED
