"""Peak memory of a cohort saved daily.

``--n`` patients of the default population (two lesions) are grown to baseline and treated with
the benchmark regimen (nivolumab 240 mg Q2W plus SBRT 5 x 8 Gy) for ``--days`` days, every state
saved every day, in compiled chunks of ``--chunk`` patients whose trajectories are copied to host
(numpy) arrays as they finish. Reported: the trajectory's size in bytes, the process's resident
memory high-water mark (``resource.getrusage``, which includes JAX, XLA's compiled code and the
Python interpreter) before the run and after it, and XLA's own allocator statistics when the
backend provides them (``jax.Device.memory_stats``; the CPU backend returns none).

    python benchmarks/memory.py --n 10000 --chunk 100 --json memory.json
"""

from __future__ import annotations

import argparse

try:
    from benchmarks import _common as C
except ImportError:  # run as a script
    import _common as C

import numpy as np


def main(args, argv: list[str] | None = None):
    """Run the benchmark; ``argv`` (default ``sys.argv[1:]``) is the command line that
    ``--local-processes`` starts again in each process (each holds the whole cohort's trajectories;
    process 0 reports its own memory)."""
    import jax
    from tqdm import tqdm

    from qspjax.solver import distributed

    status = C.join_processes(args, argv, __file__)
    if status is not None:
        return status

    from qspjax.params import load_parameters
    from qspjax.regimen import compile_schedule
    from qspjax.solver.simulate import SolverConfig, simulate_batch
    from qspjax.vpop import make_cohort

    config = SolverConfig(rtol=args.rtol, atol=args.atol)
    rss_start = C.peak_rss_mib()
    params = load_parameters()
    output_days = np.arange(0.0, args.days + 1.0)
    schedule = compile_schedule(C.benchmark_regimen(args.days), ("nivolumab",), output_days, n_lesions=2)
    chunk = min(args.chunk, args.n)
    stored: dict = {}
    growth_failed = treatment_failed = 0  # growth: baseline diameter not reached (or its solve failed)
    with C.Timer() as run:
        for idx, real in tqdm(C.chunks(args.n, chunk), total=-(-args.n // chunk), desc="grow + treat",
                              unit="chunk", disable=not distributed.is_writer()):
            cohort = make_cohort(params, args.n, args.seed, drugs=("nivolumab",), n_lesions=2, config=config,
                                 subset=idx)
            traj = C.block(simulate_batch(cohort.model, cohort.y0, schedule, config))
            start = int(idx[0])
            for k, v in traj.ys.items():
                v = np.asarray(v)[:real]
                if k not in stored:
                    stored[k] = np.empty((args.n,) + v.shape[1:], dtype=v.dtype)
                stored[k][start:start + real] = v
            growth_failed += int(np.sum(np.asarray(cohort.status)[:real] != 0))
            treatment_failed += int(np.sum(np.asarray(traj.status)[:real] != 0))
            del traj, cohort
    if not distributed.is_writer():
        return None
    trajectory_bytes = int(sum(v.nbytes for v in stored.values()))
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 (backends without allocator statistics)
        stats = None
    out = {"machine": C.machine(), "n": args.n, "days": args.days, "chunk": chunk, "saved_points": len(output_days),
           "states_per_patient": int(sum(np.prod(v.shape[2:], dtype=int) for v in stored.values())),
           "trajectory_bytes": trajectory_bytes, "peak_rss_mib_before": rss_start,
           "peak_rss_mib": C.peak_rss_mib(), "xla_memory_stats": stats, "seconds": run.seconds,
           "n_growth_failed": growth_failed, "n_treatment_failed": treatment_failed,
           "processes": jax.process_count()}
    C.print_table([(args.n, chunk, f"{args.days:g}", f"{trajectory_bytes / 2**20:.1f}", f"{rss_start:.0f}",
                    f"{out['peak_rss_mib']:.0f}", f"{run.seconds:.1f}",
                    "n/a" if not stats else f"{stats.get('peak_bytes_in_use', 0) / 2**20:.0f}",
                    growth_failed, treatment_failed)],
                  ("patients", "chunk", "days", "trajectory MiB", "RSS before MiB", "peak RSS MiB", "seconds",
                   "XLA peak MiB", "growth failed", "treatment failed"))
    if args.json:
        C.write_json(args.json, out)
    return out


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20, help="cohort size (default 20; the issue's target is 10,000)")
    p.add_argument("--chunk", type=int, default=10, help="patients per compiled batch (default 10)")
    p.add_argument("--days", type=float, default=400.0, help="treatment horizon in days, saved daily (default 400)")
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--atol", type=float, default=1e-9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    from qspjax.solver.distributed import add_arguments

    add_arguments(p)  # --local-processes K: K processes of this machine, each chunk split between them
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
