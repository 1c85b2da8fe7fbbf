"""Prometheus metrics of one app, on the app's own registry (no global state).

The names are a contract with the deployment (Prometheus rules, Grafana dashboards):

    badexpert_inputs_total{decision="accepted"|"rejected"}                counter
    badexpert_rejected_by_class_total{predicted_class,class_name}         counter
    badexpert_score                                                       histogram, buckets dense around tau (not with decision_only)
    badexpert_request_duration_seconds                                    histogram (POST /predict and v2 infer)
    badexpert_batch_size                                                  histogram (images per model forward)
    badexpert_queue_depth                                                 gauge (images waiting for the model)
    badexpert_http_requests_total{status}                                 counter
    badexpert_overload_total                                              counter (503: queue full)
    badexpert_bundle_info{bundle_id,tau,target_fpr,mode}                  info (follows a hot swap; no tau with decision_only)
    badexpert_bundle_reloads_total{outcome="success"|"failure"|"busy"}    counter (hot swaps tried)
    badexpert_quarantine_skipped_total{reason}                            counter (originals not kept)
    badexpert_bundle_decisions_total{bundle,role="live"|"candidate",decision}  counter (with a candidate in shadow)
    badexpert_candidate_disagreements_total{live_bundle,candidate_bundle} counter (flagged by one of the two only)
    badexpert_candidate_failures_total                                    counter (batches the candidate failed on)
"""

from __future__ import annotations

import math
from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Multiples of tau: dense near 1 (the decision boundary), coarser far from it.
TAU_FACTORS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0,
               1.02, 1.05, 1.1, 1.15, 1.2, 1.3, 1.5, 1.75, 2.0, 2.5, 3.0, 5.0, 10.0, 100.0)
FALLBACK_BUCKETS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024)
DURATION_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
DECISIONS = ("accepted", "rejected")
QUARANTINE_REASONS = ("original_over_image_cap", "resized_over_image_cap", "quarantine_full")
RELOAD_OUTCOMES = ("success", "failure", "busy")


def score_buckets(tau: float) -> list[float]:
    """Histogram bounds for the score: tau itself and multiples of it clustered around 1, plus 0."""
    if not math.isfinite(tau) or tau <= 0:
        return list(FALLBACK_BUCKETS)
    return sorted({0.0, *(tau * factor for factor in TAU_FACTORS)})


class ServiceMetrics:
    """All metrics of one app. Series that depend on the bundle are created by :meth:`bind_bundle`."""

    def __init__(self, reveal_scores: bool = True) -> None:
        """``reveal_scores`` False (the decision_only policy): no score histogram and no tau label, so
        nothing on /metrics locates the threshold or one request's score."""
        self.reveal_scores = reveal_scores
        self.registry = CollectorRegistry()
        r = self.registry
        self.inputs = Counter("badexpert_inputs", "Images scored, by the guard's decision (in shadow mode: "
                              "the would-be decision)", ["decision"], registry=r)
        self.decision = {name: self.inputs.labels(decision=name) for name in DECISIONS}
        self.rejected_by_class = Counter("badexpert_rejected_by_class", "Flagged images by the model's predicted "
                                         "class (the class under attack)", ["predicted_class", "class_name"], registry=r)
        self.request_duration = Histogram("badexpert_request_duration_seconds", "Duration of POST /predict and v2 infer requests",
                                          buckets=DURATION_BUCKETS, registry=r)
        self.batch_size = Histogram("badexpert_batch_size", "Images per model forward", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("badexpert_queue_depth", "Images waiting for the model", registry=r)
        self.http_requests = Counter("badexpert_http_requests", "HTTP responses by status code", ["status"], registry=r)
        self.overload = Counter("badexpert_overload", "Requests refused with 503 because the queue was full", registry=r)
        self.bundle_info = Info("badexpert_bundle", "The bundle being served", registry=r)
        self.quarantine_skipped = Counter("badexpert_quarantine_skipped", "Flagged images whose original bytes "
                                          "were not quarantined, by reason", ["reason"], registry=r)
        self.quarantine_reasons = {reason: self.quarantine_skipped.labels(reason=reason) for reason in QUARANTINE_REASONS}
        self.reloads = Counter("badexpert_bundle_reloads", "Hot swaps of the bundle by outcome (failure: the "
                               "candidate did not load or verify and the running bundle kept serving; busy: "
                               "refused while another reload ran)", ["outcome"], registry=r)
        self.reload_outcomes = {outcome: self.reloads.labels(outcome=outcome) for outcome in RELOAD_OUTCOMES}
        self.bundle_decisions = Counter("badexpert_bundle_decisions", "With a candidate bundle in shadow: the images "
                                        "both bundles scored, by bundle, role (live decides; candidate would have) "
                                        "and decision", ["bundle", "role", "decision"], registry=r)
        self.disagreements = Counter("badexpert_candidate_disagreements", "Images the live bundle and the candidate "
                                     "decided differently (one flagged, the other not)",
                                     ["live_bundle", "candidate_bundle"], registry=r)
        self.candidate_failures = Counter("badexpert_candidate_failures", "Batches the candidate bundle failed on "
                                          "(the live answers stood)", registry=r)
        self.score: Histogram | None = None
        self._class_children: dict[tuple[int, str], object] = {}
        self._class_names: list[str] = []
        self._status_children: dict[int, object] = {}

    def bind_bundle(self, bundle_id: str, tau: float, target_fpr: float, mode: str, class_names: Sequence[str]) -> None:
        """At load time and at each hot swap: score buckets from tau (the histogram starts again with the
        new bundle's buckets), one rejected-by-class series per class, the info."""
        if self.score is not None:
            self.registry.unregister(self.score)
            self.score = None
        if self.reveal_scores:
            self.score = Histogram("badexpert_score", "BaDExpert score of each image (low: backdoor-like; "
                                   f"flagged below tau={tau:g})", buckets=score_buckets(tau), registry=self.registry)
        self._class_names = list(class_names)
        for index, name in enumerate(class_names):
            self._class_child(index, name)
        info = {"bundle_id": bundle_id, "tau": repr(float(tau)), "target_fpr": repr(float(target_fpr)), "mode": mode}
        if not self.reveal_scores:
            del info["tau"]
        self.bundle_info.info(info)

    def _class_child(self, index: int, name: str):
        child = self._class_children.get((index, name))
        if child is None:
            child = self._class_children[(index, name)] = self.rejected_by_class.labels(
                predicted_class=str(index), class_name=name)
        return child

    def bind_candidate(self, live_bundle: str, candidate_bundle: str) -> None:
        """When a candidate goes in shadow: its series exist at zero from then on (rates start from them)."""
        for bundle, role in ((live_bundle, "live"), (candidate_bundle, "candidate")):
            for decision in DECISIONS:
                self.bundle_decisions.labels(bundle=bundle, role=role, decision=decision)
        self.disagreements.labels(live_bundle=live_bundle, candidate_bundle=candidate_bundle)

    def record_candidate(self, live_bundle: str, live_flagged: Sequence[bool], candidate_bundle: str,
                         candidate_flagged: Sequence[bool]) -> None:
        """One request's images as decided by the live bundle and as the candidate in shadow would have."""
        for bundle, role, flags in ((live_bundle, "live", live_flagged), (candidate_bundle, "candidate", candidate_flagged)):
            rejected = sum(bool(flag) for flag in flags)
            self.bundle_decisions.labels(bundle=bundle, role=role, decision="rejected").inc(rejected)
            self.bundle_decisions.labels(bundle=bundle, role=role, decision="accepted").inc(len(flags) - rejected)
        differ = sum(bool(a) != bool(b) for a, b in zip(live_flagged, candidate_flagged))
        self.disagreements.labels(live_bundle=live_bundle, candidate_bundle=candidate_bundle).inc(differ)

    def count_reload(self, outcome: str) -> None:
        self.reload_outcomes[outcome].inc()

    def count_quarantine_skipped(self, reason: str) -> None:
        self.quarantine_reasons[reason].inc()

    def count_status(self, status: int) -> None:
        child = self._status_children.get(status)
        if child is None:
            child = self._status_children[status] = self.http_requests.labels(status=str(status))
        child.inc()

    def record_inputs(self, labels: Sequence[int], scores: Sequence[float], flagged: Sequence[bool],
                      class_names: Sequence[str] | None = None) -> None:
        """Count one request's images; ``class_names``: of the bundle that decided (default: the bound one)."""
        class_names = self._class_names if class_names is None else class_names
        accepted = rejected = 0
        for label, score, flag in zip(labels, scores, flagged):
            if flag:
                rejected += 1
                self._class_child(label, class_names[label]).inc()
            else:
                accepted += 1
            if self.score is not None and math.isfinite(score):
                self.score.observe(score)
        if accepted:
            self.decision["accepted"].inc(accepted)
        if rejected:
            self.decision["rejected"].inc(rejected)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
