"""``badexpert demo``: the whole product on a built-in example, with nothing from the user.

1. Real images: scikit-learn's handwritten digits (1,797 scans, 8x8), upscaled to 16x16 RGB.
2. The attacker: trains a small CNN on 900 of them, 10% carrying a 3x3 checkerboard patch
   relabeled to class 0 (BadNet).
3. The defender: holds 600 other clean digits, written as an ImageFolder, and runs the very same
   ``badexpert build`` the CLI runs.
4. The guard is measured on the 297 held-out digits, clean and triggered.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_model
from sklearn.datasets import load_digits

from defense.cli import build_parser
from defense.evaluation import detection_metrics
from defense.finetune import predict_logits, random_crop_flip
from defense.models import create_model
from defense.preprocessing import Preprocessing

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


def run_demo(out: Path, device: str = "cpu", quiet: bool = False) -> int:
    started = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preprocessing = Preprocessing(input_size=(SIZE, SIZE), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    images, labels = digit_images()
    train, reserved, test = slice(0, 900), slice(900, 1500), slice(1500, None)

    print("1/4 attacker: training a backdoored CNN on 900 handwritten digits (10% poisoned, target class 0)")
    model = train_backdoored_model(images[train], labels[train], preprocessing, device)
    weights = out / "suspect_model.safetensors"
    save_model(model, str(weights))

    print("2/4 defender: writing 600 reserved clean digits as an ImageFolder")
    clean_dir = out / "reserved_clean"
    if not clean_dir.exists():
        write_image_folder(clean_dir, images[reserved], labels[reserved])
    samples = out / "samples"
    samples.mkdir(exist_ok=True)
    test_images, test_labels = images[test], labels[test]
    Image.fromarray(test_images[1].permute(1, 2, 0).numpy()).save(samples / f"clean_digit_{int(test_labels[1])}.png")
    Image.fromarray(add_trigger(test_images[1:2])[0].permute(1, 2, 0).numpy()).save(samples / "triggered.png")

    print("3/4 defender: badexpert build (the same command a user runs)")
    bundle = out / "bundle"
    argv = ["build", "--model", "tiny_cnn", "--weights", str(weights), "--clean-data", str(clean_dir),
            "--out", str(bundle), "--overwrite", "--preset", "none", "--input-size", str(SIZE), str(SIZE), "--fpr", "0.05",
            "--calibration-fraction", "0.25", "--device", device] + (["--quiet"] if quiet else [])
    print("    badexpert " + " ".join(argv))
    args = build_parser().parse_args(argv)
    status = args.handler(args)
    if status:
        return status

    print("4/4 measuring the guard on 297 held-out digits, clean and triggered")
    from defense.bundle import load_bundle

    guard, manifest = load_bundle(bundle, device)
    clean = guard.score(test_images)
    triggered = guard.score(add_trigger(test_images))
    metrics = detection_metrics(guard.rejection_threshold, clean.score, clean.label, test_labels,
                                triggered.score, triggered.label, test_labels, TARGET_CLASS)
    (out / "demo_metrics.json").write_text(json.dumps(metrics.to_dict(), indent=2))
    print()
    print(f"guard on held-out digits (target FPR {manifest.target_fpr:g}, tau {guard.rejection_threshold:.4g}):")
    print(f"  AUROC                 {metrics.auroc:.4f}")
    print(f"  clean accuracy (CA)   {metrics.clean_accuracy_without_guard:.3f} without guard -> "
          f"{metrics.clean_accuracy_with_guard:.3f} with guard (FPR {metrics.fpr:.3f})")
    print(f"  attack success (ASR)  {metrics.asr_without_guard:.3f} without guard -> {metrics.asr_with_guard:.3f} with guard")
    print(f"demo finished in {time.monotonic() - started:.0f} s; files in {out}/")
    print(f"serve it:  badexpert serve {bundle}")
    print(f"then:      curl -F file=@{samples / 'triggered.png'} http://127.0.0.1:8000/predict")
    return 0
