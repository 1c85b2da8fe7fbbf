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
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import platform
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import save_model
from safetensors.torch import load as load_safetensors_bytes

import defense
from defense.errors import BundleIntegrityError, UserError
from defense.guard import Guard
from defense.models.loading import ModelSpec, instantiate
from defense.models.registry import is_known_architecture
from defense.preprocessing import Preprocessing

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: content digest and signing; three-way split (accuracy_on_selection); float64 log-space scores
ROLES = ("model", "backdoor_expert", "auxiliary_model")
FILE_STEMS = {"model": "model", "backdoor_expert": "backdoor_expert", "auxiliary_model": "auxiliary"}
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
UNSIGNED_FIELDS = ("bundle_id", "content_sha256", "signature")  # not part of the content digest
SIGNATURE_CONTEXT = b"badexpert-bundle-v2\x00"  # signed message: this prefix + the 32-byte content digest
ARCHITECTURE_KINDS = ("registry", "factory", "torchscript")
_FACTORY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class WeightFile(BaseModel):
    path: str
    sha256: str


class BundleSignature(BaseModel):
    algorithm: Literal["ed25519"]
    public_key_sha256: str  # sha256 of the raw 32-byte public key: which key signed
    value: str  # base64 of the 64-byte signature of SIGNATURE_CONTEXT + content digest


class Manifest(BaseModel):
    """What a bundle says about itself. Unknown extra fields are kept (newer builds may add some);
    they are covered by the content digest like every other field."""

    model_config = ConfigDict(extra="allow")

    format_version: int
    bundle_id: str
    content_sha256: str
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
    signature: BundleSignature | None = None


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


# ----- the content digest and signatures ---------------------------------------------------------


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def canonical_content(document: dict) -> bytes:
    """The manifest fields the digest covers, as canonical JSON (sorted keys, no spaces, no NaN)."""
    content = {key: value for key, value in document.items() if key not in UNSIGNED_FIELDS}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def content_digest(document: dict) -> str:
    return hashlib.sha256(canonical_content(document)).hexdigest()


def _key_error(option: str, path: Path, what: str) -> UserError:
    return UserError(f"{option} {path}: not {what} (expected a PEM file, e.g. from "
                     "'openssl genpkey -algorithm ed25519'; see docs/serving.md)")


def load_signing_key(path: Path | str, option: str = "--sign-key"):
    """An Ed25519 private key from a PEM file (unencrypted PKCS#8, as openssl genpkey writes it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option} {path}: no such file")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise _key_error(option, path, "an unencrypted PEM private key")
    if not isinstance(key, Ed25519PrivateKey):
        raise _key_error(option, path, "an Ed25519 private key")
    return key


def load_verify_key(path: Path | str, option: str = "--verify-key"):
    """An Ed25519 public key from a PEM file ('openssl pkey -pubout' writes one)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option} {path}: no such file")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError):
        raise _key_error(option, path, "a PEM public key")
    if not isinstance(key, Ed25519PublicKey):
        raise _key_error(option, path, "an Ed25519 public key")
    return key


def _raw_public_key(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign_digest(digest_hex: str, private_key) -> BundleSignature:
    signature = private_key.sign(SIGNATURE_CONTEXT + bytes.fromhex(digest_hex))
    return BundleSignature(algorithm="ed25519",
                           public_key_sha256=hashlib.sha256(_raw_public_key(private_key.public_key())).hexdigest(),
                           value=base64.b64encode(signature).decode())


def verify_signature(bundle_dir: Path, manifest: Manifest, public_key) -> None:
    from cryptography.exceptions import InvalidSignature

    if manifest.signature is None:
        raise BundleIntegrityError(f"bundle {bundle_dir}: the bundle is not signed, and a verify key is set; "
                                   "sign it with 'badexpert build --sign-key' or unset the verify key")
    try:
        signature = base64.b64decode(manifest.signature.value, validate=True)
        public_key.verify(signature, SIGNATURE_CONTEXT + bytes.fromhex(manifest.content_sha256))
    except (InvalidSignature, ValueError):
        raise BundleIntegrityError(f"bundle {bundle_dir}: the signature in {MANIFEST} does not verify with the "
                                   "verify key; the bundle was altered after signing or signed with another key")


# ----- validation ----------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_fields(where: str, document: dict) -> None:
    """The values a guard depends on, checked before anything is built from them."""
    def bad(message: str) -> BundleIntegrityError:
        return BundleIntegrityError(f"{where}: {message}")

    if not _finite(document.get("rejection_threshold")):
        raise bad(f"rejection_threshold {document.get('rejection_threshold')!r} is not a finite number")
    alpha = document.get("alpha")
    if not _finite(alpha) or not 0.0 < alpha <= 1.0:
        raise bad(f"alpha {alpha!r} is not in (0, 1]")
    target_fpr = document.get("target_fpr")
    if not _finite(target_fpr) or not 0.0 < target_fpr < 1.0:
        raise bad(f"target_fpr {target_fpr!r} is not in (0, 1)")
    names, count = document.get("class_names"), document.get("num_classes")
    if not isinstance(count, int) or isinstance(count, bool) or not 2 <= count <= 100_000:
        raise bad(f"num_classes {count!r} is not an integer from 2 to 100000")
    if not isinstance(names, list) or len(names) != count or not all(isinstance(n, str) and 0 < len(n) <= 256 for n in names):
        raise bad(f"class_names must be {count} non-empty strings (of at most 256 characters), one per class")
    preprocessing = document.get("preprocessing")
    if not isinstance(preprocessing, dict) or set(preprocessing) != {"input_size", "mean", "std"}:
        raise bad("preprocessing must have exactly input_size, mean and std")
    size, mean, std = preprocessing["input_size"], preprocessing["mean"], preprocessing["std"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and 1 <= s <= 4096 for s in size)):
        raise bad(f"preprocessing input_size {size!r} is not [height, width] from 1 to 4096")
    if not (isinstance(mean, list) and len(mean) == 3 and all(_finite(m) for m in mean)):
        raise bad(f"preprocessing mean {mean!r} is not three finite numbers")
    if not (isinstance(std, list) and len(std) == 3 and all(_finite(s) and s > 0 for s in std)):
        raise bad(f"preprocessing std {std!r} is not three positive numbers")
    architecture = document.get("architecture")
    if not isinstance(architecture, dict) or architecture.get("kind") not in ARCHITECTURE_KINDS:
        raise bad(f"architecture kind must be one of {', '.join(ARCHITECTURE_KINDS)}")
    if not isinstance(architecture.get("name"), str):
        raise bad("architecture name is missing")
    if architecture.get("num_classes") not in (None, count):
        raise bad(f"architecture num_classes {architecture.get('num_classes')!r} differs from num_classes {count}")
    files = document.get("files")
    if not isinstance(files, dict) or set(files) != set(ROLES):
        raise bad(f"files must list exactly {', '.join(ROLES)}")
    paths = []
    for role in ROLES:
        entry = files[role]
        path = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(path, str) or Path(path).name != path or path in ("", ".", "..", MANIFEST):
            raise bad(f"{role} file name {path!r} is not a plain file name")
        if not isinstance(entry.get("sha256"), str) or not _HEX64.fullmatch(entry["sha256"]):
            raise bad(f"{role} file has no valid sha256")
        paths.append(path)
    if len(set(paths)) != len(paths):
        raise bad("two roles share one weight file")


def check_architecture_allowed(where: str, spec: ModelSpec, allowed_factory_modules: Iterable[str]) -> None:
    """A registry name must be known; a factory's module must be allowed by the caller, by name."""
    if spec.kind == "registry" and not is_known_architecture(spec.name):
        raise BundleIntegrityError(f"{where}: unknown architecture {spec.name!r}")
    if spec.kind == "factory":
        if not _FACTORY.fullmatch(spec.name):
            raise BundleIntegrityError(f"{where}: architecture {spec.name!r} is not 'package.module:factory'")
        module = spec.name.split(":", 1)[0]
        if module not in set(allowed_factory_modules):
            raise BundleIntegrityError(
                f"{where}: the architecture is the factory {spec.name!r}, which would import and call code named "
                f"by the bundle; allow its module explicitly (serve --allow-factory-modules {module}, "
                f"env BADEXPERT_ALLOW_FACTORY_MODULES; evaluate --allow-factory-modules {module})")


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


def _write_weights(module: nn.Module, path: Path, torchscript: bool) -> None:
    module = module.cpu().eval()
    if torchscript:
        torch.jit.save(module, str(path))
    else:
        save_model(module, str(path))


def save_bundle(out_dir: Path, guard: Guard, spec: ModelSpec, fields: dict[str, Any], overwrite: bool = False,
                *, sign_key=None) -> Manifest:
    """Write the bundle into a temporary sibling directory, then move it into place.

    The bundle id and ``content_sha256`` are computed here over the whole manifest (weight files'
    hashes included). ``sign_key``: an Ed25519 private key, or the path of its PEM file, to sign
    the bundle with."""
    out_dir = Path(out_dir)
    if sign_key is not None and isinstance(sign_key, (str, Path)):
        sign_key = load_signing_key(sign_key)
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
        fields = {key: value for key, value in fields.items() if key not in COMPUTED_FIELDS}
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
    """Check every weight file against its sha256 (load_bundle does this on the bytes it loads)."""
    for role in ROLES:
        _read_weight_file(bundle_dir, manifest, role)


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
    if spec.kind == "torchscript":
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
    spec = ModelSpec.from_dict(manifest.architecture)
    check_architecture_allowed(f"bundle {bundle_dir}", spec, allowed_factory_modules)
    modules = {}
    for role in ROLES:
        data = _read_weight_file(bundle_dir, manifest, role)
        modules[role] = _load_module(bundle_dir, spec, manifest.files[role], data)
        del data
    guard = Guard(
        preprocessing=Preprocessing.from_dict(manifest.preprocessing),
        rejection_threshold=manifest.rejection_threshold, alpha=manifest.alpha, device=torch.device(device),
        **modules,
    )
    return guard, manifest
