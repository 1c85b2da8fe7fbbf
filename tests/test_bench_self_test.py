"""bench/self_test.py's rank correlation, against hand-computed values."""

import math

import pytest

from bench.self_test import ranks, spearman


def test_ranks_share_ties():
    assert ranks([0.3, 0.1, 0.3, 0.2]) == [3.5, 1.0, 3.5, 2.0]


def test_spearman_by_hand():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2, 3, 4) and (2, 1, 4, 3): d = (1, 1, 1, 1), rho = 1 - 6 * 4 / (4 * 15) = 0.6
    assert spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def result(kinds, auroc, chosen_lr, canary_seed=None):
    rule = {"auroc": 0.9, "fpr": 0.01, "asr_with_guard": 0.5}
    return {"arch": "a", "attack": "wanet", "model_seed": 0, "build_seed": 0, **({"canary_kinds": kinds} if kinds else {}),
            **({"canary_seed": canary_seed} if canary_seed is not None else {}),
            "guards": {"rule": rule, "choose": {"auroc": auroc, "fpr": 0.012, "asr_with_guard": 0.25}},
            "self_test": {"chosen_lr": chosen_lr, "chosen_recipe": "plain", "rule_lr": 5e-4,
                          "candidates": [{"lr": 5e-4, "auroc": 0.9, "pass_rate_at_tau": 0.5}]}}


def test_results_of_each_canary_set_stay_apart_and_are_tabled_side_by_side(tmp_path, monkeypatch):
    import json

    from bench import self_test

    monkeypatch.setattr(self_test, "ROOT", tmp_path)
    (tmp_path / "results").mkdir()
    # a result from before canary kinds were recorded counts as the default set
    (tmp_path / "results" / "old.json").write_text(json.dumps(result(None, 0.95, 2e-4)))
    (tmp_path / "results" / "warp.json").write_text(json.dumps(result(["warp"], 0.97, 3e-4)))
    (tmp_path / "results" / "seed7.json").write_text(json.dumps(result(["patch", "blend"], 0.96, 5e-4, canary_seed=7)))
    assert self_test.kinds_suffix(("patch", "blend")) == "" and self_test.kinds_suffix(("warp",)) == "_canaries-warp"
    assert self_test.kinds_suffix(("patch", "blend"), 7, 0) == "_canary7" and self_test.kinds_suffix(("warp",), 0, 0) == "_canaries-warp"
    assert self_test.canary_sets() == [("patch", "blend"), ("warp",)]
    assert [r["self_test"]["chosen_lr"] for r in self_test.latest_results()] == [2e-4]
    assert [r["self_test"]["chosen_lr"] for r in self_test.latest_results(("warp",))] == [3e-4]
    row = self_test.canary_set_table().splitlines()[-1]
    assert row == ("| a | wanet | 0/0 | 90.00 / 1.00% / 50.0% | 0.0002, plain, 95.00 / 1.20% / 25.0% "
                   "| 0.0003, plain, 97.00 / 1.20% / 25.0% |")
    # another canary seed of the same guard: not a row of the main tables, a row of its own table
    assert [r.get("canary_seed") for r in self_test.latest_results(other_canary_seeds=True)] == [7]
    assert self_test.canary_seed_table().splitlines()[2:] == [
        "| a | wanet | 0/0 | 0 | 0.0005: 90.00 / 50.0% | 0.0002, plain | 95.00 / 1.20% / 25.0% |",
        "| a | wanet | 0/0 | 7 | 0.0005: 90.00 / 50.0% | 0.0005, plain | 96.00 / 1.20% / 25.0% |"]


def test_only_results_on_the_recipes_model_are_tabled(tmp_path, monkeypatch):
    import json

    from bench import self_test

    monkeypatch.setattr(self_test, "ROOT", tmp_path)
    (tmp_path / "results").mkdir()
    old = {**result(None, 0.95, 2e-4), "arch": "cifar_vgg11_bn_compact"}  # no epochs recorded: the attack's 6
    (tmp_path / "results" / "old.json").write_text(json.dumps(old))
    assert self_test.latest_results() == []  # the VGG's WaNet recipe is 20 epochs: the 6-epoch model's result is out
    recipe = {**old, "model_epochs": 20, "self_test": {**old["self_test"], "chosen_lr": 3e-4}}
    (tmp_path / "results" / "recipe.json").write_text(json.dumps(recipe))
    assert [r["self_test"]["chosen_lr"] for r in self_test.latest_results()] == [3e-4]
    monkeypatch.setitem(__import__("bench.train_attacked").train_attacked.RECIPES, "cifar_vgg11_bn_compact", {})
    assert [r["self_test"]["chosen_lr"] for r in self_test.latest_results()] == [2e-4]  # recipe 6 again: the old one
