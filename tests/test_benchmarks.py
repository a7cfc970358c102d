"""Benchmark scripts run end to end with tiny sizes and write the JSON keys they document.

Only ``memory.py`` is covered so far: the throughput and gradient smoke tests were not verified
before the branch was handed over (see benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO

if str(REPO) not in sys.path:  # the scripts live in benchmarks/, outside the installed package
    sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.slow  # compiles the cohort growth and the simulator (~100 s on 2 shared cores)

TINY = ["--n", "2", "--days", "20"]


def test_memory_script_reports_peak_rss_and_trajectory_size(tmp_path):
    from benchmarks import memory

    out = tmp_path / "m.json"
    memory.main(memory.build_parser().parse_args(TINY + ["--chunk", "2", "--json", str(out)]))
    res = json.loads(out.read_text())
    # 2 patients x 21 daily points x 53 states x 8 bytes
    assert res["trajectory_bytes"] == 2 * 21 * 53 * 8
    assert res["peak_rss_mib"] >= res["peak_rss_mib_before"] > 0
