"""Benchmark scripts run end to end with tiny sizes and write the JSON keys they document.

``gradient.py`` is not run here: its reverse-mode compilation alone takes ~90 s on 2 cores (the
gradient it measures is tested against finite differences in test_simulate/test_rosenbrock);
its recorded runs are in benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPO

if str(REPO) not in sys.path:  # the scripts live in benchmarks/, outside the installed package
    sys.path.insert(0, str(REPO))

pytestmark = pytest.mark.slow  # compiles the cohort growth and the simulator (~100 s on 2 shared cores)

# Both scripts run at one size (2 patients, 10 days, chunks of 2) so that the second reuses the
# cohort growth and simulator the first compiled (same shapes, same process: ~30 s saved).
TINY = ["--n", "2", "--days", "10", "--chunk", "2"]


def test_memory_script_reports_peak_rss_and_trajectory_size(tmp_path):
    from benchmarks import memory

    out = tmp_path / "m.json"
    memory.main(memory.build_parser().parse_args(TINY + ["--json", str(out)]))
    res = json.loads(out.read_text())
    # 2 patients x 11 daily points x 53 states x 8 bytes
    assert res["trajectory_bytes"] == 2 * 11 * 53 * 8
    assert res["peak_rss_mib"] >= res["peak_rss_mib_before"] > 0
    assert res["n_growth_failed"] == res["n_treatment_failed"] == 0


def test_throughput_script_runs_all_three_solvers_and_they_agree(tmp_path):
    from benchmarks import throughput

    out = tmp_path / "t.json"
    throughput.main(throughput.build_parser().parse_args(
        TINY + ["--reference-n", "1", "--json", str(out)]))
    res = json.loads(out.read_text())
    assert res["qspjax"]["n_failed"] == 0 and res["qspjax"]["patients_per_second"] > 0
    for ref in ("scipy", "roadrunner"):
        assert res[ref]["speedup"] > 0
        # same model, same tolerances (rtol 1e-6): final diameters agree far inside 1e-4
        assert res[ref]["max_rel_diff_final_diameter"] < 1e-5, (ref, res[ref])
    assert res["roadrunner"]["n_failed"] == 0, res["roadrunner"]["failures"]


def test_inference_script_reports_ess_per_second(tmp_path):
    from benchmarks import inference

    out = tmp_path / "i.json"
    inference.main(inference.build_parser().parse_args(
        ["--simulator", "kinetics", "--max-arms", "2", "--patients", "4", "--horizon", "56", "--chains", "1",
         "--warmup", "20", "--samples", "20", "--quiet", "--json", str(out)]))
    res = json.loads(out.read_text())
    assert len(res["arms"]) == 2 and res["n_parameters"] == len(res["parameters"]) >= 2
    assert res["sampling_seconds"] > 0 and res["leapfrog_steps_of_draws"] >= 20
    for v in res["parameters"].values():
        assert v["ess_bulk"] > 0 and v["ess_bulk_per_second"] == v["ess_bulk"] / res["sampling_seconds"]


def test_objective_script_times_the_run_files_objective(tmp_path):
    from benchmarks import objective

    out = tmp_path / "o.json"
    res = objective.main(objective.build_parser().parse_args(
        ["--patients", "2", "--horizon-days", "30", "--max-arms", "1", "--repeats", "1", "--json", str(out)]))
    doc = json.loads(out.read_text())  # strict JSON: a NaN or an infinity would not parse back equal
    assert doc["arms"] == 1 and doc["patients"] == 2 and doc["solver"] == "rodas5p"
    for name in ("forward", "value_and_grad"):
        assert doc[name]["seconds"] > 0 and doc[name]["compile_seconds"] >= 0
    assert doc["value_and_grad"]["gradient_finite"]
    # the value of the value-and-gradient is the forward log posterior
    assert doc["value_and_grad"]["value"] == pytest.approx(doc["forward"]["value"], rel=1e-10)
    assert res["ratio_gradient_to_forward"] == pytest.approx(
        doc["value_and_grad"]["seconds"] / doc["forward"]["seconds"])
