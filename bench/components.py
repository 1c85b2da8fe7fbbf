"""Which half of a guard is weak on an attack, from its cached model and bundle (full test set).

    python -m bench.components --attacks wanet badnet

For each attack: the AUROC of the expert's agreement b alone, of the auxiliary's agreement a
alone, and of the guard's score (clean inputs M gets right vs. triggered inputs sent to their
target); and the attacked model's ASR split by whether M classifies the clean image right (for
all-to-all, whose backdoor works only where M recognizes the class).
"""

from __future__ import annotations

import argparse

import torch

from bench.attacks import ATTACKS
from bench.cifar10 import ARCHIVE, CACHE, available, load_cifar10
from bench.detection import _score_with_predictions
from defense.bundle import load_bundle
from defense.evaluation import auroc


def components(attack_name: str, data: dict, arch: str = "cifar_resnet_compact", seed: int = 0, n: int = 2000) -> dict:
    attack = ATTACKS[attack_name]()
    base = type(attack).model_attack or attack_name
    guard, _ = load_bundle(CACHE / "bench" / "bundles" / f"{base}_{arch}_seed{seed}_n{n}", "cpu")
    labels = data["test_labels"]
    clean, *_ = _score_with_predictions(guard, data["test_images"])
    triggered, *_ = _score_with_predictions(guard, attack.apply(data["test_images"]))
    right = clean.label == labels
    reached = attack.counted(labels) & (triggered.label == attack.targets(labels))
    result = {"auroc_expert_agreement": auroc(-clean.expert_agreement[right], -triggered.expert_agreement[reached]),
              "auroc_auxiliary_agreement": auroc(clean.auxiliary_agreement[right], triggered.auxiliary_agreement[reached]),
              "auroc_score": auroc(clean.score[right], triggered.score[reached])}
    counted = attack.counted(labels)
    result["asr_where_model_right"] = float(reached[counted & right].sum() / (counted & right).sum())
    result["asr_where_model_wrong"] = float(reached[counted & ~right].sum() / (counted & ~right).sum())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", default=["badnet"], choices=sorted(ATTACKS))
    args = parser.parse_args()
    if not available():
        print(f"CIFAR-10 not found at {ARCHIVE} (set BADEXPERT_DATA): skipping")
        return
    data = load_cifar10()
    for name in args.attacks:
        print(name, "  ".join(f"{key} {value:.4f}" for key, value in components(name, data).items()))


if __name__ == "__main__":
    main()
