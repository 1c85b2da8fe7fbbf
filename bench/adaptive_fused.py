"""The attacker who knows both signals: triggers optimized against a surrogate of the whole fused
guard, measured against the defender's guard per rule (expert alone, features alone, fused).

    python -m bench.adaptive_fused --attacks badnet            # after python -m bench.feature_signal --attacks badnet
    python -m bench.adaptive_fused --table

The paper's tailored adaptive attack (App. C.7.3; ``bench.adaptive_trigger`` has today's version)
looks for an inference-time trigger x' = (1 - k) x + k m that fires M and not the backdoor expert.
Here the attacker also knows the feature signal: they build a surrogate guard with this project's
own ``build_guard`` (defaults: the fused rule; attacker seed 101) on 2,000 of their own training
images, disjoint from the defender's, and minimize

    CE(M(x'), target) + lambda_expert * softmax(B_s(x'))[target] + lambda_features * relu(z_F,s(x')) + lambda_norm * |k|_1

where z_F,s is the surrogate's standardized feature anomaly (0 is a typical clean image; the relu
stops pushing once x' looks clean to it). ``expert-only`` rows are today's attacker
(lambda_features 0) measured against the fused guard; ``fused`` rows use lambda_features =
lambda_expert. Each trigger is then measured on the defender's guard (the bench.feature_signal
build of the same model) with every rule at its own tau from D_cal: AUROC and ASR at tau.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import torch.nn.functional as F

from bench.adaptive_trigger import ATTACKER_IMAGES, ATTACKER_SEED, SETTINGS, AlternativeTrigger
from bench.attacks import ATTACKS
from bench.cifar10 import CLASSES, attacks_with_data, reserved_split
from bench.feature_signal import ROOT, build_cached, key_of, measure, score_parts, split_parts
from bench.results import newest_per_guard
from bench.operating_point import split_test_set
from bench.train_attacked import PREPROCESSING, recipe_attack_kwargs, train_backdoored
from defense.build import BuildConfig, build_guard
from defense.data import ImageSet
from defense.progress import progress_bar

RESULTS = ROOT / "adaptive"
RULES = ("expert", "features:default", "fused:default", "fused:last2", "sum:last2", "sum:default")  # the default and its contenders


def surrogate_guard(model_attack: str, arch: str, seed: int, data: dict):
    """The attacker's own fused guard: ``build_guard`` defaults on 2,000 of their training images."""
    model, _ = train_backdoored(model_attack, arch, seed=seed)
    attacker_index, _ = reserved_split(len(data["train_labels"]), seed=seed)
    chosen = attacker_index[torch.randperm(len(attacker_index),
                                           generator=torch.Generator().manual_seed(ATTACKER_SEED))[:ATTACKER_IMAGES]]
    clean = ImageSet(data["train_images"][chosen], data["train_labels"][chosen], CLASSES,
                     [f"attacker/{i}" for i in range(ATTACKER_IMAGES)])
    return build_guard(model, clean, PREPROCESSING, 10, BuildConfig(seed=ATTACKER_SEED, progress=False),
                       log=lambda *_: None).guard


def optimize_against_guard(guard, images: torch.Tensor, target: int, lambda_expert: float, lambda_features: float,
                           lambda_norm: float, steps: int = 300, batch_size: int = 64, seed: int = 0) -> AlternativeTrigger:
    """Adam on the mark and the mask against the surrogate's M, expert and feature signal."""
    generator = torch.Generator().manual_seed(seed)
    trigger = AlternativeTrigger(*images.shape[-2:])
    optimizer = torch.optim.Adam(trigger.parameters(), lr=0.1)
    for module in (guard.model, guard.backdoor_expert, guard.feature_detector):
        module.eval().requires_grad_(False)
    detector = guard.feature_detector
    for _ in progress_bar(range(steps), desc=f"trigger ({lambda_expert}, {lambda_features}, {lambda_norm})", leave=False):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        inputs = guard.normalizer(trigger(batch))
        targets = torch.full((batch_size,), target)
        logits = guard.model(inputs)
        activations = guard.activations()
        loss = F.cross_entropy(logits, targets) + lambda_expert * guard.backdoor_expert(inputs).softmax(1)[:, target].mean()
        if lambda_features:
            anomaly = detector.feature_anomaly(activations, targets)
            loss = loss + lambda_features * anomaly.clamp_min(0).mean().float()
        loss = loss + lambda_norm * trigger.mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return trigger


def run(name: str, arch: str, seed: int, data: dict, steps: int) -> dict:
    attack = ATTACKS[name]()
    model_attack = attack.model_attack or name
    settings = json.loads(json.dumps(dataclasses.asdict(ATTACKS[model_attack](**recipe_attack_kwargs(arch, model_attack)))))
    folder, info, build_key = build_cached(model_attack, arch, seed, 0, data, settings)
    manifest = json.loads((folder / "manifest.json").read_text())
    surrogate = None  # built when a trigger has to be optimized
    attacker_index, _ = reserved_split(len(data["train_labels"]), seed=seed)
    attacker_images = data["train_images"][attacker_index[data["train_labels"][attacker_index] != attack.target_class]]
    attacker_images = attacker_images[torch.randperm(len(attacker_images),
                                                     generator=torch.Generator().manual_seed(seed))[:5000]]
    parts_images = split_parts(data, seed, 0, attack)
    _, evaluation = split_test_set(len(data["test_labels"]), seed=seed)
    labels = data["test_labels"][evaluation]
    counted = attack.counted(labels)
    path = RESULTS / f"{name}_{arch}_seed{seed}_{build_key}.json"
    result = json.loads(path.read_text()) if path.is_file() else {"attack": name, "arch": arch, "seed": seed,
                                                                  "bundle_id": manifest["bundle_id"], "rows": {}}
    for attacker in ("expert-only", "fused"):
        for lambda_expert, lambda_norm in SETTINGS:
            lambda_features = lambda_expert if attacker == "fused" else 0.0
            key = f"{attacker} {lambda_expert} {lambda_features} {lambda_norm} steps{steps}"
            cache = ROOT / "parts" / f"{manifest['bundle_id']}_adaptive_{key_of(key, name, ATTACKER_SEED)}.safetensors"
            done = result["rows"].get(key)
            if done is not None and all(rule in done["rules"] for rule in RULES):
                continue
            if done is not None and cache.is_file():  # a rule added since: measured again on the cached parts
                parts, mask_l1 = score_parts(folder, {}, cache), done["mask_l1"]
            else:
                surrogate = surrogate or surrogate_guard(model_attack, arch, seed, data)
                trigger = optimize_against_guard(surrogate, attacker_images, attack.target_class, lambda_expert,
                                                 lambda_features, lambda_norm, steps=steps, seed=seed)
                triggered = trigger.apply_uint8(parts_images["clean"][counted])
                parts = score_parts(folder, {**parts_images, "triggered": triggered}, cache)
                mask_l1 = float(trigger.mask.detach().sum())
            measured = measure(parts, manifest["feature_signal"]["layers"], attack, labels)
            result["rows"][key] = {"attacker": attacker, "lambda_expert": lambda_expert,
                                   "lambda_features": lambda_features, "lambda_norm": lambda_norm,
                                   "mask_l1": mask_l1, "rules": {rule: measured["rules"][rule]["cal"] for rule in RULES}}
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2))
            row = result["rows"][key]
            print(f"{key}: |k|_1 {row['mask_l1']:.1f}, model ASR {row['rules']['expert']['asr_without_guard']:.3f}; "
                  + "; ".join(f"{rule} AUROC {m['auroc']:.4f} ASR {m['asr_with_guard']:.3f}" for rule, m in row["rules"].items()))
    return result


def table() -> str:
    lines = ["| attack | arch | attacker | lambda_expert | lambda_features | lambda_norm | mask L1 (px) | model ASR | "
             + " | ".join(f"{rule}: AUROC / ASR at tau" for rule in RULES) + " |", "|" + "---|" * (8 + len(RULES))]
    # an older build's results (another build key) give way to the newest of the same guard
    for result in newest_per_guard(RESULTS, lambda result: (result["attack"], result["arch"], result["seed"])).values():
        rows = sorted(result["rows"].values(), key=lambda r: (r["attacker"], -r["lambda_norm"], r["lambda_expert"]))
        for row in rows:
            rules = row["rules"]
            lines.append(f"| {result['attack']} | {result['arch']} | {row['attacker']} | {row['lambda_expert']:g} | "
                         f"{row['lambda_features']:g} | {row['lambda_norm']:g} | {row['mask_l1']:.1f} | "
                         f"{rules['expert']['asr_without_guard']:.1%} | "
                         + " | ".join(f"{100 * rules[r]['auroc']:.1f} / {rules[r]['asr_with_guard']:.1%}" if r in rules
                                      else "not measured" for r in RULES)
                         + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="*", default=[], choices=sorted(ATTACKS))
    parser.add_argument("--arch", default="cifar_resnet_compact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per trigger (batches of 64 images)")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    for name, data in attacks_with_data(args.attacks):
        run(name, args.arch, args.seed, data, args.steps)
    if args.table:
        print(table())


if __name__ == "__main__":
    main()
