"""``bench.serve``'s Markdown table: per model, the in-process paths and each HTTP scenario as the
median over the interleaved rounds, the range beside it, and the ratios to the bare model taken
within each round (TorchScript, the best bare engine, first; eager beside it)."""

from __future__ import annotations

import statistics

IN_PROCESS = (("bare", "bare model in-process"), ("bare_torchscript", "bare TorchScript (frozen, optimized) in-process"),
              ("guard", "guard in-process"), ("guard_fused", "guard in-process, fused engine"),
              ("guard_jit", "guard in-process, jit engine"),
              ("guard_jit_served", "guard in-process, jit engine as served (merged networks up to 8 images, "
                                   "on 1 thread and M' beside them)"))
HEADER = ("| model | path | img/s median (range) | vs bare TorchScript b64 (range) | vs bare eager b64 | p50 ms "
          "| p99 ms | p50 / bare TorchScript b1 (range) | p50 / bare eager b1 | server CPU ms/img | mean batch "
          "| statuses |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def _spread(values: list[float], digits: int = 0, suffix: str = "") -> str:
    values = [value for value in values if value is not None]
    if not values:
        return ""
    middle = f"{statistics.median(values):,.{digits}f}{suffix}"
    if len(values) == 1:
        return middle
    return f"{middle} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def http_rows(rounds: list[dict], label: str = "after") -> list[dict]:
    """Each scenario's rounds against one server, gathered: rounds' rows, summed statuses, mean batch."""
    by_scenario: dict[str, list[dict]] = {}
    for measured in rounds:
        for row in measured["http"].get(label, []):
            by_scenario.setdefault(row["scenario"], []).append(row)
    gathered = []
    for name, rows in by_scenario.items():
        statuses: dict[str, int] = {}
        for row in rows:
            for status, count in row["statuses"].items():
                statuses[status] = statuses.get(status, 0) + count
        batches = [row["mean_batch"] for row in rows if row["mean_batch"] is not None]
        gathered.append({**{key: rows[0][key] for key in ("scenario", "clients", "images_per_request", "body")},
                         "images_per_s": statistics.median(row["images_per_s"] for row in rows),
                         "p50_ms": statistics.median(row["p50_ms"] for row in rows),
                         "statuses": statuses, "mean_batch": statistics.median(batches) if batches else None,
                         "rounds": rows})
    return gathered


def _in_process_lines(model: str, rounds: list[dict]) -> list[str]:
    lines = []
    local = [measured["in_process"] for measured in rounds]
    for key, label in IN_PROCESS:
        if not all(key in one for one in local):
            continue
        throughput = [one[key]["batch64_images_per_s"] for one in local]
        latency = [one[key]["batch1_ms"] for one in local]
        to_script = [one[key]["batch64_images_per_s"] / one["bare_torchscript"]["batch64_images_per_s"] for one in local]
        to_eager = [one[key]["batch64_images_per_s"] / one["bare"]["batch64_images_per_s"] for one in local]
        cpu = [one[key]["batch64_cpu_ms_per_image"] for one in local]
        lines.append(f"| {model} | {label}, batch 64 | {_spread(throughput)} | {_spread(to_script, 2)} | "
                     f"{_spread(to_eager, 2)} | | | | | {_spread(cpu, 2)} | 64 | |")
        latency_script = [one[key]["batch1_ms"] / one["bare_torchscript"]["batch1_ms"] for one in local]
        latency_eager = [one[key]["batch1_ms"] / one["bare"]["batch1_ms"] for one in local]
        lines.append(f"| {model} | {label}, batch 1 | {_spread([1000 / value for value in latency])} | | | "
                     f"{_spread(latency, 2)} | | {_spread(latency_script, 1)} | {_spread(latency_eager, 1)} | | 1 | |")
        if key == "guard_jit":  # the name the serving tests look for
            lines.append(f"| {model} | guard in-process, jit engine, batch 64 / batch 1 | {_spread(throughput)} | "
                         f"{_spread(to_script, 2)} | | {_spread(latency, 2)} | | {_spread(latency_script, 1)} | | | | |")
    return lines


def _http_lines(model: str, rounds: list[dict], label: str, shown: str) -> list[str]:
    lines = []
    for row in http_rows(rounds, label):
        per_round = list(zip(row["rounds"], rounds))
        throughput = [one["images_per_s"] for one, _ in per_round]
        to_script = [one["images_per_s"] / measured["in_process"]["bare_torchscript"]["batch64_images_per_s"]
                     for one, measured in per_round]
        to_eager = [one["images_per_s"] / measured["in_process"]["bare"]["batch64_images_per_s"] for one, measured in per_round]
        p50_script = [one["p50_ms"] / measured["in_process"]["bare_torchscript"]["batch1_ms"] for one, measured in per_round]
        p50_eager = [one["p50_ms"] / measured["in_process"]["bare"]["batch1_ms"] for one, measured in per_round]
        statuses = ", ".join(f"{code}: {count}" for code, count in sorted(row["statuses"].items()))
        lines.append(f"| {model} | {row['scenario']}{shown} | {_spread(throughput)} | {_spread(to_script, 3)} | "
                     f"{_spread(to_eager, 3)} | {_spread([one['p50_ms'] for one, _ in per_round], 1)} | "
                     f"{_spread([one['p99_ms'] for one, _ in per_round], 1)} | {_spread(p50_script, 1)} | "
                     f"{_spread(p50_eager, 1)} | {_spread([one['server_cpu_ms_per_image'] for one, _ in per_round], 2)} | "
                     f"{row['mean_batch'] or 0:.1f} | {statuses} |")
    return lines


def table(results: list[dict], scenarios) -> str:
    lines = [HEADER]
    for result in results:
        model, rounds = f"{result['arch']} {result['input_size']}px", result["rounds"]
        lines += _in_process_lines(model, rounds)
        labels = [("after", "")] + ([("before", " (before)")] if result.get("before") else [])
        for label, shown in labels:
            lines += _http_lines(model, rounds, label, shown)
            by_name = {row["scenario"]: row for row in http_rows(rounds, label)}
            one, many = by_name.get(scenarios[0].name), by_name.get(scenarios[2].name)
            if one and many and one["images_per_s"]:
                gain = many["images_per_s"] / one["images_per_s"]
                result.setdefault("batching_gain_64_vs_1", {})[label] = gain
                lines.append(f"| {model} | batching gain (64 clients / 1 client){shown} | {gain:.2f}x "
                             "| | | | | | | | | |")
        result["http"] = http_rows(rounds)
    return "\n".join(lines) + "\n"
