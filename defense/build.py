"""The offline job: suspect model + reserved clean images -> a calibrated guard.

    split D into D_fit / D_select / D_cal
        D_fit     ->  backdoor expert B (unlearning)  and  auxiliary model M' (clean finetuning)
        D_select  ->  their learning rates (unless the user fixes them), the feature signal's scales
        D_fit     ->  the feature signal's class statistics (M's activations)
        D_cal     ->  scores  ->  threshold tau   (or --calibration-data: clean images, no labels)

Each set is used by one step only, so the threshold rule's assumption (calibration scores
exchangeable with fresh clean scores) holds. docs/method.md explains the choices.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn

from defense.auxiliary_recipes import FINETUNE_RECIPES, finetune_recipe  # noqa: F401 (the CLI lists the recipes)
from defense.bcu import DEFAULT_STAGE_PROBABILITIES, bcu_auxiliary
from defense.data import ImageSet, iter_image_batches
from defense.errors import UserError
from defense.feature_fit import fit_guard_features
from defense.feature_signal import SIGNALS
from defense.finetune import accuracy, predict_logits
from defense.guard import Guard
from defense.preprocessing import Preprocessing
from defense.calibrate import calibration_record, image_record, require_finite, score_batches
from defense.rates import all_finite, choose_finetuning_rate, choose_unlearning_rate
from defense.canary import CANARY_KINDS, DEFAULT_CANARY_KINDS  # noqa: F401 (the CLI lists the kinds)
from defense.self_test import run_self_test
from defense.threshold import calibrate_threshold

# Fewer clean images than this earn a warning (BENCHMARKS.md, reserved-set size).
RECOMMENDED_CLEAN_IMAGES = 1000


@dataclass
class BuildConfig:
    """Every setting of the offline job; the defaults are the paper's (docs/method.md)."""

    # Shares of the labeled clean images held out from finetuning: for the threshold (unless
    # calibration images come separately) and for the learning-rate choices. The rest is D_fit.
    # Measured (BENCHMARKS.md, "The guard as deployed"): finetuning images buy more than extra
    # calibration images taken from the same 2,000; those are better brought unlabeled.
    calibration_fraction: float = 0.2
    selection_fraction: float = 0.1
    fpr: float = 0.01
    threshold_rule: str = "conformal"
    threshold_delta: float = 0.1
    alpha: float = 0.5
    seed: int = 0
    unlearn_lr: float | None = None  # None: choose from D_select
    unlearn_epochs: int = 1
    unlearn_batch_size: int = 128
    unlearn_target_ratio: float = 0.5  # B's D_select accuracy at or below this fraction of M's
    expert_labels: str = "shift"  # the expert's mislabeling: "shift" (y + 1 mod C) or "derangement"
    expert_labels_seed: int | None = None  # derangement: None draws the seed at random (secrets), so it is not public
    finetune_lr: float | None = None  # None: choose from D_select
    finetune_epochs: int = 10
    finetune_batch_size: int = 64
    finetune_milestones: tuple[int, ...] = (2, 4, 6, 8)
    finetune_momentum: float = 0.9
    finetune_weight_decay: float = 1e-4
    finetune_recipe: str = "plain"  # defense/auxiliary_recipes.py: "plain" (the paper's), "warmup" or "fresh_head"
    finetune_recover_ratio: float = 0.8  # M' must end at or above this fraction of M's D_select accuracy
    # Below this early dip (the share of M's D_select accuracy the auxiliary lost at its lowest in the
    # epochs before the first milestone), the build warns that it likely kept the backdoor (BENCHMARKS.md).
    min_early_dip: float = 0.25
    # Without labels: M' finetuned on M's predicted labels must agree with M on this share of D_select.
    # Labeled auxiliaries at their chosen rate agree with M on 77-82% of D_select (BENCHMARKS.md).
    pseudo_label_agreement_goal: float = 0.7
    augment: bool = True
    labels: bool = True  # False: the clean images carry no labels; M's predictions stand in
    auxiliary: str = "finetune"  # "finetune" (needs labels), "bcu" (label-free), "supplied" (build_guard's auxiliary_model)
    bcu_epochs: int = 100  # BCU's reference defaults (defense/bcu.py)
    bcu_lr: float = 0.01
    bcu_batch_size: int = 256
    bcu_momentum: float = 0.9
    bcu_weight_decay: float = 5e-4
    bcu_reinit_probabilities: tuple[float, ...] = DEFAULT_STAGE_PROBABILITIES  # stem, stages..., classifier
    # Which signals decide (defense/feature_signal.py): "expert" (the paper's score alone), "features"
    # (M's hidden activations alone) or "fused" (the more suspect of the two; BENCHMARKS.md, "A second signal").
    signals: str = "fused"
    feature_stages: int = 4  # the feature signal reads the ends of M's last this-many resolutions, and the classifier's input
    # The canary self-test (defense/self_test.py): "off", "report" (measure the guard procedure on canary
    # backdoors implanted in a copy of M) or "choose" (also pick the unlearning rate by the canary).
    self_test: str = "report"
    canary_seed: int | None = None  # None: the canaries are drawn at random (secrets), so nobody can know them
    canary_kinds: tuple[str, ...] = DEFAULT_CANARY_KINDS  # one canary of each kind (defense/canary.py: patch, blend, warp)
    device: str = "cpu"
    progress: bool = True


@dataclass
class BuildResult:
    guard: Guard
    manifest_fields: dict
    calibration_scores: torch.Tensor
    warnings: list[str] = field(default_factory=list)


def stratified_split(labels: torch.Tensor, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Sorted index tensors [rest, part 1, part 2, ...]: each class gives ``fractions[i]`` of its
    images to part i + 1 (rounded), and the rest to the first. Seeded and stratified."""
    if any(not 0.0 <= f < 1.0 for f in fractions) or sum(fractions) >= 1.0:
        raise UserError(f"the held-out shares of the clean images ({', '.join(f'{f:g}' for f in fractions)}) "
                        "must each be in [0, 1) and sum to less than 1")
    generator = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in range(len(fractions) + 1)]
    for value in labels.unique(sorted=True):
        members = (labels == value).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        start = 0
        for i, fraction in enumerate(fractions):
            size = int(round(fraction * len(members))) if len(members) > 1 else 0
            parts[i + 1].append(members[start:start + size])
            start += size
        parts[0].append(members[start:])
    return [torch.cat(part).sort().values for part in parts]


def check_supplied_auxiliary(auxiliary, cal_images, cal_reference, normalizer, reference_accuracy: float,
                             config: BuildConfig) -> tuple[nn.Module, dict]:
    """A repaired model the user brings (NAD, ANP, I-BAU, BCU, ...) serves as M' as it is."""
    logits = predict_logits(auxiliary, cal_images, normalizer, config.device)
    if not all_finite(logits):
        raise UserError("--auxiliary-weights: the auxiliary model gives non-finite outputs on the clean images")
    goal = config.finetune_recover_ratio * reference_accuracy
    record = {"method": "supplied", "goal_accuracy": goal, "calibration_accuracy": accuracy(logits, cal_reference)}
    if record["calibration_accuracy"] < goal:
        record["warning"] = (f"the supplied auxiliary model reaches {record['calibration_accuracy']:.1%} on D_select, "
                             f"below {config.finetune_recover_ratio:.0%} of M's: is it the right model and class order?")
    return auxiliary.float().eval(), record


def make_auxiliary(model, supplied, fit: ImageSet, cal: ImageSet, normalizer, reference_accuracy: float,
                   config: BuildConfig, log) -> tuple[nn.Module, dict]:
    """M' by the configured method: clean finetuning, BCU, or the user's own repaired model."""
    if config.auxiliary == "supplied":
        log("auxiliary model: supplied by the user")
        return check_supplied_auxiliary(supplied, cal.images, cal.labels, normalizer, reference_accuracy, config)
    if config.auxiliary == "bcu":
        log("auxiliary model: BCU (layer-wise re-initialization and distillation, no labels)")
        return bcu_auxiliary(model, fit.images, cal.images, cal.labels, normalizer, reference_accuracy, config, log)
    if config.labels:
        log("auxiliary model: clean finetuning")
        return choose_finetuning_rate(model, fit, cal.images, cal.labels, normalizer, reference_accuracy, config, log)
    # Without labels, fit.labels are M's own predictions on clean images: clean images carry no
    # trigger, so these labels teach M's normal function only (pseudo-label finetuning).
    # M agrees with its own labels on 100% of D_select, so the labeled goal (a share of M's accuracy)
    # does not carry over; the goal is agreement with M instead (see pseudo_label_agreement_goal).
    log("auxiliary model: finetuning on M's predicted labels (no labels given)")
    auxiliary, record = choose_finetuning_rate(model, fit, cal.images, cal.labels, normalizer, reference_accuracy, config,
                                               log, goal=config.pseudo_label_agreement_goal)
    return auxiliary, {**record, "method": "pseudo_label_finetune", "labels": "predicted by the model"}


def add_feature_signal(guard: Guard, fit: ImageSet, select: ImageSet, num_classes: int, config: BuildConfig, log,
                       warnings: list[str]) -> dict | None:
    """Fit the feature signal into ``guard`` (unless ``config.signals`` is "expert") and return its
    manifest record. A model whose activations cannot be read (a TorchScript or exported archive,
    an unusual forward) keeps the expert's score alone, with a warning; with ``--signals features``
    that is an error."""
    if config.signals == "expert":
        return None
    log(f"feature signal: M's activations on D_fit ({len(fit)} images), scaled on D_select ({len(select)})")
    try:
        detector = fit_guard_features(guard, fit.images, select.images, num_classes, config.signals,
                                      config.feature_stages)
    except Exception as error:  # hooks refused, a layer that does not run, a singular covariance, ...
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if isinstance(guard.model, torch.jit.ScriptModule):
            reason = ("a TorchScript archive allows no forward hooks; build from the Python model (an architecture "
                      "name or module:factory with --weights) to get it")
        if config.signals == "features":
            raise UserError(f"--signals features: the feature signal cannot be read from this model ({reason})")
        guard.set_feature_detector(None)
        warnings.append(f"the feature signal is off for this model ({reason}); the guard uses the expert's score alone")
        return None
    center, spread = detector.normalizer[2:].tolist()
    return {"signals": config.signals, "layers": detector.layers, "statistic": "class-conditional Mahalanobis",
            "fit_images": len(fit), "reference_images": len(select),
            "layer_reference": {"center": detector.layer_center.tolist(), "spread": detector.layer_spread.tolist()},
            "fusion_reference": {"feature_center": float(detector.normalizer[0]),
                                 "feature_spread": float(detector.normalizer[1]),
                                 "expert_log_center": center, "expert_log_spread": spread}}


def build_guard(model: nn.Module, clean: ImageSet, preprocessing: Preprocessing, num_classes: int,
                config: BuildConfig, log=print, auxiliary_model: nn.Module | None = None,
                calibration_paths: list[Path] | None = None) -> BuildResult:
    """Run the whole offline job in memory. Saving is :func:`defense.bundle.save_bundle`'s job.

    The clean images are split three ways, so that each choice is made on images that no earlier
    step saw: D_fit finetunes the two models, D_select chooses their learning rates, and D_cal
    (``calibration_paths`` when given: clean images, labels ignored; else a share of ``clean``)
    sets the threshold alone. ``auxiliary_model`` is the user's repaired model, with
    ``config.auxiliary == "supplied"``.
    """
    if config.auxiliary not in ("finetune", "bcu", "supplied"):
        raise UserError(f"--auxiliary {config.auxiliary}: expected finetune, bcu or a supplied model")
    if config.signals not in SIGNALS:
        raise UserError(f"--signals {config.signals}: expected one of {', '.join(SIGNALS)}")
    finetune_recipe(config.finetune_recipe)  # a UserError naming the known recipes
    if config.self_test not in ("off", "report", "choose"):
        raise UserError(f"--self-test {config.self_test}: expected off, report or choose")
    if config.feature_stages < 0:
        raise UserError(f"--feature-stages {config.feature_stages}: must be 0 (the classifier's input only) or more")
    if (config.auxiliary == "supplied") != (auxiliary_model is not None):
        raise ValueError("pass auxiliary_model exactly when config.auxiliary is 'supplied'")
    started = time.monotonic()
    torch.manual_seed(config.seed)
    warnings: list[str] = []
    normalizer = preprocessing.normalizer()
    model = model.float().eval()

    # Without labels, M's own predictions stand in for them (docs/method.md, section 2).
    if not config.labels:
        predicted = predict_logits(model, clean.images, normalizer, config.device).argmax(1)
        clean = ImageSet(clean.images, predicted, clean.class_names, clean.paths)
    if len(clean) < num_classes:
        raise UserError(f"--clean-data: {len(clean)} images for {num_classes} classes; give at least one per class (hundreds are better)")
    separate_calibration = calibration_paths is not None
    held_out = (config.selection_fraction,) + (() if separate_calibration else (config.calibration_fraction,))
    fit_index, select_index, *cal_index = stratified_split(clean.labels, held_out, config.seed)
    fit, select = clean.subset(fit_index), clean.subset(select_index)
    cal = clean.subset(cal_index[0]) if cal_index else None
    if len(fit) < 2 or len(select) < 2 or (cal is not None and len(cal) < 2):
        raise UserError(f"--clean-data: {len(clean)} images are too few to split into finetuning, rate-selection "
                        "and calibration sets")
    n_cal = len(calibration_paths) if separate_calibration else len(cal)
    log(f"clean images: {len(fit)} for finetuning (D_fit), {len(select)} for learning-rate choices (D_select), "
        f"{n_cal} for the threshold (D_cal{', from --calibration-data' if separate_calibration else ''})")
    if len(clean) < RECOMMENDED_CLEAN_IMAGES:
        warnings.append(f"{len(clean)} clean images: with fewer than about {RECOMMENDED_CLEAN_IMAGES} the finetuned "
                        "auxiliary model can keep the backdoor (on CIFAR-10, 200 and 400 images left it at 85-100% "
                        "attack success and the guard at AUROC 0.75-0.93; 1,000 matched 2,000: BENCHMARKS.md)")

    model_logits = predict_logits(model, select.images, normalizer, config.device)
    if not all_finite(model_logits):
        raise UserError("--weights: the model gives non-finite outputs on the clean images; check the weights and --mean/--std")
    model_accuracy = accuracy(model_logits, select.labels)
    log(f"model M: D_select accuracy {model_accuracy:.3f}" + ("" if config.labels else " (agreement with itself: no labels)"))
    if config.labels and model_accuracy < 1.5 / num_classes:
        warnings.append(f"M is near chance on the clean images ({model_accuracy:.3f}): check the class order "
                        "(--class-names) and the preprocessing (--preset/--mean/--std)")

    log(f"backdoor expert: unlearning on wrong labels ({config.expert_labels})")
    expert, expert_record = choose_unlearning_rate(model, fit, select.images, select.labels, num_classes, normalizer,
                                                   model_accuracy, config, log)
    auxiliary, auxiliary_record = make_auxiliary(model, auxiliary_model, fit, select, normalizer, model_accuracy,
                                                 config, log)
    self_test_record = None
    if config.self_test != "off":
        expert, expert_record, auxiliary, auxiliary_record, self_test_record = run_self_test(
            model, expert, expert_record, auxiliary, auxiliary_record, fit, select, num_classes, preprocessing,
            model_accuracy, config, log, warnings)
    warnings += [r["warning"] for r in (expert_record, auxiliary_record) if "warning" in r]

    guard = Guard(model, expert, auxiliary, preprocessing, rejection_threshold=math.nan, alpha=config.alpha,
                  device=torch.device(config.device))
    feature_record = add_feature_signal(guard, fit, select, num_classes, config, log, warnings)
    if separate_calibration:
        batches = iter_image_batches(calibration_paths, preprocessing, option="--calibration-data",
                                     progress=config.progress, desc="scoring calibration images")
    else:
        batches = [cal.images]
    scores = score_batches(guard, batches)
    require_finite(scores, "the calibration images")
    threshold = calibrate_threshold(scores.score, config.fpr, config.threshold_rule, config.threshold_delta)
    warnings += ([threshold.warning] if threshold.warning else []) + threshold.advice
    guard.rejection_threshold = threshold.tau

    expert_accuracy = accuracy(predict_logits(expert, select.images, normalizer, config.device), select.labels)
    auxiliary_accuracy = accuracy(predict_logits(auxiliary, select.images, normalizer, config.device), select.labels)
    settings = asdict(config)
    settings["finetune_milestones"] = list(config.finetune_milestones)
    settings["bcu_reinit_probabilities"] = list(config.bcu_reinit_probabilities)
    labels = "given" if config.labels else "predicted by the model"
    data = {
        "finetuning": image_record(fit.paths, "--clean-data", labels, digests=True),
        "rate_selection": image_record(select.paths, "--clean-data", labels, digests=True),
        "calibration": (image_record(calibration_paths, "--calibration-data", "not used") if separate_calibration
                        else image_record(cal.paths, "--clean-data", "not used")),
        "split_seed": config.seed,
    }
    fields = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "class_names": clean.class_names or [str(i) for i in range(num_classes)],
        "num_classes": num_classes,
        "target_fpr": config.fpr,
        "threshold": threshold.to_dict(),
        "calibration": calibration_record(threshold, scores.score, data["calibration"], n_finetune=len(fit),
                                          labels=config.labels),
        "data": data,
        "accuracy_on_selection": {"model": model_accuracy, "backdoor_expert": expert_accuracy,
                                  "auxiliary_model": auxiliary_accuracy},
        "backdoor_expert": expert_record,
        "auxiliary_model": auxiliary_record,
        **({"feature_signal": feature_record} if feature_record else {}),
        **({"self_test": self_test_record} if self_test_record else {}),
        "settings": settings,
        "seed": config.seed,
        "warnings": warnings,
        "build_seconds": round(time.monotonic() - started, 2),
    }
    return BuildResult(guard, fields, scores.score, warnings)
