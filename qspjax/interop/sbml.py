"""SBML Level 3 export of one virtual patient, for COPASI, SimBiology and libRoadRunner users.

The SBML math is generated from the model itself, not transcribed by hand. :func:`trace_formulas`
traces ``QSPModel.rates`` (and the event jump map :func:`qspjax.solver.simulate.apply_events`) with
``jax.make_jaxpr`` and runs the resulting jaxpr on numpy arrays of formula strings, one string per
array element: every primitive the model uses (``add``, ``mul``, ``pow``, ``reduce_sum``,
``select_n``...) has a string rule here. A transcription error is therefore a missing or wrong
primitive rule, and ``tests/test_sbml.py`` catches it by comparing the exported right-hand side
with ``QSPModel.rates`` to 1e-10 relative.

What the SBML holds (time unit: day):

* every qspjax state as a global parameter with a rate rule (lesion and drug states get one
  parameter per lesion/drug: ``C1_irradiated``, ``ab_T_nivolumab_irradiated``), in the model's
  internal units (cells, mol/L, molecules/µm², L...), each with an SBML unit definition;
* every model parameter as a constant global parameter with its unit (per-drug PK parameters as
  ``<name>_<drug>``, as in the parameter files);
* named repeated assignments (lesion volume ``V_T``, tumor diameter, Hill signals, the closed-form
  tumor antigen ``P0_T``/``P1_T``...) as assignment rules, plus unnamed shared sub-expressions
  ``_x<n>`` so that no formula is duplicated;
* each dose / RT fraction / chemotherapy / surgery day as one event whose assignments are the
  whole jump map of that day (applied from the pre-event values, as qspjax applies them), and
  QSP-IO's extinction of a lesion (fewer than ``extinction_threshold_cells`` viable cells) as a
  root-found event per lesion.

Quasi-steady states. qspjax solves two fast equilibria by a bracketed root inside its right-hand
side: free PD-1 in each lesion's synapse (and, with an anti-PD-1/PD-L1 antibody in the model, in
the synapses an antibody class does not reach: target-class E_max, ``PD1_free_untreated``,
exported when an E_max is below 1, see :func:`exported_model`) and IL-2 in the lymph node
(``monotone_root``). They have
no closed form, and libRoadRunner does not support SBML algebraic rules, so each is exported as a
fast relaxation state ``x`` with

    d ln(x)/dt = -k_relax_qss * r(x) / (x * (dr/dx)(x)),   i.e.   dx/dt = -k_relax_qss * r(x) / (dr/dx)(x),

where ``r`` is the model's own increasing residual (also traced); the rate-rule state is
``ln_<id>`` and ``<id>`` = exp(ln_<id>) is an assignment rule, so that ``x`` stays positive when a
dose moves the root by orders of magnitude (a stiff step on ``x`` itself can overshoot below
zero, where the synapse's square root fails). This Newton flow drives
r(x(t)) = r(x0) exp(-k_relax_qss t) whatever the scale of ``r``, so ``x`` follows the root with a
relative lag of about (d ln x*/dt) / k_relax_qss. ``k_relax_qss`` is an exported parameter,
1e6 /day by default: the lag is then ~1e-6 of the root's own relative rate of change per day, far
below 1e-4 (measured in ``tests/test_sbml.py``). The third fast equilibrium, tumor antigen, is
linear in the antigen concentration, and the model computes it in closed form: it is exported as
an assignment rule, exactly. A stiff integrator (CVODE BDF) is needed for the export, as for the
model itself.
"""

from __future__ import annotations

import math
import re
from contextlib import ExitStack
from typing import Sequence
from unittest import mock

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from qspjax.model._base import State
from qspjax.model.checkpoint import Checkpoints
from qspjax.model.composer import QSPModel, drug_param_name, module_param_specs
from qspjax.model.pk import DRUG_PARAMS
from qspjax.regimen import Schedule

K_RELAX_QSS_PER_DAY = 1e6


class SBMLExportError(ValueError):
    """The model uses an operation the exporter has no SBML rule for (a model change that needs a
    new primitive rule in :class:`_Interpreter`)."""


# Modules whose ``monotone_root`` becomes a relaxation state, with the exported state's name (a
# root solved with a ``name`` is exported under that name: the checkpoint module's synapses that
# an antibody class does not reach, ``PD1_free_untreated``...).
_QSS_ROOTS = (("qspjax.model.checkpoint", "PD1_free"), ("qspjax.model.tcells", "IL2_LN"))


def _qss_unit(tag: str) -> str:
    return "molarity" if tag == "IL2_LN" else "molecule/micrometer^2"
# Repeated assignments worth a name in the SBML (aux keys of QSPModel.assignments / observables).
_NAMED_AUX = ("V_T", "cells_in_lesion", "R_Tcell", "icd_release", "H_PD1", "pd1_drug_occupancy",
              "P0_T", "P1_T", "H_APC", "H_mAPC", "H_P0", "H_P1", "N_aT", "aPD1", "aPDL1",
              "ctla4_priming", "ctla4_treg_depletion")
_NAMED_OBSERVABLES = ("tumor_volume_l", "tumor_diameter_cm", "t_cells_tumor", "cd8_density_per_ul", "pd1_signal")


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
def element_names(base: str, shape_kind: str, drugs: Sequence[str], n_lesions: int) -> np.ndarray:
    """SBML ids of the elements of one array-valued quantity (object array of its shape)."""
    lesions = QSPModel.LESION_NAMES[:n_lesions]
    if shape_kind == "shared":
        return np.array(base, dtype=object)
    if shape_kind == "lesion":
        return np.array([f"{base}_{les}" for les in lesions], dtype=object)
    if shape_kind == "drug":
        return np.array([f"{base}_{d}" for d in drugs], dtype=object)
    if shape_kind == "drug_lesion":
        return np.array([[f"{base}_{d}_{les}" for les in lesions] for d in drugs], dtype=object)
    raise ValueError(shape_kind)


def _names_like(base: str, shape: tuple, drugs, n_lesions: int) -> np.ndarray:
    kind = {0: "shared"}.get(len(shape))
    if kind is None:
        if shape == (n_lesions,):
            kind = "lesion"
        elif shape == (len(drugs),):
            kind = "drug"
        else:
            kind = "drug_lesion"
    return element_names(base, kind, drugs, n_lesions)


def parameter_names(model: QSPModel) -> tuple[list, list]:
    """(leaves, names) of the model's parameter leaves: one SBML id per leaf element.

    Modules that read the same parameter (``V_LN`` in PK, antigen and T cells) map to one id.
    """
    leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(model)
    leaves, names = [], []
    for path, leaf in leaves_with_path:
        key = path[-1].key
        if np.ndim(leaf) == 0:
            names.append(np.array(key, dtype=object))
        else:  # per-drug PK parameters, shape (D,)
            names.append(np.array([drug_param_name(key, d) for d in model.drugs], dtype=object))
        leaves.append(leaf)
    return leaves, names


# ---------------------------------------------------------------------------------------------
# The formula interpreter: a jaxpr run on numpy arrays of formula strings
# ---------------------------------------------------------------------------------------------
_ATOM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^[0-9.eE+-]+$")


def _num(x) -> str:
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "INF" if x > 0 else "(-INF)"
    s = repr(x)
    return f"({s})" if x < 0 else s


def _is_num(s: str, value: float | None = None) -> bool:
    try:
        v = float(s.strip("()"))
    except ValueError:
        return False
    return value is None or v == value


def _paren(s: str) -> str:
    return s if _ATOM.match(s) or (s.startswith("(") and _balanced_outer(s)) else f"({s})"


def _balanced_outer(s: str) -> bool:
    depth = 0
    for i, ch in enumerate(s):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0 and i < len(s) - 1:
            return False
    return True


def _add(a, b):
    if _is_num(a, 0.0):
        return b
    if _is_num(b, 0.0):
        return a
    return f"{a} + {b}"


def _sub(a, b):
    if _is_num(b, 0.0):
        return a
    if _is_num(a, 0.0):
        return f"-{_paren(b)}"
    return f"{a} - {_paren(b)}"


def _mul(a, b):
    if _is_num(a, 0.0) or _is_num(b, 0.0):
        return "0.0"
    if _is_num(a, 1.0):
        return b
    if _is_num(b, 1.0):
        return a
    return f"{_paren(a)} * {_paren(b)}"


def _div(a, b):
    if _is_num(b, 1.0):
        return a
    if _is_num(a, 0.0):
        return "0.0"
    return f"{_paren(a)} / {_paren(b)}"


def _pow(a, b):
    return f"{_paren(a)} ^ {_paren(b)}"


_BINARY = {
    "add": _add, "add_any": _add, "sub": _sub, "mul": _mul, "div": _div, "pow": _pow,
    "max": lambda a, b: f"max({a}, {b})", "min": lambda a, b: f"min({a}, {b})",
    "gt": lambda a, b: f"gt({a}, {b})", "lt": lambda a, b: f"lt({a}, {b})",
    "ge": lambda a, b: f"geq({a}, {b})", "le": lambda a, b: f"leq({a}, {b})",
    "eq": lambda a, b: f"eq({a}, {b})", "ne": lambda a, b: f"neq({a}, {b})",
    "and": lambda a, b: f"and({a}, {b})", "or": lambda a, b: f"or({a}, {b})",
    "atan2": lambda a, b: f"arctan({_paren(a)} / {_paren(b)})",
}
_UNARY = {
    "neg": lambda a: "0.0" if _is_num(a, 0.0) else f"-{_paren(a)}",
    "sqrt": lambda a: f"sqrt({a})", "exp": lambda a: f"exp({a})", "log": lambda a: f"ln({a})",
    "abs": lambda a: f"abs({a})", "not": lambda a: f"not({a})",
    "cbrt": lambda a: f"{_paren(a)} ^ (1.0 / 3.0)",
    "exp2": lambda a: f"2.0 ^ {_paren(a)}", "square": lambda a: f"{_paren(a)} ^ 2",
    "log1p": lambda a: f"ln(1.0 + {a})", "expm1": lambda a: f"(exp({a}) - 1.0)",
    "tanh": lambda a: f"tanh({a})",
}
_IDENTITY = ("convert_element_type", "copy", "copy_p", "stop_gradient", "reduce_precision", "optimization_barrier")


def _vec(fn, *arrays):
    return np.vectorize(fn, otypes=[object])(*arrays) if arrays[0].ndim or any(a.ndim for a in arrays) \
        else np.array(fn(*[a.item() for a in arrays]), dtype=object)


def _literal(value) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == bool:
        return np.vectorize(lambda v: "true" if v else "false", otypes=[object])(arr) if arr.ndim \
            else np.array("true" if arr else "false", dtype=object)
    return np.vectorize(_num, otypes=[object])(arr) if arr.ndim else np.array(_num(arr), dtype=object)


class _Interpreter:
    """Evaluates a jaxpr on object arrays of formula strings.

    ``names`` maps jaxpr variables to SBML ids: when such a variable is produced, its formulas
    become assignment rules (collected in ``rules``) and later formulas refer to the ids. With
    ``share=True`` every other non-atomic value used more than once also gets an id ``_x<n>``.
    """

    def __init__(self, rules: dict, names: dict | None = None, share: bool = True, counter: list | None = None):
        self.rules = rules
        self.names = names or {}
        self.share = share
        self.counter = counter if counter is not None else [0]

    def _bind(self, env, var, value, uses):
        value = np.asarray(value, dtype=object)
        if var in self.names:
            ids = self.names[var]
            for i, f in np.ndenumerate(value):
                self.rules[ids[i]] = f
            value = ids
        elif self.share and uses.get(var, 0) > 1:
            out = np.empty(value.shape, dtype=object)
            for i, f in np.ndenumerate(value):
                if _ATOM.match(f) or _is_num(f):
                    out[i] = f
                else:
                    name = f"_x{self.counter[0]}"
                    self.counter[0] += 1
                    self.rules[name] = f
                    out[i] = name
            value = out
        env[var] = value

    def run(self, jaxpr, consts, args):
        env = {}
        uses: dict = {}
        for eqn in jaxpr.eqns:
            for v in eqn.invars:
                if isinstance(v, jcore.Var):
                    uses[v] = uses.get(v, 0) + 1
        for v in jaxpr.outvars:
            if isinstance(v, jcore.Var):
                uses[v] = uses.get(v, 0) + 1

        def read(v):
            return _literal(v.val) if isinstance(v, jcore.Literal) else env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = _literal(c)
        for v, a in zip(jaxpr.invars, args):
            env[v] = np.asarray(a, dtype=object)
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self._apply(eqn, ins)
            for v, o in zip(eqn.outvars, outs):
                self._bind(env, v, o, uses)
        return [read(v) for v in jaxpr.outvars]

    def _sub_jaxpr(self, closed, ins):
        inner = _Interpreter(self.rules, None, self.share, self.counter)
        return inner.run(closed.jaxpr, closed.consts, ins)

    def _apply(self, eqn, ins):
        name, p = eqn.primitive.name, eqn.params
        if name in _BINARY:
            a, b = np.broadcast_arrays(*ins)
            return [_vec(_BINARY[name], a, b)]
        if name in _UNARY:
            return [_vec(_UNARY[name], ins[0])]
        if name in _IDENTITY:
            return list(ins)
        if name == "integer_pow":
            n = p["y"]
            return [_vec(lambda a: a if n == 1 else f"{_paren(a)} ^ {n}", ins[0])]
        if name == "broadcast_in_dim":
            x = ins[0]
            shape, dims = p["shape"], p["broadcast_dimensions"]
            expanded = x.reshape([x.shape[dims.index(i)] if i in dims else 1 for i in range(len(shape))])
            return [np.broadcast_to(expanded, shape).copy()]
        if name == "reshape":
            return [ins[0].reshape(p["new_sizes"])]
        if name == "squeeze":
            return [np.squeeze(ins[0], axis=tuple(p["dimensions"]))]
        if name == "expand_dims":
            return [np.expand_dims(ins[0], p["dimensions"])]
        if name == "transpose":
            return [np.transpose(ins[0], p["permutation"])]
        if name in ("reduce_sum", "reduce_max", "reduce_min"):
            fold = {"reduce_sum": _add, "reduce_max": _BINARY["max"], "reduce_min": _BINARY["min"]}[name]
            x = np.moveaxis(ins[0], tuple(p["axes"]), tuple(range(len(p["axes"]))))
            x = x.reshape((-1,) + x.shape[len(p["axes"]):])
            out = np.empty(x.shape[1:], dtype=object)
            for i in np.ndindex(*x.shape[1:]):
                acc = x[(0,) + i]
                for k in range(1, x.shape[0]):
                    acc = fold(acc, x[(k,) + i])
                out[i] = acc
            return [out]
        if name == "concatenate":
            return [np.concatenate(ins, axis=p["dimension"])]
        if name == "slice":
            idx = tuple(slice(s, e, st) for s, e, st in
                        zip(p["start_indices"], p["limit_indices"], p["strides"] or [1] * len(p["start_indices"])))
            return [ins[0][idx]]
        if name == "select_n":
            which, *cases = np.broadcast_arrays(*ins)
            if len(cases) != 2:
                raise SBMLExportError("select_n with more than two cases has no SBML rule here")
            return [_vec(lambda w, f, t: f"piecewise({t}, {w}, {f})", which, cases[0], cases[1])]
        if name in ("pjit", "jit", "closed_call", "core_call"):
            return self._sub_jaxpr(p["jaxpr"], ins)
        if name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
            closed = p.get("call_jaxpr") or p.get("fun_jaxpr")
            return self._sub_jaxpr(closed, ins)
        raise SBMLExportError(f"no SBML rule for the jax primitive {name!r}")


# ---------------------------------------------------------------------------------------------
# Tracing the model
# ---------------------------------------------------------------------------------------------
def state_names(model: QSPModel) -> dict[str, np.ndarray]:
    drugs, n = model.drugs, model.n_lesions
    return {k: element_names(k, s.shape, drugs, n) for k, s in model.state_specs().items()}


def exported_model(model: QSPModel) -> QSPModel:
    """The model the export writes: at ``blockade_emax_<target>`` = 1 for every synapse target
    present, the synapses an antibody class does not reach weigh exactly 0 and are left out (the
    export is then the full-blockade QSP-IO math, without relaxation states that only slow an
    SBML integrator: a 400-day CVODE run failed with them); below 1 they are exported."""
    chk = model.checkpoint
    if chk.blocked and all(float(chk.p[f"blockade_emax_{t}"]) == 1.0 for t in chk.blocked):
        return eqx.tree_at(lambda m: m.checkpoint, model, Checkpoints(chk.p))
    return model


def qss_values(model: QSPModel, y: State) -> dict[str, jax.Array]:
    """The quasi-steady values qspjax solves for at state ``y`` (initial values of the
    relaxation states): free synapse PD-1 per lesion (molecules/µm²), also in the synapses an
    antibody class does not reach (target-class E_max), and lymph-node IL-2 (M)."""
    aux = exported_model(model).assignments(y)
    out = {"PD1_free": aux["synapse"]["PD1"], "IL2_LN": aux["IL2_LN"]}
    out |= {name: syn["PD1"] for name, syn in aux.get("synapse_unreached", {}).items()}
    return out


class Formulas:
    """The model's math as SBML infix formulas (libsbml L3 syntax).

    ``rates``: state id -> d/dt formula; ``rules``: assignment-rule id -> formula (named
    repeated assignments and shared sub-expressions); ``qss``: relaxation-state id -> d/dt formula.
    """

    def __init__(self, rates: dict, rules: dict, qss: dict, named: dict):
        self.rates, self.rules, self.qss, self.named = rates, rules, qss, named


def trace_formulas(model: QSPModel, y: State) -> Formulas:
    """Trace ``model.rates`` (with the quasi-steady roots as relaxation states) into formulas."""
    model = exported_model(model)
    leaves, p_names = parameter_names(model)
    _, treedef = jax.tree_util.tree_flatten(model)
    qss0 = qss_values(model, y)
    residuals: dict = {}

    def fake_root(tag):
        def root(residual, lo, hi, iterations=80, name=None):
            key = tag if name is None else name
            x = current[key]
            if key not in residuals:
                r, dr = jax.jvp(residual, (x,), (jnp.ones_like(x),))
                residuals[key] = (r, dr)
            return x
        return root

    current: dict = {}

    def fn(param_leaves, y, qss):
        m = jax.tree_util.tree_unflatten(treedef, param_leaves)
        current.clear()
        current.update(qss)
        residuals.clear()
        with ExitStack() as stack:
            for module, tag in _QSS_ROOTS:
                stack.enter_context(mock.patch(f"{module}.monotone_root", fake_root(tag)))
            aux = m.assignments(y)
            rates = m.rates(y)
            obs = m.observables(y)
        named = {f"aux:{k}": aux[k] for k in _NAMED_AUX if k in aux}
        named |= {f"syn:{k}": v for k, v in aux["synapse"].items() if k != "PD1"}
        named |= {f"obs:{k}": obs[k] for k in _NAMED_OBSERVABLES}
        relax = {tag: (r, dr) for tag, (r, dr) in residuals.items()}
        return rates, named, relax

    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(leaves, y, qss0)
    out_tree = jax.tree_util.tree_structure(out_shape)
    rates_shape, named_shape, relax_shape = out_shape
    flat_out = closed.jaxpr.outvars
    # Name the outputs: jaxpr outvars follow the flattening order of (rates, named, relax).
    out_labels: list = []
    for k in sorted(rates_shape):
        out_labels.append(("rate", k))
    for k in sorted(named_shape):
        out_labels.append(("named", k))
    for k in sorted(relax_shape):
        out_labels += [("relax_r", k), ("relax_dr", k)]
    assert len(out_labels) == out_tree.num_leaves == len(flat_out)
    drugs, n = model.drugs, model.n_lesions
    names: dict = {}
    input_vars = set(closed.jaxpr.invars)
    for (kind, key), var, shape in zip(out_labels, flat_out, jax.tree_util.tree_leaves(out_shape)):
        if kind == "named" and isinstance(var, jcore.Var) and var not in input_vars and var not in names:
            base = key.split(":", 1)[1]
            base = f"synapse_{base}" if key.startswith("syn:") else base
            names[var] = _names_like(base, shape.shape, drugs, n)

    s_names = state_names(model)
    q_names = {tag: _names_like(tag, np.shape(v), drugs, n) for tag, v in qss0.items()}
    args = [list(p_names), {k: s_names[k] for k in y}, {k: q_names[k] for k in qss0}]
    flat_args = jax.tree_util.tree_leaves(args, is_leaf=lambda x: isinstance(x, np.ndarray))
    rules: dict = {}
    outs = _Interpreter(rules, names).run(closed.jaxpr, closed.consts, flat_args)
    rates, qss = {}, {}
    relax_parts: dict = {}
    for (kind, key), value in zip(out_labels, outs):
        if kind == "rate":
            for i, f in np.ndenumerate(value):
                rates[s_names[key][i]] = f
        elif kind in ("relax_r", "relax_dr"):
            relax_parts.setdefault(key, {})[kind] = value
    for tag, parts in relax_parts.items():
        for i, r in np.ndenumerate(parts["relax_r"]):
            dr = parts["relax_dr"][i]
            x = q_names[tag][i]
            # Relaxed in log space (d ln x/dt): x stays positive when a dose or RT fraction moves
            # the root by orders of magnitude, where a stiff step on x itself can overshoot below 0.
            qss[log_qss_name(x)] = f"-k_relax_qss * {_paren(r)} / ({x} * {_paren(dr)})"
            rules[x] = f"exp({log_qss_name(x)})"
    named_ids = {k: v for k, v in zip(out_labels, outs) if k[0] == "named"}
    return Formulas(rates, rules, qss, named_ids)


def log_qss_name(sid: str) -> str:
    """Id of the rate-rule state ln(x) of a relaxation state ``x`` (``x`` itself is exp of it)."""
    return f"ln_{sid}"


def trace_jump(model: QSPModel, y: State, event) -> dict[str, str]:
    """Formulas of the state after one timeline point's jumps (:func:`qspjax.solver.simulate.apply_events`)
    in terms of the pre-event state and the parameters; only states that change are returned."""
    from qspjax.solver.simulate import apply_events

    leaves, p_names = parameter_names(model)
    _, treedef = jax.tree_util.tree_flatten(model)
    event = tuple(jnp.asarray(e) for e in event)

    def fn(param_leaves, y):
        m = jax.tree_util.tree_unflatten(treedef, param_leaves)
        return apply_events(m, y, event)[0]

    closed = jax.make_jaxpr(fn)(leaves, y)
    s_names = state_names(model)
    flat_args = jax.tree_util.tree_leaves([list(p_names), {k: s_names[k] for k in y}],
                                          is_leaf=lambda x: isinstance(x, np.ndarray))
    outs = _Interpreter({}, None, share=False).run(closed.jaxpr, closed.consts, flat_args)
    out = {}
    for key, value in zip(sorted(y), outs):
        for i, f in np.ndenumerate(value):
            if f != s_names[key][i]:
                out[s_names[key][i]] = f
    return out


# ---------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------
# internal unit name -> list of (SBML kind name, exponent, scale, multiplier)
_BASE_UNITS = {
    "day": [("second", 1, 0, 86400.0)], "cell": [("item", 1, 0, 1.0)], "molecule": [("item", 1, 0, 1.0)],
    "molarity": [("mole", 1, 0, 1.0), ("litre", -1, 0, 1.0)], "mole": [("mole", 1, 0, 1.0)],
    "liter": [("litre", 1, 0, 1.0)], "micrometer": [("metre", 1, -6, 1.0)], "gram": [("gram", 1, 0, 1.0)],
    "kilogram": [("gram", 1, 3, 1.0)], "centimeter": [("metre", 1, -2, 1.0)], "gray": [("gray", 1, 0, 1.0)],
}


def unit_id(unit: str) -> str:
    """SBML id of an internal unit string (``'1/day/cell'`` -> ``'u_per_day_per_cell'``)."""
    if unit.strip() in ("", "1"):
        return "dimensionless"
    s = unit.replace(" ", "")
    s = re.sub(r"\^(-?\d+)", lambda m: f"_pow{m.group(1).replace('-', 'm')}", s)
    s = s.replace("*", "_").replace("/", "_per_")
    s = s[2:] if s.startswith("1_") else s
    return "u_" + re.sub(r"[^A-Za-z0-9_]", "_", s)


def unit_factors(unit: str) -> list[tuple[str, int, int, float]]:
    """SBML unit terms (kind, exponent, scale, multiplier) of an internal unit string."""
    if unit.strip() in ("", "1"):
        return []
    terms: list = []
    for sign, token in re.findall(r"([*/]?)([^*/]+)", "*" + unit.replace(" ", "")):
        if token == "1":
            continue
        base, _, power = token.partition("^")
        power = int(power or 1) * (-1 if sign == "/" else 1)
        if base not in _BASE_UNITS:
            raise ValueError(f"unit {unit!r}: no SBML mapping for {base!r}")
        terms += [(k, e * power, sc, mult) for k, e, sc, mult in _BASE_UNITS[base]]
    return terms


# ---------------------------------------------------------------------------------------------
# The SBML document
# ---------------------------------------------------------------------------------------------
def _check(code, what):
    import libsbml

    if code != libsbml.LIBSBML_OPERATION_SUCCESS:
        raise RuntimeError(f"libsbml: {what}: {libsbml.OperationReturnValue_toString(code)}")


def _math(formula: str):
    import libsbml

    ast = libsbml.parseL3Formula(formula)
    if ast is None:
        raise RuntimeError(f"libsbml could not parse {formula[:200]!r}: {libsbml.getLastParseL3Error()}")
    return ast


def schedule_events(schedule: Schedule) -> list[tuple[float, tuple]]:
    """(day, event row) of every distinct timeline point of a compiled schedule."""
    times = np.asarray(schedule.times)
    rows = schedule.events
    out, seen = [], set()
    for k, t in enumerate(times):
        if float(t) in seen:
            continue
        seen.add(float(t))
        row = tuple(np.asarray(r[k]) for r in rows)
        if any(np.any(r != 0) for r in row):
            out.append((float(t), row))
    return out


def patient_values(model: QSPModel, y: State) -> dict[str, float]:
    """Every value of one patient by SBML id, as :func:`build_document` writes them: parameters,
    states (internal units) and the logs of the exported quasi-steady states. Setting these on a
    loaded export (e.g. libRoadRunner ``setValue``) switches it to another patient or state."""
    out: dict[str, float] = {}
    leaves, p_names = parameter_names(model)
    for leaf, ids in zip(leaves, p_names):
        out.update(zip(np.atleast_1d(ids).tolist(), np.atleast_1d(np.asarray(leaf)).astype(float).tolist()))
    for key, ids in state_names(model).items():
        out.update(zip(np.ravel(ids).tolist(), np.ravel(np.asarray(y[key])).astype(float).tolist()))
    for tag, vals in qss_values(model, y).items():
        ids = _names_like(tag, np.shape(vals), model.drugs, model.n_lesions)
        for sid, x in zip(np.ravel(ids).tolist(), np.ravel(np.asarray(vals)).tolist()):
            out[log_qss_name(sid)] = math.log(max(float(x), 1e-300))
    return out


def build_document(model: QSPModel, y0: State, schedule: Schedule | None = None,
                   k_relax_per_day: float = K_RELAX_QSS_PER_DAY, model_id: str = "qspjax_nsclc"):
    """The SBML L3V2 document of one patient: ``model`` parameters, initial state ``y0`` (internal
    units; the state at the start of treatment), events of ``schedule`` (days from ``y0``)."""
    import libsbml

    model = exported_model(model)

    doc = libsbml.SBMLDocument(3, 2)
    m = doc.createModel()
    m.setId(model_id)
    m.setName("qspjax NSCLC QSP model (QSP-IO lineage) under radiotherapy and checkpoint inhibitors")
    units_made: set = set()

    def ensure_unit(unit: str) -> str:
        uid = unit_id(unit)
        if uid == "dimensionless" or uid in units_made:
            return uid
        ud = m.createUnitDefinition()
        ud.setId(uid)
        ud.setName(unit)
        for kind, exp, scale, mult in unit_factors(unit):
            u = ud.createUnit()
            u.setKind(libsbml.UnitKind_forName(kind))
            u.setExponent(exp)
            u.setScale(scale)
            u.setMultiplier(mult)
        units_made.add(uid)
        return uid

    m.setTimeUnits(ensure_unit("day"))
    m.setSubstanceUnits(ensure_unit("mole"))
    m.setVolumeUnits(ensure_unit("liter"))
    m.setExtentUnits(ensure_unit("mole"))

    def add_param(pid: str, value: float, unit: str | None, constant: bool, name: str = ""):
        p = m.createParameter()
        _check(p.setId(pid), f"id {pid}")
        p.setValue(float(value))
        p.setConstant(constant)
        if name:
            p.setName(name)
        if unit is not None:
            p.setUnits(ensure_unit(unit))
        return p

    # Parameters (one id per name, with the unit the modules declare).
    specs = module_param_specs()
    leaves, p_names = parameter_names(model)
    done: set = set()
    for leaf, ids in zip(leaves, p_names):
        for i, pid in np.ndenumerate(ids):
            if pid in done:
                continue
            done.add(pid)
            base = pid
            spec = specs.get(base)
            if spec is None:
                base = next(k for k in DRUG_PARAMS if pid.startswith(k + "_"))
                spec = DRUG_PARAMS[base]
            add_param(pid, np.asarray(leaf)[i], spec.unit, True, spec.meaning)
    add_param("k_relax_qss", k_relax_per_day, "1/day", True,
              "relaxation rate of the exported quasi-steady states (PD1_free..., IL2_LN) to their roots")

    # States (rate rules) and relaxation states.
    formulas = trace_formulas(model, y0)
    s_names = state_names(model)
    for key, spec in model.state_specs().items():
        vals = np.asarray(y0[key])
        for i, sid in np.ndenumerate(s_names[key]):
            add_param(sid, vals[i], spec.unit, False, spec.meaning)
    qss_units: dict = {}
    for tag, vals in qss_values(model, y0).items():
        ids = _names_like(tag, np.shape(vals), model.drugs, model.n_lesions)
        for i, sid in np.ndenumerate(ids):
            qss_units[sid] = _qss_unit(tag)
            add_param(log_qss_name(sid), math.log(max(float(np.asarray(vals)[i]), 1e-300)), None, False,
                      f"log of {sid} (a quasi-steady state exported as a fast relaxation state, see k_relax_qss)")
    for rid in formulas.rules:
        add_param(rid, 0.0, qss_units.get(rid), False)
    for sid, f in list(formulas.rates.items()) + list(formulas.qss.items()):
        r = m.createRateRule()
        r.setVariable(sid)
        _check(r.setMath(_math(f)), f"rate rule {sid}")
    for rid, f in formulas.rules.items():
        r = m.createAssignmentRule()
        r.setVariable(rid)
        _check(r.setMath(_math(f)), f"assignment rule {rid}")

    # Events: one per treatment day (the whole jump map), one extinction event per lesion.
    for k, (day, row) in enumerate(schedule_events(schedule) if schedule is not None else []):
        ev = m.createEvent()
        ev.setId(f"treatment_day_{k}")
        ev.setName(f"treatment on day {day:g}")
        ev.setUseValuesFromTriggerTime(True)
        trig = ev.createTrigger()
        trig.setInitialValue(False)
        trig.setPersistent(True)
        trig.setMath(_math(f"time >= {_num(day)}"))
        for sid, f in trace_jump(model, y0, row).items():
            ea = ev.createEventAssignment()
            ea.setVariable(sid)
            _check(ea.setMath(_math(f)), f"event assignment {sid}")
    for les, sid in zip(QSPModel.LESION_NAMES, np.atleast_1d(s_names["C1"])):
        ev = m.createEvent()
        ev.setId(f"extinction_{les}")
        ev.setName("QSP-IO: a lesion with fewer viable cells than the threshold has none")
        ev.setUseValuesFromTriggerTime(True)
        trig = ev.createTrigger()
        trig.setInitialValue(True)
        trig.setPersistent(True)
        trig.setMath(_math(f"{sid} < extinction_threshold_cells"))
        ea = ev.createEventAssignment()
        ea.setVariable(sid)
        ea.setMath(_math("0.0"))
    return doc


def export_sbml(model: QSPModel, y0: State, schedule: Schedule | None = None,
                k_relax_per_day: float = K_RELAX_QSS_PER_DAY) -> str:
    """SBML L3V2 text of one patient (see :func:`build_document`)."""
    import libsbml

    return libsbml.writeSBMLToString(build_document(model, y0, schedule, k_relax_per_day))


def reference_patient(params, drugs: tuple[str, ...] = ("nivolumab",), n_lesions: int = 1):
    """(model, initial state) of the QSP-IO reference configuration: nominal parameters and the
    exported tumor-bearing state, each lesion with the reference tumor."""
    from qspjax.model.reference import state_from_species

    model = QSPModel.from_values(params.model_values(), drugs=drugs, n_lesions=n_lesions)
    return model, state_from_species(model, params.initial_state, drug=drugs[0] if drugs else "nivolumab")
