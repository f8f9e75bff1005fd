"""`demo training`: a run's train/validation loss and learning rate from metrics.jsonl, and one
sample (same prompt, same seed) from each checkpoint under checkpoints/step_*/ and the final model,
so a class sees the text improve as the loss falls. A run that kept more checkpoints than a
picture can show (MAX_SAMPLED) is sampled at that many, spread evenly from its first checkpoint to
its final model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .checkpoint import current_checkpoint, list_checkpoints, read_config
from .demo_common import (DemoResult, check_int, clip_text, format_table, new_figure, out_dir, save_png,
                          write_text)
from .demo_model import prompt_ids, resolve_model
from .metrics import read_metrics_file
from .sample import generate

# What a stage logs as "loss" where it is not the next-token cross-entropy (pretrain, finetune and
# instruct log that): the y axis says which quantity is drawn.
LOSS_LABELS = {
    "dpo": "loss (the DPO objective on ranked pairs)",
    "rlhf": "loss = \u2212(reward \u2212 kl_coef\u00b7KL)",
    "reward": "loss (Bradley\u2013Terry on ranked pairs)",
}

# Most checkpoints sampled: each is a line of the picture and a model loaded and run (a run saved
# every step with --keep-checkpoints 0 holds thousands: a picture metres tall, or none at all).
MAX_SAMPLED = 12


def spread(items: list, most: int) -> list:
    """At most `most` of `items`, evenly spread from the first to the last (both kept)."""
    if len(items) <= most:
        return list(items)
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, most).round().astype(int).tolist()))]


def run_stage(run_dir) -> str | None:
    """The stage that made a run (config.json's train.stage), None when it is not recorded."""
    try:
        train = read_config(run_dir).get("train")
    except (OSError, ValueError):
        return None
    return train.get("stage") if isinstance(train, dict) else None


def read_metrics_rows(path) -> list[dict]:
    """Rows of a metrics.jsonl file (metrics.read_metrics_file), each with a step and a loss."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}: train a run first (lmlab pretrain ...)")
    rows = read_metrics_file(path)
    for lineno, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "step" not in row or "loss" not in row:
            raise ValueError(f"{path}: row {lineno} needs at least 'step' and 'loss', got {row!r:.80}")
    if not rows:
        raise ValueError(f"{path} holds no metrics rows yet")
    return rows


def _current(run_dir):
    try:
        return current_checkpoint(run_dir)
    except (OSError, ValueError):
        return None


def find_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, directory) of each checkpoints/step_N/ of a run but the current one (the final
    model), in step order."""
    current = _current(run_dir)
    return [(step, d) for step, d in list_checkpoints(run_dir) if d != current]


def final_step(run_dir, last_logged: int) -> int:
    """The step of the model a run holds now: its current checkpoint's, which is ahead of the last
    logged row when training stopped between rows (Ctrl-C at step 137, rows every 5) and behind it
    when a kill came between a row and its checkpoint; the last logged step for a model saved
    without one (step 0)."""
    current = _current(run_dir)
    step = next((s for s, d in list_checkpoints(run_dir) if d == current), 0)
    return step if step > 0 else last_logged


def training(source, out, *, metrics=None, prompt: str = "", max_new_tokens: int = 60, seed: int = 0) -> DemoResult:
    """Loss curves and learning rate of a run, and one sample (same prompt, same seed) per checkpoint.

    source: a run directory (its metrics.jsonl, checkpoints/step_*/ and final model are used), or a
    (model, tokenizer) pair with `metrics` naming a metrics.jsonl file (then only that model samples).
    """
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    seed = check_int("seed", seed, 0)
    out = out_dir(out)
    if isinstance(source, (str, os.PathLike)):
        run_dir = Path(source)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"run directory not found: {run_dir}")
        rows = read_metrics_rows(metrics if metrics is not None else run_dir / "metrics.jsonl")
        stages = [(step, d) for step, d in find_checkpoints(run_dir)]
        final = (final_step(run_dir, int(rows[-1]["step"])), run_dir)
        made_by = run_stage(run_dir)
        if not stages or stages[-1][0] < final[0]:
            stages.append(final)
        kept = len(stages)
        stages = spread(stages, MAX_SAMPLED)
    else:
        if metrics is None:
            raise ValueError("training with a (model, tokenizer) pair needs metrics= a metrics.jsonl path")
        rows = read_metrics_rows(metrics)
        stages = [(int(rows[-1]["step"]), resolve_model(source))]
        made_by = None
        kept = 1

    samples = []
    for step, where in stages:
        model, tokenizer = resolve_model(where)
        ids = prompt_ids(tokenizer, prompt)
        text = tokenizer.decode(generate(model, ids, max_new_tokens, temperature=1.0, seed=seed))
        samples.append({"step": step, "source": str(where) if not isinstance(where, tuple) else "model", "text": text})

    steps = np.array([r["step"] for r in rows], np.int64)
    train_loss = np.array([r["loss"] for r in rows], np.float64)
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    lr_rows = [(r["step"], r["lr"]) for r in rows if r.get("lr") is not None]

    fig = new_figure(11, 4.6 + 0.4 * len(samples))
    ax, ax_text = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3.6, 0.4 + 0.4 * len(samples)]})
    ax.plot(steps, train_loss, color="tab:blue", lw=1.4, label="training loss")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", ms=4, lw=1.4, label="validation loss (held-out text)")
    for step, _ in stages:
        ax.axvline(step, color="0.6", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(LOSS_LABELS.get(made_by, "loss (cross-entropy)"))
    ax.set_title("Training as it happens: the loss falls as gradient descent nudges the weights", fontsize=11)
    handles, names = ax.get_legend_handles_labels()
    if lr_rows:
        ax_lr = ax.twinx()
        (lr_line,) = ax_lr.plot(*zip(*lr_rows), color="tab:green", ls="--", lw=1.2, label="learning rate (right axis)")
        ax_lr.set_ylabel("learning rate")
        handles.append(lr_line)
        names.append(lr_line.get_label())
    ax.legend(handles, names, fontsize=8, loc="upper right")
    ax.grid(True, alpha=0.3)
    ax_text.axis("off")
    at = "each checkpoint" if kept == len(stages) else f"{len(stages)} of the {kept} checkpoints"
    ax_text.set_title(f"a sample at {at} (dotted lines), same prompt and seed {seed}", fontsize=10, loc="left")
    for row, s in enumerate(samples):
        y = 1 - (row + 0.5) / len(samples)
        ax_text.text(0.0, y, f"step {s['step']}", fontsize=9, fontweight="bold", va="center", transform=ax_text.transAxes)
        ax_text.text(0.12, y, clip_text(s["text"], 115), fontsize=8.5,
                     family="monospace", va="center", transform=ax_text.transAxes)
    files = {"figure": save_png(fig, out / "training.png")}

    table_rows = [[int(r["step"]), float(r["loss"]), float(r["val_loss"]) if r.get("val_loss") is not None else "",
                   float(r["lr"]) if r.get("lr") is not None else "",
                   float(r["tokens_per_s"]) if r.get("tokens_per_s") is not None else ""] for r in rows]
    if len(table_rows) > 12:  # the start, the end and a few between (rows with a val loss first) show the trend
        with_val = [i for i, r in enumerate(rows) if r.get("val_loss") is not None]
        pool = with_val if len(with_val) >= 6 else list(range(len(rows)))
        pick = sorted({0, len(rows) - 1, *(pool[i] for i in np.linspace(0, len(pool) - 1, 10).round().astype(int))})
        table_rows = [table_rows[i] for i in pick]
    table = (format_table(["step", "loss", "val loss", "lr", "tokens/s"], table_rows) + "\n\n"
             + "\n".join(f"  step {s['step']:>6}: {s['text']!r}" for s in samples))
    explanation = (
        "Training as it happens. Each step measures the loss on a batch of text and moves every weight\n"
        "a little against its gradient; the learning rate (the dashed line) sets how far.\n"
        "The validation loss is measured on text the model never trains on: while it falls with the\n"
        "training loss the model is learning the language, not memorising its batches. The samples,\n"
        "taken with the same prompt and seed at each checkpoint, show the same progress in words.\n"
        f"  {len(rows)} logged steps; loss {train_loss[0]:.3f} -> {train_loss[-1]:.3f}"
        + (f"; validation loss {val[0][1]:.3f} -> {val[-1][1]:.3f}" if val else "; no validation loss logged")
        + ("" if len(stages) > 1 else "\n  (no checkpoint before the final model in this run: samples from the final model only;"
           "\n  train with a smaller --save-every to see the text change along the way)")
        + (f"\n  ({len(stages)} of the run's {kept} checkpoints sampled, spread evenly from the first to the final model)"
           if kept > len(stages) else "")
    )
    files["text"] = write_text(out / "training.txt", explanation + "\n\n" + table + "\n")
    numbers = {"steps": steps, "loss": train_loss, "val": val, "lr": lr_rows, "samples": samples,
               "checkpoints": kept}
    return DemoResult("training", files, numbers, explanation, table)
