"""The patient axis sharded over several devices gives the same numbers as one device.

Runs in a subprocess because the CPU device count is fixed when JAX starts
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

_SCRIPT = r"""
import json, numpy as np, jax
import qspjax
from qspjax.params import load_parameters
from qspjax.model.reference import state_from_species
from qspjax.regimen import compile_schedule, parse_regimen
from qspjax.solver.simulate import SolverConfig, simulate_batch
from qspjax.vpop import build_models

assert jax.local_device_count() == 2, jax.devices()
p = load_parameters()
n = 4
growth = p.values["k_C1_growth"] * np.array([0.7, 1.0, 1.3, 1.6])
models = build_models(p, {"k_C1_growth": growth}, n, ("nivolumab",), 1)
y0 = jax.vmap(lambda m: state_from_species(m, p.initial_state))(models)
reg = parse_regimen({"name": "s", "ici": [{"drug": "nivolumab", "dose": 240, "unit": "mg", "interval_days": 3, "cycles": 2}],
                     "rt": [{"dose_per_fraction_gy": 8, "fractions": 1, "days": [1]}]})
sched = compile_schedule(reg, ("nivolumab",), np.arange(0.0, 5.0), 1)
two = simulate_batch(models, y0, sched, SolverConfig())
one = simulate_batch(models, y0, sched, SolverConfig(), devices=jax.local_devices()[:1])
shards = {str(s.device) for s in two.ys["C1"].addressable_shards}
def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300 + 1e-12 * np.max(np.abs(b)))))
# 3 patients on 2 devices: padded with a copy of the last patient, the copy dropped again
first3 = lambda t: jax.tree_util.tree_map(lambda x: x[:3], t)
odd = simulate_batch(first3(models), first3(y0), sched, SolverConfig())
out = {"shards": len(shards), "max_rel_diff": max(rel(two.ys[k], one.ys[k]) for k in two.ys),
       "odd_rows": int(odd.ys["C1"].shape[0]), "odd_status": np.asarray(odd.status).tolist(),
       "odd_max_rel_diff": max(rel(odd.ys[k], one.ys[k][:3]) for k in odd.ys),
       "status": np.asarray(two.status).tolist(), "c1_last": np.asarray(two.ys["C1"][:, -1, 0]).tolist()}
print("RESULT", json.dumps(out))
"""


@pytest.mark.slow
def test_two_cpu_devices_give_the_same_trajectories_as_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["shards"] == 2  # the patient axis really was split over both devices
    assert out["status"] == [0, 0, 0, 0]
    # Patients are independent, so the split changes nothing but where each one runs. The two
    # compilations may fuse differently, and an adaptive solver can carry a round-off difference
    # into a different step sequence, so the trajectories agree to the solver's tolerance (rtol
    # 1e-6; measured 2e-8), not bit for bit.
    assert out["max_rel_diff"] <= 1e-6
    # an uneven batch is padded to the device count and trimmed back: same patients, same numbers
    assert out["odd_rows"] == 3 and out["odd_status"] == [0, 0, 0]
    assert out["odd_max_rel_diff"] <= 1e-6
    assert len(set(out["c1_last"])) == 4
