"""The canary self-test, measured: does the canary's figure predict the real attack's, and does
choosing the unlearning rate and the auxiliary's recipe by the canary (``--self-test choose``) beat
the accuracy rule and the plain recipe?

    python -m bench.self_test --attacks badnet blend wanet                        # compact ResNet
    python -m bench.self_test --attacks badnet blend --arch cifar_lenet
    python -m bench.self_test --attacks wanet --arch cifar_vgg11_bn_compact --canaries warp   # another canary set
    python -m bench.self_test --table                                             # Markdown from the JSONs

For each attack's cached model (bench.train_attacked) one build with ``--self-test choose`` (canary
seed = build seed, so the figures reproduce) on the 2,000 reserved training images, with the build's
other defaults. Its ``self_test.candidates`` hold the canary's figures at the accuracy rule's rate
and its neighbours, its ``recipe_candidates`` each auxiliary recipe's. The real attack is measured
on the 5,000 evaluation images at the build's own tau: for the chosen guard, and, when the canary
chose another rate or recipe, for a ``--self-test off`` build (today's guard: the rule's rate, the
plain recipe). Results are cached under
``$BADEXPERT_CACHE/bench/self_test`` keyed by the model file's sha256, the attack's settings, the
build's settings, the canary's and the self-test's constants and the recipes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path

from scipy.stats import rankdata, spearmanr

from bench.attacks import ATTACKS, MIN_ASR
from bench.cifar10 import CACHE, CLASSES, attacks_with_data, reserved_split
from bench.results import newest_per_guard
from bench.feature_signal import add_guard_arguments, key_of, sha256_file
from bench.operating_point import split_test_set
from bench.train_attacked import PREPROCESSING, recipe_attack_kwargs, recipe_epochs, train_backdoored, trained_model_path
from defense import auxiliary_recipes
from defense import canary as canary_constants
from defense.canary import CANARY_KINDS, DEFAULT_CANARY_KINDS
from defense import self_test as self_test_constants
from defense.build import BuildConfig, build_guard
from defense.data import ImageSet
from defense.evaluation import detection_metrics

ROOT = CACHE / "bench" / "self_test"
BAR = 0.99  # the table's flag: a canary AUROC below this
BARS = (0.95, 0.97, 0.98, 0.99)  # the bars the table also counts flags at
LEAKY = 0.10  # a guard "really lets triggered inputs through" above this ASR at tau




def constants(module) -> dict:
    return {name: getattr(module, name) for name in dir(module) if name.isupper()}


def real_figures(guard, test_images, test_labels, attack) -> dict:
    """The real attack at the guard's tau on the evaluation images: AUROC, ASR with and without, FPR."""
    counted = attack.counted(test_labels)
    sources = test_labels[counted]
    clean, triggered = guard.score(test_images), guard.score(attack.apply(test_images[counted]))
    metrics = detection_metrics(guard.rejection_threshold, clean.score, clean.label, test_labels, triggered.score,
                                triggered.label, sources, attack.targets(sources))
    return {"auroc": metrics.auroc, "asr_with_guard": metrics.asr_with_guard, "fpr": metrics.fpr,
            "asr_without_guard": metrics.asr_without_guard, "tau": guard.rejection_threshold}


def kinds_suffix(kinds: tuple[str, ...], canary_seed: int | None = None, build_seed: int | None = None) -> str:
    """The result file's mark of a canary set other than the build's default, and of a canary seed
    other than the build seed ("" for the defaults)."""
    mark = "" if tuple(kinds) == DEFAULT_CANARY_KINDS else "_canaries-" + "-".join(kinds)
    return mark + ("" if canary_seed is None or canary_seed == build_seed else f"_canary{canary_seed}")


def run(attack_name: str, data: dict, arch: str, model_seed: int, build_seed: int,
        canary_kinds: tuple[str, ...] = DEFAULT_CANARY_KINDS, canary_seed: int | None = None) -> Path:
    canary_seed = build_seed if canary_seed is None else canary_seed
    attack = ATTACKS[attack_name]()
    model_name = attack.model_attack or attack_name
    attack_settings = json.loads(json.dumps(dataclasses.asdict(ATTACKS[model_name](**recipe_attack_kwargs(arch, model_name)))))
    model, info = train_backdoored(model_name, arch, seed=model_seed)
    weights = trained_model_path(info)
    config = BuildConfig(seed=build_seed, self_test="choose", canary_seed=canary_seed, canary_kinds=tuple(canary_kinds),
                         progress=False)
    key = key_of(sha256_file(weights), attack_settings, dataclasses.asdict(config), arch,
                 constants(canary_constants), constants(self_test_constants), constants(auxiliary_recipes))
    out = ROOT / "results" / f"{attack_name}_{arch}_seed{model_seed}_build{build_seed}{kinds_suffix(canary_kinds, canary_seed, build_seed)}_{key}.json"
    if out.is_file():
        return out
    _, reserved = reserved_split(len(data["train_labels"]), seed=model_seed)
    images, labels = data["train_images"][reserved], data["train_labels"][reserved]
    clean = ImageSet(images, labels, CLASSES, [Path(f"reserved/{i:05d}.png") for i in range(len(labels))])
    _, evaluation = split_test_set(len(data["test_labels"]), seed=model_seed)
    test_images, test_labels = data["test_images"][evaluation], data["test_labels"][evaluation]
    # CPU seconds: with OMP_NUM_THREADS=1, the build's time on a quiet core (wall time counts pauses)
    cpu = time.process_time()
    chosen = build_guard(model, clean, PREPROCESSING, 10, config, log=lambda *_: None)
    cpu_choose = time.process_time() - cpu
    fields = chosen.manifest_fields
    self_test = fields["self_test"]
    guards = {"choose": {"unlearning_lr": self_test["chosen_lr"], "auxiliary_recipe": self_test["chosen_recipe"],
                         "build_seconds": fields["build_seconds"],
                         "cpu_seconds": cpu_choose,
                         **real_figures(chosen.guard, test_images, test_labels, attack)}}
    if (self_test["chosen_lr"], self_test["chosen_recipe"]) == (self_test["rule_lr"], self_test["rule_recipe"]):
        share = self_test["seconds"] / fields["build_seconds"]  # the self-test's share of the wall time, for both
        guards["rule"] = {**guards["choose"], "build_seconds": fields["build_seconds"] - self_test["seconds"],
                          "cpu_seconds": cpu_choose * (1 - share), "cpu_estimated": True}
    else:
        cpu = time.process_time()
        today = build_guard(model, clean, PREPROCESSING, 10, dataclasses.replace(config, self_test="off"),
                            log=lambda *_: None)
        guards["rule"] = {"unlearning_lr": self_test["rule_lr"], "auxiliary_recipe": self_test["rule_recipe"],
                          "build_seconds": today.manifest_fields["build_seconds"],
                          "cpu_seconds": time.process_time() - cpu,
                          **real_figures(today.guard, test_images, test_labels, attack)}
    result = {"attack": attack_name, "arch": arch, "model_seed": model_seed, "build_seed": build_seed, "key": key,
              "canary_kinds": list(canary_kinds), "canary_seed": canary_seed,
              "model_clean_accuracy": info["clean_accuracy"], "model_epochs": info["epochs"], "model_asr": guards["rule"]["asr_without_guard"],
              "counted": guards["rule"]["asr_without_guard"] >= MIN_ASR, "guards": guards,
              "self_test": {k: v for k, v in self_test.items() if k != "promise"},
              "auxiliary_lr": fields["auxiliary_model"]["lr"], "self_test_seconds": self_test["seconds"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank (scipy's rankdata)."""
    return [float(r) for r in rankdata(values)]


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (scipy's; NaN when either side is constant)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input: scipy warns and returns NaN, as documented
        return float(spearmanr(x, y).statistic)


def candidate_at(result: dict, lr: float) -> dict:
    return next(c for c in result["self_test"]["candidates"] if c["lr"] == lr)


def cost_cell(result: dict) -> str:
    """CPU seconds of today's build (off), of report (estimated: off plus the implant, the copy's
    auxiliary and one candidate, at their share of the choose build's wall time) and of choose."""
    rule, chosen, st = result["guards"]["rule"], result["guards"]["choose"], result["self_test"]
    if "cpu_seconds" not in chosen:
        return "n/a (no CPU time recorded)"
    at_rule = candidate_at(result, st["rule_lr"])
    share = (st["copy"]["seconds"] + st["auxiliary_seconds"] + at_rule["seconds"]) / chosen["build_seconds"]
    report = rule["cpu_seconds"] + share * chosen["cpu_seconds"]
    return f"{rule['cpu_seconds']:.0f} / {report:.0f} / {chosen['cpu_seconds']:.0f}"


def result_kinds(result: dict) -> tuple[str, ...]:
    return tuple(result.get("canary_kinds", DEFAULT_CANARY_KINDS))  # results before canary kinds: the default


def guard_of(result: dict) -> tuple:
    """The guard a result measured: (arch, attack, model seed, build seed)."""
    return result["arch"], result["attack"], result["model_seed"], result["build_seed"]


def of_the_recipes_model(result: dict) -> bool:
    """Whether a result measured the architecture's recipe model (a result from before epochs were
    recorded was trained for its attack's train_epochs, the recipe then)."""
    model_name = ATTACKS[result["attack"]].model_attack or result["attack"]
    epochs = result.get("model_epochs", ATTACKS[model_name].train_epochs)
    return epochs == recipe_epochs(result["arch"], model_name)


def canary_seed_of(result: dict) -> int:
    return result.get("canary_seed", result["build_seed"])  # results before canary seeds: the build seed


def latest_results(kinds: tuple[str, ...] = DEFAULT_CANARY_KINDS, other_canary_seeds: bool = False) -> list[dict]:
    """One result per guard (arch, attack, model seed, build seed) with the canaries ``kinds``: the
    newest file, whatever its key; drawn from the build seed (the tables' rows), or with
    ``other_canary_seeds`` one per guard and other canary seed. Only the recipe's models: a result
    on a model trained otherwise (an older recipe's) stays on disk, out of the tables."""
    def guard(result: dict) -> tuple | None:
        wanted = of_the_recipes_model(result) and result_kinds(result) == tuple(kinds) and \
            (canary_seed_of(result) != result["build_seed"]) == other_canary_seeds
        return (*guard_of(result), canary_seed_of(result)) if wanted else None
    return list(newest_per_guard(ROOT / "results", guard).values())


def canary_sets() -> list[tuple[str, ...]]:
    """Every canary set with results: the default first."""
    found = {result_kinds(json.loads(path.read_text())) for path in (ROOT / "results").glob("*.json")}
    return [DEFAULT_CANARY_KINDS] + sorted(found - {DEFAULT_CANARY_KINDS})


def operating_point(guard: dict) -> str:
    """A guard's real attack at its own tau: AUROC / realized FPR / ASR with the guard."""
    return f"{100 * guard['auroc']:.2f} / {guard['fpr']:.2%} / {guard['asr_with_guard']:.1%}"


def chosen_cell(self_test: dict) -> str:
    """The canary's choice: its unlearning rate, and its auxiliary recipe where it measured them."""
    recipe = self_test.get("chosen_recipe")
    return f"{self_test['chosen_lr']:g}" + (f", {recipe}" if recipe else "")


def table(kinds: tuple[str, ...] = DEFAULT_CANARY_KINDS) -> str:
    results = [r for r in latest_results(kinds) if r["counted"]]
    lines = ["| arch | attack | copy: canary ASR / clean acc (M's) | rule lr: canary AUROC / pass | real AUROC / FPR / ASR at tau "
             "| canary's lr, recipe: canary AUROC / pass | real AUROC / FPR / ASR at tau | build CPU s (off / report / choose) |",
             "|---|---|---|---|---|---|---|---|"]
    pairs = []
    for r in results:
        st, rule, chosen = r["self_test"], r["guards"]["rule"], r["guards"]["choose"]
        at_rule = candidate_at(r, st["rule_lr"])
        copy = st["copy"]
        pairs.append((at_rule["auroc"], rule["auroc"], rule["asr_with_guard"]))
        lines.append(
            f"| {r['arch']} | {r['attack']} | {', '.join(f'{a:.0%}' for a in copy['asr_on_selection'])} / "
            f"{copy['clean_accuracy']:.1%} ({copy['model_accuracy']:.1%}) | {st['rule_lr']:g}: {100 * at_rule['auroc']:.2f} / "
            f"{at_rule['pass_rate_at_tau']:.1%} | {operating_point(rule)} | "
            f"{chosen_cell(st)}: {100 * st['auroc']:.2f} / {st['pass_rate_at_tau']:.1%} | "
            f"{operating_point(chosen)} | {cost_cell(r)} |")
    if len(pairs) >= 2:
        rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
        flagged = [p for p in pairs if p[0] < BAR]
        leaky = [p for p in pairs if p[2] > LEAKY]
        lines += ["", f"Spearman rank correlation of canary AUROC (at the rule's rate) and real AUROC over {len(pairs)} "
                      f"guards: {rho:.2f}. Canary AUROC below {BAR}: {len(flagged)} guards, of which "
                      f"{sum(p[2] > LEAKY for p in flagged)} really let more than 10% through; guards that let more "
                      f"than 10% through: {len(leaky)}.", "",
                  "| canary AUROC bar | guards flagged | of them letting more than 10% through | leaky guards missed |",
                  "|---|---|---|---|"]
        for bar in BARS:
            below = [p for p in pairs if p[0] < bar]
            caught = sum(p[2] > LEAKY for p in below)
            lines.append(f"| {bar} | {len(below)} | {caught} | {len(leaky) - caught} |")
    return "\n".join(lines)


def canary_set_table() -> str:
    """Guards measured with more than one canary set: today's guard (the rule) and, per set, the canary's
    choice (rate, recipe) and the real AUROC / ASR at tau of the guard it chose."""
    sets = canary_sets()
    by_set = {kinds: {guard_of(r): r for r in latest_results(kinds)} for kinds in sets}
    guards = sorted(guard for guard in by_set[sets[0]] if sum(guard in by_set[kinds] for kinds in sets) > 1)
    if not guards:
        return ""
    names = [" + ".join(kinds) for kinds in sets]
    lines = ["| arch | attack | seed | rule: real AUROC / FPR / ASR | " + " | ".join(f"{name}: choice, real AUROC / FPR / ASR"
                                                                           for name in names) + " |",
             "|---|---|---|---|" + "---|" * len(sets)]
    for guard in guards:
        rule = by_set[sets[0]][guard]["guards"]["rule"]
        cells = []
        for kinds in sets:
            result = by_set[kinds].get(guard)
            if result is None:
                cells.append("")
                continue
            chosen = result["guards"]["choose"]
            cells.append(f"{chosen_cell(result['self_test'])}, {operating_point(chosen)}")
        lines.append(f"| {guard[0]} | {guard[1]} | {guard[2]}/{guard[3]} | {operating_point(rule)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def canary_seed_table() -> str:
    """Guards measured with canaries from more than one seed (the default set): the canary's figures
    at the rule's rate, and its choice, for each canary seed."""
    first = {guard_of(r): r for r in latest_results()}
    others = [r for r in latest_results(other_canary_seeds=True) if guard_of(r) in first]
    if not others:
        return ""
    lines = ["| arch | attack | seed | canary seed | rule lr: canary AUROC / pass | canary's lr, recipe | real AUROC / FPR / ASR at tau (canary's choice) |",
             "|---|---|---|---|---|---|---|"]
    for other in others:
        guard = guard_of(other)
        for r in (first[guard], other):
            st, chosen = r["self_test"], r["guards"]["choose"]
            at_rule = candidate_at(r, st["rule_lr"])
            lines.append(f"| {guard[0]} | {guard[1]} | {guard[2]}/{guard[3]} | {canary_seed_of(r)} | {st['rule_lr']:g}: "
                         f"{100 * at_rule['auroc']:.2f} / {at_rule['pass_rate_at_tau']:.1%} | {chosen_cell(st)} | "
                         f"{operating_point(chosen)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_guard_arguments(parser)
    parser.add_argument("--canaries", nargs="+", choices=CANARY_KINDS, default=list(DEFAULT_CANARY_KINDS),
                        help="the canary kinds the build implants (default: the build's, %(default)s)")
    parser.add_argument("--canary-seed", type=int, default=None,
                        help="draw the canaries from this seed (default: the build seed, the tables' rows)")
    parser.add_argument("--table", action="store_true",
                        help="print the Markdown tables from the cached results, one per canary set")
    args = parser.parse_args()
    for name, data in attacks_with_data(args.attacks):
        out = run(name, data, args.arch, args.model_seed, args.build_seed, tuple(args.canaries), args.canary_seed)
        print(f"{name}: {out}", flush=True)
    if args.table:
        for kinds in canary_sets():
            print(f"\nCanaries: {', '.join(kinds)}\n")
            print(table(kinds))
        repeated = canary_seed_table()
        if repeated:
            print("\nOther canary seeds (the same guards, canaries drawn anew)\n")
            print(repeated)
        comparison = canary_set_table()
        if comparison:
            print("\nThe canary sets side by side (guards measured with more than one)\n")
            print(comparison)


if __name__ == "__main__":
    main()
