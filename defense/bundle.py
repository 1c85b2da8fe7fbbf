"""A bundle is a directory: ``manifest.json`` and the three models' weights (safetensors, or
TorchScript archives when the user's model was one). Every weight file's sha256 is in the
manifest, and loading refuses a bundle whose files do not match.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_model, save_model

import defense
from defense.errors import BundleIntegrityError, UserError
from defense.guard import Guard
from defense.models.loading import ModelSpec, instantiate
from defense.preprocessing import Preprocessing

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: three-way split (accuracy_on_selection), float64 log-space scores
ROLES = ("model", "backdoor_expert", "auxiliary_model")
FILE_STEMS = {"model": "model", "backdoor_expert": "backdoor_expert", "auxiliary_model": "auxiliary"}


class WeightFile(BaseModel):
    path: str
    sha256: str


class Manifest(BaseModel):
    """What a bundle says about itself. Unknown extra fields are kept (newer builds may add some)."""

    model_config = ConfigDict(extra="allow")

    format_version: int
    bundle_id: str
    created_at: str
    architecture: dict
    class_names: list[str]
    num_classes: int
    preprocessing: dict
    alpha: float
    rejection_threshold: float
    target_fpr: float
    threshold: dict
    calibration: dict
    accuracy_on_selection: dict  # on D_select, the images that chose the learning rates
    backdoor_expert: dict
    auxiliary_model: dict
    settings: dict
    versions: dict
    build_seconds: float
    files: dict[str, WeightFile]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    import torchvision

    return {
        "badexpert": defense.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def _write_weights(module: nn.Module, path: Path, torchscript: bool) -> None:
    module = module.cpu().eval()
    if torchscript:
        torch.jit.save(module, str(path))
    else:
        save_model(module, str(path))


def save_bundle(out_dir: Path, guard: Guard, spec: ModelSpec, fields: dict[str, Any], overwrite: bool = False) -> Manifest:
    """Write the bundle into a temporary sibling directory, then move it into place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"--out {out_dir}: the folder exists and is not empty; choose another or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    torchscript = spec.kind == "torchscript"
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        files = {}
        for role in ROLES:
            name = FILE_STEMS[role] + (".pt" if torchscript else ".safetensors")
            _write_weights(getattr(guard, role), staging / name, torchscript)
            files[role] = WeightFile(path=name, sha256=sha256_of(staging / name))
        architecture = spec.to_dict()
        if torchscript:
            architecture["name"] = Path(spec.name).name
        manifest = Manifest(
            format_version=FORMAT_VERSION, bundle_id="", architecture=architecture,
            preprocessing=guard.preprocessing.to_dict(), alpha=guard.alpha,
            rejection_threshold=guard.rejection_threshold, versions=package_versions(), files=files, **fields,
        )
        # The id names this exact guard: the weights and everything else the manifest says (a
        # recalibrated bundle, with the same weights and a new threshold, gets a new id).
        manifest.bundle_id = hashlib.sha256(json.dumps(manifest.model_dump(), sort_keys=True).encode()).hexdigest()[:16]
        (staging / MANIFEST).write_text(json.dumps(manifest.model_dump(), indent=2) + "\n")
        for path in staging.iterdir():
            path.chmod(0o644)  # readable by a server running as another user (the container's)
            with open(path, "rb") as stream:
                os.fsync(stream.fileno())
        staging.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for module in (guard.model, guard.backdoor_expert, guard.auxiliary_model):
        module.to(guard.device)
    return manifest


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"bundle {bundle_dir}: no {MANIFEST}; is this a bundle folder written by 'badexpert build'?")
    try:
        manifest = Manifest.model_validate_json(path.read_text())
    except ValidationError as error:
        raise UserError(f"bundle {bundle_dir}: {MANIFEST} is invalid ({error.errors()[0]['loc']}: {error.errors()[0]['msg']})")
    if manifest.format_version != FORMAT_VERSION:
        raise UserError(f"bundle {bundle_dir}: format version {manifest.format_version}; this release reads {FORMAT_VERSION}: "
                        "rebuild it with 'badexpert build'")
    return manifest


def verify_bundle(bundle_dir: Path, manifest: Manifest) -> None:
    for role in ROLES:
        entry = manifest.files.get(role)
        if entry is None:
            raise BundleIntegrityError(f"bundle {bundle_dir}: the manifest lists no {role} file")
        path = Path(bundle_dir) / entry.path
        if Path(entry.path).name != entry.path:
            raise BundleIntegrityError(f"bundle {bundle_dir}: weight file name {entry.path!r} is not a plain file name")
        if not path.is_file():
            raise BundleIntegrityError(f"bundle {bundle_dir}: {entry.path} is missing")
        if sha256_of(path) != entry.sha256:
            raise BundleIntegrityError(
                f"bundle {bundle_dir}: {entry.path} does not match its sha256 in {MANIFEST}; "
                "the file was changed or corrupted: rebuild the bundle or restore the file"
            )


def _load_module(bundle_dir: Path, spec: ModelSpec, entry: WeightFile) -> nn.Module:
    path = Path(bundle_dir) / entry.path
    if spec.kind == "torchscript":
        return instantiate(spec, torchscript_bytes=path.read_bytes()).float().eval()
    module = instantiate(spec).float()
    load_model(module, str(path), strict=True, device="cpu")
    return module.eval()


def load_bundle(bundle_dir: Path | str, device: torch.device | str = "cpu") -> tuple[Guard, Manifest]:
    """Verify every hash, then rebuild the guard on ``device``."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise UserError(f"bundle {bundle_dir}: no such folder")
    manifest = read_manifest(bundle_dir)
    verify_bundle(bundle_dir, manifest)
    spec = ModelSpec.from_dict(manifest.architecture)
    modules = {role: _load_module(bundle_dir, spec, manifest.files[role]) for role in ROLES}
    guard = Guard(
        preprocessing=Preprocessing.from_dict(manifest.preprocessing),
        rejection_threshold=manifest.rejection_threshold, alpha=manifest.alpha, device=torch.device(device),
        **modules,
    )
    return guard, manifest
