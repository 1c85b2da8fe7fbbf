"""An attacker who knows BaDExpert: a trigger optimized to fire the model and not the backdoor expert.

    python -m bench.adaptive_trigger --attacks badnet                 # after bench.operating_point
    python -m bench.adaptive_trigger --table

The paper's tailored adaptive attack (its App. C.7.3, "BaDExpert-Adap-BadNet"): the attacker, who
trained the backdoored model M, looks for an *inference-time* trigger (a mark m and a per-pixel
opacity mask k, x' = (1 - k) x + k m) that

    minimizes  CE(M(x'), target) + lambda_expert * softmax(B(x'))[target] + lambda_norm * |k|_1

so that M still follows the trigger while the backdoor expert B does not, which breaks the
guard's assumption. The attacker has no access to the defender's expert: they build a
*surrogate* with this project's own ``badexpert build`` (defaults, another seed) on 2,000 of
their own training images (disjoint from the defender's reserved ones), optimize against it,
and the trigger is then measured against the defender's deployed guards at their own tau:

- ``cal20``: the default bundle (expert trained on the public (y + 1) mod C relabeling);
- ``derangement``: the bundle whose expert used a secret random derangement, where built;
- ``white-box``: also optimized against the defender's own expert (an upper bound on the attack).

Reported per (lambda_expert, lambda_norm): the mask's L1 norm in pixels, the model's ASR on the
5,000 evaluation images' counted triggered copies (no guard), the AUROC and the ASR with the guard
at tau. Triggered images are rounded to uint8, as a client would send them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.attacks import ATTACKS
from bench.cifar10 import CACHE, attacks_with_data, reserved_split
from bench.detection import write_reserved_folder
from bench.operating_point import ROOT, bench_parser, build, operating_point, split_test_set, _pct
from bench.train_attacked import model_path
from defense.bundle import load_bundle
from defense.manifest import sha256_of
from defense.progress import progress_bar

RESULTS = ROOT / "adaptive_trigger"
# (lambda_expert, lambda_norm): the paper's grid is {10, 1} x {0.5, 0.1, 0.05, 0.01}; these span it, with two
# points between. White-box (against the defender's own expert): the strongest two.
SETTINGS = ((1.0, 0.1), (10.0, 0.1), (1.0, 0.01), (3.0, 0.01), (10.0, 0.01), (10.0, 0.03))
WHITE_BOX_SETTINGS = ((10.0, 0.1), (10.0, 0.01))
ATTACKER_SEED = 101
ATTACKER_IMAGES = 2000


class AlternativeTrigger(torch.nn.Module):
    """x' = (1 - k) * x + k * m on 0-255 float images; m and k are sigmoids of free parameters."""

    def __init__(self, height: int, width: int):
        super().__init__()
        self.mark_logit = torch.nn.Parameter(torch.zeros(3, height, width))
        self.mask_logit = torch.nn.Parameter(torch.full((1, height, width), -3.0))

    @property
    def mask(self) -> torch.Tensor:
        return torch.sigmoid(self.mask_logit)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mark = 255.0 * torch.sigmoid(self.mark_logit)
        return (1 - self.mask) * images.float() + self.mask * mark

    @torch.no_grad()
    def apply_uint8(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).round().clamp(0, 255).to(torch.uint8)


def optimize_trigger(model, expert, normalizer, images: torch.Tensor, target: int, lambda_expert: float,
                     lambda_norm: float, steps: int = 300, batch_size: int = 64, seed: int = 0) -> AlternativeTrigger:
    """Adam on the mark and the mask against M and an expert (both frozen, in eval mode)."""
    generator = torch.Generator().manual_seed(seed)
    trigger = AlternativeTrigger(*images.shape[-2:])
    optimizer = torch.optim.Adam(trigger.parameters(), lr=0.1)
    for module in (model, expert):
        module.eval().requires_grad_(False)
    for _ in progress_bar(range(steps), desc=f"trigger (lambda_expert {lambda_expert}, lambda_norm {lambda_norm})",
                          leave=False):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        inputs = normalizer(trigger(batch))
        targets = torch.full((batch_size,), target)
        loss = (F.cross_entropy(model(inputs), targets)
                + lambda_expert * expert(inputs).softmax(1)[:, target].mean()
                + lambda_norm * trigger.mask.sum())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return trigger


def surrogate_bundle(model_attack: str, arch: str, seed: int, data: dict, device: str) -> Path:
    """The attacker's own ``badexpert build`` on 2,000 of their training images, another seed."""
    attacker_index, _ = reserved_split(len(data["train_labels"]), seed=seed)
    chosen = attacker_index[torch.randperm(len(attacker_index),
                                           generator=torch.Generator().manual_seed(ATTACKER_SEED))[:ATTACKER_IMAGES]]
    clean = write_reserved_folder(data["train_images"][chosen], data["train_labels"][chosen],
                                  CACHE / "bench" / "reserved" / f"attacker_seed{seed}_n{ATTACKER_IMAGES}")
    bundle = RESULTS / "surrogates" / f"{model_attack}_{arch}_seed{seed}"
    weights = model_path(model_attack, arch, seed)
    build(bundle, ["build", "--model", arch, "--weights", str(weights), "--clean-data",
                   str(clean), "--preset", "cifar", "--seed", str(ATTACKER_SEED), "--device", device],
          {"weights_sha256": sha256_of(weights)})
    return bundle


def run(name: str, arch: str, seed: int, data: dict, device: str, steps: int) -> dict:
    attack = ATTACKS[name]()
    model_attack = attack.model_attack or name
    defended = ROOT / "bundles" / f"{model_attack}_{arch}_seed{seed}"
    guards = {variant: load_bundle(defended / variant, device)[0] for variant in ("cal20", "derangement")
              if (defended / variant / "manifest.json").is_file()}
    if "cal20" not in guards:
        raise SystemExit(f"{defended / 'cal20'} is missing: run python -m bench.operating_point --arch {arch} "
                         f"--attacks {name} first")
    surrogate, _ = load_bundle(surrogate_bundle(model_attack, arch, seed, data, device), device)
    attacker_index, _ = reserved_split(len(data["train_labels"]), seed=seed)
    attacker_images = data["train_images"][attacker_index[data["train_labels"][attacker_index] != attack.target_class]]
    attacker_images = attacker_images[torch.randperm(len(attacker_images),
                                                     generator=torch.Generator().manual_seed(seed))[:5000]]
    _, eval_index = split_test_set(len(data["test_labels"]), seed)
    images, labels = data["test_images"][eval_index], data["test_labels"][eval_index]
    clean_scores = {variant: guard.score(images) for variant, guard in guards.items()}
    path = RESULTS / f"{name}_{arch}_seed{seed}.json"
    result = json.loads(path.read_text()) if path.is_file() else {"attack": name, "arch": arch, "seed": seed, "rows": {}}
    against = {"surrogate": surrogate.backdoor_expert, "white-box": guards["cal20"].backdoor_expert}
    for optimized_against, expert in against.items():
        for lambda_expert, lambda_norm in SETTINGS if optimized_against == "surrogate" else WHITE_BOX_SETTINGS:
            key = f"{optimized_against} {lambda_expert} {lambda_norm}"
            if key in result["rows"]:
                continue
            trigger = optimize_trigger(surrogate.model, expert, surrogate.normalizer, attacker_images,
                                       attack.target_class, lambda_expert, lambda_norm, steps=steps, seed=seed)
            triggered = trigger.apply_uint8(images)
            row = {"optimized_against": optimized_against, "lambda_expert": lambda_expert, "lambda_norm": lambda_norm,
                   "mask_l1": float(trigger.mask.detach().sum()), "guards": {}}
            for variant, guard in guards.items():
                row["guards"][variant] = operating_point(guard.rejection_threshold, clean_scores[variant],
                                                         guard.score(triggered), labels, attack)
            result["rows"][key] = row
            RESULTS.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2))  # resume after each setting
            print(f"{key}: |k|_1 {row['mask_l1']:.1f} " + " | ".join(
                f"{variant}: model ASR {p['asr_without_guard']:.3f} AUROC {p['auroc']:.4f} ASR {p['asr_with_guard']:.3f}"
                for variant, p in row["guards"].items()))
    return result


def table(results: list[dict]) -> list[str]:
    lines = ["| attack | architecture | optimized against | lambda_expert | lambda_norm | mask L1 (pixels) | model ASR "
             "| default guard: AUROC / ASR at tau | derangement guard: AUROC / ASR at tau |", "|" + "---|" * 9]
    for r in results:
        ordered = sorted(r["rows"].values(), key=lambda row: (row["optimized_against"] != "surrogate",
                                                              -row["lambda_norm"], row["lambda_expert"]))
        for row in ordered:
            cells = []
            for variant in ("cal20", "derangement"):
                point = row["guards"].get(variant)
                cells.append(f"{_pct(point['auroc'], 1)} / {_pct(point['asr_with_guard'])}" if point else "n/a")
            lines.append(f"| {r['attack']} | {r['arch']} | {row['optimized_against']} | {row['lambda_expert']:g} | "
                         f"{row['lambda_norm']:g} | {row['mask_l1']:.1f} | "
                         f"{_pct(row['guards']['cal20']['asr_without_guard'])} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--steps", type=int, default=300, help="Adam steps per trigger (batches of 64 images)")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of every result so far")
    args = parser.parse_args()
    for name, data in attacks_with_data(args.attacks):
        run(name, args.arch, args.seed, data, args.device, args.steps)
    if args.table:
        results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"*_seed{args.seed}.json"))]
        print("\n".join(table(results)))


if __name__ == "__main__":
    main()
