"""``qspjax export-sbml``: one virtual patient as an SBML Level 3 file (see :mod:`qspjax.interop.sbml`),
and with ``--omex`` a COMBINE archive of it with a SED-ML reference simulation (:mod:`qspjax.interop.omex`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from qspjax.errors import QSPValidationError


def register(sub) -> None:
    p = sub.add_parser("export-sbml", help="write one patient's model as SBML Level 3",
                       description="Export the model of one patient (nominal parameters, the QSP-IO reference "
                                   "tumor state) as SBML L3V2 with dosing and RT fractions as events.")
    p.add_argument("--out", required=True, help="SBML file to write (e.g. model.xml)")
    p.add_argument("--params", default=None, help="main parameter file (default configs/params/qspio_example1.yaml)")
    p.add_argument("--regimen", default=None, help="regimen YAML file whose events become SBML events")
    p.add_argument("--drugs", default=None,
                   help="comma-separated antibodies in the model (default: the regimen's, else nivolumab)")
    p.add_argument("--lesions", type=int, default=1, help="number of lesions, 1 or 2 (default 1, as QSP-IO)")
    p.add_argument("--days", type=float, default=400.0, help="regimen events up to this day are exported (default 400)")
    p.add_argument("--k-relax", type=float, default=None,
                   help="relaxation rate (1/day) of the exported quasi-steady states (default 1e6)")
    p.add_argument("--omex", default=None, metavar="FILE",
                   help="also write a COMBINE archive (e.g. reference.omex) holding the SBML, a SED-ML "
                        "simulation of it (days 0 to --days, one output a day, the model's observables) "
                        "and a manifest; without --regimen the regimen is then the QSP-IO reference dosing "
                        "(nivolumab 210 mg every 14 days). Needs the interop extra (libsedml, libcombine)")
    p.set_defaults(func=run)

    q = sub.add_parser("export-petab", help="write the QSP-IO reference problem as a PEtab problem",
                       description="Write the single-patient QSP-IO reference problem as PEtab v1 (problem.yaml, "
                                   "SBML, conditions, observables, measurements from the SimBiology reference "
                                   "solution, estimated parameters with bounds, scales and priors) and lint it. "
                                   "Needs the interop extra (petab).")
    q.add_argument("--out", required=True, help="folder to write (DIR/problem.yaml at its root)")
    q.add_argument("--params", default=None, help="main parameter file (default configs/params/qspio_example1.yaml)")
    q.add_argument("--reference", default=None,
                   help="SimBiology reference solution CSV (default shared/reference/qspio/example1_treated_simbiology.csv)")
    q.add_argument("--overwrite", action="store_true", help="replace the files of an existing non-empty folder")
    q.set_defaults(func=run_petab)


def run(args: argparse.Namespace) -> int:
    from qspjax.interop import sbml
    from qspjax.io import atomic_write_text
    from qspjax.model.pk import KNOWN_DRUGS
    from qspjax.params import load_parameters
    from qspjax.regimen import compile_schedule, load_regimen

    if args.lesions not in (1, 2):
        raise QSPValidationError("command line", "--lesions", args.lesions, "allowed values are 1, 2")
    if not (math.isfinite(args.days) and args.days > 0):
        raise QSPValidationError("command line", "--days", args.days, "must be a positive number of days")
    k_relax = sbml.K_RELAX_QSS_PER_DAY if args.k_relax is None else args.k_relax
    if not (math.isfinite(k_relax) and k_relax > 0):
        raise QSPValidationError("command line", "--k-relax", args.k_relax, "must be a positive rate (1/day)")
    if args.omex is not None:
        from qspjax.interop import omex

        try:
            omex._libs()
        except omex.OmexError as exc:
            raise QSPValidationError("command line", "--omex", args.omex, str(exc)) from None
        if args.regimen is None:
            args.regimen = str(omex.reference_regimen_path())
        if Path(args.omex).resolve() == Path(args.out).resolve():
            raise QSPValidationError("command line", "--omex", args.omex, "must differ from --out")
    regimen = load_regimen(args.regimen) if args.regimen else None
    if args.drugs:
        drugs = tuple(d.strip() for d in args.drugs.split(",") if d.strip())
    else:
        drugs = (regimen.drugs if regimen is not None and regimen.drugs else ("nivolumab",))
    for d in drugs:
        if d not in KNOWN_DRUGS:
            raise QSPValidationError("command line", "--drugs", d, f"allowed values are {', '.join(KNOWN_DRUGS)}")
    params = load_parameters(args.params)
    model, y0 = sbml.reference_patient(params, drugs=drugs, n_lesions=args.lesions)
    schedule = None
    if regimen is not None:
        schedule = compile_schedule(regimen, drugs, [0.0, args.days], n_lesions=args.lesions)
    text = sbml.export_sbml(model, y0, schedule, k_relax)
    sedml = None
    if args.omex is not None:  # built before anything is written: a failure leaves no files
        import libsbml

        m = libsbml.readSBMLFromString(text).getModel()
        sbml_ids = {m.getParameter(i).getId() for i in range(m.getNumParameters())}
        ids = omex.observable_ids(model, y0)
        steps = max(1, int(round(args.days)))
        sedml = omex.build_sedml(ids, days=args.days, steps=steps, sbml_ids=sbml_ids,
                                 description=f"{regimen.name if regimen else 'untreated'} reference simulation")
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}: {len(drugs)} drug(s), {args.lesions} lesion(s), "
          f"{0 if schedule is None else len(sbml.schedule_events(schedule))} treatment event day(s)")
    if sedml is not None:
        omex.write_omex(args.omex, text, sedml)
        print(f"wrote {args.omex}: {omex.MODEL_LOCATION} + {omex.SEDML_LOCATION} (days 0-{args.days:g}, "
              f"{steps} steps, {sum(len(v) for v in ids.values())} observables) + manifest")
    return 0


def run_petab(args: argparse.Namespace) -> int:
    from qspjax.interop import petab as qpetab
    from qspjax.io import prepare_out_dir
    from qspjax.params import load_parameters

    try:
        qpetab._petab()
    except qpetab.PetabError as exc:
        raise QSPValidationError("command line", "export-petab", "petab", str(exc)) from None
    reference = Path(args.reference) if args.reference else qpetab.default_reference_csv()
    if not reference.is_file():
        raise QSPValidationError("command line", "--reference", str(reference), "no such file")
    params = load_parameters(args.params)
    out = prepare_out_dir(args.out, args.overwrite)
    try:
        files = qpetab.write_petab(out, params, reference)
    except qpetab.PetabError as exc:
        raise QSPValidationError(str(out), "PEtab problem", "problem.yaml", str(exc)) from None
    print(f"wrote {files['problem']}: PEtab v1 problem ({', '.join(p.name for k, p in files.items() if k != 'problem')}), "
          f"linted without errors")
    return 0
