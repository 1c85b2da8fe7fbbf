"""The guard as deployed: realized FPR and ASR at the bundle's own tau, per attack, per calibration.

    python -m bench.operating_point --attacks blend trojan      # builds, then one JSON per attack
    python -m bench.operating_point --table                     # Markdown tables from those JSONs

The CIFAR-10 test set is split once (seeded) into a *calibration pool* of 5,000 images, which only
ever sets thresholds (no labels used), and 5,000 *evaluation* images, on which every figure below
is measured (clean, and triggered for the counted non-target ones). For each attack's cached model
(bench.train_attacked), the 2,000 reserved training images are the user's labeled clean set, and:

- ``cal20``: ``badexpert build`` on the 2,000 labeled images alone with its defaults
  (``--calibration-fraction 0.2``: D_fit 1,400, D_select 200 for the learning rates, D_cal 400 for
  the threshold, conformal rule);
- ``cal40``: ``--calibration-fraction 0.4`` (D_fit 1,000, D_cal 800): more calibration images
  from the same 2,000, fewer for finetuning;
- ``calibration_data``: ``build --calibration-data`` with the 5,000-image pool (D_fit 1,800,
  D_select 200, D_cal 5,000);
- ``recalibrated_cal20`` / ``recalibrated_cal40``: ``badexpert calibrate`` of those bundles on the
  same pool (scoring only, same models).

For the two builds without extra data the threshold is also recomputed with the ``ucb`` rule from
the bundle's own D_cal scores (same models, scoring only), so both rules are compared on the same
guards. Also counted: exactly tied scores among the evaluation clean images, with the score of
this release and with the float32 formula of the previous one.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch
from PIL import Image
from scipy.stats import betabinom

from bench.attacks import ATTACKS, MIN_ASR
from bench.cifar10 import CACHE, attacks_with_data, reserved_split
from bench.detection import write_reserved_folder
from bench.train_attacked import train_backdoored, trained_model_path
from defense.build import stratified_split
from defense.bundle import load_bundle
from badexpert.main import main as badexpert
from defense.data import load_image_folder
from defense.manifest import sha256_of
from defense.evaluation import detection_metrics
from defense.models import create_model
from defense.score import GuardScores, guard_scores
from defense.threshold import calibrate_threshold, realized_fpr_range

ROOT = CACHE / "bench" / "operating_point"
POOL_SIZE = 5000
FPR = 0.01
VARIANTS = {
    "cal20": ["--calibration-fraction", "0.2"],
    "cal40": ["--calibration-fraction", "0.4"],
    "calibration_data": None,  # --calibration-data POOL, added below
}
RECALIBRATED = {"recalibrated_cal20": "cal20", "recalibrated_cal40": "cal40"}
# Built only when named by --also. derangement: cal20 with the expert trained on a random derangement; its seed is fixed
# for a reproducible bench: 3 gives a mapping that nowhere equals the all-to-all attack's (seed 0, the
# build's --seed, drew exactly the attack's mapping, which the same generator and seed also drew).
# cal20_seed1, cal20_seed2: the default build with --seed 1 or 2, so another split of the 2,000 images (another
# D_cal, D_select and D_fit) and another finetuning order, on the same model: the defence's own seeds.
OPTIONAL_VARIANTS = {"derangement": ["--calibration-fraction", "0.2", "--expert-labels", "derangement",
                                     "--expert-labels-seed", "3"],
                     "cal20_seed1": ["--calibration-fraction", "0.2", "--seed", "1"],
                     "cal20_seed2": ["--calibration-fraction", "0.2", "--seed", "2"],
                     "finetune_lr_0.2": ["--calibration-fraction", "0.2", "--finetune-lr", "0.2"]}
BUILD_SEEDS = ("cal20", "cal20_seed1", "cal20_seed2")
# Result files written before the variants were named by their split.
RENAMED = {"default": "cal40", "split_80_20": "cal20", "recalibrated": "recalibrated_cal40"}


def variant_folder(folder: Path, variant: str) -> Path:
    """A variant's bundle folder, under its current name or the name it was built under."""
    for name in (variant, *(old for old, new in RENAMED.items() if new == variant)):
        if (folder / name / "manifest.json").is_file():
            return folder / name
    return folder / variant


def split_test_set(n_test: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration pool, evaluation) indices of the test set: disjoint, seeded, 5,000 each."""
    order = torch.randperm(n_test, generator=torch.Generator().manual_seed(1000 + seed))
    return order[:POOL_SIZE].sort().values, order[POOL_SIZE:].sort().values


def write_pool(images: torch.Tensor, root: Path) -> Path:
    """The calibration pool as a flat folder of PNG files (no labels: calibration needs none)."""
    if (root / ".complete").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / f"{index:05d}.png")
    (root / ".complete").touch()
    return root


def float32_scores(model_logits, expert_logits, auxiliary_logits, alpha: float) -> torch.Tensor:
    """The previous release's score (float32 softmax), only to count the ties it made."""
    label = model_logits.argmax(1, keepdim=True)
    b = expert_logits.float().softmax(1).gather(1, label).squeeze(1)
    a = auxiliary_logits.float().softmax(1).gather(1, label).squeeze(1)
    return torch.minimum(a / (alpha * b.clamp_min(1e-8)), (1 - b) / (alpha - a).clamp_min(1e-8))


def score_with_logits(guard, images: torch.Tensor, batch_size: int = 1000):
    scores, old = [], []
    for start in range(0, len(images), batch_size):
        logits = guard.logits(images[start:start + batch_size])
        scores.append(guard_scores(*logits, alpha=guard.alpha).cpu())
        old.append(float32_scores(*(x.cpu() for x in logits), guard.alpha))
    return GuardScores.cat(scores), torch.cat(old)


def ties(values: torch.Tensor) -> int:
    """Inputs whose score equals another input's score exactly."""
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    return int((counts[inverse] > 1).sum())


def operating_point(tau: float, clean, triggered, labels, attack) -> dict:
    metrics = detection_metrics(tau, clean.score, clean.label, labels, triggered.score, triggered.label, labels,
                                attack.targets(labels), counted=attack.counted(labels))
    return {"tau": tau, "fpr": metrics.fpr, "asr_with_guard": metrics.asr_with_guard, "auroc": metrics.auroc,
            "clean_accuracy_with_guard": metrics.clean_accuracy_with_guard,
            "asr_without_guard": metrics.asr_without_guard,
            "clean_accuracy_without_guard": metrics.clean_accuracy_without_guard}


def bundle_threshold(manifest) -> dict:
    threshold = manifest.threshold
    return {key: threshold.get(key) for key in ("rule", "n", "k", "expected_fpr", "fpr_range", "advice")}


def build_record(bundle: Path) -> Path:
    """Beside the bundle: what it was built from (``build``'s key)."""
    return bundle.parent / f"{bundle.name}.build.json"


def build(bundle: Path, argv: list[str], key: dict) -> None:
    """``badexpert`` ``argv`` (build or calibrate) into ``bundle``, unless an earlier run built it from the
    same ``key`` (the weights' sha256 or the source bundle's id, and the command): a bundle built from
    other weights or settings, or with no record of them, is built again."""
    key = {**key, "argv": argv}
    record = build_record(bundle)
    if (bundle / "manifest.json").is_file():
        if record.is_file() and json.loads(record.read_text()) == key:
            return  # resume: built in an earlier run from the same weights and settings
        print(f"  {bundle.name}: built from other weights or settings (or unrecorded): building again")
    started = time.monotonic()
    record.unlink(missing_ok=True)
    if badexpert([*argv, "--out", str(bundle), "--overwrite", "--quiet"]) != 0:
        raise SystemExit(f"badexpert failed for {bundle}")
    record.write_text(json.dumps(key, indent=2))
    print(f"  {bundle.name}: {time.monotonic() - started:.0f} s")


def row_key(bundle_id: str, weights_sha256: str, attack, seed: int, n_eval: int) -> str:
    """What a result row depends on beyond its bundle: the weights, the attack's trigger settings and
    the evaluation split. A row is reused only when all of them match."""
    payload = {"bundle_id": bundle_id, "weights_sha256": weights_sha256, "attack": attack.name,
               "attack_settings": json.loads(json.dumps(dataclasses.asdict(attack))), "seed": seed, "n_eval": n_eval}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_attack(name: str, arch: str, seed: int, data: dict, device: str, optional: tuple[str, ...] = (),
               variants: tuple[str, ...] = tuple(VARIANTS)) -> dict:
    attack = ATTACKS[name]()
    model_attack = attack.model_attack or name
    _, model_info = train_backdoored(model_attack, arch, seed=seed, device=device)
    _, reserved_index = reserved_split(len(data["train_labels"]), seed=seed)
    reserved = write_reserved_folder(data["train_images"][reserved_index], data["train_labels"][reserved_index],
                                     CACHE / "bench" / "reserved" / f"seed{seed}_n2000")
    pool_index, eval_index = split_test_set(len(data["test_labels"]), seed)
    pool = write_pool(data["test_images"][pool_index], ROOT / f"pool_seed{seed}")
    weights = trained_model_path(model_info)
    weights_sha256 = sha256_of(weights)
    common = ["build", "--model", arch, "--weights", str(weights), "--clean-data",
              str(reserved), "--preset", "cifar", "--seed", str(seed), "--device", device]
    folder = ROOT / "bundles" / f"{model_attack}_{arch}_seed{seed}"
    built = {**{variant: VARIANTS[variant] for variant in variants},
             **{variant: OPTIONAL_VARIANTS[variant] for variant in optional}}
    for variant, extra in built.items():
        extra = ["--calibration-data", str(pool)] if extra is None else extra
        build(folder / variant, common + extra, {"weights_sha256": weights_sha256})
    for variant, source in RECALIBRATED.items():
        if source in built:
            source_id = json.loads((folder / source / "manifest.json").read_text())["bundle_id"]
            build(folder / variant, ["calibrate", str(folder / source), "--clean", str(pool), "--device", device],
                  {"source_bundle_id": source_id})

    images, labels = data["test_images"][eval_index], data["test_labels"][eval_index]
    triggered_images = attack.apply(images)
    reserved_set = load_image_folder(reserved, _preprocessing(variant_folder(folder, "cal20")), progress=False)
    path = ROOT / "results" / f"{name}_{arch}_seed{seed}.json"
    earlier = load_result(path)["variants"] if path.is_file() else {}
    result = {"attack": name, "arch": arch, "seed": seed, "model": model_info, "n_eval_clean": len(labels),
              "n_eval_triggered": int(attack.counted(labels).sum()), "variants": {}}
    for variant in (*VARIANTS, *RECALIBRATED, *OPTIONAL_VARIANTS):
        bundle = variant_folder(folder, variant)
        if not (bundle / "manifest.json").is_file():
            continue
        key = row_key(json.loads((bundle / "manifest.json").read_text())["bundle_id"], weights_sha256, attack, seed,
                      len(labels))
        if earlier.get(variant, {}).get("row_key") == key:
            result["variants"][variant] = earlier[variant]  # measured in an earlier run: same bundle, data, attack
            continue
        guard, manifest = load_bundle(bundle, device)
        clean, clean_old = score_with_logits(guard, images)
        triggered, _ = score_with_logits(guard, triggered_images)
        row = {"bundle_id": manifest.bundle_id, "row_key": key, "threshold": bundle_threshold(manifest),
               "unlearn_lr": manifest.backdoor_expert["lr"], "finetune_lr": manifest.auxiliary_model.get("lr"),
               "ties_clean": ties(clean.score), "ties_clean_float32": ties(clean_old),
               "at_tau": operating_point(guard.rejection_threshold, clean, triggered, labels, attack)}
        low, high = row["threshold"]["fpr_range"]
        row["at_tau"]["fpr_in_predicted_range"] = bool(low <= row["at_tau"]["fpr"] <= high)
        if variant in ("cal20", "cal40"):  # the other rule on the same guard and the same D_cal
            settings = manifest.settings
            fit_select_cal = stratified_split(reserved_set.labels, (settings["selection_fraction"],
                                                                    settings["calibration_fraction"]), seed)
            cal_scores = guard.score(reserved_set.images[fit_select_cal[2]]).score
            assert calibrate_threshold(cal_scores, FPR, "conformal").tau == guard.rejection_threshold
            ucb = calibrate_threshold(cal_scores, FPR, "ucb")
            row["ucb"] = {"k": ucb.k, "n": ucb.n, "fpr_range": list(realized_fpr_range(ucb.n, ucb.k)),
                          "at_tau": operating_point(ucb.tau, clean, triggered, labels, attack)}
        result["variants"][variant] = row
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def _preprocessing(bundle: Path):
    from defense.bundle import read_manifest
    from defense.preprocessing import Preprocessing

    return Preprocessing.from_dict(read_manifest(bundle).preprocessing)


# ------------------------------------------------------------------------------------------------
# tables

def _pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}"


def load_result(path: Path) -> dict:
    result = json.loads(path.read_text())
    result["variants"] = {RENAMED.get(name, name): row for name, row in result["variants"].items()}
    return result


def table(results: list[dict]) -> list[str]:
    order = list(ATTACKS)
    results = sorted(results, key=lambda r: (ATTACKS[r["attack"]].adaptive, order.index(r["attack"])))
    columns = [("cal20", None), ("cal20", "ucb"), ("cal40", None), ("cal40", "ucb"),
               ("calibration_data", None), ("recalibrated_cal20", None), ("recalibrated_cal40", None),
               ("cal20_seed1", None), ("cal20_seed2", None), ("derangement", None), ("finetune_lr_0.2", None)]
    lines = ["| attack | model ASR | AUROC (cal20 / cal40 / calibration_data) | " + " | ".join(
        f"{variant}{' (ucb)' if rule else ''}: FPR / ASR" for variant, rule in columns) + " |",
        "|" + "---|" * (3 + len(columns))]
    sums = {column: [0.0, 0.0, 0] for column in columns}
    for r in results:
        counted = r["model"]["attack_success_rate"] >= MIN_ASR
        name = r["attack"] + (" (adaptive)" if ATTACKS[r["attack"]].adaptive else "") + ("" if counted else " (not counted)")
        cells = []
        for variant, rule in columns:
            row = r["variants"].get(variant)
            if row is None:
                cells.append("n/a")
                continue
            point = row[rule]["at_tau"] if rule else row["at_tau"]
            auroc = f" (AUROC {_pct(point['auroc'], 2)})" if variant in OPTIONAL_VARIANTS else ""
            cells.append(f"{_pct(point['fpr'], 2)} / {_pct(point['asr_with_guard'])}{auroc}")
            if counted and not ATTACKS[r["attack"]].adaptive:
                sums[(variant, rule)][0] += point["fpr"]
                sums[(variant, rule)][1] += point["asr_with_guard"]
                sums[(variant, rule)][2] += 1
        default = r["variants"]["cal20"]["at_tau"]
        aurocs = " / ".join(_pct(r["variants"][v]["at_tau"]["auroc"], 2) if v in r["variants"] else "n/a"
                            for v in VARIANTS)
        lines.append(f"| {name} | {_pct(default['asr_without_guard'])} | {aurocs} | " + " | ".join(cells) + " |")
    count = max(v[2] for v in sums.values()) if sums else 0
    if count:
        lines.append(f"| **mean, counted standard** | | | " + " | ".join(
            f"**{_pct(s[0] / s[2], 2)} / {_pct(s[1] / s[2])}** ({s[2]})" if s[2] else "n/a" for s in sums.values()) + " |")
    return lines


def family_table(results: list[dict]) -> list[str]:
    """One row per architecture: the counted standard attacks' mean AUROC and mean realized FPR and
    ASR at each bundle's own tau, for the default build and for the build with the 5,000-image pool."""
    lines = ["| architecture | parameters | counted attacks | clean accuracy | mean AUROC | default (cal20): FPR / ASR "
             "| + 5,000 unlabeled: FPR / ASR | per attack: AUROC, ASR at tau (cal20) |", "|" + "---|" * 8]
    by_arch: dict[str, list[dict]] = {}
    not_counted: dict[str, list[str]] = {}
    for r in results:
        if ATTACKS[r["attack"]].adaptive:
            continue
        if r["model"]["attack_success_rate"] >= MIN_ASR:
            by_arch.setdefault(r["arch"], []).append(r)
        else:
            not_counted.setdefault(r["arch"], []).append(
                f"{r['attack']} (model ASR {_pct(r['model']['attack_success_rate'])}: AUROC "
                f"{_pct(r['variants']['cal20']['at_tau']['auroc'], 2)}, ASR at tau {_pct(r['variants']['cal20']['at_tau']['asr_with_guard'])})")
    for arch in sorted(set(not_counted) - set(by_arch)):
        lines.append(f"| {arch} | | 0 | | | | | not counted: {', '.join(not_counted[arch])} |")
    for arch, rows in sorted(by_arch.items()):
        parameters = sum(p.numel() for p in create_model(arch, num_classes=10).parameters())
        cal20 = [r["variants"]["cal20"]["at_tau"] for r in rows]
        pool = [r["variants"]["calibration_data"]["at_tau"] for r in rows if "calibration_data" in r["variants"]]
        mean = lambda points, key: sum(p[key] for p in points) / len(points)  # noqa: E731
        pooled = f"{_pct(mean(pool, 'fpr'), 2)} / {_pct(mean(pool, 'asr_with_guard'))} ({len(pool)})" if pool else "n/a"
        detail = ", ".join(f"{r['attack']} {_pct(r['variants']['cal20']['at_tau']['auroc'], 2)} "
                           f"{_pct(r['variants']['cal20']['at_tau']['asr_with_guard'])}" for r in rows)
        if arch in not_counted:
            detail += "; not counted: " + ", ".join(not_counted[arch])
        lines.append(f"| {arch} | {parameters / 1e6:.2f} M | {len(rows)} | {_pct(mean(cal20, 'clean_accuracy_without_guard'))} "
                     f"| {_pct(mean(cal20, 'auroc'), 2)} | {_pct(mean(cal20, 'fpr'), 2)} / {_pct(mean(cal20, 'asr_with_guard'))} "
                     f"| {pooled} | {detail} |")
    return lines


def _spread(values: list[float], digits: int = 2) -> str:
    """mean (min-max) of percentages."""
    mean = sum(values) / len(values)
    return f"{_pct(mean, digits)} ({_pct(min(values), digits)}-{_pct(max(values), digits)})"


def seeds_table(results: list[dict]) -> list[str]:
    """The headline figures over three seeds, per architecture. Two kinds of seed: the defence's
    (the default build with --seed 0, 1, 2 on the same seed-0 model) and the whole bench's (model,
    reserved images and build all with --seed 0, 1, 2). Each seed's figure is the mean over the
    counted standard attacks measured at every seed; shown as the mean over seeds (min-max)."""
    lines = ["| architecture | seeds of | attacks | mean AUROC | mean realized FPR at tau | mean ASR at tau |",
             "|---|---|---|---|---|---|"]
    counted = [r for r in results if r["model"]["attack_success_rate"] >= MIN_ASR and not ATTACKS[r["attack"]].adaptive]
    for arch in sorted({r["arch"] for r in counted}):
        rows = [r for r in counted if r["arch"] == arch]
        build_rows = [r for r in rows if r["seed"] == 0 and all(v in r["variants"] for v in BUILD_SEEDS)]
        per_seed = [[r["variants"][v]["at_tau"] for r in build_rows] for v in BUILD_SEEDS]
        model_seeds = sorted({r["seed"] for r in rows})
        attacks = set.intersection(*({r["attack"] for r in rows if r["seed"] == s} for s in model_seeds))
        for kind, points, names in (
                ("the defence (build --seed 0, 1, 2)", per_seed if build_rows else [], sorted(r["attack"] for r in build_rows)),
                ("the bench (model, data split, build)", [[r["variants"]["cal20"]["at_tau"] for r in rows
                                                           if r["seed"] == s and r["attack"] in attacks]
                                                          for s in model_seeds] if len(model_seeds) >= 3 else [],
                 sorted(attacks))):
            if not points:
                continue
            means = {key: [sum(p[key] for p in seed) / len(seed) for seed in points] for key in ("auroc", "fpr", "asr_with_guard")}
            lines.append(f"| {arch} | {kind} | {', '.join(names)} | {_spread(means['auroc'])} | {_spread(means['fpr'])} "
                         f"| {_spread(means['asr_with_guard'], 1)} |")
    return lines


def test_set_range(n: int, k: int, m: int, confidence: float = 0.95) -> tuple[float, float]:
    """Where the FPR measured on m fresh clean images falls: the calibration's Beta(k, n + 1 - k)
    spread and the evaluation's own sampling, together a beta-binomial."""
    distribution = betabinom(m, k, n + 1 - k)
    tail = (1 - confidence) / 2
    return float(distribution.ppf(tail)) / m, float(distribution.ppf(1 - tail)) / m


def calibration_table(results: list[dict]) -> list[str]:
    lines = ["| attack | variant | rule | n | k | expected FPR | summary's range (95%) | range on 5,000 test images (95%) "
             "| realized FPR | in test range | tied clean scores (float32 formula) |", "|" + "---|" * 11]
    for r in results:
        for variant, row in r["variants"].items():
            threshold, point = row["threshold"], row["at_tau"]
            low, high = threshold["fpr_range"]
            test_low, test_high = test_set_range(threshold["n"], threshold["k"], r["n_eval_clean"])
            inside = test_low <= point["fpr"] <= test_high
            lines.append(f"| {r['attack']} | {variant} | {threshold['rule']} | {threshold['n']} | {threshold['k']} | "
                         f"{_pct(threshold['expected_fpr'], 2)} | {_pct(low, 2)}-{_pct(high, 2)} | "
                         f"{_pct(test_low, 2)}-{_pct(test_high, 2)} | {_pct(point['fpr'], 2)} | "
                         f"{'yes' if inside else 'NO'} | {row['ties_clean']} ({row['ties_clean_float32']}) |")
    return lines


def bench_parser(description: str) -> argparse.ArgumentParser:
    """The options this bench and bench.calibration_draws share: which attacks, model, seed, device."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", default=[], choices=sorted(ATTACKS))
    parser.add_argument("--arch", default="cifar_resnet_compact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--also", nargs="+", default=[], choices=sorted(OPTIONAL_VARIANTS),
                        help="optional variants to build as well: derangement (--expert-labels derangement), "
                             "cal20_seed1, cal20_seed2 (the default build with --seed 1 or 2: another split of the "
                             "labeled images and another finetuning order), finetune_lr_0.2 (the auxiliary finetuned "
                             "at 0.2, above the automatic search's top rate of 0.1)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which standard builds to make (default: all); e.g. '--variants cal20 calibration_data' "
                             "for another architecture")
    parser.add_argument("--table", action="store_true", help="print the Markdown tables of every result so far")
    parser.add_argument("--seeds", action="store_true",
                        help="print the headline figures over three seeds (build seeds: --also cal20_seed1 cal20_seed2; "
                             "bench seeds: --seed 1 and --seed 2 runs)")
    parser.add_argument("--families", action="store_true",
                        help="print one row per architecture (every --arch measured so far, this --seed)")
    args = parser.parse_args()
    for name, data in attacks_with_data(args.attacks):
        started = time.monotonic()
        result = run_attack(name, args.arch, args.seed, data, args.device, tuple(args.also), tuple(args.variants))
        print(f"{name:18s} " + " | ".join(
            f"{variant}: AUROC {row['at_tau']['auroc']:.4f} FPR {row['at_tau']['fpr']:.4f} "
            f"ASR {row['at_tau']['asr_with_guard']:.3f}" for variant, row in result["variants"].items()
            if variant in args.variants) + f" | {time.monotonic() - started:.0f} s")
    if args.table:
        results = [load_result(p) for p in sorted((ROOT / "results").glob(f"*_{args.arch}_seed{args.seed}.json"))]
        print("\n".join(table(results)))
        print()
        print("\n".join(calibration_table(results)))
    if args.families:
        results = [load_result(p) for p in sorted((ROOT / "results").glob(f"*_seed{args.seed}.json"))]
        print("\n".join(family_table(results)))
    if args.seeds:
        print("\n".join(seeds_table([load_result(p) for p in sorted((ROOT / "results").glob("*.json"))])))


if __name__ == "__main__":
    main()
