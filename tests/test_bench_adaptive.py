"""The arithmetic of the alpha ablation and the adaptive-trigger optimizer (no CIFAR-10 needed)."""

import math

import pytest
import torch
import torch.nn as nn

from bench.alpha_ablation import alpha_rows
from bench.adaptive_trigger import AlternativeTrigger, optimize_trigger
from bench.attacks import BadNet
from defense.preprocessing import Normalizer


def two_class_logits(label: int, probability_of_label_1: list[float]) -> torch.Tensor:
    """Logits of a two-class model: the given softmax probability of class 1 per input."""
    p = torch.tensor(probability_of_label_1, dtype=torch.float64)
    return torch.stack([torch.log1p(-p), torch.log(p)], dim=1)


def guard_logits(predicted: int, b: list[float], a: list[float]):
    """(model, expert, auxiliary) logits with M predicting ``predicted`` and the expert and the
    auxiliary giving probabilities b and a to that class."""
    n = len(b)
    model = torch.zeros(n, 2, dtype=torch.float64)
    model[:, predicted] = 5.0
    flip = (lambda q: [1 - x for x in q]) if predicted == 0 else (lambda q: q)
    return model, two_class_logits(1, flip(b)), two_class_logits(1, flip(a))


def test_alpha_ablation_resets_tau_from_the_calibration_scores_at_each_alpha():
    """Calibration: b = 0.5 and a = 0.42, 0.43, ..., 0.50 (n = 9, conformal at 10%: k = 1, tau = the
    smallest score). score = min(a / (alpha b), (1 - b) / (alpha - a)):
    alpha 0.5: tau = min(0.42 / 0.25, 0.5 / 0.08) = 1.68; alpha 1: tau = min(0.84, 0.5 / 0.58) = 0.84.
    Clean input (b 0.6, a 0.52): alpha 0.5: 0.52 / 0.3 = 1.733 (a > alpha: the second term is huge),
    accepted; alpha 1: min(0.52 / 0.6, 0.4 / 0.48) = 0.833 < 0.84, rejected. Clean input (0.2, 0.2):
    2.0 and 1.0, accepted at both. Triggered inputs (b 0.99, a 0.01, M says the target 0): rejected."""
    calibration = guard_logits(1, [0.5] * 9, [0.42 + 0.01 * i for i in range(9)])
    clean = guard_logits(1, [0.6, 0.2], [0.52, 0.2])
    triggered = guard_logits(0, [0.99, 0.99], [0.01, 0.01])
    labels = torch.tensor([1, 1])
    rows = alpha_rows(calibration, clean, triggered, labels, BadNet(target_class=0), fpr=0.1, rule="conformal",
                      alphas=(0.5, 1.0))
    assert rows["0.5"]["tau"] == pytest.approx(1.68) and rows["1.0"]["tau"] == pytest.approx(0.84)
    assert rows["0.5"]["fpr"] == 0.0 and rows["1.0"]["fpr"] == 0.5
    for row in rows.values():
        assert row["asr_without_guard"] == 1.0 and row["asr_with_guard"] == 0.0


def test_alpha_ablation_reports_a_tau_on_a_tie_as_refused():
    calibration = guard_logits(1, [0.5] * 9, [0.42] * 9)
    clean = guard_logits(1, [0.2], [0.2])
    rows = alpha_rows(calibration, clean, clean, torch.tensor([1]), BadNet(target_class=0), fpr=0.1,
                      rule="conformal", alphas=(0.5,))
    assert "refused" in rows["0.5"]


class ChannelMeans(nn.Module):
    """Two-class logits: class 0 when the mean of ``channel`` (0-255 input) is above ``level``."""

    def __init__(self, channel: int, level: float):
        super().__init__()
        self.channel, self.level = channel, level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x[:, self.channel].mean((1, 2)) / 255.0
        return torch.stack([20 * (mean - self.level), torch.zeros_like(mean)], dim=1)


def test_an_empty_mask_leaves_images_unchanged():
    trigger = AlternativeTrigger(4, 4)
    with torch.no_grad():
        trigger.mask_logit.fill_(-math.inf)
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(trigger.apply_uint8(images), images)


def test_the_optimized_trigger_fires_the_model_and_not_the_expert():
    """M follows red, the expert follows green: the trigger must be red, not green, and partial."""
    images = torch.randint(0, 100, (256, 3, 8, 8), dtype=torch.uint8)
    model, expert = ChannelMeans(channel=0, level=0.6), ChannelMeans(channel=1, level=0.3)
    identity = Normalizer((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))  # keeps 0-255 values
    trigger = optimize_trigger(model, expert, identity, images, target=0, lambda_expert=10.0, lambda_norm=0.01,
                               steps=150, batch_size=32)
    triggered = trigger.apply_uint8(images).float()
    assert (model(triggered).argmax(1) == 0).float().mean() >= 0.9
    assert expert(triggered).softmax(1)[:, 0].mean() < 0.05
    assert 0 < trigger.mask.sum() < 64  # the norm term keeps it from covering every pixel


def test_logits_are_computed_once_and_read_back_from_safetensors(tmp_path):
    from bench.alpha_ablation import cached_logits

    calls = []
    three = (torch.randn(4, 10), torch.randn(4, 10), torch.randn(4, 10))

    def compute():
        calls.append(1)
        return {"clean": three, "triggered": three}

    first = cached_logits(tmp_path / "x.safetensors", compute)
    second = cached_logits(tmp_path / "x.safetensors", compute)
    assert len(calls) == 1 and set(second) == {"clean", "triggered"}
    assert all(torch.equal(a, b) for a, b in zip(first["clean"], second["clean"]))


def _result(attack: str, arch: str, seed: int, aurocs: dict, asr: float = 0.9) -> dict:
    return {"attack": attack, "arch": arch, "seed": seed, "model": {"attack_success_rate": asr},
            "variants": {variant: {"at_tau": {"auroc": auroc, "fpr": 0.01, "asr_with_guard": 1 - auroc}}
                         for variant, auroc in aurocs.items()}}


def test_the_seeds_table_averages_attacks_per_seed_then_reports_the_spread_over_seeds():
    """Build seeds: badnet 0.99 / 0.97 / 0.98 and blend 0.95 / 0.97 / 0.96 give per-seed means 0.97,
    0.97, 0.97. Bench seeds: seed 0 (0.99 + 0.95) / 2 = 0.97, seed 1 0.90, seed 2 0.94: mean 0.9367."""
    from bench.operating_point import seeds_table

    build = {"cal20": 0.99, "cal20_seed1": 0.97, "cal20_seed2": 0.98}
    results = [_result("badnet", "m", 0, build),
               _result("blend", "m", 0, {"cal20": 0.95, "cal20_seed1": 0.97, "cal20_seed2": 0.96}),
               _result("badnet", "m", 1, {"cal20": 0.90}), _result("blend", "m", 1, {"cal20": 0.90}),
               _result("badnet", "m", 2, {"cal20": 0.94}), _result("blend", "m", 2, {"cal20": 0.94}),
               _result("wanet", "m", 0, build, asr=0.5)]  # not counted: the model's ASR is under 80%
    lines = seeds_table(results)
    assert len(lines) == 4
    assert "| badnet, blend | 97.00 (97.00-97.00) |" in lines[2]
    assert "| badnet, blend | 93.67 (90.00-97.00) |" in lines[3]


def test_the_adaptive_fused_table_keeps_each_guards_newest_results_and_names_rules_not_measured(tmp_path, monkeypatch):
    import json
    import os

    from bench import adaptive_fused

    monkeypatch.setattr(adaptive_fused, "RESULTS", tmp_path)
    measured = {"auroc": 0.5, "asr_with_guard": 0.25, "asr_without_guard": 0.75}
    def result(auroc, rules):
        row = {"attacker": "fused", "lambda_expert": 1.0, "lambda_features": 1.0, "lambda_norm": 0.01, "mask_l1": 7.0,
               "rules": {rule: {**measured, "auroc": auroc} for rule in rules}}
        return {"attack": "badnet", "arch": "tiny_cnn", "seed": 0, "bundle_id": "x", "rows": {"key": row}}
    old, new = tmp_path / "badnet_old.json", tmp_path / "badnet_new.json"
    old.write_text(json.dumps(result(0.1, adaptive_fused.RULES)))
    new.write_text(json.dumps(result(0.9, ("expert", "features:default", "fused:default"))))
    os.utime(old, (1_000, 1_000))  # written first: another build key of the same guard
    lines = adaptive_fused.table().splitlines()
    assert len(lines) == 3  # header, rule, one row: the older file's row is left out
    assert lines[2].count("90.0 / 25.0%") == 3 and lines[2].count("not measured") == len(adaptive_fused.RULES) - 3
    assert "| 75.0% |" in lines[2] and "| 7.0 |" in lines[2]
