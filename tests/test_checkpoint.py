"""Run directories: bitwise checkpoint round trips, atomic writes, no pickle, metrics, loss plot.

Uses the real lmlab.model when it is importable; otherwise a stand-in GPT with the same names,
shapes and flat-buffer layout is installed as lmlab.model for the duration of a test.
"""

import dataclasses
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import safetensors.numpy

from lmlab import checkpoint
from lmlab.checkpoint import (append_metrics, load_model, load_training_state,
                              plot_loss, read_metrics, save_run, truncate_metrics)
from lmlab.errors import CheckpointError
from lmlab.files import atomic_write, atomic_write_bytes
from lmlab.tokenizer import Tokenizer, train_tokenizer


# -- a stand-in for lmlab.model (used only while the real one is not importable) -------------------


@dataclasses.dataclass
class StandInConfig:
    vocab_size: int
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128


class StandInGPT:
    def __init__(self, config, seed=0):
        V, C, T = config.vocab_size, config.n_embd, config.block_size
        shapes = [("wte", (V, C)), ("wpe", (T, C))]
        for i in range(config.n_layer):
            p = f"h.{i}."
            shapes += [(p + "ln_1.weight", (C,)), (p + "ln_1.bias", (C,)),
                       (p + "attn.c_attn.weight", (3 * C, C)), (p + "attn.c_attn.bias", (3 * C,)),
                       (p + "attn.c_proj.weight", (C, C)), (p + "attn.c_proj.bias", (C,)),
                       (p + "ln_2.weight", (C,)), (p + "ln_2.bias", (C,)),
                       (p + "mlp.c_fc.weight", (4 * C, C)), (p + "mlp.c_fc.bias", (4 * C,)),
                       (p + "mlp.c_proj.weight", (C, 4 * C)), (p + "mlp.c_proj.bias", (C,))]
        shapes += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
        self.config = config
        self.params = np.random.default_rng(seed).standard_normal(sum(math.prod(s) for _, s in shapes),
                                                                  dtype=np.float32)
        self._named, off = {}, 0
        for name, shape in shapes:
            self._named[name] = self.params[off:off + math.prod(shape)].reshape(shape)
            off += math.prod(shape)

    def named_parameters(self):
        return dict(self._named)


@pytest.fixture
def gpt(monkeypatch):
    """(GPT, GPTConfig): the real model classes, or the stand-ins installed as lmlab.model."""
    try:
        from lmlab.model import GPT, GPTConfig
        return GPT, GPTConfig
    except ImportError:
        fake = types.ModuleType("lmlab.model")
        fake.GPT, fake.GPTConfig = StandInGPT, StandInConfig
        monkeypatch.setitem(sys.modules, "lmlab.model", fake)
        return StandInGPT, StandInConfig


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


# -- round trips ----------------------------------------------------------------------------------


def test_save_load_round_trip_is_bitwise(gpt, tok, tmp_path):
    run = tmp_path / "run"
    model = _model(gpt, tok)
    opt, state = _save(run, model, tok, parent="runs/base", extra={"chat_template": "x"})
    assert sorted(os.listdir(run)) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                       "state.json", "tokenizer.json"]
    loaded, ltok, config = load_model(run)
    assert np.array_equal(_bits(loaded.params), _bits(model.params))
    for name, view in model.named_parameters().items():
        assert np.array_equal(_bits(loaded.named_parameters()[name]), _bits(view))
    assert dataclasses.asdict(loaded.config) == dataclasses.asdict(model.config)
    assert ltok.to_str() == tok.to_str() and ltok.encode("hello").tolist() == tok.encode("hello").tolist()
    from lmlab import __version__
    assert config["lmlab_version"] == __version__
    assert config["train"] == {"lr": 1e-3, "steps": 10} and config["parent"] == "runs/base"
    assert config["tokenizer"] == {"kind": "char", "vocab_size": tok.vocab_size}
    assert config["extra"] == {"chat_template": "x"}
    lopt, lstate = load_training_state(run)
    assert sorted(lopt) == ["m", "v"]
    for k in opt:
        assert lopt[k].dtype == opt[k].dtype and np.array_equal(_bits(lopt[k]), _bits(opt[k]))
    assert lstate == {"step": 5, "rng": {"state": 2**100 + 7}, "loss": 1.25, "sampler": {"batches": 5}}


def test_files_are_safetensors_and_json_no_pickle(gpt, tok, tmp_path):
    run = tmp_path / "run"
    model = _model(gpt, tok)
    _save(run, model, tok)
    for name in ("model.safetensors", "optimizer.safetensors"):
        raw = (run / name).read_bytes()
        assert not raw.startswith(b"\x80")  # pickle protocol 2+ opcode
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + header_len])  # safetensors: 8-byte length, JSON header, raw data
        assert header["__metadata__"]["format"] == "lmlab"
    weights = safetensors.numpy.load_file(str(run / "model.safetensors"))
    assert set(weights) == set(model.named_parameters())
    assert {"wte", "wpe", "h.0.attn.c_attn.weight", "h.1.mlp.c_proj.bias", "ln_f.weight"} <= set(weights)
    assert weights["h.0.attn.c_attn.weight"].shape == (3 * 8, 8)
    for name in ("config.json", "state.json", "tokenizer.json"):
        json.loads((run / name).read_text(encoding="utf-8"))


def test_train_config_may_be_a_dataclass_and_optimizer_state_optional(gpt, tok, tmp_path):
    @dataclasses.dataclass
    class Cfg:
        lr: float = 3e-4
        steps: int = 2

    run = tmp_path / "run"
    model = _model(gpt, tok)
    save_run(run, model, tok, train_config=Cfg(), optimizer=None, state={"step": 2})
    assert not (run / "optimizer.safetensors").exists()
    assert load_model(run)[2]["train"] == {"lr": 3e-4, "steps": 2}
    assert load_training_state(run) == ({}, {"step": 2})


def test_written_files_have_normal_permissions(gpt, tok, tmp_path):
    run = tmp_path / "run"
    _save(run, _model(gpt, tok), tok)
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(run):
        assert os.stat(run / name).st_mode & 0o777 == 0o666 & ~umask


# -- atomicity ------------------------------------------------------------------------------------


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


def test_failed_checkpoint_write_keeps_previous_checkpoint(gpt, tok, tmp_path, monkeypatch):
    run = tmp_path / "run"
    old = _model(gpt, tok, seed=1)
    _save(run, old, tok, step=5)
    before = {n: (run / n).read_bytes() for n in os.listdir(run)}
    real_save = safetensors.numpy.save

    def half_written(tensors, metadata=None):
        real_save(tensors, metadata=metadata)
        raise KeyboardInterrupt  # Ctrl-C while the weights are being written

    with monkeypatch.context() as mp:
        mp.setattr(safetensors.numpy, "save", half_written)
        with pytest.raises(KeyboardInterrupt):
            _save(run, _model(gpt, tok, seed=2), tok, step=6)
    assert {n: (run / n).read_bytes() for n in os.listdir(run)} == before
    loaded, _, _ = load_model(run)
    assert np.array_equal(_bits(loaded.params), _bits(old.params))
    assert load_training_state(run)[1]["step"] == 5


def test_save_interrupted_between_files_is_detected(gpt, tok, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _save(run, _model(gpt, tok, seed=1), tok, step=5)

    def crash(*a, **k):
        raise KeyboardInterrupt

    # The new weights and optimiser state land, then the save dies before state.json.
    monkeypatch.setattr(Tokenizer, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(run, _model(gpt, tok, seed=2), tok, step=6)
    with pytest.raises(ValueError, match="come from different saves"):
        load_training_state(run)


# -- load errors ----------------------------------------------------------------------------------


def test_load_model_missing_dir_and_files(gpt, tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        load_model(tmp_path / "nope")
    run = tmp_path / "run"
    _save(run, _model(gpt, tok), tok)
    os.remove(run / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="missing tokenizer.json"):
        load_model(run)
    os.remove(run / "state.json")
    with pytest.raises(FileNotFoundError, match="missing state.json"):
        load_training_state(run)


def _saved_with_edited_model_config(gpt, tok, tmp_path, **changes):
    """A saved run whose config.json's model section was then edited; returns (run, config)."""
    run = tmp_path / "run"
    _save(run, _model(gpt, tok), tok)
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"].update(changes)
    (run / "config.json").write_text(json.dumps(cfg))
    return run, cfg


def test_load_model_shape_mismatch(gpt, tok, tmp_path):
    run, _ = _saved_with_edited_model_config(gpt, tok, tmp_path, n_embd=16)
    with pytest.raises(ValueError) as e:
        load_model(run)
    assert "tensor 'wte' has shape (%d, 8)" % tok.vocab_size in str(e.value)
    assert "needs (%d, 16)" % tok.vocab_size in str(e.value)


def test_load_model_tensor_set_and_config_fields_checked(gpt, tok, tmp_path):
    run, cfg = _saved_with_edited_model_config(gpt, tok, tmp_path, n_layer=3)
    with pytest.raises(ValueError, match=r"missing tensors \['h\.2\."):
        load_model(run)
    cfg["model"]["n_layer"] = 2
    cfg["model"]["rotary"] = True
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"does not know: \['rotary'\]"):
        load_model(run)
    (run / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(run)


def test_save_run_rejects_non_float32_weights(tok, tmp_path):
    class Bad:
        config = StandInConfig(vocab_size=5)

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
