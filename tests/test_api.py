"""The top-level API (lmlab.pretrain / finetune / instruct / load and lmlab.Model) against what it
wraps: the stage functions and the command line give the same weights and losses for the same
settings, generate / next_token_distribution give the module functions' tokens and probabilities,
loss(text) equals a float64 numpy cross-entropy from the model's logits, bad keywords are refused,
and every docstring example runs."""

from __future__ import annotations

import doctest
import json
import subprocess
import sys

import numpy as np
import pytest

import lmlab
from lmlab import api, checkpoint, metrics, sample
from lmlab.checks import SettingError, UnknownSettingError
from lmlab.cli import main
from lmlab.finetune import finetune as finetune_module
from lmlab.instruct import instruct_tune as instruct_module
from lmlab.instruct import respond
from lmlab.pretrain import pretrain as pretrain_module

TEXT = "the cat sat on the mat. what is one plus one? two. what colour is the sky? blue. " * 30
QA = [("what is one plus one?", "two."), ("what colour is the sky?", "blue.")] * 6
# A tiny model and short schedules: every setting given as the command line's flag would be.
SHAPE = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, batch_size=4)
SCHEDULE = dict(steps=12, eval_every=6, warmup_steps=2, progress=False)


def _flags(settings: dict) -> list:
    out = []
    for name, value in settings.items():
        if name == "progress":
            out.append("--no-progress")
        else:
            out += ["--" + name.replace("_", "-"), str(value)]
    return out


def _same_weights(a, b) -> None:
    pa, pb = checkpoint.load_model(a)[0].named_parameters(), checkpoint.load_model(b)[0].named_parameters()
    assert pa.keys() == pb.keys()
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


def _losses(run) -> list:
    return [(r["step"], r["loss"], r.get("val_loss")) for r in metrics.read_metrics(run)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    (root / "corpus.txt").write_text(TEXT)
    (root / "style.txt").write_text("the sky is blue. the mat is one. " * 30)
    (root / "qa.jsonl").write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n"
                                           for q, a in QA))
    return root


@pytest.fixture(scope="module")
def base(root):
    """A run pretrained through the API."""
    return lmlab.pretrain(str(root / "corpus.txt"), root / "base", **SHAPE, **SCHEDULE)


def test_pretrain_equals_the_module_function_and_the_command_line(root, base):
    assert isinstance(base, lmlab.Model) and base.result.steps_done == SCHEDULE["steps"]
    via_module = pretrain_module(str(root / "corpus.txt"), root / "base_module", **SHAPE, **SCHEDULE)
    assert main(["pretrain", "--corpus", str(root / "corpus.txt"), "--run", str(root / "base_cli")]
                + _flags({**SHAPE, **SCHEDULE})) == 0
    for other in ("base_module", "base_cli"):
        _same_weights(root / "base", root / other)
        assert _losses(root / "base") == _losses(root / other)
    assert base.result.final_loss == via_module.final_loss
    assert base.result.val_loss == via_module.val_loss


def test_finetune_equals_the_module_function_and_the_command_line(root, base):
    settings = dict(steps=8, eval_every=4, warmup_steps=1, progress=False)
    bard = lmlab.finetune(base, str(root / "style.txt"), out=root / "ft", sample_tokens=10,
                          **settings)
    via_module = finetune_module(root / "base", str(root / "style.txt"), root / "ft_module",
                                 sample_tokens=10, **settings)
    assert main(["finetune", str(root / "base"), "--corpus", str(root / "style.txt"), "--out",
                 str(root / "ft_cli"), "--sample-tokens", "10"] + _flags(settings)) == 0
    for other in ("ft_module", "ft_cli"):
        _same_weights(root / "ft", root / other)
        assert _losses(root / "ft") == _losses(root / other)
    assert bard.result.details == via_module.details
    assert bard.result.details["new_val_after"] < bard.result.details["new_val_before"]


def test_instruct_equals_the_module_function_and_the_command_line(root, base):
    settings = dict(steps=8, eval_every=4, warmup_steps=1, batch_size=4, progress=False)
    qa = lmlab.instruct(root / "base", str(root / "qa.jsonl"), out=root / "qa", **settings)
    instruct_module(root / "base", str(root / "qa.jsonl"), root / "qa_module", **settings)
    assert main(["instruct", str(root / "base"), "--data", str(root / "qa.jsonl"), "--out",
                 str(root / "qa_cli")] + _flags(settings)) == 0
    for other in ("qa_module", "qa_cli"):
        _same_weights(root / "qa", root / other)
        assert _losses(root / "qa") == _losses(root / other)
    # An instruct-tuned run answers through its chat template, as respond() and `lmlab sample` do.
    assert qa.chat and not base.chat
    question = "what is one plus one?"
    text, _, _ = respond(qa.gpt, qa.tokenizer, [{"role": "user", "content": question}],
                         max_new_tokens=12, temperature=0)
    assert qa.generate(question, max_new_tokens=12, temperature=0) == text


def test_generate_equals_the_module_function_and_lmlab_sample(root, base, capsys):
    model = lmlab.load(root / "base")
    ids = model.tokenizer.encode("the ")
    greedy = model.tokenizer.decode(sample.generate(model.gpt, ids, 30, temperature=0))
    assert model.generate("the ", max_new_tokens=30, temperature=0) == greedy
    sampled = model.tokenizer.decode(sample.generate(model.gpt, ids, 30, temperature=0.8,
                                                     top_k=5, seed=7))
    assert model.generate("the ", max_new_tokens=30, top_k=5, seed=7) == sampled
    for extra, kwargs in ([], dict(seed=3)), (["--temperature", "0"], dict(temperature=0)):
        assert main(["sample", str(root / "base"), "--prompt", "the ", "--max-new-tokens", "30",
                     "--no-stream", "--seed", "3"] + extra) == 0
        printed = capsys.readouterr().out
        assert printed == "the " + model.generate("the ", max_new_tokens=30, **kwargs) + "\n"


def test_generate_stop_string_cuts_like_lmlab_sample(root, base, capsys):
    text = base.generate("the ", max_new_tokens=40, temperature=0, stop=" ")
    assert " " not in text
    assert main(["sample", str(root / "base"), "--prompt", "the ", "--max-new-tokens", "40",
                 "--temperature", "0", "--stop", " ", "--no-stream"]) == 0
    assert capsys.readouterr().out == "the " + text + "\n"


def test_generated_text_is_decoded_once_not_again_at_every_token(root, base, capsys,
                                                                 monkeypatch):
    """Long generations took time quadratic in their length: the whole text was decoded again
    after every token (to stream it, or to look for the stop string). Each id is decoded about
    once now, and the text is the same as one decode of all the ids."""
    from lmlab.tokenizer import Tokenizer
    decoded = []
    original = Tokenizer.decode
    monkeypatch.setattr(Tokenizer, "decode", lambda self, ids: decoded.append(len(ids)) or
                        original(self, ids))
    ids = base.tokenizer.encode("the ")
    new = sample.generate(base.gpt, ids, 200, temperature=0)
    assert new.size >= 20
    reference = original(base.tokenizer, new)
    decoded.clear()
    assert base.generate("the ", max_new_tokens=200, temperature=0, stop="@never@") == reference
    assert sum(decoded) <= 2 * new.size
    for extra in ([], ["--no-stream"], ["--stop", "@never@"]):
        decoded.clear()
        assert main(["sample", str(root / "base"), "--prompt", "the ", "--max-new-tokens", "200",
                     "--temperature", "0"] + extra) == 0
        assert capsys.readouterr().out == "the " + reference + "\n"
        assert sum(decoded) <= 2 * new.size


def test_next_token_distribution_equals_the_module_function_and_lmlab_predict(root, base, capsys):
    dist = base.next_token_distribution("the c")
    ids = base.tokenizer.encode("the c")
    np.testing.assert_array_equal(dist.probs, sample.next_token_distribution(base.gpt, ids))
    assert len(dist) == base.tokenizer.vocab_size and abs(dist.probs.sum() - 1) < 1e-12
    assert main(["predict", str(root / "base"), "--prompt", "the c", "--top-k", "6", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert dist.top(6) == [(r["token"], r["probability"]) for r in rows]
    assert dist.most_likely() == rows[0]["token"]
    assert dist[rows[1]["token"]] == rows[1]["probability"]


def test_next_token_distribution_answers_in_and_is_not_iterated_by_index(base):
    """dist["e"] reads like a dict, so `"e" in dist` must answer (not fall back to dist[0], dist[1],
    ... and fail with "token must be text"), and iterating it is refused by name."""
    dist = base.next_token_distribution("the c")
    assert "a" in dist and "<|end|>" in dist
    assert "ab" not in dist and "" not in dist and "\u00e9" not in dist and 3 not in dist
    with pytest.raises(TypeError, match="not iterable"):
        list(dist)


def _numpy_losses(model, ids) -> np.ndarray:
    """-log p of each next token, from the model's logits, in float64 numpy, window by window."""
    T = model.gpt.config.block_size
    out = []
    for s in range(0, len(ids) - 1, T):
        y = ids[s + 1: s + 1 + T]
        logits, _ = model.gpt.forward(ids[s: s + len(y)][None, :])
        z = logits[0].astype(np.float64)
        logsumexp = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        out.append(logsumexp - z[np.arange(len(y)), y])
    return np.concatenate(out)


@pytest.mark.parametrize("text", ["the cat sat on the mat.", TEXT[:150]])  # one window; five
def test_loss_is_the_mean_cross_entropy_of_the_logits(base, text):
    expected = _numpy_losses(base, base.tokenizer.encode(text))
    per_token = base.token_losses(text)
    assert [t for t, _ in per_token] == list(text[1:])
    np.testing.assert_allclose([v for _, v in per_token], expected, rtol=1e-12, atol=1e-12)
    assert abs(base.loss(text) - expected.mean()) < 1e-12
    # The training kernel's own float32 cross-entropy agrees to float32 precision.
    ids = base.tokenizer.encode(text)[:33]
    _, kernel = base.gpt.forward(ids[None, :-1], ids[None, 1:])
    np.testing.assert_allclose(kernel[0], expected[:32], rtol=1e-5, atol=1e-5)


def test_bad_keywords_and_values_are_refused_before_any_work(root, base):
    for call in (lambda: lmlab.pretrain(str(root / "corpus.txt"), root / "never", setps=3),
                 lambda: lmlab.finetune(base, str(root / "style.txt"), out=root / "never", lrr=1),
                 lambda: lmlab.instruct(base, out=root / "never", batchsize=2)):
        with pytest.raises(ValueError, match=r"unknown keyword\(s\) '(setps|lrr|batchsize)' "
                                             r"\(did you mean '(steps|lr|batch_size)'\?\)") as e:
            call()
        assert isinstance(e.value, (TypeError, UnknownSettingError))
    with pytest.raises(SettingError, match="lr=-1"):
        lmlab.pretrain(str(root / "corpus.txt"), root / "never", lr=-1)
    # The stage modules' names for the run directories: Python's own error named a parameter these
    # functions do not have.
    for call, name, ours in (
            (lambda: lmlab.pretrain(str(root / "corpus.txt"), run_dir=root / "never"), "run_dir", "run"),
            (lambda: lmlab.finetune(base, "x", out=root / "never", parent=base), "parent", "run"),
            (lambda: lmlab.instruct(base, out=root / "never", run_dir=root / "n2"), "run_dir", "out")):
        with pytest.raises(UnknownSettingError, match=f"unknown keyword '{name}': its run "
                                                      f"directory is '{ours}'"):
            call()
    with pytest.raises(ValueError, match="run must be a run directory"):
        lmlab.finetune(42, "x", out=root / "never")
    assert not (root / "never").exists()
    with pytest.raises(SettingError, match="top_k=0"):
        base.generate("the ", top_k=0)
    with pytest.raises(SettingError, match="temperature=-1"):
        base.generate("the ", temperature=-1)
    with pytest.raises(ValueError, match="prompt must be text"):
        base.generate(b"the ")
    with pytest.raises(SettingError, match="raw='False' is not allowed: expected True or False"):
        base.generate("the ", raw="False")    # a string is true: it would have meant raw=True
    with pytest.raises(ValueError, match="at least 2 tokens"):
        base.loss("t")
    with pytest.raises(ValueError, match="cannot represent: '\u00e9'"):
        base.loss("the \u00e9t\u00e9")
    with pytest.raises(ValueError, match="k must be a positive whole number"):
        base.next_token_distribution("the").top(0)
    with pytest.raises(KeyError, match="not one"):
        base.next_token_distribution("the")["th"]
    with pytest.raises(FileNotFoundError):
        lmlab.load(root / "missing")
    class PathLike:  # any os.PathLike names a run, as Path does
        def __fspath__(self):
            return str(root / "base")
    assert lmlab.load(PathLike()).run == root / "base"
    for bad in (3, None):
        with pytest.raises(ValueError, match="run must be a run directory"):
            lmlab.load(bad)
        with pytest.raises(ValueError, match="run must be a run directory"):
            lmlab.Model(bad)


def test_help_and_signature_of_the_callable_stage_modules_describe_the_call():
    """lmlab.pretrain is both the stage's module and the API function: help() and
    inspect.signature show what calling it does (the API's Model-returning function) first."""
    import inspect
    import pydoc
    for name in ("pretrain", "finetune", "instruct"):
        module, function = getattr(lmlab, name), getattr(api, name)
        assert inspect.signature(module) == inspect.signature(function)
        text = pydoc.render_doc(module, renderer=pydoc.plaintext)
        assert f"lmlab.{name}{inspect.signature(function)}" in text
        assert inspect.cleandoc(function.__doc__).splitlines()[0] in text
        # The module's own docstring follows, still reachable.
        own = sys.modules[f"lmlab.{name}"].__dict__["__doc__"]
        assert inspect.cleandoc(own).splitlines()[0] in text


def test_import_stays_light_and_stage_modules_are_callable():
    code = ("import sys, lmlab; print('lmlab.api' in sys.modules); import lmlab.pretrain; "
            "print(callable(lmlab.pretrain), callable(lmlab.finetune), lmlab.load.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True", "lmlab.api"]


def test_docstring_examples_run(root, base, tmp_path):
    found = doctest.DocTestFinder().find(api)
    extraglobs = {"lmlab": lmlab, "RUN": str(root / "base"), "model": base, "base": base,
                  "tmp": str(tmp_path)}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in found:
        test.globs.update(extraglobs)
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0
    assert results.attempted >= 12
