"""The one way to start a training stage: its defaults, its checks, its run directory, its result.

Every training verb (pretrain, finetune, instruct, reward, dpo, rlhf) and the Python function
behind it (lmlab.pretrain.pretrain, ...) starts through open_stage():

1. every value given is checked (lmlab.checks), and the output directory's common refusals
   made (an existing run without resume or overwrite; resume without a run), before any work;
   under MPI every rank must find the run to resume and the parent run (each machine may read
   its own copy), or the run is refused naming which;
2. the settings are built from the stage's row of STAGE_DEFAULTS (the only place a default lives;
   the command line shows and uses the same table), then, on resume, the run's own settings from
   its config.json, then the values given; relations between them are checked (min_lr <= lr, ...);
3. the matmul precision is resolved once (ops.resolve_precision: "auto" -> what this CPU runs
   fastest; a resumed run keeps its own) and recorded by name; run.train_config() is the
   optimiser's TrainConfig;
4. the stage loads and checks its data, then run.hold() opens the output with
   lmlab.rundir.open_run_dir (the run's rules: not its parent, no symlinks, locked while the stage
   writes it; overwrite sets the old run aside only here, until the new run's first checkpoint)
   and hands the RunDir to train().

Resume rule (also in every verb's --help): a resumed run continues as it was set up; every
setting comes from its config.json. A value given explicitly that differs is applied, with a line
"lmlab: lr changed from X to Y", except the settings that define the run's model, data and batches
(FIXED_ON_RESUME): changing one of those is refused, since the run would no longer be the same run.
Only the stage that made a run resumes it (pretrain would train a fine-tune's frozen layers), and
steps cannot fall below the steps the run has trained.

Every stage returns a StageResult.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from . import checks, distributed, ops
from .checkpoint import read_config, saved_precision
from .errors import RunDirError
from .rundir import is_run, open_run_dir, report_replaced, run_path, settle_overwrite
from .train import TrainConfig, TrainResult

# --- the defaults -------------------------------------------------------------------------------

# Optimisation settings every stage trained by lmlab.train shares; each stage's row overrides some.
TRAIN_DEFAULTS = {
    "steps": 2000, "lr": 1e-3, "min_lr": None, "warmup_steps": 100, "weight_decay": 0.1,
    "grad_clip": 1.0, "grad_accum": 1, "eval_every": 250, "save_every": 500, "log_every": 10,
    "keep_checkpoints": 5, "seed": 1337, "precision": "auto", "progress": True,
    "zero": 0,  # under MPI, 1 shards the AdamW state across ranks (ZeRO-1)
}

STAGE_DEFAULTS = {
    "pretrain": {**TRAIN_DEFAULTS, "corpus": "builtin:python-docs", "tokenizer": "char",
                 "vocab_size": 512, "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64,
                 "batch_size": 12, "val_fraction": 0.1, "eval_batches": 20},
    # batch_size None: the parent's
    "finetune": {**TRAIN_DEFAULTS, "steps": 500, "lr": 3e-4, "warmup_steps": 50,
                 "corpus": None, "unknown": "error", "freeze_layers": 0, "freeze_embeddings": False,
                 "batch_size": None, "val_fraction": 0.1, "eval_batches": 20},
    "instruct": {**TRAIN_DEFAULTS, "steps": 1000, "lr": 3e-4, "warmup_steps": 50,
                 "eval_every": 100, "data": "builtin:python-qa", "batch_size": 16},
    # DPO and RL: measured by benchmarks/preference_eval.py on a small char model.
    "dpo": {**TRAIN_DEFAULTS, "steps": 150, "lr": 1e-4, "warmup_steps": 10, "rankings": None,
            "beta": 0.5, "sft_weight": 1.0, "batch_size": 8, "val_fraction": 0.1},
    "rlhf": {**TRAIN_DEFAULTS, "steps": 100, "lr": 3e-4, "warmup_steps": 10,
             "log_every": 1,  # the mean reward and KL of every step in metrics.jsonl
             "prompts": None, "reward_model": None, "judge": None, "k": 4,
             "prompts_per_step": 4, "kl_coef": 1.0, "max_new_tokens": 32, "temperature": 1.0,
             "top_k": None, "val_fraction": 0.1},
    # The reward model fits its head with its own full-batch Adam, not lmlab.train.
    "reward": {"rankings": None, "val_fraction": 0.2, "steps": 300, "lr": 0.05, "l2": 1e-2,
               "seed": 1337},
}

# Stages whose runs are never resumed: the reward model fits its head in one go.
NOT_RESUMABLE = frozenset({"reward"})

# Settings that define the run's model, data and batches: a resume cannot change them.
FIXED_ON_RESUME = frozenset({
    "corpus", "data", "rankings", "prompts", "reward_model", "judge", "tokenizer", "vocab_size",
    "n_layer", "n_head", "n_embd", "block_size", "batch_size", "val_fraction", "eval_batches",
    "seed", "precision", "unknown", "freeze_layers", "freeze_embeddings", "k", "prompts_per_step",
})
# How this process shows progress: not a setting of the run.
_NOT_RECORDED = frozenset({"progress"})
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


# --- the result ---------------------------------------------------------------------------------

@dataclass
class StageResult(TrainResult):
    """What every stage returns: how training went (TrainResult's fields), the run, and the
    stage's own numbers."""
    stage: str = ""
    run_dir: str = ""
    details: dict = field(default_factory=dict)  # the stage's report (see each stage function)

    @classmethod
    def from_training(cls, stage: str, run_dir, result: TrainResult, **details) -> "StageResult":
        return cls(**asdict(result), stage=stage, run_dir=str(run_dir), details=details)

    def summary(self) -> str:
        status = "stopped early (Ctrl-C / SIGTERM)" if self.stopped_early else "finished"
        val = f", val loss {self.val_loss:.4f}" if self.val_loss is not None else ""
        speed = f", {self.tokens_per_s:,.0f} tokens/s" if self.tokens_per_s else ""
        return (f"{status}: {self.steps_done} steps in {self.seconds:.1f} s, "
                f"loss {self.final_loss:.4f}{val}{speed}; run in {self.run_dir}")


# --- opening a stage ----------------------------------------------------------------------------

@dataclass
class StageRun:
    """A stage being started: its settings and TrainConfig, and its output run directory (open
    and locked from hold() until close())."""
    name: str
    out: Path
    settings: dict  # every setting of the stage, resolved
    resume: bool
    overwrite: bool
    parent: Optional[Path]
    handle: object = None  # the open run directory (its lock), released by close()

    def hold(self):
        """The output run directory, open for writing and locked (an lmlab.rundir.RunDir: pass it
        to train()); with overwrite, the old run is set aside here (kept until the new run's
        first checkpoint) and what went is printed.
        Under MPI only rank 0 opens (and writes) it; the other ranks get its path."""
        if not distributed.world().is_root:
            return self.out
        if self.handle is None:
            self.handle = open_run_dir(self.out, resume=self.resume, overwrite=self.overwrite,
                                       resumable=self.name not in NOT_RESUMABLE,
                                       parent=self.parent)
            report_replaced(self.handle)
        return self.handle

    def train_config(self, **extra) -> TrainConfig:
        """The optimiser's config from the settings (extra: what the stage adds, e.g. frozen)."""
        cfg = TrainConfig(**{k: v for k, v in self.settings.items() if k in _TRAIN_FIELDS}, **extra)
        # Recorded as resolved (min_lr None -> lr/10), so a resume continues with the same values.
        self.settings.update({k: getattr(cfg, k) for k in self.settings if k in _TRAIN_FIELDS})
        return cfg

    def run_config(self, world_size: Optional[int] = None, **described) -> dict:
        """config.json's train section for this stage: the settings plus what the stage records.
        world_size: how many processes trained the run (default: every MPI rank; a stage whose
        training runs on one rank alone, as reward's fit, gives 1)."""
        recorded = {k: v for k, v in self.settings.items() if k not in _NOT_RECORDED}
        size = distributed.world().size if world_size is None else world_size
        return {"stage": self.name, "settings": recorded, "world_size": size, **described}

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def __enter__(self) -> "StageRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_given(stage: str, given: dict) -> dict:
    """The values a caller gave (None = not given), each checked; an unknown name is refused
    (checks.UnknownSettingError, a TypeError and a ValueError)."""
    checks.refuse_unknown(stage, given, STAGE_DEFAULTS[stage])
    given = {k: v for k, v in given.items() if v is not None}
    for name, value in given.items():
        if name in checks.RULES:
            checks.check(name, value)
            if checks.RULES[name].kind is os.PathLike:
                given[name] = os.fspath(value)  # recorded and compared as config.json holds it
    return given


def saved_settings(stage: str, train: dict) -> dict:
    """A run's settings from config.json's train section; runs written before settings were
    recorded as one dict keep them in the optimiser section and beside it."""
    if isinstance(train.get("settings"), dict):
        return dict(train["settings"])
    table = STAGE_DEFAULTS[stage]
    found = {}
    for section in (train.get("model") or {}, train, train.get("optim") or {}):
        found.update({k: v for k, v in section.items() if k in table and k not in _NOT_RECORDED})
    return found


def _merge_for_resume(stage: str, saved: dict, given: dict, steps_done) -> tuple:
    """(settings, changes): the settings a resumed run trains with, its own with the given ones
    that may change, and a line for each change, said once every check has passed (a refused
    resume reports only why)."""
    settings = {**STAGE_DEFAULTS[stage], **saved}
    changed = []
    for name, value in given.items():
        if name in _NOT_RECORDED or name not in saved or saved[name] == value:
            settings[name] = value
            continue
        if name in FIXED_ON_RESUME:
            raise checks.SettingError(name, value, f"the run was set up with {saved[name]!r}, and "
                                      "a resumed run keeps its model, data and batches; start a "
                                      "new run (or fine-tune into one) to change it")
        changed.append(f"{name} changed from {saved[name]!r} to {value!r}")
        settings[name] = value
    steps = settings.get("steps")
    if isinstance(steps_done, int) and isinstance(steps, int) and steps < steps_done:
        raise checks.SettingError("steps", steps, f"the run has already trained {steps_done} "
                                  f"steps, and a resumed run trains up to steps: give at least "
                                  f"{steps_done}")
    return settings, changed


def _grad_accum_for(train: dict, saved_accum: int) -> int:
    """Each rank's grad_accum that keeps a resumed run's global batch when it was trained on
    another number of MPI ranks (grad_accum counts one rank's micro-batches)."""
    saved_size, size = int(train.get("world_size", 1)), distributed.world().size
    if saved_size == size:
        return saved_accum
    total = saved_accum * saved_size
    if total % size:
        raise checks.SettingError("grad_accum", saved_accum, f"the run took {total} micro-batches a "
                                  f"step on {saved_size} process(es), which {size} processes cannot "
                                  "share equally; resume it on a number of processes that divides "
                                  f"{total}, or give --grad-accum to change its batch")
    if distributed.world().is_root:
        print(f"lmlab: the run was trained on {saved_size} process(es), now {size}: grad_accum "
              f"{saved_accum} -> {total // size}, so each step takes the same {total} "
              "micro-batches", file=sys.stderr)
    return total // size


def _check_made_by(stage: str, out: Path, made_by) -> None:
    """A run is resumed only by the stage that made it: another would train it as something else
    (pretrain would thaw a fine-tune's frozen layers and drop its parent) or fail on its state."""
    if not isinstance(made_by, str) or made_by == stage:
        return  # runs written before the stage was recorded say nothing
    if made_by == "import":
        how = ("it holds a checkpoint imported from Hugging Face, which has no training to "
               "continue; tune it into a new run instead (lmlab finetune or instruct --out NEW)")
    elif made_by == "reward":
        how = ("it holds a reward model, whose head is fitted in one go and is never resumed; "
               "train it again with lmlab reward --overwrite")
    else:
        how = f"it holds a run made by lmlab {made_by}: resume it with lmlab {made_by} --resume"
    raise RunDirError(f"{stage} cannot resume {out}: {how}")


def _check_same_parent(stage: str, out: Path, parent, recorded) -> None:
    """A resumed run continues from the run it started from: another parent would hand it that
    run's tokenizer (ids of other characters, if as many) and the report that run's "before",
    and config.json would name it. Checked while the recorded parent is still there; one moved
    since cannot be compared, and the one given is taken."""
    if parent is None or not isinstance(recorded, str) or not os.path.exists(recorded):
        return
    try:
        same = os.path.samefile(parent, recorded)
    except OSError:
        same = False  # the given parent is not there
    if not same:
        raise RunDirError(f"{stage} cannot resume {out} from {parent}: it was started from "
                          f"{recorded}, and a resumed run continues from the run it started "
                          f"from; name {recorded}, or tune {parent} into a new run")


def open_stage(stage: str, out, given: dict, *, resume: bool = False, overwrite: bool = False,
               parent=None, threads: Optional[int] = None) -> StageRun:
    """Check, open and configure a stage's run (module docstring); close it when done."""
    checks.check_values(resume=resume, overwrite=overwrite)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or replace it")
    given = check_given(stage, given)
    checks.check("threads", threads)
    out = run_path(out)
    parent = Path(parent) if parent is not None else None
    if resume and given.get("precision") == "auto":
        del given["precision"]  # auto on resume: the run's own
    settings = {**STAGE_DEFAULTS[stage], **given}
    if "precision" in settings:
        # The one place a precision is resolved ("auto": what this CPU runs fastest); recorded
        # by name, as config.json stores it.
        settings["precision"] = ops.precision_name(ops.resolve_precision(settings["precision"]))
        if "precision" in given:
            given["precision"] = settings["precision"]
    if not resume:
        checks.check_relations(settings, given)
    # The run directory is opened (locked, and with overwrite emptied) only by hold(), once the
    # stage has loaded and checked its data, so a stage refused for any reason leaves no trace.
    # The common refusals come first, before any work, once a run an interrupted overwrite was
    # replacing is back in place:
    world = distributed.world()
    if world.is_root:
        settle_overwrite(out)
    # The other ranks look at `out` (is it a run? its config.json) only once rank 0 has put back
    # what an interrupted overwrite set aside: before, they saw no run to resume, or the new run's
    # files. A rank 0 that fails here ends them (MPI_Abort) in the barrier.
    world.barrier()
    # Without a shared file system each machine reads its own copy of the run to resume and of
    # the parent run: a machine that lacks one is named here, rather than by that rank's "no run
    # to resume" or "not found" (what the copies hold is compared once loaded: lmlab.train).
    seen = {"run directory": (out, resume), "parent run": (parent, parent is not None)}
    for what, (path, needed) in seen.items():
        if needed:
            world.check_same("run", {what: "a run" if is_run(path) else "no run"},
                             {what: f"the {what} {path}"})
    if resume and not is_run(out):
        raise RunDirError(f"there is no run to resume in {out}; start it without --resume")
    # A new run is rank 0's to write, so what its machine holds decides: without a shared file
    # system a stale run at the same path on another machine is no one's concern.
    if not resume and not overwrite and world.bcast(is_run(out) if world.is_root else None):
        resumable = "--resume to continue it, " if stage not in NOT_RESUMABLE else ""
        raise RunDirError(f"{out} already holds a run; pass {resumable}--overwrite to replace "
                          "it, or choose another directory")
    if resume:
        config = read_config(out)
        _check_made_by(stage, out, (config.get("train") or {}).get("stage"))
        _check_same_parent(stage, out, parent, config.get("parent"))
        saved = saved_settings(stage, config.get("train") or {})
        if "precision" in settings:
            saved["precision"] = saved_precision(config)
        steps_done = (config.get("checkpoint") or {}).get("step")
        settings, changed = _merge_for_resume(stage, saved, given, steps_done)
        if "grad_accum" in settings and "grad_accum" not in given:
            settings["grad_accum"] = _grad_accum_for(config.get("train") or {}, settings["grad_accum"])
        checks.check_relations(settings, given)
        if world.is_root:  # every rank merges the same settings; one says so
            for line in changed:
                print(f"lmlab: {line}", file=sys.stderr)
    if given.get("zero") and not world.distributed:
        # Not refused: one process holding the whole state is ZeRO-1 on one rank, the same run
        # bit for bit, and the recorded setting shards it when the run resumes under mpiexec.
        print("lmlab: note: zero 1 shards the AdamW state across MPI ranks (mpiexec -n N); this "
              "run is one process, which keeps the whole state (the same run as zero 0)",
              file=sys.stderr)
    if threads:  # checked above; the kernels use it from here on (recorded in config.json)
        ops.set_num_threads(threads)
    return StageRun(stage, out, settings, resume, overwrite, parent)
