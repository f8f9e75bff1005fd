"""Shared helpers for the benchmark suites: GFLOP/s bookkeeping and its summary table.

A benchmark that knows its floating-point operation count registers it with `record_flop`; after the
run, the terminal summary lists GFLOP/s (from each benchmark's best and median time) per group, so
lmlab and its numpy baseline measured in the same run sit side by side.
"""

from __future__ import annotations

import pytest

_FLOP = {}  # benchmark fixture -> (group, name, floating-point operations per call)


@pytest.fixture
def record_flop(benchmark):
    """Call with (group, label, flop) before timing; the summary turns times into GFLOP/s."""

    def record(group: str, label: str, flop: float) -> None:
        benchmark.extra_info["flop"] = flop
        _FLOP[benchmark] = (group, label, flop)

    return record


def pytest_terminal_summary(terminalreporter):
    rows = []
    for bench, (group, label, flop) in _FLOP.items():
        stats = getattr(bench, "stats", None)
        if stats is None or getattr(stats, "stats", None) is None:
            continue  # --benchmark-disable: nothing was timed
        rows.append((group, label, flop / stats.stats.min / 1e9, flop / stats.stats.median / 1e9))
    if not rows:
        return
    terminalreporter.section("GFLOP/s (best, median)")
    for group, label, best, median in sorted(rows):
        terminalreporter.write_line(f"{group:<42} {label:<8} {best:8.1f} {median:8.1f}")
