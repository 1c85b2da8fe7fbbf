"""A second signal, measured: the expert's score alone, the feature signal alone and the two fused,
each at its own deployed operating point (tau from the build's own D_cal by the conformal rule).

    python -m bench.feature_signal --attacks badnet blend wanet                 # build, score, one JSON per guard
    python -m bench.feature_signal --attacks badnet --arch cifar_lenet --build-seed 1
    python -m bench.feature_signal --table                                      # Markdown tables from the JSONs

For each attack's cached model (bench.train_attacked): ``build_guard`` with the build's defaults on
the 2,000 reserved training images (D_fit 1,400, D_select 200, D_cal 400), its feature signal
fitted on *every* candidate layer (``--feature-stages 8``), so that each layer subset is measured on
the same guard. Then M, B and M' run once over D_select, D_cal, the 5,000-image calibration pool and
the 5,000 evaluation images (clean, and triggered where counted), and the parts are cached: the
expert's log score and each layer's log Mahalanobis distance. Every rule below is computed from
those parts with the library's own functions, its tau set on D_cal (or on the 5,000-image pool:
``pool`` rows, as ``badexpert calibrate`` would), and measured on the evaluation images.

Rules: ``expert`` (the paper's score), ``features:<subset>`` (the feature signal alone),
``fused:<subset>`` (the product's rule: the more suspect of the two) and ``sum:<subset>`` (the sum
of the two standardized anomalies, a rejected alternative). Subsets: ``default`` (the last four
resolutions and the classifier's input: what ``badexpert build`` reads), ``penultimate``, ``last2``
(the last resolution and the classifier's input), ``stages`` (resolutions only).

Caches (under ``$BADEXPERT_CACHE/bench/feature_signal``) are keyed by the model file's sha256, the
attack's settings and the build's settings; a changed input makes a new entry, never a reuse.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.attacks import ATTACKS, MIN_ASR
from bench.calibration_draws import draw_operating_points, summarize
from bench.cifar10 import CACHE, CLASSES, attacks_with_data, reserved_split
from bench.operating_point import split_test_set
from bench.train_attacked import PREPROCESSING, recipe_attack_kwargs, recipe_epochs, train_backdoored, trained_model_path
from defense.build import BuildConfig, build_guard, stratified_split
from defense.bundle import load_bundle, save_bundle
from defense.data import ImageSet
from defense.evaluation import detection_metrics
from defense.feature_signal import reference_scale
from defense.feature_fit import activations_and_scores
from defense.features import INPUT_SUFFIX, ActivationTap
from defense.models.loading import ModelSpec
from defense.threshold import calibrate_threshold, conformal_rank

ROOT = CACHE / "bench" / "feature_signal"
CANDIDATE_STAGES = 8  # every resolution's end: the subsets below are taken from these
PARTS = ("select", "cal", "pool", "clean", "triggered")
FEATURE_WEIGHTS = (0.75, 0.5)  # fused@W: the feature anomaly weighted by W (rejected variants, measured)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def key_of(*items) -> str:
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def layer_subsets(layers: list[str], default_stages: int = BuildConfig.feature_stages) -> dict[str, list[int]]:
    """Index subsets of ``layers`` (stage ends in order, then the classifier's input if any)."""
    # find_feature_layers puts the classifier's input last; a stage end is never last with a suffix
    head = [len(layers) - 1] if layers and layers[-1].endswith(INPUT_SUFFIX) else []
    stages = [i for i in range(len(layers)) if i not in head]
    subsets = {"default": stages[-default_stages:] + head, "stages": stages}
    if head:
        subsets["penultimate"] = head
        subsets["last2"] = stages[-1:] + head
    return {name: subset for name, subset in subsets.items() if subset}


def build_cached(attack_name: str, arch: str, model_seed: int, build_seed: int, data: dict, attack_settings: dict,
                 training: dict | None = None):
    """The default build (every candidate layer) of the cached attacked model, saved as a bundle
    under a key of everything that made it. ``training``: ``lr`` and ``attack_kwargs`` (e.g. the
    poison rate) and ``epochs`` for ``train_backdoored``, where they differ from its defaults."""
    model, info = train_backdoored(attack_name, arch, seed=model_seed, **(training or {}))
    weights = trained_model_path(info)
    config = BuildConfig(seed=build_seed, feature_stages=CANDIDATE_STAGES, progress=False)
    key = key_of(sha256_file(weights), attack_settings, dataclasses.asdict(config), arch)
    folder = ROOT / "bundles" / key
    if not (folder / "manifest.json").is_file():
        _, reserved = reserved_split(len(data["train_labels"]), seed=model_seed)
        images, labels = data["train_images"][reserved], data["train_labels"][reserved]
        clean = ImageSet(images, labels, CLASSES, [Path(f"reserved/{i:05d}.png") for i in range(len(labels))])
        result = build_guard(model, clean, PREPROCESSING, 10, config, log=lambda *_: None)
        spec = ModelSpec(kind="registry", name=arch, num_classes=10)
        save_bundle(folder, result.guard, spec, result.manifest_fields, overwrite=True)
    return folder, info, key


def split_parts(data: dict, model_seed: int, build_seed: int, attack) -> dict[str, torch.Tensor]:
    """The uint8 images of each part: the build's D_select and D_cal, the pool and evaluation sets."""
    _, reserved = reserved_split(len(data["train_labels"]), seed=model_seed)
    images, labels = data["train_images"][reserved], data["train_labels"][reserved]
    _, select, cal = stratified_split(labels, (BuildConfig.selection_fraction, BuildConfig.calibration_fraction), build_seed)
    pool, evaluation = split_test_set(len(data["test_labels"]), seed=model_seed)
    test_images, test_labels = data["test_images"][evaluation], data["test_labels"][evaluation]
    counted = attack.counted(test_labels)
    return {"select": images[select], "cal": images[cal], "pool": data["test_images"][pool],
            "clean": test_images, "triggered": attack.apply(test_images[counted])}


def parts_cache(manifest: dict, attack_settings: dict, attack_name: str) -> Path:
    """Where a guard's scored parts are cached: its bundle id and the inference-time attack's settings."""
    return ROOT / "parts" / f"{manifest['bundle_id']}_{key_of(attack_settings, attack_name)}.safetensors"


def score_parts(folder: Path, parts: dict[str, torch.Tensor], cache: Path) -> dict[str, torch.Tensor]:
    """Per part: label, expert log score, (N, L) log distances; cached as safetensors."""
    if cache.is_file():
        return load_file(str(cache))
    guard, manifest = load_bundle(folder)
    detector = guard.feature_detector
    guard.set_feature_detector(None)
    tap = ActivationTap(guard.model, detector.layers)
    out = {}
    for name, images in parts.items():
        activations, scores = activations_and_scores(guard, tap, images, batch_size=500)
        out[f"{name}.label"] = scores.label
        out[f"{name}.expert_log"] = scores.expert_score.log()
        out[f"{name}.distances"] = detector.layer_log_distances(activations, scores.label)
    out["layer_center"], out["layer_spread"] = detector.layer_center.clone(), detector.layer_spread.clone()
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(cache))
    return out


def rule_scores(parts: dict[str, torch.Tensor], rule: str, subset: list[int] | None,
                feature_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Each part's decision score under ``rule`` (higher: cleaner), with reference scales from
    D_select exactly as :func:`defense.feature_signal.fit_feature_detector` sets them.
    ``feature_weight`` < 1 makes the feature signal's anomaly count less (a rejected variant)."""
    expert = {name: parts[f"{name}.expert_log"] for name in PARTS}
    if rule == "expert":
        return {name: value.exp() for name, value in expert.items()}
    center, spread = parts["layer_center"][subset], parts["layer_spread"][subset]
    raw = {name: ((parts[f"{name}.distances"][:, subset] - center) / spread).mean(1) for name in PARTS}
    feature_center, feature_spread = reference_scale(raw["select"], upper=True)
    expert_center, expert_spread = reference_scale(expert["select"], upper=False)
    out = {}
    for name in PARTS:
        feature_anomaly = feature_weight * (raw[name] - feature_center) / feature_spread
        feature_log = expert_center - expert_spread * feature_anomaly
        if rule == "features":
            log_score = feature_log
        elif rule == "fused":
            log_score = torch.minimum(expert[name], feature_log)
        else:  # sum of the two anomalies
            log_score = expert_center - expert_spread * (feature_anomaly + (expert_center - expert[name]) / expert_spread)
        out[name] = log_score.exp()
    return out


def measure(parts: dict[str, torch.Tensor], names: list[str], attack, test_labels: torch.Tensor,
            fpr: float = 0.01) -> dict:
    """Every rule's AUROC, realized FPR and ASR at tau (tau from D_cal, and from the pool);
    ``names``: the feature layers' names, in the order of the parts' distance columns."""
    counted = attack.counted(test_labels)
    sources = test_labels[counted]
    rows = {}
    rules = [("expert", None)] + [(f"{rule}:{subset_name}", subset)
                                  for subset_name, subset in layer_subsets(names).items()
                                  for rule in ("features", "fused", "sum")]
    rules += [(f"fused@{weight}:default", layer_subsets(names)["default"]) for weight in FEATURE_WEIGHTS]
    for name, subset in rules:
        rule, _, weight = name.split(":")[0].partition("@")
        scores = rule_scores(parts, rule, subset, float(weight or 1.0))
        row = {}
        for calibration in ("cal", "pool"):
            tau = calibrate_threshold(scores[calibration], fpr).tau
            metrics = detection_metrics(tau, scores["clean"], parts["clean.label"], test_labels, scores["triggered"],
                                        parts["triggered.label"], sources, attack.targets(sources))
            row[calibration] = {"tau": tau, "auroc": metrics.auroc, "fpr": metrics.fpr,
                                "asr_with_guard": metrics.asr_with_guard, "asr_without_guard": metrics.asr_without_guard,
                                "clean_accuracy_with_guard": metrics.clean_accuracy_with_guard}
        rows[name] = row
    return {"layers": names, "rules": rows}


def calibration_promise(parts: dict[str, torch.Tensor], names: list[str], attack, test_labels: torch.Tensor,
                        draws: int = 1000, n: int = 400, fpr: float = 0.01) -> dict:
    """The threshold's promise for the expert's score and the fused one: ``draws`` calibration sets of
    ``n`` images (the build's D_cal size) drawn from the 5,000-image pool, each tau by the conformal
    rule, the realized FPR and ASR on the evaluation images (bench.calibration_draws' method)."""
    sources = test_labels[attack.counted(test_labels)]
    successful = parts["triggered.label"] == attack.targets(sources)
    out = {}
    for rule, subset in (("expert", None), ("fused", layer_subsets(names)["default"])):
        scores = rule_scores(parts, rule, subset)
        fprs, asrs, refused = draw_operating_points(scores["pool"], scores["clean"], scores["triggered"], successful,
                                                    len(sources), n, fpr, "conformal", draws)
        summary = summarize(fprs, asrs, refused, n, conformal_rank(n, fpr), "conformal", len(scores["clean"]), 0.0)
        out[rule] = {key: value for key, value in dataclasses.asdict(summary).items()
                     if key not in ("build_fpr", "build_fpr_percentile")}
    return out


def run(attack_name: str, data: dict, arch: str, model_seed: int, build_seed: int, training: dict | None = None) -> Path:
    attack = ATTACKS[attack_name]()
    settings = json.loads(json.dumps(dataclasses.asdict(attack)))
    model_name = attack.model_attack or attack_name
    attack_kwargs = recipe_attack_kwargs(arch, model_name, (training or {}).get("attack_kwargs"))
    folder, info, key = build_cached(model_name, arch, model_seed, build_seed, data,
                                     json.loads(json.dumps(dataclasses.asdict(ATTACKS[model_name](**attack_kwargs)))),
                                     training)
    parts_images = split_parts(data, model_seed, build_seed, attack)
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = score_parts(folder, parts_images, parts_cache(manifest, settings, attack_name))
    _, evaluation = split_test_set(len(data["test_labels"]), seed=model_seed)
    names = manifest["feature_signal"]["layers"]
    measured = measure(parts, names, attack, data["test_labels"][evaluation])
    measured["draws"] = calibration_promise(parts, names, attack, data["test_labels"][evaluation])
    asr = measured["rules"]["expert"]["cal"]["asr_without_guard"]  # this attack's trigger, on the evaluation images
    result = {"attack": attack_name, "arch": arch, "model_seed": model_seed, "build_seed": build_seed,
              "bundle_id": manifest["bundle_id"], "build_key": key, "model_asr": asr, "model_epochs": info["epochs"],
              "model_clean_accuracy": info["clean_accuracy"], "counted": asr >= MIN_ASR, **measured}
    name = f"{attack_name}_{arch}_seed{model_seed}_build{build_seed}"
    if info["epochs"] != recipe_epochs(arch, model_name):  # a variant: kept apart, out of the tables' means
        out = ROOT / "variants" / f"{name}_epochs{info['epochs']}.json"
    else:
        out = ROOT / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out


def table(rules: tuple[str, ...] = ("expert", "features:default", "fused:default"), calibration: str = "cal") -> str:
    """One row per guard: each rule's AUROC / realized FPR / ASR at tau, and a mean row per arch."""
    results = [json.loads(path.read_text()) for path in sorted((ROOT / "results").glob("*.json"))]
    header = "| arch | attack | seed | model ASR | " + " | ".join(f"{rule} AUROC / FPR / ASR" for rule in rules) + " |"
    lines = [header, "|" + "---|" * (4 + len(rules))]
    by_arch: dict[str, list[dict]] = {}
    for result in results:
        if not result["counted"]:
            continue
        by_arch.setdefault(result["arch"], []).append(result)
        cells = [_cell(result["rules"][rule][calibration]) for rule in rules]
        lines.append(f"| {result['arch']} | {result['attack']} | {result['model_seed']}/{result['build_seed']} | "
                     f"{result['model_asr']:.1%} | " + " | ".join(cells) + " |")
    for arch, rows in by_arch.items():
        means = [{metric: statistics.mean(r["rules"][rule][calibration][metric] for r in rows)
                  for metric in ("auroc", "fpr", "asr_with_guard")} for rule in rules]
        lines.append(f"| **{arch} mean** | {len(rows)} guards | | | " + " | ".join(_cell(m) for m in means) + " |")
    skipped = [f"{r['attack']} ({r['arch']}, ASR {r['model_asr']:.0%})" for r in results if not r["counted"]]
    if skipped:
        lines.append(f"\nNot counted (the backdoor did not implant, ASR < {MIN_ASR:.0%}): {', '.join(skipped)}")
    return "\n".join(lines)


def variant_table(rules: tuple[str, ...] = ("expert", "features:default", "fused:default"), calibration: str = "cal") -> str:
    """The variants' rows (models trained for other epochs than their recipe's), each beside the clean
    accuracy and epochs of its model; empty when there are none."""
    paths = sorted((ROOT / "variants").glob("*.json"))
    if not paths:
        return ""
    lines = ["Variants (not in the means above):", "",
             "| arch | attack | seed | epochs | clean accuracy | model ASR | "
             + " | ".join(f"{rule} AUROC / FPR / ASR" for rule in rules) + " |", "|" + "---|" * (6 + len(rules))]
    for result in (json.loads(path.read_text()) for path in paths):
        cells = [_cell(result["rules"][rule][calibration]) for rule in rules]
        lines.append(f"| {result['arch']} | {result['attack']} | {result['model_seed']}/{result['build_seed']} | "
                     f"{result['model_epochs']} | {result['model_clean_accuracy']:.1%} | {result['model_asr']:.1%} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(metrics: dict) -> str:
    return f"{100 * metrics['auroc']:.2f} / {metrics['fpr']:.2%} / {metrics['asr_with_guard']:.1%}"


def rule_means(calibration: str = "cal") -> str:
    """Every rule's mean AUROC and ASR at tau over all counted guards, then per architecture, and the
    mean over architectures (each family weighs the same, however many guards it has): the choice's evidence."""
    results = [json.loads(path.read_text()) for path in sorted((ROOT / "results").glob("*.json"))]
    results = [r for r in results if r["counted"]]
    if not results:
        return "no results"
    archs = sorted({r["arch"] for r in results})
    lines = ["| rule | guards | mean AUROC | min AUROC | mean FPR | mean ASR at tau | "
             + " | ".join(f"{arch}: AUROC / ASR" for arch in archs) + " | mean over families: AUROC / ASR |",
             "|---|---|---|---|---|---|" + "---|" * (len(archs) + 1)]
    rules = sorted({rule for r in results for rule in r["rules"]})
    for rule in rules:
        rows = [r["rules"][rule][calibration] for r in results if rule in r["rules"]]
        families = [[r["rules"][rule][calibration] for r in results if r["arch"] == arch and rule in r["rules"]]
                    for arch in archs]
        family_means = [(statistics.mean(m["auroc"] for m in f), statistics.mean(m["asr_with_guard"] for m in f))
                        for f in families if f]
        lines.append(f"| {rule} | {len(rows)} | {100 * statistics.mean(m['auroc'] for m in rows):.2f} | "
                     f"{100 * min(m['auroc'] for m in rows):.2f} | {statistics.mean(m['fpr'] for m in rows):.2%} | "
                     f"{statistics.mean(m['asr_with_guard'] for m in rows):.1%} | "
                     + " | ".join(f"{100 * a:.2f} / {r:.1%}" for a, r in family_means) + " | "
                     f"{100 * statistics.mean(a for a, _ in family_means):.2f} / "
                     f"{statistics.mean(r for _, r in family_means):.1%} |")
    return "\n".join(lines)


def promise_table() -> str:
    """Per guard: the realized FPR over calibration draws (mean, share inside the printed range) and
    the mean ASR at tau, for the expert's score and the fused one."""
    lines = ["| arch | attack | draws (n) | expert: FPR mean / in range / ASR mean | fused: FPR mean / in range / ASR mean |",
             "|---|---|---|---|---|"]
    for path in sorted((ROOT / "results").glob("*.json")):
        result = json.loads(path.read_text())
        if not result["counted"] or "draws" not in result:
            continue
        cells = [f"{d['fpr_mean']:.2%} / {d['fpr_in_range']:.0%} / {d['asr_mean']:.1%}"
                 for d in (result["draws"]["expert"], result["draws"]["fused"])]
        lines.append(f"| {result['arch']} | {result['attack']} | {result['draws']['fused']['draws']} "
                     f"({result['draws']['fused']['n']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_guard_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that name a bench guard: which attacks, on which architecture, which model and build seeds."""
    parser.add_argument("--attacks", nargs="*", default=[], choices=sorted(ATTACKS))
    parser.add_argument("--arch", default="cifar_resnet_compact")
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--build-seed", type=int, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_guard_arguments(parser)
    parser.add_argument("--lr", type=float, help="the attacked model's training rate (default: the architecture's "
                                                  "recipe in bench.train_attacked)")
    parser.add_argument("--poison-rate", type=float, help="the attack's poison rate, where not the recipe's")
    parser.add_argument("--epochs", type=int, help="the attacked model's training epochs, where not the recipe's "
                                                   "(a variant: its model and result are kept apart, and --table "
                                                   "lists it under the main table, out of the means)")
    parser.add_argument("--table", action="store_true", help="print the Markdown tables from the cached results")
    parser.add_argument("--calibration", default="cal", choices=["cal", "pool"],
                        help="tables: tau from the build's D_cal (400 images) or the 5,000-image pool")
    args = parser.parse_args()
    for name, data in attacks_with_data(args.attacks):
        training = {"lr": args.lr, "attack_kwargs": None if args.poison_rate is None else {"poison_rate": args.poison_rate},
                    "epochs": args.epochs}
        print(f"{name}: {run(name, data, args.arch, args.model_seed, args.build_seed, training)}")
    if args.table:
        print(table(calibration=args.calibration))
        print()
        variants = variant_table(calibration=args.calibration)
        if variants:
            print(variants)
            print()
        print(rule_means(args.calibration))
        print()
        print(promise_table())


if __name__ == "__main__":
    main()
