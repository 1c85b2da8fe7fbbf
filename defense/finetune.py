"""The two finetunings of BaDExpert, each a short readable loop.

- :func:`unlearn` makes the backdoor expert B: M finetuned on deliberately wrong labels
  (by default y + 1 mod C, paper Alg. 1; or a seeded random derangement, :func:`mislabeling`),
  Adam, one epoch, BatchNorm in train mode.
- :func:`clean_finetune` makes the auxiliary model M': M finetuned on true labels, SGD with
  Nesterov momentum, step decay, random crop and flip.

Both work on uint8 image tensors and the bundle's normalizer, so nothing here knows file formats.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from defense.progress import progress_bar


class Diverged(RuntimeError):
    """The loss or the weights stopped being finite: the learning rate is too large."""


MISLABELINGS = ("shift", "derangement")


def shifted_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Alg. 1's mislabeling: every label moves to its neighbour, y' = (y + 1) mod C."""
    return (labels + 1) % num_classes


def mislabeling(num_classes: int, kind: str = "shift", seed: int = 0) -> torch.Tensor:
    """The expert's wrong label for each class, as a permutation with no fixed point.

    ``shift``: y' = (y + 1) mod C (paper Alg. 1), public, so an attacker can pick the same mapping
    for an all-to-all backdoor. ``derangement``: drawn uniformly from the permutations without a
    fixed point by a generator seeded with ``seed`` (the build draws that seed at random unless told,
    and records the mapping in the bundle)."""
    if num_classes < 2:
        raise ValueError("mislabeling needs at least 2 classes")
    classes = torch.arange(num_classes)
    if kind == "shift":
        return (classes + 1) % num_classes
    if kind != "derangement":
        raise ValueError(f"unknown mislabeling {kind!r}; expected one of {MISLABELINGS}")
    generator = torch.Generator().manual_seed(seed)
    while True:  # rejection sampling: about 1 in e draws has no fixed point
        mapping = torch.randperm(num_classes, generator=generator)
        if not (mapping == classes).any():
            return mapping


def random_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1/8 of the size (reflect padding) and horizontal flip, batched."""
    n, _, height, width = images.shape
    pad = max(1, height // 8)
    padded = F.pad(images.float(), (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    rows = (dy[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    cropped = padded[batch, channel, rows, cols]
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    cropped[flip] = cropped[flip].flip(-1)
    return cropped


def _check_finite(model: nn.Module, loss: torch.Tensor) -> None:
    if not torch.isfinite(loss):
        raise Diverged(f"loss became {loss.item()}")
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise Diverged(f"parameter {name} is no longer finite")


def _batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def unlearn(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    normalizer: nn.Module,
    lr: float,
    epochs: int = 1,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
    wrong_label_of: torch.Tensor | None = None,
) -> nn.Module:
    """Backdoor expert: a copy of ``model`` finetuned on wrong labels (Adam): class y is trained
    as ``wrong_label_of[y]`` (default: the shift, y + 1 mod C)."""
    expert = copy.deepcopy(model).to(device).train()
    normalizer = normalizer.to(device)
    if wrong_label_of is None:
        wrong_label_of = mislabeling(num_classes, "shift")
    wrong_labels = wrong_label_of[labels.cpu()]
    optimizer = torch.optim.Adam(expert.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(labels) // batch_size)
    with progress_bar(total=steps, desc=f"backdoor expert (lr {lr:g})", unit="batch", enabled=progress, leave=False) as bar:
        for _ in range(epochs):
            for index in _batches(len(labels), batch_size, generator):
                inputs = normalizer(images[index].to(device))
                loss = F.cross_entropy(expert(inputs), wrong_labels[index].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                _check_finite(expert, loss.detach())
                bar.update()
    return expert.eval()


def clean_finetune(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    normalizer: nn.Module,
    lr: float,
    epochs: int = 10,
    batch_size: int = 64,
    milestones: tuple[int, ...] = (2, 4, 6, 8),
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    augment: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    warmup_epochs: int = 0,
    max_grad_norm: float | None = None,
    fresh_head: bool = False,
) -> nn.Module:
    """Auxiliary model: a copy of ``model`` finetuned on true labels (SGD, Nesterov, lr / 10 at milestones).

    The auxiliary recipes (defense/auxiliary_recipes.py) add: ``warmup_epochs`` (the rate rises
    linearly from near 0 over the first epochs, per step), ``max_grad_norm`` (gradient clipping), both
    for models without BatchNorm whose large rates collapse, and ``fresh_head`` (the classifier layer
    re-initialized before finetuning, so it is relearned from clean images only)."""
    auxiliary = copy.deepcopy(model).to(device).train()
    if fresh_head:
        reinitialize_classifier(auxiliary, seed)
    normalizer = normalizer.to(device)
    optimizer = torch.optim.SGD(auxiliary.parameters(), lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay)
    steps_per_epoch = -(-len(labels) // batch_size)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=0.1)
    warmup_steps = warmup_epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    steps, step = epochs * steps_per_epoch, 0
    with progress_bar(total=steps, desc=f"auxiliary model (lr {lr:g})", unit="batch", enabled=progress, leave=False) as bar:
        for epoch in range(epochs):
            auxiliary.train()
            for index in _batches(len(labels), batch_size, generator):
                batch = images[index].to(device)
                if augment:
                    batch = random_crop_flip(batch, generator)
                loss = F.cross_entropy(auxiliary(normalizer(batch)), labels[index].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm is not None:
                    nn.utils.clip_grad_norm_(auxiliary.parameters(), max_grad_norm)
                step += 1
                _step_warmed_up(optimizer, step / warmup_steps if step < warmup_steps else 1.0)
                _check_finite(auxiliary, loss.detach())
                bar.update()
            schedule.step()
            if on_epoch_end is not None:
                on_epoch_end(epoch, auxiliary.eval())
    return auxiliary.eval()


def _step_warmed_up(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """One optimizer step at ``scale`` times the scheduled rate; the schedule's own rate is left as it was."""
    scheduled = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] *= scale
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, scheduled):
        group["lr"] = lr


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` in registration order: the classifier of every registry model
    and of torchvision's classifiers."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layer to serve as its classifier")
    return linears[-1]


def reinitialize_classifier(model: nn.Module, seed: int) -> None:
    """Draw the classifier layer's weights afresh (PyTorch's default initialization, seeded)."""
    layer = classifier_layer(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer.reset_parameters()


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images: torch.Tensor, normalizer: nn.Module, device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Logits (N, C) on the CPU for uint8 images, in eval mode."""
    model = model.to(device).eval()
    normalizer = normalizer.to(device)
    outputs = [model(normalizer(images[start:start + batch_size].to(device))).float().cpu()
               for start in range(0, len(images), batch_size)]
    return torch.cat(outputs)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")
