"""The build's canary self-test (defense/self_test.py): its pure helpers against hand-computed
values, the manifest round trip of its fields, ``choose`` replacing the rule's rate, and its options."""

import math

import pytest
import torch

from defense import Bundle, UserError
from defense.build import BuildConfig
from defense.bundle import load_bundle
from defense.self_test_report import self_test_lines
from defense.self_test import PROMISE, SelfTest, candidate_rates, pick_rate, separation
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


def test_off_writes_no_self_test(data):
    model, images, labels = data
    bundle = Bundle.build(model, (images, labels), architecture="tiny_cnn", log=lambda *_: None, self_test="off",
                          signals="expert", **FAST)
    assert "self_test" not in bundle.fields and self_test_lines(None) == ["  self-test: off"]


def test_choose_trains_the_expert_at_the_rate_the_canary_prefers(data, monkeypatch):
    """The tiny synthetic canary is caught at every rate (AUROC 1.0), so the figures are scripted: the
    canary prefers the largest neighbour. The real expert must then be trained at that rate."""
    model, images, labels = data
    real_figures_at = SelfTest.figures_at

    def scripted(self, lr):
        figures = real_figures_at(self, lr)
        return {**figures, "auroc": 0.5 + lr}  # the larger the rate, the better the canary separates

    monkeypatch.setattr(SelfTest, "figures_at", scripted)
    bundle = Bundle.build(model, (images, labels), architecture="tiny_cnn", log=lambda *_: None, self_test="choose",
                          signals="expert", **FAST)
    expert, section = bundle.fields["backdoor_expert"], bundle.fields["self_test"]
    rule = section["rule_lr"]
    eligible = [c["lr"] for c in section["candidates"] if c["eligible"]]
    assert section["chosen_lr"] == max(eligible) > rule
    assert expert["lr"] == section["chosen_lr"] and expert["chosen_by"] == "canary" and expert["rule_lr"] == rule
    assert [c["lr"] for c in expert["canary_search"]] == candidate_rates(rule, "choose")


@pytest.mark.parametrize("options, message", [
    ({"self_test": "maybe"}, "--self-test: expected off or report or choose, got 'maybe'"),
    ({"self_test": "choose", "unlearn_lr": 1e-3}, "--self-test choose: chooses the unlearning rate"),
])
def test_bad_self_test_options_are_named(data, options, message):
    model, images, labels = data
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        Bundle.build(model, (images, labels), architecture="tiny_cnn", log=lambda *_: None, **{**FAST, **options})


def test_the_default_is_the_measured_one():
    assert BuildConfig().self_test == "report"
