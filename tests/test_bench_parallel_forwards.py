"""``python -m bench.parallel_forwards`` on the tiny model: the parallel graph is built and each
path gets a row (timings are not checked: they depend on the machine)."""

from __future__ import annotations

from bench import parallel_forwards, serve


def test_the_parallel_forwards_bench_prints_a_row_per_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(serve, "BUNDLES", tmp_path / "bundles")
    assert parallel_forwards.main(["--model", "tiny", "--sizes", "1", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for path in ("serial graph, 1 thread", "serial graph, 2 threads", "parallel graph (B forked), 1 thread",
                 "serial graph on 2 slices, 2 threads of 1 torch thread"):
        assert f"| {path} |" in out, out
