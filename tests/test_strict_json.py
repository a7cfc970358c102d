"""Strict JSON everywhere: every JSON qspjax writes (and every JSON committed to the repository)
parses with a strict RFC 8259 reader, non-finite numbers become null with a reason beside them."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qspjax.io import NOT_REACHED, atomic_write_json, strict_json_dumps, strict_json_obj

from conftest import REPO


def _reject(token):
    raise ValueError(f"non-standard JSON token {token}")


def strict_load(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity, as browsers, jq and most languages do."""
    return json.loads(text, parse_constant=_reject)


def strict_load_file(path: Path):
    try:
        return strict_load(Path(path).read_text())
    except ValueError as exc:
        raise AssertionError(f"{path} is not strict JSON: {exc}") from None


def test_the_strict_parser_itself_refuses_the_tokens_python_writes_by_default():
    for token in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ValueError, match=token):
            strict_load(json.dumps({"x": float(token.replace("Infinity", "inf"))}))


def test_non_finite_numbers_nested_anywhere_become_null_with_a_reason_beside_the_key():
    obj = {
        "median_pfs_days": math.inf,
        "median_pfs_ci_days": (392.0, np.float64(np.inf)),
        "rhat": np.float32(np.nan),
        "trace": np.array([1.5, np.nan, -np.inf]),
        "arms": [{"loss": -math.inf, "n": np.int64(3)}, {"loss": 0.25}],
        "flag": np.bool_(True),
        "path": Path("a/b.json"),
        7: 1.0,
    }
    out = strict_json_obj(obj)
    assert out == {
        "median_pfs_days": None,
        "median_pfs_days_null_reason": NOT_REACHED,
        "median_pfs_ci_days": [392.0, None],
        "median_pfs_ci_days_null_reason": NOT_REACHED,
        "rhat": None,
        "rhat_null_reason": "not finite: nan",
        "trace": [1.5, None, None],
        "trace_null_reason": "not finite: 2 values (-inf, nan)",
        "arms": [{"loss": None, "loss_null_reason": "not finite: -inf", "n": 3}, {"loss": 0.25}],
        "flag": True,
        "path": "a/b.json",
        "7": 1.0,
    }
    assert type(out["arms"][0]["n"]) is int and type(out["flag"]) is bool
    # a single non-finite entry inside a list says where it was
    assert strict_json_obj({"x": [1.0, 2.0, math.nan]}) == {"x": [1.0, 2.0, None], "x_null_reason": "not finite: nan at [2]"}
    # -inf under a median is not "not reached"
    assert strict_json_obj({"median_x": -math.inf})["median_x_null_reason"] == "not finite: -inf"
    # the input is not modified
    assert obj["median_pfs_days"] == math.inf and np.isnan(obj["trace"][1])


def test_caller_reasons_win_and_apply_from_the_nearest_enclosing_key():
    reasons = {"median_pfs_days": "not reached: PFS curve above 0.5", "loss": "diverged"}
    obj = {"median_pfs_days": math.inf,
           "comparison": {"median_pfs_days": {"simulated": math.inf, "published": 150.0}},
           "other": {"loss": [0.0, math.nan]},
           "kept": math.nan, "kept_null_reason": "the caller's own"}
    out = strict_json_obj(obj, reasons)
    assert out["median_pfs_days_null_reason"] == "not reached: PFS curve above 0.5"
    assert out["comparison"]["median_pfs_days"] == {
        "simulated": None, "simulated_null_reason": "not reached: PFS curve above 0.5", "published": 150.0}
    assert out["other"] == {"loss": [0.0, None], "loss_null_reason": "diverged"}
    # a reason the object already carries is not overwritten
    assert out["kept"] is None and out["kept_null_reason"] == "the caller's own"


def test_atomic_write_json_writes_strict_json_and_finite_floats_round_trip_exactly(tmp_path):
    values = [0.1 + 0.2, 1e-300, -2.5e300, 1 / 3, np.float64(np.pi)]
    path = atomic_write_json(tmp_path / "s.json", {"v": values, "bad": [np.inf, np.nan], "median_os": np.inf})
    text = path.read_text()
    assert "Infinity" not in text and "NaN" not in text and text.endswith("}\n")
    doc = strict_load(text)
    assert doc["v"] == [float(v) for v in values]  # bit-exact, not rounded
    assert doc["bad"] == [None, None] and doc["bad_null_reason"] == "not finite: 2 values (inf, nan)"
    assert doc["median_os"] is None and doc["median_os_null_reason"] == NOT_REACHED
    # a top-level non-finite number is still written as strict JSON
    assert strict_load(strict_json_dumps([math.nan, 1.0])) == [None, 1.0]


def test_an_object_json_cannot_hold_is_refused_naming_where_it_is(tmp_path):
    with pytest.raises(TypeError, match=r"cannot write object as JSON \(at summary/solver\)"):
        atomic_write_json(tmp_path / "x.json", {"summary": {"solver": object()}})
    assert not (tmp_path / "x.json").exists()


def test_no_module_writes_json_except_through_the_strict_writer():
    """json.dump/json.dumps appear only in qspjax/io.py: every other writer goes through
    atomic_write_json (commands, inference, virtual trials, fits/*.py, benchmarks/*.py, tools)."""
    offenders = []
    for folder in ("qspjax", "fits", "benchmarks", "tools"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REPO / "qspjax" / "io.py":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\bjson\.dumps?\(|\.to_json\(|allow_nan\s*=\s*True", line):
                    offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "JSON written around the strict writer:\n" + "\n".join(offenders)


def _committed_json_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "*.json"], cwd=REPO, capture_output=True, text=True,
                                check=True, timeout=30).stdout.split()
        return [REPO / p for p in listed]
    except (OSError, subprocess.SubprocessError):  # not a git checkout: every JSON outside build folders
        skip = {".venv", "runs", ".git", "build", "dist"}
        return [p for p in REPO.rglob("*.json") if not skip & set(p.relative_to(REPO).parts)]


def test_every_committed_json_file_is_strict_json():
    files = _committed_json_files()
    assert any(p.parent.name == "benchmarks" for p in files) and any(p.parent.name == "fits" for p in files)
    for path in files:
        strict_load_file(path)


# ---------------------------------------------------------------------------------------------
# The writers, end to end
# ---------------------------------------------------------------------------------------------
def _cohort(n_patients=6, days=169, progress=()):
    """A hand-made two-lesion cohort: stable disease everywhere, except patients in ``progress``
    whose non-irradiated lesion grows 50 % by day 56 (so PFS events are known)."""
    from qspjax.regimen import load_regimen
    from qspjax.runner import CohortResult

    t = np.arange(0.0, days, 7.0)
    diam = np.full((n_patients, t.size, 2), 3.0)
    for i in progress:
        diam[i, :, 1] = np.where(t >= 56.0, 4.5, 3.0)
    return CohortResult(
        regimen=load_regimen(REPO / "configs/regimens/qspio_example1_nivolumab.yaml"),
        days=t, observables={"tumor_diameter_cm": diam}, status=np.zeros(n_patients, int),
        baseline_diameter_cm=diam[:, 0, :].sum(axis=1), tps_class=np.zeros(n_patients, int),
        drugs=("nivolumab",), lesions=("irradiated", "non_irradiated"),
        viable_fraction_at_surgery=np.full(n_patients, np.nan), meta={"solver": "hand-made", "rtol": 1e-6},
    )


def test_a_trial_whose_median_pfs_is_not_reached_writes_null_with_the_reason(tmp_path):
    from qspjax.io import provenance
    from qspjax.outcomes import NULL_REASONS
    from qspjax.virtual_trial import evaluate, write_trial

    result = _cohort(progress=(0,))  # 1 of 6 progresses: the PFS curve stays at 5/6
    outcome = evaluate(result)
    assert outcome.summary["median_pfs_days"] == math.inf  # what the writer has to deal with
    write_trial(tmp_path, result, outcome, provenance(seed=0),
                published={"orr": 0.2, "median_pfs_days": None, "median_pfs_ci_days": None})
    summary = strict_load_file(tmp_path / "summary.json")
    assert summary["median_pfs_days"] is None
    assert summary["median_pfs_days_null_reason"] == NULL_REASONS["median_pfs_days"]
    assert summary["median_pfs_days_null_reason"].startswith("not reached")
    assert summary["median_pfs_months"] is None and summary["median_pfs_ci_days"][1] is None
    assert summary["comparison"]["median_pfs_days"]["simulated"] is None
    assert summary["comparison"]["median_pfs_days"]["simulated_null_reason"].startswith("not reached")
    assert summary["published"]["median_pfs_days"] is None  # not given: null without a reason
    assert "median_pfs_days_null_reason" not in summary["published"]
    km = summary["km"]
    assert km["survival"][-1] == pytest.approx(5 / 6) and km["n_at_risk"][0] == 6
    strict_load_file(tmp_path / "run.json")
    assert (tmp_path / "km_pfs.png").stat().st_size > 0


def test_a_reached_median_is_written_as_a_number(tmp_path):
    from qspjax.io import provenance
    from qspjax.virtual_trial import evaluate, write_trial

    result = _cohort(progress=(0, 1, 2, 3))
    outcome = evaluate(result)
    write_trial(tmp_path, result, outcome, provenance(seed=0))
    summary = strict_load_file(tmp_path / "summary.json")
    assert summary["median_pfs_days"] == 56.0 and "median_pfs_days_null_reason" not in summary


def test_benchmark_and_fit_writers_use_the_strict_writer(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_common", REPO / "benchmarks" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_json(tmp_path / "b.json", {"speedup": np.float64(np.inf), "times": np.array([1.0, np.nan])})
    doc = strict_load_file(tmp_path / "b.json")
    assert doc["speedup"] is None and doc["times"] == [1.0, None] and "times_null_reason" in doc


def test_the_simulate_command_writes_only_strict_json(tmp_path):
    from qspjax.cli import main

    out = tmp_path / "run"
    rc = main(["simulate", "--regimen", str(REPO / "configs/regimens/qspio_example1_nivolumab.yaml"),
               "--patients", "1", "--no-variability", "--days", "2", "--out", str(out)])
    assert rc == 0
    written = sorted(out.glob("*.json"))
    assert [p.name for p in written] == ["run.json", "summary.json"]
    for path in written:
        strict_load_file(path)
