"""The offline job from what a user hands over (:meth:`defense.Bundle.build`, and through it the
``badexpert build`` command): the inputs made ready and checked (:mod:`defense.build_inputs`), then
:func:`defense.build.build_guard`. Saving is the bundle's own job (:meth:`defense.Bundle.save`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from defense.build import BuildResult, build_guard
from defense.build_inputs import (auxiliary_method, build_config, check_model_outputs, clean_image_set,
                                  load_supplied_auxiliary, resolve_model, resolve_num_classes, resolve_preprocessing,
                                  separate_calibration_paths)
from defense.device import resolve_device
from defense.models.loading import ModelSpec


def run_build_job(model: nn.Module | str | Path, clean_data, *, weights: str | Path | None = None,
                  architecture: str | None = None, num_classes: int | None = None,
                  class_names: list[str] | str | Path | None = None, labels: bool = True,
                  calibration_data: str | Path | None = None, preset: str | None = None,
                  input_size: tuple[int, int] | None = None, mean: tuple[float, float, float] | None = None,
                  std: tuple[float, float, float] | None = None, auxiliary: str | None = None,
                  auxiliary_model: nn.Module | str | Path | None = None, auxiliary_weights: str | Path | None = None,
                  device: str = "auto", progress: bool = True, log: Callable[[str], None] = print,
                  **settings) -> tuple[BuildResult, ModelSpec]:
    """The guard built in memory, and the spec that rebuilds its architecture. The keywords are
    :meth:`defense.Bundle.build`'s (documented there); ``settings`` are BuildConfig fields."""
    device = resolve_device(device)
    supplied = auxiliary_model is not None or auxiliary_weights is not None
    if isinstance(clean_data, tuple) and clean_data[1] is None:
        labels = False
    config = build_config(settings, labels=labels, auxiliary=auxiliary_method(auxiliary, supplied), device=device,
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
    return result, spec
