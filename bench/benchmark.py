"""BaDExpert against STRIP, SCALE-UP and IBD-PSC on the bench's backdoored CIFAR-10 models.

    python -m bench.benchmark                                  # every attacked model in the cache
    python -m bench.benchmark --attacks badnet blend_low_opacity --eval-size 2000

Nothing is trained here: an attack counts when its model is cached (``bench.train_attacked``;
inference-time variants such as ``blend_low_opacity`` reuse their base attack's model). For each:

1. BaDExpert: the bundle that ``badexpert build`` makes from the defender's reserved images
   (``bench.detection.run_attack``); an existing bundle is reused when it holds the same model
   weights and was built with the same settings.
2. The baselines (``bench.baselines``), fitted on the same reserved images.
3. All methods score the same test images: a seeded subset of ``--eval-size`` clean CIFAR-10 test
   images, and up to ``--eval-size`` test images whose source class counts for the attack, with
   the attack's test-time trigger.

Metrics (docs/method.md, section 6, with the attack's own targets, so all-to-all and TaCT are right):
AUROC over clean inputs that M classifies correctly vs. triggered inputs that M sends to their
target; CA, ASR and the realized FPR at the threshold that flags 1% of the clean test
subset (the paper's Table 1 protocol: the threshold is set on test data, for every method alike);
and BaDExpert at its own calibrated tau, which is what a deployment gets.

Scores are cached per model weights, method, settings and test subset under
``~/.cache/badexpert/bench/results/benchmark/``, so a rerun computes only what changed. Outputs:
``results/benchmark.json`` and ``results/benchmark.md`` (table fragments for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from pathlib import Path

import torch

from bench.attacks import ATTACKS, MIN_ASR
from bench.cifar10 import ARCHIVE, CACHE, CLASSES, available, load_cifar10
from defense.score import rejects

RESULTS = CACHE / "bench" / "results"
STATE = RESULTS / "benchmark"
METHODS = ("badexpert", "strip", "scale_up", "ibd_psc")
METHOD_NAMES = {"badexpert": "BaDExpert", "strip": "STRIP", "scale_up": "SCALE-UP", "ibd_psc": "IBD-PSC"}
PAPER_TABLE5_AUROC = {"tact": 97.5, "adaptive_blend": 99.6, "adaptive_patch": 99.2, "badnet_all_to_all": 95.5,
                      "blend_low_opacity": 98.4}


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    from defense.manifest import sha256_of

    return sha256_of(path)


def model_weights_path(attack: str, arch: str, seed: int) -> Path:
    from bench.train_attacked import model_path

    return model_path(attack, arch, seed)


def cached_attacks(arch: str, seed: int) -> list[str]:
    """Registered attacks whose (own or base) model is in the cache."""
    names = []
    for name, cls in ATTACKS.items():
        base = cls.model_attack or name
        if model_weights_path(base, arch, seed).is_file() and model_weights_path(base, arch, seed).with_suffix(".json").is_file():
            names.append(name)
    return names


# ----------------------------------------------------------------------------------------------
# metrics


def detection_summary(clean_scores: torch.Tensor, clean_correct: torch.Tensor, triggered_scores: torch.Tensor,
                      triggered_successful: torch.Tensor, fpr: float = 0.01) -> dict:
    """Scores: higher = more backdoor-like. AUROC, and CA/ASR/FPR/TPR at the 1%-FPR threshold.

    The threshold t is the k-th largest clean score, k = floor(fpr * n). Inputs above t are
    flagged; inputs exactly at t are flagged with the probability that makes the clean flag rate
    k / n (a randomized test), and the rates are its expected values. Without that, a detector
    whose scores tie at the top (IBD-PSC's and SCALE-UP's saturate at their maximum) could only
    be run at 0% or at a far higher FPR than the target.
    """
    from defense.evaluation import auroc

    # defense.evaluation.auroc treats LOW scores as backdoor: negate
    area = auroc(-clean_scores[clean_correct].double(), -triggered_scores[triggered_successful].double())
    clean, triggered = clean_scores.double(), triggered_scores.double()
    ordered = clean.sort(descending=True).values
    k = int(math.floor(fpr * len(ordered)))
    threshold = float(ordered[min(k, len(ordered) - 1)])
    above, tied = int((clean > threshold).sum()), int((clean == threshold).sum())
    tie_probability = min(max((k - above) / tied, 0.0), 1.0) if tied else 0.0
    clean_flag = (clean > threshold).double() + tie_probability * (clean == threshold).double()
    triggered_flag = (triggered > threshold).double() + tie_probability * (triggered == threshold).double()
    return {"auroc": area, **_operating_point(clean_flag, clean_correct, triggered_flag, triggered_successful),
            "threshold": threshold, "tie_probability": tie_probability}


def _operating_point(clean_flag, clean_correct, triggered_flag, triggered_successful) -> dict:
    """Rates from per-input flag probabilities (0/1 for a plain threshold)."""
    clean_flag, triggered_flag = clean_flag.double(), triggered_flag.double()
    n_triggered = max(len(triggered_flag), 1)
    return {
        "fpr": float(clean_flag.mean()),
        "tpr": float(triggered_flag[triggered_successful].mean()) if triggered_successful.any() else float("nan"),
        "clean_accuracy": float((clean_correct.double() * (1 - clean_flag)).mean()),
        "asr": float((triggered_successful.double() * (1 - triggered_flag)).sum()) / n_triggered,
    }


# ----------------------------------------------------------------------------------------------
# evaluation data


def evaluation_indices(test_labels: torch.Tensor, attack, eval_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean indices, triggered indices): seeded subsets of the test set; triggered ones all count."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randperm(len(test_labels), generator=generator)[:eval_size].sort().values
    counted = attack.counted(test_labels).nonzero().flatten()
    triggered = counted[torch.randperm(len(counted), generator=generator)[:eval_size]].sort().values
    return clean, triggered


def bundle_matches(bundle: Path, weights: Path, build_args: list[str], result_file: Path) -> bool:
    """True when ``bundle`` was built from exactly these weights with these extra build flags."""
    from safetensors.torch import load_file

    from defense.bundle import read_manifest

    manifest_path = bundle / "manifest.json"
    if not manifest_path.is_file() or not result_file.is_file():
        return False
    try:
        manifest = read_manifest(bundle)
        built = load_file(str(bundle / manifest.files["model"].path))
        original = load_file(str(weights))
        recorded = json.loads(result_file.read_text())
    except Exception:
        return False
    if recorded.get("build_args") != build_args or set(built) != set(original):
        return False
    return all(torch.equal(built[key], original[key]) for key in built)


class ScoreCache:
    """Per-method score tensors on disk, keyed by everything that determines them."""

    def __init__(self, folder: Path):
        self.folder = folder

    def get_or_compute(self, method: str, key: dict, compute):
        path = self.folder / f"{method}-{_digest(key)}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True), True
        started = time.monotonic()
        value = compute()
        value["seconds"] = torch.tensor(time.monotonic() - started)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(value, path)
        return value, False


# ----------------------------------------------------------------------------------------------
# one attack


def evaluate_attack(name: str, args, data: dict, log=print) -> dict | None:
    from bench.baselines import IbdPsc, ScaleUp, batchnorm_layers, strip_scores
    from bench.detection import run_attack
    from bench.train_attacked import PREPROCESSING, train_backdoored
    from defense.bundle import load_bundle
    from defense.data import load_image_folder
    from defense.finetune import predict_logits

    attack = ATTACKS[name]()
    base = type(attack).model_attack or name
    weights = model_weights_path(base, args.arch, args.seed)
    if not weights.is_file() or not weights.with_suffix(".json").is_file():
        log(f"{name}: no cached model at {weights}; train it with python -m bench.train_attacked --attack {base}")
        return None
    model, model_info = train_backdoored(base, args.arch, seed=args.seed)  # loads the cached weights
    weights_sha = file_sha256(weights)
    normalizer = PREPROCESSING.normalizer()
    device = args.device
    test_images, test_labels = data["test_images"], data["test_labels"]

    # the attacked model itself, on the whole test set
    cache = ScoreCache(STATE / "scores" / f"{name}_{args.arch}_seed{args.seed}")
    counted_all = attack.counted(test_labels)
    full, _ = cache.get_or_compute("model_full_test", {"weights": weights_sha, "attack_settings": vars(attack)}, lambda: {
        "clean": predict_logits(model, test_images, normalizer, device).argmax(1),
        "triggered": predict_logits(model, attack.apply(test_images[counted_all]), normalizer, device).argmax(1)})
    full_clean, full_triggered = full["clean"], full["triggered"]
    model_summary = {
        "clean_accuracy": float((full_clean == test_labels).float().mean()),
        "asr": float((full_triggered == attack.targets(test_labels[counted_all])).float().mean()),
        "n_triggered": int(counted_all.sum()),
        "poisoned_samples": model_info.get("poisoned_samples"), "poison_rate": model_info.get("poison_rate"),
        "epochs": model_info.get("epochs"), "train_seconds": model_info.get("train_seconds"),
        "weights_sha256": weights_sha,
    }
    counts = model_summary["asr"] >= MIN_ASR
    log(f"{name}: model CA {model_summary['clean_accuracy']:.4f}, ASR {model_summary['asr']:.4f}"
        + ("" if counts else f"  (ASR < {MIN_ASR:.0%}: reported, but does not count)"))

    # BaDExpert's bundle: reuse when built from these weights with these settings
    tag = f"{base}_{args.arch}_seed{args.seed}_n{args.reserved}"
    bundle = CACHE / "bench" / "bundles" / tag
    detection_result = RESULTS / f"{tag}.json"
    if bundle_matches(bundle, weights, args.build_args, detection_result):
        log(f"  bundle {bundle} is up to date")
    else:
        log(f"  building the guard: badexpert build on {args.reserved} reserved images ...")
        run_attack(base, args.arch, args.reserved, args.seed, args.build_args, device=device)
    guard, manifest = load_bundle(bundle, device)
    build_record = json.loads(detection_result.read_text()) if detection_result.is_file() else {}

    # the defender's reserved images: exactly the folder the bundle was built from
    reserved = load_image_folder(CACHE / "bench" / "reserved" / f"seed{args.seed}_n{args.reserved}", PREPROCESSING,
                                 CLASSES, progress=False)
    reserved_images, reserved_labels = reserved.images, reserved.labels
    clean_index, triggered_index = evaluation_indices(test_labels, attack, args.eval_size, args.eval_seed)
    clean_images, clean_labels = test_images[clean_index], test_labels[clean_index]
    triggered_images = attack.apply(test_images[triggered_index])
    triggered_targets = attack.targets(test_labels[triggered_index])

    common = {"weights": weights_sha, "attack": name, "attack_settings": vars(attack), "eval_size": args.eval_size,
              "eval_seed": args.eval_seed, "reserved": args.reserved,
              "reserved_sha256": hashlib.sha256(reserved_images.numpy().tobytes()).hexdigest()}
    predictions, _ = cache.get_or_compute("predictions", common, lambda: {
        "clean": predict_logits(model, clean_images, normalizer, device).argmax(1),
        "triggered": predict_logits(model, triggered_images, normalizer, device).argmax(1)})
    clean_correct = predictions["clean"] == clean_labels
    triggered_successful = predictions["triggered"] == triggered_targets

    methods: dict[str, dict] = {}
    for method in args.methods:
        if method == "badexpert":
            def compute():
                clean_out, triggered_out = guard.score(clean_images), guard.score(triggered_images)
                return {"clean": -clean_out.score, "triggered": -triggered_out.score,
                        "clean_b": clean_out.expert_agreement, "clean_a": clean_out.auxiliary_agreement,
                        "triggered_b": triggered_out.expert_agreement, "triggered_a": triggered_out.auxiliary_agreement}
            key = {**common, "bundle_id": manifest.bundle_id}
            settings = {"bundle_id": manifest.bundle_id, "tau": guard.rejection_threshold,
                        "unlearn_lr": manifest.backdoor_expert.get("lr"), "finetune_lr": manifest.auxiliary_model.get("lr")}
        elif method == "strip":
            def compute():
                return {"clean": strip_scores(model, clean_images, normalizer, reserved_images, args.strip_overlays,
                                              seed=args.seed, device=device),
                        "triggered": strip_scores(model, triggered_images, normalizer, reserved_images,
                                                  args.strip_overlays, seed=args.seed + 1, device=device)}
            settings = {"overlays": args.strip_overlays, "weights": [1.0, 1.0], "overlay_source": "reserved images"}
            key = {**common, **settings, "version": 1}
        elif method == "scale_up":
            def compute():
                detector = ScaleUp().fit(model, reserved_images, normalizer, len(CLASSES), device)
                return {"clean": detector.scores(model, clean_images, normalizer, device),
                        "triggered": detector.scores(model, triggered_images, normalizer, device)}
            settings = {"factors": [3, 5, 7, 9, 11], "normalization": "per predicted class, reserved images"}
            key = {**common, **settings, "version": 1}
        elif method == "ibd_psc":
            if not batchnorm_layers(model):
                log("  ibd_psc: the model has no BatchNorm layers; skipped")
                continue

            def compute():
                detector = IbdPsc().fit(model, reserved_images, reserved_labels, normalizer, device)
                return {"clean": detector.scores(model, clean_images, normalizer, device),
                        "triggered": detector.scores(model, triggered_images, normalizer, device),
                        "start_k": torch.tensor(detector.start_k), "models": torch.tensor(len(detector.models))}
            settings = {"n": 5, "xi": 0.6, "omega": 1.5, "softmax": "float64"}
            key = {**common, **settings, "version": 2}
        else:
            raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        scores, was_cached = cache.get_or_compute(method, key, compute)
        summary = detection_summary(scores["clean"], clean_correct, scores["triggered"], triggered_successful, args.fpr)
        summary["settings"] = settings
        summary["seconds"] = round(float(scores["seconds"]), 1)
        summary["cached"] = was_cached
        if method == "badexpert":
            tau = guard.rejection_threshold
            summary["at_tau"] = _operating_point(rejects(-scores["clean"], tau), clean_correct,
                                                 rejects(-scores["triggered"], tau), triggered_successful)
        if method == "ibd_psc":
            summary["settings"] = {**settings, "start_k": int(scores["start_k"]), "models": int(scores["models"])}
        methods[method] = summary
        log(f"  {METHOD_NAMES[method]:9s} AUROC {summary['auroc']:.4f}  at FPR {args.fpr:g}: CA {summary['clean_accuracy']:.4f} "
            f"ASR {summary['asr']:.4f} (realized FPR {summary['fpr']:.4f})  {summary['seconds']:.0f} s"
            + (" (cached)" if was_cached else ""))
    result = {
        "attack": name, "model_attack": base, "adaptive": attack.adaptive, "all_to_all": attack.all_to_all,
        "attack_settings": vars(attack), "arch": args.arch, "seed": args.seed, "reserved": args.reserved,
        "reserved_class_counts": torch.bincount(reserved_labels, minlength=len(CLASSES)).tolist(),
        "counts": model_summary["asr"] >= MIN_ASR, "model": model_summary,
        "evaluation": {"n_clean": len(clean_index), "n_clean_correct": int(clean_correct.sum()),
                       "clean_accuracy": float(clean_correct.float().mean()),
                       "asr": float(triggered_successful.float().mean()),
                       "n_triggered": len(triggered_index), "n_triggered_successful": int(triggered_successful.sum()),
                       "eval_seed": args.eval_seed, "fpr_target": args.fpr},
        "badexpert_full_test": build_record.get("guard"),
        "bundle": {"path": str(bundle), "bundle_id": manifest.bundle_id, "tau": guard.rejection_threshold,
                   "build_args": args.build_args, "build_seconds": manifest.build_seconds},
        "methods": methods,
    }
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / f"{name}_{args.arch}_seed{args.seed}_n{args.reserved}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def export_test_folders(name: str, data: dict, arch: str, seed: int, reserved: int = 2000) -> str:
    """The CIFAR-10 test set as PNG folders for ``badexpert evaluate``; returns the command to run.

    Clean: all 10,000 test images by class. Triggered: the test images whose source class counts
    for the attack, with its test-time trigger, by source class. Written once, under the cache.
    """
    from bench.detection import write_reserved_folder

    attack = ATTACKS[name]()
    root = CACHE / "bench" / "eval"
    clean = write_reserved_folder(data["test_images"], data["test_labels"], root / "clean")
    counted = attack.counted(data["test_labels"])
    triggered = write_reserved_folder(attack.apply(data["test_images"][counted]), data["test_labels"][counted],
                                      root / f"{name}_triggered")
    base = type(attack).model_attack or name
    bundle = CACHE / "bench" / "bundles" / f"{base}_{arch}_seed{seed}_n{reserved}"
    target = "" if attack.all_to_all else f" --target-class {CLASSES[attack.target_class]}"
    return (f"badexpert evaluate {bundle} --clean {clean} --triggered {triggered}{target} "
            f"--report {CACHE / 'bench' / 'reports' / name}")


# ----------------------------------------------------------------------------------------------
# tables


def _pct(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def markdown_tables(results: list[dict], methods: list[str], fpr: float) -> str:
    standard = [r for r in results if not r["adaptive"]]
    adaptive = [r for r in results if r["adaptive"]]
    lines = []

    def auroc_table(rows: list[dict], title: str, paper: dict | None = None):
        header = "| attack | model CA | model ASR | " + " | ".join(METHOD_NAMES[m] for m in methods)
        header += " | paper BaDExpert |" if paper else " |"
        lines.extend([f"#### {title}", "", header, "|" + "---|" * (3 + len(methods) + (1 if paper else 0))])
        sums = {m: [] for m in methods}
        for r in rows:
            cells = []
            for m in methods:
                value = r["methods"].get(m, {}).get("auroc")
                cells.append(_pct(value))
                if r["counts"] and value is not None:
                    sums[m].append(value)
            name = r["attack"] + ("" if r["counts"] else " (ASR < 80%, not counted)")
            row = f"| {name} | {_pct(r['model']['clean_accuracy'])} | {_pct(r['model']['asr'])} | " + " | ".join(cells)
            row += f" | {paper.get(r['attack'], 'n/a')} |" if paper else " |"
            lines.append(row)
        if rows:
            means = [_pct(sum(v) / len(v)) if v else "n/a" for v in sums.values()]
            lines.append("| **mean (counted)** | | | " + " | ".join(f"**{m}**" for m in means) + (" | |" if paper else " |"))
        lines.append("")

    auroc_table(standard, "AUROC (%) per attack (paper Table 2 layout)")
    if adaptive:
        auroc_table(adaptive, "AUROC (%) against adaptive attacks (paper Table 5)", PAPER_TABLE5_AUROC)

    lines.extend([f"#### CA / ASR (%) at FPR {fpr:g} on the evaluation subset (threshold set on its clean images; "
                  "paper Table 1 protocol)", ""])
    header = "| attack | no defense CA / ASR | " + " | ".join(f"{METHOD_NAMES[m]} CA / ASR (FPR)" for m in methods)
    header += " | BaDExpert at its calibrated tau: CA / ASR (FPR) |"
    lines.extend([header, "|" + "---|" * (3 + len(methods))])
    for r in results:
        cells = []
        for m in methods:
            s = r["methods"].get(m)
            cells.append("n/a" if s is None else f"{_pct(s['clean_accuracy'])} / {_pct(s['asr'])} ({_pct(s['fpr'])})")
        tau = r["methods"].get("badexpert", {}).get("at_tau")
        tau_cell = "n/a" if tau is None else f"{_pct(tau['clean_accuracy'])} / {_pct(tau['asr'])} ({_pct(tau['fpr'])})"
        lines.append(f"| {r['attack']} | {_pct(r['evaluation']['clean_accuracy'])} / {_pct(r['evaluation']['asr'])} | "
                     + " | ".join(cells) + f" | {tau_cell} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", choices=sorted(ATTACKS),
                        help="default: every registered attack whose model is cached")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--arch", default="cifar_resnet_compact")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reserved", type=int, default=2000, help="reserved clean images (default %(default)s)")
    parser.add_argument("--eval-size", type=int, default=1000,
                        help="clean test images, and triggered ones, scored by every method (default %(default)s)")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--fpr", type=float, default=0.01, help="operating point of Table 1 (default %(default)s)")
    parser.add_argument("--strip-overlays", type=int, default=64, help="STRIP superimpositions per input (default %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--export-folders", action="store_true",
                        help="also write the test images (clean, and triggered by source class) as PNG folders under "
                             "the cache and print the 'badexpert evaluate' command for each attack")
    parser.add_argument("build_args", nargs=argparse.REMAINDER, help="extra 'badexpert build' flags after --")
    args = parser.parse_args(argv)
    args.build_args = [a for a in args.build_args if a != "--"]
    if args.threads:
        torch.set_num_threads(args.threads)
    if not available():
        print(f"CIFAR-10 not found at {ARCHIVE} (nor decoded in the cache; set BADEXPERT_DATA): skipping the benchmark")
        return 0
    names = args.attacks or cached_attacks(args.arch, args.seed)
    if not names:
        print("no attacked model in the cache; train one with python -m bench.train_attacked --attack badnet")
        return 0
    started = time.monotonic()
    data = load_cifar10()
    results = [r for r in (evaluate_attack(name, args, data) for name in names) if r is not None]
    if args.export_folders:
        for result in results:
            print("evaluate with:", export_test_folders(result["attack"], data, args.arch, args.seed, args.reserved))
    if not results:
        return 0
    summary = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
                    "device": args.device, "torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items()},
        "seconds": round(time.monotonic() - started, 1),
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "benchmark.json").write_text(json.dumps(summary, indent=2) + "\n")
    tables = markdown_tables(results, [m for m in METHODS if m in args.methods], args.fpr)
    (RESULTS / "benchmark.md").write_text(tables)
    print()
    print(tables)
    print(f"results: {RESULTS / 'benchmark.json'} and {RESULTS / 'benchmark.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
