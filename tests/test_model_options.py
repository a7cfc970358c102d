"""Commands run the shipped calibration unless told otherwise (issue 15, item 6)."""

from __future__ import annotations

import argparse

import pytest

from qspjax.commands import _model_options as mo
from qspjax.params import load_parameters
from qspjax.vpop import load_population


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    mo.add_arguments(p)
    return p.parse_args(list(argv))


def test_nothing_given_means_the_shipped_calibration():
    choice = mo.resolve(_args())
    assert choice.calibrated
    assert choice.main == mo.DEFAULT_PARAMS and choice.extra == (mo.CALIBRATED_PARAMS,)
    assert choice.population == mo.CALIBRATED_POPULATION
    # and the calibration's fitted values are what the run sees, not QSP-IO's
    fitted = load_parameters(choice.main, choice.extra)
    published = load_parameters(mo.DEFAULT_PARAMS)
    assert fitted.values["alpha_tumor"] != pytest.approx(published.values["alpha_tumor"])
    # the calibrated spread (its value is checked against the posterior in test_shipped_calibration)
    assert load_population(choice.population).cv["k_C1_growth"] != pytest.approx(
        load_population(mo.DEFAULT_POPULATION).cv["k_C1_growth"])


def test_uncalibrated_and_explicit_params_drop_the_calibration(tmp_path):
    choice = mo.resolve(_args("--uncalibrated"))
    assert not choice.calibrated and choice.extra == () and choice.population == mo.DEFAULT_POPULATION
    mine = tmp_path / "mine.yaml"
    choice = mo.resolve(_args("--params", str(mine)))
    assert not choice.calibrated and choice.main == mine and choice.extra == ()
    assert choice.record()["parameter_files"] == [str(mine)]


def test_extra_files_go_over_the_calibration_and_population_replaces_it(tmp_path):
    extra, pop = tmp_path / "x.yaml", tmp_path / "p.yaml"
    choice = mo.resolve(_args("--params-extra", str(extra), "--population", str(pop)))
    assert choice.calibrated and choice.extra == (mo.CALIBRATED_PARAMS, extra) and choice.population == pop
    record = choice.record()
    assert record["parameter_files"] == ["configs/params/qspio_example1.yaml",
                                         "configs/params/calibrated/library_params.yaml", str(extra)]
    assert record["population_file"] == str(pop)


def test_uncalibrated_with_explicit_params_is_the_explicit_file_alone(tmp_path):
    mine = tmp_path / "mine.yaml"
    choice = mo.resolve(_args("--uncalibrated", "--params", str(mine)))
    assert not choice.calibrated and choice.main == mine and choice.extra == ()
    assert choice.population == mo.DEFAULT_POPULATION
