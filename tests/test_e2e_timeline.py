"""benchmarks/e2e_timeline.py's accounting of a profiled request (the GPU part runs on a GPU only):
busy time is the union of overlapping kernels, and only idle stretches of at least the threshold are gaps."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from e2e_timeline import gaps_of, host_call_at  # noqa: E402


def test_busy_time_is_the_union_and_gaps_have_their_neighbours():
    kernels = [(0, 10, "a"), (5, 12, "b"), (20, 30, "c"), (31, 40, "d"), (100, 110, "e")]
    busy, gaps = gaps_of(kernels, 3)
    assert busy == 12 + 10 + 9 + 10  # a and b overlap; the 1 us between c and d is idle but no gap
    assert [(g["at_us"], g["us"], g["before"], g["after"]) for g in gaps] == [(12, 8, "b", "c"), (40, 60, "d", "e")]
    busy, gaps = gaps_of(kernels, 100)
    assert busy == 41 and gaps == []
    assert gaps_of([], 3) == (0.0, [])


def test_host_call_is_the_innermost_open_one():
    cpu = [(0, 200, "generate"), (50, 120, "aten::item"), (130, 140, "aten::cat")]
    assert host_call_at(cpu, 60) == "aten::item"
    assert host_call_at(cpu, 125) == "generate"
    assert host_call_at(cpu, 300) == ""
