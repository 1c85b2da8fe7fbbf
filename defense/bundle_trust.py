"""Trusting a bundle: the manifest's content digest, Ed25519 signing and verification, the checks of
the values a guard depends on, and which architectures may be instantiated. See
:mod:`defense.bundle` for the integrity guarantees end to end."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

from defense.errors import BundleIntegrityError, UserError
from defense.manifest import (ARCHITECTURE_KINDS, MANIFEST, ROLES, SIGNATURE_CONTEXT, UNSIGNED_FIELDS,
                              BundleSignature, Manifest)
from defense.models.loading import ModelSpec
from defense.models.registry import is_known_architecture

_FACTORY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


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


def tau_outside_calibration(manifest: Manifest) -> str | None:
    """Why the threshold cannot be the k-th smallest of the bundle's own calibration scores (as its
    threshold record says it is), judged by the score quantiles the calibration record stores; None
    when it can be, or when the record holds no quantiles to compare with (hand-assembled bundles)."""
    quantiles = (manifest.calibration or {}).get("score_quantiles")
    n, k = (manifest.threshold or {}).get("n"), (manifest.threshold or {}).get("k")
    if not isinstance(quantiles, dict) or not quantiles or not all(isinstance(v, int) and v > 0 for v in (n, k)):
        return None
    try:
        points = sorted((float(level), float(value)) for level, value in quantiles.items())
    except (TypeError, ValueError):
        return "its calibration record's score quantiles are not numbers"
    tau = manifest.rejection_threshold
    rank = (k - 1) / (n - 1) if n > 1 else 0.0  # where the k-th smallest of n sits (linear quantiles)
    below = [(level, value) for level, value in points if level <= rank + 1e-12]
    above = [(level, value) for level, value in points if level >= rank - 1e-12]
    low = below[-1] if below else (0.0, 0.0)  # scores are never negative
    high = above[0] if above else None
    slack = 1e-9 * max(1.0, abs(tau))
    if tau < low[1] - slack or (high is not None and tau > high[1] + slack):
        bounds = (f"between {low[1]:.6g} and {high[1]:.6g} (its stored {low[0]:g} and {high[0]:g} score quantiles)"
                  if high else f"at least {low[1]:.6g} (its stored {low[0]:g} score quantile)")
        return (f"its threshold {tau:.6g} lies outside its own calibration scores: as the k-th smallest of n "
                f"calibration scores (k={k}, n={n}: its threshold record) it must be {bounds}")
    return None


def check_tau_within_calibration(where: str, manifest: Manifest, signed: bool) -> None:
    """Refuse an unsigned bundle whose threshold its own calibration record contradicts (a tau edited and
    the digest recomputed); a bundle whose signature was verified is trusted as its signer made it."""
    reason = tau_outside_calibration(manifest)
    if reason is not None and not signed:
        raise BundleIntegrityError(f"{where}: {reason}; an unsigned bundle is refused for it (rebuild or "
                                   "recalibrate it, or sign it with --sign-key and load it with --verify-key)")
