"""A bundle is a directory: ``manifest.json`` and the three models' weights (safetensors, or
TorchScript archives when the user's model was one).

Integrity, end to end:

- every weight file's sha256 is in the manifest, and the manifest's own content (every field but
  ``bundle_id``, ``content_sha256`` and ``signature``, as canonical JSON) has a sha256,
  ``content_sha256``; the bundle id is its first 16 hex digits. Loading recomputes both, so an
  edited manifest (a new threshold, alpha or architecture) or weight file is refused;
- each file is read once: the bytes that are hashed are the bytes that are loaded (no gap between
  the check and the use);
- optionally the content digest is signed with an Ed25519 key (``--sign-key``); a loader given a
  verify key refuses a bundle that is unsigned or whose signature does not verify;
- the manifest's values are validated (finite threshold, alpha in (0, 1], class names, known
  preprocessing, architecture kind), and an architecture that is a ``module:factory`` is imported
  only when the caller allows that module explicitly.

The manifest's schema is :mod:`defense.manifest`; digests, signatures and the checks of its values
are :mod:`defense.bundle_trust`. This module writes and reads bundles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn
from pydantic import ValidationError
from safetensors.torch import save_file, save_model
from safetensors.torch import load as load_safetensors_bytes

from defense.bundle_trust import (check_architecture_allowed, check_tau_within_calibration, content_digest,
                                  load_signing_key, load_verify_key, sign_digest, validate_fields, verify_signature)
from defense.errors import BundleIntegrityError, UserError
from defense.feature_signal import FeatureDetector
from defense.guard import Guard
from defense.manifest import (FILE_STEMS, FORMAT_VERSION, MANIFEST, MAX_MANIFEST_BYTES, ROLES, Manifest, WeightFile,
                              sha256_of)
from defense.models.exported import save_exported
from defense.models.loading import ModelSpec, instantiate
from defense.preprocessing import Preprocessing
from defense.version import __version__


def package_versions() -> dict[str, str]:
    import torchvision

    return {
        "badexpert": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


# ----- writing -------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """Non-finite floats in the build's records (a diverged learning-rate trial's loss) become the
    strings 'nan', 'inf', '-inf', so that the manifest is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


# Set by save_bundle itself: the same keys in ``fields`` (a loaded manifest's, re-saved) are ignored.
COMPUTED_FIELDS = frozenset({"format_version", "bundle_id", "content_sha256", "signature", "architecture",
                             "preprocessing", "alpha", "rejection_threshold", "versions", "files"})
VALIDATED_FIELDS = ("rejection_threshold", "alpha", "target_fpr")  # never rewritten: a NaN there is refused


WEIGHT_SUFFIX = {"torchscript": ".pt", "exported": ".pt2"}  # an archive per role; otherwise safetensors


def _write_weights(module: nn.Module, path: Path, kind: str, input_size: tuple[int, int]) -> None:
    module = module.cpu().eval()
    if kind == "torchscript":
        torch.jit.save(module, str(path))
    elif kind == "exported":
        save_exported(module, path, input_size)  # re-exported with the finetuned weights
    else:
        save_model(module, str(path))


FEATURE_FIELD = "feature_signal"  # the manifest's record of the feature signal, with its statistics file
FEATURE_FILE = "feature_statistics.safetensors"


def _write_feature_statistics(guard: Guard, staging: Path, record: dict) -> dict:
    """The feature detector's tensors as safetensors; its manifest record names the file, its
    sha256, the layers and the rule (all covered by the content digest, like the weights)."""
    detector = guard.feature_detector
    save_file(detector.tensors(), str(staging / FEATURE_FILE))
    record.update(signals=detector.signals, layers=list(detector.layers),
                  file={"path": FEATURE_FILE, "sha256": sha256_of(staging / FEATURE_FILE)})
    return record


def _load_feature_detector(bundle_dir: Path, manifest: Manifest) -> FeatureDetector | None:
    """The feature detector the manifest names, its file checked against the manifest's sha256."""
    record = (manifest.model_extra or {}).get(FEATURE_FIELD)
    if record is None:
        return None
    where = f"bundle {bundle_dir}: {FEATURE_FIELD}"
    try:
        entry = WeightFile.model_validate(record["file"])
        layers, signals = [str(layer) for layer in record["layers"]], str(record["signals"])
    except (KeyError, TypeError, ValidationError) as error:
        raise BundleIntegrityError(f"{where}: the record is incomplete ({error})")
    if Path(entry.path).name != entry.path or not (Path(bundle_dir) / entry.path).is_file():
        raise BundleIntegrityError(f"{where}: statistics file {entry.path!r} is missing or not a plain file name")
    data = (Path(bundle_dir) / entry.path).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise BundleIntegrityError(f"bundle {bundle_dir}: {entry.path} does not match its sha256 in {MANIFEST}; "
                                   "the feature statistics were changed or corrupted: rebuild the bundle or restore the file")
    try:
        detector = FeatureDetector.from_tensors(layers, signals, load_safetensors_bytes(data))
    except Exception as error:
        raise BundleIntegrityError(f"{where}: {str(error).splitlines()[0]}")
    if detector.num_classes != manifest.num_classes:
        raise BundleIntegrityError(f"{where}: statistics for {detector.num_classes} classes, the bundle has "
                                   f"{manifest.num_classes}")
    return detector


def save_bundle(out_dir: Path, guard: Guard, spec: ModelSpec, fields: dict[str, Any], overwrite: bool = False,
                *, sign_key=None) -> Manifest:
    """Write the bundle into a temporary sibling directory, then move it into place.

    The bundle id and ``content_sha256`` are computed here over the whole manifest (weight files'
    hashes included). ``sign_key``: an Ed25519 private key, or the path of its PEM file, to sign
    the bundle with."""
    out_dir = Path(out_dir)
    fields_in = fields
    if sign_key is not None and isinstance(sign_key, (str, Path)):
        sign_key = load_signing_key(sign_key)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"--out {out_dir}: the folder exists and is not empty; choose another or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        files = {}
        for role in ROLES:
            name = FILE_STEMS[role] + WEIGHT_SUFFIX.get(spec.kind, ".safetensors")
            _write_weights(getattr(guard, role), staging / name, spec.kind, guard.preprocessing.input_size)
            files[role] = WeightFile(path=name, sha256=sha256_of(staging / name))
        architecture = spec.to_dict()
        if spec.kind in WEIGHT_SUFFIX:
            architecture["name"] = Path(spec.name).name
        fields = {key: value for key, value in fields.items() if key not in COMPUTED_FIELDS}
        fields.pop(FEATURE_FIELD, None)
        if guard.feature_detector is not None:
            fields[FEATURE_FIELD] = _write_feature_statistics(guard, staging, dict(fields_in.get(FEATURE_FIELD) or {}))
        manifest = Manifest(
            format_version=FORMAT_VERSION, bundle_id="", content_sha256="", architecture=architecture,
            preprocessing=guard.preprocessing.to_dict(), alpha=guard.alpha,
            rejection_threshold=guard.rejection_threshold, versions=package_versions(), files=files, **fields,
        )
        dumped = manifest.model_dump(exclude={"signature"})
        document = {key: value if key in VALIDATED_FIELDS else _json_safe(value) for key, value in dumped.items()}
        document = json.loads(json.dumps(document))  # as a reader will see it
        validate_fields(f"bundle {out_dir}", document)
        try:
            digest = content_digest(document)
        except ValueError as error:  # a NaN or infinity somewhere in the fields
            raise UserError(f"bundle {out_dir}: the manifest has a non-finite number ({error})")
        document["content_sha256"], document["bundle_id"] = digest, digest[:16]
        if sign_key is not None:
            document["signature"] = sign_digest(digest, sign_key).model_dump()
        manifest = Manifest.model_validate(document)
        (staging / MANIFEST).write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
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


# ----- reading -------------------------------------------------------------------------------------


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _read_capped(path: Path, limit: int, what: str) -> bytes:
    with open(path, "rb") as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise BundleIntegrityError(f"{what}: over {limit} bytes")
    return data


def read_manifest(bundle_dir: Path) -> Manifest:
    """The manifest, parsed from one read of the file, with its content digest checked and its
    values validated. (Weight files and the signature are checked by :func:`load_bundle`.)"""
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"bundle {bundle_dir}: no {MANIFEST}; is this a bundle folder written by 'badexpert build'?")
    raw = _read_capped(path, MAX_MANIFEST_BYTES, f"bundle {bundle_dir}: {MANIFEST}")
    try:
        document = json.loads(raw, parse_constant=_refuse_constant)
    except ValueError as error:
        raise UserError(f"bundle {bundle_dir}: {MANIFEST} is not valid JSON ({error})")
    if not isinstance(document, dict):
        raise UserError(f"bundle {bundle_dir}: {MANIFEST} is not a JSON object")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"bundle {bundle_dir}: format version {version}; this release reads {FORMAT_VERSION} "
                        "(rebuild the bundle with this release)")
    try:
        manifest = Manifest.model_validate(document)
    except ValidationError as error:
        raise UserError(f"bundle {bundle_dir}: {MANIFEST} is invalid ({error.errors()[0]['loc']}: {error.errors()[0]['msg']})")
    digest = content_digest(document)
    if manifest.content_sha256 != digest or manifest.bundle_id != digest[:16]:
        raise BundleIntegrityError(
            f"bundle {bundle_dir}: {MANIFEST} does not match its digest (bundle id {manifest.bundle_id}); "
            "it was edited after the build: rebuild the bundle or restore the manifest")
    validate_fields(f"bundle {bundle_dir}", document)
    return manifest


def _read_weight_file(bundle_dir: Path, manifest: Manifest, role: str) -> bytes:
    """The file's bytes, read once and checked against the manifest's sha256."""
    entry = manifest.files.get(role)
    if entry is None:
        raise BundleIntegrityError(f"bundle {bundle_dir}: the manifest lists no {role} file")
    if Path(entry.path).name != entry.path:
        raise BundleIntegrityError(f"bundle {bundle_dir}: weight file name {entry.path!r} is not a plain file name")
    path = Path(bundle_dir) / entry.path
    if not path.is_file():
        raise BundleIntegrityError(f"bundle {bundle_dir}: {entry.path} is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise BundleIntegrityError(
            f"bundle {bundle_dir}: {entry.path} does not match its sha256 in {MANIFEST}; "
            "the file was changed or corrupted: rebuild the bundle or restore the file"
        )
    return data


def verify_bundle(bundle_dir: Path, manifest: Manifest) -> None:
    """Check every weight file (and the feature statistics) against its sha256 (load_bundle does
    this on the bytes it loads)."""
    for role in ROLES:
        _read_weight_file(bundle_dir, manifest, role)
    _load_feature_detector(bundle_dir, manifest)


def _load_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """safetensors' load_model on an in-memory state dict: tied weights are stored once."""
    from safetensors.torch import _remove_duplicate_names

    shared = _remove_duplicate_names(module.state_dict(), preferred_names=state.keys())
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = set(missing)
    for group in shared.values():
        for name in group:
            if name in missing:
                missing.remove(name)
            else:
                unexpected.append(name)
    if missing or unexpected:
        raise RuntimeError(f"{len(missing)} missing and {len(unexpected)} unexpected tensors "
                           f"(e.g. {next(iter(sorted(missing) or unexpected))})")


def _load_module(bundle_dir: Path, spec: ModelSpec, entry: WeightFile, data: bytes) -> nn.Module:
    where = f"bundle {bundle_dir}: {entry.path}"
    if spec.kind in WEIGHT_SUFFIX:  # an archive: TorchScript or torch.export
        try:
            return instantiate(spec, torchscript_bytes=data).float().eval()
        except UserError as error:
            raise BundleIntegrityError(f"{where}: {str(error).split(': ', 1)[-1]}")
    try:
        state = load_safetensors_bytes(data)
    except Exception as error:  # safetensors raises its own error types (e.g. "header too large")
        raise BundleIntegrityError(f"{where}: not a readable safetensors file ({str(error).splitlines()[0]})")
    module = instantiate(spec).float()
    try:
        _load_state(module, state)
    except RuntimeError as error:
        raise BundleIntegrityError(f"{where}: the weights do not fit the architecture ({str(error).splitlines()[0]})")
    return module.eval()


def load_bundle(bundle_dir: Path | str, device: torch.device | str = "cpu", *, verify_key=None,
                allowed_factory_modules: Iterable[str] = ()) -> tuple[Guard, Manifest]:
    """Verify the manifest's digest (and signature, with ``verify_key``: an Ed25519 public key or
    the path of its PEM file), validate its values, read each weight file once, check its sha256
    and load those same bytes; then rebuild the guard on ``device``.

    ``allowed_factory_modules``: modules whose ``module:factory`` architecture may be imported."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise UserError(f"bundle {bundle_dir}: no such folder")
    if verify_key is not None and isinstance(verify_key, (str, Path)):
        verify_key = load_verify_key(verify_key)
    manifest = read_manifest(bundle_dir)
    if verify_key is not None:
        verify_signature(bundle_dir, manifest, verify_key)
    check_tau_within_calibration(f"bundle {bundle_dir}", manifest, signed=verify_key is not None)
    spec = ModelSpec.from_dict(manifest.architecture)
    check_architecture_allowed(f"bundle {bundle_dir}", spec, allowed_factory_modules)
    modules = {}
    for role in ROLES:
        data = _read_weight_file(bundle_dir, manifest, role)
        modules[role] = _load_module(bundle_dir, spec, manifest.files[role], data)
        del data
    detector = _load_feature_detector(bundle_dir, manifest)
    guard = Guard(
        preprocessing=Preprocessing.from_dict(manifest.preprocessing),
        rejection_threshold=manifest.rejection_threshold, alpha=manifest.alpha, device=torch.device(device),
        **modules,
    )
    if detector is not None:
        try:
            guard.set_feature_detector(detector)
        except ValueError as error:  # a layer the architecture does not have
            raise BundleIntegrityError(f"bundle {bundle_dir}: {FEATURE_FIELD}: {error}")
    return guard, manifest
