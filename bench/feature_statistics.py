"""Which statistic the feature signal reads, measured: the product's class-conditional Mahalanobis
distance in M's activations against the alternatives the literature offers, on the same guards.

    python -m bench.feature_statistics --attacks badnet blend blend_low_opacity wanet   # compact ResNet
    python -m bench.feature_statistics --arch cifar_lenet --attacks badnet blend
    python -m bench.feature_statistics --table

Each guard is ``bench.feature_signal``'s (the same cached model, build and parts: run that first).
For every statistic below, each layer's log statistic is standardized on D_select (median, 90th
percentile) and averaged over the product's default layers, exactly as the product does with its
Mahalanobis distances; the result is measured alone (``features``) and fused with the expert's
score by the product's rule (``fused``), each at its own tau from the build's D_cal.

Statistics (larger: farther from the clean images of the class M predicts; classes are M's labels):
``mahalanobis`` (the product's: M's activations), ``mahalanobis_expert`` and
``mahalanobis_auxiliary`` (the same statistic in B's or M''s activations at the same layers),
``knn`` (cosine distance to the 5th nearest D_fit image of that class, Sun et al. 2022) and
``ted_rank`` (TED-style: the rank, among all D_fit images by distance, of the nearest one of that
class; Fu et al. 2024 read it over many layers, here over the same layers).

Results: ``$BADEXPERT_CACHE/bench/feature_statistics/<bundle id>_<attack settings key>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from bench.attacks import ATTACKS
from bench.cifar10 import CACHE, attacks_with_data, reserved_split
from bench.results import newest_per_guard
from bench.feature_signal import (add_guard_arguments, build_cached, key_of, layer_subsets, measure, parts_cache,
                                  score_parts, split_parts)
from bench.operating_point import split_test_set
from bench.train_attacked import recipe_attack_kwargs
from defense.build import BuildConfig, stratified_split
from defense.bundle import load_bundle
from defense.features import ActivationTap
from defense.feature_signal import fit_layers, mahalanobis, reference_scale

ROOT = CACHE / "bench" / "feature_statistics"
STATISTICS = ("mahalanobis", "mahalanobis_expert", "mahalanobis_auxiliary", "knn", "ted_rank")
KNN_K = 5
SOURCES = {"mahalanobis": "model", "mahalanobis_expert": "backdoor_expert", "mahalanobis_auxiliary": "auxiliary_model",
           "knn": "model", "ted_rank": "model"}


def knn_distance(features: torch.Tensor, labels: torch.Tensor, fit_features: torch.Tensor, fit_labels: torch.Tensor,
                 k: int = KNN_K) -> torch.Tensor:
    """(N,) cosine distance of each row to its ``k``-th nearest ``fit_features`` row of its own label
    (the farthest fitted row of that label when the label has fewer than ``k``)."""
    a = torch.nn.functional.normalize(features.double(), dim=1)
    b = torch.nn.functional.normalize(fit_features.double(), dim=1)
    distance = 1 - a @ b.T
    distance[labels[:, None] != fit_labels[None, :]] = float("inf")
    nearest = distance.sort(dim=1).values
    counts = torch.bincount(fit_labels, minlength=int(max(labels.max(), fit_labels.max())) + 1)[labels]
    index = (torch.clamp(counts, min=1).clamp(max=k) - 1)[:, None]
    return nearest.gather(1, index).squeeze(1)


def nearest_same_class_rank(features: torch.Tensor, labels: torch.Tensor, fit_features: torch.Tensor,
                            fit_labels: torch.Tensor) -> torch.Tensor:
    """(N,) TED's statistic: how many ``fit_features`` rows (Euclidean, after standardizing each
    dimension on them) are closer than the nearest one with the row's own label (0: the nearest is),
    plus d / (1 + d) of that nearest distance d, which breaks the ties of the integer rank (a
    threshold cannot fall between equal scores) without changing its order."""
    center, scale = fit_features.double().mean(0), fit_features.double().std(0).clamp_min(1e-6)
    distance = torch.cdist((features.double() - center) / scale, (fit_features.double() - center) / scale)
    order = distance.argsort(dim=1)
    rank = (fit_labels[order] == labels[:, None]).double().argmax(dim=1)
    nearest = distance.gather(1, order.gather(1, rank[:, None])).squeeze(1)
    return rank.double() + nearest / (1 + nearest)


@torch.inference_mode()
def activations(guard, layers: list[str], images: torch.Tensor, batch_size: int = 500):
    """Per source model: its pooled activations at ``layers`` (list of (N, D)); and M's labels."""
    taps = {name: ActivationTap(getattr(guard, name), layers) for name in set(SOURCES.values())}
    columns, labels = {name: [] for name in taps}, []
    try:
        for start in range(0, len(images), batch_size):
            model_logits, _, _ = guard.logits(images[start:start + batch_size])
            labels.append(model_logits.argmax(1))
            for name, tap in taps.items():
                columns[name].append([value.cpu() for value in tap.take()])
    finally:
        for tap in taps.values():
            tap.remove()
    return {name: [torch.cat(layer) for layer in zip(*chunks)] for name, chunks in columns.items()}, torch.cat(labels).cpu()


def log_statistic(statistic: str, acts: list[torch.Tensor], labels: torch.Tensor, fit_acts: list[torch.Tensor],
                  fit_labels: torch.Tensor, fitted) -> torch.Tensor:
    """(N, L) float64: the log of ``statistic`` per layer."""
    columns = []
    for index, features in enumerate(acts):
        if statistic.startswith("mahalanobis"):
            value = mahalanobis(features, labels, fitted.means[index], fitted.whitening[index])
        elif statistic == "knn":
            value = knn_distance(features, labels, fit_acts[index], fit_labels)
        else:
            value = 1 + nearest_same_class_rank(features, labels, fit_acts[index], fit_labels)
        columns.append(value.clamp_min(1e-300).log())
    return torch.stack(columns, dim=1)


def run(attack_name: str, data: dict, arch: str, model_seed: int = 0, build_seed: int = 0) -> Path:
    attack = ATTACKS[attack_name]()
    settings = json.loads(json.dumps(dataclasses.asdict(attack)))
    model_name = attack.model_attack or attack_name
    kwargs = recipe_attack_kwargs(arch, model_name)
    folder, _, key = build_cached(model_name, arch, model_seed, build_seed, data,
                                  json.loads(json.dumps(dataclasses.asdict(ATTACKS[model_name](**kwargs)))))
    manifest = json.loads((folder / "manifest.json").read_text())
    out = ROOT / f"{manifest['bundle_id']}_{key_of(settings, attack_name, STATISTICS, KNN_K)}.json"
    if out.is_file():
        return out
    images = split_parts(data, model_seed, build_seed, attack)
    expert_parts = score_parts(folder, images, parts_cache(manifest, settings, attack_name))
    _, reserved = reserved_split(len(data["train_labels"]), seed=model_seed)
    labels = data["train_labels"][reserved]
    fit_index, _, _ = stratified_split(labels, (BuildConfig.selection_fraction, BuildConfig.calibration_fraction), build_seed)
    guard, _ = load_bundle(folder)
    names = manifest["feature_signal"]["layers"]
    subset = layer_subsets(names)["default"]
    layers = [names[i] for i in subset]
    guard.set_feature_detector(None)
    fit_acts, fit_labels = activations(guard, layers, data["train_images"][reserved][fit_index])
    part_acts = {name: activations(guard, layers, part) for name, part in images.items()}
    _, evaluation = split_test_set(len(data["test_labels"]), seed=model_seed)
    result = {"attack": attack_name, "arch": arch, "model_seed": model_seed, "build_seed": build_seed,
              "bundle_id": manifest["bundle_id"], "layers": layers, "statistics": {}}
    for statistic in STATISTICS:
        source = SOURCES[statistic]
        fitted = fit_layers(fit_acts[source], fit_labels, 10) if statistic.startswith("mahalanobis") else None
        parts = {f"{name}.expert_log": expert_parts[f"{name}.expert_log"] for name in images}
        for name, (acts, part_labels) in part_acts.items():
            parts[f"{name}.label"] = expert_parts[f"{name}.label"]
            parts[f"{name}.distances"] = log_statistic(statistic, acts[source], part_labels, fit_acts[source],
                                                       fit_labels, fitted)
        scales = [reference_scale(parts["select.distances"][:, i], upper=True) for i in range(len(layers))]
        parts["layer_center"] = torch.tensor([c for c, _ in scales], dtype=torch.float64)
        parts["layer_spread"] = torch.tensor([s for _, s in scales], dtype=torch.float64)
        measured = measure(parts, layers, attack, data["test_labels"][evaluation])["rules"]
        result["statistics"][statistic] = {"features": measured["features:default"]["cal"],
                                           "fused": measured["fused:default"]["cal"]}
    result["expert"] = measured["expert"]["cal"]  # the same for every statistic
    ROOT.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out


def latest_results() -> list[dict]:
    """One result per guard (attack, arch, seeds): the newest, where a changed build setting made a
    new bundle of the same guard (its cache entry is new; the old one stays on disk)."""
    newest = newest_per_guard(ROOT, lambda result: (result["arch"], result["attack"], result.get("model_seed", 0),
                                                    result.get("build_seed", 0)))
    return list(newest.values())


def _guard_name(result: dict) -> str:
    """The attack, with the seeds where they are not the default's."""
    seeds = (result.get("model_seed", 0), result.get("build_seed", 0))
    return result["attack"] if seeds == (0, 0) else f"{result['attack']} (seeds {seeds[0]}/{seeds[1]})"


def table() -> str:
    results = latest_results()
    header = ("| arch | attack | expert | " + " | ".join(f"{s} alone / fused" for s in STATISTICS) + " |")
    lines = [header, "|" + "---|" * (3 + len(STATISTICS))]
    for r in results:
        cells = [f"{100 * r['statistics'][s]['features']['auroc']:.2f} / {100 * r['statistics'][s]['fused']['auroc']:.2f}"
                 for s in STATISTICS]
        lines.append(f"| {r['arch']} | {_guard_name(r)} | {100 * r['expert']['auroc']:.2f} | " + " | ".join(cells) + " |")
    if results:
        means = [f"{statistics.mean(100 * r['statistics'][s]['features']['auroc'] for r in results):.2f} / "
                 f"{statistics.mean(100 * r['statistics'][s]['fused']['auroc'] for r in results):.2f}" for s in STATISTICS]
        lines.append(f"| **mean** | {len(results)} guards | {statistics.mean(100 * r['expert']['auroc'] for r in results):.2f} | "
                     + " | ".join(means) + " |")
    lines.append("\nASR at tau (D_cal), alone / fused:\n")
    lines.append("| arch | attack | expert | " + " | ".join(STATISTICS) + " |")
    lines.append("|" + "---|" * (3 + len(STATISTICS)))
    for r in results:
        cells = [f"{r['statistics'][s]['features']['asr_with_guard']:.1%} / {r['statistics'][s]['fused']['asr_with_guard']:.1%}"
                 for s in STATISTICS]
        lines.append(f"| {r['arch']} | {_guard_name(r)} | {r['expert']['asr_with_guard']:.1%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_guard_arguments(parser)
    parser.add_argument("--table", action="store_true", help="print the Markdown tables from the cached results")
    args = parser.parse_args()
    for name, data in attacks_with_data(args.attacks):
        print(f"{name}: {run(name, data, args.arch, args.model_seed, args.build_seed)}")
    if args.table:
        print(table())


if __name__ == "__main__":
    main()
