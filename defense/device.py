"""Which torch device to run on: ``auto``, ``cpu`` or ``cuda``, for the offline job and the server alike."""

from __future__ import annotations

from defense.errors import UserError


def resolve_device(name: str) -> str:
    """``auto`` is CUDA when present, else the CPU; ``cuda`` without a CUDA device is the user's error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: expected auto, cpu or cuda")
    return name
