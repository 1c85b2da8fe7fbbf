"""The guard as operated: what the alert rules compare live traffic with, on the app's registry.

    badexpert_fpr_band{bundle,role,bound="target"|"low"|"expected"|"high"}  gauge (the bundle's FPR promise)
    badexpert_bundle_inputs_total{bundle,role,decision}                    counter (every image, by the bundle
                                                                           that decided it or, in shadow, would have)
    badexpert_accepted_by_class_total{predicted_class,class_name}          counter (the baseline of concentration)
    badexpert_clean_score_drift{bundle,role}                               gauge (service/drift.py; coarse)

One band and one drift window per live bundle and per candidate in shadow; a hot swap or a new
candidate replaces them (the old bundle's gauges go). Nothing here exposes a score or tau: the drift
gauge is a window statistic, rounded (to 0.01; under ``decision_only``, to 0.1), computed when
``/metrics`` is read. A request only adds its scores to the window and counts its images, on
series children looked up when the bundle was followed, not per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from service.decisions import Decisions
from service.drift import DriftWindow, UpperTail
from service.live_checks import BOUNDS, FprBand
from service.metrics import ServiceMetrics
from service.served_bundle import ServedBundle
from service.settings import ServiceSettings
from service.shadow import CandidateDecisions, Lineup

DRIFT_DIGITS = {"full": 2, "decision_only": 1}  # by response policy


@dataclass
class _Watched:
    bundle_id: str
    drift: DriftWindow | None
    inputs: dict[str, object]  # decision -> its counter's series


class LiveMonitoring:
    """The live checks' series of one app: per role ("live", "candidate") the bundle followed, its band
    gauges and its drift window."""

    def __init__(self, registry: CollectorRegistry, drift_window: int, drift_blocks: int,
                 response_policy: str = "full"):
        self.drift_window, self.drift_blocks = drift_window, drift_blocks
        self.drift_digits = DRIFT_DIGITS[response_policy]
        self.band = Gauge("badexpert_fpr_band", "The bundle's promise on clean traffic like its calibration "
                          "images: target FPR, expected FPR and the 95% range of the realized FPR",
                          ["bundle", "role", "bound"], registry=registry)
        self.inputs = Counter("badexpert_bundle_inputs", "Images scored, by the bundle that decided (role live) "
                              "or would have (role candidate, in shadow) and its decision",
                              ["bundle", "role", "decision"], registry=registry)
        self.accepted_by_class = Counter("badexpert_accepted_by_class", "Accepted images by the model's "
                                         "predicted class (the baseline of the flagged shares)",
                                         ["predicted_class", "class_name"], registry=registry)
        self.drift = Gauge("badexpert_clean_score_drift", "Departure of the window's scores above the calibration "
                           "median from the calibration scores (chi-square over its 1-in-1000 value; >1: "
                           "recalibrate)", ["bundle", "role"], registry=registry)
        self._watched: dict[str, _Watched] = {}
        self._class_names: Sequence[str] | None = None  # the bound names (the live bundle's list)
        self._accepted_by_class: list = []  # their series, by class index

    @classmethod
    def for_service(cls, registry: CollectorRegistry, settings: ServiceSettings) -> "LiveMonitoring":
        return cls(registry, settings.drift_window, settings.drift_blocks, settings.response_policy)

    def follow(self, role: str, bundle_id: str | None, manifest=None) -> None:
        """The bundle now in ``role`` (None: no candidate): its band and a fresh drift window."""
        old = self._watched.get(role)
        if old is not None and old.bundle_id == bundle_id:
            return
        if old is not None:
            for bound in BOUNDS:
                _remove(self.band, old.bundle_id, role, bound)
            _remove(self.drift, old.bundle_id, role)
            del self._watched[role]
        if bundle_id is None:
            return
        band = FprBand.from_manifest(manifest)
        for bound, value in (band.as_dict() if band else {}).items():
            self.band.labels(bundle=bundle_id, role=role, bound=bound).set(value)
        inputs = {decision: self.inputs.labels(bundle=bundle_id, role=role, decision=decision)  # rates start at 0
                  for decision in ("accepted", "rejected")}
        calibration = manifest.calibration or {}
        tail = UpperTail.from_quantiles(calibration.get("score_quantiles"), calibration.get("n"))
        window = DriftWindow(tail, self.drift_window, self.drift_blocks) if tail else None
        if window is not None:
            digits = self.drift_digits
            self.drift.labels(bundle=bundle_id, role=role).set_function(lambda: round(window.statistic(), digits))
        self._watched[role] = _Watched(bundle_id, window, inputs)

    def bind_classes(self, class_names: Sequence[str]) -> None:
        self._class_names = class_names
        self._accepted_by_class = [self.accepted_by_class.labels(predicted_class=str(index), class_name=name)
                                   for index, name in enumerate(class_names)]

    def record(self, role: str, bundle_id: str, labels: Sequence[int], scores: Sequence[float],
               flagged: Sequence[bool], class_names: Sequence[str] | None = None) -> None:
        """One request's images as ``bundle_id`` decided them (``class_names``: live only, per-class counts)."""
        watched = self._watched.get(role)
        followed = watched is not None and watched.bundle_id == bundle_id
        rejected = sum(bool(flag) for flag in flagged)
        for decision, count in (("rejected", rejected), ("accepted", len(flagged) - rejected)):
            series = watched.inputs[decision] if followed else \
                self.inputs.labels(bundle=bundle_id, role=role, decision=decision)
            series.inc(count)
        if class_names is not None:
            bound = class_names is self._class_names
            for label, flag in zip(labels, flagged):
                if not flag and 0 <= label < len(class_names):
                    series = self._accepted_by_class[label] if bound else \
                        self.accepted_by_class.labels(predicted_class=str(label), class_name=class_names[label])
                    series.inc()
        if followed and watched.drift is not None:
            watched.drift.add(scores)  # its gauge computes the statistic when /metrics is read


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def follow_lineup(metrics: ServiceMetrics, monitoring: LiveMonitoring, lineup: Lineup) -> None:
    """A new lineup (load, hot swap, candidate set, dropped or promoted): the candidate's shadow series,
    and each role's band and drift window."""
    live, candidate = lineup.live, lineup.candidate
    if candidate is not None:
        metrics.bind_candidate(live.bundle_id, candidate.bundle_id)
    monitoring.follow("live", live.bundle_id, live.manifest)
    monitoring.bind_classes(live.class_names)
    monitoring.follow("candidate", candidate and candidate.bundle_id, candidate and candidate.manifest)


def record_request(metrics: ServiceMetrics, monitoring: LiveMonitoring, bundle: ServedBundle, decisions: Decisions,
                   flagged: list[bool], candidate: CandidateDecisions | None) -> None:
    """One request's images, as the live bundle decided them (and the candidate in shadow would have),
    to the service's metrics and to the live checks."""
    metrics.record_inputs(decisions.labels, decisions.scores, flagged, bundle.class_names)
    monitoring.record("live", bundle.bundle_id, decisions.labels, decisions.scores, flagged, bundle.class_names)
    if candidate is not None:
        metrics.record_candidate(bundle.bundle_id, flagged, candidate.bundle.bundle_id, candidate.flagged)
        monitoring.record("candidate", candidate.bundle.bundle_id, candidate.labels, candidate.scores,
                          candidate.flagged)
