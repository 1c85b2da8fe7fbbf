"""The build's canary self-test in words (:mod:`defense.self_test` measures it): the sentence that
the build summary, the evaluation report and ``/v1/info`` share, and what it does not promise.
Light on imports: the server uses it."""

from __future__ import annotations

import math


def self_test_sentence(self_test: dict) -> str:
    """The self-test's figures in one sentence (the summary's, the evaluation report's and /v1/info's)."""
    passed_text = _number(self_test["pass_rate_at_tau"], ".1%")
    return (f"on canary backdoors implanted in a copy of your model, this guard procedure: AUROC "
            f"{_number(self_test['auroc'], '.4f')}, {passed_text} of canary-triggered inputs pass at tau")


def self_test_summary(self_test: dict | None) -> dict | None:
    """The self-test as the evaluation report and ``/v1/info`` show it: the figures, the sentence and
    what it promises (None: the bundle was built without one)."""
    if not self_test:
        return None
    keys = ("mode", "auroc", "pass_rate_at_tau", "unlearning_lr", "chosen_lr", "rule_lr", "chosen_recipe",
            "rule_recipe", "measured_on")
    return {**{key: self_test[key] for key in keys if key in self_test}, "summary": self_test_sentence(self_test),
            "promise": self_test["promise"]}


def self_test_lines(self_test: dict | None) -> list[str]:
    """Console lines: the self-test's sentence, its rate choice, and what it does not promise."""
    if not self_test:
        return ["  self-test: off"]
    lines = [f"  self-test: {self_test_sentence(self_test)}"]
    if self_test.get("mode") == "choose" and self_test["chosen_lr"] != self_test["rule_lr"]:
        lines.append(f"    unlearning lr {self_test['chosen_lr']:g} chosen by the canary (the accuracy rule's: "
                     f"{self_test['rule_lr']:g})")
    elif self_test.get("mode") == "choose":
        lines.append(f"    the canary kept the accuracy rule's unlearning lr {self_test['rule_lr']:g}")
    if self_test.get("mode") == "choose" and "chosen_recipe" in self_test:
        kept = self_test["chosen_recipe"] == self_test["rule_recipe"]
        lines.append(f"    auxiliary recipe {self_test['chosen_recipe']} " + ("kept by the canary" if kept else
                     f"chosen by the canary (the build's: {self_test['rule_recipe']})"))
    lines.append(f"    ({self_test['promise']})")
    return lines


def _number(value, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
