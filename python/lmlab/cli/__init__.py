"""The `lmlab` command line: every parser and the one `main`; each verb is a thin call into the
library modules that do the work (which never import the command line).

    lmlab pretrain   train a GPT from scratch on a corpus (next-token prediction)     cli/training.py
    lmlab finetune   continue training a run on a new corpus (style fine-tuning)
    lmlab instruct   tune a run on prompt/response pairs, loss on the responses only
    lmlab sample     generate text from a trained run                                 cli/generation.py
    lmlab predict    show the next-token distribution for a prompt
    lmlab chat       talk to an instruct-tuned run
    lmlab inspect-data  show which tokens of an instruct dataset receive loss
    lmlab rank | reward | dpo | rlhf   learn from human rankings                      cli/preference.py
    lmlab export     write a run as a Hugging Face transformers model directory        cli/interop.py
    lmlab import     make a local Hugging Face GPT-2 checkpoint an lmlab run
    lmlab bench      measure kernels or training throughput against references        cli/bench.py
    lmlab demo       teaching views: gradient descent, loss, sampling, embeddings     cli/demo.py
    lmlab studio     the teaching views as a local web app, ranking for a class       cli/studio.py
    lmlab doctor     check the install; --mpi: every MPI rank sees the same build, data cli/doctor.py

Errors a user can cause (a bad value, a missing file, an existing run) end in one line
"lmlab VERB: error: ..." (a sub-command's: "lmlab demo loss: error: ...") and exit code 2; a bad setting's message names its flag. A bad
LMLAB_ISA or LMLAB_BF16, refused as lmlab is imported, ends as "lmlab: error: ..." (lmlab/__init__).

Under `mpiexec -n N lmlab VERB` (lmlab.distributed) only rank 0 writes to stdout, and an error on
any rank ends every rank (MPI_Abort) with that line, naming the rank. Only MPI_COMMANDS run there;
the others are one process and refuse it.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
from typing import Optional, Sequence

from .. import __version__, _started, distributed
from ..checks import SettingError
from ..tokenizer import UnrepresentableText
from ..train import NonFiniteLoss
from . import bench, demo, doctor, generation, interop, preference, studio, training
from .common import CommandParser, Parser, check_inherited_threads, command_name, flag


# The verbs that run as the ranks of one MPI run: the training verbs, and doctor (--mpi checks the
# ranks). Under mpiexec any other would be run once per rank, each doing all the work and writing
# all its output (`lmlab rank` appended every judgement N times), so they refuse it.
MPI_COMMANDS = ("pretrain", "finetune", "instruct", "reward", "dpo", "rlhf", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lmlab", description="Train small GPT language models on a CPU and watch them learn.")
    parser.add_argument("--version", action="version", version=f"lmlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=CommandParser)
    training.add_commands(sub)
    generation.add_commands(sub)
    preference.add_commands(sub)
    interop.add_commands(sub)
    bench.add_commands(sub)
    demo.add_demo_arguments(sub)
    studio.add_commands(sub)
    doctor.add_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    if distributed.launched_rank() > 0:  # rank 0 alone reports, --help and --version too
        sys.stdout = open(os.devnull, "w")
    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error under mpiexec ends every rank (Parser.error)
    world = None
    try:
        _started()  # Ctrl-C is caught below from here on (lmlab/__init__)
        check_inherited_threads()
        if distributed.launched_size() > 1 and args.command not in MPI_COMMANDS:
            return distributed.refuse(
                f"lmlab {args.command}: error: it runs as one process, and mpiexec started "
                f"{distributed.launched_size()} (each would do all of its work): run it without "
                f"mpiexec (what runs under it: {', '.join(MPI_COMMANDS)})", 2)
        if distributed.launched_size() > 1:
            world = distributed.world()
            distributed.share_cores()
            if not world.is_root:  # rank 0 alone reports
                sys.stdout = open(os.devnull, "w")
        rc = args.func(args)
        return rc if isinstance(rc, int) else 0  # some runners return their result rows
    except BrokenPipeError:
        if not _stdout_reader_gone():
            return _fail(world, 2, f"{command_name(args)}: error: [Errno 32] Broken pipe")
        # `lmlab sample ... | head`: the reader took what it wanted; stop quietly, as shell tools
        # do (the status of a process a SIGPIPE ended), and keep Python's exit flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except SettingError as exc:
        return _fail(world, 2, f"{command_name(args)}: error: "
                               f"{exc.message(flag(exc.name) + ' ')}")
    except UnrepresentableText as exc:  # text given as an argument: named by its flag
        text = exc.message(flag(exc.name) + " ") if exc.name else str(exc)
        return _fail(world, 2, f"{command_name(args)}: error: {text}")
    except (ValueError, OSError) as exc:  # OSError: a file the system will not read or write
        return _fail(world, 2, f"{command_name(args)}: error: {exc}")
    except NonFiniteLoss as exc:  # training diverged; the last good checkpoint is kept
        if world is None or world.is_root:  # every rank saw the same loss and stops: one says so
            print(f"{command_name(args)}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return _fail(world, 130, "\nlmlab: interrupted")


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll reports POLLERR on its
    write end), so that a BrokenPipeError from anywhere else (a worker's pipe) stays an error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout has no descriptor
        return False


def _fail(world, code: int, message: str) -> int:
    """Print the error; under MPI, end every rank with it (the others may wait for this one),
    also where it came before this rank joined them (world None: a bad OMP_NUM_THREADS)."""
    if world is not None and world.distributed:
        world.abort(message.strip(), code)
    if world is None and distributed.launched_size() > 1:
        return distributed.refuse(message.strip(), code)
    print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
