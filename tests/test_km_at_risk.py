"""Number at risk under the Kaplan–Meier plots: the count (hand count, lifelines' event table)
and the table drawn under the axes, one row per curve, one column per x tick."""

from __future__ import annotations

import numpy as np
import pytest

from qspjax import plots
from qspjax.outcomes import kaplan_meier

# durations (days) with ties between events and censorings, and one failed patient (NaN)
TIMES = np.array([2.0, 3.0, 3.0, 5.0, 8.0, 8.0, 8.0, 10.0, np.nan])
EVENTS = np.array([1, 0, 1, 1, 0, 1, 1, 0, 0])


def test_number_at_risk_by_hand():
    at = [0.0, 2.0, 2.5, 3.0, 4.0, 8.0, 9.0, 10.0, 11.0]
    # at risk at t = durations >= t among the 8 valid patients: a patient whose event or
    # censoring falls on t is still at risk at t
    assert plots.number_at_risk(TIMES, EVENTS, at).tolist() == [8, 8, 7, 7, 5, 4, 1, 1, 0]
    assert plots.km_number_at_risk(kaplan_meier(TIMES, EVENTS.astype(bool)), at).tolist() == [8, 8, 7, 7, 5, 4, 1, 1, 0]


def test_number_at_risk_matches_lifelines_event_table():
    lifelines = pytest.importorskip("lifelines", reason="lifelines (test extra) is not installed")
    rng = np.random.default_rng(3)
    t = np.round(rng.exponential(120.0, 300) / 7.0) * 7.0  # weekly grid: many ties
    e = rng.random(300) < 0.6
    table = lifelines.KaplanMeierFitter().fit(t, e).event_table
    times = table.index.to_numpy(float)
    assert plots.number_at_risk(t, e, times).tolist() == table["at_risk"].tolist()
    km = kaplan_meier(t, e)
    # between and beyond the table's times too (ticks rarely fall on a duration)
    at = np.concatenate([times, times + 3.5, [-1.0, t.max() + 1.0]])
    expected = [int((t >= a).sum()) for a in at]
    assert plots.number_at_risk(t, e, at).tolist() == expected
    assert plots.km_number_at_risk(km, at).tolist() == expected


@pytest.mark.parametrize("times,events,at,message", [
    ([1.0, 2.0], [1], [0.0], "events has 1 entries, times has 2"),
    ([1.0, 2.0], [1, 2], [0.0], "events must be 0/1"),
    ([1.0, 2.0], [1, 0], [np.nan], "must be finite"),
    ([1.0, -2.0], [1, 0], [0.0], "durations must be >= 0"),
])
def test_number_at_risk_refuses_bad_input_saying_what(times, events, at, message):
    with pytest.raises(ValueError, match=message):
        plots.number_at_risk(times, events, at)


def _capture(monkeypatch):
    figures = []

    def save(figure, path):
        figures.append(figure)
        return path

    monkeypatch.setattr(plots, "_save", save)
    return figures


def _table_cells(table_axes):
    """{(row, x): count} of the numbers drawn in the at-risk table."""
    return {(round(t.get_position()[1]), float(t.get_position()[0])): int(t.get_text()) for t in table_axes.texts}


def test_every_km_plot_has_a_number_at_risk_row_per_curve_at_each_tick(monkeypatch, tmp_path):
    figures = _capture(monkeypatch)
    rng = np.random.default_rng(0)
    t_a = np.round(rng.exponential(150.0, 40))
    e_a = rng.random(40) < 0.7
    t_b = np.round(rng.exponential(300.0, 25))
    e_b = rng.random(25) < 0.5
    curves = {"arm A": kaplan_meier(t_a, e_a), "arm B": kaplan_meier(t_b, e_b)}
    plots.kaplan_meier_curve(tmp_path / "km.png", curves, title="two arms")
    (figure,) = figures
    axes, table = figure.axes
    ticks = list(axes.get_xticks())
    assert ticks[0] == 0.0 and len(ticks) >= 3 and ticks[-1] <= axes.get_xlim()[1]
    assert [lab.get_text() for lab in table.get_yticklabels()] == ["arm A", "arm B"]
    cells = _table_cells(table)
    assert len(cells) == 2 * len(ticks)
    for row, (t, e) in enumerate([(t_a, e_a), (t_b, e_b)]):
        drawn = [cells[(row, tick)] for tick in ticks]
        assert drawn == plots.number_at_risk(t, e, ticks).tolist()
        assert drawn[0] == len(t)  # everyone is at risk at day 0
    assert table.get_title(loc="left") == "Number at risk"


def test_a_single_curve_plot_has_its_table_and_it_can_be_left_out(monkeypatch, tmp_path):
    figures = _capture(monkeypatch)
    km = kaplan_meier(TIMES, EVENTS.astype(bool))
    plots.kaplan_meier_curve(tmp_path / "km.png", km, observed_median_days=6.0, observed_median_ci_days=(4.0, 12.0))
    axes, table = figures[0].axes
    ticks = list(axes.get_xticks())
    assert axes.get_xlim()[1] >= 12.0  # the observed CI is inside the axes
    cells = _table_cells(table)
    assert [cells[(0, x)] for x in ticks] == plots.number_at_risk(TIMES, EVENTS, ticks).tolist()
    plots.kaplan_meier_curve(tmp_path / "km2.png", km, at_risk=False)
    assert len(figures[1].axes) == 1


def test_the_png_is_written(tmp_path):
    path = plots.kaplan_meier_curve(tmp_path / "km.png", kaplan_meier(TIMES, EVENTS.astype(bool)))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
