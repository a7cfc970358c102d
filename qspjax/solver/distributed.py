"""Running one cohort over several hosts with ``jax.distributed``.

Every process runs the same command. Each builds the whole virtual cohort from the seed (cheap and
deterministic), the treatment solves are split over every device of every process
(:func:`qspjax.solver.simulate.over_devices`: the patient axis split over a global ``Mesh``, each device
stepping its own patients under ``shard_map``), and each process gets the whole result back;
process 0 writes the outputs. Pre-treatment growth is split between processes instead
(:func:`qspjax.solver.simulate.over_processes`: each grows its share, all get the whole cohort back).

    # on each of N hosts (or N processes of one host)
    qspjax compare EXPERIMENT --out DIR --coordinator host0:12355 --num-processes N --process-id I

On CPU the cross-process collectives use gloo. Cluster launchers that JAX detects (SLURM, Open
MPI, ...) need only ``--distributed``. On one multi-core machine, :func:`launch_local` starts the
K processes itself (``--local-processes K``).
"""

from __future__ import annotations

import sys

import jax

from qspjax.errors import QSPValidationError


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Join a multi-process run; with no arguments, JAX detects the cluster's settings."""
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise QSPValidationError("command line", "--coordinator/--num-processes/--process-id",
                                 [coordinator, num_processes, process_id],
                                 "give all three (or none, to let JAX detect the cluster)")
    if num_processes is not None and not (num_processes >= 1 and 0 <= process_id < num_processes):
        raise QSPValidationError("command line", "--process-id", process_id,
                                 f"must be in [0, {num_processes}) for --num-processes {num_processes}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; GPUs use NCCL
    if all(given):
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()


def is_writer() -> bool:
    """Whether this process writes the run's outputs (process 0; always true in a single process)."""
    return jax.process_index() == 0


def launch_local(num_processes: int, command: list[str]) -> int:
    """Run ``command`` as ``num_processes`` cooperating processes of this machine and wait for them.

    Each copy gets ``--coordinator localhost:PORT --num-processes K --process-id I`` appended (a
    free port is picked here). Process 0's output goes to this process's stdout and stderr; the
    others' stdout is discarded (they compute their share and write nothing) and their stderr is
    kept and shown if they fail. When one process fails the others are stopped (they would wait
    for it in a collective). Returns the failed process's exit status, or 0.

    Why: one XLA CPU device runs a batched solve on about one core. Several processes, one device
    each, use several cores; several CPU devices inside one process (``--xla_force_host_platform_
    device_count``) were seen to hang on a 2-core machine once a device's batch exceeded a few
    patients (RESULTS.md).
    """
    import socket
    import subprocess
    import tempfile
    import time

    if num_processes < 1:
        raise QSPValidationError("command line", "--local-processes", num_processes, "must be >= 1")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    flags = ["--coordinator", f"localhost:{port}", "--num-processes", str(num_processes)]
    procs, logs = [], []
    for i in range(num_processes):
        log = None if i == 0 else tempfile.TemporaryFile(mode="w+")
        procs.append(subprocess.Popen(command + flags + ["--process-id", str(i)],
                                      stdout=None if i == 0 else subprocess.DEVNULL, stderr=log))
        logs.append(log)
    # A process that fails leaves the others waiting for it in a collective: stop them then.
    failed = None
    while any(proc.poll() is None for proc in procs):
        failed = next((i for i, proc in enumerate(procs) if proc.poll()), None)
        if failed is not None:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            break
        time.sleep(0.2)
    codes = [proc.wait() for proc in procs]
    failed = failed if failed is not None else next((i for i, c in enumerate(codes) if c), None)
    for i, (code, log) in enumerate(zip(codes, logs)):
        if code and log is not None and (i == failed or code > 0):
            log.seek(0)
            print(f"process {i} exited with {code}:\n{log.read()[-3000:]}", file=sys.stderr)
    return 0 if failed is None else codes[failed]


def add_arguments(p) -> None:
    """The multi-process flags of ``qspjax trial`` and ``qspjax compare``."""
    g = p.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run whose settings JAX detects (SLURM, Open MPI, ...)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (with --num-processes, --process-id)")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--local-processes", type=int, default=1,
                   help="run as K cooperating processes of this machine, one CPU device (about one core) "
                        "each, patients split between them (default 1)")


def relaunch_locally(args, program: list[str] | None = None) -> int | None:
    """With ``--local-processes K`` (K > 1) and no other multi-process flag, run ``program`` (default
    the ``qspjax`` command) with the command line ``args.argv`` (set by :func:`qspjax.cli.main`)
    again as K local processes and return their exit status; otherwise ``None`` (go on in this
    process)."""
    k = getattr(args, "local_processes", 1)
    if k < 1:
        raise QSPValidationError("command line", "--local-processes", k, "must be >= 1")
    if k == 1 or args.coordinator is not None or args.distributed:
        return None
    return launch_local(k, (program or [sys.executable, "-m", "qspjax.cli"]) + list(args.argv))


def from_arguments(args) -> None:
    """Initialise ``jax.distributed`` when the command line asks for it (before any computation)."""
    if args.distributed or args.coordinator is not None or args.num_processes is not None or args.process_id is not None:
        initialize(args.coordinator, args.num_processes, args.process_id)
