"""How well the calibrated population reproduces the trial arms: writes ``fits/report.json``.

Simulates the best parameters of a calibration run (its ``loss_history.json``) on every fitted and
held-out arm of the run file, on a virtual cohort of ``--patients`` per arm (larger than the fit's
is the point: the fit scored a small cohort, the report checks the prediction on a bigger one), and
writes per arm the observed ORR and its 95 % interval, the predicted ORR, ``inside_ci``, the
arm's log-likelihood and its PFS points, plus a plot of observed against predicted ORR.

    python fits/report.py --config configs/inference/fit_advanced.yaml --fit runs/fit_advanced \
        --patients 32 --out fits/report.json --plot docs/results/calibration/orr_report.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qspjax  # noqa: E402,F401  (float64)
from qspjax.inference.report import report_plot, run_report  # noqa: E402
from qspjax.inference.runs import load  # noqa: E402
from qspjax.io import atomic_write_json, provenance  # noqa: E402


def main(args: argparse.Namespace) -> dict:
    cfg = load(args.config)
    prov = provenance(config={"config": args.config, "fit": args.fit, "patients": args.patients,
                              "simulator": args.simulator}, seed=cfg.likelihood.seed)
    report = run_report(cfg, args.fit, args.patients, args.simulator)
    report["provenance"] = prov
    atomic_write_json(Path(args.out), report)
    if args.plot:
        report_plot(report, Path(args.plot))
    for role, s in report["summary"].items():
        print(f"{role}: {s['inside_ci']}/{s['with_orr']} arms with the predicted ORR inside the observed 95 % CI")
    for r in report["arms"]:
        obs = "n/a" if r["observed_orr_pct"] is None else f"{r['observed_orr_pct']:5.1f}"
        print(f"  {r['role']:>8s} {r['id']:<40s} observed {obs}  predicted {r['predicted_orr_pct']:5.1f}  "
              f"inside {r['inside_ci']}")
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/inference/fit_advanced.yaml")
    p.add_argument("--fit", required=True, help="output folder of the calibration run (loss_history.json)")
    p.add_argument("--patients", type=int, default=None, help="virtual patients per arm (default: the run file's)")
    p.add_argument("--simulator", choices=("qsp", "kinetics"), default="qsp")
    p.add_argument("--out", default="fits/report.json")
    p.add_argument("--plot", default=None, help="PNG of observed vs predicted ORR per arm")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
