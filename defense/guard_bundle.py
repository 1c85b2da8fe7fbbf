"""The guard from Python: a :class:`Bundle` is built (:meth:`Bundle.build`), loaded
(:meth:`Bundle.load`), recalibrated (:meth:`Bundle.calibrate`), measured (:meth:`Bundle.evaluate`),
saved, and scores or decides on images. The ``badexpert`` command calls the same methods, so both give the same bundles, defaults
and errors.

Every error that is the caller's to fix is a :class:`defense.errors.UserError` whose one-line
message names the option as the command spells it (``--clean-data``): the keyword argument is the
same name in snake case (``clean_data``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from defense.errors import UserError
from defense.guard import Guard
from defense.image_inputs import ImagesLike, image_batch
from defense.manifest import Manifest
from defense.models.loading import ModelSpec
from defense.score import GuardScores

if TYPE_CHECKING:
    from defense.evaluate_job import Report


@dataclass
class Decisions:
    """The guard's decision on each image: M's label, the score, and whether it is rejected
    (score below the threshold: a likely backdoor input). Tensors of shape (N,)."""

    label: torch.Tensor
    class_name: list[str]
    score: torch.Tensor
    rejected: torch.Tensor

    @property
    def accepted(self) -> torch.Tensor:
        """The images whose label can be used: not rejected."""
        return ~self.rejected


@dataclass
class Bundle:
    """A guard bundle: the suspect model M, the backdoor expert B, the auxiliary model M' and the
    rejection threshold, with the manifest fields that describe them.

    ``manifest`` and ``path`` are set once the bundle is saved (``Bundle.build(..., out=...)``,
    :meth:`save`) or when it was loaded; a bundle built without ``out`` lives in memory only.
    """

    guard: Guard
    spec: ModelSpec
    fields: dict
    manifest: Manifest | None = None
    path: Path | None = None

    @classmethod
    def build(cls, model: nn.Module | str | Path, clean_data, *, out: str | Path | None = None,
              overwrite: bool = False, sign_key=None, **options) -> "Bundle":
        """Build a guard from a suspect model and reserved clean images (``badexpert build``).

        Args:
            model: the suspect model: an ``nn.Module`` (with ``architecture``), or a spec as the
                command takes it: an architecture name or ``'package.module:factory'`` (with
                ``weights``), a TorchScript file or a ``.pt2`` file.
            clean_data: reserved clean images: a folder with one sub-folder per class (or a flat
                folder with ``labels=False``), or a pair ``(images, labels)``: a uint8 tensor
                (N, 3, H, W) or a list of PIL images, and their class indices (None: no labels).
            out: the folder to save the bundle to; None keeps it in memory (:meth:`save` later).
            overwrite: replace ``out`` if it holds files.
            sign_key: an Ed25519 private key, or its PEM file, to sign the saved bundle with.
            **options: ``weights`` (.safetensors, or a state dict read with ``weights_only=True``);
                ``architecture`` (with an ``nn.Module``: a registered name or
                ``'package.module:factory'`` that rebuilds it); ``num_classes`` (default: the
                clean images' classes); ``class_names`` (a list in output order, or a file with one
                per line); ``labels=False`` (the clean images carry none: M's predictions stand in);
                ``calibration_data`` (a separate folder of clean images that sets the threshold
                alone); ``preset`` (``'cifar'``, ``'imagenet'``, ``'none'``), ``input_size``,
                ``mean``, ``std`` (the preprocessing stored in the bundle); ``auxiliary``
                (``'finetune'``, the default, or ``'bcu'``), or a repaired model as
                ``auxiliary_model`` (a spec or an ``nn.Module``) and/or ``auxiliary_weights``;
                ``device`` (``'auto'``, ``'cpu'``, ``'cuda'``); ``progress`` (bars); ``log`` (where
                progress lines go, default ``print``); and any field of
                :class:`defense.build.BuildConfig` (``fpr``, ``alpha``, ``seed``, ``unlearn_lr``,
                ``finetune_epochs``, ...), whose defaults are the paper's.

        Returns:
            the bundle, saved to ``out`` when given.
        """
        from defense.build_inputs import check_out_folder
        from defense.build_job import run_build_job
        from defense.bundle_trust import load_signing_key

        out = Path(out) if out is not None else None
        check_out_folder(out, overwrite)
        if isinstance(sign_key, (str, Path)):
            sign_key = load_signing_key(Path(sign_key))  # a bad key fails before training
        result, spec = run_build_job(model, clean_data, **options)
        bundle = cls(result.guard, spec, result.manifest_fields)
        return bundle.save(out, overwrite=overwrite, sign_key=sign_key) if out is not None else bundle

    @classmethod
    def load(cls, path: str | Path, *, verify_key=None, device: str = "auto",
             allowed_factory_modules: tuple[str, ...] | list[str] = ()) -> "Bundle":
        """Load a saved bundle, checking its manifest's digest and every weight file's sha256.

        Args:
            path: the bundle folder.
            verify_key: an Ed25519 public key, or its PEM file: refuse the bundle unless it is
                signed with the matching private key.
            device: ``'auto'`` (CUDA when present), ``'cpu'`` or ``'cuda'``.
            allowed_factory_modules: modules whose ``'module:factory'`` architecture, named in the
                bundle, may be imported and called (none by default).
        """
        from defense.bundle import load_bundle
        from defense.device import resolve_device

        guard, manifest = load_bundle(Path(path), resolve_device(device), verify_key=verify_key,
                                      allowed_factory_modules=allowed_factory_modules)
        return cls(guard, ModelSpec.from_dict(manifest.architecture), manifest.model_dump(), manifest, Path(path))

    def __repr__(self) -> str:  # short: the models and the manifest's fields would fill a notebook's cell
        return (f"Bundle(bundle_id={self.bundle_id!r}, path={str(self.path) if self.path else None!r}, "
                f"architecture={self.spec.name!r}, classes={len(self.class_names)}, threshold={self.threshold:.6g})")

    @property
    def bundle_id(self) -> str | None:
        """The saved bundle's id (the first 16 hex digits of its content digest); None if unsaved."""
        return self.manifest.bundle_id if self.manifest is not None else None

    @property
    def threshold(self) -> float:
        """tau: an image whose score is below it is rejected."""
        return self.guard.rejection_threshold

    @property
    def class_names(self) -> list[str]:
        """The model's classes, in output order."""
        return list(self.fields["class_names"])

    @property
    def warnings(self) -> list[str]:
        """What the build (or the last calibration) warned about."""
        return list(self.fields.get("warnings") or [])

    def save(self, out: str | Path, *, overwrite: bool = False, sign_key=None) -> "Bundle":
        """Write the bundle to the folder ``out`` (signed with ``sign_key``, an Ed25519 private key
        or its PEM file, when given); returns the saved bundle, with its manifest and id."""
        from defense.bundle import save_bundle

        manifest = save_bundle(Path(out), self.guard, self.spec, self.fields, overwrite=overwrite, sign_key=sign_key)
        return dataclasses.replace(self, fields=manifest.model_dump(), manifest=manifest, path=Path(out))

    def calibrate(self, clean_images: str | Path, *, out: str | Path, fpr: float | None = None,
                  threshold_rule: str | None = None, threshold_delta: float | None = None, overwrite: bool = False,
                  sign_key=None, verify_key=None, allowed_factory_modules: tuple[str, ...] | list[str] = (),
                  device: str = "auto", progress: bool = True) -> "Bundle":
        """Re-set the threshold of this saved bundle from more clean images (``badexpert
        calibrate``): the same models and a new threshold, written as a new bundle to ``out``; this
        one is left unchanged.

        Args:
            clean_images: a folder of clean images unseen by the build (labels ignored; 2,000+
                bring the realized false-positive rate close to the target).
            out: the new bundle's folder.
            fpr, threshold_rule, threshold_delta: the target false-positive rate, the rule
                (``'conformal'`` or ``'ucb'``) and the ucb rule's delta; by default this bundle's own.
            overwrite, sign_key: as for :meth:`build`; verify_key, allowed_factory_modules,
                device: as for :meth:`load` (the bundle is read again from its folder).
            progress: show a progress bar.

        Returns:
            the new, saved bundle.
        """
        from defense.calibrate import recalibrate
        from defense.device import resolve_device

        if self.path is None:
            raise UserError("calibrate: the bundle is not saved; build it with out=... or call bundle.save(...) first")
        fpr, threshold_rule, threshold_delta = _threshold_settings(self.fields, fpr, threshold_rule, threshold_delta)
        device = resolve_device(device)
        recalibrate(self.path, Path(clean_images), Path(out), fpr, threshold_rule, threshold_delta, device=device,
                    progress=progress, overwrite=overwrite, verify_key=verify_key, sign_key=sign_key,
                    allowed_factory_modules=allowed_factory_modules)
        return Bundle.load(out, device=device, allowed_factory_modules=allowed_factory_modules)

    def evaluate(self, clean, triggered, *, target_class: int | str | None = None, bootstrap: int = 1000,
                 report_dir: str | Path | None = None, progress: bool = True, log=print) -> "Report":
        """Measure the guard on clean and triggered images (``badexpert evaluate``): AUROC, TPR and
        FPR at the threshold, clean accuracy and attack success with and without the guard.

        Args:
            clean: clean test images with labels: a folder with one sub-folder per class, named as
                the bundle's classes, or an ``(images, labels)`` pair (images as for :meth:`score`).
            triggered: triggered test images: a folder (one sub-folder per source class, or flat),
                or an ``(images, source_classes)`` pair (None: sources unknown).
            target_class: the backdoor's target, as an index or a class name (default: M's most
                common prediction on the triggered images).
            bootstrap: resamples for the 95% intervals (0: none).
            report_dir: a folder for ``report.json``, ``report.md`` and the plots (None: no files).
            progress: show progress bars. log: where the inferred target is announced.

        Returns:
            the :class:`~defense.evaluate_job.Report`.
        """
        from defense.evaluate_job import evaluate_guard

        described = {"path": self.path, "bundle_id": self.bundle_id, "class_names": self.class_names,
                     "architecture": self.fields.get("architecture", {}).get("name", self.spec.name),
                     "target_fpr": self.fields["target_fpr"], "threshold": self.fields["threshold"],
                     "self_test": self.fields.get("self_test")}
        return evaluate_guard(self.guard, described, clean, triggered, target_class=target_class,
                              bootstrap=bootstrap, report_dir=report_dir, progress=progress, log=log)

    def score(self, images: ImagesLike, batch_size: int = 256) -> GuardScores:
        """The guard's numbers for each image: M's label and confidence, the expert's and the
        auxiliary's agreement with M, and the score (low: backdoor-like).

        ``images``: a uint8 tensor (N, 3, H, W) at the input size, a PIL image, an image file, a
        folder of images, or a list of PIL images or files (decoded and resized like the server does).
        """
        return self.guard.score(image_batch(images, self.guard.preprocessing), batch_size)

    def decide(self, images: ImagesLike, batch_size: int = 256) -> Decisions:
        """Accept or reject each image (``images`` as for :meth:`score`): rejected when its score is
        below the threshold, or not finite."""
        scores = self.score(images, batch_size)
        names = self.class_names
        return Decisions(label=scores.label, class_name=[names[int(label)] for label in scores.label],
                         score=scores.score, rejected=self.guard.rejects(scores.score))


def _threshold_settings(fields: dict, fpr: float | None, rule: str | None,
                        delta: float | None) -> tuple[float, str, float]:
    """The target FPR, rule and delta given, the bundle's own (its manifest ``fields``) in place of
    each one not given."""
    from defense.build import BuildConfig

    defaults, threshold = BuildConfig(), fields.get("threshold") or {}
    return (fpr if fpr is not None else fields["target_fpr"],
            rule or threshold.get("rule") or defaults.threshold_rule,
            delta if delta is not None else threshold.get("delta") or defaults.threshold_delta)
