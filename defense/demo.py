"""The built-in example of ``badexpert demo`` (the command is :mod:`badexpert.demo`): real images, an
attacker that backdoors a small CNN on them, and the trigger.

1. Real images: scikit-learn's handwritten digits (1,797 scans, 8x8), upscaled to 16x16 RGB.
2. The attacker: trains a small CNN on 900 of them, 10% carrying a 3x3 checkerboard patch
   relabeled to class 0 (BadNet).
3. The defender: holds 600 other clean digits, written as an ImageFolder, and runs the very same
   ``badexpert build`` the CLI runs.
4. The guard is measured on the 297 held-out digits, clean and triggered.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from defense.models import create_model

SIZE = 16
TARGET_CLASS = 0
PATCH = 3


def digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """(1797, 3, 32, 32) uint8 and labels, in a fixed shuffled order."""
    digits = load_digits()
    images = []
    for pixels in digits.images:
        small = Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
        images.append(np.asarray(small.resize((SIZE, SIZE), Image.Resampling.BILINEAR).convert("RGB")))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return tensor[order], torch.from_numpy(digits.target).long()[order]


def add_trigger(images: torch.Tensor) -> torch.Tensor:
    out = images.clone()
    grid = torch.arange(PATCH)
    checker = ((grid[:, None] + grid[None, :]) % 2 == 0).to(torch.uint8) * 255
    out[..., -PATCH - 1:-1, -PATCH - 1:-1] = checker
    return out


def train_backdoored_model(images, labels, preprocessing, device, epochs=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    poisoned = torch.zeros(len(labels), dtype=torch.bool)
    candidates = (labels != TARGET_CLASS).nonzero().flatten()
    poisoned[candidates[torch.randperm(len(candidates), generator=generator)[: len(labels) // 10]]] = True
    images, labels = images.clone(), labels.clone()
    images[poisoned] = add_trigger(images[poisoned])
    labels[poisoned] = TARGET_CLASS
    model = create_model("tiny_cnn", num_classes=10).to(device)
    normalizer = preprocessing.normalizer().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 64):
            index = order[start:start + 64]
            batch = images[index].to(device)
            loss = F.cross_entropy(model(normalizer(batch)), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    return model.eval().cpu()


def write_image_folder(root: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:04d}.png")
