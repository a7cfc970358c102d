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


def number_at_risk(
    times: Float[ArrayLike, "n"],
    events: ArrayLike,
    at: Float[ArrayLike, "k"],
) -> Int[np.ndarray, "k"]:
    """Patients at risk at each time in ``at``: those whose duration (event or censoring) is
    ``>= t``, i.e. neither progressed/died nor censored before ``t`` (the risk set of the
    Kaplan–Meier estimator; lifelines' ``event_table.at_risk`` at its event times).

    Non-finite durations (NaN for failed patients) are left out, as
    :func:`qspjax.outcomes.kaplan_meier` does.
    ``events`` (event observed, 1/0) is checked for shape and values only: censored patients
    count as at risk up to and including their censoring time, as those with an event do.
    """
    t = np.asarray(times, dtype=float).ravel()
    e = np.asarray(events).ravel()
    at = np.asarray(at, dtype=float)
    if e.shape != t.shape:
        raise ValueError(f"number_at_risk: events has {e.size} entries, times has {t.size}")
    if e.size and not np.isin(e, (0, 1)).all():
        raise ValueError(f"number_at_risk: events must be 0/1 or booleans, got {np.unique(e)[:5].tolist()}")
    if not np.isfinite(at).all():
        raise ValueError(f"number_at_risk: times to count at must be finite, got {at.tolist()}")
    if np.any(t < 0):
        raise ValueError(f"number_at_risk: durations must be >= 0, got {t[t < 0][:5].tolist()}")
    t = np.sort(t[np.isfinite(t)])
    return (t.size - np.searchsorted(t, at, side="left")).astype(int)


def km_number_at_risk(km: KaplanMeier, at: Float[ArrayLike, "k"]) -> Int[np.ndarray, "k"]:
    """:func:`number_at_risk` read off a Kaplan–Meier table (whose ``n_at_risk`` column is the
    risk set at each of its times, 0 and every distinct duration)."""
    at = np.asarray(at, dtype=float)
    i = np.searchsorted(km.time, at, side="left")
    inside = i < len(km.time)
    return np.where(inside, np.asarray(km.n_at_risk)[np.minimum(i, len(km.time) - 1)], 0).astype(int)


_CURVE_COLOURS = (_SIMULATED_COLOUR, "#d73027", "#1a9850", "#984ea3", "#ff7f00", "#a65628")


def kaplan_meier_curve(
    path: str | os.PathLike,
    km: KaplanMeier | Mapping[str, KaplanMeier],
    *,
    label: str = "simulated",
    observed_median_days: float | None = None,
    observed_median_ci_days: tuple[float, float] | None = None,
    observed_landmarks: Mapping[float, float] | None = None,
    ylabel: str = "progression-free survival",
    title: str = "Kaplan–Meier",
    at_risk: bool = True,
) -> Path:
    """Step curve(s) with confidence band(s); published values, when given, as "observed" points:
    the median at S = 0.5 (with its CI as a horizontal bar) and landmark survivals {day: S}.

    ``km`` is one table (drawn as ``label``) or {label: table} for several curves. Under the axes,
    unless ``at_risk`` is False, a table gives each curve's number at risk
    (:func:`km_number_at_risk`) at every x tick.
    """
    curves = {label: km} if isinstance(km, KaplanMeier) else dict(km)
    if not curves:
        raise ValueError("kaplan_meier_curve: no Kaplan–Meier table to draw")
    figure = _new_figure(7.0, 4.5 + (0.3 + 0.22 * len(curves) if at_risk else 0.0))
    if at_risk:
        grid = figure.add_gridspec(2, 1, height_ratios=[4.5, 0.35 + 0.25 * len(curves)])
        axes = figure.add_subplot(grid[0])
        table = figure.add_subplot(grid[1], sharex=axes)
    else:
        axes, table = figure.add_subplot(), None
    colours = {name: _CURVE_COLOURS[i % len(_CURVE_COLOURS)] for i, name in enumerate(curves)}
    for name, k in curves.items():
        axes.step(k.time, k.survival, where="post", color=colours[name], label=name)
        axes.fill_between(k.time, k.ci_lower, k.ci_upper, step="post", color=colours[name], alpha=0.2,
                          linewidth=0, label=f"{name} 95% CI")
    x_max = max(float(np.max(k.time)) for k in curves.values())
    if observed_median_days is not None and np.isfinite(observed_median_days):
        xerr = None
        if observed_median_ci_days is not None and all(np.isfinite(observed_median_ci_days)):
            low, high = observed_median_ci_days
            xerr = [[observed_median_days - low], [high - observed_median_days]]
            x_max = max(x_max, float(high))
        axes.errorbar([observed_median_days], [0.5], xerr=xerr, fmt="D", color=_OBSERVED_COLOUR,
                      capsize=3, label="observed median")
        x_max = max(x_max, float(observed_median_days))
    if observed_landmarks:
        days = list(observed_landmarks)
        axes.plot(days, [observed_landmarks[d] for d in days], "s", color=_OBSERVED_COLOUR, fillstyle="none",
                  label="observed landmark")
        x_max = max(x_max, max(float(d) for d in days))
    axes.axhline(0.5, color="k", linewidth=0.4, linestyle=":")
    axes.set(xlabel="days", ylabel=ylabel, title=title, ylim=(0.0, 1.02), xlim=(0.0, 1.03 * x_max if x_max > 0 else 1.0))
    axes.legend(loc="best", fontsize=8)
    if table is not None:
        ticks = [float(t) for t in axes.get_xticks() if 0.0 <= t <= axes.get_xlim()[1]]
        axes.set_xticks(ticks)  # freeze them: the counts below are at these ticks
        _at_risk_table(table, curves, colours, ticks)
    return _save(figure, path)


def _at_risk_table(table, curves: Mapping[str, KaplanMeier], colours: Mapping[str, str], ticks: list[float]) -> None:
    """Number at risk per curve (rows, first curve on top) at each tick (columns)."""
    names = list(curves)
    for row, name in enumerate(names):
        for tick, n in zip(ticks, km_number_at_risk(curves[name], ticks)):
            table.text(tick, row, str(int(n)), ha="center", va="center", fontsize=8, color=colours[name])
    table.set_ylim(len(names) - 0.5, -0.5)
    table.set_yticks(range(len(names)), names, fontsize=8)
    for tick_label, name in zip(table.get_yticklabels(), names):
        tick_label.set_color(colours[name])
    table.tick_params(axis="both", length=0, labelbottom=False)
    table.tick_params(axis="y", pad=14)  # clear of the counts centred on the tick at day 0
    for spine in table.spines.values():
        spine.set_visible(False)
    table.set_title("Number at risk", fontsize=8, loc="left")


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
