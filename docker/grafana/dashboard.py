"""The Grafana dashboard of the BaDExpert guard, as code (grafana-foundation-sdk, Grafana's own builders).

    python docker/grafana/dashboard.py          # writes docker/grafana/dashboards/badexpert.json
    python docker/grafana/dashboard.py --check  # exit 1 when the committed JSON differs from this program

tests/test_deploy.py fails when the two disagree; tests/test_deploy_integration.py asks a real
Prometheus every query below. Panels are placed row by row, left to right (widths add up to 24).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, dashboard, heatmap, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (DashboardCursorSync, DataSourceRef, DataTransformerConfig,
                                                     DynamicConfigValue, GridPos, Threshold, ThresholdsMode,
                                                     ValueMap, ValueMappingResult, VariableRefresh, VariableSort)

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "badexpert.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="badexpert-prometheus")
I = 'instance=~"$instance"'  # every series filtered by the replica variable
GUARD_ALERTS = "BadExpertRejectionRateAboveBand|BadExpertRejectionRateBelowBand|BadExpertAttackConcentration|" \
               "BadExpertCleanScoreDrift"


def query(expr: str, legend: str, instant: bool = False, fmt: str = "time_series") -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).legend_format(legend).format(fmt).datasource(DATASOURCE)
    return q.instant() if instant else q.range()


def rate_of(metric: str, window: str = "$__rate_interval", selector: str = I) -> str:
    return f"sum(rate({metric}{{{selector}}}[{window}]))"


def ratio(numerator: str, denominator: str) -> str:
    return f"{numerator}\n  /\n{denominator}"


def thresholds(*steps: tuple[str, float | None]):
    return dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(color=color, value=value) for color, value in steps])


def dashed(color: str) -> list[DynamicConfigValue]:
    return [DynamicConfigValue("custom.lineStyle", {"fill": "dash", "dash": [10, 10]}),
            DynamicConfigValue("color", {"mode": "fixed", "fixedColor": color}),
            DynamicConfigValue("custom.fillOpacity", 0)]


def big_number(title: str, description: str, unit: str, *targets, decimals: int | None = 0, colors=(("blue", None),)):
    panel = (stat.Panel().title(title).description(description).unit(unit).thresholds(thresholds(*colors))
             .color_mode(common.BigValueColorMode.BACKGROUND).graph_mode(common.BigValueGraphMode.AREA)
             .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False)).datasource(DATASOURCE))
    if decimals is not None:
        panel = panel.decimals(decimals)
    return _targets(panel, targets)


def graph(title: str, description: str, unit: str, *targets, bars: bool = False, dashed_series=()):
    panel = (timeseries.Panel().title(title).description(description).unit(unit).datasource(DATASOURCE)
             .line_width(1).fill_opacity(60 if bars else 10).show_points(common.VisibilityMode.NEVER)
             .draw_style(common.GraphDrawStyle.BARS if bars else common.GraphDrawStyle.LINE).axis_soft_min(0))
    for name, color in dashed_series:
        panel = panel.override_by_name(name, dashed(color))
    return _targets(panel, targets)


def _targets(panel, targets):
    for ref_id, target in zip("ABCDEFGH", targets):
        panel = panel.with_target(target.ref_id(ref_id))
    return panel


def panels() -> list[tuple[int, int, object]]:
    """(height, width, panel) in reading order."""
    rejected = f'badexpert_inputs_total{{decision="rejected", {I}}}'
    score = f"sum by (le) (rate(badexpert_score_bucket{{{I}}}[$__rate_interval]))"
    latency = f"sum by (le) (rate(badexpert_request_duration_seconds_bucket{{{I}}}[$__rate_interval]))"
    alert = (f'max(ALERTS{{alertname=~"{GUARD_ALERTS}", alertstate="firing"}}) * 2\n'
             f'  or on() max(ALERTS{{alertname=~"{GUARD_ALERTS}", alertstate="pending"}})\n  or on() vector(0)')
    states = ValueMap({str(i): ValueMappingResult(text=text, index=i) for i, text in enumerate(("OK", "PENDING", "FIRING"))})
    bundle_table = (table.Panel().title("Bundle served").datasource(DATASOURCE).description(
        "The bundle each selected replica serves: its id, the rejection threshold tau, the target FPR it was "
        "calibrated for, and the mode (enforce rejects flagged inputs; shadow only records them).")
        .with_transformation(DataTransformerConfig(id_val="organize", options={
            "excludeByName": {"Time": True, "Value": True},
            "indexByName": {"bundle_id": 0, "tau": 1, "target_fpr": 2, "mode": 3}})))
    heat = (heatmap.Panel().title("Score distribution (flagged below tau = $tau)").datasource(DATASOURCE).calculate(False)
            .description("How many inputs fell in each score bucket per interval. Inputs scoring below tau are "
                         "flagged: tau is itself a bucket bound (the row labelled $tau), and the buckets are dense "
                         "around it. Clean traffic piles up well above tau; a band at low scores is triggered inputs."))
    top = (bargauge.Panel().title("Top flagged classes (time range)").datasource(DATASOURCE).unit("short").decimals(0)
           .min(0).orientation(common.VizOrientation.HORIZONTAL).display_mode(common.BarGaugeDisplayMode.GRADIENT)
           .description("The ten predicted classes with the most flagged inputs during the dashboard's time range."))
    return [
        # the state at a glance
        (4, 5, big_number("Rejection rate (last 5 min)", "Flagged inputs / all scored inputs over the last 5 "
                          "minutes, all selected replicas. On clean traffic it stays inside the bundle's FPR band "
                          "(panel below).", "percentunit",
                          query(ratio(rate_of('badexpert_inputs_total', "5m", f'decision="rejected", {I}'),
                                      rate_of("badexpert_inputs_total", "5m")), "rejection rate", True), decimals=2)),
        (4, 4, big_number("Flagged inputs (time range)", "Inputs the guard rejected (in shadow mode: would have "
                          "rejected) during the dashboard's time range.", "short",
                          query(f"sum(increase({rejected}[$__range]))", "flagged", True))),
        (4, 4, big_number("Inputs scored (time range)", "All images the guard scored during the dashboard's time "
                          "range.", "short", query(f"sum(increase(badexpert_inputs_total{{{I}}}[$__range]))",
                                                   "scored", True))),
        (4, 3, big_number("Replicas up", "Guard replicas Prometheus scraped successfully (job badexpert-guard).",
                          "none", query(f'sum(up{{job="badexpert-guard", {I}}})', "up", True),
                          colors=(("red", None), ("green", 1)))),
        (4, 3, big_number("Guard alerts", "The worst state of the guard's alerts (FPR band, attack concentration, "
                          "drift): OK, PENDING or FIRING. docs/deploy.md, 'When an alert fires', says what to do.",
                          "none", query(alert, "alert", True), decimals=None,
                          colors=(("green", None), ("orange", 1), ("red", 2))).mappings([states])),
        (4, 5, _targets(bundle_table, [query(f"max by (bundle_id, tau, target_fpr, mode) "
                                             f"(badexpert_bundle_info{{{I}}})", "__auto", True, "table")])),
        # what the guard rejects, against what the bundle promised
        (8, 12, graph("Rejection rate", "Flagged inputs / all scored inputs, over time. The dashed line is the "
                      "bundle's target FPR; a sustained rise above it means triggered inputs are arriving, or the "
                      "clean traffic has drifted.", "percentunit",
                      query(ratio(rate_of("badexpert_inputs_total", selector=f'decision="rejected", {I}'),
                                  rate_of("badexpert_inputs_total")), "rejection rate"),
                      query("vector($target_fpr)", "target FPR"), dashed_series=(("target FPR", "orange"),))),
        (8, 12, graph("Rejection rate inside the bundle's FPR band (1 h)", "Each bundle's rejection rate over the "
                      "last hour (live, and a candidate in shadow) between the low and high ends of the range its "
                      "calibration promises on clean traffic. The alerts fire when the rate leaves the band by more "
                      "than the images seen can explain (a binomial test).", "percentunit",
                      query("badexpert:bundle_rejection_rate:ratio1h", "{{role}} {{bundle}} rate"),
                      query('badexpert:fpr_band{bound="high"}', "{{role}} {{bundle}} band high"),
                      query('badexpert:fpr_band{bound="low"}', "{{role}} {{bundle}} band low"))
                .override_by_regexp(".* band .*", dashed("orange"))),
        (8, 8, graph("Rejected inputs per predicted class", "Flagged inputs per second, by the class the model "
                     "predicted for them. A backdoor sends its triggered inputs to its target class, so an attack "
                     "shows as one class standing out; rejections spread over all classes point to drifted clean "
                     "traffic instead.", "short",
                     query(f"sum by (predicted_class, class_name) (rate(badexpert_rejected_by_class_total{{{I}}}"
                           f"[$__rate_interval])) > 0", "{{predicted_class}} {{class_name}}"), bars=True)),
        (8, 10, graph("Flagged share vs accepted share per predicted class (15 min)", "Of the flagged inputs of "
                      "the last 15 minutes, the share each predicted class holds, against its share of accepted "
                      "traffic. Clean rejections follow the accepted shares; a class holding most flagged inputs "
                      "far above its accepted share is under attack (BadExpertAttackConcentration).", "percentunit",
                      query("badexpert:flagged_share:ratio15m", "flagged {{class_name}}"),
                      query("badexpert:accepted_share:ratio15m", "accepted {{class_name}}"))
                .override_by_regexp("accepted .*", dashed("text"))),
        (8, 6, _targets(top, [query(f"topk(10, sum by (predicted_class, class_name) (increase("
                                    f"badexpert_rejected_by_class_total{{{I}}}[$__range])) > 0)",
                                    "{{predicted_class}} {{class_name}}", True)])),
        # scores
        (9, 10, _targets(heat, [query(score.replace("rate(", "increase(", 1), "{{le}}", fmt="heatmap")])),
        (9, 8, graph("Score quantiles and tau", "Low quantiles of the score (flagged inputs are the low ones) "
                     "against the threshold tau (red dashed line): the share of inputs below the line is the "
                     "rejection rate.", "none",
                     *(query(f"histogram_quantile({q}, {score})", name)
                       for q, name in (("0.01", "p1"), ("0.05", "p5"), ("0.5", "median"))),
                     query("vector($tau)", "tau"), dashed_series=(("tau", "red"),))),
        (9, 6, graph("Clean-score drift", "Per replica and bundle: how far the scores above the calibration "
                     "median (where triggered inputs do not reach) are from the calibration scores, over the last "
                     "BADEXPERT_DRIFT_WINDOW images; 1 (dashed) is the level clean traffic passes once in 1,000 "
                     "windows. Above it for 10 minutes: recalibrate (badexpert calibrate).", "none",
                     query(f"max by (instance, bundle, role) (badexpert_clean_score_drift{{{I}}})",
                           "{{instance}} {{role}} {{bundle}}"),
                     query("vector(1)", "recalibrate above"), dashed_series=(("recalibrate above", "red"),))),
        # serving health
        (8, 8, graph("Request rate", "POST /predict requests per second (every response, errors included), and "
                     "images scored per second (a request may carry several).", "reqps",
                     query(rate_of("badexpert_request_duration_seconds_count"), "predict requests/s"),
                     query(rate_of("badexpert_inputs_total"), "images/s"))),
        (8, 8, graph("Latency p50 / p95 / p99", "Duration of POST /predict requests inside the server (decode, "
                     "queue, the three models, audit log), by quantile.", "s",
                     *(query(f"histogram_quantile({q}, {latency})", name)
                       for q, name in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))))),
        (8, 8, graph("Responses by status", "HTTP responses per second by status code, every endpoint (health "
                     "checks and scrapes included). 503 on /predict means a replica's queue was full (also counted "
                     "on its own as overload): add replicas. 400/413/415/422 are bad inputs from clients.", "reqps",
                     query(f"sum by (status) (rate(badexpert_http_requests_total{{{I}}}[$__rate_interval]))",
                           "{{status}}"),
                     query(rate_of("badexpert_overload_total"), "overload (503, queue full)"))),
        (7, 12, graph("Batch size", "Images per model forward: the server batches concurrent requests together (up "
                      "to BADEXPERT_MAX_BATCH_SIZE). Mean and p95.", "none",
                      query(ratio(rate_of("badexpert_batch_size_sum"), rate_of("badexpert_batch_size_count")), "mean"),
                      query("histogram_quantile(0.95, sum by (le) (rate(badexpert_batch_size_bucket"
                            f"{{{I}}}[$__rate_interval])))", "p95"))),
        (7, 12, graph("Queue depth", "Images waiting for the model, per replica. Beyond BADEXPERT_MAX_QUEUE "
                      "requests get 503 at once.", "none",
                      query(f"sum by (instance) (badexpert_queue_depth{{{I}}})", "{{instance}}"),
                      query(f"max(max_over_time(badexpert_queue_depth{{{I}}}[$__rate_interval]))",
                            "peak (any replica)"))),
        (8, 24, graph("Candidate in shadow: rejection rate and disagreement", "With a candidate bundle in shadow "
                      "(--shadow-bundle, or POST /v1/admin/shadow): the share of images each bundle flags on the "
                      "same traffic (live decides; candidate would have), and the share on which they disagree (one "
                      "flags, the other not). Promote the candidate (POST /v1/admin/promote or SIGUSR1) once its "
                      "rejection rate and disagreement look right. Empty without a candidate.", "percentunit",
                      query(f"sum by (bundle, role) (rate(badexpert_bundle_decisions_total{{decision=\"rejected\", "
                            f"{I}}}[$__rate_interval]))\n  /\nsum by (bundle, role) (rate("
                            f"badexpert_bundle_decisions_total{{{I}}}[$__rate_interval]))",
                            "{{role}} {{bundle}} rejection rate"),
                      query(ratio(rate_of("badexpert_candidate_disagreements_total"),
                                  rate_of("badexpert_bundle_decisions_total", selector=f'role="candidate", {I}')),
                            "disagreement live vs candidate"))),
    ]


def variable(name: str, label: str, selector: str, multi: bool = False):
    text = f"label_values({selector}, {name})"
    built = (dashboard.QueryVariable(name).label(label).query(text).datasource(DATASOURCE)
             .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC).multi(multi)
             .include_all(multi))
    return built.all_value(".*") if multi else built


def build() -> dict:
    board = (dashboard.Dashboard("BaDExpert guard: flagged inputs").uid("badexpert-guard")
             .description("Inputs the BaDExpert guard flagged as backdoor-triggered, its scores against the "
                          "bundle's promises (FPR band, calibration scores), and the serving health of every replica.")
             .tags(["badexpert", "backdoor", "ml-security"]).timezone("browser").readonly()
             .tooltip(DashboardCursorSync.CROSSHAIR).refresh("10s").time("now-1h", "now")
             .with_variable(variable("instance", "replica", "badexpert_bundle_info", multi=True))
             .with_variable(variable("tau", "tau", f"badexpert_bundle_info{{{I}}}"))
             .with_variable(variable("target_fpr", "target FPR", f"badexpert_bundle_info{{{I}}}")))
    x = y = row_height = 0
    for panel_id, (height, width, panel) in enumerate(panels(), start=1):
        if x + width > 24:
            x, y = 0, y + row_height
        board = board.with_panel(panel.id(panel_id).grid_pos(GridPos(h=height, w=width, x=x, y=y)))
        x, row_height = x + width, height
    document = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    for entry in document["templating"]["list"]:
        entry["definition"] = entry["query"]  # what Grafana's editor shows (and the deploy tests read)
    return document


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing it")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} differs from {__file__}: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
