"""AMICI cross-check of the SBML export and of qspjax's gradients (the ``amici`` extra).

The PEtab export of the QSP-IO reference patient (``qspjax export-petab``) is imported into AMICI
(CVODES with forward and adjoint sensitivities, the field's reference for gradient-based ODE
calibration): every state of AMICI's solution must agree with qspjax's to 1e-5 relative, and the
gradient of a least-squares objective of log tumor diameter against the PEtab measurements, with
respect to the problem's 4 estimated parameters, must agree with qspjax's reverse-mode gradient to
1e-4 relative, by AMICI's forward and by its adjoint sensitivities. The problem and both sides'
code are in ``benchmarks/amici_gradient.py``, which also times them. pyPESTO, where installed,
reads the same PEtab problem and its negative log-likelihood must equal PEtab's own likelihood of
qspjax's simulation.

AMICI compiles one C++ extension per model (minutes; cached in ``~/.cache/qspjax/amici`` by the
SBML's hash, or ``$QSPJAX_AMICI_CACHE``).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import REPO

amici = pytest.importorskip(
    "amici", reason="amici is not installed: it is the optional `amici` extra (pip install 'qspjax[amici]'), "
                    "built from source with a C++ compiler and CMake; see pyproject.toml")
pytest.importorskip("libsbml", reason="python-libsbml (test extra) is not installed")
pytest.importorskip("petab.v1", reason="petab (interop/test extra) is not installed")

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks import amici_gradient as AG  # noqa: E402

pytestmark = pytest.mark.slow

STATE_DAYS = np.array([0.5, 2.0, 7.0, 13.5, 14.5, 30.0, 56.0, 100.0])


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    problem_dir = AG.petab_dir(tmp_path_factory.mktemp("amici") / "petab")
    module, _ = AG.amici_model(problem_dir)
    return problem_dir, module


def test_amici_trajectories_match_qspjax_on_every_state(problem):
    import jax

    from qspjax.interop import sbml

    problem_dir, module = problem
    p = AG.nominal(problem_dir)
    model, rdata = AG.amici_run(module, p, STATE_DAYS, None)
    assert rdata.status == 0
    x = np.asarray(rdata.x)
    ids = list(model.get_state_ids())
    _, trajectory, model0 = AG.qspjax_problem(problem_dir, STATE_DAYS)
    qmodel, traj = trajectory(p)
    names = sbml.state_names(model0)
    typical = {str(sid): float(np.asarray(v).ravel()[i]) for k, v in qmodel.scales().items()
               for i, sid in enumerate(np.asarray(names[k]).ravel())}
    worst, compared = {}, 0
    for key, sids in names.items():
        ours_all = np.asarray(traj.ys[key]).reshape(len(STATE_DAYS) + 1, -1)[1:]
        for j, sid in enumerate(np.asarray(sids, object).ravel()):
            sid = str(sid)
            if sid not in ids:  # a quasi-steady state: exported as ln_<id> relaxation (compared below)
                continue
            ours, theirs = ours_all[:, j], x[:, ids.index(sid)]
            scale = np.maximum(np.abs(ours), 1e-8 * abs(typical.get(sid, 1.0)) + 1e-300)
            worst[sid] = float(np.max(np.abs(theirs - ours) / scale))
            compared += 1
    assert compared >= 20, ids
    print("worst relative deviation per state:", dict(sorted(worst.items(), key=lambda kv: -kv[1])[:8]))
    assert max(worst.values()) < 1e-5, {k: v for k, v in worst.items() if v >= 1e-5}
    # the comparison has teeth: the treated tumor shrank, the antibody reached the plasma
    d = np.asarray(jax.vmap(qmodel.observables)(traj.ys)["tumor_diameter_cm"])[1:, 0]
    assert d[-1] < d[0]


@pytest.fixture(scope="module")
def gradients(problem):
    import jax

    problem_dir, module = problem
    data = AG.measurements(problem_dir)
    p = AG.nominal(problem_dir) * np.array([1.1, 0.9, 1.05, 1.0])
    vg, _, _ = AG.qspjax_problem(problem_dir)
    value, grad = vg(jax.numpy.asarray(p))
    return float(value), np.asarray(grad, float), AG.amici_gradient(module, p, data)


@pytest.mark.parametrize("method", ["forward", "adjoint"])
def test_amici_gradient_matches_qspjax_reverse_mode(gradients, method):
    value, grad, ami = gradients
    assert np.all(np.abs(grad) > 1e-6 * abs(value))  # every parameter moves the objective
    assert ami[method]["J"] == pytest.approx(value, rel=1e-5)
    np.testing.assert_allclose(ami[method]["grad"], grad, rtol=1e-4)


def test_pypesto_reads_the_petab_export_and_agrees_with_qspjax(problem, tmp_path_factory):
    pytest.importorskip("pypesto.petab", reason="pypesto is not installed (the `amici` extra has it)")
    import petab.v1 as petab

    from qspjax.interop.petab import simulate_petab

    problem_dir, _ = problem
    objective, names = AG.pypesto_objective(problem_dir, tmp_path_factory.mktemp("pypesto"))
    pp = petab.Problem.from_yaml(str(problem_dir / "problem.yaml"))
    nominal = dict(zip(pp.x_ids, pp.x_nominal_scaled))
    assert sorted(names) == sorted(AG.PARAMS)
    fval, grad = objective(np.asarray([nominal[n] for n in names]), sensi_orders=(0, 1))
    llh = petab.calculate_llh(pp.measurement_df, simulate_petab(problem_dir / "problem.yaml"),
                              pp.observable_df, pp.parameter_df)
    # five observables x 57 weekly reads; one relative tolerance far below any model difference
    assert len(pp.measurement_df) > 200
    assert fval == pytest.approx(-llh, rel=1e-7)
    assert np.all(np.isfinite(grad)) and np.all(np.abs(grad) > 1e-3)
