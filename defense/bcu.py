"""BCU, backdoor cleansing without labels (docs/method.md, section 3): the label-free auxiliary model M'.

1. :func:`reinitialize`: the student is a copy of M in which every conv/linear weight and bias
   entry is kept with probability 1 - p and replaced by a fresh initialization otherwise, p
   growing with depth. BatchNorm and every other parameter or buffer is left as it is.
2. :func:`bcu_distill`: M teaches the student on unlabeled clean images with a temperature that
   rises over training, T = 1 + 3 (e + 1) / E (SGD, cosine schedule).

The student keeps M's normal function and loses most of the backdoor, so it can stand in for the
clean-finetuned M' when the reserved images carry no labels.

Depth stages come from the order in which the model registers its conv and linear layers (the
order of ``model.named_modules()``), not from layer names, so any architecture works: the first
layer is the stem, the last the classifier, and the layers between are split into equal stages
(the deeper stages take the extra layers when the count does not divide). On torchvision's
ResNet-18 and this package's ``cifar_resnet18`` that split is exactly conv1 / layer1..layer4 / fc.

Defaults are BCU's reference for CIFAR ResNet-18 (github.com/luluppang/BCU, run/run_defense.sh and
config/defense/ft/cifar10.yaml): probabilities stem 0.01, stages 0.01 / 0.03 / 0.09 / 0.27,
classifier 0.10; 100 epochs, batch 256, SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine
schedule over the epochs, random crop and flip. Two deliberate differences from that code: the
fresh entries come from PyTorch's default conv/linear initialization, U(-1/sqrt(fan_in),
1/sqrt(fan_in)), rather than from the architecture's own constructor (which a TorchScript or
factory model may not offer); and the KL loss is multiplied by T^2 (Hinton et al.'s usual
correction, so the gradient keeps its size while T rises from 1 to 4), where the reference
leaves it unscaled.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from defense.errors import UserError
from defense.finetune import Diverged, _batches, _check_finite, accuracy, predict_logits, random_crop_flip
from defense.progress import progress_bar

# (stem, stage 1, stage 2, stage 3, stage 4, classifier): BCU's CIFAR ResNet-18 defaults.
DEFAULT_STAGE_PROBABILITIES = (0.01, 0.01, 0.03, 0.09, 0.27, 0.10)
# Tried in turn when distillation diverges (non-finite loss or weights): the rate times these.
BACKOFF_FACTORS = (1.0, 0.3, 0.1, 0.03)

_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_SCRIPTED_LAYER_NAMES = {cls.__name__ for cls in _LAYER_TYPES}


def _is_conv_or_linear(module: nn.Module) -> bool:
    if isinstance(module, _LAYER_TYPES):
        return not isinstance(getattr(module, "weight", None), nn.parameter.UninitializedParameter)
    # TorchScript keeps the original class name of each submodule.
    return isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", None) in _SCRIPTED_LAYER_NAMES


def conv_linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's conv and linear layers, in the order it registers them."""
    return [(name, module) for name, module in model.named_modules() if _is_conv_or_linear(module)]


def depth_stages(model: nn.Module, num_stages: int = 4) -> list[tuple[str, list[str]]]:
    """[("stem", [first]), ("stage1", [...]), ..., ("classifier", [last])] by layer order."""
    names = [name for name, _ in conv_linear_layers(model)]
    if not names:
        raise UserError("--auxiliary bcu: the model has no conv or linear layers to re-initialize")
    if len(names) == 1:
        return [("stem", [])] + [(f"stage{i + 1}", []) for i in range(num_stages)] + [("classifier", names)]
    middle = names[1:-1]
    base, extra = divmod(len(middle), num_stages)
    sizes = [base] * (num_stages - extra) + [base + 1] * extra
    stages, start = [("stem", names[:1])], 0
    for index, size in enumerate(sizes):
        stages.append((f"stage{index + 1}", middle[start:start + size]))
        start += size
    stages.append(("classifier", names[-1:]))
    return stages


def _check_probabilities(stage_probabilities: Sequence[float]) -> tuple[float, ...]:
    probabilities = tuple(float(p) for p in stage_probabilities)
    if len(probabilities) < 3:
        raise UserError(f"--bcu-reinit-probabilities: give at least 3 values (stem, stages..., classifier), "
                        f"got {len(probabilities)}")
    if not all(0.0 <= p <= 1.0 for p in probabilities):
        raise UserError(f"--bcu-reinit-probabilities: every value must be in [0, 1], got {list(probabilities)}")
    return probabilities


@torch.no_grad()
def reinitialize(model: nn.Module, stage_probabilities: Sequence[float] = DEFAULT_STAGE_PROBABILITIES,
                 generator: torch.Generator | None = None) -> nn.Module:
    """A copy of ``model`` with each conv/linear weight and bias entry re-initialized with its stage's p.

    ``stage_probabilities`` is (stem, stage 1, ..., stage K, classifier); K = len - 2 stages.
    """
    probabilities = _check_probabilities(stage_probabilities)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    student = copy.deepcopy(model)
    layers = dict(conv_linear_layers(student))
    for (_, names), p in zip(depth_stages(student, len(probabilities) - 2), probabilities):
        for name in names:
            weight = layers[name].weight
            fan_in = nn.init._calculate_fan_in_and_fan_out(weight)[0]
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            for parameter in (weight, getattr(layers[name], "bias", None)):
                if parameter is None:
                    continue
                keep = torch.rand(parameter.shape, generator=generator) >= p  # True with probability 1 - p
                fresh = (torch.rand(parameter.shape, generator=generator) * 2 - 1) * bound
                parameter.copy_(torch.where(keep.to(parameter.device), parameter,
                                            fresh.to(parameter.device, parameter.dtype)))
    return student


def distillation_temperature(epoch: int, epochs: int) -> float:
    """BCU's rising temperature, T = 1 + 3 (e + 1) / E: just above 1 at the start, 4 at the end."""
    return 1.0 + 3.0 * (epoch + 1) / epochs


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(M / T) || softmax(S / T)), averaged over the batch, times T^2."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature ** 2


def bcu_distill(
    teacher: nn.Module,
    images: torch.Tensor,
    normalizer: nn.Module,
    stage_probabilities: Sequence[float] = DEFAULT_STAGE_PROBABILITIES,
    epochs: int = 100,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 256,
    augment: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """The BCU student: ``teacher`` re-initialized layer-wise, then distilled on uint8 ``images``.

    Raises :class:`Diverged` when the loss or the weights stop being finite.
    """
    if epochs < 1:
        raise UserError(f"--bcu-epochs: must be at least 1, got {epochs}")
    generator = torch.Generator().manual_seed(seed)
    teacher = teacher.to(device).eval()
    student = reinitialize(teacher, stage_probabilities, generator).to(device).train()
    normalizer = normalizer.to(device)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    steps = epochs * -(-len(images) // batch_size)
    with progress_bar(total=steps, desc=f"BCU distillation (lr {lr:g})", unit="batch", enabled=progress, leave=False) as bar:
        for epoch in range(epochs):
            temperature = distillation_temperature(epoch, epochs)
            student.train()
            for index in _batches(len(images), batch_size, generator):
                batch = images[index].to(device)
                if augment:
                    batch = random_crop_flip(batch, generator)
                inputs = normalizer(batch)
                with torch.no_grad():
                    teacher_logits = teacher(inputs)
                loss = distillation_loss(student(inputs), teacher_logits, temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                _check_finite(student, loss.detach())
                bar.update()
            schedule.step()
            if on_epoch_end is not None:
                on_epoch_end(epoch, student.eval())
    return student.eval()


def bcu_auxiliary(model: nn.Module, fit_images: torch.Tensor, cal_images: torch.Tensor, cal_reference: torch.Tensor,
                  normalizer: nn.Module, reference_accuracy: float, config, log) -> tuple[nn.Module, dict]:
    """The build's BCU step: distil on D_fit, back off the rate on divergence, check on D_select.

    ``config`` is a :class:`defense.build.BuildConfig`; the record goes to the manifest.
    """
    probabilities = _check_probabilities(config.bcu_reinit_probabilities)
    stages = depth_stages(model, len(probabilities) - 2)
    goal = config.finetune_recover_ratio * reference_accuracy
    search, student, lr = [], None, None
    for factor in BACKOFF_FACTORS:
        lr = config.bcu_lr * factor
        try:
            candidate = bcu_distill(model, fit_images, normalizer, probabilities, config.bcu_epochs, lr,
                                    config.bcu_momentum, config.bcu_weight_decay, config.bcu_batch_size,
                                    config.augment, config.device, config.seed, config.progress)
        except Diverged as error:
            search.append({"lr": lr, "diverged": str(error)})
            log(f"  BCU lr {lr:g}: diverged ({error}), backing off")
            continue
        logits = predict_logits(candidate, cal_images, normalizer, config.device)
        if not torch.isfinite(logits).all():
            search.append({"lr": lr, "diverged": "non-finite outputs on D_select"})
            continue
        student = candidate
        break
    if student is None:
        raise UserError(f"BCU distillation diverged at every rate tried from --bcu-lr {config.bcu_lr:g}; pass a smaller --bcu-lr")
    acc = accuracy(logits, cal_reference)
    search.append({"lr": lr, "calibration_accuracy": acc})
    log(f"  BCU lr {lr:g}: auxiliary D_select accuracy {acc:.3f} (goal >= {goal:.3f})")
    record = {
        "method": "bcu", "lr": lr, "chosen_by": "setting" if lr == config.bcu_lr else "backoff",
        "epochs": config.bcu_epochs, "batch_size": config.bcu_batch_size, "momentum": config.bcu_momentum,
        "weight_decay": config.bcu_weight_decay, "schedule": "cosine", "augment": config.augment,
        "reinit_probabilities": dict(zip((name for name, _ in stages), probabilities)),
        "stage_layers": {name: layers for name, layers in stages},
        "temperature": "1 + 3 (e + 1) / E", "loss": "KL(softmax(M/T) || softmax(S/T)) * T^2",
        "distilled_on": len(fit_images), "goal_accuracy": goal, "calibration_accuracy": acc, "search": search,
    }
    if acc < goal:
        record["warning"] = (f"the BCU student agrees with M's labels on {acc:.1%} of D_select, below the goal {goal:.1%}; "
                             "more --bcu-epochs or more clean images may help")
    return student, record
