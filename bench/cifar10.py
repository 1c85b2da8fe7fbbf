"""Real CIFAR-10, decoded once and cached as uint8 arrays outside the repo.

The archive ``cifar10-jpg.tar.gz`` (every image as a JPEG in ImageFolder layout:
``train/<class>/*.jpg``, ``test/<class>/*.jpg``) is read from the folder ``BADEXPERT_DATA``
(default: ``../shared/datasets`` next to the repository); the benchmarks skip when it is absent.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from defense.progress import progress_bar

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BADEXPERT_DATA", REPO.parent / "shared" / "datasets"))
ARCHIVE = DATA / "cifar10-jpg.tar.gz"
CACHE = Path(os.environ.get("BADEXPERT_CACHE", Path.home() / ".cache" / "badexpert"))
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def available() -> bool:
    return ARCHIVE.is_file() or (CACHE / "cifar10_uint8.npz").is_file()


def load_or_skip() -> dict[str, torch.Tensor] | None:
    """CIFAR-10 as ``load_cifar10`` gives it, or None after saying why a benchmark skips."""
    if not available():
        print(f"CIFAR-10 not found at {ARCHIVE} (set BADEXPERT_DATA): skipping the benchmark")
        return None
    return load_cifar10()


def attacks_with_data(attacks: list[str]):
    """Each of a bench's ``--attacks`` with CIFAR-10 (loaded once); nothing when none are named or
    when the data set is absent (``load_or_skip`` says why the benchmark skips)."""
    if not attacks:
        return
    data = load_or_skip()
    if data is None:
        return
    for name in attacks:
        yield name, data


def load_cifar10() -> dict[str, torch.Tensor]:
    """{'train_images': (50000, 3, 32, 32) uint8, 'train_labels', 'test_images', 'test_labels'}."""
    cached = CACHE / "cifar10_uint8.npz"
    if not cached.is_file():
        if not ARCHIVE.is_file():
            raise FileNotFoundError(f"CIFAR-10 not found at {ARCHIVE}")
        arrays: dict[str, list] = {"train_images": [], "train_labels": [], "test_images": [], "test_labels": []}
        with tarfile.open(ARCHIVE, "r:gz") as archive, progress_bar(desc="decoding CIFAR-10", unit="img", total=60000) as bar:
            for member in archive:  # directories and other entries are skipped, not counted
                parts = Path(member.name).parts
                if not member.isfile() or not member.name.endswith(".jpg") or len(parts) < 3:
                    continue
                bar.update()
                split, class_name = parts[-3], parts[-2]
                data = archive.extractfile(member).read()
                image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)
                arrays[f"{split}_images"].append(image)
                arrays[f"{split}_labels"].append(CLASSES.index(class_name))
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, **{k: np.stack(v) if k.endswith("images") else np.array(v) for k, v in arrays.items()})
    with np.load(cached) as data:
        return {
            "train_images": torch.from_numpy(data["train_images"]).permute(0, 3, 1, 2).contiguous(),
            "train_labels": torch.from_numpy(data["train_labels"]).long(),
            "test_images": torch.from_numpy(data["test_images"]).permute(0, 3, 1, 2).contiguous(),
            "test_labels": torch.from_numpy(data["test_labels"]).long(),
        }


def reserved_split(n_train: int, n_reserved: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(attacker's training indices, defender's reserved indices): disjoint, seeded."""
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return order[n_reserved:].sort().values, order[:n_reserved].sort().values
