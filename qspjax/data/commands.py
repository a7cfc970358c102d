"""``qspjax trials``: list the reviewed RT+ICI trials and show one trial's design and arm outcomes."""

from __future__ import annotations

import argparse

from qspjax.data.trials import NOT_REACHED, Arm, Interval, Trial, TrialSet, load_trials


def register(subparsers) -> None:
    parser = subparsers.add_parser("trials", help="the reviewed RT+ICI trials (configs/trials)",
                                   description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="trials_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", dest="directory", default=None,
                        help="folder of trial YAML files (default: the repo's configs/trials)")
    p_list = sub.add_parser("list", parents=[common], help="one line per trial")
    p_list.set_defaults(func=_list)
    p_show = sub.add_parser("show", parents=[common], help="one trial's design, arms and outcomes")
    p_show.add_argument("nct_id", help="the trial's id, e.g. NCT02125461")
    p_show.set_defaults(func=_show)


def _list(args: argparse.Namespace) -> int:
    trials = load_trials(args.directory)
    rows = [("NCT id", "name", "setting", "phase", "rand.", "arms", "N")]
    for t in trials.trials:
        rows.append((t.nct_id, t.name or "-", t.setting, t.phase, "yes" if t.randomised else "no",
                     str(len(t.arms)), str(sum(a.n for a in t.arms))))
    print(_columns(rows))
    print(f"\n{len(trials.trials)} trials, {len(trials.arms)} arms, "
          f"{sum(a.n for a in trials.arms)} patients in the arms (N = sum of the arms' n)")
    return 0


def _show(args: argparse.Namespace) -> int:
    trials: TrialSet = load_trials(args.directory)
    trial = trials.get_trial(args.nct_id.strip().upper())  # unknown id: QSPValidationError listing the known ids
    print(_describe_trial(trial))
    for arm in trial.arms:
        print()
        print(_describe_arm(arm))
    return 0


def _describe_trial(t: Trial) -> str:
    title = t.nct_id + (f" ({t.name})" if t.name else "")
    ref = t.reference.citation + (f", {t.reference.first_author} et al." if t.reference.first_author else "")
    lines = [title, "=" * len(title),
             f"setting        {t.setting}    phase {t.phase}    randomised: {'yes' if t.randomised else 'no'}"
             f"    patients (Table {t.source.table}): {t.n_patients}",
             f"reference      review ref. {ref}",
             f"sequence       {', '.join(t.sequence.kinds)}: {_one_line(t.sequence.text)}",
             f"ICI            {_one_line(t.ici_dosing_text)}",
             f"RT             {_one_line(t.rt_dosing_text)}"]
    if t.chemotherapy_text:
        lines.append(f"chemotherapy   {_one_line(t.chemotherapy_text)}")
    if t.nct_id_printed:
        lines.append(f"printed id     {t.nct_id_printed} (misprint in the seed)")
    lines += [f"note           {n}" for n in t.notes]
    return "\n".join(lines)


def _describe_arm(a: Arm) -> str:
    head = f"{a.arm_id}  [{a.role}]  {a.label}  n = {a.n}  (Table {a.source.table})"
    lines = [head, "-" * len(head)]
    response = []
    for name, key in (("ORR", "orr"), ("DCR", "dcr"), ("CR", "cr"), ("PR", "pr"), ("SD", "sd"), ("PD", "pd"),
                      ("ND", "nd")):
        value = getattr(a, f"{key}_pct")
        if value is not None:
            response.append(f"{name} {value:g}%{_ci(getattr(a, f'{key}_ci', None))}")
    if response:
        lines.append("response       " + ", ".join(response))
        if a.responders is not None:
            lines.append(f"               responders {a.responders}/{a.n} (derived)")
    for name, key in (("median PFS", "pfs"), ("median OS", "os"), ("median DOR", "dor")):
        value = getattr(a, f"median_{key}_months")
        if value is not None:
            shown = "not reached" if value == NOT_REACHED else f"{value:g} months"
            lines.append(f"{name:<15}{shown}{_ci(getattr(a, f'median_{key}_ci'))}")
    if a.landmarks:
        lines.append("landmarks      " + ", ".join(
            f"{lm.endpoint.upper()} {lm.months:g} mo {lm.pct:g}%{_ci(lm.ci)}" for lm in a.landmarks))
    for name, key in (("MPR", "mpr"), ("pCR", "pcr"), ("downstaging", "downstage")):
        value = getattr(a, f"{key}_pct")
        if value is not None:
            lines.append(f"{name:<15}{value:g}%{_ci(getattr(a, f'{key}_ci'))}")
    safety = [f"{name} {value:g}%" for name, value in (("grade 3+", a.grade3plus_ae_pct), ("SAE", a.sae_pct))
              if value is not None]
    if a.adverse_events_text:
        safety.append(f"printed: {_one_line(a.adverse_events_text)!r}")
    if safety:
        lines.append("adverse events " + ", ".join(safety))
    lines.append(f"regimen        {a.regimen['name']} (follow-up {a.follow_up_days} days"
                 + (f", outcomes timed from day {a.outcome_origin_day}" if a.outcome_origin_day else "") + ")")
    return "\n".join(lines)


def _ci(ci: Interval | None) -> str:
    if ci is None:
        return ""
    shown = ["?" if b is None else (NOT_REACHED if b == NOT_REACHED else f"{b:g}") for b in ci]
    return f" [{shown[0]}–{shown[1]}]"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _columns(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)

