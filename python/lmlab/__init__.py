"""lmlab: train small GPT language models on a CPU and watch them learn.

The compiled kernels live in lmlab._core (private); lmlab.ops wraps them one function per kernel.
The top-level API (lmlab.pretrain, lmlab.finetune, lmlab.instruct, lmlab.load, lmlab.Model) lives
in lmlab.api and is imported on first use, so `import lmlab` stays quick. A bad LMLAB_ISA or
LMLAB_BF16 fails the import (ImportError), and the command line with one line and exit status 2.
"""

from __future__ import annotations

import importlib
import types

__version__ = "0.1.0"


def _on_the_command_line() -> bool:
    """Whether this process is the command line, whose first act is importing lmlab: the console
    script `lmlab` imports lmlab.cli; `python -m lmlab[.x]` imports the package while sys.argv[0]
    is "-m". (A Python program that imports lmlab is not.)"""
    import os
    import re
    import sys

    argv0 = sys.argv[0] if getattr(sys, "argv", None) else ""
    script = re.sub(r"(-script\.pyw?|\.exe)?$", "", os.path.basename(argv0))  # as pip names it
    return argv0 == "-m" or script == "lmlab"


def _refuse_on_the_command_line(exc: ImportError) -> None:
    """The compiled core refuses a bad LMLAB_ISA or LMLAB_BF16 as it loads (cpp/bindings.cpp), and
    `import lmlab` raises that ImportError. On the command line it ends as lmlab.cli ends a usage
    error: the message in one line, exit status 2, no traceback."""
    if not str(exc).startswith(("LMLAB_ISA=", "LMLAB_BF16=")):
        return  # not a setting: a broken install keeps its traceback
    if _on_the_command_line():
        # Under mpiexec, said once and every rank ended: the others would wait for this one.
        from .distributed import refuse
        raise SystemExit(refuse(f"lmlab: error: {exc}", 2))


def _interrupted_while_starting(signum, frame) -> None:
    """Ctrl-C while the command line starts (imports, builds its parser: about a second), before
    lmlab.cli.main can catch it: nothing is written yet, so it ends as an interrupted command does,
    in one line with exit status 130, rather than with the traceback of the import it cut."""
    import sys

    print("\nlmlab: interrupted", file=sys.stderr)
    raise SystemExit(130)


def _started() -> None:
    """lmlab.cli.main catches Ctrl-C from here on: Python's own handler again (KeyboardInterrupt)."""
    import signal

    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if _on_the_command_line():
    import signal as _signal

    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:  # not one set on purpose
        _signal.signal(_signal.SIGINT, _interrupted_while_starting)


try:
    from .ops import cpu_info, get_num_threads, set_num_threads  # noqa: E402
except ImportError as _exc:
    _refuse_on_the_command_line(_exc)
    raise

# The API's training functions share their names with the modules that hold the stages.
_STAGES = ("pretrain", "finetune", "instruct")
_API = _STAGES + ("load", "Model")

__all__ = ["__version__", "cpu_info", "get_num_threads", "set_num_threads", *_API]


class _CallableStage(types.ModuleType):
    """A stage's module (lmlab.pretrain, lmlab.finetune, lmlab.instruct) that, called, is the
    top-level function of the same name in lmlab.api: the package attribute is the module
    whichever was imported first, so the module is made to answer the call."""

    def _api_function(self):
        api = importlib.import_module(".api", __name__)
        return getattr(api, self.__name__.rpartition(".")[2])

    def __call__(self, *args, **kwargs):
        return self._api_function()(*args, **kwargs)

    # help(lmlab.pretrain) and inspect.signature(lmlab.pretrain) describe what a call does (the API
    # function) first, then the module. Data descriptors on the type take precedence over the
    # module's own __doc__ in its __dict__, which stays the module's docstring.
    @property
    def __doc__(self):
        import inspect
        function, own = self._api_function(), self.__dict__.get("__doc__") or ""
        return (f"{self.__name__}{inspect.signature(function)}\n\n"
                f"{inspect.cleandoc(function.__doc__ or '')}\n\n"
                f"The module {self.__name__}, the stage behind the call:\n{inspect.cleandoc(own)}")

    @property
    def __signature__(self):
        import inspect
        return inspect.signature(self._api_function())


def __getattr__(name: str):
    # PEP 562: the API is imported on first use (it pulls in the tokenizer and the trainer).
    if name in _API:
        api = importlib.import_module(".api", __name__)
        return importlib.import_module(f".{name}", __name__) if name in _STAGES else getattr(api, name)
    raise AttributeError(f"module 'lmlab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
