"""The runs a studio may touch: only those named on the command line, looked up by index or name.

A request names a run by its position in the list ("0", "1", ...) or by its name (the directory's
last component, made unique with "-2", "-3" ... when two share one). Nothing a request sends is
ever joined onto a path: an unknown name is refused, whatever slashes or dots it holds.

A run named with --train-into is a slot the Training page may train (trainer.py): it need not
exist yet, and it is listed after the others (or, if it is one of them, that run becomes trainable).

Models are loaded on first use and kept; a run still training gets its newest checkpoint, because
the cache is keyed by the run's current checkpoint. The C++ forward pass keeps activations in the
model, so each model has a lock and one forward pass runs on it at a time (other runs, the pages
and the ranking writes go on meanwhile: model work runs in worker threads).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..checkpoint import current_checkpoint, load_model, read_config
from ..errors import RunDirError
from ..rundir import METRICS_FILE, is_run, run_path

NAME_CHARS = 80  # longest run reference a request may send


class UnknownRun(LookupError):
    """A request named a run that is not one of the studio's (answered 404)."""


@dataclass
class Run:
    index: int
    name: str
    path: Path
    trainable: bool = False  # named with --train-into: the Training page may train it
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _loaded: Optional[tuple] = field(default=None, repr=False)  # (checkpoint, model, tok, config)

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    def describe(self) -> dict:
        try:
            config = read_config(self.path)
        except (OSError, ValueError):
            config = {}
        train = config.get("train") or {}
        return {"index": self.index, "name": self.name, "stage": train.get("stage") or config.get("stage"),
                "chat": bool(train.get("chat_template")), "model": config.get("model"),
                "trainable": self.trainable, "exists": is_run(self.path)}

    @property
    def loaded_checkpoint(self) -> Optional[Path]:
        return None if self._loaded is None else self._loaded[0]

    def model(self):
        """(model, tokenizer, config) of the run's current checkpoint, loaded once per checkpoint.
        Call with self.lock held (the model is not safe for two forward passes at once)."""
        checkpoint = current_checkpoint(self.path)
        if self._loaded is None or self._loaded[0] != checkpoint:
            model, tok, config = load_model(self.path)
            self._loaded = (checkpoint, model, tok, config)
        return self._loaded[1:]


class Runs:
    """The runs named on the command line, in order."""

    def __init__(self, paths, train_into=()) -> None:
        self.runs: list[Run] = []
        taken: set = set()
        for i, p in enumerate(paths):
            path = run_path(p).resolve()  # "" (an unset variable) is not the current directory
            if not path.is_dir():
                if path.exists():
                    raise NotADirectoryError(f"{os.fspath(p)} is a file, not a run directory")
                raise FileNotFoundError(f"run directory {os.fspath(p)} does not exist")
            if not is_run(path) and not (path / METRICS_FILE).exists():
                raise ValueError(f"{os.fspath(p)} is not a run directory (no checkpoint or "
                                 f"{METRICS_FILE}); name a directory written by lmlab pretrain, "
                                 "finetune, instruct, dpo or rlhf")
            self.runs.append(Run(i, self._unique(path.name or f"run{i}", taken), path))
        for p in train_into:
            if not os.fspath(p):  # would train into the current directory, among its files
                raise RunDirError("--train-into '' is empty: name the directory the Training page "
                                  "may train into")
            path = Path(os.fspath(p)).resolve()
            if path.exists() and not path.is_dir():
                raise ValueError(f"--train-into {os.fspath(p)} is a file; name a directory for a new "
                                 "run (or a run to resume)")
            if not path.parent.is_dir():
                raise FileNotFoundError(f"--train-into {os.fspath(p)}: the directory {path.parent} "
                                        "does not exist")
            named = [r for r in self.runs if r.path == path]
            if named:
                named[0].trainable = True
                continue
            name = self._unique(path.name or f"run{len(self.runs)}", taken)
            self.runs.append(Run(len(self.runs), name, path, trainable=True))

    @staticmethod
    def _unique(base: str, taken: set) -> str:
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name)
        return name

    def __len__(self) -> int:
        return len(self.runs)

    def get(self, ref) -> Run:
        """The run a request names by index or name; UnknownRun for anything else."""
        if not isinstance(ref, (str, int)) or isinstance(ref, bool):
            raise UnknownRun(f"run must be a run's index or name, got {type(ref).__name__}")
        ref = str(ref)
        if len(ref) > NAME_CHARS:
            raise UnknownRun(f"no run named {ref[:NAME_CHARS]!r}...")
        if ref.isascii() and ref.isdigit() and int(ref) < len(self.runs):  # not "²", a digit too
            return self.runs[int(ref)]
        for run in self.runs:
            if run.name == ref:
                return run
        known = ", ".join(f"{r.index} ({r.name})" for r in self.runs) or "none"
        raise UnknownRun(f"no run {ref!r} in this studio; the runs are {known}")

    def describe(self) -> list:
        return [r.describe() for r in self.runs]
