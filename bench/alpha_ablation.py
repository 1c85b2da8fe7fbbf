"""How the score's alpha moves the guard's operating point, per architecture and attack.

    python -m bench.alpha_ablation --arch cifar_vgg11_bn_compact --attacks badnet blend wanet
    python -m bench.alpha_ablation --table          # every architecture and seed measured so far

Runs on the ``cal20`` bundles that ``bench.operating_point`` built (the defaults of ``badexpert
build``). alpha only enters the score, not the models, so for each guard the three models' logits
are computed once on the bundle's own D_cal (the 401 reserved images its build calibrated on), on
the 5,000 evaluation clean images and on their triggered copies; then for every alpha the score is
recomputed, tau is re-set from D_cal with the bundle's rule and target FPR exactly as ``build``
does, and the realized FPR and the ASR with the guard are measured at that tau (and the AUROC).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.attacks import ATTACKS, MIN_ASR
from bench.cifar10 import CACHE, attacks_with_data
from bench.operating_point import ROOT, bench_parser, operating_point, split_test_set, variant_folder, _pct
from defense.build import stratified_split
from defense.bundle import load_bundle
from defense.data import load_image_folder
from defense.score import guard_scores
from defense.threshold import ThresholdError, calibrate_threshold

ALPHAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0)
RESULTS = ROOT / "alpha"


def logits_in_batches(guard, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, ...]:
    parts = [tuple(x.cpu() for x in guard.logits(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return tuple(torch.cat(column) for column in zip(*parts))


def cached_logits(path: Path, compute) -> dict[str, tuple[torch.Tensor, ...]]:
    """The three models' logits per image set, computed once per bundle (safetensors, no pickle)."""
    if path.is_file():
        flat = load_file(str(path))
        return {name: tuple(flat[f"{name}.{i}"] for i in range(3)) for name in {key.split(".")[0] for key in flat}}
    logits = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{name}.{i}": x.clone().contiguous() for name, three in logits.items() for i, x in enumerate(three)}, str(path))
    return logits


def alpha_rows(calibration_logits, clean_logits, triggered_logits, labels, attack, fpr: float, rule: str,
               alphas=ALPHAS) -> dict[str, dict]:
    """For each alpha: tau from the calibration logits' scores, and the operating point it gives."""
    rows = {}
    for alpha in alphas:
        clean = guard_scores(*clean_logits, alpha=alpha)
        triggered = guard_scores(*triggered_logits, alpha=alpha)
        try:
            threshold = calibrate_threshold(guard_scores(*calibration_logits, alpha=alpha).score, fpr, rule)
        except ThresholdError as error:  # tau on a tie: the build would refuse this alpha
            rows[str(alpha)] = {"refused": str(error)}
            continue
        rows[str(alpha)] = operating_point(threshold.tau, clean, triggered, labels, attack)
    return rows


def run(name: str, arch: str, seed: int, data: dict, device: str) -> dict:
    attack = ATTACKS[name]()
    model_attack = attack.model_attack or name
    bundle = variant_folder(ROOT / "bundles" / f"{model_attack}_{arch}_seed{seed}", "cal20")
    if not (bundle / "manifest.json").is_file():
        raise SystemExit(f"{bundle} is missing: run python -m bench.operating_point --arch {arch} --attacks {name} first")
    guard, manifest = load_bundle(bundle, device)
    settings = manifest.settings
    reserved = load_image_folder(CACHE / "bench" / "reserved" / f"seed{seed}_n2000", guard.preprocessing, progress=False)
    _, _, calibration_index = stratified_split(reserved.labels, (settings["selection_fraction"],
                                                                 settings["calibration_fraction"]), seed)
    _, eval_index = split_test_set(len(data["test_labels"]), seed)
    images, labels = data["test_images"][eval_index], data["test_labels"][eval_index]
    logits = cached_logits(RESULTS / "logits" / f"{name}_{arch}_seed{seed}_{manifest.bundle_id}.safetensors",
                           lambda: {"calibration": logits_in_batches(guard, reserved.images[calibration_index]),
                                    "clean": logits_in_batches(guard, images),
                                    "triggered": logits_in_batches(guard, attack.apply(images))})
    rows = alpha_rows(logits["calibration"], logits["clean"], logits["triggered"], labels, attack,
                      manifest.threshold["target_fpr"], manifest.threshold["rule"])
    result = {"attack": name, "arch": arch, "seed": seed, "bundle_id": manifest.bundle_id,
              "bundle_alpha": guard.alpha, "model_asr": manifest_model_asr(model_attack, arch, seed), "alphas": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}_{arch}_seed{seed}.json").write_text(json.dumps(result, indent=2))
    return result


def manifest_model_asr(model_attack: str, arch: str, seed: int) -> float:
    from bench.train_attacked import model_path

    return json.loads(model_path(model_attack, arch, seed).with_suffix(".json").read_text())["attack_success_rate"]


def _counted(results: list[dict]) -> list[dict]:
    return [r for r in results if r["model_asr"] >= MIN_ASR and not ATTACKS[r["attack"]].adaptive]


def _mean(points: list[dict], key: str) -> float:
    return sum(p[key] for p in points) / len(points)


def table(results: list[dict]) -> list[str]:
    """Per architecture and seed, the counted attacks' mean AUROC and mean realized FPR / ASR at tau for each alpha."""
    header = "| architecture | seed | attacks | " + " | ".join(f"alpha {a}: AUROC, FPR / ASR" for a in ALPHAS) + " |"
    lines = [header, "|" + "---|" * (3 + len(ALPHAS))]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in _counted(results):
        groups.setdefault((r["arch"], r["seed"]), []).append(r)
    for (arch, seed), rows in sorted(groups.items()):
        cells = []
        for alpha in ALPHAS:
            if any(str(alpha) not in r["alphas"] for r in rows):
                cells.append("n/a")
                continue
            points = [r["alphas"][str(alpha)] for r in rows if "auroc" in r["alphas"][str(alpha)]]
            if len(points) < len(rows):
                cells.append(f"refused on {len(rows) - len(points)}")
                continue
            cells.append(f"{_pct(_mean(points, 'auroc'), 2)}, {_pct(_mean(points, 'fpr'), 2)} / "
                         f"{_pct(_mean(points, 'asr_with_guard'))}")
        lines.append(f"| {arch} | {seed} | {', '.join(sorted(r['attack'] for r in rows))} | " + " | ".join(cells) + " |")
    return lines


def seeds_table(results: list[dict], alphas: tuple[float, ...] = (0.5, 1.0)) -> list[str]:
    """The headline over the bench's seeds (architectures measured at three or more) at each of ``alphas``:
    per seed the mean over the attacks measured at every seed, then the mean over seeds (min-max)."""
    from bench.operating_point import _spread

    lines = ["| architecture | alpha | seeds | attacks | mean AUROC | mean realized FPR at tau | mean ASR at tau |",
             "|---|---|---|---|---|---|---|"]
    counted = _counted(results)
    for arch in sorted({r["arch"] for r in counted}):
        rows = [r for r in counted if r["arch"] == arch]
        seeds = sorted({r["seed"] for r in rows})
        if len(seeds) < 3:
            continue
        attacks = set.intersection(*({r["attack"] for r in rows if r["seed"] == s} for s in seeds))
        for alpha in alphas:
            per_seed = [[r["alphas"][str(alpha)] for r in rows if r["seed"] == s and r["attack"] in attacks] for s in seeds]
            means = {key: [_mean(points, key) for points in per_seed] for key in ("auroc", "fpr", "asr_with_guard")}
            lines.append(f"| {arch} | {alpha} | {', '.join(map(str, seeds))} | {', '.join(sorted(attacks))} | "
                         f"{_spread(means['auroc'])} | {_spread(means['fpr'])} | {_spread(means['asr_with_guard'], 1)} |")
    return lines


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--table", action="store_true", help="print the Markdown table of every result so far")
    args = parser.parse_args()
    for name, data in attacks_with_data(args.attacks):
        result = run(name, args.arch, args.seed, data, args.device)
        print(name, " | ".join(f"alpha {a}: " + (f"AUROC {p['auroc']:.4f} FPR {p['fpr']:.4f} ASR {p['asr_with_guard']:.3f}"
                                                  if "auroc" in p else "refused") for a, p in result["alphas"].items()))
    if args.table:
        results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
        print("\n".join(table(results)))
        print()
        print("\n".join(seeds_table(results)))


if __name__ == "__main__":
    main()
