"""The build's automatic choices, pinned with scripted outcomes.

`choose_unlearning_rate`, `choose_finetuning_rate` and BCU's backoff run here with the training,
prediction and accuracy functions replaced by stubs: each candidate "model" is a record of the rate
it was trained with, and each rate's D_select accuracy (or divergence) is written in the test. So the
tests pin the search itself: which rate wins, in which order rates are tried, where the search
stops, and what the fallback records. Every expected value is worked out by hand in the comments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import defense.bcu as bcu
import defense.rates as rates
from defense.build import BuildConfig
from defense.rates import FINETUNE_LR_GRID, UNLEARN_LR_GRID, choose_finetuning_rate, choose_unlearning_rate
from defense.data import ImageSet
from defense.errors import UserError
from defense.finetune import Diverged
from defense.models import create_model

NUM_CLASSES = 4
DIVERGES = "diverges"  # training raises Diverged
NAN = "nan"  # training finishes, but the model's D_select outputs are not finite


@dataclass(frozen=True)
class Trained:
    """What a stubbed training run returns: the rate it was trained with."""

    lr: float


@dataclass(frozen=True)
class AfterEpoch:
    """The model a stubbed finetuning run shows its epoch-end callback: rate and epoch (from 0)."""

    lr: float
    epoch: int


class Script:
    """Stubs for train / predict_logits / accuracy that follow a table {lr: accuracy | DIVERGES | NAN}.

    Finetuning runs ``epochs`` epochs and shows each to the build's epoch-end callback; the D_select
    accuracy after epoch e is ``by_epoch[lr][e]`` when given, else the final accuracy (no dip)."""

    def __init__(self, outcomes: dict[float, object], by_epoch: dict[float, list[float]] | None = None, epochs: int = 10):
        self.outcomes = outcomes
        self.by_epoch = by_epoch or {}
        self.epochs = epochs
        self.trained: list[float] = []  # every rate trained, in order

    def train(self, lr: float, on_epoch_end=None) -> Trained:
        self.trained.append(lr)
        outcome = self.outcomes[lr]  # a rate the table does not list must not be tried
        if outcome == DIVERGES:
            raise Diverged(f"loss became nan (lr {lr:g})")
        for epoch in range(self.epochs if on_epoch_end is not None else 0):
            on_epoch_end(epoch, AfterEpoch(lr, epoch))
        return Trained(lr)

    def predict_logits(self, model, images, normalizer, device="cpu", batch_size=256):
        if isinstance(model, (Trained, AfterEpoch)) and self.outcomes[model.lr] == NAN:
            return torch.full((len(images), NUM_CLASSES), math.nan)
        # One row per image; the rate and the epoch (-1: finished) ride along for `accuracy`.
        lr = model.lr if isinstance(model, (Trained, AfterEpoch)) else -1.0
        logits = torch.zeros(len(images), NUM_CLASSES, dtype=torch.float64)
        logits[:, 0] = lr
        logits[:, 1] = model.epoch if isinstance(model, AfterEpoch) else -1
        return logits

    def accuracy(self, logits, labels) -> float:
        lr, epoch = float(logits[0, 0]), int(logits[0, 1])
        if epoch >= 0 and lr in self.by_epoch:
            return self.by_epoch[lr][epoch]
        return float(self.outcomes[lr])


def install(monkeypatch, script: Script) -> None:
    monkeypatch.setattr(rates, "unlearn", lambda model, images, labels, num_classes, normalizer, lr, *a, **k: script.train(lr))
    monkeypatch.setattr(rates, "clean_finetune", lambda model, images, labels, normalizer, lr, *a, on_epoch_end=None,
                        **k: script.train(lr, on_epoch_end))
    monkeypatch.setattr(rates, "predict_logits", script.predict_logits)
    monkeypatch.setattr(rates, "accuracy", script.accuracy)


FIT = ImageSet(torch.zeros(8, 3, 4, 4, dtype=torch.uint8), torch.arange(8) % NUM_CLASSES, None, None)
CAL_IMAGES = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
CAL_LABELS = torch.arange(6) % NUM_CLASSES
CONFIG = BuildConfig(progress=False)


def unlearning(script: Script, monkeypatch, reference_accuracy: float, config: BuildConfig = CONFIG, log=None):
    install(monkeypatch, script)
    return choose_unlearning_rate(object(), FIT, CAL_IMAGES, CAL_LABELS, NUM_CLASSES, None, reference_accuracy,
                                  config, log or (lambda *a: None))


def finetuning(script: Script, monkeypatch, reference_accuracy: float, config: BuildConfig = CONFIG, goal=None):
    install(monkeypatch, script)
    return choose_finetuning_rate(object(), FIT, CAL_IMAGES, CAL_LABELS, None, reference_accuracy, config,
                                  lambda *a: None, goal=goal)


# ----- the grids themselves ------------------------------------------------------------------------


def test_grids_are_the_documented_ones():
    # README: unlearning tries rates upwards from 1e-5; finetuning tries 0.1, 0.05, 0.03, ... downwards.
    assert UNLEARN_LR_GRID[0] == 1e-5 and list(UNLEARN_LR_GRID) == sorted(UNLEARN_LR_GRID)
    assert len(set(UNLEARN_LR_GRID)) == len(UNLEARN_LR_GRID)
    assert FINETUNE_LR_GRID == (0.1, 0.05, 0.03, 0.01, 0.003, 0.001)
    assert BuildConfig().unlearn_target_ratio == 0.5 and BuildConfig().finetune_recover_ratio == 0.8


# ----- unlearning: the smallest rate that erases the clean function --------------------------------


def unlearn_table(accuracies: list[object]) -> dict[float, object]:
    """The grid's rates, in order, with the given outcomes; rates past the list 'reach 0.0'."""
    return {lr: (accuracies[i] if i < len(accuracies) else 0.0) for i, lr in enumerate(UNLEARN_LR_GRID)}


def test_unlearning_keeps_the_smallest_rate_that_reaches_the_goal_and_stops_there(monkeypatch):
    # M's D_select accuracy 0.9 -> goal 0.5 * 0.9 = 0.45. The grid starts 1e-5, 2e-5, 3e-5, 5e-5, 7e-5:
    # 0.9, 0.8, 0.6 miss the goal; 5e-5 reaches 0.3 <= 0.45 and wins. Every larger rate would also
    # reach the goal (0.0), so trying them, or trying the grid from the top, picks another rate.
    script = Script(unlearn_table([0.9, 0.8, 0.6, 0.3]))
    logged = []
    expert, record = unlearning(script, monkeypatch, 0.9, log=logged.append)
    assert script.trained == [1e-5, 2e-5, 3e-5, 5e-5]  # upwards, and nothing after the winner
    assert expert == Trained(5e-5)
    assert record["lr"] == 5e-5 and record["chosen_by"] == "auto" and record["method"] == "unlearning"
    assert record["goal_accuracy"] == pytest.approx(0.45) and record["calibration_accuracy"] == 0.3
    assert record["search"] == [{"lr": 1e-5, "calibration_accuracy": 0.9}, {"lr": 2e-5, "calibration_accuracy": 0.8},
                                {"lr": 3e-5, "calibration_accuracy": 0.6}, {"lr": 5e-5, "calibration_accuracy": 0.3}]
    assert "warning" not in record
    assert len(logged) == 4 and "lr 5e-05" in logged[-1]


def test_unlearning_goal_is_inclusive_and_follows_the_target_ratio(monkeypatch):
    # M at 0.8, ratio 0.5: goal 0.4 exactly; 0.4 at the second rate counts as reached.
    script = Script(unlearn_table([0.5, 0.4]))
    _, record = unlearning(script, monkeypatch, 0.8)
    assert record["lr"] == 2e-5 and script.trained == [1e-5, 2e-5]
    # Ratio 0.25: goal 0.2; 0.5, 0.4, 0.3 miss, 0.2 at the fourth rate (5e-5) reaches it.
    script = Script(unlearn_table([0.5, 0.4, 0.3, 0.2]))
    _, record = unlearning(script, monkeypatch, 0.8, BuildConfig(progress=False, unlearn_target_ratio=0.25))
    assert record["lr"] == 5e-5 and record["goal_accuracy"] == pytest.approx(0.2)


def test_unlearning_falls_back_to_the_largest_rate_with_a_warning(monkeypatch):
    # No rate brings the expert to 0.45: the largest (last) rate tried is kept, and the record warns.
    accuracies = [0.9 - 0.01 * i for i in range(len(UNLEARN_LR_GRID))]  # 0.90 .. 0.72
    script = Script(unlearn_table(accuracies))
    expert, record = unlearning(script, monkeypatch, 0.9)
    assert script.trained == list(UNLEARN_LR_GRID)
    assert expert == Trained(5e-2) and record["lr"] == 5e-2
    assert record["calibration_accuracy"] == pytest.approx(0.9 - 0.01 * (len(UNLEARN_LR_GRID) - 1))
    assert record["chosen_by"] == "auto" and len(record["search"]) == len(UNLEARN_LR_GRID)
    assert record["warning"] == ("no rate in the grid brought the expert to the goal; "
                                 "used the largest stable one (0.05)")


@pytest.mark.parametrize("failure", [DIVERGES, NAN])
def test_unlearning_stops_at_the_first_divergence_and_keeps_the_last_stable_rate(monkeypatch, failure):
    # 1e-5: 0.9, 2e-5: 0.7 (stable, goal 0.45 missed), 3e-5 diverges: the search stops there (larger
    # rates would diverge too) and keeps 2e-5 with a warning.
    script = Script(unlearn_table([0.9, 0.7, failure]))
    expert, record = unlearning(script, monkeypatch, 0.9)
    assert script.trained == [1e-5, 2e-5, 3e-5]
    assert expert == Trained(2e-5) and record["lr"] == 2e-5 and record["calibration_accuracy"] == 0.7
    assert record["search"][-1]["lr"] == 3e-5 and "diverged" in record["search"][-1]
    assert "used the largest stable one (2e-05)" in record["warning"]


def test_unlearning_that_diverges_at_the_smallest_rate_is_a_user_error(monkeypatch):
    script = Script(unlearn_table([DIVERGES]))
    with pytest.raises(UserError, match="diverged at the smallest learning rate; pass --unlearn-lr"):
        unlearning(script, monkeypatch, 0.9)
    assert script.trained == [1e-5]


def test_unlearning_with_a_user_rate_trains_once(monkeypatch):
    script = Script({4e-4: 0.7})  # not on the grid, and far from the goal: used anyway
    expert, record = unlearning(script, monkeypatch, 0.9, BuildConfig(progress=False, unlearn_lr=4e-4))
    assert script.trained == [4e-4] and expert == Trained(4e-4)
    assert record == {"method": "unlearning", "mislabeling": "shift",
                      "wrong_label_of": [(c + 1) % NUM_CLASSES for c in range(NUM_CLASSES)],
                      "lr": 4e-4, "chosen_by": "user", "calibration_accuracy": 0.7}


# ----- clean finetuning: the largest stable rate that recovers the clean function ------------------


def finetune_table(accuracies: list[object]) -> dict[float, object]:
    return dict(zip(FINETUNE_LR_GRID, accuracies))


def test_finetuning_keeps_the_largest_stable_rate_that_recovers_and_stops_there(monkeypatch):
    # M at 0.9 -> goal 0.8 * 0.9 = 0.72. 0.1 diverges, 0.05 gives NaN outputs, 0.03 recovers only
    # 0.5, 0.01 recovers 0.8 >= 0.72 and wins. 0.003 and 0.001 would recover more (0.9, 0.95): a
    # search that goes on, or runs the grid upwards, keeps one of them instead.
    script = Script(finetune_table([DIVERGES, NAN, 0.5, 0.8, 0.9, 0.95]))
    auxiliary, record = finetuning(script, monkeypatch, 0.9)
    assert script.trained == [0.1, 0.05, 0.03, 0.01]
    assert auxiliary == Trained(0.01)
    assert record["lr"] == 0.01 and record["chosen_by"] == "auto" and record["method"] == "clean_finetune"
    assert record["goal_accuracy"] == pytest.approx(0.72) and record["calibration_accuracy"] == 0.8
    assert [entry["lr"] for entry in record["search"]] == [0.1, 0.05, 0.03, 0.01]
    assert "diverged" in record["search"][0] and record["search"][1]["diverged"] == "non-finite outputs on D_select"
    # Without a scripted dip every epoch ends at the final accuracy: early dip = (0.9 - final) / 0.9.
    assert record["search"][2:] == [
        {"lr": 0.03, "calibration_accuracy": 0.5, "accuracy_by_epoch": [0.5] * 10, "early_dip": pytest.approx(4 / 9)},
        {"lr": 0.01, "calibration_accuracy": 0.8, "accuracy_by_epoch": [0.8] * 10, "early_dip": pytest.approx(1 / 9)}]
    assert record["early_dip"] == pytest.approx(1 / 9) and record["min_early_dip"] == 0.25
    # 1/9 = 11% < 25%: the warning (its text is pinned below).
    assert record["warning"].startswith("the auxiliary model (finetuning lr 0.01) lost at most 11% of M's")


def test_early_dip_is_the_share_of_accuracy_lost_before_the_first_milestone():
    # M at 0.80. Milestones (2, 4, ...): epochs 0 and 1 run at the initial rate; their lowest is 0.60,
    # so the dip is (0.80 - 0.60) / 0.80 = 0.25. The 0.30 at epoch 2 (after the first milestone) does not count.
    assert rates.early_dip(0.80, [0.70, 0.60, 0.30, 0.85], (2, 4, 6, 8)) == pytest.approx(0.25)
    # Only gains: negative ((0.80 - 0.88) / 0.80). No milestones: every epoch counts (lowest 0.4 -> 0.5).
    assert rates.early_dip(0.80, [0.88, 0.90], (2, 4)) == pytest.approx(-0.10)
    assert rates.early_dip(0.80, [0.9, 0.4, 0.9], ()) == pytest.approx(0.50)
    # A first milestone at 0 still looks at the first epoch; NaN outputs count as accuracy 0 (a full dip).
    assert rates.early_dip(0.80, [0.72, 0.1], (0,)) == pytest.approx(0.10)
    assert rates.early_dip(0.80, [math.nan, 0.9], (2,)) == pytest.approx(1.0)
    # No epoch at all (the auxiliary is M) or an M at zero accuracy: no dip.
    assert rates.early_dip(0.80, [], (2,)) == 0.0 and rates.early_dip(0.0, [0.1], (2,)) == 0.0


def finetune_script(by_epoch) -> Script:
    # M at 0.9, goal 0.72: 0.1 ends at 0.70 (under the goal), 0.05 ends at 0.88 and wins.
    return Script(finetune_table([0.70, 0.88, 0.9, 0.9, 0.9, 0.9]), by_epoch)


def test_finetuning_warns_when_the_chosen_auxiliary_barely_dipped_and_names_the_larger_rate(monkeypatch):
    # 0.1's first two epochs read 0.60 and 0.45: dip (0.9 - 0.45) / 0.9 = 50%. 0.05's read 0.85 and
    # 0.81: dip (0.9 - 0.81) / 0.9 = 10% < 25%, so the chosen auxiliary earns the warning, which names
    # 0.1 (dipped 50%, ended at 70.0%) as the trade.
    by_epoch = {0.1: [0.60, 0.45] + [0.70] * 8, 0.05: [0.85, 0.81] + [0.88] * 8}
    _, record = finetuning(finetune_script(by_epoch), monkeypatch, 0.9)
    assert record["lr"] == 0.05 and record["early_dip"] == pytest.approx(0.1)
    assert record["search"][1]["accuracy_by_epoch"] == by_epoch[0.05]
    assert record["warning"] == (
        "the auxiliary model (finetuning lr 0.05) lost at most 10% of M's D_select accuracy in its first epochs, "
        "under the 25% at which finetuning weakened the backdoor in the benchmarks: it likely kept the backdoor, "
        "which leaves detection to the backdoor expert alone (such guards let 0-95% of triggered inputs through in "
        "the benchmarks). lr 0.1 dipped enough (50%) and ended at 70.0% D_select accuracy, just under the goal "
        "72.0%: --finetune-lr 0.1 trades that accuracy for a weaker backdoor; more clean images help most "
        "(docs/method.md, section 3)")


def test_the_warning_names_no_larger_rate_that_missed_the_goal_by_far(monkeypatch):
    # 0.1 dipped 50% but ended at 0.62, under 0.72 - 0.1 * 0.9 = 0.63, the least a near miss may reach;
    # at 0.64 it is named.
    by_epoch = {0.1: [0.60, 0.45] + [0.62] * 8, 0.05: [0.85, 0.81] + [0.88] * 8}
    script = Script(finetune_table([0.62, 0.88, 0.9, 0.9, 0.9, 0.9]), by_epoch)
    warning = finetuning(script, monkeypatch, 0.9)[1]["warning"]
    assert "lost at most 10%" in warning and "--finetune-lr" not in warning
    by_epoch[0.1][2:] = [0.64] * 8
    script = Script(finetune_table([0.64, 0.88, 0.9, 0.9, 0.9, 0.9]), by_epoch)
    assert "--finetune-lr 0.1 trades" in finetuning(script, monkeypatch, 0.9)[1]["warning"]


def test_no_early_dip_warning_when_the_auxiliary_dipped_or_the_bar_is_lower(monkeypatch):
    # 0.05 dips to 0.60: (0.9 - 0.6) / 0.9 = 33% >= 25%, no warning.
    by_epoch = {0.1: [0.60, 0.45] + [0.70] * 8, 0.05: [0.85, 0.60] + [0.88] * 8}
    assert "warning" not in finetuning(finetune_script(by_epoch), monkeypatch, 0.9)[1]
    # 10% again, with --min-early-dip 0.05: no warning either.
    by_epoch[0.05][1] = 0.81
    assert "warning" not in finetuning(finetune_script(by_epoch), monkeypatch, 0.9,
                                       BuildConfig(progress=False, min_early_dip=0.05))[1]
    # 10%, and the larger rate did not dip enough either (0.85: 5.6%): the warning names no rate.
    by_epoch[0.1] = [0.85] * 10
    warning = finetuning(finetune_script(by_epoch), monkeypatch, 0.9)[1]["warning"]
    assert "--finetune-lr" not in warning and warning.endswith("more clean images help most (docs/method.md, section 3)")


# ----- BCU: back off the rate on divergence --------------------------------------------------------


class BCUScript(Script):
    def distill(self, teacher, images, normalizer, probabilities, epochs, lr, *args, **kwargs):
        # BCU's rates are products (0.01 * 0.3); match them to the table with a tolerance.
        key = next(k for k in self.outcomes if math.isclose(k, lr, rel_tol=1e-9))
        return self.train(key)


def bcu_run(monkeypatch, outcomes, reference_accuracy=0.9, lr=0.01):
    script = BCUScript(outcomes)
    monkeypatch.setattr(bcu, "bcu_distill", script.distill)
    monkeypatch.setattr(bcu, "predict_logits", script.predict_logits)
    monkeypatch.setattr(bcu, "accuracy", script.accuracy)
    config = BuildConfig(progress=False, auxiliary="bcu", labels=False, bcu_lr=lr, bcu_epochs=3)
    logged = []
    student, record = bcu.bcu_auxiliary(create_model("tiny_cnn", NUM_CLASSES), FIT.images, CAL_IMAGES, CAL_LABELS,
                                        None, reference_accuracy, config, logged.append)
    return script, student, record, logged


def test_bcu_backoff_factors():
    assert bcu.BACKOFF_FACTORS == (1.0, 0.3, 0.1, 0.03)


def test_bcu_keeps_the_configured_rate_when_it_is_stable(monkeypatch):
    script, student, record, _ = bcu_run(monkeypatch, {0.01: 0.85, 0.003: 0.9, 0.001: 0.9, 0.0003: 0.9})
    assert script.trained == [0.01] and student == Trained(0.01)
    assert record["lr"] == 0.01 and record["chosen_by"] == "setting" and record["calibration_accuracy"] == 0.85
    assert record["search"] == [{"lr": 0.01, "calibration_accuracy": 0.85}]
    assert record["goal_accuracy"] == pytest.approx(0.72) and "warning" not in record


def test_bcu_backs_off_in_order_after_divergence_and_nan_outputs(monkeypatch):
    # 0.01 diverges, 0.01 * 0.3 = 0.003 gives NaN outputs, 0.01 * 0.1 = 0.001 is stable: kept; 0.0003 untried.
    script, student, record, logged = bcu_run(monkeypatch, {0.01: DIVERGES, 0.003: NAN, 0.001: 0.6, 0.0003: 0.9})
    assert script.trained == [0.01, 0.003, 0.001]
    assert student == Trained(0.001) and record["lr"] == pytest.approx(0.001)
    assert record["chosen_by"] == "backoff"
    assert [e["lr"] for e in record["search"]] == pytest.approx([0.01, 0.003, 0.001])
    assert "diverged" in record["search"][0] and record["search"][1]["diverged"] == "non-finite outputs on D_select"
    assert record["search"][2]["calibration_accuracy"] == 0.6
    # 0.6 < goal 0.72: the record warns
    assert record["warning"].startswith("the BCU student agrees with M's labels on 60.0% of D_select, below the goal 72.0%")
    assert any("BCU lr 0.01: diverged" in line and "backing off" in line for line in logged)


def test_bcu_that_diverges_at_every_rate_is_a_user_error(monkeypatch):
    with pytest.raises(UserError, match="diverged at every rate tried from --bcu-lr 0.01"):
        bcu_run(monkeypatch, {0.01: DIVERGES, 0.003: DIVERGES, 0.001: NAN, 0.0003: DIVERGES})
