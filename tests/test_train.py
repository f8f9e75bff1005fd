"""The shared training loop: schedule, learning, exact resume, Ctrl-C, NaN stop, freezing,
gradient accumulation, and the bf16 matmul precision (learning, thread determinism, resume)."""

from __future__ import annotations

import math
import signal

import numpy as np
import pytest

from lmlab import checkpoint, metrics, ops
from lmlab.errors import CheckpointError, RunDirError
from lmlab.model import GPT, GPTConfig
from lmlab.pretrain import LanguageModelingStage, pretrain
from lmlab.tokenizer import train_tokenizer
from lmlab.train import NonFiniteLoss, TrainConfig, lr_at, train

TEXT = ("the quick brown fox jumps over the lazy dog. "
        "pack my box with five dozen liquor jugs. ") * 40


def tiny_setup(seed=0, block_size=16):
    tok = train_tokenizer(TEXT, "char")
    ids = tok.encode(TEXT)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=16)
    return tok, ids, GPT(cfg, seed=seed)


def quiet(**kw):
    base = dict(steps=30, lr=3e-3, warmup_steps=5, eval_every=10, save_every=10, log_every=5,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


class FixedBatchStage:
    """One fixed batch every micro-step: the gradient of every micro-batch is the same."""

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.weights = np.full(x.shape, 1.0 / x.size, dtype=np.float32)

    def train_step(self, model):
        _, losses = model.forward(self.x, self.y)
        return {"loss": float(losses.mean()), "tokens": self.x.size, "weights": self.weights}

    def evaluate(self, model):
        _, losses = model.forward(self.x, self.y)
        return {"val_loss": float(losses.mean())}

    def state_dict(self):
        return {}

    def load_state_dict(self, d):
        pass


def test_schedule_warmup_cosine_floor():
    cfg = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    # halfway through the cosine phase the rate is midway between lr and min_lr
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    after = [lr_at(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_a_run_shorter_than_its_warmup_says_it_never_reaches_the_peak_rate(tmp_path, capsys):
    """steps < warmup_steps is allowed, with a note at the start naming the highest rate reached;
    a run long enough to reach lr gets no note."""
    tok, ids, model = tiny_setup()
    stage = LanguageModelingStage(ids, ids, 2, 16, seed=0, eval_batches=1)
    train(model, stage, quiet(steps=2, warmup_steps=100, eval_every=0), tmp_path / "short",
          tokenizer=tok)
    assert ("lmlab: note: steps 2 < warmup_steps 100: the learning rate warms up only to 6e-05, "
            "never reaching lr 0.003") in capsys.readouterr().err
    train(model, stage, quiet(steps=2, warmup_steps=2, eval_every=0), tmp_path / "full",
          tokenizer=tok)
    assert "warmup" not in capsys.readouterr().err


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16 .*got 'fp16'"):
        TrainConfig(precision="fp16")
    assert TrainConfig().precision == "fp32"
    assert TrainConfig(precision=ops.Precision.BF16).precision == "bf16"  # kept by name


def test_loss_falls_well_below_start(tmp_path):
    tok, ids, model = tiny_setup()
    stage = LanguageModelingStage(ids[:1500], ids[1500:], 8, 16, seed=1)
    start = stage.evaluate(model)["val_loss"]
    result = train(model, stage, quiet(steps=150), tmp_path / "run", tokenizer=tok)
    assert result.val_loss < 0.5 * start
    rows = metrics.read_metrics(tmp_path / "run")
    assert rows[-1]["step"] == 150 and "val_loss" in rows[-1]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Crash(Exception):
    pass


def on_call(stage, n, *, before=None, after=None):
    """Wrap stage.train_step so that its n-th call runs before() first, or after(out) on its result."""
    original, calls = stage.train_step, {"n": 0}

    def wrapped(model):
        calls["n"] += 1
        if calls["n"] == n and before is not None:
            before()
        out = original(model)
        if calls["n"] == n and after is not None:
            after(out)
        return out

    stage.train_step = wrapped


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_matches_uninterrupted_run_bitwise(tmp_path, capsys, precision):
    tok, ids, model_a = tiny_setup()
    stage_a = LanguageModelingStage(ids[:1500], ids[1500:], 4, 16, seed=3)
    train(model_a, stage_a, quiet(precision=precision), tmp_path / "a", tokenizer=tok)

    # The same run, killed by an exception during step 25 (checkpoint at 20), then resumed.
    _, _, model_b = tiny_setup()
    stage_b = LanguageModelingStage(ids[:1500], ids[1500:], 4, 16, seed=3)

    def crash():
        raise Crash

    on_call(stage_b, 25, before=crash)
    with pytest.raises(Crash):
        train(model_b, stage_b, quiet(precision=precision), tmp_path / "b", tokenizer=tok)
    _, state = checkpoint.load_training_state(tmp_path / "b")
    assert state["step"] == 20
    assert checkpoint.read_config(tmp_path / "b")["train"]["precision"] == precision

    # Resumed with the default config (precision "fp32"): the run keeps its own precision.
    _, _, model_c = tiny_setup(seed=99)  # different init: resume must overwrite everything
    stage_c = LanguageModelingStage(ids[:1500], ids[1500:], 4, 16, seed=3)
    capsys.readouterr()
    train(model_c, stage_c, quiet(), tmp_path / "b", tokenizer=tok, resume=True)
    note = capsys.readouterr().err
    assert (f"resuming in {precision}" in note) == (precision != "fp32")
    assert model_c.matmul_precision == precision
    assert checkpoint.read_config(tmp_path / "b")["train"]["precision"] == precision
    assert np.array_equal(model_a.params, model_c.params)
    steps_a = [r["step"] for r in metrics.read_metrics(tmp_path / "a")]
    steps_b = [r["step"] for r in metrics.read_metrics(tmp_path / "b")]
    assert steps_a == steps_b
    loss_a = [r["loss"] for r in metrics.read_metrics(tmp_path / "a")]
    loss_b = [r["loss"] for r in metrics.read_metrics(tmp_path / "b")]
    assert loss_a == loss_b


def test_a_resume_on_data_changed_since_the_checkpoint_says_so(tmp_path, capsys):
    """A corpus edited between a run and its resume: training went on silently on other data,
    where a resume promises to continue the run exactly. Each checkpoint keeps a hash of the
    data; a resume on other data notes it (and one on the same data says nothing)."""
    tok, ids, model = tiny_setup()
    run = tmp_path / "run"
    train(model, LanguageModelingStage(ids[:1500], ids[1500:], 4, 16, seed=3), quiet(steps=10), run,
          tokenizer=tok)
    assert checkpoint.load_training_state(run)[1]["data"]
    capsys.readouterr()
    train(model, LanguageModelingStage(ids[:1500], ids[1500:], 4, 16, seed=3), quiet(steps=12), run,
          tokenizer=tok, resume=True)
    assert "not what" not in capsys.readouterr().err
    edited = ids.copy()
    edited[100] = (edited[100] + 1) % tok.vocab_size
    train(model, LanguageModelingStage(edited[:1500], edited[1500:], 4, 16, seed=3),
          quiet(steps=14), run, tokenizer=tok, resume=True)
    err = capsys.readouterr().err
    assert f"the training data is not what {run} was trained on up to step 12" in err
    assert checkpoint.load_training_state(run)[1]["step"] == 14


def test_a_resume_on_a_corpus_grown_since_the_checkpoint_notes_it_and_continues(tmp_path, capsys):
    """Text appended to a corpus between a run and its resume changes the number of tokens: the
    resume was refused as a damaged state.json ('does not hold this stage's trainer state'),
    where an edit of the same length was noted and trained on. Both are noted, and the run goes
    on, on the text as it is now."""
    tok, ids, model = tiny_setup()
    run = tmp_path / "run"
    train(model, LanguageModelingStage(ids[:1500], ids[1500:], 4, 16, seed=3), quiet(steps=10), run,
          tokenizer=tok)
    capsys.readouterr()
    grown = np.concatenate([ids[:1500], ids[:200]])
    train(model, LanguageModelingStage(grown, ids[1500:], 4, 16, seed=3), quiet(steps=12), run,
          tokenizer=tok, resume=True)
    assert f"the training data is not what {run} was trained on up to step 10" in capsys.readouterr().err
    assert checkpoint.load_training_state(run)[1]["step"] == 12


def test_resume_reads_the_weights_into_the_model_it_is_given(tmp_path):
    """train(resume=True) fills the caller's model (no second one) and refuses another config."""
    tok, ids, model = tiny_setup()
    stage = LanguageModelingStage(ids[:1500], ids[1500:], 4, 16, seed=3)
    train(model, stage, quiet(steps=10), tmp_path / "run", tokenizer=tok)
    _, _, other = tiny_setup(seed=7)
    params = other.params
    train(other, LanguageModelingStage(ids[:1500], ids[1500:], 4, 16, seed=3), quiet(steps=10),
          tmp_path / "run", tokenizer=tok, resume=True)
    assert other.params is params and np.array_equal(other.params, model.params)
    wider = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(CheckpointError, match="run's own model config"):
        train(wider, LanguageModelingStage(ids[:1500], ids[1500:], 4, 16, seed=3),
              quiet(steps=20), tmp_path / "run", tokenizer=tok, resume=True)


def test_ctrl_c_stops_after_the_step_and_saves(tmp_path):
    tok, ids, model = tiny_setup()
    stage = LanguageModelingStage(ids[:1500], ids[1500:], 4, 16, seed=3)
    on_call(stage, 7, before=lambda: signal.raise_signal(signal.SIGINT))
    result = train(model, stage, quiet(steps=100), tmp_path / "run", tokenizer=tok)
    assert result.stopped_early and result.steps_done == 7
    _, state = checkpoint.load_training_state(tmp_path / "run")
    assert state["step"] == 7
    saved, _, _ = checkpoint.load_model(tmp_path / "run")
    assert np.array_equal(saved.params, model.params)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# NaN at the stage's 14th call (step 13, after the checkpoint at step 10) and at its 3rd (step 2,
# before any): the message used to name "the last good checkpoint in RUN" of a run that had none.
@pytest.mark.parametrize("call,step,saved", [(14, 13, 10), (3, 2, None)])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, call, step, saved):
    tok, ids, model = tiny_setup()
    stage = LanguageModelingStage(ids[:1500], ids[1500:], 4, 16, seed=3)
    on_call(stage, call, after=lambda out: out.update(loss=float("nan")))
    with pytest.raises(NonFiniteLoss, match=f"step {step}") as stopped:
        train(model, stage, quiet(steps=100), tmp_path / "run", tokenizer=tok)
    if saved is None:
        assert "it had saved no checkpoint yet" in str(stopped.value)
        assert "is kept" not in str(stopped.value)
        return
    assert f"the last good checkpoint in {tmp_path / 'run'} is kept" in str(stopped.value)
    _, state = checkpoint.load_training_state(tmp_path / "run")
    assert state["step"] == saved
    saved_model, _, _ = checkpoint.load_model(tmp_path / "run")
    assert np.all(np.isfinite(saved_model.params))


def test_frozen_parameters_do_not_move(tmp_path):
    tok, ids, model = tiny_setup()
    before = {k: v.copy() for k, v in model.named_parameters().items()}
    stage = LanguageModelingStage(ids[:1500], ids[1500:], 4, 16, seed=3)
    train(model, stage, quiet(steps=10, frozen=["h.0.", "wpe"]), tmp_path / "run", tokenizer=tok)
    for name, value in model.named_parameters().items():
        if name.startswith("h.0.") or name == "wpe":
            assert np.array_equal(value, before[name]), name
        elif name.endswith("weight") and value.ndim == 2:
            assert not np.array_equal(value, before[name]), name


def test_gradient_accumulation_averages_micro_batches(tmp_path):
    tok, ids, _ = tiny_setup()
    x = ids[:4 * 16].reshape(4, 16).astype(np.int32)
    y = ids[1:4 * 16 + 1].reshape(4, 16).astype(np.int32)
    results = []
    for accum in (1, 3):
        _, _, model = tiny_setup()
        train(model, FixedBatchStage(x, y), quiet(steps=3, grad_accum=accum, grad_clip=0.0),
              tmp_path / f"run{accum}", tokenizer=tok)
        results.append(model.params.copy())
    # Three identical micro-batches weighted 1/3 each give the single batch's gradient (to float
    # rounding of the three-way sum).
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=1e-6)


def test_pretrain_api_end_to_end_and_refuses_to_overwrite(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    run = tmp_path / "run"
    result = pretrain(str(corpus), run, n_layer=1, n_head=2, n_embd=16, block_size=16,
                      batch_size=4, steps=20, eval_every=10, save_every=10, progress=False)
    assert result.steps_done == 20 and math.isfinite(result.final_loss)
    config = checkpoint.read_config(run)
    assert config["train"]["stage"] == "pretrain" and config["train"]["corpus"] == str(corpus)
    with pytest.raises(RunDirError, match="already holds a run; pass --resume"):
        pretrain(str(corpus), run, n_layer=1, n_head=2, n_embd=16, block_size=16, steps=5,
                 progress=False)
    # Resuming a finished run to a longer schedule continues from step 20, with the run's own
    # batch size and evaluation settings.
    more = pretrain(run_dir=run, steps=30, progress=False, resume=True)
    assert more.steps_done == 30


# --- bf16 matmul precision ----------------------------------------------------------------------------

def test_bf16_training_learns_like_fp32(tmp_path):
    results = {}
    for precision in ("fp32", "bf16"):
        tok, ids, model = tiny_setup()
        stage = LanguageModelingStage(ids[:1500], ids[1500:], 8, 16, seed=1)
        start = stage.evaluate(model)["val_loss"]
        results[precision] = train(model, stage, quiet(steps=150, precision=precision),
                                   tmp_path / precision, tokenizer=tok)
        assert results[precision].val_loss < 0.5 * start, precision
        saved, _, _ = checkpoint.load_model(tmp_path / precision)
        assert saved.matmul_precision == precision    # sampling a run computes as it trained
    # Same data, same init: bf16 rounding moves the end point only a little.
    assert results["bf16"].val_loss == pytest.approx(results["fp32"].val_loss, rel=0.02)


@pytest.mark.parametrize("variant", ["native", "avx2"])
def test_bf16_training_is_bitwise_identical_on_1_and_2_threads(tmp_path, variant):
    """On the native kernels (AMX tiles where present) and the emulated avx2 path."""
    if variant != "native" and variant not in ops.cpu_info()["available"]:
        pytest.skip(f"{variant} kernels do not run on this CPU")
    params = []
    for threads in (1, 2):
        tok, ids, model = tiny_setup()
        stage = LanguageModelingStage(ids[:1500], ids[1500:], 4, 16, seed=3)
        with ops.num_threads(threads), ops.use_isa(ops.cpu_info()["isa"] if variant == "native"
                                                    else variant):
            train(model, stage, quiet(steps=8, eval_every=0, precision="bf16"),
                  tmp_path / f"t{threads}", tokenizer=tok)
        params.append(model.params.copy())
    assert np.array_equal(params[0], params[1])
    tok, ids, model = tiny_setup()
    assert not np.array_equal(params[0], model.params)
