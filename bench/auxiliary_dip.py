"""Does the auxiliary's early accuracy dip tell when it kept the backdoor? (the build's warning)

    python -m bench.auxiliary_dip --arch cifar_mobilenet_v2_compact --attacks badnet blend wanet
    python -m bench.auxiliary_dip --table        # every measured row, then the warning's hits and misses

For each cached bench model (``bench.train_attacked``) and each reserved size (200, 400, 1,000 and
2,000 of the 2,000 reserved training images, the same seeded subsets as ``bench.detection``), the
auxiliary model is made exactly as ``badexpert build`` makes it with its defaults: the same
stratified split (D_fit / D_select / D_cal), the same learning-rate search. Recorded: the chosen
rate and each epoch's D_select accuracy, from which the table recomputes the early dip (the share
of M's D_select accuracy the auxiliary lost at its lowest before the first milestone) and whether
the build warns (the build's bar, or ``--min-early-dip``); then, on 2,000 evaluation test images,
the share of triggered non-target inputs that M and the auxiliary send to the target. The auxiliary *kept*
the backdoor when it sends at least half as many there as M does: then the guard cannot separate
them (BENCHMARKS.md, reserved-set size). The expert and the threshold play no part here.
"""

from __future__ import annotations

import json

import torch

from bench.attacks import ATTACKS
from bench.cifar10 import CACHE, attacks_with_data, reserved_split
from bench.operating_point import bench_parser, split_test_set
from bench.train_attacked import train_backdoored
from defense.build import BuildConfig, stratified_split
from defense.rates import choose_finetuning_rate, early_dip
from defense.data import ImageSet
from defense.finetune import accuracy, predict_logits
from defense.preprocessing import Preprocessing

ROOT = CACHE / "bench" / "auxiliary_dip"
RESERVED_SIZES = (200, 400, 1000, 2000)
N_EVAL = 2000
KEPT_RATIO = 0.5  # the auxiliary's ASR over M's at or above this: the backdoor was kept


def reserved_subset(data: dict, n_reserved: int, seed: int) -> ImageSet:
    """The defender's first ``n_reserved`` reserved images, in bench.detection's seeded order."""
    _, reserved_index = reserved_split(len(data["train_labels"]), seed=seed)
    shuffled = reserved_index[torch.randperm(len(reserved_index), generator=torch.Generator().manual_seed(seed))]
    index = shuffled[:n_reserved].sort().values
    return ImageSet(data["train_images"][index], data["train_labels"][index], [], [None] * len(index))


def target_rate(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits.argmax(1) == targets).float().mean())


def measure(name: str, arch: str, seed: int, n_reserved: int, data: dict, device: str) -> dict:
    attack = ATTACKS[name]()
    model, model_info = train_backdoored(attack.model_attack or name, arch, seed=seed, device=device)
    model = model.float().eval()
    config = BuildConfig(seed=seed, device=device, progress=False)
    normalizer = Preprocessing.from_preset("cifar").normalizer()
    reserved = reserved_subset(data, n_reserved, seed)
    fit_index, select_index, _ = stratified_split(reserved.labels, (config.selection_fraction,
                                                                     config.calibration_fraction), seed)
    fit, select = reserved.subset(fit_index), reserved.subset(select_index)
    model_accuracy = accuracy(predict_logits(model, select.images, normalizer, device), select.labels)
    auxiliary, record = choose_finetuning_rate(model, fit, select.images, select.labels, normalizer, model_accuracy,
                                               config, log=lambda line: None)

    _, eval_index = split_test_set(len(data["test_labels"]), seed)
    images, labels = data["test_images"][eval_index][:N_EVAL], data["test_labels"][eval_index][:N_EVAL]
    counted = attack.counted(labels)
    triggered, targets = attack.apply(images[counted]), attack.targets(labels[counted])
    model_asr = target_rate(predict_logits(model, triggered, normalizer, device), targets)
    auxiliary_asr = target_rate(predict_logits(auxiliary, triggered, normalizer, device), targets)
    return {"attack": name, "arch": arch, "seed": seed, "n_reserved": n_reserved, "model_epochs": model_info["epochs"],
            "n_fit": len(fit), "n_select": len(select), "model_select_accuracy": model_accuracy,
            "finetune_lr": record["lr"], "goal_accuracy": record["goal_accuracy"], "search": record["search"],
            "auxiliary_clean_accuracy": accuracy(predict_logits(auxiliary, images, normalizer, device), labels),
            "model_asr": model_asr, "auxiliary_asr": auxiliary_asr,
            "kept": auxiliary_asr >= KEPT_RATIO * model_asr}


def assess(row: dict, min_early_dip: float = BuildConfig.min_early_dip) -> dict:
    """The build's verdict on a measured auxiliary under the current rule, recomputed from the
    recorded per-epoch D_select accuracies (so the bar can move without finetuning again)."""
    chosen = next(entry for entry in row["search"] if entry["lr"] == row["finetune_lr"] and "diverged" not in entry)
    dip = early_dip(row["model_select_accuracy"], chosen["accuracy_by_epoch"], BuildConfig.finetune_milestones)
    missed_goal = chosen["calibration_accuracy"] < row["goal_accuracy"]
    return {**row, "early_dip": dip, "warned": missed_goal or dip < min_early_dip}


def table(rows: list[dict], min_early_dip: float = BuildConfig.min_early_dip) -> list[str]:
    rows = [assess(row, min_early_dip) for row in rows]
    lines = ["| arch | attack | seed | reserved | lr | early dip | warned | M ASR | auxiliary ASR | kept |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["arch"], r["attack"], r["seed"], r["n_reserved"])):
        lines.append(f"| {row['arch']} | {row['attack']} | {row['seed']} | {row['n_reserved']} | {row['finetune_lr']:g} | "
                     f"{row['early_dip']:+.3f} | {'yes' if row['warned'] else 'no'} | {100 * row['model_asr']:.1f} | "
                     f"{100 * row['auxiliary_asr']:.1f} | {'yes' if row['kept'] else 'no'} |")
    lines.append("")
    for size in sorted({r["n_reserved"] for r in rows}):
        lines.append(f"- {size} reserved images: " + summary([r for r in rows if r["n_reserved"] == size]))
    return lines + ["", "All: " + summary(rows)]


def summary(rows: list[dict]) -> str:
    hits = sum(r["warned"] and r["kept"] for r in rows)
    false_alarms = sum(r["warned"] and not r["kept"] for r in rows)
    missed = sum(r["kept"] and not r["warned"] for r in rows)
    return (f"{len(rows)} auxiliaries, {sum(r['kept'] for r in rows)} kept the backdoor; the warning fired on {hits} "
            f"of those, missed {missed}, and fired on {false_alarms} that did not keep it.")


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--reserved", type=int, nargs="+", default=list(RESERVED_SIZES), help="reserved set sizes")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of every measured row")
    parser.add_argument("--min-early-dip", type=float, default=BuildConfig.min_early_dip,
                        help="--table: the warning's bar to assess the rows with (default: the build's, %(default)s)")
    args = parser.parse_args()
    if args.table:
        print("\n".join(table([json.loads(path.read_text()) for path in sorted(ROOT.glob("*.json"))], args.min_early_dip)))
        return
    ROOT.mkdir(parents=True, exist_ok=True)
    for name, data in attacks_with_data(args.attacks):
        for n_reserved in args.reserved:
            path = ROOT / f"{name}_{args.arch}_seed{args.seed}_n{n_reserved}.json"
            if path.is_file():
                continue  # measured in an earlier run
            row = measure(name, args.arch, args.seed, n_reserved, data, args.device)
            path.write_text(json.dumps(row, indent=2))
            row = assess(row)
            print(f"{name} {args.arch} seed {args.seed} n {n_reserved}: lr {row['finetune_lr']:g}, early dip "
                  f"{row['early_dip']:+.3f}, M ASR {row['model_asr']:.3f}, auxiliary ASR {row['auxiliary_asr']:.3f}"
                  f"{' (warned)' if row['warned'] else ''}", flush=True)


if __name__ == "__main__":
    main()
