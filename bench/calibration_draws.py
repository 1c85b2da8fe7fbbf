"""How a guard's operating point varies with the draw of its calibration images.

    python -m bench.calibration_draws --attacks badnet blend     # after bench.operating_point
    python -m bench.calibration_draws --table

``bench.operating_point`` measures each guard at the tau its own build set. Every attack's build
uses the same 2,000 reserved images split with the same seed, so every ``cal20`` guard is
calibrated on the *same* 401 images: one draw of D_cal, shared by all attacks, whose misses are
one event, not one per attack. The summary's range ("the realized FPR falls in 0.27%-2.17% for
95% of calibrations") is a statement over draws, so this bench checks it over draws: it keeps each
built guard (same backdoor expert, same auxiliary model) and re-sets tau from ``draws`` random
subsets of the calibration pool (5,000 test images never used for evaluation), each as large as
the bundle's own D_cal, with the bundle's rule; then it measures each tau on the 5,000 evaluation
images. Reported per guard: the mean realized FPR, the share of draws whose realized FPR falls in
the range expected on 5,000 images (95% by construction when the prediction is right), the mean
ASR with the guard and its 5th-95th percentiles, and where the build's own tau falls among them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bench.attacks import ATTACKS, MIN_ASR
from bench.cifar10 import attacks_with_data
from bench.operating_point import RENAMED, ROOT, bench_parser, score_with_logits, split_test_set, test_set_range
from defense.bundle import load_bundle
from defense.score import rejects
from defense.threshold import ThresholdError, calibrate_threshold

VARIANTS = ("cal20", "cal40")
RESULTS = ROOT / "draws"


@dataclass
class DrawSummary:
    n: int
    k: int
    rule: str
    draws: int
    refused: int  # draws whose tau sat on a tie (the build would refuse them)
    fpr_mean: float
    fpr_in_range: float  # share of draws inside the range expected on the evaluation images
    test_range: tuple[float, float]
    asr_mean: float
    asr_p05: float
    asr_p95: float
    build_fpr: float  # the build's own tau (its own D_cal)
    build_fpr_percentile: float  # share of draws with a realized FPR below the build's


def draw_operating_points(pool_scores: torch.Tensor, clean_scores: torch.Tensor, triggered_scores: torch.Tensor,
                          successful: torch.Tensor, n_counted: int, n: int, fpr: float, rule: str,
                          draws: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Realized (FPR, ASR with the guard) on the evaluation images for ``draws`` taus, each set by
    ``rule`` from ``n`` pool scores drawn without replacement; also the number of refused draws.
    ``successful``: the triggered inputs that count and reach the attacker's class unguarded."""
    generator = torch.Generator().manual_seed(seed)
    fprs, asrs, refused = [], [], 0
    for _ in range(draws):
        chosen = torch.randperm(len(pool_scores), generator=generator)[:n]
        try:
            tau = calibrate_threshold(pool_scores[chosen], fpr, rule).tau
        except ThresholdError:
            refused += 1
            continue
        fprs.append(float(rejects(clean_scores, tau).float().mean()))
        asrs.append(float((successful & ~rejects(triggered_scores, tau)).sum()) / max(n_counted, 1))
    return np.array(fprs), np.array(asrs), refused


def summarize(fprs: np.ndarray, asrs: np.ndarray, refused: int, n: int, k: int, rule: str, n_eval: int,
              build_fpr: float) -> DrawSummary:
    low, high = test_set_range(n, k, n_eval)
    return DrawSummary(
        n=n, k=k, rule=rule, draws=len(fprs) + refused, refused=refused, fpr_mean=float(fprs.mean()),
        fpr_in_range=float(((fprs >= low) & (fprs <= high)).mean()), test_range=(low, high),
        asr_mean=float(asrs.mean()), asr_p05=float(np.quantile(asrs, 0.05)), asr_p95=float(np.quantile(asrs, 0.95)),
        build_fpr=build_fpr, build_fpr_percentile=float((fprs < build_fpr).mean()))


def _bundle_folder(folder: Path, variant: str) -> Path:
    """The variant's bundle, also under the name an earlier version of bench.operating_point gave it."""
    if (folder / variant).is_dir():
        return folder / variant
    return folder / next((old for old, new in RENAMED.items() if new == variant), variant)


def run_attack(name: str, arch: str, seed: int, data: dict, device: str, draws: int) -> dict:
    attack = ATTACKS[name]()
    folder = ROOT / "bundles" / f"{attack.model_attack or name}_{arch}_seed{seed}"
    pool_index, eval_index = split_test_set(len(data["test_labels"]), seed)
    images, labels = data["test_images"][eval_index], data["test_labels"][eval_index]
    triggered_images = attack.apply(images)
    counted = attack.counted(labels)
    result = {"attack": name, "arch": arch, "seed": seed, "variants": {}}
    for variant in VARIANTS:
        guard, manifest = load_bundle(_bundle_folder(folder, variant), device)
        pool, _ = score_with_logits(guard, data["test_images"][pool_index])
        clean, _ = score_with_logits(guard, images)
        triggered, _ = score_with_logits(guard, triggered_images)
        successful = counted & (triggered.label == attack.targets(labels))
        threshold = manifest.threshold
        build_fpr = float(rejects(clean.score, guard.rejection_threshold).float().mean())
        rows = {}
        for rule in ("conformal", "ucb"):
            n = threshold["n"]
            k = calibrate_threshold(torch.arange(n, dtype=torch.float64), threshold["target_fpr"], rule).k
            fprs, asrs, refused = draw_operating_points(pool.score, clean.score, triggered.score, successful,
                                                        int(counted.sum()), n, threshold["target_fpr"], rule, draws)
            own = build_fpr if rule == threshold["rule"] else float("nan")
            rows[rule] = asdict(summarize(fprs, asrs, refused, n, k, rule, len(labels), own))
        result["variants"][variant] = rows
    path = RESULTS / f"{name}_{arch}_seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def table(results: list[dict]) -> list[str]:
    from bench.operating_point import load_result

    counted_attacks = set()
    for path in (ROOT / "results").glob("*.json"):
        r = load_result(path)
        if r["model"]["attack_success_rate"] >= MIN_ASR and not ATTACKS[r["attack"]].adaptive:
            counted_attacks.add(r["attack"])
    order = list(ATTACKS)
    lines = ["| attack | variant | rule | n / k | draws | mean FPR | draws in the expected range | expected range "
             "(5,000 images) | mean ASR (5th-95th pct) | the build's own D_cal: FPR (percentile) |",
             "|" + "---|" * 10]
    means: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for r in sorted(results, key=lambda r: order.index(r["attack"])):
        for variant, rules in r["variants"].items():
            for rule, s in rules.items():
                own = "-" if s["build_fpr"] != s["build_fpr"] else \
                    f"{100 * s['build_fpr']:.2f} ({100 * s['build_fpr_percentile']:.0f}%)"
                lines.append(
                    f"| {r['attack']} | {variant} | {rule} | {s['n']} / {s['k']} | {s['draws']} | "
                    f"{100 * s['fpr_mean']:.2f} | {100 * s['fpr_in_range']:.1f}% | "
                    f"{100 * s['test_range'][0]:.2f}-{100 * s['test_range'][1]:.2f} | "
                    f"{100 * s['asr_mean']:.1f} ({100 * s['asr_p05']:.1f}-{100 * s['asr_p95']:.1f}) | {own} |")
                if r["attack"] in counted_attacks:
                    means.setdefault((variant, rule), []).append((s["fpr_mean"], s["fpr_in_range"], s["asr_mean"]))
    for (variant, rule), values in means.items():
        fpr, inside, asr = (float(np.mean(column)) for column in zip(*values))
        lines.append(f"| **mean over {len(values)} counted** | {variant} | {rule} | | | **{100 * fpr:.2f}** | "
                     f"**{100 * inside:.1f}%** | | **{100 * asr:.1f}** | |")
    return lines


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--draws", type=int, default=2000, help="calibration draws per guard and rule (default 2000)")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of every result so far")
    args = parser.parse_args()
    for name, data in attacks_with_data(args.attacks):
        result = run_attack(name, args.arch, args.seed, data, args.device, args.draws)
        for variant, rules in result["variants"].items():
            s = rules["conformal"]
            print(f"{name:18s} {variant}: mean FPR {s['fpr_mean']:.4f}, in range {s['fpr_in_range']:.3f}, "
                  f"mean ASR {s['asr_mean']:.3f}; the build's own: FPR {s['build_fpr']:.4f}")
    if args.table:
        results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"*_{args.arch}_seed{args.seed}.json"))]
        print("\n".join(table(results)))


if __name__ == "__main__":
    main()
