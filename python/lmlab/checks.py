"""The one validation of every user-settable value: a rule per setting name, shared by the command
line, the stage opener (lmlab.stage), TrainConfig and the sampling functions.

A bad value raises SettingError, a ValueError that names the setting, the value and what is allowed.
The Python API shows the setting's Python name ("min_lr=-1: ..."); the command line shows its flag
("--min-lr -1: ...") and exits 2. Settings are checked before any work starts, so no run is opened,
loaded or trained with a value that would wreck it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .ops import MATMUL_PRECISIONS


class SettingError(ValueError):
    """A value outside what a setting allows."""

    def __init__(self, name: str, value, allowed: str):
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(self.message(f"{name}="))

    def message(self, label: str) -> str:
        """The error with the setting shown as `label` (a Python name "lr=", a flag "--lr ")."""
        return f"{label}{self.value!r} is not allowed: {self.allowed}"


class UnknownSettingError(TypeError, ValueError):
    """A keyword that is no setting of the function given it: a TypeError, as Python's own error
    for an unexpected keyword argument is, and a ValueError, as every other refused value is."""


def refuse_unknown(function: str, given, known) -> None:
    """Raise UnknownSettingError naming each keyword in `given` that is not in `known`, with the
    closest known name as a suggestion."""
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return
    import difflib  # only on this error path

    named = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(known), n=1)
        named.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise UnknownSettingError(f"{function}() got unknown keyword(s) {', '.join(named)}; expected "
                              f"one of {', '.join(sorted(known))}")


@dataclass(frozen=True)
class Rule:
    kind: type  # int, float, str, bool, or os.PathLike (a str or a path)
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False
    choices: tuple = ()
    optional: bool = False  # None is allowed (it means "the default behaviour")

    def describe(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind is bool:
            text = "True or False"
        elif self.kind is os.PathLike:
            text = "a path or builtin:NAME (a str or an os.PathLike)"
        else:
            what = "an integer" if self.kind is int else "a finite number"
            bounds = []
            shown = (lambda x: str(int(x))) if self.kind is int else (lambda x: f"{x:g}")
            if self.low is not None:
                bounds.append(f"{'>' if self.low_open else '>='} {shown(self.low)}")
            if self.high is not None:
                bounds.append(f"{'<' if self.high_open else '<='} {shown(self.high)}")
            text = what + (" " + " and ".join(bounds) if bounds else "")
        return text + (" (or unset)" if self.optional else "")

    def check(self, name: str, value) -> None:
        if value is None:
            if self.optional:
                return
            raise SettingError(name, value, f"expected {self.describe()}")
        if self.choices:
            if value not in self.choices:
                raise SettingError(name, value, f"expected {self.describe()}")
            return
        if self.kind is str:
            if not isinstance(value, str):
                raise SettingError(name, value, "expected a string")
            return
        if self.kind in (bool, os.PathLike):
            allowed = (bool, np.bool_) if self.kind is bool else (str, os.PathLike)
            if not isinstance(value, allowed):
                raise SettingError(name, value, f"expected {self.describe()}")
            return
        ok_type = (isinstance(value, (int, np.integer)) if self.kind is int
                   else isinstance(value, (int, float, np.integer, np.floating)))
        # an int is finite however large (math.isfinite overflows converting one past 1e308); only
        # a number of the right type is asked (math.isfinite of a str raises)
        finite = ok_type and (isinstance(value, (int, np.integer)) or math.isfinite(value))
        if isinstance(value, (bool, np.bool_)) or not finite:
            raise SettingError(name, value, f"expected {self.describe()}")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise SettingError(name, value, f"expected {self.describe()}")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise SettingError(name, value, f"expected {self.describe()}")


def max_threads() -> int:
    """The most OpenMP threads accepted: 4 per core, at most 1024 (more only oversubscribes, and
    huge counts exhaust the thread stacks)."""
    return min(1024, 4 * (os.cpu_count() or 1))


_STEPS = 10**9
_SIZE = 1 << 16  # model and batch dimensions: far above a CPU's reach, far below an overflow

RULES = {
    # optimisation (TrainConfig)
    "steps": Rule(int, 1, _STEPS),
    "lr": Rule(float, 0, 10, low_open=True),
    "min_lr": Rule(float, 0, 10, optional=True),
    "warmup_steps": Rule(int, 0, _STEPS),
    "weight_decay": Rule(float, 0, 10),
    "beta1": Rule(float, 0, 1, high_open=True),
    "beta2": Rule(float, 0, 1, high_open=True),
    "eps": Rule(float, 0, 1, low_open=True),
    "grad_clip": Rule(float, 0),
    "grad_accum": Rule(int, 1, 4096),
    "zero": Rule(int, 0, 1),  # ZeRO stage under MPI: 1 shards the AdamW state (lmlab.distributed)
    "eval_every": Rule(int, 0, _STEPS),
    "save_every": Rule(int, 0, _STEPS),
    "log_every": Rule(int, 1, _STEPS),
    "keep_checkpoints": Rule(int, 0, _STEPS),
    "seed": Rule(int, 0, 2**63 - 1),
    "precision": Rule(str, choices=("auto",) + MATMUL_PRECISIONS),
    # model and data
    "tokenizer": Rule(str, choices=("char", "bpe")),
    "vocab_size": Rule(int, 1, 1 << 20),
    "n_layer": Rule(int, 1, 1024),
    "n_head": Rule(int, 1, 1024),
    "n_embd": Rule(int, 1, _SIZE),
    "block_size": Rule(int, 1, _SIZE),
    "batch_size": Rule(int, 1, _SIZE),
    "val_fraction": Rule(float, 0, 1, high_open=True),
    "eval_batches": Rule(int, 1, 100_000),
    "unknown": Rule(str, choices=("error", "skip", "replace")),
    "freeze_layers": Rule(int, 0, 1024),
    "freeze_embeddings": Rule(bool),
    "corpus": Rule(os.PathLike, optional=True),
    "data": Rule(os.PathLike, optional=True),
    "prompts": Rule(os.PathLike, optional=True),
    "progress": Rule(bool),
    "resume": Rule(bool),
    "overwrite": Rule(bool),
    "sample_tokens": Rule(int, 0, _SIZE),
    # preference stages
    "beta": Rule(float, 0, 1000, low_open=True),
    "sft_weight": Rule(float, 0, 1000),
    "l2": Rule(float, 0, 1000),
    "k": Rule(int, 2, 1024),
    "prompts_per_step": Rule(int, 1, _SIZE),
    "kl_coef": Rule(float, 0, 1000),
    "eval_samples": Rule(int, 1, 1024),
    "eval_max_new_tokens": Rule(int, 1, _SIZE),
    # sampling
    "max_new_tokens": Rule(int, 0, 1 << 24),
    "sample_after": Rule(int, 0, 1 << 24),  # lmlab pretrain: new tokens sampled after training
    "temperature": Rule(float, 0, 1000),
    "top_k": Rule(int, 1, 1 << 24, optional=True),
    "top_p": Rule(float, 0, 1, low_open=True, optional=True),
    "num_samples": Rule(int, 1, 100_000),
    "raw": Rule(bool),  # a chat run's prompt as it is, not through the template
    "n": Rule(int, 0, 100_000),
    # benchmarks
    "repeat": Rule(int, 1, 100_000),
    "warmup": Rule(int, 0, _STEPS),
    "rounds": Rule(int, 1, 1000),
    "prompt_len": Rule(int, 1, _SIZE),
    "new_tokens": Rule(int, 1, _SIZE),
}


def check(name: str, value) -> None:
    """Check one value against its rule (threads against this machine's limit)."""
    if name == "threads":
        if value is not None:
            Rule(int, 1, max_threads()).check(name, value)
        return
    RULES[name].check(name, value)


def check_output_path(name: str, value, expected: str) -> None:
    """Refuse an empty path for a file or directory to write (SettingError naming the setting,
    so the command line names its flag): Path("") is the current directory, so --png "" drew
    nothing and demo --out "" wrote into whatever directory the shell was in, without a word.
    expected: what the path should name ("the PNG file to draw the chart in")."""
    if isinstance(value, (str, bytes, os.PathLike)) and not os.fspath(value):
        raise SettingError(name, value, f"expected {expected}; an empty path names none (the "
                                        "current directory is '.')")


def check_values(**values) -> None:
    """Check every given value (unknown names are a programming error: KeyError)."""
    for name, value in values.items():
        check(name, value)


def check_relations(s: dict, given=()) -> None:
    """Relations between settings, on a complete set (defaults, saved and given merged); given:
    the names the caller set, for a setting that applies only with another's value (refused when
    given without it, rather than silently ignored)."""
    if s.get("min_lr") is not None and "lr" in s and s["min_lr"] > s["lr"]:
        raise SettingError("min_lr", s["min_lr"], f"expected at most lr ({s['lr']:g}): the "
                           "cosine decay goes from lr down to min_lr")
    if "n_embd" in s and "n_head" in s and s["n_embd"] % s["n_head"]:
        raise SettingError("n_embd", s["n_embd"], f"expected a multiple of n_head ({s['n_head']})")
    if s.get("tokenizer") == "char" and "vocab_size" in given:
        raise SettingError("vocab_size", s["vocab_size"], "it sets a bpe tokenizer's size, and a "
                           "char tokenizer has one id per character of the corpus: leave it "
                           "out, or use tokenizer 'bpe'")
    if s.get("tokenizer") == "bpe" and "vocab_size" in s:
        from .tokenizer import MIN_BPE_VOCAB  # lmlab.tokenizer is not needed by the other rules

        if s["vocab_size"] < MIN_BPE_VOCAB:
            raise SettingError("vocab_size", s["vocab_size"], f"expected >= {MIN_BPE_VOCAB} for a "
                               "bpe tokenizer (the 256 bytes plus the special tokens)")
