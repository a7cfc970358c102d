"""How well a calibrated population reproduces its trial arms: ``fits/report.json`` and its plot.

The fitted parameters (``loss_history.json`` of a ``qspjax fit`` run) are simulated on every fitted
and held-out arm of the run file, on a virtual cohort that may be larger than the one the fit used
(``patients``; the same quasi-random construction, so the fit's cohort is its first rows only when
the sizes agree). Per arm the report gives the observed ORR with its 95 % interval (the paper's
when printed, else the exact binomial interval of responders of N, as
:func:`qspjax.virtual_trial.published_endpoints`), the predicted ORR (cohort mean of the smooth
P(CR) + P(PR), the quantity the likelihood scores), whether the prediction lies inside the
interval, the arm's log-likelihood, and the predicted progression-free fraction at each PFS point
the likelihood used.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from qspjax.inference.likelihood import DAYS_PER_MONTH, Problem
from qspjax.io import atomic_write


def load_fitted_theta(fit_dir: str | Path, problem: Problem) -> np.ndarray:
    """The best parameters of a fit run (``loss_history.json``), checked against ``problem``'s ids."""
    path = Path(fit_dir) / "loss_history.json"
    doc = json.loads(path.read_text())
    if list(doc["ids"]) != list(problem.ids):
        from qspjax.errors import QSPValidationError

        raise QSPValidationError(path, "ids", doc["ids"], f"the run file's priors estimate {list(problem.ids)}")
    return np.asarray(doc["theta"], float)


def arm_rows(problem: Problem, theta, trials, role: str) -> list[dict]:
    """One report row per arm of ``problem`` at ``theta`` (``role``: ``"fitted"`` or ``"held_out"``)."""
    from qspjax.virtual_trial import published_endpoints

    pred = problem.predict(jnp.asarray(theta))
    lls = np.asarray(problem.arm_log_likelihoods(pred))
    rows = []
    for i, a in enumerate(problem.arms):
        pub = published_endpoints(trials.get_arm(a.arm_id))
        orr = pub.get("orr")
        ci = pub.get("orr_ci")
        predicted = float(pred.response[i, 0] + pred.response[i, 1])
        landmarks = np.asarray(problem.landmark_pfs(pred, i))
        pfs = [{"months": float(d / DAYS_PER_MONTH), "observed_pct": 100.0 * k / a.n,
                "predicted_pct": 100.0 * float(s)}
               for d, k, s in zip(a.pfs_days, a.pfs_progression_free, landmarks)]
        rows.append({
            "id": a.arm_id, "role": role, "n": a.n, "regimen": a.regimen.name,
            "scored_by": "response_counts" if a.response_counts is not None else (
                "responders" if a.responders is not None else "pfs only"),
            "observed_orr_pct": None if orr is None else 100.0 * orr,
            "observed_orr_ci_pct": None if ci is None else [100.0 * ci[0], 100.0 * ci[1]],
            "orr_ci_source": pub.get("orr_ci_source"),
            "predicted_orr_pct": 100.0 * predicted,
            "predicted_response_pct": dict(zip(("CR", "PR", "SD", "PD", "NE"),
                                               (100.0 * np.asarray(pred.response[i])).round(3).tolist())),
            "inside_ci": None if ci is None else bool(ci[0] <= predicted <= ci[1]),
            "log_likelihood": float(lls[i]),
            "patients_solved_fraction": float(pred.ok_fraction[i]),
            "pfs": pfs,
            "notes": list(a.notes),
        })
    return rows


def build_report(fit: Problem, held: Problem | None, theta, trials, meta: dict) -> dict:
    """The report document: ``arms`` (fitted then held out) and counts inside the 95 % intervals."""
    rows = arm_rows(fit, theta, trials, "fitted")
    if held is not None:
        rows += arm_rows(held, theta, trials, "held_out")

    def tally(role):
        scored = [r for r in rows if r["role"] == role and r["inside_ci"] is not None]
        return {"arms": len([r for r in rows if r["role"] == role]), "with_orr": len(scored),
                "inside_ci": sum(r["inside_ci"] for r in scored)}

    return {**meta, "parameters": fit.natural(np.asarray(theta)), "theta": np.asarray(theta).tolist(),
            "ids": list(fit.ids), "summary": {"fitted": tally("fitted"), "held_out": tally("held_out")},
            "arms": rows}


def report_plot(report: dict, path: Path) -> Path:
    """Observed ORR (95 % interval) beside the predicted ORR of every arm, fitted and held out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["arms"] if r["observed_orr_pct"] is not None]
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(rows) + 1.3))
    for y, r in enumerate(rows):
        lo, hi = r["observed_orr_ci_pct"]
        ax.plot([lo, hi], [y] * 2, color="k", lw=1)
        ax.plot(r["observed_orr_pct"], y, "ks", ms=4)
        colour = "C0" if r["role"] == "fitted" else "C3"
        ax.plot(r["predicted_orr_pct"], y, "o", color=colour, mfc=colour if r["inside_ci"] else "white")
    ax.set_yticks(range(len(rows)), [f"{r['id']}{'' if r['role'] == 'fitted' else ' (held out)'}" for r in rows],
                  fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("ORR %  (black: observed with 95 % CI; blue: fitted arm, red: held out; "
                  "open: outside the CI)", fontsize=7)
    ax.invert_yaxis()
    s = report["summary"]
    ax.set_title(f"calibrated population: fitted arms inside CI {s['fitted']['inside_ci']}/{s['fitted']['with_orr']}, "
                 f"held out {s['held_out']['inside_ci']}/{s['held_out']['with_orr']}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)
    return path


def run_report(cfg, fit_dir: str | Path, patients: int | None = None, simulator: str = "qsp") -> dict:
    """Simulate the fitted parameters of ``fit_dir`` on the run file's arms; the report document."""
    import time

    from qspjax.data.trials import load_trials
    from qspjax.inference.runs import problems

    t0 = time.perf_counter()
    if patients is not None:
        cfg = replace(cfg, likelihood=replace(cfg.likelihood, patients=patients))
    fit, held = problems(cfg, simulator)
    theta = load_fitted_theta(fit_dir, fit)
    trials = load_trials(cfg.trials)
    meta = {"run_file": str(cfg.path), "fit_dir": str(fit_dir), "simulator": simulator,
            "patients_per_arm": cfg.likelihood.patients, "horizon_days": cfg.likelihood.horizon_days,
            "rtol": cfg.likelihood.rtol}
    report = build_report(fit, held, theta, trials, meta)
    report["seconds"] = time.perf_counter() - t0
    return report
