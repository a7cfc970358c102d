"""Bayesian inference through the ODE model by importance reweighting of a simulated library.

One value-and-gradient of the ODE likelihood (:mod:`qspjax.inference.likelihood`) costs about a
minute on a small CPU, so NUTS through it (thousands of gradients) is out of reach. But the
trajectories depend on the population parameters only through the *patients* they produce:
a virtual patient x (its per-patient parameter values, baseline tumor and PD-L1 class) has the
same trajectory whatever population it was drawn from. So:

1. **Library** (:func:`build_library`): per arm, L patients are drawn once from a *proposal*
   q(x), broader than the prior predictive of the population, grown to the arm's baseline and
   treated with the arm's regimen (the arm's own drugs, baseline target and follow-up, capped at
   ``horizon_cap_days``). Per patient the library keeps its log parameter values, log q(x), and
   the smooth RECIST outcomes the likelihood uses (:mod:`qspjax.outcomes`): P(CR, PR, SD, PD, NE)
   and P(progression-free) at each scan, and where the regimen has surgery the pathology category
   of the resected lesion (pCR / MPR without pCR / no MPR, :func:`pathology_categories`). Written
   per arm (``arms/<arm>.npz``, resumable) with a JSON sidecar (``library.json``: seed, settings,
   proposal, provenance, per-arm costs).
2. **Reweighting** (:class:`LibraryModel`): for population hyperparameters theta (log medians
   and log between-patient sds of the reweighted parameters), each patient gets the
   self-normalised weight w_i(theta) ∝ p(x_i | theta) / q(x_i) over the arm's usable patients
   (solved, and plausible at baseline by the population file's ranges, as ``qspjax trial``
   screens its cohorts); the arm's predicted probabilities are the weighted means of the stored
   per-patient probabilities, exactly the cohort means :class:`~qspjax.inference.likelihood.Problem`
   forms, with weights in place of 1/M. Only the densities of the reweighted parameters enter
   the ratio: the baseline draws and the varied parameters that are not estimated are drawn from
   the population itself and cancel.
3. **Likelihood**: the terms of :mod:`qspjax.inference.likelihood` (multinomial response counts
   or binomial responders, the chain of conditional PFS binomials with Greenwood-matched numbers
   at risk, read through :meth:`Problem.landmark_pfs` / :meth:`Problem.pfs_conditionals` of a
   one-arm template problem), with its Monte-Carlo error term 1/n_eff = 1/n_trial + 1/M (times
   S(start) for a PFS interval, as there), and for arms that print both pCR and MPR one
   multinomial of (pCR, MPR without pCR, no MPR) over the arm's N (the same patients, so the two
   rates are not scored as independent). The reweighted cohort is worth M = its Kish effective
   sample size, ESS = 1 / Σ w_i², not L. ``mc_error`` says which M:

   * ``"fixed"`` (default): per arm, the median Kish ESS over 256 prior draws, fixed, and the
     sizes rounded to whole patients as ``arm_terms`` rounds them: every term is then a proper
     binomial/multinomial with a size that does not depend on theta, and SBC draws from exactly it;
   * ``"ess"``: M = ESS(theta), so the likelihood widens where the library is thin at theta. The
     data then enter as proportions scored at k = proportion · n_eff(theta) with the Jacobian
     log(n_eff / n_trial) per free dimension (a density of the observed proportion). Its
     normalising constant grows as ½ log n_eff per term, about a nat per term between ESS 2 and
     30, so over some 60 terms it rewards theta for being where the proposal put many patients,
     a pull of the order of tens of nats that has nothing to do with the data (leaving the
     Jacobian out pulls the other way, to where the library is thinnest). Kept for comparison;
   * ``"none"``: n_eff = n_trial, the terms of :meth:`Problem.arm_log_likelihoods` with
     ``virtual_cohort_error=False`` (test: uniform weights reproduce them exactly). On a library
     of a few effective patients it fits the Monte-Carlo noise of the weights (posteriors far too
     narrow); for tests and comparison.

   Whatever the mode, the summary reports each arm's Kish ESS at posterior draws: where it is a
   few patients, the predictions rest on those few.
4. **NUTS** (:func:`run_nuts`): everything above is closed-form JAX over (arms × L) numbers, so a
   gradient costs milliseconds and NUTS runs many chains to tight R-hat and ESS.

What reweighting cannot do: a *global* parameter (one without between-patient variability)
changes every stored trajectory, so it cannot be estimated this way; only population medians
and spreads of parameters that vary between patients can. The weights also degrade when theta
moves far from where the proposal put its patients: the Kish ESS per arm at posterior draws
reports it. Five reweighted parameters with wide priors make the weights degenerate unless L
is large: the weights' ESS of a prior draw is roughly L times (σ_target / σ_proposal) per
dimension, a few patients in a few dozen at L = 64 (``fits/README.md``).

Posterior variables follow the priors file's ids (``<parameter>`` = log median,
``<parameter>.sd`` = log between-patient sd), the layout
:func:`qspjax.inference.predictive.load_posterior` reads.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qspjax.data import count_from_pct
from qspjax.errors import QSPValidationError
from qspjax.inference.config import ENDPOINTS, LikelihoodSettings, PriorSet
from qspjax.inference.likelihood import (
    Prediction,
    Problem,
    arm_data_from_trial,
    binomial_logpmf,
    multinomial_logpmf,
)
from qspjax.params import ParameterSet
from qspjax.vpop import PopulationSpec

LIBRARY_FORMAT = 1
SIDECAR = "library.json"
ARM_DIR = "arms"
MC_MODES = ("fixed", "ess", "none")
SUPPORT_WIDTH = 0.1  # log-ESS width of the support wall (LibraryModel.min_ess): 10 % below costs 0.5 nat
class ArmPrediction(NamedTuple):
    """One arm's reweighted prediction: the cohort :class:`Prediction` (one arm), the weights'
    Kish ESS, and P(pCR, MPR without pCR, no MPR) at surgery (3,) (None without the pathology term)."""

    prediction: Prediction
    ess: jax.Array
    pathology: jax.Array | None = None


_ARM_FIELDS = ("log_values", "log_q", "response", "pfs", "solved", "plausible", "steps", "assessment_days",
               "other_log_values")


# ---------------------------------------------------------------------------------------------
# Proposal
# ---------------------------------------------------------------------------------------------
def reweighted_parameters(priors: PriorSet) -> tuple[str, ...]:
    """The varied parameters whose median or spread the priors estimate, in order of first mention."""
    out: list[str] = []
    for p in priors.priors:
        if p.parameter not in out:
            out.append(p.parameter)
    return tuple(out)


@dataclass(frozen=True)
class Proposal:
    """Independent normals on the log (logit) values of the reweighted parameters: q(x)."""

    names: tuple[str, ...]
    loc: tuple[float, ...]
    scale: tuple[float, ...]

    def log_density(self, log_values) -> np.ndarray:
        """log q of each row of ``log_values`` (L, K) (density of the log values)."""
        z = (np.asarray(log_values) - np.asarray(self.loc)) / np.asarray(self.scale)
        return np.sum(-0.5 * z * z - np.log(self.scale) - 0.5 * math.log(2 * math.pi), axis=1)

    def as_dict(self) -> dict:
        return {"names": list(self.names), "loc": list(self.loc), "scale": list(self.scale)}


def default_proposal(template: Problem, widen_sds: float = 0.5, inflate: float = 1.0) -> Proposal:
    """A proposal broader than the prior predictive of each reweighted parameter's log value.

    Centred at the prior centre of the median; log-sd sqrt(s_m² + s_b²) · ``inflate`` with s_m the
    prior sd of the log median and s_b a generous between-patient sd: the prior centre of the sd
    raised by ``widen_sds`` prior sds (e.g. cv 0.6 -> log-sd 0.55 -> 0.71 at half a prior sd of 0.5).
    """
    names = reweighted_parameters(template.priors)
    mu, sd = template.prior_means(), template.prior_sds()
    index = {p.id: i for i, p in enumerate(template.priors.priors)}
    loc, scale = [], []
    for name in names:
        if name in index:
            m, s_m = float(mu[index[name]]), float(sd[index[name]])
        else:
            m, s_m = float(template.nominal.loc[name]), 0.0
        if f"{name}.sd" in index:
            j = index[f"{name}.sd"]
            s_b = math.exp(float(mu[j]) + widen_sds * float(sd[j]))
        else:
            s_b = math.exp(float(template.nominal.log_sd[name]))
        loc.append(m)
        scale.append(inflate * math.sqrt(s_m * s_m + s_b * s_b))
    return Proposal(names, tuple(loc), tuple(scale))


POTENCY_PREFIX = "blockade_emax_"


def _arm_regimen(arm):
    from qspjax.regimen import Regimen, parse_regimen

    return arm.regimen if isinstance(arm.regimen, Regimen) else parse_regimen(arm.regimen, f"{arm.arm_id} regimen")


def arm_targets(arm, params: ParameterSet) -> tuple[str, ...]:
    """The checkpoint targets (PD1, PDL1, CTLA4) of the antibodies an arm doses."""
    regimen = _arm_regimen(arm)
    out = []
    for drug in regimen.drugs:
        t = params.targets.get(drug)
        if t is not None and t not in out:
            out.append(t)
    return tuple(out)


def relevant_parameters(arm, names: Sequence[str], params: ParameterSet) -> np.ndarray:
    """Which reweighted parameters can change an arm's patients (K,): all but the per-target
    potencies ``blockade_emax_<target>`` of targets the arm's antibodies do not bind.

    An irrelevant parameter leaves every trajectory of the arm unchanged, so its density ratio is
    left out of the arm's weights: the weights then use the exact marginal of the proposal over
    the relevant parameters (independent normals), instead of multiplying in a ratio whose only
    effect is Monte-Carlo noise (a PD-1 arm's weights would otherwise degrade as the CTLA-4
    potency moves).
    """
    targets = set(arm_targets(arm, params))
    return np.array([not n.startswith(POTENCY_PREFIX) or n[len(POTENCY_PREFIX):] in targets for n in names])


def posterior_proposal(draws: dict, base: Proposal, inflate: float = 1.3) -> Proposal:
    """A proposal centred on a population posterior: per parameter with draws of its log median
    (``draws[name]``) and log between-patient sd (``draws[name + '.sd']``), the normal with the
    mean of the median draws and log-sd ``inflate`` · sqrt(var(median) + s_b²), s_b = exp(mean +
    sd of the log-sd draws) (the predictive spread of one patient's log value, widened). Parameters
    without draws keep ``base``'s entries. A library drawn from it keeps far more effective patients
    near the posterior than one drawn from the broad prior-based proposal."""
    if not (math.isfinite(inflate) and inflate > 0):
        raise QSPValidationError("library", "proposal inflate", inflate, "a positive number")
    loc, scale = list(base.loc), list(base.scale)
    for i, name in enumerate(base.names):
        if name not in draws:
            continue
        m = np.asarray(draws[name], float)
        if f"{name}.sd" in draws:
            ls = np.asarray(draws[f"{name}.sd"], float)
            s_b = math.exp(float(ls.mean() + ls.std()))
        else:
            s_b = base.scale[i]
        loc[i] = float(m.mean())
        scale[i] = float(inflate * math.sqrt(float(m.var()) + s_b * s_b))
    return Proposal(base.names, tuple(loc), tuple(scale))


# ---------------------------------------------------------------------------------------------
# One arm's template problem: schedule, scans and likelihood terms
# ---------------------------------------------------------------------------------------------
def arm_horizon(arm, horizon_cap_days: float | None) -> float:
    """The simulated days of an arm: its follow-up, capped at ``horizon_cap_days``."""
    days = float(arm.follow_up_days)
    return days if horizon_cap_days is None else min(days, float(horizon_cap_days))


def arm_template(arm, priors: PriorSet, params: ParameterSet, spec: PopulationSpec, settings: LikelihoodSettings,
                 horizon_days: float, endpoints: Sequence[str] = ENDPOINTS) -> Problem:
    """A one-arm :class:`Problem` over ``horizon_days``: the arm's schedule, output grid, scans and
    :class:`~qspjax.inference.likelihood.ArmTerms` (without the Monte-Carlo term, which the library
    model adds from the weights' ESS). Its simulator is never run (the surrogate is named only so
    nothing is compiled)."""
    s = dataclasses.replace(settings, horizon_days=float(horizon_days))
    data = arm_data_from_trial(arm, s.horizon_days, endpoints)
    return Problem([data], priors, params, spec, s, simulator="kinetics", virtual_cohort_error=False)


RESPONSE_READS = 2  # version of the rule below (libraries built by another rule do not merge)


@dataclass(frozen=True)
class ResponseRead:
    """How an arm's response is read from a simulated course (days of the regimen grid).

    ``origin_day``: the RECIST baseline (the arm's ``outcome_origin_day``, e.g. PACIFIC's
    randomisation after chemoradiation; the grid point nearest it); ``read_days``: days after the
    origin of the reads the best response is taken over (None: every assessment interval to the
    horizon); ``sd_min_days``: the minimum time for SD."""

    origin_day: float
    read_days: tuple[float, ...] | None
    sd_min_days: float
    rule: str


def response_read(arm, output_days) -> ResponseRead:
    """The response read the trial reports: before surgery when the regimen has surgery (one read
    at the last grid day before it: a resected tumor has no radiological response; SD allowed at
    any time, as trials restage just before surgery), at the arm's ``orr_assessment_months`` when
    printed (one fixed-time read), else the best overall response over scans every interval from
    the origin (as :mod:`qspjax.virtual_trial` reads a cohort)."""
    from qspjax.inference.likelihood import DAYS_PER_MONTH
    from qspjax.outcomes import SD_MIN_DAYS
    from qspjax.regimen import parse_regimen

    days = np.asarray(output_days, float)
    origin = float(arm.outcome_origin_day)
    i0 = int(np.argmin(np.abs(days - origin)))
    rel = days[i0:] - days[i0]
    regimen = parse_regimen(arm.regimen, f"{arm.arm_id} regimen")
    if regimen.surgery:
        s = min(float(x.day) for x in regimen.surgery) - float(days[i0])
        before = rel[(rel > 0) & (rel < s)]
        if before.size:
            d = float(before.max())
            return ResponseRead(float(days[i0]), (d,), 0.0,
                                f"one read {d:g} days after the origin (day {days[i0]:g}), the last grid day before "
                                f"surgery (day {s + days[i0]:g})")
    if arm.orr_assessment_months:
        d = float(arm.orr_assessment_months) * DAYS_PER_MONTH
        if d <= rel[-1]:
            return ResponseRead(float(days[i0]), (d,), SD_MIN_DAYS,
                                f"one fixed-time read {d:g} days after the origin (day {days[i0]:g}), the printed "
                                f"orr_assessment_months")
    return ResponseRead(float(days[i0]), None, SD_MIN_DAYS,
                        f"best overall response over scans every interval from the origin (day {days[i0]:g})")


def reports_pathology(arm) -> bool:
    """Whether a trial arm prints both its pCR and its MPR rate (the pathology term needs both)."""
    return getattr(arm, "pcr_pct", None) is not None and getattr(arm, "mpr_pct", None) is not None


def pathology_categories(viable_fraction, status_ok) -> np.ndarray:
    """Per patient (n, 3) the one-hot pathology category at surgery, from the viable cancer-cell
    fraction of each lesion (n, L; NaN where not resected): [pCR, MPR without pCR, no MPR], by the
    rule of :func:`qspjax.outcomes.pathological_response` (pCR: viable fraction < 0.1 %; MPR: <= 10 %
    viable tumour; the resected lesion with the most viable tumour decides). A patient with no
    resected lesion or a failed solve gets NaN (when the regimen has surgery, a failed solve is
    also not usable, so it never enters a weight)."""
    from qspjax.outcomes import pathological_response

    v = np.asarray(viable_fraction, float)
    r = pathological_response(v, np.asarray(status_ok, bool))
    cats = np.stack([r.pcr, r.mpr & ~r.pcr, ~r.mpr], 1).astype(float)
    resected = np.isfinite(v).any(axis=1) if v.ndim == 2 else np.isfinite(v)
    cats[~resected] = np.nan
    cats[resected & ~r.evaluable] = 0.0  # resected but failed: unusable, stored finite
    return cats


def _arm_seed(seed: int, arm_id: str) -> np.random.Generator:
    """Per-arm random stream: depends on the seed and the arm id only (adding arms changes nothing)."""
    return np.random.default_rng([int(seed), zlib.crc32(arm_id.encode())])


def draw_patients(template: Problem, arm, proposal: Proposal, n: int, seed: int) -> dict:
    """``n`` patients for ``arm``: the reweighted parameters from the proposal, the other varied
    parameters from the population, the baseline from the population matched to the arm."""
    from qspjax.vpop import Draws, baseline, matched_spec, target_from_arm

    rng = _arm_seed(seed, arm.arm_id)
    spec = template.spec
    k = len(proposal.names)
    z = rng.standard_normal((n, k))
    log_values = np.asarray(proposal.loc) + np.asarray(proposal.scale) * z
    others = [name for name in spec.names if name not in proposal.names]
    z_other = rng.standard_normal((n, len(others)))
    other_log = np.stack([float(template.nominal.loc[nm]) + math.exp(float(template.nominal.log_sd[nm])) * z_other[:, j]
                          for j, nm in enumerate(others)], axis=1) if others else np.zeros((n, 0))
    z_d, z_s, u = rng.standard_normal(n), rng.standard_normal(n), rng.uniform(1e-12, 1 - 1e-12, n)
    base = baseline(matched_spec(spec, target_from_arm(arm)), Draws(np.zeros((n, 0)), z_d, z_s, u, seed, ()))
    values = {}
    for j, name in enumerate(proposal.names):
        values[name] = _natural(spec, name, log_values[:, j])
    for j, name in enumerate(others):
        values[name] = _natural(spec, name, other_log[:, j])
    return {"log_values": log_values, "log_q": proposal.log_density(log_values), "other_names": tuple(others),
            "other_log_values": other_log, "values": values, "baseline": base}


def _natural(spec: PopulationSpec, name: str, x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x)) if spec.distributions[name] == "logitnormal" else np.exp(x)


# ---------------------------------------------------------------------------------------------
# Simulating the patients of one arm
# ---------------------------------------------------------------------------------------------
def _take(patients: dict, index: np.ndarray) -> dict:
    """The patients ``index`` of a :func:`draw_patients` dict."""
    return {"log_values": patients["log_values"][index], "log_q": patients["log_q"][index],
            "other_names": patients["other_names"], "other_log_values": patients["other_log_values"][index],
            "values": {k: np.asarray(v)[index] for k, v in patients["values"].items()},
            "baseline": {k: np.asarray(v)[index] for k, v in patients["baseline"].items()}}


def simulate_patients(template: Problem, candidates: dict, n: int, simulator: str = "qsp", chunk: int = 16,
                      progress=None, read: ResponseRead | None = None) -> tuple[dict, dict]:
    """The first ``n`` plausible patients of ``candidates`` and their smooth RECIST outcomes under the
    template's arm: (patients, outcomes), numpy arrays.

    The QSP model grows candidates to their baselines in chunks of ``chunk`` (``vpop.grow_cohort``),
    screens them by the population file's plausibility ranges (``vpop.plausibility_reasons``), as
    ``qspjax trial`` screens its cohorts, until ``n`` pass; only those are treated
    (``simulate.simulate_batch``, chunks padded: one compilation per arm). Both proposal and target
    are then truncated to the plausible set, which self-normalised weights handle exactly.
    Outcomes: ``response`` (n, 5), ``pfs`` (n, E+1) on ``template.assessment_days``, ``pathology``
    (n, 3) at surgery (:func:`pathology_categories`; None without surgery or with the surrogate), ``solved`` (n,),
    ``plausible`` (n,) (True), ``steps`` (n,) treated-solve steps (0 for the surrogate), and
    ``screening`` (candidates grown, rejected).
    """
    from qspjax.inference.simulators import KineticsSimulator
    from qspjax.model.cancer import diameter_from_volume
    from qspjax.outcomes import soft_best_response_probabilities, soft_progression_free_probability
    from qspjax.solver.simulate import STATUS_OK, simulate_batch
    from qspjax.vpop import Cohort, build_models, grow_cohort, plausibility_reasons

    s = template.settings
    schedule = jax.tree_util.tree_map(lambda x: x[0], template.schedules)
    kw = dict(temperature=s.temperature, assessment_interval_days=s.assessment_interval_days)
    grid = np.asarray(template.output_days, float)  # (not `days`: the growth loop below has its own)
    if read is None:  # best response from day 0 (the first rule)
        i0, read_kw = 0, {}
    else:
        i0 = int(np.argmin(np.abs(grid - read.origin_day)))
        read_kw = {"sd_min_days": read.sd_min_days}
        if read.read_days is not None:
            read_kw["assessment_days"] = np.asarray(read.read_days, float)
    pool = len(candidates["log_q"])
    if simulator not in ("qsp", "kinetics"):
        raise QSPValidationError("library", "simulator", simulator, "allowed values are ['qsp', 'kinetics']")

    def models_of(p, size):
        values = {k: jnp.asarray(v) for k, v in p["values"].items()}
        return build_models(template.params, values, size, template.drugs, 2, jnp.asarray(p["baseline"]["pdl1_multiplier"]))

    # 1. grow and screen candidates until n are plausible
    kept, grown, states, screened = [], [], [], 0
    if simulator == "qsp":
        chunk = min(chunk, n)
        for start in range(0, pool, chunk):
            if len(kept) >= n:
                break
            index = np.minimum(np.arange(start, start + chunk), pool - 1)
            p = _take(candidates, index)
            models = models_of(p, chunk)
            b = p["baseline"]
            y0, status, days = grow_cohort(models, template.params, jnp.asarray(b["diameter_cm"]),
                                           jnp.asarray(b["second_lesion_ratio"]), template.config)
            cohort = Cohort(models, y0, status, days, jnp.asarray(b["diameter_cm"]), jnp.asarray(b["tps_class"]))
            good = (plausibility_reasons(cohort, template.spec.plausibility) < 0) & (np.arange(start, start + chunk) < pool)
            screened += int(min(chunk, pool - start))
            for j in np.flatnonzero(good)[: n - len(kept)]:
                kept.append(int(index[j]))
                states.append(jax.tree_util.tree_map(lambda x, _j=j: x[_j], y0))
            if progress is not None:
                progress(f"grown {screened} candidates, {len(kept)}/{n} plausible")
        if len(kept) < n:
            raise QSPValidationError("library", "patients", n, f"only {len(kept)} of {pool} candidates are plausible")
    else:
        kept, screened = list(range(n)), n
    patients = _take(candidates, np.asarray(kept))
    # 2. treat them
    chunk = n if simulator != "qsp" else min(chunk, n)
    out = {k: [] for k in ("response", "pfs", "solved", "steps", "pathology")}
    for start in range(0, n, chunk):
        index = np.minimum(np.arange(start, start + chunk), n - 1)
        m = min(chunk, n - start)
        p = _take(patients, index)
        if simulator == "qsp":
            models = models_of(p, chunk)
            y0 = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[states[i] for i in index])
            traj = simulate_batch(models, y0, schedule, template.config)
            ok = np.asarray(traj.status) == STATUS_OK
            diam_cm = jax.vmap(lambda mm, ys: diameter_from_volume(jax.vmap(mm.lesion_volume)(ys)))(models, traj.ys)
            diam_mm = 10.0 * jnp.swapaxes(diam_cm, 1, 2)
            steps = np.asarray(traj.num_steps)
            viable = template.arms[0].regimen.read_specimens(np.asarray(traj.viable_fraction_at_surgery))
            pathology = pathology_categories(viable, ok)
        else:
            sim = KineticsSimulator(template.params)
            values = {k: jnp.asarray(v) for k, v in p["values"].items()}
            diam_mm, ok = sim.arm(sim.prepare(values, {k: jnp.asarray(v) for k, v in p["baseline"].items()}), schedule)
            ok, steps = np.asarray(ok), np.zeros(chunk, int)
            pathology = np.full((chunk, 3), np.nan)  # the surrogate has no surgery
        okj = jnp.asarray(ok)
        probs = soft_best_response_probabilities(grid[i0:], diam_mm[..., i0:], template.target_mask, okj,
                                                 **kw, **read_kw)
        pf = soft_progression_free_probability(template.output_days, diam_mm, template.assessment_days,
                                               template.target_mask, okj, death_rate_per_day=s.death_rate_per_day, **kw)
        out["response"].append(np.asarray(probs)[:m])
        out["pfs"].append(np.asarray(pf)[:m])
        out["solved"].append(np.asarray(ok, bool)[:m])
        out["steps"].append(np.asarray(steps)[:m])
        out["pathology"].append(pathology[:m])
        if progress is not None:
            progress(f"treated {start + m}/{n}")
    res = {k: np.concatenate(v) for k, v in out.items()}
    # a patient that failed to solve has no outcome: the `usable` mask gives it zero weight in every
    # arm, and its non-finite probabilities are stored as 0 so the arm file stays finite
    res["response"] = np.where(np.isfinite(res["response"]), res["response"], 0.0)
    res["pfs"] = np.where(np.isfinite(res["pfs"]), res["pfs"], 0.0)
    # pathology only where the regimen resects a lesion (every solved patient then has one)
    res["pathology"] = res["pathology"] if np.isfinite(res["pathology"]).all() else None
    res["plausible"] = np.ones(n, bool)
    res["screening"] = {"candidates_grown": screened, "rejected": screened - n}
    return patients, res


# ---------------------------------------------------------------------------------------------
# The library on disk
# ---------------------------------------------------------------------------------------------
@dataclass
class ArmLibrary:
    """One arm's library: L patients' log values (L, K) of the reweighted parameters, log q (L,),
    outcome probabilities, and which patients are usable (solved and plausible)."""

    arm_id: str
    horizon_days: float
    log_values: np.ndarray
    log_q: np.ndarray
    response: np.ndarray
    pfs: np.ndarray
    solved: np.ndarray
    plausible: np.ndarray
    steps: np.ndarray
    assessment_days: np.ndarray
    other_log_values: np.ndarray
    meta: dict = dataclasses.field(default_factory=dict)  # cost and screening of the run that built it
    pathology: np.ndarray | None = None  # (L, 3) pathology_categories at surgery; None: not simulated

    @property
    def usable(self) -> np.ndarray:
        return self.solved & self.plausible

    def __len__(self) -> int:
        return int(self.log_q.shape[0])


@dataclass
class Library:
    """A library of arms and the settings it was built with (the sidecar ``library.json``)."""

    arms: tuple[ArmLibrary, ...]
    meta: dict
    path: str = ""

    @property
    def arm_ids(self) -> tuple[str, ...]:
        return tuple(a.arm_id for a in self.arms)

    def proposal(self) -> Proposal:
        p = self.meta["proposal"]
        return Proposal(tuple(p["names"]), tuple(p["loc"]), tuple(p["scale"]))


def arm_file(directory: Path, arm_id: str) -> Path:
    return Path(directory) / ARM_DIR / (re.sub(r"[^A-Za-z0-9_.-]", "_", arm_id) + ".npz")


def _write_arm(path: Path, arm: ArmLibrary, settings_key: str, arm_meta: dict | None = None) -> None:
    from qspjax.io import atomic_write, strict_json_dumps

    arrays = {k: getattr(arm, k) for k in _ARM_FIELDS}
    if arm.pathology is not None:
        arrays["pathology"] = np.asarray(arm.pathology, float)

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.savez(f, arm_id=np.asarray(arm.arm_id), horizon_days=np.asarray(arm.horizon_days),
                     settings_key=np.asarray(settings_key), meta_json=np.asarray(strict_json_dumps(arm_meta or {})),
                     **arrays)

    atomic_write(path, write)


def _read_arm(path: Path, arm_id: str, settings_key: str | None = None) -> ArmLibrary:
    if not path.is_file():
        raise QSPValidationError(str(path), "(file)", str(path), f"the library file of arm {arm_id} is missing")
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except Exception as exc:  # not an npz
        raise QSPValidationError(str(path), "(file)", type(exc).__name__, f"a library npz file ({exc})") from None
    for key in ("arm_id", "horizon_days", "settings_key") + _ARM_FIELDS:
        if key not in d:
            raise QSPValidationError(str(path), key, None, "required array is missing (not a library file?)")
    if str(d["arm_id"]) != arm_id:
        raise QSPValidationError(str(path), "arm_id", str(d["arm_id"]), f"the library file of arm {arm_id}")
    if settings_key is not None and str(d["settings_key"]) != settings_key:
        raise QSPValidationError(str(path), "settings_key", str(d["settings_key"]),
                                 f"built with the library's settings ({settings_key})")
    lib_meta = {}
    if "meta_json" in d:
        import json

        lib_meta = json.loads(str(d["meta_json"]))
    pathology = np.asarray(d["pathology"], float) if "pathology" in d else None
    if pathology is not None and pathology.shape != (len(d["log_q"]), 3):
        raise QSPValidationError(str(path), "pathology", list(pathology.shape), f"shape ({len(d['log_q'])}, 3)")
    return ArmLibrary(arm_id, float(d["horizon_days"]), *(np.asarray(d[k]) for k in _ARM_FIELDS[:5]),
                      np.asarray(d["plausible"], bool), np.asarray(d["steps"]), np.asarray(d["assessment_days"]),
                      np.asarray(d["other_log_values"]), lib_meta, pathology)


def arm_digest(arm) -> str:
    """A short digest of what an arm's library patients are simulated under: its regimen (every
    course, fraction and resection) and the baseline its cohort is matched to. An arm file built
    under another is rebuilt on resume, not reused."""
    from qspjax.io import strict_json_dumps
    from qspjax.vpop import target_from_arm

    target = dataclasses.asdict(target_from_arm(arm))
    target.pop("notes")
    doc = {"regimen": dataclasses.asdict(_arm_regimen(arm)), "baseline": target}
    return f"{zlib.crc32(strict_json_dumps(doc, sort_keys=True).encode()):08x}"


def _settings_key(meta: dict) -> str:
    """A short digest of what makes a library's patients what they are (resuming checks it)."""
    from qspjax.io import strict_json_dumps

    keep = {k: meta[k] for k in ("seed", "patients_per_arm", "horizon_cap_days", "likelihood", "proposal", "screen_factor",
                                 "simulator", "priors", "params", "population", "format") if k in meta}
    if "response_reads" in meta:
        keep["response_reads"] = meta["response_reads"]
    return f"{zlib.crc32(strict_json_dumps(keep, sort_keys=True).encode()):08x}"


def build_library(out: str | Path, arms: Sequence, priors: PriorSet, params: ParameterSet, spec: PopulationSpec,
                  settings: LikelihoodSettings, patients: int, seed: int, horizon_cap_days: float | None = 400.0,
                  simulator: str = "qsp", chunk: int = 16, proposal: Proposal | None = None, screen_factor: int = 4,
                  endpoints: Sequence[str] = ENDPOINTS, record: dict | None = None, progress: bool = True) -> Library:
    """Simulate ``patients`` proposal patients per arm of ``arms`` (trial :class:`~qspjax.data.Arm`\\ s)
    into ``out`` (``arms/<arm>.npz`` and ``library.json``). An arm whose file exists with the same
    settings is kept (resume); the sidecar is rewritten after every arm with its cost."""
    from qspjax.io import atomic_write_json, provenance

    out = Path(out)
    if not arms:
        raise QSPValidationError("library", "arms", [], "at least one arm is required")
    first = arm_template(arms[0], priors, params, spec, settings, arm_horizon(arms[0], horizon_cap_days), endpoints)
    proposal = proposal or default_proposal(first)
    meta = {"format": LIBRARY_FORMAT, "seed": int(seed), "patients_per_arm": int(patients),
            "horizon_cap_days": horizon_cap_days, "simulator": simulator, "screen_factor": int(screen_factor),
            "likelihood": dataclasses.asdict(settings) | {"target_lesions": list(settings.target_lesions)},
            "proposal": proposal.as_dict(), "priors": priors.path, "endpoints": list(endpoints),
            "params": (record or {}).get("params"), "population": (record or {}).get("population"),
            "arm_ids": [a.arm_id for a in arms], "response_reads": RESPONSE_READS}
    key = _settings_key(meta)
    meta["settings_key"] = key
    meta["record"] = record or {}
    meta["provenance"] = provenance(config={k: v for k, v in meta.items() if k != "provenance"}, seed=seed)
    meta["arms"] = {}
    sidecar = out / SIDECAR
    libs = []
    t_all = time.perf_counter()
    for i, arm in enumerate(arms):
        path = arm_file(out, arm.arm_id)
        horizon = arm_horizon(arm, horizon_cap_days)
        if path.is_file():
            try:
                lib = _read_arm(path, arm.arm_id, key)
                built_for = (lib.meta or {}).get("arm_digest")
                now = arm_digest(arm)
                if built_for is not None and built_for != now:
                    raise QSPValidationError(str(path), "arm_digest", built_for,
                                             f"built for this arm's regimen and baseline as they are now ({now})")
                if reports_pathology(arm) and simulator == "qsp" and lib.pathology is None:
                    raise QSPValidationError(str(path), "pathology", None,
                                             "the pCR/MPR outcomes at surgery that this arm's trial reports")
                libs.append(lib)
                meta["arms"][arm.arm_id] = lib.meta or _arm_meta(lib, None, "kept from an earlier run (same settings)")
                if progress:
                    print(f"[{i + 1}/{len(arms)}] {arm.arm_id}: kept ({path})", flush=True)
                continue
            except QSPValidationError as exc:
                if progress:
                    print(f"[{i + 1}/{len(arms)}] {arm.arm_id}: rebuilding ({exc})", flush=True)
        template = arm_template(arm, priors, params, spec, settings, horizon, endpoints)
        candidates = draw_patients(template, arm, proposal, screen_factor * patients, seed)
        t0 = time.perf_counter()

        def report(what, _arm=arm.arm_id, _t0=t0, _i=i):
            if progress:
                print(f"[{_i + 1}/{len(arms)}] {_arm}: {what}, {time.perf_counter() - _t0:.0f} s", flush=True)

        read = response_read(arm, template.output_days)
        drawn, sim = simulate_patients(template, candidates, patients, simulator, chunk, report, read)
        wall = time.perf_counter() - t0
        lib = ArmLibrary(arm.arm_id, horizon, drawn["log_values"], drawn["log_q"], sim["response"], sim["pfs"],
                         sim["solved"], sim["plausible"], sim["steps"], np.asarray(template.assessment_days),
                         drawn["other_log_values"], pathology=sim["pathology"])
        lib.meta = _arm_meta(lib, wall, None) | {"screening": sim["screening"], "response_read": read.rule,
                                                 "arm_digest": arm_digest(arm)}
        _write_arm(path, lib, key, lib.meta)
        libs.append(lib)
        meta["arms"][arm.arm_id] = lib.meta
        meta["wall_s"] = time.perf_counter() - t_all
        atomic_write_json(sidecar, meta)
        # every arm compiles its own solver shapes; a long run that keeps them all dies of LLVM's
        # "Cannot allocate memory" at the memory-map limit (benchmarks/all_arms.py does the same)
        jax.clear_caches()
        if progress:
            print(f"[{i + 1}/{len(arms)}] {arm.arm_id}: {len(lib)} patients in {wall:.0f} s "
                  f"({len(lib) / max(wall, 1e-9):.3f} patients/s), usable {int(lib.usable.sum())}, "
                  f"horizon {horizon:g} d", flush=True)
    meta["wall_s"] = time.perf_counter() - t_all
    atomic_write_json(sidecar, meta)
    return Library(tuple(libs), meta, str(out))


def _arm_meta(lib: ArmLibrary, wall: float | None, note: str | None) -> dict:
    d = {"patients": len(lib), "solved": int(lib.solved.sum()), "plausible": int(lib.plausible.sum()),
         "usable": int(lib.usable.sum()), "horizon_days": lib.horizon_days,
         "solver_steps_median": float(np.median(lib.steps)) if len(lib) else None,
         "wall_s": wall, "patients_per_s": (len(lib) / wall) if wall else None}
    if note:
        d["note"] = note
    return d


def load_library(directory: str | Path | Sequence[str | Path], arm_ids: Sequence[str] | None = None) -> Library:
    """Read a library folder; ``arm_ids`` (e.g. the arms to fit) must all be in it and are the ones read.

    Several folders (a list) are one library when they differ only in seed (and size): patients
    drawn independently from the same proposal under the same settings; their arms are concatenated.
    """
    if not isinstance(directory, (str, Path)):
        parts = [load_library(d, arm_ids) for d in directory]
        if not parts:
            raise QSPValidationError("command line", "--library", [], "at least one library folder")
        return merge_libraries(parts)
    directory = Path(directory)
    sidecar = directory / SIDECAR
    if not sidecar.is_file():
        raise QSPValidationError(str(sidecar), "(file)", str(sidecar),
                                 "a library folder with library.json (fits/library.py --build writes it)")
    import json

    try:
        meta = json.loads(sidecar.read_text())
    except ValueError as exc:
        raise QSPValidationError(str(sidecar), "(file)", "not JSON", str(exc)) from None
    for field in ("format", "arm_ids", "proposal", "settings_key", "likelihood", "seed"):
        if field not in meta:
            raise QSPValidationError(str(sidecar), field, None, "required field is missing")
    if meta["format"] != LIBRARY_FORMAT:
        raise QSPValidationError(str(sidecar), "format", meta["format"], f"library format {LIBRARY_FORMAT}")
    have = list(meta["arm_ids"])
    wanted = list(arm_ids) if arm_ids is not None else have
    missing = [a for a in wanted if a not in have]
    if missing:
        raise QSPValidationError(str(sidecar), "arm_ids", missing[0],
                                 f"an arm of the library (the library was built for {have})")
    arms = tuple(_read_arm(arm_file(directory, a), a, meta["settings_key"]) for a in wanted)
    return Library(arms, meta, str(directory))


_MERGE_SAME = ("format", "proposal", "likelihood", "horizon_cap_days", "simulator", "screen_factor", "priors",
               "params", "population", "endpoints", "response_reads")


def merge_libraries(parts: Sequence[Library]) -> Library:
    """One library from several built with the same settings and proposal but different seeds."""
    first = parts[0]
    seeds = [p.meta["seed"] for p in parts]
    if len(set(seeds)) != len(seeds):
        raise QSPValidationError(parts[-1].path, "library.json: seed", seeds,
                                 "libraries to merge need different seeds (else they hold the same patients)")
    for p in parts[1:]:
        for key in _MERGE_SAME:
            if p.meta.get(key) != first.meta.get(key):
                raise QSPValidationError(f"{p.path}/{SIDECAR}", key, p.meta.get(key),
                                         f"the same as in {first.path}/{SIDECAR} to merge: {first.meta.get(key)}")
        if p.arm_ids != first.arm_ids:
            raise QSPValidationError(f"{p.path}/{SIDECAR}", "arm_ids", list(p.arm_ids), f"the arms of {first.path}")
    arms = []
    for i, a in enumerate(first.arms):
        same = [p.arms[i] for p in parts]
        cat = {k: np.concatenate([getattr(x, k) for x in same]) for k in _ARM_FIELDS if k != "assessment_days"}
        pathology = (np.concatenate([x.pathology for x in same])
                     if all(x.pathology is not None for x in same) else None)
        arms.append(ArmLibrary(a.arm_id, a.horizon_days, cat["log_values"], cat["log_q"], cat["response"], cat["pfs"],
                               cat["solved"], cat["plausible"], cat["steps"], a.assessment_days, cat["other_log_values"],
                               {"parts": [x.meta for x in same]}, pathology))
    meta = dict(first.meta)
    meta["seed"] = seeds
    meta["settings_key"] = "+".join(p.meta["settings_key"] for p in parts)
    meta["parts"] = [p.path for p in parts]
    meta["provenance"] = [p.meta.get("provenance") for p in parts]
    return Library(tuple(arms), meta, "+".join(p.path for p in parts))


# ---------------------------------------------------------------------------------------------
# Reweighting and the likelihood
# ---------------------------------------------------------------------------------------------
def kish_ess(weights) -> jax.Array:
    """Kish effective sample size (Σ w)² / Σ w² of non-negative weights (last axis)."""
    w = jnp.asarray(weights)
    return jnp.sum(w, -1) ** 2 / jnp.maximum(jnp.sum(w * w, -1), 1e-300)


def log_normal_terms(log_values, loc, log_sd):
    """Per-parameter log densities (L, K) of rows ``log_values`` under independent normals (K,)."""
    z = (log_values - loc) / jnp.exp(log_sd)
    return -0.5 * z * z - log_sd - 0.5 * math.log(2 * math.pi)


def log_target_density(log_values, loc, log_sd) -> jax.Array:
    """log p(x | theta) of rows ``log_values`` (L, K) under independent normals (K,) on the log scale."""
    return jnp.sum(log_normal_terms(log_values, loc, log_sd), axis=-1)


def self_normalised_weights(log_p, log_q, usable) -> jax.Array:
    """w_i ∝ p_i / q_i over the usable patients, summing to 1 (unusable: 0)."""
    log_w = jnp.where(usable, log_p - log_q, -jnp.inf)
    return jax.nn.softmax(log_w)


_TEMPLATES: dict = {}  # one-arm templates by arm and the objects they were built from (see LibraryModel)


class LibraryModel:
    """The reweighted likelihood of a library's arms, with priors: what NUTS samples.

    ``arms``: trial :class:`~qspjax.data.Arm` of the library's arms (same order); ``mc_error``:
    the Kish-ESS Monte-Carlo term (see the module docstring). Duck-compatible with what
    :func:`qspjax.inference.sbc.nuts_sampler` needs of a problem (``prior_means``, ``prior_sds``,
    ``_log_prior``, ``predict``, ``arm_log_likelihoods``).
    """

    def __init__(self, library: Library, arms: Sequence, priors: PriorSet, params: ParameterSet,
                 spec: PopulationSpec, settings: LikelihoodSettings | None = None, mc_error: str | bool = "fixed",
                 endpoints: Sequence[str] | None = None, prior_ess_draws: int = 256, fixed_ess=None,
                 min_ess: float | None = None):
        if tuple(a.arm_id for a in arms) != library.arm_ids:
            raise QSPValidationError(library.path or "library", "arm_ids", list(library.arm_ids),
                                     f"the arms asked for, in order: {[a.arm_id for a in arms]}")
        proposal = library.proposal()
        names = reweighted_parameters(priors)
        if tuple(proposal.names) != names:
            raise QSPValidationError(library.path or "library", "proposal.names", list(proposal.names),
                                     f"the parameters the priors estimate: {list(names)}")
        if settings is None:
            lik = dict(library.meta["likelihood"])
            lik["target_lesions"] = tuple(lik["target_lesions"])
            settings = LikelihoodSettings(**lik)
        endpoints = tuple(endpoints or library.meta.get("endpoints", ENDPOINTS))
        self.library = library
        self.priors = priors
        mc_error = {True: "fixed", False: "none"}.get(mc_error, mc_error) if isinstance(mc_error, bool) else mc_error
        if mc_error not in MC_MODES:
            raise QSPValidationError("library model", "mc_error", mc_error, f"allowed values are {list(MC_MODES)}")
        self.mc_error = mc_error
        self.names = names
        self.templates = []
        for arm, lib in zip(arms, library.arms):
            key = (arm.arm_id, lib.horizon_days, id(arm), id(priors), id(params), id(spec), settings, endpoints)
            if key not in _TEMPLATES:  # building a template compiles its schedule: cross-validation reuses them
                # the arm is kept with its template, so its id() cannot be reused while the entry exists
                _TEMPLATES[key] = (arm, arm_template(arm, priors, params, spec, settings, lib.horizon_days, endpoints))
            t = _TEMPLATES[key][1]
            if len(t.assessment_days) != lib.pfs.shape[1] or not np.allclose(t.assessment_days, lib.assessment_days):
                raise QSPValidationError(library.path or "library", f"arms.{lib.arm_id}.assessment_days",
                                         list(lib.assessment_days), f"the scans of the settings: {list(t.assessment_days)}")
            if not lib.usable.any():
                raise QSPValidationError(library.path or "library", f"arms.{lib.arm_id}.usable", 0,
                                         "at least one solved, plausible patient")
            self.templates.append(t)
        self.ref = self.templates[0]
        self.arms = tuple(t.arms[0] for t in self.templates)
        # parameter index of each reweighted parameter's median and sd in theta (-1: nominal)
        ids = priors.ids
        self.median_index = np.array([ids.index(n) if n in ids else -1 for n in names])
        self.sd_index = np.array([ids.index(f"{n}.sd") if f"{n}.sd" in ids else -1 for n in names])
        self.nominal_loc = np.array([float(self.ref.nominal.loc[n]) for n in names])
        self.nominal_log_sd = np.array([float(self.ref.nominal.log_sd[n]) for n in names])
        # per patient and parameter log q (the proposal is a product of normals), and which
        # parameters enter each arm's weights (relevant_parameters)
        loc_q, scale_q = np.asarray(proposal.loc), np.asarray(proposal.scale)
        self.relevance = np.stack([relevant_parameters(a, names, params) for a in arms])
        self._arrays = [(jnp.asarray(lib.log_values),
                         log_normal_terms(jnp.asarray(lib.log_values), jnp.asarray(loc_q), jnp.log(scale_q)),
                         jnp.asarray(lib.usable), jnp.asarray(lib.response), jnp.asarray(lib.pfs)) for lib in library.arms]
        self._data_sizes = [self._sizes(t) for t in self.templates]
        # pathology at surgery (pCR / MPR): scored where the trial prints both and the library
        # simulated it; a reporting arm whose library lacks it is named in pathology_omitted
        self._pathology, self.pathology_omitted = [], []
        for arm, lib, sz in zip(arms, library.arms, self._data_sizes):
            if reports_pathology(arm) and lib.pathology is not None:
                k_pcr = count_from_pct(float(arm.pcr_pct), arm.n)
                k_mpr = max(k_pcr, count_from_pct(float(arm.mpr_pct), arm.n))
                sz["pathology_n"] = float(arm.n)
                sz["pathology_counts"] = np.array([k_pcr, k_mpr - k_pcr, arm.n - k_mpr], float)
                self._pathology.append(jnp.asarray(np.nan_to_num(lib.pathology)))
            else:
                sz["pathology_n"] = 0.0
                if reports_pathology(arm):
                    self.pathology_omitted.append(arm.arm_id)
                self._pathology.append(None)
        self.predict = jax.jit(self._predict)
        if min_ess is not None and not (math.isfinite(min_ess) and min_ess >= 1.0):
            raise QSPValidationError("library model", "min_ess", min_ess, "a number of effective patients >= 1")
        # Support of the reweighted likelihood: with a fixed Monte-Carlo size M per arm, a theta
        # where one or two library patients carry an arm (Kish ESS ~1) would be scored as if it
        # were predicted by M patients; NUTS then finds such corners (their predictions are 0/1)
        # and the chains stop mixing. min_ess walls them off (support_log_penalty).
        self.min_ess = min_ess
        self.fixed_ess = None
        self.fixed_ess_source = None
        if self.mc_error == "fixed" and fixed_ess is not None:
            m = np.asarray(fixed_ess, float)
            if m.shape != (len(self.arms),) or not np.all(np.isfinite(m)) or np.any(m < 1.0):
                raise QSPValidationError("library model", "fixed_ess", fixed_ess,
                                         f"one Monte-Carlo size >= 1 per arm ({len(self.arms)})")
            self.fixed_ess, self.fixed_ess_source = m, "given"
        elif self.mc_error == "fixed":
            self.fixed_ess_source = f"median Kish ESS over {prior_ess_draws} prior draws"
            self.fixed_ess = self.median_ess(self.sample_prior(jax.random.PRNGKey(0), prior_ess_draws),
                                             n=prior_ess_draws)
        self.log_posterior = jax.jit(self._log_posterior)
        self.log_likelihood = jax.jit(self._log_likelihood)

    # -- parameters -----------------------------------------------------------------------------
    @property
    def ids(self) -> tuple[str, ...]:
        return self.priors.ids

    def prior_means(self) -> np.ndarray:
        return self.ref.prior_means()

    def prior_sds(self) -> np.ndarray:
        return self.ref.prior_sds()

    def _log_prior(self, theta):
        return self.ref._log_prior(theta)

    def sample_prior(self, key, n: int) -> np.ndarray:
        return self.ref.sample_prior(key, n)

    def natural(self, theta) -> dict[str, float]:
        return self.ref.natural(theta)

    def _loc_log_sd(self, theta):
        theta = jnp.asarray(theta)
        loc = jnp.where(jnp.asarray(self.median_index >= 0), theta[jnp.asarray(np.maximum(self.median_index, 0))],
                        jnp.asarray(self.nominal_loc))
        log_sd = jnp.where(jnp.asarray(self.sd_index >= 0), theta[jnp.asarray(np.maximum(self.sd_index, 0))],
                           jnp.asarray(self.nominal_log_sd))
        return loc, log_sd

    def weights(self, theta) -> list[jax.Array]:
        """Self-normalised weights of each arm's patients at ``theta``."""
        loc, log_sd = self._loc_log_sd(theta)
        out = []
        for (x, lq, ok, _, _), mask in zip(self._arrays, self.relevance):
            log_ratio = log_normal_terms(x, loc, log_sd) - lq
            out.append(self_normalised_weights(jnp.sum(jnp.where(jnp.asarray(mask), log_ratio, 0.0), -1), 0.0, ok))
        return out

    # -- predictions ----------------------------------------------------------------------------
    def _predict(self, theta) -> tuple[ArmPrediction, ...]:
        """Per arm: the reweighted cohort :class:`Prediction` (one arm), the weights' Kish ESS and
        the pathology probabilities (:class:`ArmPrediction`)."""
        out = []
        for w, (_, _, ok, resp, pfs), path in zip(self.weights(theta), self._arrays, self._pathology):
            pred = Prediction((w @ resp)[None], (w @ pfs)[None], jnp.mean(ok.astype(float))[None])
            out.append(ArmPrediction(pred, kish_ess(w), None if path is None else w @ path))
        return tuple(out)

    def ess(self, theta) -> np.ndarray:
        """Kish ESS of each arm's weights at ``theta`` (A,)."""
        return np.array([float(a.ess) for a in self.predict(jnp.asarray(theta))])

    def median_ess(self, draws, n: int = 256) -> np.ndarray:
        """Median over ``n`` evenly spaced rows of ``draws`` (D, len(ids)) of each arm's Kish ESS (A,):
        the Monte-Carlo size of the reweighted cohorts where a posterior puts its mass (``fixed_ess``
        of a second, final run)."""
        draws = np.asarray(draws, float)
        idx = np.unique(np.linspace(0, len(draws) - 1, min(n, len(draws))).round().astype(int))
        ess = jax.jit(jax.vmap(lambda th: jnp.stack([a.ess for a in self._predict(th)])))(jnp.asarray(draws[idx]))
        return np.median(np.asarray(ess), axis=0)

    # -- data and likelihood -----------------------------------------------------------------------
    @staticmethod
    def _sizes(t: Problem) -> dict:
        """Fixed sizes of an arm's terms: the trial's response n and each PFS interval's number at
        risk (Greenwood-matched, without Monte-Carlo term) with the observed S at its start."""
        terms, arm = t.terms[0], t.arms[0]
        start = []
        if terms.pfs_points:
            s0 = 1.0 - arm.response_counts[3] / arm.n if terms.first_scan is not None else 1.0
            surv_at = {}
            running = s0
            for j in range(len(arm.pfs_days)):
                running = min(arm.pfs_progression_free[j] / arm.n, running)
                surv_at[j] = running
            start = [surv_at[p] if p >= 0 else s0 for p in terms.pfs_from]
        return {"response_n": float(terms.response_n), "pfs_at_risk": np.asarray(terms.pfs_at_risk, float),
                "pfs_start": np.asarray(start, float)}

    def observed_data(self) -> tuple[dict, ...]:
        """The arms' data as proportions: ``counts`` (4,) fractions of the evaluated patients or
        ``responders`` (), ``pfs`` (J,) the conditional progression-free fraction of each scored interval,
        and ``pathology`` (3,) the fractions with pCR, MPR without pCR and no MPR (of the arm's N)."""
        data = []
        for t, sz in zip(self.templates, self._data_sizes):
            terms, d = t.terms[0], {}
            if terms.counts is not None:
                d["counts"] = np.asarray(terms.counts, float) / sz["response_n"]
            elif terms.responders is not None:
                d["responders"] = np.asarray(terms.responders / sz["response_n"], float)
            if terms.pfs_points:
                d["pfs"] = np.asarray(terms.pfs_free, float) / sz["pfs_at_risk"]
            if sz["pathology_n"] > 0:
                d["pathology"] = sz["pathology_counts"] / sz["pathology_n"]
            data.append(d)
        return tuple(data)

    def effective_sizes(self, ess) -> list[dict]:
        """n_eff of each term of each arm given the arms' Kish ESS (A,) (jax or numpy; ignored
        unless ``mc_error="ess"``). ``"fixed"``: M = :attr:`fixed_ess`, sizes rounded to whole
        patients (at least 1), as :func:`qspjax.inference.likelihood.arm_terms` rounds them."""
        out = []
        if self.mc_error == "fixed":
            ess = self.fixed_ess

        def one_term(n, m):  # a term over n trial patients against a cohort worth m (0: no term)
            if self.mc_error == "none" or n <= 0:
                return n
            n_eff = 1.0 / (1.0 / n + 1.0 / m)
            return float(max(1, round(n_eff))) if self.mc_error == "fixed" else n_eff

        for sz, m in zip(self._data_sizes, ess):
            n_pfs = sz["pfs_at_risk"]
            if self.mc_error != "none" and len(n_pfs):
                n_pfs = 1.0 / (1.0 / n_pfs + 1.0 / (m * sz["pfs_start"]))
                if self.mc_error == "fixed":
                    n_pfs = np.maximum(1.0, np.round(np.asarray(n_pfs, float)))
            out.append({"response_n": one_term(sz["response_n"], m), "pfs_at_risk": n_pfs,
                        "pathology_n": one_term(sz["pathology_n"], m)})
        return out

    def arm_log_likelihoods(self, pred, data: Sequence[dict] | None = None) -> jax.Array:
        """Log-likelihood of each arm's data (proportions, layout of :meth:`observed_data`) (A,)."""
        data = self.observed_data() if data is None else data
        ess = [a.ess for a in pred]
        sizes = self.effective_sizes(ess)
        out = []
        for i, (t, d, sz, ne) in enumerate(zip(self.templates, data, self._data_sizes, sizes)):
            p_arm = pred[i].prediction
            p = p_arm.response[0]
            ll = jnp.asarray(0.0)
            if "counts" in d:
                n = ne["response_n"]
                ll = ll + multinomial_logpmf(jnp.asarray(d["counts"]) * n, p[:4]) + 3.0 * jnp.log(n / sz["response_n"])
            elif "responders" in d:
                n = ne["response_n"]
                ll = ll + binomial_logpmf(jnp.asarray(d["responders"]) * n, n, p[0] + p[1]) + jnp.log(n / sz["response_n"])
            if "pfs" in d:
                q = t.pfs_conditionals(p_arm, 0)
                m = ne["pfs_at_risk"]
                ll = ll + jnp.sum(binomial_logpmf(jnp.asarray(d["pfs"]) * m, m, q) + jnp.log(m / sz["pfs_at_risk"]))
            if "pathology" in d:  # pCR, MPR without pCR, no MPR: one multinomial of the same patients
                n = ne["pathology_n"]
                ll = ll + multinomial_logpmf(jnp.asarray(d["pathology"]) * n, pred[i].pathology) + \
                    2.0 * jnp.log(n / sz["pathology_n"])
            out.append(ll)
        return jnp.stack(out)

    def _log_likelihood(self, theta, arm_weights=None):
        """Sum of the arms' log-likelihoods; ``arm_weights`` (A,) of 0/1 keeps a subset of the arms
        (a cross-validation fold: :func:`subset_sampler`), the same value as a model of those arms."""
        ll = self.arm_log_likelihoods(self._predict(theta))
        return jnp.sum(ll if arm_weights is None else arm_weights * ll)

    def support_log_penalty(self, theta, arm_weights=None) -> jax.Array:
        """0 where every arm's weights keep at least ``min_ess`` effective patients, else a steep
        half-normal wall in log ESS (width ``SUPPORT_WIDTH``): the posterior restricted to where the
        library supports the reweighted likelihood (see :attr:`min_ess`). ``arm_weights``: as in
        :meth:`_log_likelihood` (only the kept arms' support counts)."""
        if self.min_ess is None:
            return jnp.asarray(0.0)
        log_ess = jnp.log(jnp.stack([a.ess for a in self._predict(theta)]))
        short = jnp.maximum(math.log(self.min_ess) - log_ess, 0.0) / SUPPORT_WIDTH
        return -0.5 * jnp.sum(short * short if arm_weights is None else arm_weights * short * short)

    def _log_posterior(self, theta):
        return self._log_prior(theta) + self._log_likelihood(theta) + self.support_log_penalty(theta)

    def simulate_data(self, theta, rng: np.random.Generator) -> tuple[dict, ...]:
        """One data set at ``theta`` from the model the likelihood scores: per term, a count of
        round(n_eff(theta)) patients (multinomial / binomial at the reweighted probabilities) as
        a proportion; n_eff includes the Monte-Carlo term at theta's ESS when ``mc_error``."""
        pred = self.predict(jnp.asarray(theta))
        sizes = self.effective_sizes([float(a.ess) for a in pred])
        data = []
        for i, (t, template, ne) in enumerate(zip(self.templates, self.observed_data(), sizes)):
            p_arm = pred[i].prediction
            p = np.asarray(p_arm.response[0])
            d = {}
            n = max(1, int(round(float(ne["response_n"])))) if ("counts" in template or "responders" in template) else 0
            if "counts" in template:
                q = np.clip(p[:4], 1e-9, None)
                d["counts"] = rng.multinomial(n, q / q.sum()) / n
            elif "responders" in template:
                d["responders"] = np.asarray(rng.binomial(n, np.clip(p[0] + p[1], 0.0, 1.0)) / n, float)
            if "pfs" in template:
                q = np.clip(np.asarray(t.pfs_conditionals(p_arm, 0)), 0.0, 1.0)
                m = np.maximum(1, np.round(np.asarray(ne["pfs_at_risk"], float))).astype(int)
                d["pfs"] = rng.binomial(m, q) / m
            if "pathology" in template:
                n = max(1, int(round(float(ne["pathology_n"]))))
                q = np.clip(np.asarray(pred[i].pathology), 1e-9, None)
                d["pathology"] = rng.multinomial(n, q / q.sum()) / n
            data.append(d)
        return tuple(data)

    def predicted_orr(self, theta) -> np.ndarray:
        """Predicted ORR of each arm at ``theta`` (A,)."""
        return np.array([float(a.prediction.response[0, 0] + a.prediction.response[0, 1])
                         for a in self.predict(jnp.asarray(theta))])


# ---------------------------------------------------------------------------------------------
# NUTS
# ---------------------------------------------------------------------------------------------
def numpyro_model(model: LibraryModel, arm_weights=None) -> None:
    """Priors on the unconstrained parameters (one site per id) plus the reweighted log-likelihood
    (of the arms ``arm_weights`` keeps, or of all)."""
    import numpyro
    import numpyro.distributions as dist

    mu, sd = model.prior_means(), model.prior_sds()
    theta = jnp.stack([numpyro.sample(pid, dist.Normal(float(m), float(s))) for pid, m, s in zip(model.ids, mu, sd)])
    numpyro.factor("log_likelihood", model.log_likelihood(theta) if arm_weights is None
                   else model._log_likelihood(theta, arm_weights))
    if model.min_ess is not None:
        numpyro.factor("library_support", model.support_log_penalty(theta, arm_weights))


def run_nuts(model: LibraryModel, key, chains: int = 4, warmup: int = 500, samples: int = 500,
             target_accept: float = 0.9, max_tree_depth: int = 8, progress: bool = False):
    """numpyro NUTS on :func:`numpyro_model`, chains vectorised (the likelihood is closed-form);
    each chain starts at its own uniform draw within ±0.5 of the prior centre (``init_to_uniform``)."""
    from numpyro.infer import MCMC, NUTS
    from numpyro.infer.initialization import init_to_uniform

    kernel = NUTS(numpyro_model, target_accept_prob=target_accept, max_tree_depth=max_tree_depth,
                  init_strategy=init_to_uniform(radius=0.5))
    mcmc = MCMC(kernel, num_warmup=warmup, num_samples=samples, num_chains=chains, chain_method="vectorized",
                progress_bar=progress)
    mcmc.run(key, model, extra_fields=("diverging", "num_steps"))
    return mcmc


def subset_sampler(model: LibraryModel, chains: int = 4, warmup: int = 500, samples: int = 500,
                   target_accept: float = 0.9, max_tree_depth: int = 8):
    """One compiled NUTS program for fits to subsets of ``model``'s arms: ``run(key, weights)``
    samples the posterior given the arms whose ``weights`` (A,) are 1, exactly the posterior of a
    model built on those arms alone (:meth:`LibraryModel._log_likelihood`), and returns the numpyro
    ``MCMC``. The weights are a traced argument (numpyro's ``jit_model_args``), so every fold of a
    cross-validation reuses the first fold's compilation instead of compiling its own."""
    import functools

    from numpyro.infer import MCMC, NUTS
    from numpyro.infer.initialization import init_to_uniform

    kernel = NUTS(functools.partial(numpyro_model, model), target_accept_prob=target_accept,
                  max_tree_depth=max_tree_depth, init_strategy=init_to_uniform(radius=0.5))
    mcmc = MCMC(kernel, num_warmup=warmup, num_samples=samples, num_chains=chains, chain_method="vectorized",
                progress_bar=False, jit_model_args=True)

    def run(key, weights):
        w = jnp.asarray(weights, dtype=float)
        if w.shape != (len(model.arms),):
            raise ValueError(f"subset_sampler: {w.shape} arm weights for {len(model.arms)} arms")
        mcmc.run(key, w, extra_fields=("diverging", "num_steps"))
        return mcmc

    return run


def posterior_matrix(mcmc, model: LibraryModel) -> np.ndarray:
    s = mcmc.get_samples()
    return np.stack([np.asarray(s[pid]) for pid in model.ids], axis=1)


def summarise(mcmc, model: LibraryModel, ess_draws: int = 200) -> dict:
    """R-hat, bulk/tail ESS, divergences, and the weights' Kish ESS per arm over posterior draws."""
    import arviz as az

    idata = az.from_numpyro(mcmc)
    table = az.summary(idata, var_names=list(model.ids), kind="all", round_to="none")
    diverging = np.asarray(mcmc.get_extra_fields(group_by_chain=True)["diverging"])
    draws = posterior_matrix(mcmc, model)
    nat = model.natural(np.median(draws, axis=0))
    out = {"parameters": {}, "divergences": int(diverging.sum()), "divergences_per_chain": diverging.sum(1).tolist(),
           "chains": int(diverging.shape[0]), "samples_per_chain": int(diverging.shape[1])}
    for pid in model.ids:
        row = table.loc[pid]
        out["parameters"][pid] = {"mean": float(row["mean"]), "sd": float(row["sd"]), "hdi_3%": float(row["hdi_3%"]),
                                  "hdi_97%": float(row["hdi_97%"]), "r_hat": float(row["r_hat"]),
                                  "ess_bulk": float(row["ess_bulk"]), "ess_tail": float(row["ess_tail"]),
                                  "prior_mean": float(model.prior_means()[model.ids.index(pid)]),
                                  "prior_sd": float(model.prior_sds()[model.ids.index(pid)]),
                                  "natural_median": nat[pid]}
    out["rhat_max"] = max(v["r_hat"] for v in out["parameters"].values())
    out["ess_bulk_min"] = min(v["ess_bulk"] for v in out["parameters"].values())
    out["ess_tail_min"] = min(v["ess_tail"] for v in out["parameters"].values())
    idx = np.unique(np.linspace(0, len(draws) - 1, min(ess_draws, len(draws))).round().astype(int))
    ess = np.array([model.ess(draws[j]) for j in idx])  # (draws, arms)
    out["weight_ess"] = {"draws": int(len(idx)), "note": "Kish ESS of each arm's importance weights at posterior draws",
                         "per_arm": {a.arm_id: {"patients_usable": int(lib.usable.sum()), "min": float(ess[:, i].min()),
                                                "median": float(np.median(ess[:, i]))}
                                     for i, (a, lib) in enumerate(zip(model.arms, model.library.arms))}}
    out["weight_ess"]["min_over_arms"] = float(ess.min())
    out["weight_ess"]["min_of_arm_medians"] = float(np.median(ess, axis=0).min())
    return out


def predictive_table(model: LibraryModel, draws: np.ndarray, n_draws: int = 200, level: float = 0.95) -> list[dict]:
    """Per arm: observed ORR and its exact CI, predicted ORR median and ``level`` interval over posterior
    draws (the reweighted cohort mean: parameter uncertainty only), inside or not."""
    from qspjax.outcomes import binomial_ci

    idx = np.unique(np.linspace(0, len(draws) - 1, min(n_draws, len(draws))).round().astype(int))
    orr = np.array([model.predicted_orr(draws[j]) for j in idx])  # (draws, arms)
    rows = []
    for i, a in enumerate(model.arms):
        k = a.responders if a.responders is not None else (
            a.response_counts[0] + a.response_counts[1] if a.response_counts is not None else None)
        if k is None:
            continue
        n = int(sum(a.response_counts)) if a.response_counts is not None else int(a.n)
        lo, hi = binomial_ci(int(k), n, level)
        p_lo, p_med, p_hi = np.percentile(100 * orr[:, i], [100 * (1 - level) / 2, 50, 100 * (1 + level) / 2])
        rows.append({"arm_id": a.arm_id, "observed_orr_pct": 100 * k / n, "observed_ci": [100 * lo, 100 * hi],
                     "predicted_orr_pct": float(p_med), "predicted_interval": [float(p_lo), float(p_hi)],
                     "observed_inside_interval": bool(p_lo <= 100 * k / n <= p_hi),
                     "predicted_inside_observed_ci": bool(100 * lo <= p_med <= 100 * hi)})
    return rows


def endpoint_table(model: LibraryModel, draws: np.ndarray, n_draws: int = 200, level: float = 0.95) -> list[dict]:
    """Per arm, the endpoints besides ORR: complete response (observed CR of the evaluated patients
    and its exact CI against the predicted reweighted CR rate) and every PFS point the likelihood
    scores (observed progression-free fraction against the predicted curve read as the likelihood
    reads it, :meth:`Problem.landmark_pfs`), and pCR / MPR at surgery where scored (observed count
    of N). Observed PFS intervals are exact binomial of the printed fraction of N: they ignore
    censoring, so they are somewhat narrower than the trials'.
    Predicted: median and ``level`` interval over posterior draws (parameter uncertainty only)."""
    from qspjax.inference.likelihood import DAYS_PER_MONTH
    from qspjax.outcomes import binomial_ci

    idx = np.unique(np.linspace(0, len(draws) - 1, min(n_draws, len(draws))).round().astype(int))
    preds = [model.predict(jnp.asarray(draws[j])) for j in idx]
    q = [100 * (1 - level) / 2, 50, 100 * (1 + level) / 2]
    rows = []
    for i, (a, t) in enumerate(zip(model.arms, model.templates)):
        row: dict = {"arm_id": a.arm_id, "cr": None, "pfs": [], "pathology": None}
        if a.response_counts is not None:
            n = int(sum(a.response_counts))
            k = int(a.response_counts[0])
            lo, hi = binomial_ci(k, n, level)
            cr = np.array([100 * float(p[i].prediction.response[0, 0]) for p in preds])
            c_lo, c_med, c_hi = np.percentile(cr, q)
            row["cr"] = {"observed_pct": 100 * k / n, "observed_ci": [100 * lo, 100 * hi], "predicted_pct": float(c_med),
                         "predicted_interval": [float(c_lo), float(c_hi)], "inside_ci": bool(100 * lo <= c_med <= 100 * hi)}
        if len(a.pfs_days):
            curves = np.array([np.asarray(t.landmark_pfs(p[i].prediction, 0)) for p in preds]) * 100
            landmark_months = {round(m, 6) for e, m, _ in a.observed.get("landmarks", []) if e == "pfs"}
            for j, (day, k) in enumerate(zip(a.pfs_days, a.pfs_progression_free)):
                lo, hi = binomial_ci(int(k), int(a.n), level)
                p_lo, p_med, p_hi = np.percentile(curves[:, j], q)
                months = day / DAYS_PER_MONTH
                row["pfs"].append({"day": float(day), "months": float(months),
                                   "kind": "landmark" if round(months, 6) in landmark_months else "median",
                                   "observed_pct": 100 * k / a.n, "observed_ci": [100 * lo, 100 * hi],
                                   "predicted_pct": float(p_med), "predicted_interval": [float(p_lo), float(p_hi)],
                                   "inside_ci": bool(100 * lo <= p_med <= 100 * hi)})
        sz = model._data_sizes[i]
        if sz["pathology_n"] > 0:
            n = int(sz["pathology_n"])
            k_pcr, k_mpr = int(sz["pathology_counts"][0]), int(sz["pathology_counts"][:2].sum())
            probs = np.array([np.asarray(p[i].pathology) for p in preds]) * 100  # (draws, 3)
            row["pathology"] = {}
            for name, k, pred_pct in (("pcr", k_pcr, probs[:, 0]), ("mpr", k_mpr, probs[:, 0] + probs[:, 1])):
                lo, hi = binomial_ci(k, n, level)
                p_lo, p_med, p_hi = np.percentile(pred_pct, q)
                row["pathology"][name] = {"observed_pct": 100 * k / n, "observed_ci": [100 * lo, 100 * hi],
                                          "predicted_pct": float(p_med), "predicted_interval": [float(p_lo), float(p_hi)],
                                          "inside_ci": bool(100 * lo <= p_med <= 100 * hi)}
        rows.append(row)
    return rows


def endpoint_tally(rows: Sequence[dict]) -> dict:
    """How many arms have predicted CR / 6- and 12-month PFS / pCR / MPR inside the observed CI (an
    arm counts for PFS when every 6/12-month landmark it reports is inside)."""
    cr = [r["cr"]["inside_ci"] for r in rows if r["cr"] is not None]
    pfs = []
    for r in rows:
        pts = [p for p in r["pfs"] if p["kind"] == "landmark" and min(abs(p["months"] - 6), abs(p["months"] - 12)) < 0.1]
        if pts:
            pfs.append(all(p["inside_ci"] for p in pts))
    path = [r["pathology"] for r in rows if r.get("pathology")]
    return {"cr": {"arms": len(cr), "inside_ci": int(sum(cr))},
            "pfs_6_12_months": {"arms": len(pfs), "inside_ci": int(sum(pfs))},
            "pcr": {"arms": len(path), "inside_ci": int(sum(x["pcr"]["inside_ci"] for x in path))},
            "mpr": {"arms": len(path), "inside_ci": int(sum(x["mpr"]["inside_ci"] for x in path))}}


def write_posterior(out: str | Path, mcmc, model: LibraryModel, prov: dict, extra: dict | None = None,
                    check_draws: int = 200) -> dict:
    """``posterior.nc`` (ArviZ InferenceData), ``summary.json`` and ``run.json``, atomically; the
    weights' ESS and the predicted ORR are read at ``check_draws`` evenly spaced posterior draws."""
    import arviz as az

    from qspjax.io import atomic_write, atomic_write_json

    out = Path(out)
    idata = az.from_numpyro(mcmc)
    idata.posterior.attrs["scale"] = "unconstrained: log of medians, log of between-patient sds"
    idata.posterior.attrs["route"] = "importance reweighting of a simulated library (qspjax.inference.library)"
    atomic_write(out / "posterior.nc", lambda p: idata.to_netcdf(str(p), engine="h5netcdf"))
    summary = summarise(mcmc, model, check_draws)
    summary["predictive_orr"] = predictive_table(model, posterior_matrix(mcmc, model), check_draws)
    summary["orr_inside_observed_ci"] = int(sum(r["predicted_inside_observed_ci"] for r in summary["predictive_orr"]))
    summary["predictive_endpoints"] = endpoint_table(model, posterior_matrix(mcmc, model), check_draws)
    summary["endpoints_inside_observed_ci"] = endpoint_tally(summary["predictive_endpoints"])
    summary["pathology_omitted"] = {"arms": list(model.pathology_omitted),
                                    "note": "arms whose trial prints pCR and MPR but whose library has no pathology"}
    summary.update(extra or {})
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "run.json", prov)
    return summary


# ---------------------------------------------------------------------------------------------
# Simulation-based calibration on a library
# ---------------------------------------------------------------------------------------------
def sample_support_prior(model: LibraryModel, n: int, key, warmup: int = 1000, thin: int = 20,
                         init=None) -> tuple[np.ndarray, dict]:
    """``n`` draws (n, D) of the prior restricted to the library's support: density prior(theta) x
    exp(:meth:`LibraryModel.support_log_penalty`), the prior of the walled model (``min_ess``).
    Without a wall this is the prior itself (exact draws). With one, the prior mass inside the
    support is far too small for rejection, so one NUTS chain (numpyro's kernel, ``warmup``
    adaptation steps from ``init``, default the prior means) is thinned by ``thin``; the dict
    reports the chain's divergences and the lag-``thin`` autocorrelation of each quantity."""
    if model.min_ess is None:
        return np.asarray(model.sample_prior(key, n)), {"sampler": "exact prior draws"}
    from numpyro.infer.hmc import hmc

    from qspjax.inference.sbc import log_support_prior

    init_kernel, sample_kernel = hmc(potential_fn=lambda th: -log_support_prior(model, th), algo="NUTS")
    start = jnp.asarray(model.prior_means() if init is None else init, float)
    state = init_kernel(start, num_warmup=warmup, target_accept_prob=0.8, max_tree_depth=8, rng_key=key)

    @jax.jit
    def run(state):
        def step(state, _):
            state = sample_kernel(state)
            return state, (state.z, state.diverging)

        return jax.lax.scan(step, state, None, length=warmup + n * thin)[1]

    z, diverging = run(state)
    kept = np.asarray(z[warmup:][thin - 1::thin][:n])
    c = kept - kept.mean(0)
    lag1 = (c[1:] * c[:-1]).sum(0) / np.maximum((c * c).sum(0), 1e-300)
    return kept, {"sampler": "NUTS on prior x support wall", "warmup": warmup, "thin": thin,
                  "divergences": int(np.asarray(diverging[warmup:]).sum()),
                  "lag_thin_autocorrelation": dict(zip(model.ids, map(float, lag1))),
                  "min_weight_ess_at_draws": float(np.min([model.ess(t).min() for t in kept]))}


def run_sbc(model: LibraryModel, replicates: int, key, warmup: int = 200, samples: int = 200, thin: int = 2,
            target_accept: float = 0.8, max_tree_depth: int = 6, progress: bool = False, init=None):
    """SBC of NUTS on the reweighted model (:func:`qspjax.inference.sbc.run_sbc`'s loop with
    :meth:`LibraryModel.simulate_data`): theta from the model's prior (restricted to the library's
    support when the model has a ``min_ess`` wall: :func:`sample_support_prior`), data from the
    reweighted model at theta, one NUTS chain on the same library (its potential has the same
    wall), rank of theta among L = samples // thin draws. ``init``: where the truths' chain starts
    (e.g. a posterior mean, inside the support; default the prior means)."""
    from qspjax.inference.sbc import SBCResult, nuts_sampler, ranks

    k_prior, k_data, k_nuts = jax.random.split(key, 3)
    truths, truth_sampler = sample_support_prior(model, replicates, k_prior, init=init)
    rng = np.random.default_rng(int(jax.random.randint(k_data, (), 0, 2**31 - 1)))
    # chains start where the model's prior lives (inside the wall), the same point for every replicate
    init = None if model.min_ess is None else truths.mean(0)
    sample = nuts_sampler(model, warmup, samples, thin, target_accept, max_tree_depth, init=init)
    keys = jax.random.split(k_nuts, replicates)
    rows, means, sds, div, ess_true = [], [], [], [], []
    t0 = time.perf_counter()
    compile_seconds = float("nan")
    for r in range(replicates):
        data = jax.tree_util.tree_map(jnp.asarray, model.simulate_data(truths[r], rng))
        draws, n_div = sample(keys[r], data)
        draws = np.asarray(draws)
        rows.append(ranks(truths[r], draws))
        means.append(draws.mean(0))
        sds.append(draws.std(0))
        div.append(int(n_div))
        ess_true.append(float(model.ess(truths[r]).min()))
        if r == 0:
            compile_seconds = time.perf_counter() - t0
        if progress and (r % 10 == 0 or r == replicates - 1):
            print(f"replicate {r + 1}/{replicates}: divergences {div[-1]}, min weight ESS at truth "
                  f"{ess_true[-1]:.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    settings = {"replicates": replicates, "warmup": warmup, "samples": samples, "thin": thin, "chains": 1,
                "target_accept": target_accept, "max_tree_depth": max_tree_depth,
                "init": "prior mean + 0.1 prior sd x N(0, 1)", "sampler": "numpyro NUTS kernel (diagonal mass)",
                "mc_error": model.mc_error, "min_weight_ess_at_truth": ess_true, "min_ess": model.min_ess,
                "truths": truth_sampler}
    return SBCResult(model.ids, np.asarray(rows, int), samples // thin, truths, np.asarray(means), np.asarray(sds),
                     np.asarray(div, int), time.perf_counter() - t0, compile_seconds, settings)
