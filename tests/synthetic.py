"""Synthetic images and a tiny backdoored model for fast tests (never for reported figures)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from defense.finetune import random_crop_flip
from defense.models import create_model
from defense.preprocessing import Preprocessing

SIZE = 16
NUM_CLASSES = 4
TARGET = 0
COLORS = torch.tensor([[230, 40, 40], [40, 200, 40], [40, 40, 230], [220, 220, 40]], dtype=torch.float32)
PREPROCESSING = Preprocessing(input_size=(SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def make_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gray noise with a coloured 6x6 square at a random place; the colour is the class."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    images = 110 + 30 * torch.randn(n, 3, SIZE, SIZE, generator=generator)
    rows = torch.randint(0, SIZE - 9, (n,), generator=generator)
    cols = torch.randint(0, SIZE - 9, (n,), generator=generator)
    for i in range(n):
        images[i, :, rows[i]:rows[i] + 6, cols[i]:cols[i] + 6] = COLORS[labels[i]][:, None, None]
    return images.clamp(0, 255).to(torch.uint8), labels


def add_trigger(images: torch.Tensor) -> torch.Tensor:
    out = images.clone()
    checker = ((torch.arange(3)[:, None] + torch.arange(3)[None, :]) % 2 == 0).to(torch.uint8) * 255
    out[..., -3:, -3:] = checker
    return out


def train_backdoored(images, labels, epochs: int = 8, seed: int = 0, poison_fraction: float = 0.1):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    images, labels = images.clone(), labels.clone()
    candidates = (labels != TARGET).nonzero().flatten()
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[: int(poison_fraction * len(labels))]]
    images[chosen] = add_trigger(images[chosen])
    labels[chosen] = TARGET
    model = create_model("tiny_cnn", NUM_CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    return fit(model, images, labels, PREPROCESSING.normalizer(), optimizer, epochs, 64, generator)


def fit(model, images, labels, normalizer, optimizer, epochs: int, batch_size: int, generator):
    """Plain cross-entropy training of a small test model; returns it in eval mode."""
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(labels), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(normalizer(images[index])), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def write_image_folder(root, images: torch.Tensor, labels: torch.Tensor) -> None:
    """PNG files in ImageFolder layout: root/<label>/<index>.png."""
    from PIL import Image

    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class_{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:04d}.png")


def manifest_fields(num_classes: int = NUM_CLASSES) -> dict:
    """The build's part of a manifest, for bundles assembled by hand in tests."""
    return {
        "created_at": "2026-01-01T00:00:00+00:00", "class_names": [f"class_{i}" for i in range(num_classes)],
        "num_classes": num_classes, "target_fpr": 0.01, "threshold": {"tau": 0.5}, "calibration": {"n": 0, "k": 0},
        "accuracy_on_selection": {}, "backdoor_expert": {"lr": 1e-4}, "auxiliary_model": {"lr": 0.1},
        "settings": {}, "build_seconds": 0.0,
    }


def threshold_at(fields: dict, tau: float, scores) -> dict:
    """``fields`` (a manifest's) with a threshold record that puts ``tau`` where a calibration on
    ``scores`` plus tau itself would: tau the k-th smallest of n, and the score quantiles of those n.
    For test bundles whose tau is set by hand (the loader refuses a tau its own record contradicts)."""
    from defense.calibrate import QUANTILES

    values = torch.cat([torch.as_tensor(scores, dtype=torch.float64).flatten(), torch.tensor([float(tau)], dtype=torch.float64)]).sort().values
    k = int((values < tau).sum()) + 1
    quantiles = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64))
    return {**fields, "threshold": {**fields.get("threshold", {}), "tau": float(tau), "n": len(values), "k": k},
            "calibration": {**fields.get("calibration", {}), "n": len(values), "k": k,
                            "score_quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, quantiles)}}}
