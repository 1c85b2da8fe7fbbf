"""A guard bundle in Python: the three models with their threshold (a :class:`~defense.guard.Guard`),
what the bundle says about itself, and the folder it was saved to. :func:`defense.build`,
:func:`defense.load` and :func:`defense.calibrate` return one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from defense.guard import Guard
from defense.image_inputs import ImagesLike, image_batch
from defense.manifest import Manifest
from defense.models.loading import ModelSpec
from defense.score import GuardScores


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

    ``manifest`` and ``path`` are set once the bundle is saved (``build(..., out=...)``,
    :meth:`save`) or when it was loaded; a bundle built without ``out`` lives in memory only.
    """

    guard: Guard
    spec: ModelSpec
    fields: dict
    manifest: Manifest | None = None
    path: Path | None = None

    @classmethod
    def from_saved(cls, guard: Guard, manifest: Manifest, path: Path) -> "Bundle":
        """The bundle read from ``path`` (as :func:`defense.bundle.load_bundle` returns it)."""
        return cls(guard, ModelSpec.from_dict(manifest.architecture), manifest.model_dump(), manifest, Path(path))

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
