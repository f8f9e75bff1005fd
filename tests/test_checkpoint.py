"""Checkpoints: bitwise round trips, one checkpoint as one unit (interrupted and failed saves leave
the previous one current), keeping N, the flat layout of older runs, every file read checked,
no pickle, metrics, loss plot.
"""

import dataclasses
import errno
import hashlib
import json
import os
import stat
import time
import shutil
import tracemalloc

import numpy as np
import pytest
import safetensors.numpy

from lmlab import checkpoint
from lmlab.checkpoint import load_model, load_training_state, save_run
from lmlab.metrics import append_metrics, plot_loss, read_metrics, truncate_metrics
from lmlab.errors import CheckpointError, RunDirError
from lmlab.files import atomic_write, atomic_write_bytes
from lmlab.model import GPT, GPTConfig
from lmlab.rundir import is_run
from lmlab.tokenizer import train_tokenizer

from flat_run import write_flat


@pytest.fixture
def gpt():
    return GPT, GPTConfig


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("hello world, the quick brown fox.\n", "char")


def _model(gpt, tok, seed=1, **kw):
    GPT, GPTConfig = gpt
    cfg = GPTConfig(**{"vocab_size": tok.vocab_size, "block_size": 16, "n_layer": 2, "n_head": 2,
                       "n_embd": 8, **kw})
    m = GPT(cfg, seed=seed)
    # Arbitrary bit patterns (not just the init distribution), so "bitwise" means every bit.
    m.params[...] = np.random.default_rng(seed).standard_normal(m.params.size).astype(np.float32) * 3
    return m


def _save(run, model, tok, step=5, **kw):
    n = model.params.size
    opt = {"m": np.full(n, step, np.float32), "v": np.arange(n, dtype=np.float32) / 7}
    state = {"step": step, "rng": {"state": 2**100 + 7}, "loss": np.float32(1.25), "sampler": {"batches": step}}
    save_run(run, model, tok, train_config={"lr": 1e-3, "steps": 10}, optimizer=opt, state=state, **kw)
    return opt, state


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


def _ckpt(run, name=None):
    return run / "checkpoints" / name if name else checkpoint.current_checkpoint(run)


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# -- round trips ----------------------------------------------------------------------------------


def test_save_load_round_trip_is_bitwise(gpt, tok, tmp_path):
    run = tmp_path / "run"
    model = _model(gpt, tok)
    opt, state = _save(run, model, tok, parent="runs/base", extra={"chat_template": "x"})
    assert sorted(os.listdir(run)) == ["checkpoints", "current.json"]
    assert json.loads((run / "current.json").read_text()) == {"checkpoint": "step_000005", "step": 5}
    assert sorted(os.listdir(_ckpt(run))) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                              "state.json", "tokenizer.json"]
    loaded, ltok, config = load_model(run)
    assert np.array_equal(_bits(loaded.params), _bits(model.params))
    for name, view in model.named_parameters().items():
        assert np.array_equal(_bits(loaded.named_parameters()[name]), _bits(view))
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(model.config)
    assert ltok.to_str() == tok.to_str() and ltok.encode("hello").tolist() == tok.encode("hello").tolist()
    from lmlab import __version__
    assert config["lmlab_version"] == __version__
    assert config["train"] == {"lr": 1e-3, "steps": 10, "precision": "fp32"}
    assert config["parent"] == "runs/base"
    assert config["tokenizer"] == {"kind": "char", "vocab_size": tok.vocab_size}
    assert config["extra"] == {"chat_template": "x"}
    files = config["checkpoint"]["files"]
    assert config["checkpoint"]["step"] == 5 and sorted(files) == sorted(os.listdir(_ckpt(run)))[1:]
    raw = (_ckpt(run) / "model.safetensors").read_bytes()
    assert files["model.safetensors"] == {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    lopt, lstate = load_training_state(run)
    assert sorted(lopt) == ["m", "v"]
    for k in opt:
        assert lopt[k].dtype == opt[k].dtype and np.array_equal(_bits(lopt[k]), _bits(opt[k]))
    assert lstate == {"step": 5, "rng": {"state": 2**100 + 7}, "loss": 1.25, "sampler": {"batches": 5}}


def test_a_model_loads_back_in_the_precision_it_was_saved_in(gpt, tok, tmp_path):
    """save_run records the model's matmul precision unless train_config names one: a bf16 model
    saved with a train_config that did not say came back fp32 (load_model reads the precision
    from config.json), computing other logits than the model saved."""
    model = _model(gpt, tok)
    model.matmul_precision = "bf16"
    save_run(tmp_path / "bf16", model, tok, train_config={"stage": "mine"})
    loaded, _, config = load_model(tmp_path / "bf16")
    assert loaded.matmul_precision == "bf16" and config["train"]["precision"] == "bf16"
    x = np.arange(6, dtype=np.int32)[None] % tok.vocab_size
    assert np.array_equal(loaded.forward(x)[0], model.forward(x)[0])
    # A train_config that names a precision keeps it.
    save_run(tmp_path / "named", model, tok, train_config={"precision": "fp32"})
    assert load_model(tmp_path / "named")[0].matmul_precision == "fp32"


def test_files_are_safetensors_and_json_no_pickle(gpt, tok, tmp_path):
    run = tmp_path / "run"
    model = _model(gpt, tok)
    _save(run, model, tok)
    d = _ckpt(run)
    for name in ("model.safetensors", "optimizer.safetensors"):
        raw = (d / name).read_bytes()
        assert not raw.startswith(b"\x80")  # pickle protocol 2+ opcode
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])  # safetensors: 8-byte length, JSON header, raw data
        assert header["__metadata__"]["format"] == "lmlab"
    weights = safetensors.numpy.load_file(str(d / "model.safetensors"))
    assert set(weights) == set(model.named_parameters())
    assert {"wte", "wpe", "h.0.attn.c_attn.weight", "h.1.mlp.c_proj.bias", "ln_f.weight"} <= set(weights)
    assert weights["h.0.attn.c_attn.weight"].shape == (3 * 8, 8)
    for name in ("config.json", "state.json", "tokenizer.json"):
        json.loads((d / name).read_text(encoding="utf-8"))


def test_train_config_may_be_a_dataclass_and_optimizer_state_optional(gpt, tok, tmp_path):
    @dataclasses.dataclass
    class Cfg:
        lr: float = 3e-4
        steps: int = 2

    run = tmp_path / "run"
    model = _model(gpt, tok)
    save_run(run, model, tok, train_config=Cfg(), optimizer=None, state={"step": 2})
    assert not (_ckpt(run) / "optimizer.safetensors").exists()
    assert load_model(run)[2]["train"] == {"lr": 3e-4, "steps": 2, "precision": "fp32"}
    assert load_training_state(run) == ({}, {"step": 2})


def test_written_files_have_normal_permissions(gpt, tok, tmp_path):
    run = tmp_path / "run"
    _save(run, _model(gpt, tok), tok)
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(_ckpt(run)) + ["../../current.json"]:
        assert os.stat(_ckpt(run) / name).st_mode & 0o777 == 0o666 & ~umask


def test_a_save_leaves_a_users_own_files_beside_the_run(gpt, tok, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("mine")
    for step in (1, 2):
        _save(run, _model(gpt, tok), tok, step=step)
    assert (run / "config.json").read_text() == "mine"
    assert checkpoint.current_checkpoint(run).name == "step_000002"


def test_a_run_named_through_a_symbolic_link_loads(gpt, tok, tmp_path):
    """runs/latest -> runs/exp3: the link names the run directory itself, not a place inside it,
    and was read as "holds no checkpoint (no current.json, no model.safetensors)", so sample and
    --resume told the user the run they pointed at had none."""
    run = tmp_path / "exp3"
    _save(run, _model(gpt, tok), tok, step=5)
    (tmp_path / "latest").symlink_to("exp3")
    link = tmp_path / "latest"
    assert checkpoint.current_checkpoint(link) == link / "checkpoints" / "step_000005"
    assert load_model(link)[0].params.tobytes() == load_model(run)[0].params.tobytes()
    assert load_training_state(link)[1]["step"] == 5
    flat = tmp_path / "flat"
    write_flat(flat, weights=_model(gpt, tok).named_parameters(), tokenizer_json=tok.to_str(),
               config=checkpoint.read_config(run))
    (tmp_path / "flat-link").symlink_to("flat")
    assert checkpoint.current_checkpoint(tmp_path / "flat-link") == tmp_path / "flat-link"
    load_model(tmp_path / "flat-link")


def test_extra_files_are_part_of_the_checkpoint(gpt, tok, tmp_path):
    run = tmp_path / "run"
    save_run(run, _model(gpt, tok), tok, train_config={}, files={"head.bin": b"\x01\x02"})
    assert checkpoint.read_checkpoint_file(run, "head.bin") == b"\x01\x02"
    (_ckpt(run) / "head.bin").write_bytes(b"\x01\x03")
    with pytest.raises(CheckpointError, match=r"head.bin is corrupted or truncated"):
        checkpoint.read_checkpoint_file(run, "head.bin")
    for bad in ("config.json", "../x", ".hidden", "model.safetensors"):
        with pytest.raises(ValueError, match="not a name an extra checkpoint file can have"):
            save_run(run, _model(gpt, tok), tok, train_config={}, files={bad: b""})


# -- one unit: interrupted and failed saves ------------------------------------------------------


def test_atomic_write_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old content")

    def torn(f):
        f.write(b"new con")
        raise OSError("disk full")

    with pytest.raises(CheckpointError, match=f"cannot write {path}: disk full"):
        atomic_write(path, torn)
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["f.bin"]  # the temporary file is removed


def test_atomic_write_never_replaces_a_device_fifo_or_directory(tmp_path):
    """Renaming over /dev/null (a --png or --out a user points there) would put a regular file
    where the device was: refused in one line, the device untouched, nothing left behind."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "folder").mkdir()
    for target, kind in ((fifo, "a device, FIFO or socket"), (tmp_path / "folder", "a directory")):
        with pytest.raises(CheckpointError, match=f"cannot write {target}: it is {kind}"):
            atomic_write_bytes(target, b"content")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["folder", "pipe"]


def test_the_next_write_of_a_file_removes_temporaries_killed_writers_abandoned(tmp_path):
    """A write killed before its rename leaves .<name>.<random>.tmp (as large as the file: a
    token cache of a big corpus); the next write of that file removes it once no writer has
    touched it for ABANDONED_AFTER_S, and leaves a fresh one (a live writer's) and other files."""
    from lmlab.files import ABANDONED_AFTER_S
    path = tmp_path / "cache.int32"
    stale, fresh = tmp_path / ".cache.int32.abcd1234.tmp", tmp_path / ".cache.int32.live5678.tmp"
    other = tmp_path / ".other.int32.abcd1234.tmp"
    for p in (stale, fresh, other):
        p.write_bytes(b"partial")
    old = time.time() - ABANDONED_AFTER_S - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    atomic_write_bytes(path, b"ids")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, fresh.name, other.name])


def _interrupt_save_at(monkeypatch, n, exc):
    """Make the n-th filesystem step of the next save (a file written, a rename, the pointer
    replaced) raise `exc` instead."""
    from lmlab import files

    calls = {"n": 0}

    def step(real):
        def wrapped(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise exc
            return real(*a, **k)
        return wrapped

    monkeypatch.setattr(checkpoint, "write_new_file", step(files.write_new_file))
    monkeypatch.setattr(checkpoint.os, "rename", step(os.rename))
    monkeypatch.setattr(checkpoint, "atomic_write_json", step(files.atomic_write_json))
    return calls


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_a_save_interrupted_at_any_step_leaves_the_previous_checkpoint_current(gpt, tok, tmp_path,
                                                                               monkeypatch, exc):
    run = tmp_path / "run"
    old = _model(gpt, tok, seed=1)
    _save(run, old, tok, step=5)
    before = _files(run)
    steps = 7  # five files, the rename into place, current.json
    for n in range(1, steps + 1):
        with monkeypatch.context() as mp:
            calls = _interrupt_save_at(mp, n, exc)
            with pytest.raises(type(exc) if isinstance(exc, KeyboardInterrupt) else CheckpointError) as e:
                _save(run, _model(gpt, tok, seed=2), tok, step=6)
            assert calls["n"] == n
        if not isinstance(exc, KeyboardInterrupt):
            assert "No space left on device" in str(e.value)
            assert str(e.value).endswith("the checkpoint step_000005 stays current")
        assert _files(run) == before, n  # nothing left behind, nothing changed
        loaded, _, _ = load_model(run)
        assert np.array_equal(_bits(loaded.params), _bits(old.params))
        assert load_training_state(run)[1]["step"] == 5
    with monkeypatch.context() as mp:  # one step more than a save has: the save completes
        calls = _interrupt_save_at(mp, steps + 1, KeyboardInterrupt())
        _save(run, _model(gpt, tok, seed=2), tok, step=6)
    assert load_training_state(run)[1]["step"] == 6


def test_a_kill_after_the_rename_leaves_a_complete_orphan_that_the_next_save_replaces(gpt, tok, tmp_path):
    run = tmp_path / "run"
    _save(run, _model(gpt, tok, seed=1), tok, step=5)
    pointer = (run / "current.json").read_bytes()
    _save(run, _model(gpt, tok, seed=2), tok, step=6)
    (run / "current.json").write_bytes(pointer)  # what SIGKILL between the rename and the pointer leaves
    assert load_training_state(run)[1]["step"] == 5
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [5, 6]
    newer = _model(gpt, tok, seed=3)
    _save(run, newer, tok, step=6)  # the resumed run saves step 6 again
    assert np.array_equal(_bits(load_model(run)[0].params), _bits(newer.params))
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000005", "step_000006"]


def test_a_reader_keeps_to_the_checkpoint_it_resolved_while_a_save_moves_current(gpt, tok, tmp_path,
                                                                                  monkeypatch):
    # A training process (or MPI rank 0 finishing its save as the others are stopped) can make
    # a new checkpoint current while another process loads the run: every file the reader takes
    # must come from the checkpoint it resolved first, never one checkpoint's weights against the
    # next one's config (which reads as "corrupted").
    run = tmp_path / "run"
    first, second = _model(gpt, tok, seed=1), _model(gpt, tok, seed=2)
    _save(run, first, tok, step=3)
    resolve = checkpoint.current_checkpoint

    def resolve_then_save(run_dir):
        d = resolve(run_dir)
        if d.name == "step_000003":  # the concurrent save lands right after the reader resolved
            monkeypatch.setattr(checkpoint, "current_checkpoint", resolve)
            _save(run, second, tok, step=6)
        return d

    monkeypatch.setattr(checkpoint, "current_checkpoint", resolve_then_save)
    model, _, config = load_model(run)
    assert _ckpt(run).name == "step_000006"  # the save did move current on
    np.testing.assert_array_equal(_bits(model.params), _bits(first.params))  # step 3's, whole
    assert config["checkpoint"]["step"] == 3

    shutil.rmtree(run)
    _save(run, first, tok, step=3)
    monkeypatch.setattr(checkpoint, "current_checkpoint", resolve_then_save)
    optimizer, state = load_training_state(run)
    assert _ckpt(run).name == "step_000006"
    assert (optimizer["m"] == 3).all() and state["step"] == 3  # _save fills m with the step


def test_keep_prunes_old_checkpoints_and_resaving_a_step_goes_beside_it(gpt, tok, tmp_path):
    run = tmp_path / "run"
    model = _model(gpt, tok)
    for step in range(1, 7):
        _save(run, model, tok, step=step, keep=3)
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000004", "step_000005", "step_000006"]
    _save(run, model, tok, step=6, keep=3)  # the same step again: never written over the current
    assert json.loads((run / "current.json").read_text())["checkpoint"] == "step_000006.1"
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000004", "step_000005", "step_000006.1"]
    for step in range(7, 9):
        _save(run, model, tok, step=step, keep=0)
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [4, 5, 6, 7, 8]
    _save(run, model, tok, step=6, keep=None)  # a resumed run going back: later steps are dropped
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [4, 5, 6]


# -- the flat layout of older runs -------------------------------------------------------------------


def _flat(gpt, tok, run, step=5, seed=1):
    model = _model(gpt, tok, seed=seed)
    n = model.params.size
    opt = {"m": np.full(n, step, np.float32), "v": np.arange(n, dtype=np.float32) / 7}
    config = {"lmlab_version": "0.1.0", "model": dataclasses.asdict(model.config),
              "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size},
              "train": {"lr": 1e-3}, "parent": None, "extra": {}}
    save_id = write_flat(run, weights=model.named_parameters(), tokenizer_json=tok.to_str(),
                         config=config, optimizer=opt, state={"step": step})
    return model, opt, save_id


def test_a_failed_save_into_a_flat_layout_run_keeps_it(gpt, tok, tmp_path, monkeypatch):
    run = tmp_path / "run"
    model, _, _ = _flat(gpt, tok, run)
    before = _files(run)
    with monkeypatch.context() as mp:
        _interrupt_save_at(mp, 2, OSError(errno.ENOSPC, "No space left on device"))
        with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint stays current"):
            _save(run, _model(gpt, tok, seed=2), tok, step=6)
    assert _files(run) == before
    assert np.array_equal(_bits(load_model(run)[0].params), _bits(model.params))


def test_a_flat_layout_run_loads_and_its_next_save_moves_it_into_checkpoints(gpt, tok, tmp_path):
    run = tmp_path / "run"
    model, opt, _ = _flat(gpt, tok, run)
    write_flat(run / "checkpoints" / "step_000003", weights=_model(gpt, tok, seed=3).named_parameters(),
               tokenizer_json=tok.to_str(), config=checkpoint.read_config(run))
    assert is_run(run) and checkpoint.current_checkpoint(run) == run
    loaded, _, config = load_model(run)
    assert np.array_equal(_bits(loaded.params), _bits(model.params)) and config["train"] == {"lr": 1e-3}
    lopt, state = load_training_state(run)
    assert state == {"step": 5} and np.array_equal(_bits(lopt["v"]), _bits(opt["v"]))
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [3]  # an old weights-only snapshot
    newer = _model(gpt, tok, seed=2)
    _save(run, newer, tok, step=6)
    assert sorted(os.listdir(run)) == ["checkpoints", "current.json"]
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000003", "step_000006"]
    assert np.array_equal(_bits(load_model(run)[0].params), _bits(newer.params))


def test_a_flat_layout_save_interrupted_between_files_is_detected(gpt, tok, tmp_path):
    run = tmp_path / "run"
    _flat(gpt, tok, run, step=5, seed=1)
    state_json = (run / "state.json").read_bytes()
    _flat(gpt, tok, run, step=6, seed=2)  # main died after the weights, before state.json
    (run / "state.json").write_bytes(state_json)
    with pytest.raises(CheckpointError, match="come from different saves"):
        load_training_state(run)


# -- every file read is checked ----------------------------------------------------------------------


def _rewrite(run, name, data: bytes):
    """Replace one file of the current checkpoint and record it in the manifest, as a save would:
    the checks that follow are the ones on the content, not the checksum."""
    d = _ckpt(run)
    (d / name).write_bytes(data)
    cfg = json.loads((d / "config.json").read_text())
    cfg["checkpoint"]["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / "config.json").write_text(json.dumps(cfg))


def _refused_after_rewrite(run, name, data, message, load=load_model):
    """`name` rewritten as `data` makes `load` fail with `message`, naming the file."""
    _rewrite(run, name, data)
    with pytest.raises(CheckpointError, match=message) as e:
        load(run)
    assert str(_ckpt(run) / name) in str(e.value)


def _edit_config(run, edit):
    path = _ckpt(run) / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))
    return cfg


@pytest.mark.parametrize("run", [None, 3, b"runs/base"])
def test_load_model_refuses_a_run_that_is_no_path(run):
    # os.fspath's own TypeError ("expected str, bytes or os.PathLike object, not NoneType") named
    # neither the run directory nor what it takes; bytes passed it and failed in pathlib.
    with pytest.raises(RunDirError, match=r"the run directory must be a path \(a str or "
                                          rf"os.PathLike\), got {type(run).__name__}"):
        load_model(run)


def test_load_model_missing_dir_and_files(gpt, tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        load_model(tmp_path / "empty")
    run = tmp_path / "run"
    _save(run, _model(gpt, tok), tok)
    os.remove(_ckpt(run) / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json"):
        load_model(run)
    os.remove(_ckpt(run) / "state.json")
    with pytest.raises(FileNotFoundError, match="missing state.json"):
        load_training_state(run)
    _save(run, _model(gpt, tok), tok, step=6)
    shutil.rmtree(_ckpt(run))
    with pytest.raises(CheckpointError, match=r"current.json names checkpoints/step_000006, which is missing; "
                                              r"the newest checkpoint there is checkpoints/step_000005 \(write "
                                              r'\{"checkpoint": "step_000005"\} into current.json to use it\)'):
        load_model(run)
    (run / "current.json").write_text('{"checkpoint": "../../etc"}')
    with pytest.raises(CheckpointError, match=r"current.json does not name a checkpoint"):
        load_model(run)


def test_load_model_shape_mismatch(gpt, tok, tmp_path):
    run = tmp_path / "run"
    _save(run, _model(gpt, tok), tok)
    _edit_config(run, lambda c: c["model"].update(n_embd=16))
    with pytest.raises(CheckpointError) as e:
        load_model(run)
    assert "tensor 'wte' has shape (%d, 8)" % tok.vocab_size in str(e.value)
    assert "needs (%d, 16)" % tok.vocab_size in str(e.value)


def test_load_model_tensor_set_and_config_fields_checked(gpt, tok, tmp_path):
    run = tmp_path / "run"
    _save(run, _model(gpt, tok), tok)
    _edit_config(run, lambda c: c["model"].update(n_layer=3))
    with pytest.raises(CheckpointError, match=r"missing tensors \['h\.2\."):
        load_model(run)
    _edit_config(run, lambda c: c["model"].update(n_layer=2, rotary=True))
    with pytest.raises(CheckpointError, match=r"does not know: \['rotary'\]"):
        load_model(run)
    (_ckpt(run) / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(run)
    # A hand-edited number past Python's digit limit was a ValueError that named no file.
    (_ckpt(run) / "config.json").write_text('{"model": {"n_layer": ' + "9" * 5000 + "}}")
    with pytest.raises(CheckpointError, match="config.json: a number with too many digits"):
        load_model(run)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"].update(vocab_size=10**12), r"model.vocab_size must be an integer in \[1, 2097152\], got 1000000000000"),
    (lambda c: c["model"].update(n_layer="2"), r"model.n_layer must be an integer in \[1, 1024\], got '2'"),
    (lambda c: c["model"].update(n_embd=True), r"model.n_embd must be an integer .* got True"),
    (lambda c: c["model"].update(n_head=0), r"model.n_head must be an integer in \[1, 32768\], got 0"),
    (lambda c: c["model"].update(vocab_size=2**21, n_embd=2**12, n_head=1), r"describes 8,.* parameters, more than"),
    (lambda c: c["model"].pop("vocab_size"), "model config lacks vocab_size"),
    (lambda c: c.update(model=[1, 2]), r'has no "model" section'),
    (lambda c: c.update(tokenizer={"kind": "word", "vocab_size": 3}), r'"tokenizer" must be'),
    (lambda c: c.update(train=5), r'"train" must be an object or null, got int'),
    (lambda c: c.update(extra="x"), r'"extra" must be an object or null, got str'),
    (lambda c: c.update(parent=3), r'"parent" must be a string or null, got int'),
    (lambda c: c["checkpoint"].update(files=[]), r'"checkpoint.files" must map'),
])
def test_config_json_sections_types_and_bounds_are_checked_before_allocating(gpt, tok, tmp_path, edit, message):
    run = tmp_path / "run"
    _save(run, _model(gpt, tok), tok)
    _edit_config(run, edit)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=message) as e:
            load_model(run)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith(str(_ckpt(run) / "config.json"))
    assert peak < 4 << 20  # refused before the model (and its weights) were allocated


def _safetensors(tensors: dict) -> bytes:
    return safetensors.numpy.save(tensors)


@pytest.mark.parametrize("case", ["empty", "short", "header_cut", "data_cut", "random", "huge_header",
                                  "f64", "shape", "extra_bytes", "nan"])
def test_a_damaged_model_safetensors_is_named_with_its_fault(gpt, tok, tmp_path, case):
    run = tmp_path / "run"
    model = _model(gpt, tok)
    _save(run, model, tok)
    raw = (_ckpt(run) / "model.safetensors").read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    named = {k: v.copy() for k, v in model.named_parameters().items()}
    data, message = {
        "empty": (b"", "is truncated: 0 bytes"),
        "short": (raw[:5], "is truncated: 5 bytes"),
        "header_cut": (raw[:8 + hlen // 2], "is truncated or not a safetensors file"),
        "data_cut": (raw[:-10], "is truncated: the header describes"),
        "random": (np.random.default_rng(0).bytes(len(raw)), "is truncated or not a safetensors file"),
        "huge_header": ((1 << 62).to_bytes(8, "little") + raw[8:], "its header claims 4611686018427387904 bytes"),
        "f64": (_safetensors({k: v.astype(np.float64) for k, v in named.items()}),
                "has dtype F64, expected F32"),
        "shape": (_safetensors({**named, "wpe": named["wpe"][:3]}), r"tensor 'wpe' has shape \(3, 8\)"),
        "extra_bytes": (raw + b"\0" * 8, "is longer than its header says"),
        "nan": (_safetensors({**named, "ln_f.bias": np.full_like(named["ln_f.bias"], np.nan)}),
                "tensor 'ln_f.bias' holds NaN or infinite values"),
    }[case]
    _refused_after_rewrite(run, "model.safetensors", data, message)


def test_a_changed_file_fails_its_checksum(gpt, tok, tmp_path):
    run = tmp_path / "run"
    _save(run, _model(gpt, tok), tok)
    path = _ckpt(run) / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # one bit of one weight: still a valid file of finite floats
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupted: its SHA-256 differs"):
        load_model(run)
    path.write_bytes(bytes(raw[:-4]))
    with pytest.raises(CheckpointError, match=r"model.safetensors is \d+ bytes, but config.json recorded"):
        load_model(run)
    opt = _ckpt(run) / "optimizer.safetensors"
    raw = bytearray(opt.read_bytes())
    raw[-4] ^= 0x01  # the lowest mantissa bit of the last float
    opt.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors is corrupted"):
        load_training_state(run)


def test_tokenizer_must_match_the_models_vocabulary_exactly(gpt, tok, tmp_path):
    run = tmp_path / "run"
    _save(run, _model(gpt, tok), tok)
    small = train_tokenizer("abc", "char")
    _rewrite(run, "tokenizer.json", small.to_str().encode())
    with pytest.raises(CheckpointError, match=rf"tokenizer.json is a char tokenizer of {small.vocab_size} ids, "
                                              rf"but the model .* has vocab_size {tok.vocab_size}"):
        load_model(run)
    for data, message in [(b"\xff\xfe", "not UTF-8"), (b"{}", "not a valid tokenizer.json"),
                          (b"[1, 2", "not a valid tokenizer.json")]:
        _refused_after_rewrite(run, "tokenizer.json", data, message)


def test_state_json_is_checked(gpt, tok, tmp_path):
    run = tmp_path / "run"
    _save(run, _model(gpt, tok), tok)
    for data, message in [(b"[]", "is not an lmlab state file"), (b'{"state": 3}', "is not an lmlab state file"),
                          (b"{", "state.json: not valid JSON"),
                          (b'{"state": {"step": -1}}', "step must be an integer >= 0, got -1")]:
        _refused_after_rewrite(run, "state.json", data, message, load=load_training_state)


def test_save_run_rejects_non_float32_weights(tok, tmp_path):
    class Bad:
        config = GPTConfig(vocab_size=5)

        def named_parameters(self):
            return {"wte": np.zeros((5, 2), np.float64)}

    with pytest.raises(TypeError, match="float32"):
        save_run(tmp_path / "run", Bad(), tok, train_config={})


# -- metrics and plot -----------------------------------------------------------------------------


def test_metrics_append_read_and_torn_tail(tmp_path):
    assert read_metrics(tmp_path) == []
    append_metrics(tmp_path, {"step": 1, "loss": np.float32(2.5), "lr": 1e-3})
    append_metrics(tmp_path, {"step": 2, "loss": 2.25, "val_loss": 2.4})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.5, "lr": 1e-3},
                                      {"step": 2, "loss": 2.25, "val_loss": 2.4}]
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')  # a crash in the middle of a line
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    append_metrics(tmp_path, {"step": 3, "loss": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert path.read_text().count("\n") == 3
    truncate_metrics(tmp_path, 2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 2.0}')  # cut between the row and its newline: a whole row
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    truncate_metrics(tmp_path, 2)  # so a resume from step 2 drops it, as any later row
    append_metrics(tmp_path, {"step": 3, "loss": 1.5})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)][2:] == [(3, 1.5)]


@pytest.mark.parametrize("content", [b"my notes, no final newline", b"\x89PNG\r\n\x1a\n\x00\x01"])
def test_append_line_never_cuts_off_a_file_lmlab_did_not_write(tmp_path, content):
    """Only a record lmlab began ("{") and a kill cut short counts as a torn last line: a text or
    binary file without a final newline, given by mistake, was truncated as one."""
    from lmlab.errors import CheckpointError
    from lmlab.files import append_line, complete_lines

    path = tmp_path / "notes.jsonl"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not JSON and was not written by lmlab"):
        append_line(path, b'{"step": 1}\n')
    assert path.read_bytes() == content
    assert complete_lines(content) == content.split(b"\n")  # kept, for the reader to report
    assert complete_lines(b'{"a": 1}\n{"a": 2, "b') == [b'{"a": 1}']  # a torn record: skipped


def test_metrics_corrupt_line_names_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not valid JSON"):
        read_metrics(tmp_path)


def test_plot_loss_writes_png(tmp_path):
    assert plot_loss(tmp_path) is None and not (tmp_path / "loss.png").exists()
    for step in range(1, 41):
        row = {"step": step, "loss": 4.0 / step ** 0.5, "lr": 1e-3 * min(1, step / 10), "tokens_per_s": 1e4}
        if step % 10 == 0:
            row["val_loss"] = 4.2 / step ** 0.5
        append_metrics(tmp_path, row)
    out = plot_loss(tmp_path)
    assert out == os.path.join(str(tmp_path), "loss.png")
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    img = matplotlib.image.imread(str(tmp_path / "loss.png"))
    assert img.shape[:2] == (400, 700)
    # Content, not just a blank canvas: the lines leave many distinct colours.
    assert len(np.unique(img.reshape(-1, img.shape[2]), axis=0)) > 20
    assert sorted(os.listdir(tmp_path)) == ["loss.png", "metrics.jsonl"]


def test_checkpoint_module_has_no_pickle():
    with open(checkpoint.__file__, encoding="utf-8") as f:
        src = f.read()
    assert "import pickle" not in src and "np.load(" not in src and "allow_pickle" not in src


def test_checkpoint_tensor_files_are_safetensors_the_library_reads(gpt, tok, tmp_path):
    """save_run writes model.safetensors and optimizer.safetensors itself, straight from the
    arrays (tensorfile.safetensors_chunks); the safetensors library must read back the same bits."""
    from safetensors.numpy import load_file

    model = _model(gpt, tok, seed=3)
    _save(tmp_path / "run", model, tok, step=2)
    ckpt = tmp_path / "run/checkpoints/step_000002"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert sorted(weights) == sorted(model.named_parameters())
    for name, a in model.named_parameters().items():
        assert np.array_equal(_bits(weights[name]), _bits(a)), name
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    assert np.array_equal(opt["v"], np.arange(model.params.size, dtype=np.float32) / 7)
