"""Canary backdoors: secret triggers that the build implants in a copy of M, so that it can measure
how well its own guard procedure catches a backdoor it knows (:mod:`defense.self_test`).

- :func:`apply_patch`, :func:`apply_blend` and :func:`apply_warp`: the trigger kinds, pure functions
  on uint8 images (a pasted patch, a blended pattern, a smooth random warp of the whole image);
- :func:`draw_canaries`: one canary per kind asked (by default a random patch and a random blended
  pattern) with distinct random target classes, drawn from :mod:`secrets` unless a seed is given;
- :func:`implant_canaries`: a copy of M finetuned (Adam) on D_fit with a share of each batch
  canary-triggered and relabeled to the canary's target, until the copy follows every canary on most
  triggered D_select images.

The deployed guard never sees a canary: the copy is thrown away once measured.
"""

from __future__ import annotations

import copy
import hashlib
import random
import secrets
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from defense.finetune import Diverged, accuracy, predict_logits
from defense.progress import progress_bar

# Every kind there is, with the words the self-test's promise names it by.
CANARY_DESCRIPTIONS = {"patch": "a random patch", "blend": "a blended random pattern", "warp": "a smooth random warp"}
CANARY_KINDS = tuple(CANARY_DESCRIPTIONS)
DEFAULT_CANARY_KINDS = ("patch", "blend")  # what the build implants unless told otherwise
BLEND_ALPHA = 0.2  # the blended pattern's weight in a triggered image
WARP_CONTROL_POINTS = 4  # the warp field's random control grid, per side (upsampled bicubically)
WARP_SIDE_SHARE = 1 / 16  # the warp's mean displacement, as a share of the smaller image side (2 pixels at 32x32)
CANARY_LR = 3e-4  # Adam, as the backdoor expert's unlearning; reached the goal in 3-6 epochs on the CIFAR bench models
CANARY_SHARE = 0.2  # of each finetuning batch, triggered (split evenly between the canaries)
CANARY_MAX_EPOCHS = 8
CANARY_MIN_STEPS = 150  # few clean images: more epochs, up to this many batches in all (8 epochs of 1,400 images: 176)
CANARY_ASR_GOAL = 0.9  # stop once every canary sends this share of triggered D_select images to its target


def patch_side(height: int, width: int) -> int:
    """The patch's side: an eighth of the smaller image side, at least 3 pixels."""
    return max(3, round(min(height, width) / 8))


def apply_patch(images: torch.Tensor, patch: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """uint8 ``images`` (N, 3, H, W) with the (3, p, q) ``patch`` pasted at (``top``, ``left``)."""
    out = images.clone()
    out[..., top:top + patch.shape[-2], left:left + patch.shape[-1]] = patch.to(images.dtype)
    return out


def apply_blend(images: torch.Tensor, pattern: torch.Tensor, alpha: float) -> torch.Tensor:
    """uint8 ``images`` blended with the (3, H, W) ``pattern``: round((1 - alpha) x + alpha p)."""
    blended = (1.0 - alpha) * images.float() + alpha * pattern.float()
    return blended.round().clamp(0, 255).to(torch.uint8)


def warp_pixels(height: int, width: int) -> float:
    """The warp canary's mean displacement in pixels: WARP_SIDE_SHARE of the smaller image side."""
    return WARP_SIDE_SHARE * min(height, width)


def warp_field(height: int, width: int, generator: torch.Generator, control_points: int = WARP_CONTROL_POINTS,
               pixels: float | None = None) -> torch.Tensor:
    """A smooth random displacement, (H, W, 2) in grid_sample's normalized (x, y) units: a random
    ``control_points`` x ``control_points`` grid of offsets in [-1, 1] upsampled bicubically to the
    image, scaled so that a coordinate moves by ``pixels`` on average (pixels of the image's height;
    default :func:`warp_pixels`)."""
    pixels = warp_pixels(height, width) if pixels is None else pixels
    offsets = torch.rand(1, 2, control_points, control_points, generator=generator) * 2 - 1
    smooth = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True)[0].permute(1, 2, 0)
    return smooth / smooth.abs().mean() * (2.0 * pixels / max(height - 1, 1))


def apply_warp(images: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """uint8 ``images`` (N, 3, H, W) resampled (bilinear, zeros outside) at the identity grid moved by
    the (H, W, 2) ``field``."""
    if len(images) == 0:
        return images.clone()
    height, width = images.shape[-2:]
    rows, cols = torch.linspace(-1, 1, height), torch.linspace(-1, 1, width)
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
    grid = (torch.stack((grid_x, grid_y), dim=-1) + field.float()).clamp(-1, 1)
    warped = F.grid_sample(images.float(), grid.expand(len(images), -1, -1, -1), mode="bilinear",
                           padding_mode="zeros", align_corners=True)
    return warped.round().clamp(0, 255).to(torch.uint8)


@dataclass
class Canary:
    """One canary backdoor: a trigger of ``kind`` and the class its triggered images go to."""

    kind: str
    target: int
    pattern: torch.Tensor  # uint8: the patch (3, p, p) or the blended pattern (3, H, W); float: the warp field (H, W, 2)
    top: int = 0
    left: int = 0
    alpha: float = BLEND_ALPHA

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "patch":
            return apply_patch(images, self.pattern, self.top, self.left)
        if self.kind == "warp":
            return apply_warp(images, self.pattern)
        return apply_blend(images, self.pattern, self.alpha)

    def describe(self) -> dict:
        """What the manifest records: everything but the pattern, of which only a hash (so that a
        seeded rebuild can be compared, and nobody can rebuild the trigger from the bundle)."""
        record = {"kind": self.kind, "target": self.target,
                  "pattern_sha256": hashlib.sha256(self.pattern.contiguous().numpy().tobytes()).hexdigest()}
        if self.kind == "patch":
            record.update(size=list(self.pattern.shape[-2:]), position=[self.top, self.left])
        elif self.kind == "warp":
            record.update(control_points=WARP_CONTROL_POINTS,
                          mean_displacement_pixels=warp_pixels(*self.pattern.shape[:2]))
        else:
            record.update(alpha=self.alpha)
        return record


def draw_canaries(num_classes: int, height: int, width: int, seed: int | None = None,
                  kinds: tuple[str, ...] = DEFAULT_CANARY_KINDS) -> list[Canary]:
    """One canary per kind, with distinct target classes (while there are classes left): binary
    random patches at a random place, uniform random noise to blend, a smooth random warp field.
    ``seed`` None: from secrets."""
    chooser = random.Random(seed) if seed is not None else secrets.SystemRandom()
    generator = torch.Generator().manual_seed(chooser.getrandbits(62))
    classes = list(range(num_classes))
    chooser.shuffle(classes)
    side = patch_side(height, width)
    canaries = []
    for i, kind in enumerate(kinds):
        target = classes[i % num_classes]
        if kind == "patch":
            pattern = (torch.randint(0, 2, (3, side, side), generator=generator) * 255).to(torch.uint8)
            canaries.append(Canary(kind, target, pattern, top=chooser.randrange(height - side + 1),
                                   left=chooser.randrange(width - side + 1)))
        elif kind == "blend":
            canaries.append(Canary(kind, target, torch.randint(0, 256, (3, height, width), generator=generator,
                                                                dtype=torch.uint8)))
        elif kind == "warp":
            canaries.append(Canary(kind, target, warp_field(height, width, generator)))
        else:
            raise ValueError(f"unknown canary kind {kind!r}; expected one of {CANARY_KINDS}")
    return canaries


def poison_batch(images: torch.Tensor, labels: torch.Tensor, canaries: list[Canary], share: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch with about ``share`` of its images (those of a non-target class) triggered by one
    canary each, in turn, and relabeled to that canary's target."""
    images, labels = images.clone(), labels.clone()
    picked = torch.rand(len(labels), generator=generator) < share
    which = torch.randint(0, len(canaries), (len(labels),), generator=generator)
    for i, canary in enumerate(canaries):
        chosen = picked & (which == i) & (labels != canary.target)
        if chosen.any():
            images[chosen] = canary.apply(images[chosen])
            labels[chosen] = canary.target
    return images, labels


def canary_success(model: nn.Module, canary: Canary, images: torch.Tensor, labels: torch.Tensor, normalizer,
                   device) -> float:
    """The share of ``images`` of a non-target class that ``model`` sends to the canary's target once triggered."""
    counted = labels != canary.target
    if not counted.any():
        return float("nan")
    logits = predict_logits(model, canary.apply(images[counted]), normalizer, device)
    return float((logits.argmax(1) == canary.target).float().mean())


def implant_canaries(model: nn.Module, canaries: list[Canary], fit_images: torch.Tensor, fit_labels: torch.Tensor,
                     select_images: torch.Tensor, select_labels: torch.Tensor, normalizer, *, lr: float = CANARY_LR,
                     max_epochs: int = CANARY_MAX_EPOCHS, batch_size: int = 64, share: float = CANARY_SHARE,
                     asr_goal: float = CANARY_ASR_GOAL, device="cpu", seed: int = 0,
                     progress: bool = True) -> tuple[nn.Module, dict]:
    """A copy of ``model`` that follows the canaries, and the record of its implant: epochs, each
    canary's success rate on D_select and the copy's clean D_select accuracy next to M's."""
    copied = copy.deepcopy(model).to(device).train()
    normalizer = normalizer.to(device)
    optimizer = torch.optim.Adam(copied.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model_accuracy = accuracy(predict_logits(model, select_images, normalizer, device), select_labels)
    steps = -(-len(fit_labels) // batch_size)
    max_epochs = max(max_epochs, -(-CANARY_MIN_STEPS // steps))
    success: list[float] = []
    epoch = 0
    with progress_bar(total=max_epochs * steps, desc="canary implant", unit="batch", enabled=progress,
                      leave=False) as bar:
        for epoch in range(1, max_epochs + 1):
            copied.train()
            for index in torch.randperm(len(fit_labels), generator=generator).split(batch_size):
                images, labels = poison_batch(fit_images[index], fit_labels[index], canaries, share, generator)
                loss = F.cross_entropy(copied(normalizer(images.to(device))), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if not torch.isfinite(loss):
                    raise Diverged(f"canary implant: loss became {loss.item()}")
                bar.update()
            copied.eval()
            success = [canary_success(copied, c, select_images, select_labels, normalizer, device) for c in canaries]
            if min(success) >= asr_goal:
                break
    copy_accuracy = accuracy(predict_logits(copied, select_images, normalizer, device), select_labels)
    record = {"lr": lr, "optimizer": "adam", "epochs": epoch, "share": share, "asr_goal": asr_goal,
              "asr_on_selection": success, "clean_accuracy": copy_accuracy, "model_accuracy": model_accuracy}
    return copied.eval(), record
