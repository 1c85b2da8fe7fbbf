"""The early-dip bench's bookkeeping, and the dip recorded by a real (tiny) finetuning run."""

import pytest
import torch

from bench.auxiliary_dip import table, target_rate
from defense.build import BuildConfig
from defense.rates import choose_finetuning_rate
from defense.data import ImageSet
from defense.models import create_model
from defense.preprocessing import Normalizer


def row(lowest: float, kept: bool, final: float = 0.7, **extra) -> dict:
    """A measured auxiliary: M at 0.8 on D_select (goal 0.64), lr 0.1 chosen, its first two epochs at
    ``lowest`` and 0.75, so the early dip is (0.8 - lowest) / 0.8."""
    return {"arch": "a", "attack": "badnet", "seed": 0, "n_reserved": 200, "finetune_lr": 0.1,
            "model_select_accuracy": 0.8, "goal_accuracy": 0.64,
            "search": [{"lr": 0.1, "calibration_accuracy": final, "accuracy_by_epoch": [lowest, 0.75] + [final] * 8}],
            "model_asr": 0.9, "auxiliary_asr": 0.8 if kept else 0.1, "kept": kept, **extra}


def test_table_recomputes_the_dip_and_counts_hits_misses_and_false_alarms():
    # Dips: 0.72 -> 10% and 0.64 -> 20% (warned at the 25% bar, kept: hits); 0.40 -> 50% (not warned,
    # kept: missed); 0.40 again (not warned, not kept); 0.56 -> 30% is not under the bar, but the final
    # 0.6 misses the goal 0.64, so the build warns: a false alarm on an auxiliary that did not keep it.
    rows = [row(0.72, True), row(0.64, True, n_reserved=400), row(0.40, True, n_reserved=1000),
            row(0.40, False, n_reserved=2000), row(0.56, False, final=0.6, seed=1)]
    lines = table(rows)
    assert lines[-1] == ("All: 5 auxiliaries, 3 kept the backdoor; the warning fired on 2 of those, missed 1, "
                         "and fired on 1 that did not keep it.")
    # Per reserved size: 200 holds the first row and the false alarm (seed 1).
    assert ("- 200 reserved images: 2 auxiliaries, 1 kept the backdoor; the warning fired on 1 of those, missed 0, "
            "and fired on 1 that did not keep it.") in lines
    assert ("- 1000 reserved images: 1 auxiliaries, 1 kept the backdoor; the warning fired on 0 of those, missed 1, "
            "and fired on 0 that did not keep it.") in lines
    assert "| a | badnet | 0 | 200 | 0.1 | +0.100 | yes | 90.0 | 80.0 | yes |" in lines
    assert "| a | badnet | 0 | 1000 | 0.1 | +0.500 | no | 90.0 | 80.0 | yes |" in lines
    # A bar of 0.6 catches the miss (50% < 60%) and warns on the clean 2,000 row too.
    assert table(rows, min_early_dip=0.6)[-1].endswith("the warning fired on 3 of those, missed 0, and fired on 2 "
                                                       "that did not keep it.")


def test_target_rate_is_the_share_sent_to_the_target():
    logits = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert target_rate(logits, torch.tensor([1, 1, 1, 1])) == 0.5
    assert target_rate(logits, torch.tensor([0, 0, 1, 0])) == 0.75


def test_a_real_finetuning_run_records_one_accuracy_per_epoch_and_its_dip():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(48) % 3
    fit = ImageSet(images[:32], labels[:32], None, None)
    select_images, select_labels = images[32:], labels[32:]
    config = BuildConfig(progress=False, finetune_lr=0.05, finetune_epochs=3, finetune_milestones=(2,))
    model = create_model("tiny_cnn", num_classes=3).eval()
    normalizer = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    _, record = choose_finetuning_rate(model, fit, select_images, select_labels, normalizer, 0.6, config,
                                       log=lambda line: None)
    by_epoch = record["search"][0]["accuracy_by_epoch"]
    assert len(by_epoch) == 3 and all(0.0 <= value <= 1.0 for value in by_epoch)
    assert record["calibration_accuracy"] == by_epoch[-1]  # the last epoch's model is the auxiliary
    assert record["early_dip"] == pytest.approx((0.6 - min(by_epoch[:2])) / 0.6)
