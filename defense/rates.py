"""The build's two learning-rate searches, each on D_select (docs/method.md, sections 2 and 3).

- the backdoor expert's unlearning rate: the smallest that erases M's clean function;
- the auxiliary model's finetuning rate: the largest that stays finite and recovers M's accuracy,
  with its early dip recorded and a warning when the auxiliary likely kept the backdoor.

``config`` is the build's ``defense.build.BuildConfig`` (not imported here: build imports this module).
"""

from __future__ import annotations

import math
import secrets

import torch
import torch.nn as nn

from defense.auxiliary_recipes import FinetuneRecipe, finetune_recipe
from defense.data import ImageSet
from defense.errors import UserError
from defense.finetune import Diverged, accuracy, clean_finetune, mislabeling, predict_logits, unlearn

# Ascending: the search stops at the first (smallest) rate that erases the clean function.
UNLEARN_LR_GRID = (1e-5, 2e-5, 3e-5, 5e-5, 7e-5, 1e-4, 1.5e-4, 2e-4, 3e-4, 5e-4, 7e-4,
                   1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 5e-2)
# Descending: the search stops at the first (largest) rate that trains stably and recovers.
FINETUNE_LR_GRID = (0.1, 0.05, 0.03, 0.01, 0.003, 0.001)


def all_finite(logits: torch.Tensor) -> bool:
    return bool(torch.isfinite(logits).all())


NON_FINITE = "non-finite outputs on D_select"  # a search entry's "diverged" when training finished but outputs did not


def trained_at(train, lr: float, cal_images, cal_reference, normalizer, device) -> tuple[nn.Module | None, dict]:
    """Train at ``lr`` and read its D_select accuracy: (model, search entry), or (None, the entry
    saying why the rate is unusable: divergence in training or non-finite outputs)."""
    try:
        model = train(lr)
    except Diverged as error:
        return None, {"lr": lr, "diverged": str(error)}
    logits = predict_logits(model, cal_images, normalizer, device)
    if not all_finite(logits):
        return None, {"lr": lr, "diverged": NON_FINITE}
    return model, {"lr": lr, "calibration_accuracy": accuracy(logits, cal_reference)}


def choose_unlearning_rate(model, fit: ImageSet, cal_images, cal_reference, num_classes, normalizer,
                           reference_accuracy: float, config, log) -> tuple[nn.Module, dict]:
    """The smallest rate at which B's D_select accuracy falls to ``target_ratio`` of M's."""
    labels_seed = config.expert_labels_seed
    if labels_seed is None and config.expert_labels == "derangement":
        labels_seed = secrets.randbits(62)  # not --seed: a public default seed would give a public mapping
    wrong_label_of = mislabeling(num_classes, config.expert_labels, labels_seed or 0)
    labels_record = {"mislabeling": config.expert_labels, "wrong_label_of": wrong_label_of.tolist()}

    def train(lr):
        return unlearn(model, fit.images, fit.labels, num_classes, normalizer, lr, config.unlearn_epochs,
                       config.unlearn_batch_size, config.device, config.seed, config.progress, wrong_label_of)

    if config.unlearn_lr is not None:
        expert = train(config.unlearn_lr)
        acc = accuracy(predict_logits(expert, cal_images, normalizer, config.device), cal_reference)
        return expert, {"method": "unlearning", **labels_record, "lr": config.unlearn_lr, "chosen_by": "user",
                        "calibration_accuracy": acc}
    goal = config.unlearn_target_ratio * reference_accuracy
    search, fallback = [], None
    for lr in UNLEARN_LR_GRID:
        expert, entry = trained_at(train, lr, cal_images, cal_reference, normalizer, config.device)
        search.append(entry)
        if expert is None:
            break
        acc = entry["calibration_accuracy"]
        log(f"  unlearning lr {lr:g}: backdoor expert D_select accuracy {acc:.3f} (goal <= {goal:.3f})")
        fallback = (expert, lr, acc)
        if acc <= goal:
            return expert, {"method": "unlearning", **labels_record, "lr": lr, "chosen_by": "auto",
                            "goal_accuracy": goal, "calibration_accuracy": acc, "search": search}
    if fallback is None:
        raise UserError("unlearning diverged at the smallest learning rate; pass --unlearn-lr explicitly")
    expert, lr, acc = fallback
    return expert, {"method": "unlearning", **labels_record, "lr": lr, "chosen_by": "auto", "goal_accuracy": goal,
                    "calibration_accuracy": acc, "search": search,
                    "warning": f"no rate in the grid brought the expert to the goal; used the largest stable one ({lr:g})"}


def choose_finetuning_rate(model, fit: ImageSet, cal_images, cal_reference, normalizer,
                           reference_accuracy: float, config, log,
                           goal: float | None = None, recipe: FinetuneRecipe | None = None) -> tuple[nn.Module, dict]:
    """The largest rate at which clean finetuning stays finite and recovers M's D_select accuracy
    (at least ``goal``; default: ``finetune_recover_ratio`` times M's accuracy), finetuning by
    ``recipe`` (default: ``config.finetune_recipe``)."""
    recipe = recipe or finetune_recipe(config.finetune_recipe)

    def train(lr, accuracy_by_epoch: list[float]):
        def record_accuracy(epoch: int, auxiliary: nn.Module) -> None:
            logits = predict_logits(auxiliary, cal_images, normalizer, config.device)
            accuracy_by_epoch.append(accuracy(logits, cal_reference) if all_finite(logits) else math.nan)

        return clean_finetune(model, fit.images, fit.labels, normalizer, lr, config.finetune_epochs,
                              config.finetune_batch_size, config.finetune_milestones, config.finetune_momentum,
                              config.finetune_weight_decay, config.augment, config.device, config.seed,
                              config.progress, on_epoch_end=record_accuracy, **recipe.finetune_options())

    grid = (config.finetune_lr,) if config.finetune_lr is not None else FINETUNE_LR_GRID
    goal = config.finetune_recover_ratio * reference_accuracy if goal is None else goal
    search, best = [], None
    for lr in grid:
        accuracy_by_epoch: list[float] = []
        auxiliary, entry = trained_at(lambda rate: train(rate, accuracy_by_epoch), lr, cal_images, cal_reference,
                                      normalizer, config.device)
        search.append(entry)
        if auxiliary is None:
            if entry["diverged"] != NON_FINITE:
                log(f"  clean finetuning lr {lr:g}: diverged ({entry['diverged']}), backing off")
            continue
        acc = entry["calibration_accuracy"]
        dip = early_dip(reference_accuracy, accuracy_by_epoch, config.finetune_milestones)
        entry.update(accuracy_by_epoch=accuracy_by_epoch, early_dip=dip)
        log(f"  clean finetuning{'' if recipe.name == 'plain' else f' ({recipe.name})'} lr {lr:g}: auxiliary D_select accuracy {acc:.3f} (goal >= {goal:.3f}), "
            f"early dip {dip:.0%} (warns under {config.min_early_dip:.0%})")
        if best is None or acc > best[2]:
            best = (auxiliary, lr, acc, dip)
        if acc >= goal:
            best = (auxiliary, lr, acc, dip)
            break
    if best is None:
        raise UserError("clean finetuning diverged at every learning rate tried; pass a smaller --finetune-lr")
    auxiliary, lr, acc, dip = best
    record = {"method": "clean_finetune", "recipe": recipe.name, "lr": lr, "chosen_by": "user" if config.finetune_lr is not None else "auto",
              "goal_accuracy": goal, "calibration_accuracy": acc, "early_dip": dip,
              "min_early_dip": config.min_early_dip, "search": search}
    if acc < goal:
        record["warning"] = f"no rate reached the goal D_select accuracy {goal:.1%}; kept the best ({lr:g})"
    elif dip < config.min_early_dip:
        record["warning"] = early_dip_warning(dip, lr, search, config.min_early_dip, goal, reference_accuracy)
    return auxiliary, record


def early_dip(reference_accuracy: float, accuracy_by_epoch: list[float], milestones: tuple[int, ...]) -> float:
    """The share of M's D_select accuracy the auxiliary lost at its lowest in the epochs at its initial
    learning rate (up to the first milestone): the paper's sign (App. A.1) that finetuning moved the
    model far enough to weaken a backdoor. Negative when the auxiliary only gained; an epoch with
    non-finite outputs (NaN) counts as accuracy 0."""
    if not accuracy_by_epoch:
        return 0.0  # no finetuning epoch: the auxiliary is M, backdoor included
    if reference_accuracy <= 0:
        return 0.0  # M has nothing to lose (and the build warned that it is near chance)
    first_epochs = accuracy_by_epoch[: min(milestones, default=len(accuracy_by_epoch)) or 1]
    lowest = min(0.0 if math.isnan(value) else value for value in first_epochs)
    return (reference_accuracy - lowest) / reference_accuracy


def early_dip_warning(dip: float, lr: float, search: list[dict], min_early_dip: float, goal: float,
                      reference_accuracy: float) -> str:
    """The build's warning for an auxiliary that barely dipped. It names a larger rate of the search
    that dipped enough and missed the accuracy goal narrowly (by under a tenth of M's accuracy)."""
    message = (f"the auxiliary model (finetuning lr {lr:g}) lost at most {dip:.0%} of M's D_select accuracy in its "
               f"first epochs, under the {min_early_dip:.0%} at which finetuning weakened the backdoor in the "
               "benchmarks: it likely kept the backdoor, which leaves detection to the backdoor expert alone "
               "(such guards let 0-95% of triggered inputs through in the benchmarks)")
    near_misses = [entry for entry in search
                   if entry["lr"] > lr and entry.get("early_dip", -1.0) >= min_early_dip
                   and entry["calibration_accuracy"] >= goal - 0.1 * reference_accuracy]
    if near_misses:
        entry = max(near_misses, key=lambda e: e["calibration_accuracy"])
        message += (f". lr {entry['lr']:g} dipped enough ({entry['early_dip']:.0%}) and ended at "
                    f"{entry['calibration_accuracy']:.1%} D_select accuracy, just under the goal {goal:.1%}: "
                    f"--finetune-lr {entry['lr']:g} trades that accuracy for a weaker backdoor")
    return message + "; more clean images help most (docs/method.md, section 3)"
