"""``python -m bench.allocator`` on the tiny model: two child processes, one per allocator setting,
each timing every batch size on a thread that is not the main one; a row per setting (timings and
fault counts are not checked: they depend on the machine)."""

from __future__ import annotations

from bench import allocator


def test_the_allocator_bench_prints_a_row_per_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BADEXPERT_CACHE", str(tmp_path))  # the children's bundle cache: bench.serve reads it
    assert allocator.main(["--model", "tiny", "--sizes", "1", "16", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "faults |" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| glibc's thresholds (0)",
                                                      f"| kept (--retain-freed-mb {allocator.RETAIN_FREED_MB})"]
    for row in rows:
        assert len(row.split(" | ")) == 3, row  # the setting and one cell per batch size
