"""``python -m bench.serve --quick`` against a tiny model: every request answered, every row in
the table (timings are not checked: they depend on the machine)."""

from __future__ import annotations

import json

import pytest

from bench import serve


@pytest.mark.integration
def test_quick_serving_bench_runs_and_writes_its_table(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "BUNDLES", tmp_path / "bundles")
    assert serve.main(["--quick", "--models", "tiny", "--duration", "0.3", "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "serve.md").read_text()
    summary = json.loads((tmp_path / "out" / "serve.json").read_text())
    for path in ("bare model in-process, batch 64", "bare model in-process, batch 1", "guard in-process, batch 64",
                 "guard in-process, jit engine, batch 64 / batch 1",
                 "batching gain (64 clients / 1 client)", *(scenario.name for scenario in serve.SCENARIOS)):
        assert f"| {path} |" in markdown, path
    rows = summary["results"][0]["http"]
    assert len(rows) == len(serve.SCENARIOS)
    for row in rows:
        assert row["statuses"].get("200", 0) > 0, row
        assert set(row["statuses"]) == {"200"}, row  # not one refusal or error, 64 clients included
        assert row["mean_batch"] is not None and row["mean_batch"] >= 1


@pytest.mark.integration
def test_side_by_side_comparison_runs_every_configuration(tmp_path, monkeypatch, capsys):
    from bench import serve_ab

    monkeypatch.setattr(serve, "BUNDLES", tmp_path / "bundles")
    assert serve_ab.main(["--model", "tiny", "--duration", "0.3", "--rounds", "1", "eager=--engine eager", "jit="]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["eager", "jit"]
    assert all(" failed 0 " in line for line in lines[1:])
