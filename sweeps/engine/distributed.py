"""Runs that span several processes (hosts): starting jax.distributed, each process's rows of a
batch, and decisions every process must take together.

One run is the same command launched once per process: by SLURM (several tasks of one job; JAX
reads the peers from SLURM's environment) or by hand with `dist.coordinator=HOST:PORT
dist.processes=N dist.process_id=I`. Every process builds the same plan and the same global mesh
over all processes' devices, and feeds only the rows of each batch that its own devices hold
(`process_rows`, `global_batch`; the data's `train_batch(..., rows=)` reads only those rows). Process 0 alone writes the results row, the
metrics, TensorBoard and the report, and holds the run's lock; checkpoints are written by every
process together (Orbax), committed by process 0 after a barrier (sweeps.engine.checkpoint).

Anything that decides whether a collective happens (save now? stop now? which checkpoint?) must
be decided once for all processes, or they wait on each other forever: `broadcast` (process 0's
value) and `any_process` do that. With one process they cost nothing.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

from archs.errors import ConfigError
from sweeps.config import DistConfig

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def slurm_tasks() -> int:
    """Tasks of the SLURM job step this process runs in (1 outside SLURM or outside srun)."""
    if not all(v in os.environ for v in _SLURM_VARS):
        return 1
    return int(os.environ["SLURM_NTASKS"])


def initialize(dist: DistConfig) -> None:
    """Start jax.distributed when this run spans several processes: before anything else uses
    JAX's backend in this process. Idempotent (a second run in the same process reuses it)."""
    explicit = bool(dist.coordinator)
    if not explicit and slurm_tasks() == 1:
        return  # a single process
    if jax.distributed.is_initialized():
        if explicit and (jax.process_count() != dist.processes or jax.process_index() != dist.process_id):
            raise ConfigError(f"this process already runs as process {jax.process_index()} of "
                              f"{jax.process_count()}, not dist.process_id={dist.process_id} of "
                              f"dist.processes={dist.processes}; start a fresh process per run")
        return
    try:
        if explicit:
            jax.distributed.initialize(coordinator_address=dist.coordinator, num_processes=dist.processes,
                                       process_id=dist.process_id)
        else:
            jax.distributed.initialize(cluster_detection_method="slurm")
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise ConfigError("jax.distributed must start before anything else uses JAX in this process: launch "
                              "each process of a multi-process run as its own command (python -m sweeps.run ...)") \
                from None
        raise


def process_index() -> int:
    return jax.process_index()


def is_primary() -> bool:
    """Process 0: the one that writes the results row, the logs and the report."""
    return jax.process_index() == 0


def broadcast(value: int) -> int:
    """Process 0's integer, in every process."""
    if jax.process_count() == 1:
        return int(value)
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over all processes (a signal one process saw is seen by all)."""
    if jax.process_count() == 1:
        return tuple(bool(f) for f in flags)
    got = multihost_utils.process_allgather(np.asarray([bool(f) for f in flags], np.int32))
    return tuple(bool(x) for x in np.asarray(got).reshape(jax.process_count(), len(flags)).any(axis=0))


def barrier(name: str) -> None:
    """Wait until every process got here."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def process_rows(sharding: Sharding, n_rows: int, devices=None) -> slice:
    """The rows of an [n_rows, ...] array sharded by `sharding` that `devices` (default: this
    process's) hold: the local data jax.make_array_from_process_local_data expects from a process.
    One contiguous block (all rows with one process); a mesh that gives a process scattered rows
    is refused: the processes' devices must be contiguous along the batch axes."""
    index = sharding.devices_indices_map((n_rows, 1))
    spans = {index[d][0].indices(n_rows)[:2] for d in (sharding.addressable_devices if devices is None else devices)}
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    covered = np.zeros(n_rows, bool)
    for a, b in spans:
        covered[a:b] = True
    if not covered[lo:hi].all():
        raise ConfigError(f"process {jax.process_index()} would hold scattered rows of the batch on this mesh; "
                          "order the mesh so each process's devices are contiguous along mesh.data")
    return slice(lo, hi)


def global_batch(local: np.ndarray, sharding: Sharding, n_rows: int) -> jax.Array:
    """The global [n_rows, ...] array from every process's rows (`process_rows` of them)."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(local), (n_rows, *local.shape[1:]))
