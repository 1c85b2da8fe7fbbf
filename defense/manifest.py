"""What a bundle says about itself: the manifest's schema, its file names and format version, and
the file hash that the manifest records for each weight file. :mod:`defense.bundle` writes and reads
bundles; :mod:`defense.bundle_trust` checks them."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: content digest and signing; three-way split (accuracy_on_selection); float64 log-space scores
ROLES = ("model", "backdoor_expert", "auxiliary_model")
FILE_STEMS = {"model": "model", "backdoor_expert": "backdoor_expert", "auxiliary_model": "auxiliary"}
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
UNSIGNED_FIELDS = ("bundle_id", "content_sha256", "signature")  # not part of the content digest
SIGNATURE_CONTEXT = b"badexpert-bundle-v2\x00"  # signed message: this prefix + the 32-byte content digest
ARCHITECTURE_KINDS = ("registry", "factory", "torchscript", "exported")


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
