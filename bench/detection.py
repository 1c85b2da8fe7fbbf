"""BaDExpert on real CIFAR-10 backdoored models: build the guard the way a user does, measure it.

    python -m bench.detection --attacks badnet blend

For each attack: the attacked model (trained once by bench.train_attacked, cached), the
defender's 2,000 reserved training images written as an ImageFolder, ``badexpert build`` on
them, then AUROC / CA / ASR / realized FPR on the 10,000 CIFAR-10 test images (triggered
versions of the non-target ones). Results are JSON files under the cache; nothing is committed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image

from bench.attacks import ATTACKS
from bench.cifar10 import ARCHIVE, CACHE, CLASSES, available, load_cifar10, reserved_split
from bench.train_attacked import train_backdoored, trained_model_path
from defense.bundle import load_bundle
from badexpert.main import main as badexpert
from defense.evaluation import detection_metrics
from defense.score import GuardScores

RESULTS = CACHE / "bench" / "results"


def write_reserved_folder(images: torch.Tensor, labels: torch.Tensor, root: Path) -> Path:
    """The defender's reserved clean set as PNG files in ImageFolder layout (lossless)."""
    if (root / ".complete").is_file():
        return root
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:05d}.png")
    (root / ".complete").touch()
    return root


def _score_with_predictions(guard, images: torch.Tensor, batch_size: int = 500):
    """One pass of the three models: the guard's scores, and the expert's and auxiliary's labels."""
    parts = []
    for start in range(0, len(images), batch_size):
        model_logits, expert_logits, auxiliary_logits = guard.logits(images[start:start + batch_size])
        parts.append((guard.scores_from(model_logits, expert_logits, auxiliary_logits, guard.activations()),
                      expert_logits.argmax(1).cpu(), auxiliary_logits.argmax(1).cpu()))
    return (GuardScores.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]))


def evaluate_guard(bundle: Path, attack, data: dict, device: str = "cpu") -> dict:
    guard, manifest = load_bundle(bundle, device)
    labels = data["test_labels"]
    clean, expert_clean, auxiliary_clean = _score_with_predictions(guard, data["test_images"])
    triggered, expert_triggered, auxiliary_triggered = _score_with_predictions(guard, attack.apply(data["test_images"]))
    targets = attack.targets(labels)  # per input: all-to-all sends y to y + 1
    counted = attack.counted(labels)  # TaCT: its source classes only
    metrics = detection_metrics(guard.rejection_threshold, clean.score, clean.label, labels,
                                triggered.score, triggered.label, labels, targets, counted=counted)
    return {
        **metrics.to_dict(),
        "tau": guard.rejection_threshold,
        "expert_clean_accuracy": float((expert_clean == labels).float().mean()),
        "expert_asr": float((expert_triggered == targets)[counted].float().mean()),
        "auxiliary_clean_accuracy": float((auxiliary_clean == labels).float().mean()),
        "auxiliary_asr": float((auxiliary_triggered == targets)[counted].float().mean()),
        "unlearn_lr": manifest.backdoor_expert["lr"],
        "unlearn_search": manifest.backdoor_expert.get("search"),
        "finetune_lr": manifest.auxiliary_model["lr"],
        "calibration": manifest.calibration,
        "build_seconds": manifest.build_seconds,
    }


def run_attack(attack_name: str, arch: str, n_reserved: int, seed: int, extra_build_args: list[str],
               tag: str = "", device: str = "cpu", epochs: int | None = None, reuse_bundle: bool = False) -> dict:
    data = load_cifar10()
    model_attack = ATTACKS[attack_name].model_attack or attack_name  # low-opacity Blend reuses the Blend model
    model, model_info = train_backdoored(model_attack, arch, epochs=epochs, seed=seed, device=device)
    _, reserved_index = reserved_split(len(data["train_labels"]), seed=seed)
    # A seeded random subset: the reserved indices are sorted and the cache is ordered by class.
    shuffled = reserved_index[torch.randperm(len(reserved_index), generator=torch.Generator().manual_seed(seed))]
    reserved_index = shuffled[:n_reserved].sort().values
    clean_dir = write_reserved_folder(data["train_images"][reserved_index], data["train_labels"][reserved_index],
                                      CACHE / "bench" / "reserved" / f"seed{seed}_n{n_reserved}")
    name = f"{attack_name}_{arch}_seed{seed}_n{n_reserved}{tag}"
    # The guard belongs to the model: an inference-time variant is measured with its base attack's bundle.
    bundle = CACHE / "bench" / "bundles" / f"{model_attack}_{arch}_seed{seed}_n{n_reserved}{tag}"
    weights = trained_model_path(model_info)  # another --epochs than the recipe's: that model, cached apart
    started = time.monotonic()
    built = (bundle / "manifest.json").is_file()
    if not built or (model_attack == attack_name and not reuse_bundle):
        status = badexpert(["build", "--model", arch, "--weights", str(weights), "--clean-data", str(clean_dir),
                            "--out", str(bundle), "--overwrite", "--preset", "cifar", "--seed", str(seed),
                            "--device", device, "--quiet", *extra_build_args])
        if status != 0:
            raise SystemExit(f"badexpert build failed for {name}")
    result = {"attack": attack_name, "arch": arch, "seed": seed, "n_reserved": n_reserved, "build_args": extra_build_args,
              "model": model_info, "guard": evaluate_guard(bundle, ATTACKS[attack_name](), data, device),
              "wall_seconds": round(time.monotonic() - started, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", default=["badnet"], choices=sorted(ATTACKS))
    parser.add_argument("--arch", default="cifar_resnet_compact")
    parser.add_argument("--reserved", type=int, nargs="+", default=[2000], help="reserved clean set sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int,
                        help="attacker's training epochs (default: the architecture's recipe in bench.train_attacked, else "
                             "each attack's train_epochs in bench/attacks.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tag", default="", help="suffix of the result name, for variants")
    parser.add_argument("--reuse-bundle", action="store_true",
                        help="measure the bundle already built for this attack instead of building it again")
    parser.add_argument("build_args", nargs=argparse.REMAINDER, help="extra 'badexpert build' flags after --")
    args = parser.parse_args()
    if not available():
        print(f"CIFAR-10 not found at {ARCHIVE} (set BADEXPERT_DATA): skipping the benchmark")
        return
    extra = [a for a in args.build_args if a != "--"]
    for attack in args.attacks:
        for n in args.reserved:
            result = run_attack(attack, args.arch, n, args.seed, extra, args.tag, args.device, args.epochs,
                                args.reuse_bundle)
            guard, model = result["guard"], result["model"]
            print(f"{attack:10s} n={n:5d}  model CA {model['clean_accuracy']:.3f} ASR {model['attack_success_rate']:.3f} | "
                  f"guard AUROC {guard['auroc']:.4f}  CA {guard['clean_accuracy_with_guard']:.3f}  "
                  f"ASR {guard['asr_with_guard']:.3f}  FPR {guard['fpr']:.4f}  (tau {guard['tau']:.3g}, "
                  f"unlearn lr {guard['unlearn_lr']:g}, expert CA {guard['expert_clean_accuracy']:.3f} "
                  f"ASR {guard['expert_asr']:.3f}; finetune lr {guard['finetune_lr']:g})")


if __name__ == "__main__":
    main()
