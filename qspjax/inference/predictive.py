"""Posterior-predictive virtual trials: rates whose intervals carry parameter uncertainty.

A calibration's posterior (``posterior.nc``, ArviZ InferenceData as written by ``qspjax infer``)
holds draws of the population quantities on their unconstrained scales, named as in the priors
file: ``<parameter>`` is the log (logit for a logitnormal parameter) of the population median and
``<parameter>.sd`` the log of the between-patient sd on that scale. :func:`load_posterior` reads
them, :func:`posterior_draws` thins them to ``k`` evenly spaced draws (over chains and draws), and
:func:`apply_draw` turns one draw into a parameter set and a population (the median into the
parameter value, the sd into the population's cv by ``cv = sqrt(expm1(sd**2))``, the inverse of
:func:`qspjax.vpop.population_params`'s ``sd = sqrt(log(1 + cv**2))``).

Each draw is simulated on the same virtual patients (the run's seed: common random numbers), so
the spread between draws is parameter uncertainty, not cohort noise. For a rate with ``x_k``
responders of ``n_k`` evaluated patients under draw ``k``, the predictive distribution of the
rate is the equal-weight mixture over draws of Beta(x_k + 1/2, n_k - x_k + 1/2) (the Jeffreys
posterior of each cohort's rate), so the credible interval widens with both the posterior's
spread and a small cohort's binomial noise (:func:`mixture_interval`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from qspjax.errors import QSPValidationError

_SD_SUFFIX = ".sd"


@dataclasses.dataclass(frozen=True)
class Posterior:
    """Draws (chain * draw flattened, chain-major) of each variable, and where they came from."""

    draws: dict[str, np.ndarray]
    path: str

    @property
    def n_draws(self) -> int:
        return len(next(iter(self.draws.values())))


def load_posterior(directory: str | Path) -> Posterior:
    """Read ``DIR/posterior.nc`` (or a ``.nc`` file given directly); refuse what is not usable."""
    import arviz as az

    path = Path(directory)
    if path.is_dir():
        path = path / "posterior.nc"
    if not path.is_file():
        raise QSPValidationError("command line", "--posterior", str(directory),
                                 "a folder holding posterior.nc (ArviZ InferenceData, as `qspjax infer` writes) "
                                 "or such a .nc file")
    try:
        idata = az.from_netcdf(str(path))
    except Exception as exc:  # not netCDF, or not InferenceData
        raise QSPValidationError(str(path), "(file)", type(exc).__name__, f"an ArviZ InferenceData netCDF file ({exc})")
    if "posterior" not in idata.groups():
        raise QSPValidationError(str(path), "posterior", None, "an InferenceData with a posterior group")
    post = idata.posterior
    draws = {}
    for name, var in post.data_vars.items():
        if tuple(var.dims) != ("chain", "draw"):
            continue  # vector-valued or derived quantities are not population parameters
        values = np.asarray(var.values, dtype=float).reshape(-1)
        if not np.all(np.isfinite(values)):
            raise QSPValidationError(str(path), f"posterior.{name}", "non-finite draws", "finite values in every draw")
        draws[str(name)] = values
    if not draws:
        raise QSPValidationError(str(path), "posterior", list(post.data_vars),
                                 "at least one scalar variable with dims (chain, draw)")
    return Posterior(draws, str(path))


def posterior_draws(posterior: Posterior, k: int) -> list[dict[str, float]]:
    """``k`` evenly spaced draws (all of them when there are fewer than ``k``)."""
    if k <= 0:
        raise QSPValidationError("command line", "--posterior-draws", k, "must be a positive integer")
    n = posterior.n_draws
    index = np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(int))
    return [{name: float(v[i]) for name, v in posterior.draws.items()} for i in index]


def apply_draw(draw: Mapping[str, float], params, spec, source: str = "posterior"):
    """(ParameterSet, PopulationSpec) for one draw; every variable must name a known quantity."""
    medians, cvs = {}, dict(spec.cv)
    for name, value in draw.items():
        if name.endswith(_SD_SUFFIX):
            parameter = name[: -len(_SD_SUFFIX)]
            if parameter not in spec.distributions:
                raise QSPValidationError(source, f"posterior.{name}", value,
                                         f"a spread of a parameter the population varies: {sorted(spec.distributions)}")
            sd = math.exp(value)
            cvs[parameter] = math.sqrt(math.expm1(sd * sd))
        else:
            if name not in params.values:
                raise QSPValidationError(source, f"posterior.{name}", value,
                                         "a model parameter (configs/params/README.md) or <parameter>.sd")
            logit = spec.distributions.get(name) == "logitnormal"
            medians[name] = 1.0 / (1.0 + math.exp(-value)) if logit else math.exp(value)
    return params.with_values(**medians), dataclasses.replace(spec, cv=cvs)


def mixture_interval(successes: Sequence[float], totals: Sequence[float], level: float = 0.95,
                     samples_per_draw: int = 4000, seed: int = 0) -> dict[str, float]:
    """Mean and central ``level`` interval of the mixture of Beta(x + 1/2, n - x + 1/2) over draws.

    Draws with ``n = 0`` (every patient failed) are left out and counted.
    """
    x = np.asarray(successes, dtype=float)
    n = np.asarray(totals, dtype=float)
    keep = n > 0
    if not np.any(keep):
        return {"mean": None, "lower": None, "upper": None, "draws": 0, "draws_without_patients": int(len(n))}
    rng = np.random.default_rng(seed)
    sample = np.concatenate([rng.beta(xi + 0.5, ni - xi + 0.5, samples_per_draw) for xi, ni in zip(x[keep], n[keep])])
    tail = 0.5 * (1.0 - level)
    lower, upper = np.quantile(sample, [tail, 1.0 - tail])
    return {"mean": float(np.mean((x[keep] + 0.5) / (n[keep] + 1.0))), "lower": float(lower), "upper": float(upper),
            "draws": int(keep.sum()), "draws_without_patients": int((~keep).sum())}


RATES = ("orr", "dcr", "cr", "pr", "sd", "pd")


def summarise_draws(per_draw: Sequence[Mapping], seed: int = 0) -> dict:
    """Posterior-predictive rates from each draw's trial summary (``n_evaluated`` and the rates)."""
    totals = [float(s["n_evaluated"]) for s in per_draw]
    out = {}
    for rate in RATES:
        if all(s.get(rate) is not None for s in per_draw):
            successes = [round(float(s[rate]) * t) for s, t in zip(per_draw, totals)]
            out[rate] = mixture_interval(successes, totals, seed=seed)
            out[rate]["per_draw"] = [float(s[rate]) for s in per_draw]
    return out
