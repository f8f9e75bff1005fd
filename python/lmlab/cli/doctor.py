"""`lmlab doctor`: what this installation runs on, and with --mpi whether every rank of an MPI
run (`mpiexec -n N lmlab doctor --mpi`) sees the same lmlab, kernels and corpus."""

from __future__ import annotations

import socket

from .. import distributed, get_num_threads
from ..data import corpus_fingerprint


def add_commands(sub) -> None:
    p = sub.add_parser(
        "doctor", help="check the install; --mpi: that every MPI rank sees the same build and data",
        description="Print the lmlab version, kernel path and threads. With --mpi, run under "
                    "mpiexec: every rank reports, and the check fails (exit 2) unless all ranks "
                    "see the same lmlab version, kernel path and corpus. Training under mpiexec "
                    "makes the same check before its first step.")
    p.add_argument("--mpi", action="store_true",
                   help=f"check the ranks of an MPI run (needs mpi4py: {distributed.INSTALL_HINT})")
    p.add_argument("--corpus", default=None,
                   help="a corpus spec (file, directory, glob, builtin:NAME) every rank must see "
                        "with the same text")
    p.set_defaults(func=run_doctor)


def run_doctor(args) -> int:
    facts = dict(distributed.environment())
    if args.corpus is not None:
        facts["corpus"] = corpus_fingerprint(args.corpus)
    world = distributed.world(require=True) if args.mpi else distributed.World()
    everyone = world.allgather({**facts, "host": socket.gethostname(),
                                "threads": get_num_threads()})
    for rank, seen in enumerate(everyone):
        shown = ", ".join(f"{k} {v}" for k, v in seen.items())
        print(f"rank {rank} of {world.size}: {shown}" if args.mpi else shown)
    world.check_same("installation", facts)
    if args.mpi:
        more = "" if world.size > 1 else (" (one process: run `mpiexec -n N lmlab doctor --mpi` "
                                          "to check N)")
        print(f"ok: all {world.size} rank(s) see the same lmlab, kernels"
              f"{' and corpus' if args.corpus else ''}{more}")
    return 0
