"""Figures of simulated clinical outcomes, with published values beside them when given.

Every function draws on its own ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, so no
global figure state and no display needed), writes a PNG atomically (temporary file in the same
folder, then ``os.replace``) and returns the path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from jaxtyping import ArrayLike, Float, Int
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from qspjax.io import atomic_write
from qspjax.outcomes import CR, NE, PD, PR, RESPONSE_NAMES, SD, KaplanMeier

RESPONSE_COLOURS = {CR: "#1a9850", PR: "#91cf60", SD: "#fdae61", PD: "#d73027", NE: "#999999"}
_SIMULATED_COLOUR = "#4575b4"
_OBSERVED_COLOUR = "#222222"
_REPORTED_BAR_COLOUR = "#a6a6a6"  # light, so black whiskers show on it


def _new_figure(width_in: float = 7.0, height_in: float = 4.5) -> Figure:
    figure = Figure(figsize=(width_in, height_in), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    # the temporary name ends in .tmp, so the format is given rather than guessed from the suffix
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def _response_legend(axes, codes) -> None:
    present = sorted(set(int(c) for c in codes))
    axes.legend(handles=[Patch(color=RESPONSE_COLOURS[c], label=RESPONSE_NAMES[c]) for c in present],
                title="best response", loc="best", fontsize=8)


def waterfall(
    path: str | os.PathLike,
    best_percent_change: Float[ArrayLike, "patients"],
    best_response: Int[ArrayLike, "patients"],
    *,
    title: str = "Best change in sum of target-lesion diameters",
) -> Path:
    """One bar per patient (best % change from baseline, sorted largest first), coloured by best
    overall response, with the RECIST +20 % and -30 % lines. Patients with NaN change are left out."""
    change = np.asarray(best_percent_change, dtype=float)
    codes = np.asarray(best_response, dtype=int)
    keep = np.isfinite(change)
    order = np.argsort(-change[keep], kind="stable")
    change, codes = change[keep][order], codes[keep][order]
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.bar(np.arange(change.size), change, width=1.0, color=[RESPONSE_COLOURS[c] for c in codes], linewidth=0)
    axes.axhline(20.0, color="k", linestyle="--", linewidth=0.8)
    axes.axhline(-30.0, color="k", linestyle=":", linewidth=0.8)
    axes.axhline(0.0, color="k", linewidth=0.5)
    axes.set(xlabel="patient", ylabel="best change from baseline (%)", title=title, xticks=[])
    if codes.size:
        _response_legend(axes, codes)
    return _save(figure, path)


def spider(
    path: str | os.PathLike,
    assessment_days: Float[ArrayLike, "assessments"],
    percent_change: Float[ArrayLike, "patients assessments"],
    best_response: Int[ArrayLike, "patients"] | None = None,
    *,
    max_patients: int = 200,
    title: str = "Change in sum of target-lesion diameters",
) -> Path:
    """Percent change from baseline over time, one line per patient (from day 0 at 0 %),
    coloured by best response when given; at most ``max_patients`` (the first ones) are drawn."""
    days = np.concatenate([[0.0], np.asarray(assessment_days, dtype=float)])
    change = np.asarray(percent_change, dtype=float)[:max_patients]
    change = np.concatenate([np.zeros((change.shape[0], 1)), change], axis=1)
    codes = None if best_response is None else np.asarray(best_response, dtype=int)[:max_patients]
    figure = _new_figure()
    axes = figure.add_subplot()
    for i, row in enumerate(change):
        colour = _SIMULATED_COLOUR if codes is None else RESPONSE_COLOURS[codes[i]]
        axes.plot(days, row, color=colour, linewidth=0.8, alpha=0.7, marker=".", markersize=3)
    axes.axhline(20.0, color="k", linestyle="--", linewidth=0.8)
    axes.axhline(-30.0, color="k", linestyle=":", linewidth=0.8)
    axes.set(xlabel="days from start of treatment", ylabel="change from baseline (%)", title=title)
    if codes is not None and codes.size:
        _response_legend(axes, codes)
    return _save(figure, path)


def kaplan_meier_curve(
    path: str | os.PathLike,
    km: KaplanMeier,
    *,
    label: str = "simulated",
    observed_median_days: float | None = None,
    observed_median_ci_days: tuple[float, float] | None = None,
    observed_landmarks: Mapping[float, float] | None = None,
    ylabel: str = "progression-free survival",
    title: str = "Kaplan–Meier",
) -> Path:
    """Step curve with its confidence band; published values, when given, as "observed" points:
    the median at S = 0.5 (with its CI as a horizontal bar) and landmark survivals {day: S}."""
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.step(km.time, km.survival, where="post", color=_SIMULATED_COLOUR, label=label)
    axes.fill_between(km.time, km.ci_lower, km.ci_upper, step="post", color=_SIMULATED_COLOUR, alpha=0.2,
                      linewidth=0, label=f"{label} 95% CI")
    if observed_median_days is not None and np.isfinite(observed_median_days):
        xerr = None
        if observed_median_ci_days is not None and all(np.isfinite(observed_median_ci_days)):
            low, high = observed_median_ci_days
            xerr = [[observed_median_days - low], [high - observed_median_days]]
        axes.errorbar([observed_median_days], [0.5], xerr=xerr, fmt="D", color=_OBSERVED_COLOUR,
                      capsize=3, label="observed median")
    if observed_landmarks:
        days = list(observed_landmarks)
        axes.plot(days, [observed_landmarks[d] for d in days], "s", color=_OBSERVED_COLOUR, fillstyle="none",
                  label="observed landmark")
    axes.axhline(0.5, color="k", linewidth=0.4, linestyle=":")
    axes.set(xlabel="days", ylabel=ylabel, title=title, ylim=(0.0, 1.02))
    axes.legend(loc="best", fontsize=8)
    return _save(figure, path)


def response_rate_comparison(
    path: str | os.PathLike,
    labels: Sequence[str],
    simulated: Float[ArrayLike, "arms"],
    simulated_ci: Float[ArrayLike, "arms 2"] | None = None,
    reported: Float[ArrayLike, "arms"] | None = None,
    reported_ci: Float[ArrayLike, "arms 2"] | None = None,
    *,
    ylabel: str = "objective response rate",
    title: str = "Simulated vs reported",
) -> Path:
    """Grouped bars per protocol/arm: simulated beside reported rates (fractions), each with its
    interval as error bars. NaN entries (not reported) are drawn as gaps."""
    n = len(labels)
    x = np.arange(n)
    width = 0.38 if reported is not None else 0.6
    figure = _new_figure(max(5.0, 0.9 * n + 2.0), 4.5)
    axes = figure.add_subplot()

    def bars(offset, values, ci, colour, name):
        values = np.asarray(values, dtype=float)
        err = None
        if ci is not None:
            ci = np.asarray(ci, dtype=float).reshape(n, 2)
            # an interval missing for one arm is drawn without whiskers, not as a NaN error
            err = np.nan_to_num(np.abs(np.stack([values - ci[:, 0], ci[:, 1] - values])), nan=0.0)
        axes.bar(x + offset, np.nan_to_num(values, nan=0.0), width, yerr=err, capsize=3, color=colour,
                 ecolor="k", label=name)

    if reported is None:
        bars(0.0, simulated, simulated_ci, _SIMULATED_COLOUR, "simulated")
    else:
        bars(-width / 2, simulated, simulated_ci, _SIMULATED_COLOUR, "simulated")
        bars(width / 2, reported, reported_ci, _REPORTED_BAR_COLOUR, "reported")
    axes.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    axes.set(ylabel=ylabel, title=title, ylim=(0.0, 1.0))
    axes.legend(loc="best", fontsize=8)
    return _save(figure, path)
