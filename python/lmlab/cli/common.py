"""What the verbs of the command line share: option groups, flag names, thread setting, reports.

Options a user may leave out default to None (a sentinel): the stage then takes the value from its
row of lmlab.stage.STAGE_DEFAULTS, or on --resume from the run, and knows which flags were given.
Every flag's long name is its setting's Python name with dashes ("--min-lr" sets min_lr; a
one-letter name is "-k"), so an error about a setting names the flag the user typed.
"""

from __future__ import annotations

import argparse
import os

from .. import checks, distributed, ops
from ..errors import LmlabError
from ..stage import STAGE_DEFAULTS

RESUME_HELP = ("continue the run exactly as it was set up: every setting comes from the run's "
               "config.json. A setting given again with another value is applied, with a line "
               "\"lmlab: lr changed from X to Y\" (e.g. --steps to extend the run); the model, "
               "data, batch size, seed and precision cannot change (exit 2)")
OVERWRITE_HELP = ("replace an existing run in the output directory (says what it replaces; the "
                  "old run is kept until the new run's first checkpoint)")


class ShowDefaults(argparse.HelpFormatter):
    """--help that shows each option's default where its text does not already: every default but
    None (the option not given; its text says what then happens), a switch's (a flag that takes
    no value, such as --no-mfu, whose True means "not given", not "on") and the empty string."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is argparse.SUPPRESS
                or default is None or action.nargs == 0 or default == ""):
            return text
        shown = str(default).replace("%", "%%")  # help strings are %-formatted
        return f"{text} (default {shown})" if text else f"default {shown}"


class Parser(argparse.ArgumentParser):
    """Every lmlab parser and sub-parser: its --help shows the defaults (ShowDefaults). Under
    mpiexec a usage error is one line that ends every rank (distributed.refuse): every rank
    printed usage and error, and a rank alone in refusing its arguments left the others waiting
    for it forever."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", ShowDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message):
        if distributed.launched_size() > 1:
            raise SystemExit(distributed.refuse(f"{self.prog}: error: {message}", 2))
        super().error(message)


class CommandParser(Parser):
    """The parser of one command (lmlab VERB, lmlab bench train, ...): an argument it does not
    know is refused with its own usage, not the top-level one (argparse leaves a sub-command's
    leftovers to the top-level parser, whose usage names no flag of the command). The innermost
    command parsed leaves its name ("lmlab demo embeddings") in the namespace as COMMAND_PROG, so
    that an error the command raises later starts with the name its usage shows."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        # A sub-command's parse ends first and its namespace is copied into this one's: kept.
        if not hasattr(namespace, COMMAND_PROG):
            setattr(namespace, COMMAND_PROG, self.prog)
        return namespace, extras


COMMAND_PROG = "command_prog"  # the namespace's attribute naming the command: CommandParser


def command_name(args) -> str:
    """The command an error line starts with: "lmlab demo embeddings", "lmlab sample"."""
    return getattr(args, COMMAND_PROG, None) or f"lmlab {args.command}"


# Short spellings of a few long flags.
ALIASES = {"keep_checkpoints": ["--keep"]}


def flag(name: str) -> str:
    """The command-line flag of a setting."""
    return f"-{name}" if len(name) == 1 else "--" + name.replace("_", "-")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP threads for the kernels, kept as given (default: all cores, "
                        "and a training run goes down to fewer while fewer are faster)")


def check_inherited_threads() -> None:
    """Refuse an OMP_NUM_THREADS above what --threads takes (checks.max_threads, 4 per core),
    before any kernel runs: every thread that does not set its own count (the studio's workers
    too) starts at it, and a count in the hundred thousands ends the process at the first
    kernel (a segfault, or libgomp's abort for lack of memory)."""
    if not 1 <= ops.get_num_threads() <= checks.max_threads():  # past 2**31 OpenMP's wraps
        raise LmlabError(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')!r} is not "
                         f"allowed: expected an integer from 1 to {checks.max_threads()} (4 per "
                         "core, as --threads takes); lower or unset it")


def apply_threads(args) -> None:
    """Check --threads and set it (verbs that open a stage pass it to the stage instead)."""
    checks.check("threads", args.threads)
    if args.threads:
        ops.set_num_threads(args.threads)


def add_setting(g, stage: str, name: str, kind, text: str = "", **kw) -> None:
    """A flag for one of a stage's settings: default None (not given), help showing the table's
    default."""
    default = STAGE_DEFAULTS[stage][name]
    shown = f" (default {default})" if default is not None else ""
    flags = [flag(name)] + ALIASES.get(name, [])
    g.add_argument(*flags, dest=name, type=kind, default=None, help=text + shown, **kw)


def add_train_options(p: argparse.ArgumentParser, stage: str) -> None:
    """The optimisation settings every stage trained by lmlab.train shares."""
    g = p.add_argument_group("optimisation")
    add_setting(g, stage, "steps", int, "optimiser steps")
    add_setting(g, stage, "lr", float, "peak learning rate")
    g.add_argument("--min-lr", dest="min_lr", type=float, default=None,
                   help="end of the cosine decay, 0 <= min-lr <= lr (default lr/10)")
    add_setting(g, stage, "warmup_steps", int, "linear warmup steps")
    add_setting(g, stage, "weight_decay", float, "AdamW's decoupled weight decay, >= 0")
    add_setting(g, stage, "grad_clip", float, "global gradient-norm clip, >= 0 (0: off)")
    add_setting(g, stage, "grad_accum", int, "micro-batches per step (per process under mpiexec)")
    add_setting(g, stage, "zero", int, "under mpiexec, 1 shards the AdamW state across the "
                "processes (ZeRO-1: the same updates, optimiser memory / N)", choices=(0, 1))
    add_setting(g, stage, "eval_every", int, "validation every N steps (0: off)")
    add_setting(g, stage, "save_every", int, "checkpoint every N steps (0: only at the end)")
    add_setting(g, stage, "log_every", int, "metrics.jsonl row every N steps")
    add_setting(g, stage, "keep_checkpoints", int,
                "keep the newest N checkpoints in checkpoints/ (the current one always; 0: all)",
                metavar="N")
    add_setting(g, stage, "seed", int)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--precision", choices=("auto",) + ops.MATMUL_PRECISIONS, default=None,
                   help="matmul precision: fp32, or bf16 = the operands of every matmul and "
                        "attention product rounded to bfloat16 with fp32 accumulation (parameters, "
                        "gradients, optimiser state and other ops stay fp32). auto (default): bf16 "
                        "where the CPU multiplies bf16 natively (AMX or AVX512-BF16), else fp32. A resumed "
                        "run keeps its own")


def add_run_output(p: argparse.ArgumentParser, *, derived: bool, resume: bool = True) -> None:
    """The output run directory: --out NEW for a stage that starts from a run (it records its
    parent), and --resume / --overwrite."""
    if derived:
        p.add_argument("parent", metavar="run", help="the run directory to start from")
        p.add_argument("--out", required=True,
                       help="the new run directory (it records its parent)")
    if resume:
        p.add_argument("--resume", action="store_true", help=RESUME_HELP)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def given_settings(args, stage: str, *passed: str) -> dict:
    """The stage's settings as the command line gave them (None: not given), less those `passed`
    to the stage function as its own arguments (its data)."""
    given = {name: getattr(args, name) for name in STAGE_DEFAULTS[stage]
             if hasattr(args, name) and name not in passed}
    if hasattr(args, "no_progress"):
        given["progress"] = False if args.no_progress else None
    return given


def add_sampling_options(p: argparse.ArgumentParser, *, max_new_tokens: int,
                         temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"at most this many new tokens (default {max_new_tokens})")
    g.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 means greedy (default {temperature})")
    g.add_argument("--top-k", type=int, default=None,
                   help="sample from the k most likely (default: from every token)")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling, in (0, 1] (default: off)")
    g.add_argument("--seed", type=int, default=None,
                   help="same seed, same text (default: a fresh random seed each run)")


def check_sampling(args) -> None:
    checks.check_values(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p)
    if args.seed is not None:
        checks.check("seed", args.seed)


def report_training(result) -> None:
    print(result.summary())
