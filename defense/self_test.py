"""The build's self-test (``--self-test report|choose``): the guard procedure run on a copy of M
that carries secret canary backdoors (:mod:`defense.canary`), measured on D_select.

- ``report``: the copy gets its own backdoor expert (the build's unlearning rate) and auxiliary
  model (the build's finetuning rate), and the same signals; the self-test is how well that guard
  separates canary-triggered D_select images from clean ones: AUROC, and the share of
  canary-triggered images that pass (accepted and sent to the canary's target) at a threshold set
  by the build's rule on the copy's clean D_select scores.
- ``choose``: the same for the unlearning rates next to the rule's choice (CHOOSE_NEIGHBOURS each
  side on the grid) whose expert on M still loses at least 1 - CHOOSE_MAX_EXPERT_RATIO of M's
  D_select accuracy; the real expert is trained at the rate whose canary AUROC is best, if it beats
  the rule's by at least CHOOSE_MARGIN. Then, with that expert, the same for the auxiliary's
  finetuning recipes (defense/auxiliary_recipes.py): each recipe's rate search runs on the copy, and
  the real auxiliary is made with the recipe whose canary AUROC is best, by the same margin.

D_cal is not touched, so the threshold of the real guard stays set on images no choice saw.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch
import torch.nn as nn

from defense.auxiliary_recipes import FINETUNE_RECIPES, finetune_recipe
from defense.canary import CANARY_DESCRIPTIONS, DEFAULT_CANARY_KINDS, Canary, draw_canaries, implant_canaries
from defense.data import ImageSet
from defense.evaluation import auroc
from defense.feature_fit import fit_guard_features
from defense.finetune import accuracy, clean_finetune, predict_logits, unlearn
from defense.guard import Guard
from defense.rates import UNLEARN_LR_GRID, all_finite, choose_finetuning_rate
from defense.score import rejects
from defense.threshold import ThresholdError, calibrate_threshold

SELF_TEST_MODES = ("off", "report", "choose")
CHOOSE_NEIGHBOURS = 2  # grid rates each side of the rule's choice that ``choose`` tries
CHOOSE_MAX_EXPERT_RATIO = 0.8  # a candidate's expert on M must fall to at most this share of M's D_select accuracy
CHOOSE_MARGIN = 0.005  # canary AUROC a candidate must gain over the rule's rate to replace it
def promise(kinds=DEFAULT_CANARY_KINDS) -> str:
    """What the self-test's figures say and do not say, naming the canaries implanted."""
    named = [CANARY_DESCRIPTIONS[kind] for kind in kinds]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    return (f"the self-test measures this build's procedure on canary backdoors ({listed}) implanted in a copy of "
            "the model; it does not measure the unknown backdoor in the model, which may behave unlike the canaries")


PROMISE = promise()


def separation(clean_scores: torch.Tensor, clean_correct: torch.Tensor, triggered_scores: torch.Tensor,
               triggered_hit: torch.Tensor, tau: float) -> tuple[float, float]:
    """(AUROC, pass rate): AUROC of correctly classified clean images against triggered images sent to
    the target (the paper's populations); pass rate: the share of all triggered images both sent to
    the target and accepted (score >= tau). NaN pass rate when tau is NaN."""
    area = auroc(clean_scores[clean_correct], triggered_scores[triggered_hit])
    if math.isnan(tau) or len(triggered_scores) == 0:
        return area, math.nan
    passed = triggered_hit & ~rejects(triggered_scores, tau)
    return area, float(passed.float().mean())


def finite_or_none(value):
    """A record's number: NaN (no triggered image reached the target, no sound threshold) as None."""
    return None if isinstance(value, float) and math.isnan(value) else value


def canary_tau(clean_scores: torch.Tensor, config) -> float:
    """The build's threshold rule on the canary guard's clean D_select scores (NaN if no sound one)."""
    try:
        return calibrate_threshold(clean_scores, config.fpr, config.threshold_rule, config.threshold_delta).tau
    except ThresholdError:
        return math.nan


def canary_figures(guard: Guard, canaries: list[Canary], select: ImageSet, config) -> dict:
    """The canary guard's separation on D_select: pooled over the canaries, and for each."""
    clean = guard.score(select.images)
    tau = canary_tau(clean.score, config)
    clean_correct = clean.label == select.labels
    per_canary, pooled_scores, pooled_hits = [], [], []
    for canary in canaries:
        counted = select.labels != canary.target
        triggered = guard.score(canary.apply(select.images[counted]))
        hit = triggered.label == canary.target
        area, passed = separation(clean.score, clean_correct, triggered.score, hit, tau)
        per_canary.append({"kind": canary.kind, "auroc": finite_or_none(area), "pass_rate_at_tau": finite_or_none(passed),
                           "asr_without_guard": float(hit.float().mean())})
        pooled_scores.append(triggered.score)
        pooled_hits.append(hit)
    area, passed = separation(clean.score, clean_correct, torch.cat(pooled_scores), torch.cat(pooled_hits), tau)
    return {"auroc": finite_or_none(area), "pass_rate_at_tau": finite_or_none(passed), "tau": finite_or_none(tau),
            "canaries": per_canary}


def candidate_rates(rule_lr: float, mode: str) -> list[float]:
    """The unlearning rates the self-test measures: the rule's alone (report), or with its grid neighbours (choose)."""
    if mode != "choose" or rule_lr not in UNLEARN_LR_GRID:
        return [rule_lr]
    at = UNLEARN_LR_GRID.index(rule_lr)
    return list(UNLEARN_LR_GRID[max(0, at - CHOOSE_NEIGHBOURS): at + CHOOSE_NEIGHBOURS + 1])


def pick_best(candidates: list[dict], key: str, rule, margin: float = CHOOSE_MARGIN):
    """``candidate[key]`` of the eligible candidate with the best canary AUROC (then the lowest pass
    rate), if it beats the rule's candidate (``candidate[key] == rule``) by at least ``margin``; else ``rule``."""
    baseline = next(c for c in candidates if c[key] == rule)
    eligible = [c for c in candidates if c.get("eligible") and c["auroc"] is not None]
    if not eligible or baseline["auroc"] is None:
        return rule
    best = max(eligible, key=lambda c: (c["auroc"], -(1.0 if c["pass_rate_at_tau"] is None else c["pass_rate_at_tau"])))
    return best[key] if best["auroc"] >= baseline["auroc"] + margin else rule


def pick_rate(candidates: list[dict], rule_lr: float, margin: float = CHOOSE_MARGIN) -> float:
    """The unlearning rate by :func:`pick_best` over candidates keyed by ``lr``."""
    return pick_best(candidates, "lr", rule_lr, margin)


class SelfTestOutcome(NamedTuple):
    """What the self-test hands back to the build: the models it may have replaced, their records, its section."""

    expert: nn.Module
    expert_record: dict
    auxiliary: nn.Module
    auxiliary_record: dict
    section: dict | None


class SelfTest:
    """One build's self-test: the canaried copy and its auxiliary, made once, and the figures of the
    canary guard at each unlearning rate asked for."""

    def __init__(self, model: nn.Module, fit: ImageSet, select: ImageSet, num_classes: int, preprocessing,
                 auxiliary_lr: float, wrong_label_of: torch.Tensor, config, log):
        self.fit, self.select, self.num_classes, self.config, self.log = fit, select, num_classes, config, log
        self.preprocessing, self.normalizer, self.wrong_label_of = preprocessing, preprocessing.normalizer(), wrong_label_of
        height, width = fit.images.shape[-2:]
        self.canaries = draw_canaries(num_classes, height, width, config.canary_seed, tuple(config.canary_kinds))
        log(f"self-test: implanting {len(self.canaries)} canary backdoors in a copy of M")
        started = time.monotonic()
        self.copy, self.implant = implant_canaries(model, self.canaries, fit.images, fit.labels, select.images,
                                                   select.labels, self.normalizer, device=config.device,
                                                   seed=config.seed, progress=config.progress)
        log(f"  canaried copy: canary success on D_select {', '.join(f'{s:.0%}' for s in self.implant['asr_on_selection'])}, "
            f"clean accuracy {self.implant['clean_accuracy']:.3f} (M: {self.implant['model_accuracy']:.3f})")
        self.implant["seconds"] = round(time.monotonic() - started, 2)
        self.auxiliary_lr, started = auxiliary_lr, time.monotonic()
        self.auxiliary = clean_finetune(self.copy, fit.images, fit.labels, self.normalizer, auxiliary_lr,
                                        config.finetune_epochs, config.finetune_batch_size, config.finetune_milestones,
                                        config.finetune_momentum, config.finetune_weight_decay, config.augment,
                                        config.device, config.seed, config.progress,
                                        **finetune_recipe(config.finetune_recipe).finetune_options())
        self.auxiliary_seconds = round(time.monotonic() - started, 2)
        self.copy_experts: dict[float, nn.Module] = {}

    def recipe_auxiliary(self, recipe_name: str, goal: float | None) -> tuple[nn.Module, dict]:
        """The copy's auxiliary by ``recipe_name``, its rate chosen on D_select by the build's own search
        (against the copy's accuracy, which the implant keeps near M's)."""
        return choose_finetuning_rate(self.copy, self.fit, self.select.images, self.select.labels, self.normalizer,
                                      self.implant["clean_accuracy"], self.config, lambda *_: None, goal=goal,
                                      recipe=finetune_recipe(recipe_name))

    def expert(self, model: nn.Module, lr: float) -> nn.Module:
        """``model`` unlearned at ``lr`` exactly as the build's expert is."""
        config = self.config
        return unlearn(model, self.fit.images, self.fit.labels, self.num_classes, self.normalizer, lr,
                       config.unlearn_epochs, config.unlearn_batch_size, config.device, config.seed, config.progress,
                       self.wrong_label_of)

    def figures_at(self, lr: float, auxiliary: nn.Module | None = None) -> dict:
        """The canary guard's figures with its expert unlearned at ``lr`` (and ``auxiliary``, default
        the copy's auxiliary at the build's rate and recipe)."""
        started = time.monotonic()
        if lr not in self.copy_experts:
            self.copy_experts[lr] = self.expert(self.copy, lr)
        guard = Guard(self.copy, self.copy_experts[lr], auxiliary or self.auxiliary, self.preprocessing,
                      rejection_threshold=math.nan, alpha=self.config.alpha, device=torch.device(self.config.device))
        signals = "expert"
        if self.config.signals != "expert":
            try:
                fit_guard_features(guard, self.fit.images, self.select.images, self.num_classes, self.config.signals,
                                   self.config.feature_stages)
                signals = self.config.signals
            except Exception:  # as in the build: a model whose activations cannot be read keeps the expert's score
                guard.set_feature_detector(None)
        figures = canary_figures(guard, self.canaries, self.select, self.config)
        guard.set_feature_detector(None)
        return {"lr": lr, "signals": signals, **figures, "seconds": round(time.monotonic() - started, 2)}

    def record(self, figures: dict, mode: str) -> dict:
        """The manifest's ``self_test`` section (no canary pattern: only its hash)."""
        canaries = [{**canary.describe(), **measured} for canary, measured in zip(self.canaries, figures["canaries"])]
        return {"mode": mode, "auroc": figures["auroc"], "pass_rate_at_tau": figures["pass_rate_at_tau"],
                "tau": figures["tau"], "signals": figures["signals"], "unlearning_lr": figures["lr"],
                "auxiliary_lr": self.auxiliary_lr, "auxiliary_seconds": self.auxiliary_seconds,
                "measured_on": f"D_select ({len(self.select)} clean images and their canary-triggered copies from "
                               "non-target classes)", "canaries": canaries,
                "copy": self.implant, "seeded": self.config.canary_seed is not None,
                "promise": promise(tuple(canary.kind for canary in self.canaries))}


def run_self_test(model: nn.Module, expert: nn.Module, expert_record: dict, auxiliary: nn.Module,
                  auxiliary_record: dict, fit: ImageSet, select: ImageSet, num_classes: int, preprocessing,
                  model_accuracy: float, config, log, warnings: list[str]) -> SelfTestOutcome:
    """The self-test of ``config.self_test`` ("report" or "choose"). With ``choose`` the expert may be
    retrained at the canary's rate (its record gains ``canary_search`` and ``rule_lr``), and then the
    auxiliary remade by the canary's recipe (its record gains ``canary_search`` and ``rule_recipe``)."""
    unchanged = SelfTestOutcome(expert, expert_record, auxiliary, auxiliary_record, None)
    if "lr" not in auxiliary_record or auxiliary_record["method"] not in ("clean_finetune", "pseudo_label_finetune"):
        warnings.append(f"--self-test {config.self_test}: runs with a finetuned auxiliary model only (this build's is "
                        f"{auxiliary_record['method']}); no self-test figures")
        return unchanged
    mode, started = config.self_test, time.monotonic()
    test = SelfTest(model, fit, select, num_classes, preprocessing, auxiliary_record["lr"],
                    torch.tensor(expert_record["wrong_label_of"]), config, log)
    rule_lr = expert_record["lr"]
    searched = {entry["lr"]: entry for entry in expert_record.get("search", [])}
    experts: dict[float, nn.Module] = {rule_lr: expert}
    candidates = []
    for lr in candidate_rates(rule_lr, mode):
        entry = searched.get(lr)
        if lr not in experts and (entry is None or "calibration_accuracy" not in entry):
            experts[lr] = test.expert(model, lr)
            logits = predict_logits(experts[lr], select.images, test.normalizer, config.device)
            entry = ({"lr": lr, "calibration_accuracy": accuracy(logits, select.labels)} if all_finite(logits)
                     else {"lr": lr, "diverged": "non-finite outputs on D_select"})
        expert_accuracy = (entry or {}).get("calibration_accuracy", expert_record.get("calibration_accuracy"))
        eligible = expert_accuracy is not None and expert_accuracy <= CHOOSE_MAX_EXPERT_RATIO * model_accuracy
        figures = test.figures_at(lr)
        candidates.append({**figures, "expert_accuracy": expert_accuracy, "eligible": lr == rule_lr or eligible})
        log(f"  self-test at unlearning lr {lr:g}: canary AUROC {_shown(figures['auroc'], '.4f')}, "
            f"{_shown(figures['pass_rate_at_tau'], '.1%')} canary-triggered pass at tau"
            + ("" if candidates[-1]["eligible"] else " (expert keeps too much clean accuracy: not eligible)"))
    chosen = pick_rate(candidates, rule_lr) if mode == "choose" else rule_lr
    figures = next(c for c in candidates if c["lr"] == chosen)
    if mode != "choose":
        record = test.record(figures, mode)
        record["seconds"] = round(time.monotonic() - started, 2)
        return SelfTestOutcome(expert, expert_record, auxiliary, auxiliary_record, record)

    expert_record = {**expert_record, "canary_search": _listed(candidates), "rule_lr": rule_lr}
    if chosen != rule_lr:
        expert = experts[chosen] if chosen in experts else test.expert(model, chosen)
        logits = predict_logits(expert, select.images, test.normalizer, config.device)
        expert_record.update(lr=chosen, chosen_by="canary", calibration_accuracy=accuracy(logits, select.labels))
        log(f"  self-test chose unlearning lr {chosen:g} over the rule's {rule_lr:g}")

    rule_recipe = auxiliary_record.get("recipe", config.finetune_recipe)
    goal = config.pseudo_label_agreement_goal if auxiliary_record["method"] == "pseudo_label_finetune" else None
    recipes = [{"recipe": rule_recipe, "finetune_lr": auxiliary_record["lr"], **figures, "eligible": True}]
    for name in FINETUNE_RECIPES:
        if name == rule_recipe:
            continue
        copy_auxiliary, copy_record = test.recipe_auxiliary(name, goal)
        measured = test.figures_at(chosen, copy_auxiliary)
        recipes.append({"recipe": name, "finetune_lr": copy_record["lr"], **measured,
                        "auxiliary_accuracy": copy_record["calibration_accuracy"],
                        "eligible": copy_record["calibration_accuracy"] >= copy_record["goal_accuracy"]})
        log(f"  self-test with auxiliary recipe {name} (lr {copy_record['lr']:g}): canary AUROC "
            f"{_shown(measured['auroc'], '.4f')}, {_shown(measured['pass_rate_at_tau'], '.1%')} canary-triggered "
            "pass at tau" + ("" if recipes[-1]["eligible"] else " (missed the accuracy goal: not eligible)"))
    chosen_recipe = pick_best(recipes, "recipe", rule_recipe)
    figures = next(c for c in recipes if c["recipe"] == chosen_recipe)
    auxiliary_record = {**auxiliary_record, "canary_search": _listed(recipes), "rule_recipe": rule_recipe}
    if chosen_recipe != rule_recipe:
        log(f"  self-test chose auxiliary recipe {chosen_recipe} over {rule_recipe}: finetuning M by it")
        method, labels = auxiliary_record["method"], auxiliary_record.get("labels")
        auxiliary, remade = choose_finetuning_rate(model, fit, select.images, select.labels, test.normalizer,
                                                   model_accuracy, config, log, goal=goal,
                                                   recipe=finetune_recipe(chosen_recipe))
        auxiliary_record = {**remade, "method": method, **({"labels": labels} if labels else {}),
                            "chosen_by": "canary", "canary_search": auxiliary_record["canary_search"],
                            "rule_recipe": rule_recipe}

    record = test.record(figures, mode)
    record.update(candidates=_listed(candidates), rule_lr=rule_lr, chosen_lr=chosen,
                  recipe_candidates=_listed(recipes), rule_recipe=rule_recipe, chosen_recipe=chosen_recipe,
                  auxiliary_recipe=chosen_recipe, auxiliary_lr=figures["finetune_lr"],
                  max_expert_ratio=CHOOSE_MAX_EXPERT_RATIO, margin=CHOOSE_MARGIN)
    record["seconds"] = round(time.monotonic() - started, 2)
    return SelfTestOutcome(expert, expert_record, auxiliary, auxiliary_record, record)


def _listed(candidates: list[dict]) -> list[dict]:
    """Candidates for the manifest: every figure but the per-canary detail."""
    return [{key: value for key, value in c.items() if key != "canaries"} for c in candidates]


def _shown(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
