"""Markdown tables from the result files that ``bench.detection`` wrote (nothing is computed here).

    python -m bench.summary                 # every result under ~/.cache/badexpert/bench/results/

Three tables, each on the full CIFAR-10 test set (10,000 clean images, the triggered non-target
ones) at the tau the bundle calibrated on its own D_cal, which is what a deployment gets:

1. the labeled guard per attack (default build settings, 2,000 reserved images);
2. labeled vs. label-free guards, per attack, for every tag whose name starts with ``_label_free``;
3. the reserved-set-size ablation (every size other than 2,000 found for an attack).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from bench.attacks import ATTACKS, MIN_ASR
from bench.cifar10 import CACHE

RESULTS = CACHE / "bench" / "results"
NAME = re.compile(r"^(?P<attack>[a-z0-9_]+?)_(?P<arch>cifar_[a-z0-9_]+)_seed(?P<seed>\d+)_n(?P<n>\d+)(?P<tag>_.*)?\.json$")


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def load_results(folder: Path = RESULTS) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.json")):
        match = NAME.match(path.name)
        if not match or match["attack"] not in ATTACKS:
            continue
        record = json.loads(path.read_text())
        rows.append({**match.groupdict(), "n": int(match["n"]), "tag": match["tag"] or "", "record": record})
    return rows


def _order(rows: list[dict]) -> list[dict]:
    names = list(ATTACKS)
    return sorted(rows, key=lambda r: (ATTACKS[r["attack"]].adaptive, names.index(r["attack"]), r["n"], r["tag"]))


def counts(guard: dict) -> bool:
    """An attack counts when its backdoor works: ASR without the guard at least MIN_ASR."""
    return guard["asr_without_guard"] >= MIN_ASR


def guard_table(rows: list[dict]) -> list[str]:
    lines = ["| attack | epochs | model CA | model ASR | AUROC | CA with guard | ASR with guard | TPR at tau | test FPR | "
             "expert CA / ASR | auxiliary CA / ASR | unlearn lr | finetune lr |",
             "|" + "---|" * 13]
    means: dict[str, list[float]] = {"standard": [], "adaptive": []}
    for r in _order([r for r in rows if r["n"] == 2000 and not r["tag"]]):
        model, guard = r["record"]["model"], r["record"]["guard"]
        kind = "adaptive" if ATTACKS[r["attack"]].adaptive else "standard"
        name = r["attack"] + (" (adaptive)" if kind == "adaptive" else "") + ("" if counts(guard) else " (not counted)")
        if counts(guard):
            means[kind].append(100 * guard["auroc"])
        lines.append(
            f"| {name} | {model.get('epochs')} | {_pct(guard['clean_accuracy_without_guard'])} | "
            f"{_pct(guard['asr_without_guard'])} | "
            f"{100 * guard['auroc']:.2f} | {_pct(guard['clean_accuracy_with_guard'])} | {_pct(guard['asr_with_guard'])} | "
            f"{_pct(guard['tpr'])} | {100 * guard['fpr']:.2f} | "
            f"{_pct(guard['expert_clean_accuracy'])} / {_pct(guard['expert_asr'])} | "
            f"{_pct(guard['auxiliary_clean_accuracy'])} / {_pct(guard['auxiliary_asr'])} | "
            f"{guard['unlearn_lr']:g} | {guard['finetune_lr']:g} |")
    for kind, values in means.items():
        if values:
            lines.append(f"| **mean AUROC, {len(values)} counted {kind}** | | | | **{sum(values) / len(values):.2f}** |"
                         + " |" * 8)
    return lines


def label_free_table(rows: list[dict]) -> list[str]:
    labeled = {r["attack"]: r["record"]["guard"] for r in rows if r["n"] == 2000 and not r["tag"]}
    lines = ["| attack | variant | AUROC labeled | AUROC label-free | difference (points) | label-free ASR with guard | "
             "label-free auxiliary CA / ASR |", "|" + "---|" * 7]
    differences: dict[str, list[float]] = {}
    for r in _order([r for r in rows if r["n"] == 2000 and r["tag"].startswith("_label_free")]):
        if r["attack"] not in labeled or not counts(labeled[r["attack"]]):
            continue
        free, base = r["record"]["guard"], labeled[r["attack"]]
        difference = 100 * (free["auroc"] - base["auroc"])
        differences.setdefault(r["tag"], []).append(difference)
        lines.append(f"| {r['attack']} | {r['tag'].removeprefix('_label_free_')} | {100 * base['auroc']:.2f} | "
                     f"{100 * free['auroc']:.2f} | {difference:+.2f} | {_pct(free['asr_with_guard'])} | "
                     f"{_pct(free['auxiliary_clean_accuracy'])} / {_pct(free['auxiliary_asr'])} |")
    for tag, values in differences.items():
        lines.append(f"| **mean** | {tag.removeprefix('_label_free_')} | | | **{sum(values) / len(values):+.2f}** | | |")
    return lines


def ablation_table(rows: list[dict]) -> list[str]:
    attacks = {r["attack"] for r in rows if r["n"] != 2000 and not r["tag"]}
    lines = ["| attack | reserved images | D_fit / D_cal | AUROC | CA with guard | ASR with guard | test FPR | threshold |",
             "|" + "---|" * 8]
    for r in _order([r for r in rows if r["attack"] in attacks and not r["tag"]]):
        guard = r["record"]["guard"]
        calibration = guard.get("calibration") or {}
        lines.append(f"| {r['attack']} | {r['n']} | {calibration.get('n_finetune')} / {calibration.get('n')} | "
                     f"{100 * guard['auroc']:.2f} | {_pct(guard['clean_accuracy_with_guard'])} | "
                     f"{_pct(guard['asr_with_guard'])} | {100 * guard['fpr']:.2f} | k = {calibration.get('k')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of bench.detection's JSON files")
    args = parser.parse_args(argv)
    rows = load_results(args.results)
    if not rows:
        print(f"no results in {args.results}; run python -m bench.detection first")
        return 0
    for title, table in (("Labeled guard at its calibrated tau (full test set)", guard_table(rows)),
                         ("Labeled vs. label-free", label_free_table(rows)),
                         ("Reserved-set size", ablation_table(rows))):
        print(f"#### {title}\n")
        print("\n".join(table))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
