"""A cohort split over two processes with ``jax.distributed`` gives the numbers of one device.

Two CPU processes of this machine (one device each, gloo collectives) stand in for two hosts:
each builds the same 4-patient batch, ``simulate_batch`` shards the patient axis over the global
two-device mesh, and each gets the whole result back; process 0 also solves the batch on its own
device alone, the reference. ``over_processes`` (how the pre-treatment growth is split) is checked
with a cheap per-patient function.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO
from qspjax.errors import QSPValidationError

_SCRIPT = r"""
import json, sys
import numpy as np
import qspjax
from qspjax.solver.distributed import initialize
initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax
from qspjax.params import load_parameters
from qspjax.model.reference import state_from_species
from qspjax.regimen import compile_schedule, parse_regimen
from qspjax.solver.simulate import SolverConfig, simulate_batch
from qspjax.vpop import build_models

p = load_parameters()
growth = p.values["k_C1_growth"] * np.array([0.7, 1.0, 1.3, 1.6])
models = build_models(p, {"k_C1_growth": growth}, 4, ("nivolumab",), 1)
y0 = jax.vmap(lambda m: state_from_species(m, p.initial_state))(models)
reg = parse_regimen({"name": "s", "ici": [{"drug": "nivolumab", "dose": 240, "unit": "mg", "interval_days": 3, "cycles": 2}],
                     "rt": [{"dose_per_fraction_gy": 8, "fractions": 1, "days": [1]}]})
sched = compile_schedule(reg, ("nivolumab",), np.arange(0.0, 5.0), 1)
both = simulate_batch(models, y0, sched, SolverConfig())
out = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
       "local_devices": jax.local_device_count(), "status": np.asarray(both.status).tolist(),
       "c1": np.asarray(both.ys["C1"][:, -1, 0]).tolist()}
if jax.process_index() == 0:
    alone = simulate_batch(models, y0, sched, SolverConfig(), devices=jax.local_devices())
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / np.maximum(np.abs(np.asarray(b)), 1e-300)))
    out["max_rel_diff"] = max(rel(both.ys[k], alone.ys[k]) for k in both.ys if np.any(np.asarray(alone.ys[k]) != 0))
# Work that cannot run under shard_map (the pre-treatment growth) is split between processes:
# 3 patients, padded to 4, 2 each; a cheap function stands in for the growth solve.
import jax.numpy as jnp
from qspjax.solver.simulate import over_processes
per_patient = lambda g, d: {"x": g * jnp.sin(d), "p": jnp.full(d.shape, jax.process_index())}
split = over_processes(per_patient, (growth[:3], np.array([1.0, 2.0, 3.0])))
out["split_x"] = np.asarray(split["x"]).tolist()
out["split_by"] = np.asarray(split["p"]).tolist()
out["split_x_alone"] = (growth[:3] * np.sin([1.0, 2.0, 3.0])).tolist()
print("RESULT", json.dumps(out), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_same_trajectories_as_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    address = f"localhost:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, address, str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        outs.append(json.loads(next(l for l in stdout.splitlines() if l.startswith("RESULT "))[len("RESULT "):]))
    first, second = sorted(outs, key=lambda o: o["process"])
    assert (first["processes"], first["devices"], first["local_devices"]) == (2, 2, 1)  # really two processes
    assert first["status"] == second["status"] == [0, 0, 0, 0]
    assert first["c1"] == second["c1"]  # every process holds the whole cohort's result
    # patients are independent: the split changes where each one runs, not its trajectory (to the
    # solver's tolerance, rtol 1e-6, as with two devices of one process)
    assert first["max_rel_diff"] < 1e-5
    # over_processes: each process computed its own share, both hold all three results, in order
    assert first["split_by"] == second["split_by"] == [0, 0, 1]
    assert first["split_x"] == second["split_x"]
    assert first["split_x"] == pytest.approx(first["split_x_alone"], rel=1e-15)


def test_multi_process_flags_come_together():
    from qspjax.solver.distributed import initialize

    with pytest.raises(QSPValidationError, match="give all three"):
        initialize("localhost:1234", 2, None)
    with pytest.raises(QSPValidationError, match="--process-id"):
        initialize("localhost:1234", 2, 2)


def test_launch_local_starts_cooperating_processes_and_stops_them_when_one_fails(capfd):
    import time

    from qspjax.solver.distributed import launch_local

    # argv[0]: process 1's exit status; process 2 waits (as it would for a failed peer in a collective)
    show = ("import sys, time; a = sys.argv[1:]; pid = int(a[a.index('--process-id') + 1]);"
            " print('ARGS', ' '.join(a), flush=True); time.sleep(60 if pid == 2 and a[0] != '0' else 0);"
            " sys.exit(int(a[0]) if pid == 1 else 0)")
    assert launch_local(3, [sys.executable, "-c", show, "0"]) == 0
    out = capfd.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("ARGS")]
    assert len(lines) == 1  # only process 0 speaks
    words = lines[0].split()
    assert words[words.index("--num-processes") + 1] == "3" and words[words.index("--process-id") + 1] == "0"
    assert words[words.index("--coordinator") + 1].startswith("localhost:")
    start = time.monotonic()
    assert launch_local(3, [sys.executable, "-c", show, "7"]) == 7  # process 1's status
    assert time.monotonic() - start < 30  # process 2 was stopped, not waited for
    assert "process 1 exited with 7" in capfd.readouterr().err
    with pytest.raises(QSPValidationError, match="--local-processes"):
        launch_local(0, [sys.executable, "-c", "pass"])


def test_local_processes_flag_runs_the_same_command_line_again(monkeypatch, tmp_path):
    import qspjax.solver.distributed as dist
    from qspjax.cli import main

    calls = []
    monkeypatch.setattr(dist, "launch_local", lambda k, command: calls.append((k, command)) or 5)
    argv = ["compare", "configs/experiments/rt_nivolumab_protocols.yaml", "--patients", "2",
            "--out", str(tmp_path / "o"), "--local-processes", "2"]
    assert main(argv) == 5  # the launched processes' exit status is the command's
    (k, command), = calls
    assert k == 2 and command[1:3] == ["-m", "qspjax.cli"] and command[3:] == argv
    assert not (tmp_path / "o").exists()  # nothing ran in this process
    assert main(argv[:-1] + ["0"]) == 2  # --local-processes 0 is refused
