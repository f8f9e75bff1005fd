"""Run directories: atomic file writes, checkpoints, metrics and the loss plot.

A run directory holds
  model.safetensors      weights under GPT-2 names (model.named_parameters())
  optimizer.safetensors  optimiser buffers (e.g. AdamW m and v), for exact resume
  config.json            model config, training config, tokenizer kind, parent run, lmlab version
  tokenizer.json         the tokenizer, in the `tokenizers` library's format
  state.json             step, RNG and data-sampler state (whatever the trainer passes), for resume
  metrics.jsonl          one JSON object per logged step (append_metrics / read_metrics)
  loss.png               train and validation loss against step, learning rate on a second axis
No pickle anywhere: weights are safetensors, everything else JSON, so loading never runs code.

Every file is written atomically (temporary file in the same directory, flush, fsync, rename), so
a crash or Ctrl-C leaves either the previous file or the new one, never a torn one. A checkpoint
spans several files, so each save stamps one random `save_id` into the safetensors metadata,
config.json and state.json; load_training_state refuses a set whose ids disagree (a save that was
interrupted between files) instead of resuming from mixed steps.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import uuid

import numpy as np

from .files import atomic_write_bytes, atomic_write_json, atomic_write_text, json_default

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing file: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


# -- checkpoints --------------------------------------------------------------------------------


def _tensor_dict(arrays, what: str) -> dict:
    if not isinstance(arrays, dict):
        raise TypeError(f"{what} must be a dict of name -> numpy array, got {type(arrays).__name__}")
    out = {}
    for name, a in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"{what} keys must be str, got {name!r}")
        a = np.asarray(a)
        if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise TypeError(f"{what}[{name!r}] must be a numeric array, got dtype {a.dtype}")
        out[name] = np.ascontiguousarray(a)
    return out


def _safetensors_bytes(arrays: dict, save_id: str) -> bytes:
    from safetensors.numpy import save

    return save(arrays, metadata={"format": "lmlab", "save_id": save_id})


def save_run(run_dir, model, tokenizer, *, train_config, optimizer: dict | None = None,
             state: dict | None = None, parent: str | None = None, extra: dict | None = None) -> None:
    """Write a checkpoint of `model` (+ tokenizer, configs, optimiser and trainer state) to run_dir.

    `train_config` is a dict or dataclass saved under config.json's "train"; `extra` (a dict, e.g. a
    chat template) is saved under "extra". Files are written model first and state.json last.
    """
    run_dir = os.fspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    save_id = uuid.uuid4().hex
    weights = _tensor_dict(model.named_parameters(), "model.named_parameters()")
    bad = [n for n, a in weights.items() if a.dtype != np.float32]
    if bad:
        raise TypeError(f"model parameters must be float32; not: {bad[:5]}")
    atomic_write_bytes(os.path.join(run_dir, MODEL_FILE), _safetensors_bytes(weights, save_id))
    if optimizer is not None:
        opt = _tensor_dict(optimizer, "optimizer")
        atomic_write_bytes(os.path.join(run_dir, OPTIMIZER_FILE), _safetensors_bytes(opt, save_id))
    tokenizer.save(os.path.join(run_dir, TOKENIZER_FILE))
    from . import __version__

    if dataclasses.is_dataclass(train_config) and not isinstance(train_config, type):
        train_config = dataclasses.asdict(train_config)
    config = {
        "lmlab_version": __version__,
        "model": dataclasses.asdict(model.config),
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        "train": train_config,
        "parent": None if parent is None else os.fspath(parent),
        "extra": extra or {},
        "save_id": save_id,
    }
    atomic_write_json(os.path.join(run_dir, CONFIG_FILE), config)
    if state is not None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        atomic_write_json(os.path.join(run_dir, STATE_FILE),
                          {"save_id": save_id, "has_optimizer": optimizer is not None, "state": state})


def _check_run_dir(run_dir: str, needed) -> None:
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    missing = [n for n in needed if not os.path.isfile(os.path.join(run_dir, n))]
    if missing:
        raise FileNotFoundError(f"run directory {run_dir} is missing {', '.join(missing)}")


def _safetensors_save_id(path: str) -> str | None:
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        return (f.metadata() or {}).get("save_id")


def read_config(run_dir) -> dict:
    """config.json of a run directory."""
    run_dir = os.fspath(run_dir)
    _check_run_dir(run_dir, [CONFIG_FILE])
    return _read_json(os.path.join(run_dir, CONFIG_FILE))


def saved_precision(config: dict) -> str:
    """The matmul precision a run was trained in (config.json's train.precision); "fp32" where none
    is recorded (runs from before lmlab had a choice, and runs that never trained)."""
    train = config.get("train")
    precision = train.get("precision", "fp32") if isinstance(train, dict) else "fp32"
    from .model import check_precision
    return check_precision(precision, "config.json's train.precision")


def load_model(run_dir):
    """(GPT, Tokenizer, config dict) from a run directory written by save_run.

    The model computes in the matmul precision the run was trained in (saved_precision)."""
    from safetensors.numpy import load_file

    from .model import GPT, GPTConfig
    from .tokenizer import Tokenizer

    run_dir = os.fspath(run_dir)
    _check_run_dir(run_dir, [MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE])
    config = read_config(run_dir)
    mcfg = config.get("model")
    if not isinstance(mcfg, dict):
        raise ValueError(f"{run_dir}/{CONFIG_FILE} has no \"model\" section")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(mcfg) - fields)
    if unknown:
        raise ValueError(f"{run_dir}/{CONFIG_FILE}: model config has fields this lmlab does not know: {unknown}")
    model = GPT(GPTConfig(**mcfg), matmul_precision=saved_precision(config))
    tokenizer = Tokenizer.load(os.path.join(run_dir, TOKENIZER_FILE))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{run_dir}: tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    weights = load_file(os.path.join(run_dir, MODEL_FILE))
    params = model.named_parameters()
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(f"{run_dir}/{MODEL_FILE} does not match config.json's model: missing tensors "
                         f"{missing[:8]}, unexpected tensors {unexpected[:8]}")
    for name, view in params.items():
        w = weights[name]
        if w.shape != view.shape:
            raise ValueError(f"{run_dir}/{MODEL_FILE}: tensor {name!r} has shape {w.shape}, but config.json's "
                             f"model needs {view.shape}")
        if w.dtype != np.float32:
            raise ValueError(f"{run_dir}/{MODEL_FILE}: tensor {name!r} has dtype {w.dtype}, expected float32")
        view[...] = w
    return model, tokenizer, config


def load_training_state(run_dir):
    """(optimizer dict of arrays, state dict) saved by save_run, for resuming a run exactly."""
    from safetensors.numpy import load_file

    run_dir = os.fspath(run_dir)
    _check_run_dir(run_dir, [STATE_FILE, MODEL_FILE])
    saved = _read_json(os.path.join(run_dir, STATE_FILE))
    if not isinstance(saved, dict) or "state" not in saved:
        raise ValueError(f"{run_dir}/{STATE_FILE} is not an lmlab state file")
    save_id = saved.get("save_id")
    ids = {MODEL_FILE: _safetensors_save_id(os.path.join(run_dir, MODEL_FILE))}
    optimizer = {}
    if saved.get("has_optimizer"):
        _check_run_dir(run_dir, [OPTIMIZER_FILE])
        ids[OPTIMIZER_FILE] = _safetensors_save_id(os.path.join(run_dir, OPTIMIZER_FILE))
        optimizer = load_file(os.path.join(run_dir, OPTIMIZER_FILE))
    stale = [n for n, i in ids.items() if i != save_id]
    if stale:
        raise ValueError(f"{run_dir}: {', '.join(stale)} and {STATE_FILE} come from different saves "
                         f"(a checkpoint write was interrupted); cannot resume exactly")
    return optimizer, saved["state"]


# -- metrics and the loss plot --------------------------------------------------------------------


def append_metrics(run_dir, row: dict) -> None:
    """Append one JSON object as a line of metrics.jsonl (created on first use)."""
    if not isinstance(row, dict):
        raise TypeError(f"row must be a dict, got {type(row).__name__}")
    run_dir = os.fspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    line = (json.dumps(row, default=json_default) + "\n").encode("utf-8")
    with open(os.path.join(run_dir, METRICS_FILE), "a+b") as f:
        _drop_torn_tail(f)
        # One write of a whole line: a crash can at worst leave a torn last line, which read_metrics
        # ignores and the next append removes.
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _drop_torn_tail(f) -> None:
    f.seek(0)
    data = f.read()
    if data and not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)


def read_metrics(run_dir) -> list:
    """Rows of metrics.jsonl ([] if there is none yet); a torn final line (no newline) is ignored."""
    path = os.path.join(os.fspath(run_dir), METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        complete = f.read().split("\n")[:-1]  # the last piece is "" or a torn line
    rows = []
    for lineno, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
    return rows


def truncate_metrics(run_dir, max_step: int) -> None:
    """Keep only rows with step <= max_step (a resumed run rewrites what came after its checkpoint)."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= max_step]
    text = "".join(json.dumps(r, default=json_default) + "\n" for r in rows)
    atomic_write_text(os.path.join(os.fspath(run_dir), METRICS_FILE), text)


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
