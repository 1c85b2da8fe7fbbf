"""The guard from Python: build, load and calibrate a bundle. ``import defense`` exports these; the
``badexpert`` command calls them with its options, so both give the same bundles, defaults and errors.

Every error that is the caller's to fix is a :class:`defense.errors.UserError` whose one-line
message names the option as the command spells it (``--clean-data``): the keyword argument is the
same name in snake case (``clean_data``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from defense.errors import UserError
from defense.guard_bundle import Bundle


def build(model: nn.Module | str | Path, clean_data, *, out: str | Path | None = None,
          weights: str | Path | None = None, architecture: str | None = None, num_classes: int | None = None,
          class_names: list[str] | str | Path | None = None, labels: bool = True,
          calibration_data: str | Path | None = None, preset: str | None = None,
          input_size: tuple[int, int] | None = None, mean: tuple[float, float, float] | None = None,
          std: tuple[float, float, float] | None = None, auxiliary: str | None = None,
          auxiliary_model: nn.Module | str | Path | None = None, auxiliary_weights: str | Path | None = None,
          sign_key=None, overwrite: bool = False, device: str = "auto", progress: bool = True,
          log: Callable[[str], None] = print, **options) -> Bundle:
    """Build a guard bundle from a suspect model and reserved clean images (``badexpert build``).

    Args:
        model: the suspect model: an ``nn.Module`` (with ``architecture``), or a spec as the
            command takes it: an architecture name with ``weights``, ``'package.module:factory'``
            with ``weights``, a TorchScript file or a ``.pt2`` file.
        clean_data: reserved clean images: a folder with one sub-folder per class (or a flat folder
            with ``labels=False``), or a pair ``(images, labels)`` of a uint8 tensor (N, 3, H, W) or
            a list of PIL images, and their class indices (None: no labels).
        out: the folder to save the bundle to; None keeps it in memory (:meth:`Bundle.save` later).
        weights: the model's weights (.safetensors, or a state dict read with ``weights_only=True``).
        architecture: with an ``nn.Module``: its architecture as a spec (a registered name or
            ``'package.module:factory'``), from which the bundle rebuilds it.
        num_classes: the model's outputs (default: the number of classes of ``clean_data``).
        class_names: the class names in output order, or a file with one per line.
        labels: False when the clean images carry no labels (M's predictions stand in).
        calibration_data: a separate folder of clean images that sets the threshold alone.
        preset, input_size, mean, std: the preprocessing (``'cifar'``, ``'imagenet'`` or
            ``'none'``; default by architecture), stored in the bundle.
        auxiliary: ``'finetune'`` (default) or ``'bcu'``; or bring a repaired model as
            ``auxiliary_model`` (a spec or an ``nn.Module``) and/or ``auxiliary_weights``.
        sign_key: an Ed25519 private key, or its PEM file, to sign the saved bundle with.
        overwrite: replace ``out`` if it holds files.
        device: ``'auto'`` (CUDA when present), ``'cpu'`` or ``'cuda'``.
        progress: show progress bars. ``log``: where the build's progress lines go.
        **options: any field of :class:`defense.build.BuildConfig` (``fpr``, ``alpha``, ``seed``,
            ``unlearn_lr``, ``finetune_epochs``, ...); the defaults are the paper's.

    Returns:
        the :class:`Bundle`, saved to ``out`` when given.
    """
    from defense.build import build_guard
    from defense.build_inputs import (auxiliary_method, build_config, check_model_outputs, clean_image_set,
                                      load_supplied_auxiliary, resolve_model, resolve_num_classes,
                                      resolve_preprocessing, separate_calibration_paths)
    from defense.bundle_trust import load_signing_key
    from defense.device import resolve_device

    out = Path(out) if out is not None else None
    if out is not None and out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: the folder exists and is not empty; choose another or pass --overwrite")
    if isinstance(sign_key, (str, Path)):
        sign_key = load_signing_key(Path(sign_key))  # a bad key fails before training
    device = resolve_device(device)
    supplied = auxiliary_model is not None or auxiliary_weights is not None
    if isinstance(clean_data, tuple) and clean_data[1] is None:
        labels = False
    config = build_config(options, labels=labels, auxiliary=auxiliary_method(auxiliary, supplied), device=device,
                          progress=progress)
    model_text = architecture if isinstance(model, nn.Module) and architecture else str(model)
    preprocessing = resolve_preprocessing(model_text, preset, input_size, mean, std)
    clean = clean_image_set(clean_data, preprocessing, class_names, labels, progress)
    num_classes = resolve_num_classes(num_classes, clean)
    model, spec, model_text = resolve_model(model, num_classes, weights, architecture)
    check_model_outputs(model, preprocessing, num_classes, model_text)
    supplied_model, supplied_source = (
        load_supplied_auxiliary(auxiliary_model, auxiliary_weights, model_text, spec, preprocessing, num_classes)
        if supplied else (None, None))
    calibration_paths = separate_calibration_paths(calibration_data, clean)
    torch.manual_seed(config.seed)
    result = build_guard(model, clean, preprocessing, num_classes, config, log=log, auxiliary_model=supplied_model,
                         calibration_paths=calibration_paths)
    if supplied_source:
        result.manifest_fields["auxiliary_model"]["source"] = supplied_source
    bundle = Bundle(result.guard, spec, result.manifest_fields)
    return bundle.save(out, overwrite=overwrite, sign_key=sign_key) if out is not None else bundle


def load(path: str | Path, *, verify_key=None, device: str = "auto",
         allowed_factory_modules: tuple[str, ...] | list[str] = ()) -> Bundle:
    """Load a saved bundle, checking its manifest's digest and every weight file's sha256.

    Args:
        path: the bundle folder.
        verify_key: an Ed25519 public key, or its PEM file: refuse the bundle unless it is signed
            with the matching private key.
        device: ``'auto'`` (CUDA when present), ``'cpu'`` or ``'cuda'``.
        allowed_factory_modules: modules whose ``'module:factory'`` architecture, named in the
            bundle, may be imported and called (none by default).
    """
    from defense.bundle import load_bundle
    from defense.device import resolve_device

    guard, manifest = load_bundle(Path(path), resolve_device(device), verify_key=verify_key,
                                  allowed_factory_modules=allowed_factory_modules)
    return Bundle.from_saved(guard, manifest, Path(path))


def calibrate(bundle: Bundle | str | Path, clean_images: str | Path, *, out: str | Path,
              fpr: float | None = None, threshold_rule: str | None = None, threshold_delta: float | None = None,
              overwrite: bool = False, sign_key=None, verify_key=None,
              allowed_factory_modules: tuple[str, ...] | list[str] = (), device: str = "auto",
              progress: bool = True) -> Bundle:
    """Re-set a saved bundle's threshold from more clean images (``badexpert calibrate``): same
    models, a new threshold, written as a new bundle to ``out``; the original is left unchanged.

    Args:
        bundle: a saved :class:`Bundle` or its folder.
        clean_images: a folder of clean images unseen by the build (labels ignored; 2,000+ bring
            the realized false-positive rate close to the target).
        out: the new bundle's folder.
        fpr, threshold_rule, threshold_delta: the threshold's target false-positive rate, rule
            (``'conformal'`` or ``'ucb'``) and the ucb rule's delta; by default the bundle's own.
        overwrite, sign_key, verify_key, allowed_factory_modules, device, progress: as for
            :func:`build` and :func:`load`.

    Returns:
        the new, saved :class:`Bundle`.
    """
    from defense.calibrate import recalibrate
    from defense.device import resolve_device

    if isinstance(bundle, Bundle) and bundle.path is None:
        raise UserError("calibrate: the bundle is not saved; build it with out=... or call bundle.save(...) first")
    bundle_dir = bundle.path if isinstance(bundle, Bundle) else Path(bundle)
    fpr, threshold_rule, threshold_delta = bundle_threshold_settings(bundle_dir, fpr, threshold_rule, threshold_delta)
    device = resolve_device(device)
    recalibrate(bundle_dir, Path(clean_images), Path(out), fpr, threshold_rule, threshold_delta, device=device,
                progress=progress, overwrite=overwrite, verify_key=verify_key, sign_key=sign_key,
                allowed_factory_modules=allowed_factory_modules)
    return load(out, device=device, allowed_factory_modules=allowed_factory_modules)


def bundle_threshold_settings(bundle_dir: Path, fpr: float | None, rule: str | None,
                              delta: float | None) -> tuple[float, str, float]:
    """The target FPR, rule and delta given, the bundle's own in place of each one not given."""
    from defense.build import BuildConfig
    from defense.bundle import read_manifest

    if fpr is not None and rule is not None and delta is not None:
        return fpr, rule, delta
    manifest = read_manifest(bundle_dir)
    defaults = BuildConfig()
    return (fpr if fpr is not None else manifest.target_fpr,
            rule or manifest.threshold.get("rule") or defaults.threshold_rule,
            delta if delta is not None else manifest.threshold.get("delta") or defaults.threshold_delta)
