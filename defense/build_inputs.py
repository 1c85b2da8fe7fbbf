"""What :meth:`defense.Bundle.build` makes of what it is handed, before any training: the build's settings,
the preprocessing, the suspect model (a spec or an ``nn.Module``) checked on a probe batch, the
auxiliary method and a supplied auxiliary model, the clean images and a separate calibration folder.

Each check raises :class:`defense.errors.UserError` with the one-line message the command prints;
options are named as the command spells them (``--clean-data``), the Python keyword being the same
name in snake case (``clean_data``).
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

import torch
import torch.nn as nn

from defense.build import BuildConfig
from defense.canary import CANARY_KINDS
from defense.data import ImageSet, load_image_folder, read_class_names, scan_flat_folder
from defense.errors import UserError
from defense.image_inputs import labeled_image_set
from defense.manifest import sha256_of
from defense.models import instantiate, load_user_model, parse_model_spec
from defense.models.exported import check_dynamic_batch
from defense.models.loading import ARCHIVE_KINDS, ModelSpec
from defense.preprocessing import Preprocessing

# BuildConfig fields that Bundle.build() takes as its own keywords, not among **options.
SET_BY_BUILD = ("labels", "auxiliary", "device", "progress")
# The settings whose values the command's argument types check (badexpert/common.py), checked here
# for Python callers: in (0, 1), in (0, 1], one of a few words.
FRACTIONS = ("calibration_fraction", "selection_fraction", "fpr", "threshold_delta", "unlearn_target_ratio",
             "finetune_recover_ratio", "min_early_dip", "pseudo_label_agreement_goal")
CHOICES = {"threshold_rule": ("conformal", "ucb"), "expert_labels": ("shift", "derangement"),
           "self_test": ("off", "report", "choose")}


def build_config(options: dict, *, labels: bool, auxiliary: str, device: str, progress: bool) -> BuildConfig:
    """The build's settings: BuildConfig's defaults, overridden by ``options`` (its field names)."""
    names = {field.name: field for field in dataclasses.fields(BuildConfig)}
    unknown = sorted(name for name in options if name not in names or name in SET_BY_BUILD)
    if unknown:
        known = [name for name in names if name not in SET_BY_BUILD]
        close = difflib.get_close_matches(unknown[0], known, n=1)
        raise TypeError(f"Bundle.build() got an unknown option {unknown[0]!r}"
                        + (f" (did you mean {close[0]!r}?)" if close else "")
                        + f"; besides its own keywords it takes BuildConfig's fields: {', '.join(known)}")
    values = {name: tuple(value) if isinstance(names[name].default, tuple) else value
              for name, value in options.items()}
    config = BuildConfig(**values, labels=labels, auxiliary=auxiliary, device=device, progress=progress)
    check_settings(config)
    return config


def check_settings(config: BuildConfig) -> None:
    """The values the command's argument types would refuse, and BCU's own."""
    for name in FRACTIONS:
        if not 0.0 < getattr(config, name) < 1.0:
            raise UserError(f"--{name.replace('_', '-')}: must be in (0, 1), got {getattr(config, name)}")
    if not 0.0 < config.alpha <= 1.0:
        raise UserError(f"--alpha: must be in (0, 1], got {config.alpha}")
    for name in ("unlearn_lr", "finetune_lr"):
        if getattr(config, name) is not None and not getattr(config, name) > 0:
            raise UserError(f"--{name.replace('_', '-')}: must be positive (or None: auto), got {getattr(config, name)}")
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise UserError(f"--{name.replace('_', '-')}: expected {' or '.join(choices)}, got {getattr(config, name)!r}")
    if config.self_test == "choose" and config.unlearn_lr is not None:
        raise UserError(f"--self-test choose: chooses the unlearning rate, so it cannot be combined with "
                        f"--unlearn-lr {config.unlearn_lr:g}; use --self-test report to measure a fixed rate")
    kinds = tuple(config.canary_kinds)
    if not kinds or not set(kinds) <= set(CANARY_KINDS) or len(set(kinds)) != len(kinds):
        raise UserError(f"--canaries: expected one or more distinct kinds among {', '.join(CANARY_KINDS)}, "
                        f"got {' '.join(kinds) or 'none'}")
    if any(not 0.0 <= p <= 1.0 for p in config.bcu_reinit_probabilities):
        raise UserError(f"--bcu-reinit-probabilities: each must be in [0, 1], got {list(config.bcu_reinit_probabilities)}")
    check_bcu_settings(config)


def auxiliary_method(auxiliary: str | None, supplied: bool) -> str:
    """finetune, bcu or supplied, from --auxiliary and whether a repaired model is supplied."""
    if supplied and auxiliary:
        raise UserError(f"--auxiliary {auxiliary}: cannot be combined with --auxiliary-model/--auxiliary-weights "
                        "(a supplied model is the auxiliary); give one or the other")
    return "supplied" if supplied else auxiliary or "finetune"


def check_bcu_settings(config: BuildConfig) -> None:
    if len(config.bcu_reinit_probabilities) < 3:
        raise UserError("--bcu-reinit-probabilities: give at least 3 values (stem, one or more stages, classifier)")
    for option in ("bcu_epochs", "bcu_batch_size"):
        if getattr(config, option) < 1:
            raise UserError(f"--{option.replace('_', '-')}: must be at least 1")
    if not config.bcu_lr > 0:
        raise UserError(f"--bcu-lr: must be positive, got {config.bcu_lr}")


def resolve_preprocessing(architecture: str, preset: str | None = None, input_size=None, mean=None,
                          std=None) -> Preprocessing:
    """The preset (default: cifar for cifar_* and tiny_cnn architectures, imagenet otherwise), with
    the given input size, mean and std in place of its own."""
    preset = preset or ("cifar" if architecture.startswith(("cifar_", "tiny_cnn")) else "imagenet")
    overrides = {name: tuple(value) for name, value in (("input_size", input_size), ("mean", mean), ("std", std))
                 if value}
    return dataclasses.replace(Preprocessing.from_preset(preset), **overrides)


def check_model_outputs(model: nn.Module, preprocessing: Preprocessing, num_classes: int, spec_text: str,
                        option: str = "--model") -> None:
    """A probe batch at the input size must give (batch, num_classes) logits."""
    height, width = preprocessing.input_size
    probe = torch.zeros(2, 3, height, width)
    try:
        with torch.inference_mode():
            logits = model.eval()(probe)
    except Exception as error:
        raise UserError(f"{option} {spec_text}: forward pass on {height}x{width} inputs failed ({str(error).splitlines()[0]}); "
                        "check --input-size/--preset")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] != num_classes:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(f"{option} {spec_text}: outputs {shape}, expected (batch, {num_classes}) logits; check --num-classes")
    check_dynamic_batch(model, preprocessing.input_size, f"{option} {spec_text}")


def check_rebuildable(module: nn.Module, spec: ModelSpec, option: str) -> None:
    """An ``nn.Module`` handed over in Python: the bundle stores ``spec`` and the module's weights,
    so a fresh ``spec`` model must take exactly those weights."""
    if spec.kind in ARCHIVE_KINDS:
        raise UserError(f"{option} {spec.name}: with an nn.Module, name its architecture (a registered name or "
                        "'package.module:factory'), not an archive file")
    try:
        instantiate(spec).load_state_dict(module.state_dict(), strict=True)
    except RuntimeError as error:
        raise UserError(f"{option} {spec.name}: does not fit the module's weights "
                        f"({str(error).splitlines()[0]}); name the module's own architecture")


def resolve_model(model: nn.Module | str | Path, num_classes: int, weights: Path | None,
                  architecture: str | None) -> tuple[nn.Module, ModelSpec, str]:
    """The suspect model, its spec and the text that names it in messages: from a spec (with
    ``weights`` unless it is an archive), or an ``nn.Module`` with its ``architecture`` spec."""
    if not isinstance(model, nn.Module):
        text = str(model)
        spec = parse_model_spec(text, num_classes)
        return load_user_model(spec, Path(weights) if weights is not None else None), spec, text
    if architecture is None:
        raise UserError("--model: an nn.Module needs architecture= (a registered name such as 'cifar_resnet18', "
                        "or 'package.module:factory'): the bundle rebuilds the model from it")
    if weights is not None:
        raise UserError("--weights: an nn.Module carries its own weights; give weights with a model spec only")
    spec = parse_model_spec(architecture, num_classes)
    check_rebuildable(model, spec, "--architecture")
    return model.float(), spec, architecture


def _renamed(error: UserError) -> UserError:
    """The loaders name --model/--weights; for the auxiliary they mean --auxiliary-model/--auxiliary-weights."""
    return UserError(str(error).replace("--weights", "--auxiliary-weights").replace("--model", "--auxiliary-model"))


def load_supplied_auxiliary(auxiliary_model: nn.Module | str | None, auxiliary_weights: Path | None,
                            model_text: str, spec: ModelSpec, preprocessing: Preprocessing,
                            num_classes: int) -> tuple[nn.Module, dict]:
    """The user's repaired model, which must share M's architecture (the bundle stores one), and
    the record of where it came from."""
    if isinstance(auxiliary_model, nn.Module):
        check_rebuildable(auxiliary_model, spec, "--auxiliary-model")
        check_model_outputs(auxiliary_model, preprocessing, num_classes, model_text, option="--auxiliary-model")
        return auxiliary_model.float(), {"spec": spec.to_dict()}
    text = str(auxiliary_model) if auxiliary_model is not None else model_text
    try:
        auxiliary_spec = parse_model_spec(text, num_classes)
    except UserError as error:
        raise _renamed(error) from None
    archive = auxiliary_spec.kind == spec.kind and spec.kind in ARCHIVE_KINDS  # TorchScript or .pt2: any file
    same = archive or (auxiliary_spec.kind, auxiliary_spec.name) == (spec.kind, spec.name)
    if not same:
        raise UserError(f"--auxiliary-model {text}: not the architecture of --model {model_text}; the bundle stores one "
                        "architecture, so bring a repaired copy of the same model (or use --auxiliary bcu)")
    weights = Path(auxiliary_weights) if auxiliary_weights is not None else None
    try:
        auxiliary = load_user_model(auxiliary_spec if archive else spec, weights)
    except UserError as error:
        raise _renamed(error) from None
    check_model_outputs(auxiliary, preprocessing, num_classes, text, option="--auxiliary-model")
    source = {"spec": auxiliary_spec.to_dict()}
    if weights is not None:
        source.update(weights=weights.name, weights_sha256=sha256_of(weights))
    return auxiliary, source


def clean_image_set(clean_data, preprocessing: Preprocessing, class_names: list[str] | str | Path | None,
                    labels: bool, progress: bool) -> ImageSet:
    """The reserved clean images: a folder (one sub-folder per class, or flat without labels), or an
    ``(images, labels)`` pair of a uint8 tensor or PIL images and their labels (None: no labels)."""
    if isinstance(class_names, (str, Path)):
        class_names = read_class_names(Path(class_names))
    if isinstance(clean_data, tuple):
        images, targets = clean_data
        return labeled_image_set(images, targets if labels else None, preprocessing, class_names)
    return load_image_folder(Path(clean_data), preprocessing, class_names, labeled=labels, progress=progress)


def resolve_num_classes(num_classes: int | None, clean: ImageSet) -> int:
    """--num-classes, or the number of classes of the clean images."""
    num_classes = num_classes or (len(clean.class_names) if clean.class_names else None)
    if num_classes is None:
        raise UserError("--num-classes is required with --no-labels (or give --class-names)")
    if clean.class_names and len(clean.class_names) != num_classes:
        raise UserError(f"--num-classes {num_classes}: the clean folder has {len(clean.class_names)} classes; "
                        "give --class-names listing all the model's classes in output order")
    return num_classes


def separate_calibration_paths(calibration_data: Path | str | None, clean: ImageSet) -> list[Path] | None:
    """The --calibration-data images, none of which may be among the clean images."""
    if calibration_data is None:
        return None
    from defense.calibrate import file_digest

    paths = scan_flat_folder(Path(calibration_data), option="--calibration-data")
    labeled = {file_digest(path) for path in clean.paths if path is not None and Path(path).is_file()}
    shared = [path for path in paths if file_digest(path) in labeled]  # by content: copies too
    if shared:
        raise UserError(f"--calibration-data {calibration_data}: {len(shared)} of its images are also in "
                        f"--clean-data (by content, e.g. {shared[0]}); the threshold must be set on images that "
                        "neither finetuning nor the rate choices saw: give a separate folder")
    return paths


def check_out_folder(out: Path | None, overwrite: bool) -> None:
    """--out may not hold files unless --overwrite (checked first: before any work)."""
    if out is not None and out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: the folder exists and is not empty; choose another or pass --overwrite")
