"""The build's canary self-test (defense/self_test.py): its pure helpers against hand-computed
values, the manifest round trip of its fields, ``choose`` replacing the rule's rate, and its options."""

import math

import pytest
import torch

from defense import Bundle, UserError
from defense.build import BuildConfig
from defense.bundle import load_bundle
from defense.self_test_report import self_test_lines
from defense.auxiliary_recipes import FINETUNE_RECIPES
from defense.self_test import PROMISE, SelfTest, candidate_rates, pick_best, pick_rate, separation
from synthetic import TARGET, add_trigger, make_images, train_backdoored

FAST = {"finetune_lr": 0.01, "finetune_epochs": 2, "canary_seed": 5, "input_size": (16, 16), "progress": False}


def test_separation_by_hand():
    clean = torch.tensor([0.9, 0.8, 0.1], dtype=torch.float64)
    triggered = torch.tensor([0.05, 0.85, 0.5], dtype=torch.float64)
    area, passed = separation(clean, torch.tensor([True, True, False]), triggered,
                              torch.tensor([True, True, False]), tau=0.3)
    # pairs (triggered below clean): 0.05 < 0.9, 0.05 < 0.8, 0.85 < 0.9 (not 0.85 < 0.8): 3 of 4
    assert area == pytest.approx(0.75)
    assert passed == pytest.approx(1 / 3)  # only 0.85 is sent to the target and at or above tau
    assert math.isnan(separation(clean, torch.tensor([True] * 3), triggered, torch.tensor([True] * 3), math.nan)[1])


def test_candidate_rates_are_the_rule_and_its_grid_neighbours():
    assert candidate_rates(1e-4, "report") == [1e-4]
    assert candidate_rates(1e-4, "choose") == [5e-5, 7e-5, 1e-4, 1.5e-4, 2e-4]
    assert candidate_rates(1e-5, "choose") == [1e-5, 2e-5, 3e-5]
    assert candidate_rates(4e-4, "choose") == [4e-4]  # a rate off the grid (the user's) is measured alone


def candidate(lr, auroc, passed=0.0, eligible=True):
    return {"lr": lr, "auroc": auroc, "pass_rate_at_tau": passed, "eligible": eligible}


def test_pick_rate_needs_a_margin_eligibility_and_breaks_ties_by_pass_rate():
    rule = candidate(1e-4, 0.95)
    assert pick_rate([rule, candidate(2e-4, 0.97)], 1e-4) == 2e-4
    assert pick_rate([rule, candidate(2e-4, 0.952)], 1e-4) == 1e-4  # within the margin: the rule stays
    assert pick_rate([rule, candidate(5e-5, 0.99, eligible=False)], 1e-4) == 1e-4
    assert pick_rate([rule, candidate(2e-4, 0.97, 0.2), candidate(3e-4, 0.97, 0.1)], 1e-4) == 3e-4
    assert pick_rate([rule, candidate(2e-4, None)], 1e-4) == 1e-4
    recipes = [{"recipe": "plain", "auroc": 0.9, "pass_rate_at_tau": 0.1, "eligible": True},
               {"recipe": "warmup", "auroc": 0.93, "pass_rate_at_tau": 0.0, "eligible": False},
               {"recipe": "fresh_head", "auroc": 0.92, "pass_rate_at_tau": 0.0, "eligible": True}]
    assert pick_best(recipes, "recipe", "plain") == "fresh_head"  # warmup is better but not eligible


@pytest.fixture(scope="module")
def data():
    images, labels = make_images(240, seed=0)
    return train_backdoored(images, labels, epochs=4), images, labels


def test_the_self_test_is_in_the_manifest_and_survives_the_round_trip(tmp_path, data):
    model, images, labels = data
    bundle = Bundle.build(model, (images, labels), architecture="tiny_cnn", out=tmp_path / "b", log=lambda *_: None,
                          signals="expert", **FAST)
    section = bundle.manifest.model_extra["self_test"]
    assert section["mode"] == "report" and 0.0 <= section["auroc"] <= 1.0
    assert {"pass_rate_at_tau", "tau", "canaries", "copy", "promise", "unlearning_lr", "seconds"} <= set(section)
    assert [c["kind"] for c in section["canaries"]] == ["patch", "blend"]
    assert all("pattern" not in c and len(c["pattern_sha256"]) == 64 for c in section["canaries"])
    assert section["unlearning_lr"] == bundle.manifest.backdoor_expert["lr"]
    _, loaded = load_bundle(tmp_path / "b")  # the digest covers the section
    assert loaded.model_extra["self_test"] == section
    assert any("canary" in line for line in self_test_lines(section)) and PROMISE in " ".join(self_test_lines(section))
    triggered = add_trigger(images[labels != TARGET][:40])
    report = Bundle.load(tmp_path / "b").evaluate((images[:80], labels[:80]), (triggered, None), target_class=TARGET,
                                                  bootstrap=0, report_dir=tmp_path / "report", log=lambda *_: None)
    assert report.document["self_test"]["auroc"] == section["auroc"]
    assert "Build self-test: on canary backdoors" in (tmp_path / "report" / "report.md").read_text()


def test_a_warp_canary_is_implanted_measured_and_named_when_asked(tmp_path, data):
    model, images, labels = data
    bundle = Bundle.build(model, (images, labels), architecture="tiny_cnn", out=tmp_path / "b", log=lambda *_: None,
                          signals="expert", canary_kinds=("warp",), **FAST)
    section = bundle.manifest.model_extra["self_test"]
    assert [c["kind"] for c in section["canaries"]] == ["warp"] and len(section["copy"]["asr_on_selection"]) == 1
    assert section["canaries"][0]["mean_displacement_pixels"] > 0 and "pattern" not in section["canaries"][0]
    assert "a smooth random warp" in section["promise"] and "patch" not in section["promise"]
    assert 0.0 <= section["auroc"] <= 1.0


def test_off_writes_no_self_test(data):
    model, images, labels = data
    bundle = Bundle.build(model, (images, labels), architecture="tiny_cnn", log=lambda *_: None, self_test="off",
                          signals="expert", **FAST)
    assert "self_test" not in bundle.fields and self_test_lines(None) == ["  self-test: off"]


def test_choose_moves_the_rate_where_the_rule_erases_the_canary(data):
    """A real tiny model, nothing scripted: with a strict accuracy goal (30% of M's) the rule picks
    unlearning rate 0.02, whose expert also forgets the canary backdoors (canary AUROC 0.81); the
    canary's figures move the real expert to 0.01 (canary AUROC 1.0)."""
    model, images, labels = data
    bundle = Bundle.build(model, (images, labels), architecture="tiny_cnn", log=lambda *_: None, self_test="choose",
                          signals="expert", unlearn_target_ratio=0.3, **FAST)
    expert, section = bundle.fields["backdoor_expert"], bundle.fields["self_test"]
    by_rate = {c["lr"]: c for c in section["candidates"]}
    assert section["rule_lr"] == 0.02 and section["chosen_lr"] == 0.01
    assert by_rate[0.01]["auroc"] >= by_rate[0.02]["auroc"] + 0.1  # the canary separates far better there
    assert section["chosen_lr"] == max((c for c in section["candidates"] if c["eligible"]),
                                       key=lambda c: c["auroc"])["lr"]
    assert expert["lr"] == 0.01 and expert["chosen_by"] == "canary" and expert["rule_lr"] == 0.02
    assert [c["lr"] for c in expert["canary_search"]] == candidate_rates(0.02, "choose")
    assert section["auroc"] == by_rate[0.01]["auroc"] and section["unlearning_lr"] == 0.01


def test_choose_measures_every_auxiliary_recipe_and_remakes_the_auxiliary_by_the_winner(data, monkeypatch):
    """Every recipe's copy auxiliary is measured and recorded; where the canary prefers another recipe
    (scripted here: the tiny canary is caught by all three), the real M' is finetuned by it."""
    model, images, labels = data
    made, real_figures_at, real_recipe_auxiliary = [], SelfTest.figures_at, SelfTest.recipe_auxiliary

    def remembering(self, name, goal):
        made.append(name)
        return real_recipe_auxiliary(self, name, goal)

    def scripted(self, lr, auxiliary=None):
        figures = real_figures_at(self, lr, auxiliary)
        return {**figures, "auroc": 0.99 if auxiliary is not None and made[-1] == "fresh_head" else 0.9}

    monkeypatch.setattr(SelfTest, "recipe_auxiliary", remembering)
    monkeypatch.setattr(SelfTest, "figures_at", scripted)
    bundle = Bundle.build(model, (images, labels), architecture="tiny_cnn", log=lambda *_: None, self_test="choose",
                          signals="expert", **FAST)
    auxiliary, section = bundle.fields["auxiliary_model"], bundle.fields["self_test"]
    assert [c["recipe"] for c in section["recipe_candidates"]] == list(FINETUNE_RECIPES)
    assert made == ["warmup", "fresh_head"] and section["rule_recipe"] == "plain"
    assert section["chosen_recipe"] == "fresh_head" and section["auroc"] == 0.99
    assert auxiliary["recipe"] == "fresh_head" and auxiliary["chosen_by"] == "canary"
    assert auxiliary["rule_recipe"] == "plain" and len(auxiliary["canary_search"]) == 3


def test_report_measures_no_recipe(data):
    model, images, labels = data
    bundle = Bundle.build(model, (images, labels), architecture="tiny_cnn", log=lambda *_: None, signals="expert",
                          **FAST)
    assert "recipe_candidates" not in bundle.fields["self_test"]
    assert bundle.fields["auxiliary_model"]["recipe"] == "plain" and "canary_search" not in bundle.fields["auxiliary_model"]


@pytest.mark.parametrize("options, message", [
    ({"self_test": "maybe"}, "--self-test: expected off or report or choose, got 'maybe'"),
    ({"self_test": "choose", "unlearn_lr": 1e-3}, "--self-test choose: chooses the unlearning rate"),
    ({"canary_kinds": ("patch", "swirl")}, "--canaries: expected one or more distinct kinds among patch, blend, warp, got patch swirl"),
    ({"canary_kinds": ("warp", "warp")}, "--canaries: expected one or more distinct kinds"),
    ({"canary_kinds": ()}, "got none"),
])
def test_bad_self_test_options_are_named(data, options, message):
    model, images, labels = data
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        Bundle.build(model, (images, labels), architecture="tiny_cnn", log=lambda *_: None, **{**FAST, **options})


def test_the_default_is_the_measured_one():
    assert BuildConfig().self_test == "report"
