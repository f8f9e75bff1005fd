"""Checkpoints of a run: writing one as a unit, reading one back with every file checked
(rundir.py holds the run directory's layout and opening rules, tensorfile.py the safetensors
format, metrics.py the metrics and loss plot beside the checkpoints).

A checkpoint is a directory, checkpoints/step_N/, holding
  model.safetensors      weights under GPT-2 names (model.named_parameters())
  optimizer.safetensors  optimiser buffers (e.g. AdamW m and v), for exact resume
  tokenizer.json         the tokenizer, in the `tokenizers` library's format
  state.json             step, RNG and data-sampler state (whatever the trainer passes), for resume
  config.json            model config, training config, tokenizer kind, parent run, lmlab version,
                         and the size and SHA-256 of every other file of the checkpoint
  (and any extra files a stage adds, e.g. reward_head.safetensors)
No pickle anywhere: weights are safetensors, everything else JSON, so loading never runs code.

Saving writes every file into a temporary directory (checkpoints/.tmp-*), fsyncs it, renames it to
step_N and then atomically replaces current.json to name it; only then are older checkpoints
pruned. A kill at any instant leaves current.json naming one complete checkpoint (the new one or
the previous one); what the kill left behind is removed when the run is next opened. A save that
fails (disk full, file too large, permission) raises errors.CheckpointError naming the path and
the cause, and the previous checkpoint stays current.

Reading checks every file before trusting it, and reports one line naming the file: config.json's
sections and their types, model sizes within MAX_* bounds (before anything is allocated), the
safetensors header against the model config (dtype, names, shapes, offsets, file size) before the
data is read, the recorded sizes and checksums, finite weights, and a tokenizer whose vocabulary is
exactly the model's. Runs in the flat layout (one checkpoint's files at the run's top, as lmlab
wrote them before) load and resume the same way; their mixed-save check is the save_id stamped in
each file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import shutil
import uuid
from pathlib import Path

from . import rundir
from .errors import CheckpointError
from .model import MAX_PARAMS, GPT, GPTConfig, check_precision, parameter_layout
from .tensorfile import read_metadata, read_safetensors, safetensors_chunks, tensor_dict
from .tokenizer import Tokenizer
from .files import (JSONTextError, atomic_write_json, fsync_dir, json_text, parse_json, write_error,
                    write_new_file)
from .rundir import (CHECKPOINT_NAME, CHECKPOINTS_DIR, CONFIG_FILE, CURRENT_FILE, MODEL_FILE,
                     OPTIMIZER_FILE, SAVE_OLD_PREFIX, SAVE_TEMP_PREFIX, STATE_FILE, TOKENIZER_FILE)

# Bounds on a saved model config, checked before anything is allocated: far above any model a CPU
# trains, far below what would exhaust memory.
MAX_VOCAB = 1 << 21
MAX_BLOCK = 1 << 16
MAX_LAYERS = 1024
MAX_EMBD = 1 << 15
# MAX_PARAMS (imported from lmlab.model, which refuses to build a larger GPT): 8 GiB of weights
MAX_JSON = 1 << 28     # bytes of config.json, state.json, tokenizer.json, current.json


# -- JSON files -----------------------------------------------------------------------------------


def _read_bytes(path: Path, limit: int = MAX_JSON) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        size = path.stat().st_size
        if size > limit:
            raise CheckpointError(f"{path} is {size} bytes, more than the {limit} this file can be")
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None


def _parse_json(path: Path, data: bytes):
    try:
        return parse_json(data)
    except JSONTextError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _read_json(path) -> dict:
    path = Path(path)
    return _parse_json(path, _read_bytes(path))


# -- where the current checkpoint is ---------------------------------------------------------------


def current_checkpoint(run_dir) -> Path:
    """The directory holding a run's current checkpoint: checkpoints/step_N/ named by current.json,
    or, for a flat-layout run (or a checkpoint directory given directly), the directory itself.
    While an --overwrite replaces the run and the new run has no checkpoint yet, the replaced run's
    (rundir's module docstring): wherever a kill left it, it stays readable."""
    run = rundir.run_path(run_dir)  # "" (an unset variable) is not the current directory
    if not run.is_dir():
        if os.path.lexists(run):
            raise NotADirectoryError(f"{run} is a file, not a run directory")
        raise FileNotFoundError(f"run directory not found: {run}")
    # Where the replaced run is kept: whole in REPLACED_DIR, or split between REPLACING_DIR and
    # the run directory while it is being set aside or put back.
    # The run directory may be named through a link (runs/latest -> runs/exp3); the places inside
    # it are lmlab's, and one that is a link is not read.
    homes = [run, run / rundir.REPLACED_DIR, run / rundir.REPLACING_DIR]
    for home in homes:
        pointer = home / CURRENT_FILE
        if os.path.lexists(pointer) and (home == run or not home.is_symlink()):
            break
    else:
        home = None
    if home is not None:
        if pointer.is_symlink():
            raise CheckpointError(f"{pointer} is a symbolic link; lmlab does not follow links inside a run")
        try:
            data = _read_json(pointer)
        except CheckpointError as e:
            raise CheckpointError(f"{e}{_newest_hint(run)}") from None
        name = data.get("checkpoint") if isinstance(data, dict) else None
        if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name):
            raise CheckpointError(f"{pointer} does not name a checkpoint (expected "
                                  '{"checkpoint": "step_N", ...}), got ' + repr(data)[:100]
                                  + _newest_hint(run))
        for d in [home / CHECKPOINTS_DIR / name] + [run / CHECKPOINTS_DIR / name] * (home == homes[2]):
            if d.is_dir() and not d.is_symlink():
                return d
        raise CheckpointError(f"{pointer} names {CHECKPOINTS_DIR}/{name}, which is missing"
                              + _newest_hint(run))
    # A flat-layout checkpoint is whole where its config.json is (rundir._move), in the run or
    # wherever an overwrite is moving it.
    for home in homes:
        if (home / CONFIG_FILE).is_file() and (home == run or not home.is_symlink()):
            return home
    for home in homes[:2]:
        if (home / MODEL_FILE).is_file():
            return home
    raise FileNotFoundError(f"{run} holds no checkpoint (no {CURRENT_FILE}, no {MODEL_FILE})")


def _newest_hint(run: Path) -> str:
    found = list_checkpoints(run)
    if not found:
        return ""
    return (f"; the newest checkpoint there is {CHECKPOINTS_DIR}/{found[-1][1].name} (write "
            f'{{"checkpoint": "{found[-1][1].name}"}} into {CURRENT_FILE} to use it)')


def list_checkpoints(run_dir) -> list:
    """[(step, directory)] of the run's checkpoints/step_N/ directories, oldest first (a re-save of
    the current step is step_N.1, step_N.2, ... and sorts after step_N)."""
    base = Path(os.fspath(run_dir)) / CHECKPOINTS_DIR
    found = []
    if base.is_dir() and not base.is_symlink():
        for d in base.iterdir():
            m = CHECKPOINT_NAME.fullmatch(d.name)
            if m and d.is_dir() and not d.is_symlink() and (
                    (d / CONFIG_FILE).is_file() or (d / CURRENT_FILE).is_file()):
                found.append(((int(m.group(1)), int(m.group(2) or 0)), d))
    return [(key[0], d) for key, d in sorted(found)]


def _required(directory: Path, names) -> None:
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"run directory {directory} is missing {', '.join(missing)}")


# -- config.json ------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_model_config(m, path: Path) -> dict:
    if not isinstance(m, dict):
        raise CheckpointError(f'{path} has no "model" section (a dict of the model\'s sizes)')
    fields = [f.name for f in dataclasses.fields(GPTConfig)]
    unknown = sorted(set(m) - set(fields))
    if unknown:
        raise CheckpointError(f"{path}: model config has fields this lmlab does not know: {unknown}")
    bounds = {"vocab_size": MAX_VOCAB, "block_size": MAX_BLOCK, "n_layer": MAX_LAYERS,
              "n_head": MAX_EMBD, "n_embd": MAX_EMBD}
    for name in fields:
        if name not in m:
            if name == "vocab_size":
                raise CheckpointError(f"{path}: model config lacks vocab_size")
            continue
        v, top = m[name], bounds.get(name)
        if not _is_int(v) or v < 1 or (top is not None and v > top):
            raise CheckpointError(f"{path}: model.{name} must be an integer in [1, {top}], got {v!r}")
    n = sum(math.prod(shape) for _, shape in parameter_layout(GPTConfig(**m)))
    if n > MAX_PARAMS:
        raise CheckpointError(f"{path}: the model config describes {n:,} parameters, more than the "
                              f"{MAX_PARAMS:,} lmlab loads")
    return m


def _check_config(config, path: Path) -> dict:
    """config.json's sections and their types (a file edited by hand or damaged says which)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    _check_model_config(config.get("model"), path)
    tok = config.get("tokenizer")
    if not (isinstance(tok, dict) and tok.get("kind") in ("char", "bpe") and _is_int(tok.get("vocab_size"))):
        raise CheckpointError(f'{path}: "tokenizer" must be {{"kind": "char" or "bpe", "vocab_size": '
                              f"an integer}}, got {tok!r}"[:300])
    kinds = {"train": (dict, type(None)), "extra": (dict, type(None)), "parent": (str, type(None)),
             "lmlab_version": (str,), "save_id": (str,), "checkpoint": (dict,)}
    for key, types in kinds.items():
        if key in config and not isinstance(config[key], types):
            want = " or ".join("null" if t is type(None) else {dict: "an object", str: "a string"}[t]
                               for t in types)
            raise CheckpointError(f'{path}: "{key}" must be {want}, got {type(config[key]).__name__}')
    files = (config.get("checkpoint") or {}).get("files", {})
    ok = isinstance(files, dict) and all(
        isinstance(v, dict) and _is_int(v.get("bytes")) and isinstance(v.get("sha256"), str)
        for v in files.values())
    if not ok:
        raise CheckpointError(f'{path}: "checkpoint.files" must map file names to '
                              '{"bytes": ..., "sha256": ...}')
    return config


def _config_in(d: Path) -> dict:
    """config.json of the checkpoint directory d, checked. Readers resolve the current checkpoint
    once and read every file from that directory: a save that makes another checkpoint current
    in between must not pair one checkpoint's files with another's config."""
    _required(d, [CONFIG_FILE])
    path = d / CONFIG_FILE
    return _check_config(_read_json(path), path)


def read_config(run_dir) -> dict:
    """config.json of a run's current checkpoint, checked."""
    return _config_in(current_checkpoint(run_dir))


def saved_precision(config: dict) -> str:
    """The matmul precision a run was trained in (config.json's train.precision); "fp32" where none
    is recorded (runs from before lmlab had a choice, and runs that never trained)."""
    train = config.get("train")
    precision = train.get("precision", "fp32") if isinstance(train, dict) else "fp32"
    return check_precision(precision, "config.json's train.precision")


# -- safetensors, read with checks ----------------------------------------------------------------


def _digest_of(config: dict, name: str):
    return ((config.get("checkpoint") or {}).get("files") or {}).get(name)


def read_checkpoint_file(run_dir, name: str) -> bytes:
    """The bytes of one file of the current checkpoint, checked against the recorded size and
    SHA-256 (e.g. a stage's extra file such as reward_head.safetensors)."""
    d = current_checkpoint(run_dir)
    return _checked_file(d, _config_in(d), name)


def _checked_file(d: Path, config: dict, name: str) -> bytes:
    """The bytes of file `name` of checkpoint directory d, checked against d's config."""
    data = _read_bytes(d / name, limit=MAX_PARAMS * 4)
    digest = _digest_of(config, name)
    if digest is not None and (len(data) != digest["bytes"]
                               or hashlib.sha256(data).hexdigest() != digest["sha256"]):
        raise CheckpointError(f"{d / name} is corrupted or truncated: its size or SHA-256 differs "
                              f"from what {CONFIG_FILE} recorded when it was saved")
    return data


# -- loading ----------------------------------------------------------------------------------------


def load_model(run_dir):
    """(GPT, Tokenizer, config dict) of a run's current checkpoint, every file checked.

    The model computes in the matmul precision the run was trained in (saved_precision)."""
    d = current_checkpoint(run_dir)
    _required(d, [MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE])
    config = _config_in(d)
    mcfg = GPTConfig(**config["model"])
    tokenizer = _tokenizer_in(d, config)
    precision = saved_precision(config)
    made = []

    def allocate():
        made.append(GPT(mcfg, matmul_precision=precision))
        return made[0].named_parameters()

    read_safetensors(d / MODEL_FILE, dict(parameter_layout(mcfg)), _digest_of(config, MODEL_FILE),
                      allocate)
    return made[0], tokenizer, config


def load_tokenizer(run_dir):
    """The Tokenizer of a run's current checkpoint (with its chat template), checked as load_model
    checks it, without reading the weights: for checking data against the run before any work."""
    d = current_checkpoint(run_dir)
    _required(d, [CONFIG_FILE, TOKENIZER_FILE])
    return _tokenizer_in(d, _config_in(d))


def _tokenizer_in(d: Path, config: dict):
    mcfg = GPTConfig(**config["model"])
    tok_path = d / TOKENIZER_FILE
    try:
        text = _checked_file(d, config, TOKENIZER_FILE).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{tok_path}: not UTF-8 text (byte offset {e.start})") from None
    tokenizer = Tokenizer.from_str(text, source=tok_path)
    tokenizer.chat_template = (config.get("train") or {}).get("chat_template")
    tokenizer.eos_tokens = _eos_tokens(config, tokenizer, d / CONFIG_FILE)
    if tokenizer.vocab_size != mcfg.vocab_size or tokenizer.kind != config["tokenizer"]["kind"]:
        raise CheckpointError(f"{tok_path} is a {tokenizer.kind} tokenizer of {tokenizer.vocab_size} ids, "
                              f"but the model in {d / CONFIG_FILE} has vocab_size {mcfg.vocab_size} "
                              f"({config['tokenizer']['kind']}): the files come from different runs")
    return tokenizer


def _eos_tokens(config: dict, tokenizer, where: Path) -> tuple:
    """The model's own end-of-text tokens recorded in config.json's train section ("eos_tokens",
    written by import and kept by every run tuned from it), each checked to be a token of the run's
    tokenizer: generation stops at them (lmlab.chat.stop_ids)."""
    tokens = (config.get("train") or {}).get("eos_tokens") or []
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{where}: train.eos_tokens must be a list of token strings, got "
                              f"{tokens!r}")
    missing = [t for t in tokens if tokenizer.token_id(t) is None]
    if missing:
        raise CheckpointError(f"{where}: train.eos_tokens names {missing[0]!r}, which is not a "
                              "token of the run's tokenizer")
    return tuple(tokens)


def load_weights(run_dir, model) -> None:
    """Read the weights of a run's current checkpoint into `model`, whose config must be the run's
    (what a resume does with the model it already holds: no second model is built)."""
    d = current_checkpoint(run_dir)
    _required(d, [MODEL_FILE, CONFIG_FILE])
    config = _config_in(d)
    mcfg = GPTConfig(**config["model"])
    if mcfg != model.config:
        raise CheckpointError(f"{d / CONFIG_FILE} holds the model {mcfg}, but the model to resume is "
                              f"{model.config}; a resume needs the run's own model config")
    read_safetensors(d / MODEL_FILE, dict(parameter_layout(mcfg)), _digest_of(config, MODEL_FILE),
                      model.named_parameters)


def load_training_state(run_dir):
    """(optimizer dict of arrays, state dict) of a run's current checkpoint, for resuming exactly."""
    d = current_checkpoint(run_dir)
    _required(d, [STATE_FILE, MODEL_FILE])
    config = _config_in(d)
    data = _checked_file(d, config, STATE_FILE)
    saved = _parse_json(d / STATE_FILE, data)
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        raise CheckpointError(f"{d / STATE_FILE} is not an lmlab state file")
    step = saved["state"].get("step", 0)
    if not _is_int(step) or step < 0:
        raise CheckpointError(f"{d / STATE_FILE}: step must be an integer >= 0, got {step!r}")
    optimizer, ids = {}, {}
    if saved.get("has_optimizer"):
        _required(d, [OPTIMIZER_FILE])
        optimizer, meta = read_safetensors(d / OPTIMIZER_FILE, None, _digest_of(config, OPTIMIZER_FILE))
        ids[OPTIMIZER_FILE] = meta.get("save_id")
    if "save_id" in saved:  # a flat-layout run: its files were written one by one
        ids[MODEL_FILE] = read_metadata(d / MODEL_FILE).get("save_id")
        stale = [n for n, i in ids.items() if i != saved["save_id"]]
        if stale:
            raise CheckpointError(f"{d}: {', '.join(stale)} and {STATE_FILE} come from different saves "
                                  "(a checkpoint write was interrupted); cannot resume exactly")
    return optimizer, saved["state"]


# -- saving -----------------------------------------------------------------------------------------


def _current_name(run: Path):
    try:
        return current_checkpoint(run).name if (run / CURRENT_FILE).is_file() else None
    except (OSError, ValueError):
        return None  # an unreadable pointer is replaced by the one this save writes


def _digest(data) -> dict:
    """{"bytes", "sha256"} of a file's content: bytes, or the buffers write_new_file writes in turn."""
    h, n = hashlib.sha256(), 0
    for chunk in (data if isinstance(data, list) else [data]):
        h.update(chunk)
        n += len(chunk)  # bytes: the chunks are bytes or byte-format memoryviews
    return {"bytes": n, "sha256": h.hexdigest()}


def save_run(run_dir, model, tokenizer, *, train_config, optimizer: dict | None = None,
             state: dict | None = None, parent: str | None = None, extra: dict | None = None,
             files: dict | None = None, keep: int | None = None) -> Path:
    """Save a checkpoint of `model` (+ tokenizer, configs, optimiser and trainer state) as one unit
    in run_dir/checkpoints/step_N/ (N = state["step"], else 0) and make it the run's current one.

    `train_config` is a dict or dataclass saved under config.json's "train" (its "precision", the
    one load_model gives the model back, is the model's matmul_precision unless it says); `extra` (a dict, e.g. a
    chat template) under "extra"; `files` ({name: bytes}) are extra files of the checkpoint (read
    back with read_checkpoint_file). keep: how many checkpoints to keep, newest first and the
    current one always (None or 0: all). Returns the checkpoint's directory.
    """
    from . import __version__

    run = Path(os.fspath(run_dir))
    weights = tensor_dict(model.named_parameters(), "model.named_parameters()")
    if state is not None and not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    step = int(state.get("step", 0)) if state else 0
    if step < 0:
        raise ValueError(f"state['step'] must be >= 0, got {step}")
    if dataclasses.is_dataclass(train_config) and not isinstance(train_config, type):
        train_config = dataclasses.asdict(train_config)
    if isinstance(train_config, dict) and "precision" not in train_config:
        # What load_model gives the model back (saved_precision): the one it computes in now.
        train_config = {**train_config, "precision": model.matmul_precision}
    template = getattr(tokenizer, "chat_template", None)
    if template and isinstance(train_config, dict):
        # The run answers through its tokenizer's chat template (lmlab.chat), and so does every
        # run tuned from it: load_model puts it back on the tokenizer.
        train_config = {**train_config, "chat_template": template}
    eos = tuple(getattr(tokenizer, "eos_tokens", ()) or ())
    if eos and isinstance(train_config, dict):
        # An imported model's own end-of-text tokens (Tokenizer.eos_tokens), kept in the same way.
        train_config = {**train_config, "eos_tokens": list(eos)}
    # The tensor files are written straight from the arrays (safetensors_chunks), never as bytes.
    contents = {MODEL_FILE: safetensors_chunks(weights)}
    if optimizer is not None:
        contents[OPTIMIZER_FILE] = safetensors_chunks(tensor_dict(optimizer, "optimizer"))
    contents[TOKENIZER_FILE] = tokenizer.to_str().encode("utf-8")
    if state is not None:
        contents[STATE_FILE] = json_text({"has_optimizer": optimizer is not None,
                                          "state": state}).encode("utf-8")
    for name, data in (files or {}).items():
        if name in contents or name == CONFIG_FILE or os.path.basename(name) != name or name.startswith("."):
            raise ValueError(f"files: {name!r} is not a name an extra checkpoint file can have")
        contents[name] = bytes(data)
    config = {
        "lmlab_version": __version__,
        "model": dataclasses.asdict(model.config),
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        "train": train_config,
        "parent": None if parent is None else os.fspath(parent),
        "extra": extra or {},
        "checkpoint": {"step": step, "files": {n: _digest(b) for n, b in contents.items()}},
    }
    contents[CONFIG_FILE] = json_text(config).encode("utf-8")  # last: the manifest of the others

    ckpts = run / CHECKPOINTS_DIR
    tmp = ckpts / f"{SAVE_TEMP_PREFIX}step_{step:06d}-{uuid.uuid4().hex[:8]}"
    previous = _current_name(run)
    name = f"step_{step:06d}"
    k = 0
    while name == previous:  # a second save of the current step goes beside it, never over it
        k += 1
        name = f"step_{step:06d}.{k}"
    target, displaced = ckpts / name, None
    try:
        ckpts.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp)
        for fname, data in contents.items():
            write_new_file(tmp / fname, data)
        fsync_dir(tmp)
        if os.path.lexists(target):  # a checkpoint of this step that never became current
            displaced = ckpts / f"{SAVE_OLD_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
            os.rename(target, displaced)
        os.rename(tmp, target)
        fsync_dir(ckpts)
        atomic_write_json(run / CURRENT_FILE, {"checkpoint": name, "step": step})
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _current_name(run) == name:
            raise  # interrupted after current.json named the new checkpoint: the save is complete
        if os.path.isdir(target) and (displaced is not None or not os.path.lexists(tmp)):
            shutil.rmtree(target, ignore_errors=True)  # renamed into place, never made current
        if displaced is not None:
            try:
                os.rename(displaced, target)
            except OSError:
                pass
        if not isinstance(e, (OSError, CheckpointError)):
            raise
        err = write_error(getattr(e, "filename", None) or tmp, e) if isinstance(e, OSError) else e
        where = (f"the checkpoint {previous} stays current" if previous
                 else "the previous checkpoint stays current" if (run / MODEL_FILE).is_file()
                 else "nothing was saved")
        raise CheckpointError(f"{err}; {where}") from None
    # The new checkpoint is current: what it supersedes can go (a failure here loses nothing).
    try:
        if displaced is not None:
            shutil.rmtree(displaced)
        for fname in rundir.moved_flat_files(run):  # a flat-layout run's, now in checkpoints/
            os.unlink(run / fname)
        if (run / rundir.REPLACED_DIR).is_dir():  # the run an --overwrite kept until now
            shutil.rmtree(run / rundir.REPLACED_DIR)
        prune_checkpoints(run, keep)
    except OSError:
        pass  # leftovers are removed when the run is next opened
    return target


def prune_checkpoints(run_dir, keep: int | None) -> list:
    """Remove checkpoints beyond the `keep` newest (the current one is always kept; None or 0
    keeps all), checkpoints of steps after the current one (left by a save a kill interrupted
    before it became current) and earlier saves of the current step. Returns the removed names."""
    run = Path(os.fspath(run_dir))
    current = current_checkpoint(run)
    cur_step = int(CHECKPOINT_NAME.fullmatch(current.name).group(1)) if current.parent.name == CHECKPOINTS_DIR else None
    kept, removed = [], []
    for step, d in reversed(list_checkpoints(run)):
        stale = d != current and cur_step is not None and step >= cur_step
        if d == current or (not stale and (not keep or len(kept) < keep)):
            kept.append(d)
        else:
            removed.append(d)
    for d in removed:
        # Renamed away first, so a kill mid-removal leaves a leftover, never half a checkpoint.
        trash = d.parent / f"{SAVE_OLD_PREFIX}{d.name}-{uuid.uuid4().hex[:8]}"
        os.rename(d, trash)
        shutil.rmtree(trash)
    return [d.name for d in removed]
