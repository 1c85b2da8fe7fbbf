"""Train a backdoored CIFAR-10 classifier (the attacker's side), cached outside the repo.

    python -m bench.train_attacked --attack badnet --arch cifar_resnet_compact --epochs 10

The defender's 2,000 reserved images (bench.cifar10.reserved_split) are never trained on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from tqdm import tqdm

from bench.attacks import ATTACKS
from bench.cifar10 import CACHE, load_cifar10, reserved_split
from defense.finetune import predict_logits, random_crop_flip
from defense.models import create_model
from defense.preprocessing import Preprocessing

PREPROCESSING = Preprocessing.from_preset("cifar")


def model_path(attack: str, arch: str, seed: int) -> Path:
    return CACHE / "bench" / "models" / f"{attack}_{arch}_seed{seed}.safetensors"


def train_backdoored(attack_name: str, arch: str = "cifar_resnet_compact", epochs: int = 10, seed: int = 0,
                     batch_size: int = 256, lr: float = 0.2, device: str = "cpu", attack_kwargs: dict | None = None):
    """Train once; later calls load the cached weights. Returns (model, info dict)."""
    path = model_path(attack_name, arch, seed)
    info_path = path.with_suffix(".json")
    model = create_model(arch, num_classes=10)
    if path.is_file() and info_path.is_file():
        load_model(model, str(path), device="cpu")
        return model.eval(), json.loads(info_path.read_text())

    data = load_cifar10()
    train_index, _ = reserved_split(len(data["train_labels"]), seed=seed)
    attack = ATTACKS[attack_name](**(attack_kwargs or {}))
    images, labels, poisoned = attack.poison(data["train_images"][train_index], data["train_labels"][train_index], seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = model.to(device)
    normalizer = PREPROCESSING.normalizer().to(device)
    steps_per_epoch = -(-len(labels) // batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.25)
    started = time.monotonic()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for start in tqdm(range(0, len(labels), batch_size), desc=f"{attack_name} epoch {epoch + 1}/{epochs}", leave=False):
            index = order[start:start + batch_size]
            batch = random_crop_flip(images[index].to(device), generator)
            loss = F.cross_entropy(model(normalizer(batch)), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    test_logits = predict_logits(model, data["test_images"], normalizer, device)
    clean_accuracy = float((test_logits.argmax(1) == data["test_labels"]).float().mean())
    counted = attack.counted(data["test_labels"])
    triggered = attack.apply(data["test_images"][counted])
    predictions = predict_logits(model, triggered, normalizer, device).argmax(1)
    asr = float((predictions == attack.targets(data["test_labels"][counted])).float().mean())
    info = {"attack": attack_name, "arch": arch, "epochs": epochs, "seed": seed, "poison_rate": attack.poison_rate,
            "poisoned_samples": int(poisoned.sum()), "target_class": attack.target_class,
            "clean_accuracy": clean_accuracy, "attack_success_rate": asr,
            "train_seconds": round(time.monotonic() - started, 1), "attack_kwargs": attack_kwargs or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model.cpu(), str(path))
    info_path.write_text(json.dumps(info, indent=2))
    return model, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attack", default="badnet", choices=sorted(ATTACKS))
    parser.add_argument("--arch", default="cifar_resnet_compact")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    _, info = train_backdoored(args.attack, args.arch, args.epochs, args.seed, device=args.device)
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
