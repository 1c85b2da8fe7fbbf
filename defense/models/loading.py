"""Turn what the user hands over (an architecture spec and a weights file) into a model.

Four kinds of spec, all finetunable:

- an architecture name: this package's registry or any ``torchvision.models`` builder;
- ``package.module:callable``: a factory on the user's ``PYTHONPATH`` returning an ``nn.Module``;
- a path to a TorchScript archive (weights included);
- a path to a ``.pt2`` file saved by ``torch.export.save`` (weights included; :mod:`defense.models.exported`).

User files are never unpickled without restriction: weights load from safetensors, or from a
PyTorch file with ``torch.load(weights_only=True)`` mapped to the CPU.
"""

from __future__ import annotations

import importlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from safetensors.torch import load_file as load_safetensors

from defense.errors import UserError
from defense.models.exported import is_exported_archive, load_exported
from defense.models.registry import create_model, is_known_architecture

SpecKind = Literal["registry", "factory", "torchscript", "exported"]
ARCHIVE_KINDS = ("torchscript", "exported")  # the file is the architecture, with its weights


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild the architecture: stored in the bundle manifest as a plain dict."""

    kind: SpecKind
    name: str  # architecture name, "module:callable", or the TorchScript / .pt2 file name
    num_classes: int | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "num_classes": self.num_classes}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        return cls(kind=data["kind"], name=data["name"], num_classes=data.get("num_classes"))


def parse_model_spec(spec: str, num_classes: int | None) -> ModelSpec:
    """Classify ``--model`` as a TorchScript file, a torch.export file, a factory, or an architecture name."""
    path = Path(spec)
    if path.is_file():
        if path.suffix == ".pt2":
            if not is_exported_archive(path):
                raise UserError(f"--model {spec}: the file is not a torch.export archive (torch.export.save)")
            return ModelSpec("exported", str(path), num_classes)
        if not _is_torchscript_archive(path):
            raise UserError(
                f"--model {spec}: the file is not a TorchScript archive; pass an architecture "
                "name or 'package.module:factory' as --model and the file as --weights"
            )
        return ModelSpec("torchscript", str(path), num_classes)
    if ":" in spec:
        return ModelSpec("factory", spec, num_classes)
    if spec.endswith((".pt", ".pt2", ".pth", ".ts", ".zip", ".safetensors")) or "/" in spec:
        raise UserError(f"--model {spec}: no such file")
    if not is_known_architecture(spec):
        create_model(spec, 1)  # raises the UserError listing the choices
    if num_classes is None:
        raise UserError(f"--num-classes is needed with --model {spec} (or leave it to the data)")
    return ModelSpec("registry", spec, num_classes)


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def instantiate(spec: ModelSpec, torchscript_bytes: bytes | None = None) -> nn.Module:
    """Build a fresh (untrained, or archive-loaded) model from a spec. ``torchscript_bytes``: the
    archive's bytes (TorchScript or .pt2) when already read."""
    if spec.kind == "registry":
        return create_model(spec.name, spec.num_classes)
    if spec.kind == "factory":
        return _call_factory(spec.name)
    if spec.kind == "torchscript":
        data = torchscript_bytes if torchscript_bytes is not None else Path(spec.name).read_bytes()
        try:
            return torch.jit.load(io.BytesIO(data), map_location="cpu")
        except Exception as error:  # torch raises RuntimeError with C++ context
            raise UserError(f"--model {spec.name}: cannot load the TorchScript archive ({_first_line(error)})")
    if spec.kind == "exported":
        data = torchscript_bytes if torchscript_bytes is not None else Path(spec.name).read_bytes()
        return load_exported(data, f"--model {spec.name}")
    raise ValueError(f"unknown model spec kind {spec.kind!r}")


def _call_factory(target: str) -> nn.Module:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise UserError(f"--model {target}: expected 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"--model {target}: cannot import {module_name!r} ({error}); is it on PYTHONPATH?")
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UserError(f"--model {target}: {module_name} has no callable {attribute!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {target}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a PyTorch file, on the CPU, without unpickling code."""
    if not weights.is_file():
        raise UserError(f"--weights {weights}: no such file")
    if weights.suffix == ".safetensors":
        try:
            return load_safetensors(str(weights), device="cpu")
        except Exception as error:
            raise UserError(f"--weights {weights}: not a readable safetensors file ({_first_line(error)})")
    try:
        loaded = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(
            f"--weights {weights}: cannot be read as tensors with weights_only=True "
            f"({_first_line(error)}); save a state_dict (not a whole pickled model) or use safetensors"
        )
    for wrapper in ("state_dict", "model_state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise UserError(f"--weights {weights}: expected a state dict (names to tensors)")
    prefix = "module."  # saved from DataParallel / DistributedDataParallel
    if loaded and all(key.startswith(prefix) for key in loaded):
        loaded = {key[len(prefix):]: value for key, value in loaded.items()}
    return loaded


def load_weights(model: nn.Module, weights: Path) -> None:
    """Load ``weights`` into ``model`` strictly; a mismatch is the user's to fix."""
    state = read_state_dict(weights)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong_shape:
            key = wrong_shape[0]
            details.append(f"shape of {key} is {tuple(state[key].shape)}, model has {tuple(expected[key].shape)}")
        raise UserError(
            f"--weights {weights}: does not fit the architecture: {'; '.join(details)}; "
            "check --model and --num-classes"
        )
    model.load_state_dict(state, strict=True)


def load_user_model(spec: ModelSpec, weights: Path | None) -> nn.Module:
    """The suspect model M, ready to finetune copies of."""
    model = instantiate(spec)
    if weights is not None:
        load_weights(model, weights)
    elif spec.kind not in ARCHIVE_KINDS:
        raise UserError(f"--weights is required with --model {spec.name} (only TorchScript and .pt2 archives "
                        "carry weights)")
    return model.float()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
