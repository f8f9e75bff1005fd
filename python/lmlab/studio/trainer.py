"""Training started from the Training page: one child process per run slot, stopped with SIGINT.

Only a run named on the command line with --train-into may be trained from the page; a request
chooses everything else from bounded lists: the stage (pretrain, finetune, instruct), a built-in
corpus by name (lmlab.builtin_corpus) or the built-in instruct data, the run to start from by its
index or name, a model size preset, and a number of steps. From those the server builds the
argument list of `python -m lmlab VERB ...` (never a shell string); nothing a request sends becomes
a path. The stage's own rules apply in the child: lmlab.stage.open_stage refuses a slot that
already holds a run unless the request asks to resume it (there is no overwrite of a run from the
page; a slot holding only the files of a run that saved no checkpoint is started afresh).

The child runs in its own session (a Ctrl-C in the studio's terminal does not reach it twice);
Stop sends it one SIGINT, which lmlab's training loop answers by saving a checkpoint and exiting.
Its output is kept in memory (the last LOG_LINES lines) for the page. When the studio stops, every
child is stopped the same way, and killed if it has not exited within STOP_WAIT_S.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from ..builtin_corpus import BUILTIN_CORPORA
from ..checkpoint import read_config
from ..instruct import BUILTIN_INSTRUCT
from ..rundir import is_run, run_files, settle_overwrite
from ..stage import STAGE_DEFAULTS
from .common import BadRequest, Conflict, choice_value, number_value

MAX_STEPS = 5000
LOG_LINES = 40
STOP_WAIT_S = 60.0
STAGES = ("pretrain", "finetune", "instruct")
# Model sizes a page may pretrain: (n_layer, n_head, n_embd, block_size, batch_size).
PRESETS = {
    "tiny": (1, 2, 32, 48, 8),
    "small": (2, 4, 64, 64, 12),
    "medium": (4, 4, 128, 64, 12),
}


def options() -> dict:
    """What the page may choose from (the server holds requests to the same lists)."""
    return {"stages": list(STAGES), "corpora": sorted(BUILTIN_CORPORA),
            "instruct_data": sorted(BUILTIN_INSTRUCT), "max_steps": MAX_STEPS,
            "presets": {k: dict(zip(("n_layer", "n_head", "n_embd", "block_size", "batch_size"), v))
                        for k, v in PRESETS.items()}}


def command(values: dict, runs) -> tuple:
    """(run, argv) for a start request: every value checked against the lists above."""
    run = runs.get(values.get("run", ""))
    if not run.trainable:
        slots = ", ".join(r.name for r in runs.runs if r.trainable) or "none (start the studio with --train-into DIR)"
        raise BadRequest(f"run {run.name} was not named with --train-into, so the page may not "
                         f"train it; the runs it may train: {slots}")
    stage = choice_value(values, "stage", STAGES)
    steps = number_value(values, "steps", lo=1, hi=MAX_STEPS, integer=True)
    resume = values.get("resume", False)
    if not isinstance(resume, bool):
        raise BadRequest(f"resume must be true or false, got {resume!r}")
    settle_overwrite(run.path)  # what a child killed while replacing files left, put back first
    if resume:
        if not is_run(run.path):
            raise BadRequest(f"run {run.name} holds no checkpoint to resume; start it without resume")
        held = ((read_config(run.path).get("train") or {}).get("stage"))
        if held != stage:
            raise BadRequest(f"run {run.name} is a {held} run; resume it as {held}")
    elif is_run(run.path):
        raise BadRequest(f"run {run.name} already holds a run: resume it, or name another "
                         "directory with --train-into (the page never overwrites a run)")
    # A run that saved no checkpoint (its child killed, or diverged, before its first save) left
    # only files to replace, such as its metrics: the start replaces them, as --overwrite would.
    replace = not resume and bool(run_files(run.path))
    # Logging, validation and checkpoints frequent enough for the page to follow a short run.
    schedule = ["--log-every", str(max(1, min(10, steps // 50))),
                "--eval-every", str(max(10, steps // 10)), "--save-every", str(max(25, steps // 5))]
    out = str(run.path)
    if stage == "pretrain":
        corpus = "builtin:" + choice_value(values, "corpus", sorted(BUILTIN_CORPORA))
        n_layer, n_head, n_embd, block, batch = PRESETS[choice_value(values, "preset", tuple(PRESETS),
                                                                     default="tiny")]
        argv = ["pretrain", "--corpus", corpus, "--run", out]
        if not resume:
            argv += ["--n-layer", str(n_layer), "--n-head", str(n_head), "--n-embd", str(n_embd),
                     "--block-size", str(block), "--batch-size", str(batch)]
    else:
        parent = runs.get(values.get("parent", ""))
        if parent is run:
            raise BadRequest("a run cannot start from itself: choose another run to start from")
        if not is_run(parent.path):
            raise BadRequest(f"run {parent.name} holds no checkpoint to start from")
        if stage == "finetune":
            corpus = "builtin:" + choice_value(values, "corpus", sorted(BUILTIN_CORPORA))
            argv = ["finetune", str(parent.path), "--out", out, "--corpus", corpus,
                    "--sample-tokens", "0"]
        else:
            data = "builtin:" + choice_value(values, "corpus", sorted(BUILTIN_INSTRUCT))
            argv = ["instruct", str(parent.path), "--out", out, "--data", data]
    argv += ["--steps", str(steps), "--no-progress"] + schedule
    if resume:
        argv.append("--resume")
    else:
        if replace:
            argv.append("--overwrite")  # a short run still warms up
        warmup = min(STAGE_DEFAULTS[stage]["warmup_steps"], max(1, steps // 10))
        argv += ["--warmup-steps", str(warmup)]
    return run, argv


class Job:
    """One child process training one run, its output's last lines, and how it ended."""

    def __init__(self, argv: list, env: dict) -> None:
        self.argv = argv
        self.started = time.time()
        self.stop_requested = False
        self.log: collections.deque = collections.deque(maxlen=LOG_LINES)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lmlab", *argv], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            text=True, encoding="utf-8", errors="replace")
        self._reader = threading.Thread(target=self._read, name="lmlab-studio-train-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.log.append(line.rstrip("\n"))
        self.process.stdout.close()

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Ask the child to stop: one SIGINT (it saves a checkpoint and exits)."""
        if self.running and not self.stop_requested:
            self.stop_requested = True
            self.process.send_signal(signal.SIGINT)

    def wait(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)

    def _interrupted(self, code: int) -> bool:
        return code in (130, -signal.SIGINT) or any("KeyboardInterrupt" in line for line in self.log)

    def describe(self) -> dict:
        code = self.process.poll()
        if code is None:
            state = "stopping" if self.stop_requested else "running"
        elif code == 0:
            state = "stopped" if self.stop_requested else "finished"
        elif self.stop_requested and self._interrupted(code):
            # Stopped before its training loop could take the SIGINT (still starting Python, or
            # loading): it ends as "interrupted", with nothing written, which is a stop too.
            state = "stopped"
        else:
            state = "failed"
        return {"state": state, "returncode": code, "command": "lmlab " + " ".join(self.argv),
                "started": self.started, "log": list(self.log)}


class Trainer:
    """The studio's training children, at most one per run."""

    def __init__(self) -> None:
        self.jobs: dict = {}  # run index -> its latest Job
        self.lock = threading.Lock()
        self.closed = False
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the lmlab package
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}

    def start(self, run, argv: list) -> Job:
        with self.lock:
            if self.closed:
                raise Conflict("the studio is stopping")
            job = self.jobs.get(run.index)
            if job is not None and job.running:
                raise Conflict(f"run {run.name} is being trained already (Stop it first)")
            job = self.jobs[run.index] = Job(argv, self.env)
            return job

    def job(self, run) -> Optional[Job]:
        return self.jobs.get(run.index)

    def stop_all(self, wait: float = STOP_WAIT_S) -> None:
        """Stop every child (SIGINT) and wait for them; a child still alive after `wait` is killed."""
        with self.lock:
            self.closed = True
            jobs = [j for j in self.jobs.values() if j.running]
        for job in jobs:
            job.stop()
        deadline = time.monotonic() + wait
        for job in jobs:
            job.wait(max(0.0, deadline - time.monotonic()))
