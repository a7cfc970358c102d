"""The likelihood of trial-arm summaries under a virtual population, and the log posterior.

For each arm a fixed virtual cohort (common random numbers: the same quasi-random draws from one
seed for every arm and every parameter value) is grown to its baseline tumors and treated with
the arm's regimen; the smooth RECIST outcomes (:mod:`qspjax.outcomes`) turn the cohort's lesion
diameters into predicted probabilities, and the arm's printed counts enter as

* **response counts**: multinomial of the evaluated patients over CR/PR/SD/PD (the model's
  probabilities renormalised over those four), when the arm prints all four counts;
* **ORR**: otherwise binomial of ``responders`` of ``n`` with p = P(CR) + P(PR);
* **PFS**: the number progression-free at the landmark times (``round(pct/100 n)``), or ``n/2``
  at the printed median when there is no landmark, as a chain of conditional binomials
  ``k_1 ~ Bin(n, S(t_1))``, ``k_{j+1} | k_j ~ Bin(k_j, S(t_{j+1}) / S(t_j))`` (interval-grouped
  progression counts; censoring is ignored, which overstates the information of late points).
  ``S`` is the cohort-mean smooth progression-free probability, timed from the arm's
  ``outcome_origin_day``. Times beyond the simulated horizon are dropped.

Growth. The baseline state depends on the parameters (pre-treatment growth to each patient's
baseline diameter), so the growth is **part of the objective**: one growth solve per evaluation,
shared by all arms (they share the cohort), and differentiated like the treatment solves. Holding
the baseline fixed at the nominal parameters would be cheaper but biases the gradient: a faster
growth rate changes the immune state at baseline. Measured (2 CPU cores shared with other jobs,
4 patients, 2 arms, 42 days): one evaluation ~6.6 s, one value-and-gradient ~45 s once compiled;
compiling the value-and-gradient took ~220 s. Forward only, the growth of 4 patients (500-960
days from the seed) took ~7.9 s and one 42-day SBRT + pembrolizumab arm ~2.8 s (600-850 solver
steps per patient), both under load: growth costs about three short arms, a fraction of one
12-month arm, so it stays in the objective (see ``fits/README.md``).

Parameters are a flat vector ``theta`` (D,) in the order of the priors file, on unconstrained
scales (log/logit of population medians, log of between-patient sds); :meth:`Problem.as_dict`
gives the named view. ``log_posterior`` and its gradient are jit-compiled once per problem.

Simulators (:mod:`qspjax.inference.simulators`): ``"qsp"`` (the model) or ``"kinetics"`` (a
closed-form surrogate on the same schedules, draws, outcomes and likelihood, for fast tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln
from jaxtyping import Array, Float

from qspjax.data.trials import NOT_REACHED, Arm
from qspjax.errors import QSPValidationError
from qspjax.inference.config import ENDPOINTS, LikelihoodSettings, PriorSet
from qspjax.inference.simulators import KineticsSimulator, QSPSimulator
from qspjax.outcomes import soft_best_response_probabilities, soft_cohort_mean, soft_progression_free_probability
from qspjax.params import ParameterSet
from qspjax.regimen import LESIONS, Regimen, compile_schedule, parse_regimen, timeline_points
from qspjax.simulate import SolverConfig
from qspjax.vpop import PopulationParams, PopulationSpec, baseline, draw, patient_values, population_params

DAYS_PER_MONTH = 30.4375


# ---------------------------------------------------------------------------------------------
# Observed data of one arm
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArmData:
    """What the likelihood sees of one arm. Counts are patients; ``pfs_days`` are days after the
    arm's outcome origin (sorted), ``pfs_progression_free`` the patients progression-free then."""

    arm_id: str
    regimen: Regimen
    n: int
    response_counts: tuple[int, int, int, int] | None = None  # CR, PR, SD, PD
    responders: int | None = None
    pfs_days: tuple[float, ...] = ()
    pfs_progression_free: tuple[int, ...] = ()
    origin_day: float = 0.0
    notes: tuple[str, ...] = ()
    observed: dict = field(default_factory=dict)  # printed values for tables and plots


def arm_data_from_trial(arm: Arm, horizon_days: float, endpoints: Sequence[str] = ENDPOINTS) -> ArmData:
    """The likelihood's view of a trial arm; endpoints past ``horizon_days`` are dropped (noted)."""
    regimen = parse_regimen(arm.regimen, f"{arm.arm_id} regimen")
    notes = []
    counts = None
    if "response_counts" in endpoints and None not in (arm.cr_n, arm.pr_n, arm.sd_n, arm.pd_n):
        counts = (arm.cr_n, arm.pr_n, arm.sd_n, arm.pd_n)
    responders = arm.responders if ("orr" in endpoints and counts is None) else None
    points: list[tuple[float, int]] = []
    if "pfs" in endpoints:
        for lm in arm.landmarks:
            if lm.endpoint == "pfs":
                points.append((lm.months * DAYS_PER_MONTH, int(math.floor(lm.pct / 100 * arm.n + 0.5))))
        if not points and arm.median_pfs_months not in (None, NOT_REACHED):
            points.append((float(arm.median_pfs_months) * DAYS_PER_MONTH, int(math.floor(arm.n / 2 + 0.5))))
        kept = [(d, k) for d, k in sorted(points) if d + arm.outcome_origin_day <= horizon_days]
        if len(kept) < len(points):
            notes.append(f"{len(points) - len(kept)} PFS point(s) after the {horizon_days:g}-day horizon dropped")
        # the conditional-binomial chain needs non-increasing counts
        chain, last = [], arm.n
        for d, k in kept:
            if k <= last:
                chain.append((d, k))
                last = k
            else:
                notes.append(f"PFS point at {d:.0f} d ({k}) above an earlier count dropped")
        points = chain
    observed = {"n": arm.n, "orr_pct": arm.orr_pct, "orr_ci": arm.orr_ci,
                "median_pfs_months": arm.median_pfs_months, "median_pfs_ci": arm.median_pfs_ci,
                "landmarks": [(lm.endpoint, lm.months, lm.pct) for lm in arm.landmarks]}
    return ArmData(arm.arm_id, regimen, arm.n, counts, responders, tuple(d for d, _ in points),
                   tuple(k for _, k in points), float(arm.outcome_origin_day), tuple(notes), observed)


# ---------------------------------------------------------------------------------------------
# Log-likelihood pieces (jax)
# ---------------------------------------------------------------------------------------------
def binomial_logpmf(k, n, p):
    """log Bin(k; n, p), p clipped away from 0/1 so a confident but wrong model stays finite."""
    p = jnp.clip(p, 1e-9, 1 - 1e-9)
    return gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0) + k * jnp.log(p) + (n - k) * jnp.log1p(-p)


def multinomial_logpmf(counts, p):
    """log Mult(counts; sum(counts), p) with p renormalised and clipped away from 0."""
    p = jnp.clip(p, 1e-9, None)
    p = p / jnp.sum(p)
    counts = jnp.asarray(counts, float)
    return gammaln(jnp.sum(counts) + 1.0) - jnp.sum(gammaln(counts + 1.0)) + jnp.sum(counts * jnp.log(p))


# ---------------------------------------------------------------------------------------------
# The problem
# ---------------------------------------------------------------------------------------------
class Prediction(eqx.Module):
    """Cohort predictions of every arm. ``response`` (A, 5): P(CR, PR, SD, PD, NE);
    ``pfs`` (A, E+1): P(progression-free) at day 0 and each assessment day ``assessment_days``
    (counted from day 0 of the regimen); ``ok_fraction`` (A,): patients solved."""

    response: Float[Array, "arms 5"]
    pfs: Float[Array, "arms e"]
    ok_fraction: Float[Array, " arms"]


class Problem:
    """Arms, priors and a virtual cohort, with the jit-compiled log posterior over ``theta`` (D,).

    Every arm runs on one compiled shape: the model carries the union of the arms' drugs, the
    schedules are padded to the same number of timeline points and stacked on an arm axis, and
    ``lax.map`` runs the arms one after another (a vmap over arms would multiply memory of the
    reverse pass by the number of arms for no CPU gain).
    """

    def __init__(self, arms: Sequence[ArmData], priors: PriorSet, params: ParameterSet, spec: PopulationSpec,
                 settings: LikelihoodSettings = LikelihoodSettings(), config: SolverConfig | None = None,
                 simulator: str = "qsp"):
        if not arms:
            raise QSPValidationError("inference", "arms", [], "at least one arm is required")
        self.arms = tuple(arms)
        self.priors = priors
        self.params = params
        self.spec = spec
        self.settings = settings
        s = settings
        self.config = config or SolverConfig(rtol=s.rtol, atol=s.rtol * 1e-3)
        self.output_days = np.arange(0.0, s.horizon_days + 1e-9, s.output_every_days)
        if self.output_days[-1] < s.horizon_days - 1e-9:
            self.output_days = np.append(self.output_days, s.horizon_days)
        drugs: list[str] = []
        for a in self.arms:
            drugs += [d for d in a.regimen.drugs if d not in drugs]
        self.drugs = tuple(drugs) or ("nivolumab",)
        n_points = max(timeline_points(a.regimen, self.output_days) for a in self.arms)
        schedules = [compile_schedule(a.regimen, self.drugs, self.output_days, n_lesions=2, n_points=n_points)
                     for a in self.arms]
        self.schedules = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *schedules)
        if simulator == "qsp":
            self.simulator = QSPSimulator(params, self.drugs, self.config)
        elif simulator == "kinetics":
            self.simulator = KineticsSimulator(params)
        else:
            raise QSPValidationError("inference", "simulator", simulator, "allowed values are ['qsp', 'kinetics']")
        self.simulator_name = simulator
        self.target_mask = np.array([name in s.target_lesions for name in LESIONS[:2]])
        self.draws = draw(spec, s.patients, s.seed)
        base = baseline(spec, self.draws)
        self.baseline = {k: jnp.asarray(v) for k, v in base.items()}
        self.nominal = population_params(spec, params)
        # assessment days, as outcomes.py places them on this grid (day 0 first)
        eval_days = np.arange(s.assessment_interval_days, self.output_days[-1] + 1e-9, s.assessment_interval_days)
        self.assessment_days = np.concatenate([[0.0], eval_days])
        self._index = self._term_indices()
        self.log_posterior = jax.jit(self._log_posterior)
        self.log_likelihood = jax.jit(self._log_likelihood)
        self.value_and_grad = jax.jit(jax.value_and_grad(self._log_posterior))
        self.predict = jax.jit(self._predict)

    # -- parameters ---------------------------------------------------------------------------
    @property
    def ids(self) -> tuple[str, ...]:
        return self.priors.ids

    def prior_means(self) -> np.ndarray:
        """Centres of the priors on the unconstrained scale (D,)."""
        out = []
        for p in self.priors.priors:
            if p.quantity == "median":
                if p.center is None:
                    out.append(float(self.nominal.loc[p.parameter]))
                else:
                    c = p.center
                    out.append(math.log(c / (1 - c)) if self.spec.distributions[p.parameter] == "logitnormal"
                               else math.log(c))
            else:
                out.append(float(self.nominal.log_sd[p.parameter]) if p.center is None else math.log(p.center))
        return np.asarray(out)

    def prior_sds(self) -> np.ndarray:
        return np.asarray([p.sd for p in self.priors.priors])

    def as_dict(self, theta) -> dict[str, Array]:
        return {pid: theta[i] for i, pid in enumerate(self.ids)}

    def population(self, theta) -> PopulationParams:
        """The population pytree with the estimated entries of ``theta`` substituted."""
        loc, log_sd = dict(self.nominal.loc), dict(self.nominal.log_sd)
        for i, p in enumerate(self.priors.priors):
            if p.quantity == "median":
                loc[p.parameter] = theta[i]
            else:
                log_sd[p.parameter] = theta[i]
        return PopulationParams(loc, log_sd)

    def natural(self, theta) -> dict[str, float]:
        """Named values in natural units: medians of the model parameters and between-patient sds."""
        out = {}
        for i, p in enumerate(self.priors.priors):
            x = float(theta[i])
            if p.quantity == "sd":
                out[p.id] = math.exp(x)
            elif self.spec.distributions[p.parameter] == "logitnormal":
                out[p.id] = 1.0 / (1.0 + math.exp(-x))
            else:
                out[p.id] = math.exp(x)
        return out

    # -- the objective ------------------------------------------------------------------------
    def _predict(self, theta) -> Prediction:
        values = patient_values(self.spec, self.population(theta), self.draws)
        prepared = self.simulator.prepare(values, self.baseline)
        s = self.settings
        kw = dict(temperature=s.temperature, assessment_interval_days=s.assessment_interval_days)

        def one_arm(schedule):
            diam_mm, ok = self.simulator.arm(prepared, schedule)
            probs = soft_best_response_probabilities(self.output_days, diam_mm, self.target_mask, ok, **kw)
            pf = soft_progression_free_probability(self.output_days, diam_mm, self.assessment_days,
                                                   self.target_mask, ok, death_rate_per_day=s.death_rate_per_day, **kw)
            return soft_cohort_mean(probs, ok), soft_cohort_mean(pf, ok), jnp.mean(ok.astype(float))

        response, pfs, ok_fraction = jax.lax.map(one_arm, self.schedules)
        return Prediction(response, pfs, ok_fraction)

    def _term_indices(self):
        """Static indices of each arm's PFS times into ``assessment_days`` (the last scan on or before)."""
        idx = []
        for a in self.arms:
            days = np.asarray(a.pfs_days, float) + a.origin_day
            idx.append((int(np.searchsorted(self.assessment_days, a.origin_day * (1 + 1e-9) + 1e-9, "right") - 1),
                        np.searchsorted(self.assessment_days, days * (1 + 1e-9) + 1e-9, "right") - 1))
        return idx

    def landmark_pfs(self, pred: Prediction, i: int) -> Float[Array, " P"]:
        """Arm ``i``'s predicted progression-free fraction at its PFS landmarks (P,), counted from
        the arm's outcome origin (its day 0, e.g. randomisation after induction): the cohort's
        curve at each landmark's scan over its value at the origin's scan. Every consumer of
        predicted landmarks (likelihood, posterior predictive, report, SBC) reads them here."""
        origin, idx = self._index[i]
        return pred.pfs[i, jnp.asarray(idx, dtype=int)] / jnp.maximum(pred.pfs[i, origin], 1e-12)

    def observed_data(self) -> tuple[dict, ...]:
        """The arms' printed data, one dict per arm: ``counts`` (CR, PR, SD, PD) or
        ``responders``, and ``pfs`` (progression-free at the arm's landmarks) where it has them."""
        data = []
        for a in self.arms:
            d = {}
            if a.response_counts is not None:
                d["counts"] = a.response_counts
            elif a.responders is not None:
                d["responders"] = a.responders
            if a.pfs_days:
                d["pfs"] = a.pfs_progression_free
            data.append(d)
        return tuple(data)

    def arm_log_likelihoods(self, pred: Prediction, data: Sequence[dict] | None = None) -> Float[Array, " arms"]:
        """Log-likelihood of each arm's data given the predictions (A,).

        ``data`` (layout of :meth:`observed_data`; may be traced arrays, as in simulation-based
        calibration) replaces the arms' printed data; the arms' N and landmark days stay.
        """
        data = self.observed_data() if data is None else data
        out = []
        for i, (a, d) in enumerate(zip(self.arms, data)):
            ll = jnp.asarray(0.0)
            p = pred.response[i]
            if "counts" in d:
                ll = ll + multinomial_logpmf(d["counts"], p[:4])
            elif "responders" in d:
                ll = ll + binomial_logpmf(d["responders"], a.n, p[0] + p[1])
            if "pfs" in d:
                landmarks = self.landmark_pfs(pred, i)
                at_risk, s_prev = a.n, 1.0
                for j in range(landmarks.shape[0]):
                    s, k = landmarks[j], d["pfs"][j]
                    ll = ll + binomial_logpmf(k, at_risk, s / jnp.maximum(s_prev, 1e-12))
                    at_risk, s_prev = k, s
            out.append(ll)
        return jnp.stack(out)

    def _log_likelihood(self, theta):
        return jnp.sum(self.arm_log_likelihoods(self._predict(theta)))

    def _log_prior(self, theta):
        mu, sd = jnp.asarray(self.prior_means()), jnp.asarray(self.prior_sds())
        z = (theta - mu) / sd
        return jnp.sum(-0.5 * z * z - jnp.log(sd) - 0.5 * math.log(2 * math.pi))

    def log_prior(self, theta):
        return self._log_prior(jnp.asarray(theta))

    def _log_posterior(self, theta):
        return self._log_prior(theta) + self._log_likelihood(theta)

    def sample_prior(self, key, n: int) -> np.ndarray:
        """``n`` draws (n, D) from the priors on the unconstrained scale."""
        z = jax.random.normal(key, (n, len(self.ids)))
        return np.asarray(self.prior_means() + self.prior_sds() * z)


def build_problem(arm_ids: Sequence[str], trials, priors: PriorSet, params: ParameterSet, spec: PopulationSpec,
                  settings: LikelihoodSettings, endpoints: Sequence[str] = ENDPOINTS, simulator: str = "qsp") -> Problem:
    """A :class:`Problem` over trial arms ``arm_ids`` of a :class:`~qspjax.data.trials.TrialSet`."""
    arms = [arm_data_from_trial(trials.get_arm(a), settings.horizon_days, endpoints) for a in arm_ids]
    return Problem(arms, priors, params, spec, settings, simulator=simulator)
