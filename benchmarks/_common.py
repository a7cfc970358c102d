"""Shared set-up of the benchmark scripts: the regimen, a cohort, timing and JSON output."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as ``python benchmarks/<name>.py`` from a checkout
    sys.path.insert(0, str(REPO))

import qspjax  # noqa: E402,F401  (float64 on)


def benchmark_regimen(days: float):
    """Nivolumab 240 mg Q2W from day 0 plus SBRT 5 x 8 Gy on days 0-4 to the index lesion."""
    from qspjax.regimen import parse_regimen

    cycles = int(days // 14) + 1
    return parse_regimen({
        "name": "bench-nivolumab-q2w-sbrt-5x8",
        "ici": [{"drug": "nivolumab", "dose": 240, "unit": "mg", "interval_days": 14, "cycles": cycles,
                 "start_day": 0}],
        "rt": [{"dose_per_fraction_gy": 8, "fractions": 5, "days": [0, 1, 2, 3, 4], "lesion": "irradiated",
                "technique": "sbrt"}],
    }, source="benchmarks")


def cohort(n: int, seed: int, config, n_lesions: int = 2):
    """``n`` virtual patients of the default population grown to their baseline (batched pytrees)."""
    from qspjax.params import load_parameters
    from qspjax.vpop import make_cohort

    params = load_parameters()
    return params, make_cohort(params, n, seed, drugs=("nivolumab",), n_lesions=n_lesions, config=config)


def take(tree, idx):
    import jax

    return jax.tree_util.tree_map(lambda x: x[idx], tree)


def join_processes(args, argv: list[str] | None, script: str) -> int | None:
    """The multi-process flags of a benchmark (``qspjax.solver.distributed.add_arguments``): with
    ``--local-processes K``, run ``script`` with ``argv`` (default ``sys.argv[1:]``) again as K
    processes of this machine and return their exit status; otherwise join the run the flags name,
    if any, and return ``None``."""
    from qspjax.solver import distributed

    args.argv = list(sys.argv[1:] if argv is None else argv)
    status = distributed.relaunch_locally(args, [sys.executable, str(Path(script).resolve())])
    if status is None:
        distributed.from_arguments(args)
    return status


def chunks(n: int, size: int):
    """Index arrays of fixed length ``size`` covering 0..n-1 (the last one padded by repeats), so
    that every chunk has one shape and one compilation; the second item says how many are real."""
    for start in range(0, n, size):
        idx = np.arange(start, start + size)
        real = int(min(size, n - start))
        yield np.minimum(idx, n - 1), real


def block(tree):
    import jax

    return jax.block_until_ready(tree)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def time_compiled(fn, *args, repeats: int = 2):
    """Call the jitted ``fn(*args)`` once (compilation plus one evaluation), then ``repeats`` more
    times. Returns the last value and ``{"seconds", "first_call_seconds", "compile_seconds"}``: the
    fastest later call, the first call, and their difference (``repeats`` 0: the first call's time
    and no compile figure)."""
    with Timer() as first:
        value = block(fn(*args))
    runs = []
    for _ in range(repeats):
        with Timer() as t:
            value = block(fn(*args))
        runs.append(t.seconds)
    if not runs:
        return value, {"seconds": first.seconds, "first_call_seconds": first.seconds, "compile_seconds": None}
    seconds = float(min(runs))
    return value, {"seconds": seconds, "first_call_seconds": first.seconds,
                   "compile_seconds": max(first.seconds - seconds, 0.0)}


def peak_rss_mib() -> float:
    """High-water mark of this process's resident memory (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict:
    import diffrax
    import equinox
    import jax
    import scipy

    versions = {"python": platform.python_version(), "jax": jax.__version__, "diffrax": diffrax.__version__,
                "equinox": equinox.__version__, "scipy": scipy.__version__, "numpy": np.__version__}
    try:
        import roadrunner

        versions["libroadrunner"] = roadrunner.__version__
    except ImportError:
        pass
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        model = ""
    return {"cpu": model or platform.processor(), "nproc": os.cpu_count(), "jax_backend": jax.default_backend(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "versions": versions}


def write_json(path, obj) -> None:
    from qspjax.io import atomic_write_json

    atomic_write_json(path, obj)


def print_table(rows: list[tuple], header: tuple) -> None:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
