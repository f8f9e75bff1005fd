"""Data-parallel training across processes with MPI: who this process is, and every message the
ranks exchange.

`lmlab VERB ...` is one process; `mpiexec -n N lmlab VERB ...` is N ranks of one run. world()
says which: it imports mpi4py only when an MPI launcher started this process (or when asked with
require=True, as `lmlab doctor --mpi` does), so a plain run never loads MPI. Without mpi4py, a run
under a launcher with more than one process is refused with the install line.

What the ranks exchange, per optimiser step:
  - the flat gradient buffer, summed in rank order (reduce_gradients): each rank receives its shard
    of every rank's buffer (Alltoallv), adds them in rank order in float32, then the summed shards
    are all-gathered. The sum is the same whatever the MPI library's reduction order, so a run
    repeated with the same N is bit for bit the same, and with N = 2 (a + b = b + a) bit for bit
    the run of one process with --grad-accum 2. It moves 2(N-1)/N of the buffer per rank, as a
    ring allreduce does.
  - with ZeRO-1, the same reduce-scatter without the all-gather; each rank updates its shard of the
    parameters with its shard of the AdamW moments, then the parameters are all-gathered.
  - one small message of every rank's losses, token counts and Ctrl-C flag (gather_step), so rank
    0 logs what one process would, and every rank stops after the same step.
A rank that raises calls abort(): it prints one line naming itself and MPI_Abort ends every rank
(mpiexec also ends them when a rank dies); rank 0 writes checkpoints atomically, so the last one
stays current.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from typing import Optional

import numpy as np

from .errors import LmlabError

INSTALL_HINT = 'pip install "lmlab[mpi]" (mpi4py and an MPI from wheels)'
# Set by MPI launchers in the processes they start: MPICH/Hydra and Intel MPI (PMI_*), Open MPI
# (OMPI_*), PMIx launchers, MVAPICH.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
# How long a failing rank waits between printing why and MPI_Abort (World.abort).
ABORT_GRACE_S = 1.0
# How long a failing rank other than 0 waits before saying why (World.abort): longer than rank 0's
# grace, so rank 0 failing the same way ends it first.
NON_ROOT_REPORT_DELAY_S = 3.0
# lmlab.ops (the compiled core) is imported where it is used: refuse() must work in a process whose
# core refused to load (a bad LMLAB_ISA), to end the other ranks instead of leaving them waiting.


class MPIUnavailable(ValueError):
    """More than one process (or an MPI check) was asked for, and mpi4py cannot be imported."""


class RanksDifferError(LmlabError):
    """The ranks of one run see different things where they must see the same (World.check_same):
    another lmlab build, run directory, parent run or data on some machine."""


def launched_size() -> int:
    """The number of processes the launcher that started this one says it started (1 if none)."""
    for var in _SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) >= 1:
            return int(value)
    if any(var in os.environ for var in _RANK_VARS):
        return 2  # a launcher that names the rank only: treat as several
    return 1


def launched_rank() -> int:
    """This process's rank as the launcher that started it says (0 if none)."""
    for var in _RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


def shard_bounds(n: int, size: int) -> list:
    """[(start, stop), ...]: the n elements cut into `size` contiguous shards, one per rank, each
    boundary on a multiple of ops.SUM_SQUARES_CHUNK (the last shard takes the rest): whole chunks
    of ops.sum_squares, so the ranks' chunk sums are those of the whole buffer and ZeRO-1's gradient
    norm is bit for bit the one-process norm (World.global_norm); each shard also starts on a cache
    line."""
    from .ops import SUM_SQUARES_CHUNK as align
    per = -(-n // size)
    per = -(-per // align) * align
    return [(min(n, r * per), min(n, (r + 1) * per)) for r in range(size)]


class World:
    """This process's place among the ranks of one run. A World of size 1 has no communicator
    and every method is the one-process identity."""

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.comm_seconds = 0.0  # time spent moving gradients and parameters (logged per step)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size})"

    # -- small messages -------------------------------------------------------------------------

    def allgather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; for small objects)."""
        return self.comm.allgather(obj) if self.distributed else [obj]

    def bcast(self, obj):
        """Rank 0's obj on every rank."""
        return self.comm.bcast(obj, root=0) if self.distributed else obj

    def barrier(self) -> None:
        if self.distributed:
            self.comm.Barrier()

    def root_first(self, work):
        """work() on rank 0, then on the other ranks: what rank 0 writes to a cache (a corpus's
        token shards) the others then read, rather than every rank writing it at once."""
        if not self.is_root:
            self.barrier()
        result = work()
        if self.is_root:
            self.barrier()
        return result

    # -- the gradient and the parameters ----------------------------------------------------------

    def shards(self, n: int) -> list:
        return shard_bounds(n, self.size)

    def reduce_scatter_sum(self, flat: np.ndarray) -> np.ndarray:
        """This rank's shard of the sum over ranks of `flat` (float32), added in rank order."""
        if not self.distributed:
            return flat
        from mpi4py import MPI
        began = time.perf_counter()
        bounds = self.shards(flat.size)
        start, stop = bounds[self.rank]
        counts = [b - a for a, b in bounds]
        displs = [a for a, _ in bounds]
        received = np.empty((self.size, stop - start), np.float32)
        mine = [stop - start] * self.size
        self.comm.Alltoallv([flat, counts, displs, MPI.FLOAT],
                            [received, mine, [i * (stop - start) for i in range(self.size)],
                             MPI.FLOAT])
        total = received[0].copy()
        for r in range(1, self.size):  # rank order: the order grad accumulation adds micro-batches
            total += received[r]
        self.comm_seconds += time.perf_counter() - began
        return total

    def allgather_shards(self, flat: np.ndarray, shard: Optional[np.ndarray] = None) -> None:
        """Every rank's shard of `flat` into `flat` on every rank (this rank's from `shard`, or
        from flat itself)."""
        if not self.distributed:
            return
        from mpi4py import MPI
        began = time.perf_counter()
        bounds = self.shards(flat.size)
        start, stop = bounds[self.rank]
        if shard is not None:
            flat[start:stop] = shard
        counts = [b - a for a, b in bounds]
        displs = [a for a, _ in bounds]
        self.comm.Allgatherv(MPI.IN_PLACE, [flat, counts, displs, MPI.FLOAT])
        self.comm_seconds += time.perf_counter() - began

    def global_norm(self, shard: np.ndarray) -> float:
        """ops.global_norm of the buffer whose shards (shard_bounds) the ranks hold, bit for bit:
        every shard is whole chunks of ops.sum_squares, whose sums are added here in buffer order."""
        from . import ops
        parts = ops.sum_squares_parts(shard)
        if self.distributed:
            parts = [p for rank_parts in self.allgather(parts) for p in rank_parts]
        return ops.norm_of_parts(parts)

    def reduce_gradients(self, flat: np.ndarray) -> None:
        """flat <- the sum over ranks of flat, the same on every rank (see the module docstring)."""
        if self.distributed:
            self.allgather_shards(flat, self.reduce_scatter_sum(flat))

    def gather_to_root(self, shard: np.ndarray, n: int) -> Optional[np.ndarray]:
        """The full array of n float32 from every rank's shard, on rank 0 (None elsewhere)."""
        if not self.distributed:
            return shard
        from mpi4py import MPI
        bounds = self.shards(n)
        full = np.empty(n, np.float32) if self.is_root else None
        counts = [b - a for a, b in bounds]
        displs = [a for a, _ in bounds]
        self.comm.Gatherv(np.ascontiguousarray(shard, np.float32),
                          [full, counts, displs, MPI.FLOAT] if self.is_root else None, root=0)
        return full

    # -- agreeing before and during training ------------------------------------------------------

    def check_same(self, what: str, values: dict, sources: Optional[dict] = None) -> None:
        """Refuse (RanksDifferError, on every rank) unless every rank has the same `values`; the
        message names the first that differs, its value on each rank, and what must then be the
        same on every machine: sources[key] (the run directory, a parent run, a data file: where
        the value comes from), or else the lmlab build and the data at the same path."""
        if not self.distributed:
            return
        everyone = self.allgather(values)
        for key in values:
            seen = [v.get(key) for v in everyone]
            if any(v != seen[0] for v in seen[1:]):
                ranks = ", ".join(f"rank {r}: {v}" for r, v in enumerate(seen))
                source = (sources or {}).get(key)
                fix = (f"{source} must be the same on every machine" if source else
                       "every machine needs the same lmlab build and the same data at the same "
                       "path")
                raise RanksDifferError(f"the ranks of this MPI run do not see the same {what}: "
                                       f"{key} differs ({ranks}); {fix}")

    def abort(self, message: str, code: int = 1) -> None:
        """Print `message` naming this rank and end every rank of the run (MPI_Abort); does not
        return under MPI. A rank other than 0 waits NON_ROOT_REPORT_DELAY_S first: where rank 0
        fails the same way (a bad setting, which every rank checks), its abort ends this rank
        before it prints, so the run says it once instead of once per rank."""
        if self.distributed and not self.is_root:
            time.sleep(NON_ROOT_REPORT_DELAY_S)
        print(f"lmlab: rank {self.rank} of {self.size}: {message}; stopping every rank",
              file=sys.stderr, flush=True)
        if self.distributed:
            # MPI_Abort kills every rank at once, and the launcher drops what it has not yet
            # forwarded from their pipes: give it a moment to pass this line (and another rank's
            # failing at the same step) on, or a loaded machine may end the run without a word.
            time.sleep(ABORT_GRACE_S)
            self.comm.Abort(code)
            os._exit(code)  # MPI_Abort can return before the launcher ends this process


def describe_failure(exc: BaseException) -> str:
    """The line a rank stopping on `exc` prints: an MPI error (a collective that could not
    complete) says what it most likely means, since MPI's own text rarely does; an lmlab error
    (lmlab.errors) is its own line; anything else is named by its class."""
    if type(exc).__module__.startswith("mpi4py"):
        return (f"a message between the ranks failed ({exc}): another rank has most likely died or "
                "been killed (mpiexec's output names it)")
    if isinstance(exc, LmlabError) and str(exc):
        return str(exc)  # one line naming what was wrong, which its class name adds nothing to
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def refuse(message: str, code: int = 2) -> int:
    """Say why this process stops, before it has joined the run's ranks (a usage error, a bad
    OMP_NUM_THREADS or LMLAB_ISA), and return `code` to exit with. Launched as one of several
    ranks, it joins them and ends every one (World.abort: said once where every rank fails alike):
    the others wait for each rank in MPI_Init and their first exchange, forever if one exits
    without joining."""
    if launched_size() > 1:
        try:
            joined = world()
        except MPIUnavailable:
            joined = None  # the others cannot start MPI either, and stop the same way
        if joined is not None and joined.distributed:
            joined.abort(message, code)
    print(message, file=sys.stderr, flush=True)
    return code


_WORLD: Optional[World] = None


def world(require: bool = False) -> World:
    """This process's World: MPI's when a launcher started it (or require=True), else one rank.

    Raises MPIUnavailable (with the install line) where MPI is needed and mpi4py is missing."""
    global _WORLD
    if _WORLD is not None and (_WORLD.comm is not None or not require):
        return _WORLD
    size = launched_size()
    if size == 1 and not require:
        _WORLD = World()
        return _WORLD
    try:
        from mpi4py import MPI
    except ImportError as e:
        asked = f"{size} processes" if size > 1 else "an MPI check"
        raise MPIUnavailable(f"{asked} need mpi4py, which cannot be imported ({e}); install it "
                             f"with: {INSTALL_HINT}") from None
    _WORLD = World(MPI.COMM_WORLD)
    if _WORLD.distributed:
        _abort_on_uncaught(_WORLD)
    if size > 1 and _WORLD.size == 1:
        raise MPIUnavailable(f"the launcher started {size} processes but mpi4py's MPI sees only "
                             "this one: mpi4py was built against another MPI than the mpiexec "
                             "used; run the mpiexec of the MPI mpi4py uses (with the wheels: the "
                             f"one `{INSTALL_HINT.split(' (')[0]}` installs)")
    return _WORLD


def _abort_on_uncaught(world: World) -> None:
    """An exception nothing catches (the Python API's refusal of a file missing on one machine, a
    bug) ends its rank with a traceback, and the other ranks waited for it in their next exchange,
    forever: after the traceback, end them too (World.abort), as `python -m mpi4py` does."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        world.abort(describe_failure(value), 1)

    sys.excepthook = hook


def share_cores() -> None:
    """Give each of the ranks on this machine its share of the cores, unless OMP_NUM_THREADS says
    otherwise (--threads still wins): N ranks of all cores each would oversubscribe them."""
    local = os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    if "OMP_NUM_THREADS" in os.environ or not (local or "").isdigit() or int(local) < 2:
        return
    from . import ops
    ops.set_default_num_threads(max(1, (os.cpu_count() or 1) // int(local)))


def fingerprint(*arrays) -> str:
    """A short SHA-256 of arrays' bytes, to compare data across ranks."""
    h = hashlib.sha256()
    for a in arrays:
        if hasattr(a, "digest") and not isinstance(a, np.ndarray):  # token_shards.TokenShards
            h.update(f"{a.digest}:{a.start}:{a.stop}".encode())
            continue
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


def environment() -> dict:
    """What every rank must share to train one run: the lmlab version and the kernel path."""
    from . import __version__, cpu_info
    info = cpu_info()
    return {"lmlab version": __version__,
            "kernel path": f"{info.get('isa')} (bf16 matmuls: {info.get('bf16_matmul')})"}
