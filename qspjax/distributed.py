"""Running one cohort over several hosts with ``jax.distributed``.

Every process runs the same command. Each builds the whole virtual cohort from the seed (cheap and
deterministic), the treatment solves are split over every device of every process
(:func:`qspjax.simulate.over_devices`: a ``NamedSharding`` of the patient axis over a global
``Mesh``), and each process gets the whole result back; process 0 writes the outputs.
Pre-treatment growth is not split (each process grows the whole cohort): it costs a fraction of
a treatment course.

    # on each of N hosts (or N processes of one host)
    qspjax compare EXPERIMENT --out DIR --coordinator host0:12355 --num-processes N --process-id I

On CPU the cross-process collectives use gloo. Cluster launchers that JAX detects (SLURM, Open
MPI, ...) need only ``--distributed``.
"""

from __future__ import annotations

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


def add_arguments(p) -> None:
    """The multi-process flags of ``qspjax trial`` and ``qspjax compare``."""
    g = p.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run whose settings JAX detects (SLURM, Open MPI, ...)")
    g.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (with --num-processes, --process-id)")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def from_arguments(args) -> None:
    """Initialise ``jax.distributed`` when the command line asks for it (before any computation)."""
    if args.distributed or args.coordinator is not None or args.num_processes is not None or args.process_id is not None:
        initialize(args.coordinator, args.num_processes, args.process_id)
