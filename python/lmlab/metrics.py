"""A run's metrics.jsonl (one JSON object per logged step, appended whole and fsynced by
files.append_line, a torn last line ignored on reading and dropped on the next append) and the
loss plot drawn from it."""

from __future__ import annotations

import io
import json
import os

from .errors import CheckpointError
from .files import (JSONTextError, append_line, atomic_write_bytes, atomic_write_text,
                    complete_lines, json_default, parse_json, write_error)
from .rundir import LOSS_PLOT_FILE, METRICS_FILE


def append_metrics(run_dir, row: dict) -> None:
    """Append one JSON object as a line of metrics.jsonl (created on first use; never through a
    symbolic link), by files.append_line: a torn last line a crash left is removed first."""
    if not isinstance(row, dict):
        raise TypeError(f"row must be a dict, got {type(row).__name__}")
    run_dir = os.fspath(run_dir)
    path = os.path.join(run_dir, METRICS_FILE)
    line = (json.dumps(row, default=json_default) + "\n").encode("utf-8")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None
    append_line(path, line, follow_links=False)


def read_metrics(run_dir) -> list:
    """Rows of a run's metrics.jsonl ([] if there is none yet); a torn final line is ignored."""
    path = os.path.join(os.fspath(run_dir), METRICS_FILE)
    if not os.path.exists(path):
        return []
    return read_metrics_file(path)


def read_metrics_file(path) -> list:
    """Rows of a metrics.jsonl file; a torn final line (files.complete_lines) is ignored."""
    try:
        with open(path, "rb") as f:
            lines = complete_lines(f.read())
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    rows = []
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path}:{lineno}: not UTF-8 text (byte offset {e.start} of the "
                                  "line)") from None
        if not line.strip():
            continue
        try:
            rows.append(parse_json(line))
        except JSONTextError as e:
            raise CheckpointError(f"{path}:{lineno}: {e}") from None
    return rows


def truncate_metrics(run_dir, max_step: int) -> bool:
    """Keep only rows with step <= max_step (a resumed run logs what came after its checkpoint
    again). Rewrites the file only when there is something to drop; returns whether it did."""
    rows = read_metrics(run_dir)
    keep = [r for r in rows if not isinstance(r, dict) or r.get("step", 0) <= max_step]
    if len(keep) == len(rows):
        return False
    text = "".join(json.dumps(r, default=json_default) + "\n" for r in keep)
    atomic_write_text(os.path.join(os.fspath(run_dir), METRICS_FILE), text)
    return True


def plot_loss(run_dir, path=None):
    """Write loss.png: "loss" and "val_loss" against "step", "lr" on a twin axis. Returns the path,
    or None when metrics.jsonl has no loss yet."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = os.fspath(run_dir)
    rows = [r for r in read_metrics(run_dir) if "step" in r]

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    train, val, lr = series("loss"), series("val_loss"), series("lr")
    if not train[0] and not val[0]:
        return None
    # Figure + Agg canvas directly: no pyplot global state, no display needed.
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train[0]:
        ax.plot(*train, label="train loss", color="tab:blue", linewidth=1)
    if val[0]:
        ax.plot(*val, label="val loss", color="tab:orange", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lr[0]:
        ax2 = ax.twinx()
        ax2.plot(*lr, label="lr", color="tab:gray", linestyle="--", linewidth=1)
        ax2.set_ylabel("learning rate")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = os.fspath(path) if path is not None else os.path.join(run_dir, LOSS_PLOT_FILE)
    atomic_write_bytes(out, buf.getvalue())
    return out
