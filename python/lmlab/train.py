"""The optimisation loop shared by every training stage.

A stage (pretraining, fine-tuning, instruct tuning, DPO, RL) supplies only its batches and the
per-token loss weights it puts on them; this module owns everything else: AdamW over the flat
parameter buffer, the learning-rate schedule, gradient accumulation and clipping, validation,
progress display, metrics, checkpoints, exact resume, Ctrl-C and NaN handling.

The stage contract (duck-typed, see `Stage`):
    stage.train_step(model) -> dict          draws one micro-batch and runs its forward (the model's
                                             last forward is the one backward differentiates);
                                             returns "loss", "tokens" (tokens processed) and
                                             "weights": the (B, T) weight of each token's loss in
                                             the stage's objective, sum(weights * losses); any other
                                             numbers (a reward, a KL, a margin) are averaged over
                                             the micro-batches and logged with the step
    stage.evaluate(model) -> dict            validation metrics, at least {"val_loss": ...}; every
                                             number in it is logged
    stage.state_dict() / load_state_dict(d)  the data position and RNG state, JSON-serialisable
    stage.skip_step()                        (for several MPI ranks) moves the data position past
                                             one micro-batch exactly as train_step would, without
                                             computing it: another rank computes that one
    stage.data_fingerprint() -> str          (optional) a hash of the training data, which the
                                             ranks of an MPI run compare before training, and
                                             which each checkpoint keeps, so that a resume on
                                             data changed since is noted
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
from tqdm.auto import tqdm

from . import checkpoint, checks, distributed, metrics, ops, threads
from .errors import CheckpointError
from .rundir import RunDir, open_run_dir


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: float = 1e-3
    min_lr: Optional[float] = None  # end of the cosine decay; default lr / 10
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables
    grad_accum: int = 1  # micro-batches per optimiser step
    eval_every: int = 250  # validation every N steps (and at the end); 0 disables
    save_every: int = 500  # checkpoint every N steps (and at the end); 0 = only at the end
    log_every: int = 10  # metrics.jsonl row every N steps
    keep_checkpoints: int = 5  # checkpoints/step_N/ kept, newest first (the current always); 0 = all
    seed: int = 1337
    progress: bool = True  # the progress bar
    frozen: list = field(default_factory=list)  # parameter-name prefixes left untouched
    # Matmul precision, "fp32" or "bf16" (bfloat16 operands, fp32 accumulation; see
    # GPT.matmul_precision). A resumed run keeps the precision it was started in.
    precision: str = "fp32"
    # Under MPI (lmlab.distributed): 1 shards the AdamW moments across the ranks (ZeRO-1); the
    # same updates as 0, with optimiser memory 1/N per rank. grad_accum counts each rank's
    # micro-batches, so a step takes grad_accum * ranks of them.
    zero: int = 0

    def __post_init__(self) -> None:
        # The same rules as the command line's flags (lmlab.checks), so the Python API refuses
        # what `lmlab` refuses.
        for f in fields(self):
            if f.name in checks.RULES and f.name != "precision":
                checks.check(f.name, getattr(self, f.name))
        checks.check_relations({"lr": self.lr, "min_lr": self.min_lr})
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        # Stored by name ("fp32"/"bf16", as config.json records it); a Precision is accepted.
        self.precision = ops.precision_name(self.precision)


def run_precision(cfg: TrainConfig, run_dir, resume: bool) -> str:
    """The matmul precision a run trains in: cfg.precision, or when resuming the run's own.

    Resuming continues the saved run exactly, so its precision wins; asking for another one gets
    a note on stderr (to change precision, fine-tune into a new run instead).
    """
    if not resume:
        return cfg.precision
    saved = checkpoint.saved_precision(checkpoint.read_config(run_dir))
    if saved != cfg.precision:
        print(f"lmlab: {run_dir} was trained with {saved} matmuls; resuming in {saved} (not "
              f"{cfg.precision}): a resumed run keeps its precision", file=sys.stderr)
    return saved


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate for optimiser step `step` (0-based)."""
    # 1) linear warmup from lr/warmup to lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    # 2) past the end of the schedule, hold the minimum
    if step >= cfg.steps:
        return cfg.min_lr
    # 3) cosine decay from lr to min_lr over the remaining steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


class Stage(Protocol):
    def train_step(self, model) -> dict: ...
    def evaluate(self, model) -> dict: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, d: dict) -> None: ...


class AdamW:
    """AdamW over the model's flat parameter buffer (decoupled weight decay on decay_mask).

    It updates only the spans of the buffer the model's trainable_ranges() names, so frozen
    parameters (model.freeze) are moved neither by their moments nor by weight decay.
    shard=(start, stop): ZeRO-1, the moments of that span of the buffer only, and step() updates
    only it, from that span's gradient; state() gathers the full moments onto rank 0.
    """

    def __init__(self, model, cfg: TrainConfig, shard=None, world=None):
        self.model = model
        self.cfg = cfg
        self.world = world or distributed.World()
        self.n = model.params.size
        self.lo, self.hi = shard if shard is not None else (0, self.n)
        # Every rank of a ZeRO-1 run takes the sharded exchange, rank 0 too when its shard is the
        # whole buffer (a model of at most one shard's size: the other ranks' shards are empty).
        self.sharded = shard is not None
        self.m = np.zeros(self.hi - self.lo, np.float32)
        self.v = np.zeros(self.hi - self.lo, np.float32)
        self.t = 0
        self.ranges = [(max(a, self.lo), min(b, self.hi)) for a, b in model.trainable_ranges()
                       if max(a, self.lo) < min(b, self.hi)]

    def step(self, lr: float, grad_scale: float, grads=None) -> None:
        """One update; grads: the gradient of this optimiser's span (default the model's)."""
        self.t += 1
        p, mask, lo = self.model.params, self.model.decay_mask, self.lo
        g = grads if grads is not None else self.model.grads[lo:self.hi]
        for start, stop in self.ranges:
            ops.adamw_update(p[start:stop], self.m[start - lo:stop - lo], self.v[start - lo:stop - lo],
                             g[start - lo:stop - lo], mask[start:stop], lr=lr,
                             beta1=self.cfg.beta1, beta2=self.cfg.beta2, eps=self.cfg.eps,
                             weight_decay=self.cfg.weight_decay, grad_scale=grad_scale, t=self.t)

    def state(self) -> dict:
        """The full moments (on rank 0; a collective call when sharded, None on other ranks)."""
        if not self.sharded:
            return {"m": self.m, "v": self.v}
        return {"m": self.world.gather_to_root(self.m, self.n),
                "v": self.world.gather_to_root(self.v, self.n)}

    def load_state(self, arrays: dict, t: int) -> None:
        """From the full moments of a checkpoint (whatever the number of ranks that wrote it)."""
        if arrays["m"].shape != (self.n,) or arrays["v"].shape != (self.n,):
            raise ValueError("optimizer state does not match the model's parameter count "
                             f"({arrays['m'].shape} vs {(self.n,)})")
        self.m[...] = arrays["m"][self.lo:self.hi]
        self.v[...] = arrays["v"][self.lo:self.hi]
        self.t = t


class _StopRequest:
    """Ctrl-C during training: the first asks to stop after the current step, with a checkpoint;
    a second interrupts at once (KeyboardInterrupt; the last checkpoint on disk stays current).
    During a save (`with stop.saving():`) the first Ctrl-C waits for the save to finish, and says
    so; another during the same save forces the exit, which still leaves the previous checkpoint
    current (a checkpoint becomes current in one atomic step, see checkpoint.py). SIGTERM, which
    process managers, batch schedulers and `docker stop` send before they kill, counts as a
    Ctrl-C. announce=False keeps it quiet: under mpiexec, which passes Ctrl-C on to every rank,
    rank 0 alone says what happens (every rank printed the same lines)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True, saves=lambda: True) -> None:
        self.announce = announce
        self.saves = saves  # whether stopping now saves a checkpoint (see _optimise)
        self.requested = False
        self._saving = False
        self._presses_while_saving = 0
        self._previous = {}

    def __enter__(self) -> "_StopRequest":
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave the signals alone
            self._previous = {}
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGTERM and not self.requested and self.announce:
            print("\nlmlab: asked to stop (SIGTERM)", file=sys.stderr, flush=True)
        if self._saving:
            self.requested = True
            self._presses_while_saving += 1
            if self._presses_while_saving >= 2:
                print("\nlmlab: forcing an exit; the save in progress is abandoned and the previous "
                      "checkpoint stays current", file=sys.stderr, flush=True)
                raise KeyboardInterrupt
            print("\nlmlab: saving a checkpoint; the run stops when it is written (Ctrl-C again "
                  "abandons this save, keeping the previous checkpoint)", file=sys.stderr, flush=True)
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            what = ("saving a checkpoint" if self.saves() else "putting back the run --overwrite "
                    "is replacing (the new run has saved no checkpoint yet)")
            print(f"\nlmlab: stopping after this step and {what} (Ctrl-C again to abort)",
                  file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def saving(self):
        self._saving, self._presses_while_saving = True, 0
        try:
            yield
        finally:
            self._saving = False

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class NonFiniteLoss(RuntimeError):
    """Raised when a step's loss or gradient norm is NaN or infinite."""


@dataclass
class TrainResult:
    steps_done: int
    final_loss: float
    val_loss: Optional[float]
    stopped_early: bool  # Ctrl-C
    seconds: float
    tokens_per_s: float


def train(model, stage, cfg: TrainConfig, run_dir, *, tokenizer, run_config: Optional[dict] = None,
          resume: bool = False, parent: Optional[str] = None) -> TrainResult:
    """Run the optimisation loop, writing checkpoints and metrics into run_dir.

    run_dir: an open rundir.RunDir, or a path, which is opened here with rundir.open_run_dir (so an
    existing run needs resume=True, and the run is locked while training).
    run_config is stored in config.json beside the model config (what data, which stage, ...).
    With resume=True the model, optimiser, step, RNG and data position are restored from run_dir,
    so the run continues exactly as if it had never stopped, in the matmul precision the run was
    started in (which wins over cfg.precision, with a note, if they differ). A resume that runs no
    step writes nothing.

    Under MPI (lmlab.distributed) every rank calls train(): rank 0 alone opens and writes run_dir,
    the others read it (on resume) and never write.
    """
    world = distributed.world()
    if isinstance(run_dir, RunDir) or not world.is_root:
        return _train(model, stage, cfg, run_dir, tokenizer=tokenizer, run_config=run_config,
                      resume=resume, parent=parent, world=world)
    with open_run_dir(run_dir, resume=resume, parent=parent) as run:
        return _train(model, stage, cfg, run, tokenizer=tokenizer, run_config=run_config,
                      resume=resume, parent=parent, world=world)


def _train(model, stage, cfg: TrainConfig, run_dir, *, tokenizer, run_config, resume,
           parent, world) -> TrainResult:
    try:
        return _optimise(model, stage, cfg, run_dir, tokenizer=tokenizer, run_config=run_config,
                         resume=resume, parent=parent, world=world)
    except (NonFiniteLoss, distributed.RanksDifferError):
        # Every rank sees the same loss and stops at the same step, or raises the same refusal
        # from the same exchange: none waits for another, nothing to abort (the command line
        # says it once, as it says any error).
        raise
    except BaseException as exc:
        if world.distributed:  # the other ranks wait in a collective: end them (checkpoints are atomic)
            world.abort(distributed.describe_failure(exc), 2 if isinstance(exc, ValueError) else 1)
        raise


def _optimise(model, stage, cfg: TrainConfig, run_dir, *, tokenizer, run_config, resume,
              parent, world) -> TrainResult:
    writer = world.is_root  # the one rank that prints, logs and saves
    # An --overwrite keeps the run it replaces until this run's first checkpoint (lmlab.rundir). A
    # stop asked before then (Ctrl-C, SIGTERM: often a user who sees they overwrote the wrong run)
    # saves none, so the replaced run comes back rather than giving way to a few steps of this one.
    replacing = bool(getattr(run_dir, "replaced", ())) if writer else False
    if world.distributed:
        replacing = world.bcast(replacing)
    run_dir = Path(run_dir)
    cfg = replace(cfg, precision=run_precision(cfg, run_dir, resume))
    model.matmul_precision = cfg.precision
    model.freeze(cfg.frozen)
    if world.distributed and not hasattr(stage, "skip_step"):
        raise ValueError(f"{type(stage).__name__} cannot train on several processes (it has no "
                         "skip_step to step over the other ranks' micro-batches)")
    shard = world.shards(model.params.size)[world.rank] if cfg.zero and world.distributed else None
    optimizer = AdamW(model, cfg, shard=shard, world=world)
    # A hash of the training data (stage.data_fingerprint, where the stage has one), kept with each
    # checkpoint, so that a resume on data edited since can say so.
    data_fingerprint = stage.data_fingerprint() if hasattr(stage, "data_fingerprint") else None
    start_step = 0
    if resume:
        arrays, state = checkpoint.load_training_state(run_dir)
        checkpoint.load_weights(run_dir, model)     # into this model: it is the one that trains
        try:
            start_step = int(state["step"])
            optimizer.load_state(arrays, int(state["adam_t"]))
            stage.load_state_dict(state["stage"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            # A state.json edited by hand (new checkpoints are checksummed; flat-layout ones are not).
            raise CheckpointError(f"{checkpoint.current_checkpoint(run_dir) / 'state.json'} does not "
                                  f"hold this stage's trainer state ({type(e).__name__}: {e}); "
                                  "cannot resume exactly") from None
        trained_on = state.get("data") if isinstance(state, dict) else None
        if writer and trained_on is not None and data_fingerprint not in (None, trained_on):
            print(f"lmlab: note: the training data is not what {run_dir} was trained on up to step "
                  f"{start_step} (a file it reads has changed since); the run continues on the data "
                  "as it is now, so not as it would have without the change", file=sys.stderr)
        # Rows logged after the checkpoint are logged again by the resumed run.
        if writer:
            metrics.truncate_metrics(run_dir, start_step)
        if start_step >= cfg.steps and writer:
            print(f"lmlab: {run_dir} already finished {start_step} of {cfg.steps} steps",
                  file=sys.stderr)
    if world.distributed:
        # Every rank must train the same model on the same data with the same kernels and settings;
        # one that differs is named with where it came from (_sources).
        settings = {**_jsonable(asdict(cfg)), **((run_config or {}).get("settings") or {})}
        world.check_same("run", {**distributed.environment(),
                                 **{f"setting {k}": v for k, v in settings.items()
                                    if k not in _OWN_TO_EACH_RANK},
                                 "data": data_fingerprint,
                                 "parameters": distributed.fingerprint(model.params),
                                 "data position": json.dumps(stage.state_dict(), sort_keys=True)},
                         _sources(run_dir, resume, parent, settings))
    if writer and start_step < cfg.steps < cfg.warmup_steps:
        print(f"lmlab: note: steps {cfg.steps} < warmup_steps {cfg.warmup_steps}: the learning "
              f"rate warms up only to {lr_at(cfg.steps - 1, cfg):.3g}, never reaching lr "
              f"{cfg.lr:g}", file=sys.stderr)
    # config.json's "train" section: how this run was trained (optimiser settings and the stage's
    # own description: corpus, data, batch size, chat template, ...).
    full_config = {"optim": _jsonable(asdict(cfg)), "precision": cfg.precision,
                   **(run_config or {})}

    last_saved = start_step if resume else None

    def save(step: int) -> None:
        nonlocal last_saved
        if step == last_saved:
            return  # nothing changed since that checkpoint
        state = {"step": step, "adam_t": optimizer.t, "stage": stage.state_dict()}
        if data_fingerprint is not None:
            state["data"] = data_fingerprint
        moments = optimizer.state()  # every rank: with ZeRO-1 a gather onto rank 0
        if writer:
            with stop.saving():
                checkpoint.save_run(run_dir, model, tokenizer, train_config=full_config,
                                    optimizer=moments, state=state, parent=parent,
                                    keep=cfg.keep_checkpoints)
        last_saved = step

    bar = None
    if cfg.progress and writer:
        bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    t_start = time.perf_counter()
    tokens_total = 0
    # A resumed run reports the losses logged up to its checkpoint until it logs new ones (a run
    # already finished logs none).
    loss, val_loss = _last_logged_losses(run_dir) if resume else (float("nan"), None)
    step = start_step
    stopped = False
    window_t, window_tokens = time.perf_counter(), 0
    window_steps, window_comm = 0, world.comm_seconds
    def stop_saves() -> bool:
        return not (replacing and last_saved is None)

    def say_threads(*change) -> None:
        line = f"lmlab: step {step + 1}: {threads.describe_change(*change)}"
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    # The thread count adapts to how busy the cores are, unless the user chose it (lmlab.threads).
    tuner = threads.ThreadTuner(ops.get_num_threads(), adapt=not ops.thread_count_chosen(),
                                report=say_threads if writer else None)
    with _StopRequest(announce=writer, saves=stop_saves) as stop:
        try:
            while step < cfg.steps:
                # 1) gradients of one optimiser step, accumulated over micro-batches (each rank
                # computes its own contiguous share of them and steps over the others')
                work_started = time.perf_counter()
                mine = _micro_batches(model, stage, cfg, world)
                work_seconds = time.perf_counter() - work_started
                shared = world.allgather((mine, stop.requested))
                losses = [x for (m, _) in shared for x in m["losses"]]
                tokens = sum(m["tokens"] for (m, _) in shared)
                extras = {}
                for (m, _) in shared:
                    for key, values in m["extras"].items():
                        extras.setdefault(key, []).extend(values)
                # Under MPI every rank stops after this step if any rank was asked to by now (a
                # request arriving later is shared at the next step); one process checks at the end.
                stop_all = any(flag for (_, flag) in shared)
                loss = float(np.mean(losses))
                extras = {key: float(np.mean(values)) for key, values in extras.items()}
                if optimizer.sharded:
                    grads = world.reduce_scatter_sum(model.grads)
                    grad_norm = world.global_norm(grads)
                else:
                    grads = None
                    world.reduce_gradients(model.grads)
                    grad_norm = ops.global_norm(model.grads)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    kept = (f"the last good checkpoint in {run_dir} is kept" if last_saved is not None
                            else "it had saved no checkpoint yet")
                    raise NonFiniteLoss(
                        f"step {step}: loss {loss}, gradient norm {grad_norm}. Training stopped; "
                        f"{kept}. Try a lower learning rate (now {cfg.lr}) or stronger clipping "
                        f"(grad_clip {cfg.grad_clip}).")
                # 2) clip and update
                scale = 1.0
                if cfg.grad_clip > 0 and grad_norm > cfg.grad_clip:
                    scale = cfg.grad_clip / (grad_norm + 1e-6)
                lr = lr_at(step, cfg)
                work_started = time.perf_counter()
                optimizer.step(lr, scale, grads)
                tuner.record(work_seconds + time.perf_counter() - work_started)
                if optimizer.sharded:
                    world.allgather_shards(model.params)
                step += 1
                tokens_total += tokens
                window_tokens += tokens
                window_steps += 1
                # 3) validation, metrics, progress, checkpoints
                evaluation = {}
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    evaluation = world.bcast(_numbers(stage.evaluate(model)) if writer else None)
                    val_loss = evaluation["val_loss"]
                if writer and (step % max(1, cfg.log_every) == 0 or step == cfg.steps
                               or evaluation):
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_t, 1e-9)
                    window_t, window_tokens = now, 0
                    row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": tps, "threads": ops.get_num_threads(), **extras,
                           **evaluation}
                    if world.distributed:  # rank 0's time in the gradient exchange, per step
                        row["allreduce_ms"] = 1e3 * (world.comm_seconds - window_comm) / window_steps
                    window_steps, window_comm = 0, world.comm_seconds
                    metrics.append_metrics(run_dir, row)
                    if bar is not None:
                        post = {"loss": f"{loss:.4f}", "tok/s": f"{tps:,.0f}"}
                        if val_loss is not None:
                            post["val"] = f"{val_loss:.4f}"
                        bar.set_postfix(post, refresh=False)
                if bar is not None:
                    bar.update(1)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    save(step)
                if stop_all if world.distributed else stop.requested:
                    stopped = True
                    break
        finally:
            tuner.restore()
            if bar is not None:
                bar.close()
        keep_replaced = stopped and not stop_saves()
        if not keep_replaced:
            save(step)
    if step > start_step and writer and not keep_replaced:
        _plot(run_dir)
    seconds = time.perf_counter() - t_start
    return TrainResult(steps_done=step, final_loss=loss, val_loss=val_loss, stopped_early=stopped,
                       seconds=seconds, tokens_per_s=tokens_total / max(seconds, 1e-9))


def _micro_batches(model, stage, cfg: TrainConfig, world) -> dict:
    """This rank's micro-batches of one optimiser step, their gradients left in model.grads.

    A step takes grad_accum * world.size micro-batches in the stage's order; rank r computes the
    r-th contiguous grad_accum of them and steps over the rest (stage.skip_step), so N ranks take
    exactly the batches of one process with N times the grad_accum. Each micro-batch's gradient is
    computed from zero and added to the sum in order, in float32 (the sum the ranks' gradients
    then get, in rank order: see lmlab.distributed).
    """
    total = cfg.grad_accum * world.size
    first = world.rank * cfg.grad_accum
    weight = np.float32(1.0 / total)  # the gradients sum to the micro-batches' mean
    losses, tokens, extras = [], 0, {}
    summed = None
    model.zero_grad()
    for i in range(total):
        if not first <= i < first + cfg.grad_accum:
            stage.skip_step()
            continue
        out = stage.train_step(model)
        if summed is not None:
            model.zero_grad()
        model.backward(out["weights"] * weight)
        if cfg.grad_accum > 1:
            if summed is None:
                summed = model.grads.copy()
            else:
                summed += model.grads
        losses.append(float(out["loss"]))
        tokens += int(out["tokens"])
        for key, value in _numbers(out, skip=("loss", "tokens")).items():
            extras.setdefault(key, []).append(value)
    if summed is not None:
        model.grads[...] = summed
    return {"losses": losses, "tokens": tokens, "extras": extras}


def _plot(run_dir: Path) -> None:
    try:
        metrics.plot_loss(run_dir)
    except Exception as exc:  # a plot is a convenience; never lose a finished run over it
        print(f"lmlab: could not draw loss.png ({exc})", file=sys.stderr)


def _last_logged_losses(run_dir) -> tuple:
    """(loss, val_loss) of the last rows of a run's metrics.jsonl that hold them (nan and None
    where none does, or the file cannot be read)."""
    loss, val_loss = float("nan"), None
    try:
        rows = metrics.read_metrics(run_dir)
    except CheckpointError:
        return loss, val_loss
    for row in rows:
        if not isinstance(row, dict):
            continue  # a line edited by hand; truncate_metrics tolerates them too
        if isinstance(row.get("loss"), (int, float)):
            loss = float(row["loss"])
        if isinstance(row.get("val_loss"), (int, float)):
            val_loss = float(row["val_loss"])
    return loss, val_loss


def _numbers(d: dict, skip=()) -> dict:
    """The finite-or-not real numbers of a stage's result (booleans and other values dropped)."""
    return {k: float(v) for k, v in d.items()
            if k not in skip and isinstance(v, (int, float, np.integer, np.floating))
            and not isinstance(v, (bool, np.bool_))}


# Settings that may differ between the ranks of one run: how each shows its progress.
_OWN_TO_EACH_RANK = frozenset({"progress"})
# The settings that name a stage's training data.
_DATA_SETTINGS = ("corpus", "data", "rankings", "prompts")


def _sources(run_dir, resume: bool, parent, settings: dict) -> dict:
    """For World.check_same: where each value the ranks compare before training comes from, so
    that one that differs names what must be the same on every machine. A resumed run's settings,
    weights and data position come from its run directory; a new run's weights (and the tokenizer
    its data is read with) from its parent run, or else from the arguments and the data."""
    data = ", ".join(f"{k} {settings[k]}" for k in _DATA_SETTINGS if settings.get(k))
    data = f"the training data ({data})" if data else "the training data"
    given = "the arguments every rank is started with"
    if resume:
        run = f"the run directory {run_dir}"
        settings_from, weights_from = f"{run} (its config.json)", f"{run} (its checkpoint)"
        data = f"{data} and {run} (its tokenizer)"
        position_from = weights_from
    elif parent is not None:
        settings_from = f"{given} and the parent run {parent}"
        weights_from = f"the parent run {parent}"
        data = f"{data} and the parent run {parent} (its tokenizer)"
        position_from = given
    else:
        settings_from = position_from = given
        weights_from = f"{given} and {data} (a tokenizer trained on it sets the vocabulary)"
    return {**{f"setting {k}": settings_from for k in settings}, "data": data,
            "parameters": weights_from, "data position": position_from}


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))
