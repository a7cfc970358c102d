"""Multistart diagnostics of a fit: the starts table, the waterfall plot and the best starts' parameters.

Every ``qspjax fit`` writes, beside its fitted parameters,

* ``starts.csv``: one row per design point (``start``: its index in the design), its objective
  before optimisation (``initial_objective``: the negative log posterior in nats, from the
  screening forward solve or the first step), whether it was optimised, its final objective and
  parameters (unconstrained scale, one ``theta:<id>`` column per estimated quantity), whether it
  converged (its loss stopped improving by the optimiser's tolerance within its step budget) and
  why it stopped, its rank by final objective, and whether it is in the best cluster;
* ``waterfall.png``: the optimised starts' final objectives, sorted, as the difference to the best
  (nats, symmetric-log axis) with the best-cluster tolerance marked: a flat first step of many
  starts means that the best optimum was found repeatedly, a staircase that the optimiser stops in
  different places;
* ``best_starts.png``: the final parameters of the best starts (at most 10) against the design
  box, so that a spread along one parameter within the best cluster is visible.

The best cluster is the set of optimised starts whose final objective is within
``cluster_tolerance`` nats of the best (``optimizer.cluster_tolerance``).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from qspjax.io import atomic_write, atomic_write_text

BEST_STARTS_PLOTTED = 10


def start_table(problem, result, cluster_tolerance: float) -> list[dict]:
    """One row per design point of ``result`` (a :class:`~qspjax.inference.calibrate.CalibrationResult`)."""
    ids = list(problem.ids)
    n_opt = len(result.histories)
    if result.screened is not None:
        points = np.asarray(result.screened["candidates"])
        initial = -np.asarray(result.screened["log_posterior"], float)
        opt_index = [int(j) for j in result.screened["chosen"][:n_opt]]
    else:
        points = np.atleast_2d(np.asarray(result.starts))
        initial = np.full(len(points), math.nan)
        initial[:n_opt] = result.initial_losses[:n_opt]
        opt_index = list(range(n_opt))
    finals = {j: (_best(result.histories[k]), result.finals[k],
                  result.stop_reasons[k] if k < len(result.stop_reasons) else "")
              for k, j in enumerate(opt_index)}
    order = sorted(finals, key=lambda j: (finals[j][0] if math.isfinite(finals[j][0]) else math.inf, j))
    rank = {j: r + 1 for r, j in enumerate(order)}
    best = min((v[0] for v in finals.values()), default=math.inf)
    rows = []
    for j in range(len(points)):
        row = {"start": j, "initial_objective": float(initial[j]) if math.isfinite(initial[j]) else math.nan,
               "optimized": j in finals}
        if j in finals:
            value, theta, reason = finals[j]
            row.update(final_objective=value, converged=reason == "converged", stop_reason=reason,
                       rank=rank[j], best_cluster=bool(math.isfinite(value) and value <= best + cluster_tolerance))
            row.update({f"theta:{k}": float(x) for k, x in zip(ids, np.asarray(theta))})
        else:
            row.update(final_objective=math.nan, converged=False, stop_reason="not_optimized", rank="",
                       best_cluster=False)
            row.update({f"theta:{k}": math.nan for k in ids})
        rows.append(row)
    return rows


def _best(history) -> float:
    finite = [v for v in history if math.isfinite(v)]
    return min(finite) if finite else math.inf


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else
                             (repr(v) if isinstance(v, float) else v)) for k, v in row.items()})
    return buf.getvalue()


def read_starts_csv(path: str | Path) -> list[dict]:
    """``starts.csv`` back as rows of Python values (empty cells: NaN)."""
    rows = []
    with open(path, newline="") as fh:
        for raw in csv.DictReader(fh):
            row = {}
            for k, v in raw.items():
                if k in ("optimized", "converged", "best_cluster"):
                    row[k] = v == "True"
                elif k == "stop_reason":
                    row[k] = v
                elif k in ("start", "rank"):
                    row[k] = int(v) if v else None
                else:
                    row[k] = float(v) if v else math.nan
            rows.append(row)
    return rows


def plot_waterfall(rows: list[dict], cluster_tolerance: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals = np.sort([r["final_objective"] for r in rows if r["optimized"] and math.isfinite(r["final_objective"])])
    failed = sum(r["optimized"] and not math.isfinite(r["final_objective"]) for r in rows)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if finals.size:
        diff = finals - finals[0]
        in_best = diff <= cluster_tolerance
        x = np.arange(1, finals.size + 1)
        ax.plot(x, diff, color="0.6", lw=0.8, zorder=1)
        ax.scatter(x[in_best], diff[in_best], color="C3", s=18, zorder=2,
                   label=f"best cluster: {int(in_best.sum())} of {finals.size} optimised starts")
        ax.scatter(x[~in_best], diff[~in_best], color="C0", s=14, zorder=2, label="other starts")
        ax.axhline(cluster_tolerance, color="C3", ls="--", lw=1, label=f"cluster tolerance {cluster_tolerance:g} nats")
        ax.set_yscale("symlog", linthresh=max(cluster_tolerance, 1e-6))
        ax.set_ylim(bottom=-0.05 * cluster_tolerance)
        ax.set_title(f"waterfall: best objective {finals[0]:.4f} nats (negative log posterior)", fontsize=9)
    else:
        ax.set_title("waterfall: no start reached a finite objective", fontsize=9)
    ax.set_xlabel("optimised start, sorted by final objective" + (f" ({failed} non-finite not shown)" if failed else ""))
    ax.set_ylabel("final objective - best (nats)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png"))
    plt.close(fig)
    return path


def plot_best_starts(rows: list[dict], problem, box_sds: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = list(problem.ids)
    ranked = sorted((r for r in rows if r["optimized"] and math.isfinite(r["final_objective"])),
                    key=lambda r: r["final_objective"])[:BEST_STARTS_PLOTTED]
    mu, sd = problem.prior_means(), problem.prior_sds()
    y = np.arange(len(ids))
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(ids)))
    ax.barh(y, 2 * box_sds, left=-box_sds, color="0.93", height=0.8, label=f"design box (+-{box_sds:g} prior sd)")
    cmap = plt.get_cmap("viridis")
    for k, r in enumerate(reversed(ranked)):  # the best drawn last, on top
        z = (np.array([r[f"theta:{i}"] for i in ids]) - mu) / sd
        rank = len(ranked) - k
        ax.plot(z, y, "-o", ms=4, lw=1, color=cmap((rank - 1) / max(len(ranked) - 1, 1)),
                label=f"#{rank} ({r['final_objective']:.3f}){' *' if r['best_cluster'] else ''}")
    ax.set_yticks(y)
    ax.set_yticklabels(ids, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("final value: (theta - prior centre) / prior sd, unconstrained scale")
    ax.set_title(f"parameters of the {len(ranked)} best starts (* in the best cluster)", fontsize=9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=90, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def write_multistart(out: Path, problem, result, cluster_tolerance: float) -> dict[str, Path]:
    """``starts.csv``, ``waterfall.png`` and ``best_starts.png`` of ``result`` in ``out``."""
    out = Path(out)
    rows = start_table(problem, result, cluster_tolerance)
    return {"starts": atomic_write_text(out / "starts.csv", _csv_text(rows)),
            "waterfall": plot_waterfall(rows, cluster_tolerance, out / "waterfall.png"),
            "best_starts": plot_best_starts(rows, problem, result.box_sds, out / "best_starts.png")}
