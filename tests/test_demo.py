"""Tests of the teaching views (lmlab.demo): numbers against closed forms and independent loops, files on disk.

Every view runs headless (drawing goes to the Agg canvas) into a pytest tmp directory.
"""

from __future__ import annotations

import argparse
import math
import os
import re

import numpy as np
import pytest

from lmlab import demo
from lmlab.cli import demo as cli_demo
from lmlab.demo_common import format_table, token_label
from lmlab.demo_descent import bumpy, bumpy_slope, double_well, double_well_slope

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"


def gif_frames(path) -> int:
    from PIL import Image

    assert path.read_bytes()[:6] in (b"GIF89a", b"GIF87a"), f"{path} is not a GIF"
    with Image.open(path) as im:
        return im.n_frames


# ---------------------------------------------------------------------------------------------
# descent


@pytest.fixture(scope="module")
def descent_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("descent")
    return demo.descent(out, lrs=[0.05, 0.3, 0.9, 1.05, 0.25], lr=0.5, start=-3.0, steps=12, gif=False)


def test_descent_paths_equal_closed_form(descent_result):
    runs = descent_result.numbers["runs"]
    assert [r["lr"] for r in runs] == [0.05, 0.3, 0.9, 1.05, 0.25, 0.5]
    n = np.arange(13)
    for r in runs:
        expected = -3.0 * (1 - 2 * r["lr"]) ** n  # x_n = x0 (1 - 2 lr)^n
        np.testing.assert_allclose(r["xs"], expected, rtol=1e-12, atol=1e-15, err_msg=f"lr={r['lr']}")
        np.testing.assert_allclose(r["losses"], expected**2, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(r["step_sizes"], -r["lr"] * 2 * expected[:-1], rtol=1e-12, atol=1e-15)


def test_descent_converges_below_lr_1_and_diverges_above(descent_result):
    for r in descent_result.numbers["runs"]:
        a = np.abs(r["xs"])
        if r["lr"] == 0.5:
            assert a[1] == 0.0 and a[-1] == 0.0
        elif 0 < r["lr"] < 1:
            assert np.all(a[1:] < a[:-1]), f"lr={r['lr']} should shrink |x| every step"
        else:
            assert np.all(a[1:] > a[:-1]), f"lr={r['lr']} should grow |x| every step"
    regimes = {r["lr"]: r["regime"] for r in descent_result.numbers["runs"]}
    assert regimes == {0.05: "slow, steady", 0.3: "good: fast and steady", 0.9: "overshoots, oscillates",
                       1.05: "diverges", 0.25: "good: fast and steady", 0.5: "good: fast and steady"}
    assert [r["yours"] for r in descent_result.numbers["runs"]] == [False] * 5 + [True]


def test_descent_writes_files_and_explains(descent_result):
    assert_png(descent_result.files["figure"])
    assert "animation" not in descent_result.files
    text = descent_result.files["text"].read_text(encoding="utf-8")
    assert "(1 - 2 lr)" in text and "lr=1.05: diverges" in text
    report = descent_result.report()
    assert str(descent_result.files["figure"]) in report
    # the printed table carries every x of the 0.9 path
    for x in descent_result.numbers["runs"][2]["xs"]:
        assert format_table(["x"], [[float(x)]]).splitlines()[-1].strip() in descent_result.table


def test_descent_gif_has_one_frame_per_step(tmp_path):
    result = demo.descent(tmp_path, lrs=[0.3, 1.05], start=2.0, steps=4)
    assert gif_frames(result.files["animation"]) == 5
    assert_png(result.files["figure"])


def test_descent_stops_a_runaway_path(tmp_path):
    result = demo.descent(tmp_path, lrs=[50.0], steps=400, gif=False)
    xs = result.numbers["runs"][0]["xs"]
    assert np.all(np.isfinite(xs)) and len(xs) < 401 and abs(xs[-1]) > 1e12
    assert result.numbers["runs"][0]["regime"] == "diverges"


def test_descent_edge_regimes(tmp_path):
    result = demo.descent(tmp_path, lrs=[1.0, 0.1], start=0.0, steps=3, gif=False)
    assert [r["regime"] for r in result.numbers["runs"]] == ["already at the minimum"] * 2
    result = demo.descent(tmp_path, lrs=[1.0], start=1.0, steps=3, gif=False)
    np.testing.assert_array_equal(result.numbers["runs"][0]["xs"], [1.0, -1.0, 1.0, -1.0])
    assert result.numbers["runs"][0]["regime"] == "never settles"


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(steps=0), ValueError, "steps must be in 1..1,000, got 0"),
        (dict(steps=1001), ValueError, "steps must be in 1..1,000, got 1001"),  # a frame a step
        (dict(steps=2.5), TypeError, "steps must be an integer"),
        (dict(start="four"), TypeError, "start must be a number"),
        (dict(lr=float("nan")), ValueError, "lr must be finite"),
        (dict(lrs=[]), ValueError, "at least one learning rate"),
    ],
)
def test_descent_rejects_bad_arguments(tmp_path, kwargs, error, words):
    with pytest.raises(error, match=words):
        demo.descent(tmp_path, gif=False, **kwargs)


def test_landscape_steps_are_bounded(tmp_path):
    """10**8 steps of a scalar optimiser in Python would run for hours: refused at once."""
    with pytest.raises(ValueError, match="steps must be in 1..10,000, got 100000000"):
        demo.landscape(tmp_path, steps=10**8, gif=False)


def test_out_must_be_a_directory(tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="out must be a directory"):
        demo.descent(f, gif=False)
    # A file above the directory: the error was "[Errno 20] Not a directory" or "[Errno 17] File
    # exists", an OSError with no line of its own.
    with pytest.raises(ValueError, match=re.escape(f"cannot write {f / 'sub' / 'descent.png'}: "
                                                   f"{f} is a file, not a directory")):
        demo.descent(f / "sub", gif=False)


# ---------------------------------------------------------------------------------------------
# landscape


def test_local_global_start_decides_the_end(tmp_path):
    result = demo.local_global(tmp_path, starts=(-2.0, 2.0), lr=0.02, steps=80)
    grid = np.linspace(-3, 3, 600_001)
    brute_global = grid[np.argmin(double_well(grid))]
    right = grid > 0.5
    brute_local = grid[right][np.argmin(double_well(grid[right]))]
    assert result.numbers["x_global"] == pytest.approx(brute_global, abs=1e-4)
    assert result.numbers["x_local"] == pytest.approx(brute_local, abs=1e-4)
    left_run, right_run = result.numbers["runs"]
    assert left_run["reached"] == "global" and left_run["end"] == pytest.approx(brute_global, abs=1e-3)
    assert right_run["reached"] == "local" and right_run["end"] == pytest.approx(brute_local, abs=1e-3)
    assert right_run["end_loss"] > left_run["end_loss"] + 2.0  # the local valley is much higher
    for run in (left_run, right_run):  # both ends are genuine stationary points
        assert abs(double_well_slope(run["end"])) < 1e-3
    assert_png(result.files["local_global"])


def test_erratic_small_lr_sticks_in_a_ripple(tmp_path):
    result = demo.erratic(tmp_path, start=3.0, lrs=(0.05, 0.3), steps=60)
    grid = np.linspace(-4, 4, 800_001)
    assert result.numbers["x_star"] == pytest.approx(grid[np.argmin(bumpy(grid))], abs=1e-4)
    small, large = result.numbers["runs"]
    assert abs(bumpy_slope(small["end"])) < 1e-6  # stopped: the slope is 0 there...
    assert small["end_loss"] > bumpy(result.numbers["x_star"]) + 1.0  # ...yet far above the bottom
    assert small["steps_to_min"] is None
    assert np.ptp(large["xs"][-20:]) > 0.5  # a large lr keeps being thrown about
    assert_png(result.files["erratic"])


def test_optimizer_updates_match_hand_computed_steps():
    from lmlab.demo_descent import optimise

    g0 = bumpy_slope(3.0)
    x1 = 3.0 - 0.01 * g0
    g1 = bumpy_slope(x1)
    np.testing.assert_allclose(optimise(bumpy_slope, 3.0, 2, "gd", 0.01), [3.0, x1, x1 - 0.01 * g1], rtol=1e-14)
    np.testing.assert_allclose(optimise(bumpy_slope, 3.0, 2, "momentum", 0.01, beta=0.9),
                               [3.0, x1, x1 - 0.01 * (0.9 * g0 + g1)], rtol=1e-14)
    # Adam's first bias-corrected step is lr * g / |g| (up to eps): exactly lr long, against the slope
    adam = optimise(bumpy_slope, 3.0, 1, "adam", 0.3)
    assert adam[1] == pytest.approx(3.0 - 0.3 * math.copysign(1.0, g0), abs=1e-7)
    with pytest.raises(ValueError, match="method must be"):
        optimise(bumpy_slope, 3.0, 1, "sgd")


def test_momentum_and_adam_beat_plain_gd_in_the_documented_case(tmp_path):
    result = demo.optimizers(tmp_path, steps=100, gif=False)
    runs = result.numbers["runs"]
    x_star = result.numbers["x_star"]
    assert runs["gd"]["steps_to_min"] is None and abs(runs["gd"]["end"] - x_star) > 1.0
    for key in ("momentum", "adam"):
        n = runs[key]["steps_to_min"]
        assert n is not None and n < 60, f"{key} should settle at the minimum, got {n}"
        assert np.all(np.abs(runs[key]["xs"][n:] - x_star) < 0.1)
        assert np.abs(runs[key]["xs"][n - 1] - x_star) >= 0.1
    assert_png(result.files["optimizers"])
    with pytest.raises(ValueError, match="momentum must be in"):
        demo.optimizers(tmp_path, momentum=1.0, gif=False)


def test_landscape_writes_every_picture_and_the_gif(tmp_path):
    result = demo.landscape(tmp_path, steps=12)
    for key in ("local_global", "erratic", "optimizers"):
        assert_png(result.files[key])
    assert gif_frames(result.files["animation"]) == 13
    assert "local and a global minimum" in result.files["text"].read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# command line and helpers


def build_parser():
    parser = argparse.ArgumentParser(prog="lmlab")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_demo.add_demo_arguments(sub)
    return parser


def test_cli_descent_runs_through_run_demo(tmp_path, capsys):
    args = build_parser().parse_args(
        ["demo", "descent", "--lr", "0.45", "--start", "2", "--steps", "5", "--no-gif", "--out", str(tmp_path)])
    assert args.func is cli_demo.run_demo
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "lr=0.45: good: fast and steady" in printed and "descent.png" in printed
    assert_png(tmp_path / "descent.png")


def test_cli_parses_every_view():
    parser = build_parser()
    a = parser.parse_args(["demo", "landscape", "--adam-lr", "0.2", "--momentum", "0.8"])
    assert (a.adam_lr, a.momentum, a.steps, a.out) == (0.2, 0.8, 100, "demo_out/landscape")
    a = parser.parse_args(["demo", "loss", "runs/x", "--text", "hello", "--color", "never"])
    assert (a.run, a.text, a.color) == ("runs/x", "hello", "never")
    a = parser.parse_args(["demo", "sampling", "r", "--prompt", "a", "--temperature", "0.7", "2", "--top-k", "3"])
    assert (a.temperature, a.top_k, a.top_p, a.samples) == ([0.7, 2.0], 3, 0.9, 4)
    a = parser.parse_args(["demo", "training", "r"])
    assert (a.run, a.prompt, a.seed) == ("r", "", 0)
    a = parser.parse_args(["demo", "embeddings", "r", "--token", "e", "-k", "3"])
    assert (a.token, a.neighbours) == ("e", 3)
    for bad in (["demo"], ["demo", "descent", "--steps", "0"], ["demo", "loss", "r"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_token_label_makes_whitespace_visible_and_escapes_mathtext():
    assert token_label(" a\n") == "\u2423a\u21b5"
    assert token_label("$x$") == "\\$x\\$"
    assert token_label("\x07") == "\\x07"
    assert token_label("") == "\u2205"
    assert token_label("$", for_plot=False) == "$"


# ---------------------------------------------------------------------------------------------
# views over a model: a tiny GPT and a char tokenizer built here (untrained: the views only need
# a model that computes real distributions)

CORPUS = "the quick brown fox jumps over the lazy dog. a cat sat on the mat. " * 4


@pytest.fixture(scope="module")
def tiny():
    from lmlab.model import GPT, GPTConfig
    from lmlab.tokenizer import train_tokenizer

    tok = train_tokenizer(CORPUS, "char")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=0)
    return model, tok


def softmax64(logits):
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def test_loss_mean_equals_the_models_loss_on_the_text(tiny, tmp_path):
    model, tok = tiny
    text = "the cat sat on th"  # 17 chars = 17 tokens: 16 predictions, exactly one block of 16
    result = demo.loss(tiny, text, tmp_path, colour=False)
    ids = tok.encode(text)
    _, losses = model.forward(ids[None, :-1], ids[None, 1:])
    assert result.numbers["mean_ce"] == pytest.approx(float(np.mean(losses, dtype=np.float64)), rel=1e-5)
    np.testing.assert_allclose(result.numbers["probs"], np.exp(-losses[0].astype(np.float64)), rtol=1e-4)
    np.testing.assert_allclose(result.numbers["ce"], -np.log(result.numbers["probs"]), rtol=1e-12)
    np.testing.assert_array_equal(result.numbers["targets"], ids[1:])
    assert_png(result.files["figure"])
    assert "\x1b[" not in result.table and "the model's own loss" in result.table


def test_loss_of_a_long_text_scores_each_window_with_its_own_context(tiny, tmp_path):
    from lmlab.sample import next_token_distribution

    model, tok = tiny
    text = CORPUS[:40]
    result = demo.loss(tiny, text, tmp_path, colour=True)
    ids = tok.encode(text)
    block = model.config.block_size
    expected = []
    for j in range(1, ids.size):  # prediction of ids[j] sees the window that contains position j-1
        start = block * ((j - 1) // block)
        expected.append(next_token_distribution(model, ids[start:j])[ids[j]])
    np.testing.assert_allclose(result.numbers["probs"], expected, rtol=1e-4)
    assert result.numbers["mean_ce"] == pytest.approx(-np.mean(np.log(expected)), rel=1e-5)
    assert result.numbers["model_loss"] == pytest.approx(result.numbers["mean_ce"], rel=1e-5)
    assert "\x1b[48;2;" in result.table  # coloured when asked


def test_loss_from_a_run_directory_and_bad_text(tiny, tmp_path):
    from lmlab.checkpoint import save_run

    model, tok = tiny
    save_run(tmp_path / "run", model, tok, train_config={})
    from_dir = demo.loss(str(tmp_path / "run"), "the lazy dog", tmp_path / "a", colour=False)
    from_pair = demo.loss(tiny, "the lazy dog", tmp_path / "b", colour=False)
    np.testing.assert_allclose(from_dir.numbers["probs"], from_pair.numbers["probs"], rtol=1e-6)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        demo.loss(tiny, "t", tmp_path)
    with pytest.raises(TypeError, match="run directory or a"):
        demo.loss(42, "the", tmp_path)


def test_confidence_colours_run_from_red_to_green():
    from lmlab.demo_common import confidence_rgb

    r0, g0, _ = confidence_rgb(0.0)
    r1, g1, _ = confidence_rgb(1.0)
    assert r0 > 150 and g0 < 100 and g1 > 150 and r1 < 100
    greens = [confidence_rgb(p)[1] - confidence_rgb(p)[0] for p in np.linspace(0, 1, 11)]
    assert all(b >= a for a, b in zip(greens, greens[1:]))


def test_sampling_distributions_sum_to_one_and_filters_keep_what_they_promise(tiny, tmp_path):
    model, tok = tiny
    result = demo.sampling(tiny, "the ", tmp_path, temperatures=(0.5, 2.0), top_k=4, top_p=0.3,
                           samples=3, seed=7, max_new_tokens=12, gif=False)
    logits, _ = model.forward(tok.encode("the ")[None, :])
    raw = softmax64(logits[0, -1])
    d = result.numbers["distributions"]
    assert list(d) == ["raw", "temperature=0.5", "temperature=2", "top_k=4", "top_p=0.3"]
    for name, dist in d.items():
        assert dist.sum() == pytest.approx(1.0, abs=1e-9), name
        assert np.all(dist >= 0)
    np.testing.assert_allclose(d["raw"], raw, rtol=1e-5)
    for t in (0.5, 2.0):
        ref = raw ** (1 / t) / np.sum(raw ** (1 / t))
        np.testing.assert_allclose(d[f"temperature={t:g}"], ref, rtol=1e-4)
    assert np.count_nonzero(d["top_k=4"]) == 4 == result.numbers["kept"]["top_k=4"]
    top4 = np.argsort(-raw)[:4]
    np.testing.assert_allclose(d["top_k=4"][top4], raw[top4] / raw[top4].sum(), rtol=1e-4)
    mass = np.cumsum(np.sort(raw)[::-1])
    assert np.count_nonzero(d["top_p=0.3"]) == int(np.argmax(mass >= 0.3)) + 1
    assert_png(result.files["figure"])
    assert_png(result.files["samples"])


def widened(model, spread: float, prompt_ids):
    """A copy of model whose next-token logits after prompt_ids span `spread` nats: ln_f's scale and
    shift multiplied, so every logit is multiplied by the same factor (the head has no bias)."""
    from lmlab.model import GPT

    logits, _ = model.forward(np.asarray(prompt_ids, np.int32)[None, :])
    factor = spread / float(np.ptp(logits[0, -1]))
    wide = GPT(model.config, seed=0)
    for name, w in wide.named_parameters().items():
        w[...] = model.named_parameters()[name] * (factor if name.startswith("ln_f.") else 1)
    return wide


def test_sampling_panels_are_what_generation_draws_from_even_for_logits_thousands_of_nats_apart(
        tiny, tmp_path):
    """Each panel is lmlab.sample.filter_logits of the model's logits: the distribution generate
    draws from. Logits 3000 nats apart: a token ~1000 nats below the top has probability 0 in
    float64 (the softmax underflows), yet at temperature 1000 it has e^-1 of the top's weight; shaping
    the probabilities kept it at 0, a panel that generation does not draw from."""
    from lmlab.sample import filter_logits

    model, tok = tiny
    ids = tok.encode("the ")
    wide = widened(model, 3000.0, ids)
    result = demo.sampling((wide, tok), "the ", tmp_path, temperatures=(0.5, 1000.0), top_k=4,
                           top_p=0.3, samples=1, seed=0, max_new_tokens=2, gif=False)
    logits = wide.forward(ids[None, :])[0][0, -1]
    assert np.ptp(logits) == pytest.approx(3000, rel=1e-3)
    d = result.numbers["distributions"]
    for key, settings in [("raw", {}), ("temperature=0.5", {"temperature": 0.5}),
                          ("temperature=1000", {"temperature": 1000.0}), ("top_k=4", {"top_k": 4}),
                          ("top_p=0.3", {"top_p": 0.3})]:
        np.testing.assert_allclose(d[key], filter_logits(logits, **settings), rtol=1e-12, atol=0,
                                   err_msg=key)
    gap = float(logits.max()) - np.asarray(logits, np.float64)
    lost = (gap > 800) & (gap < 1500)       # rounded to 0 by the softmax, well inside T = 1000
    assert lost.any() and not d["raw"][lost].any()
    hot = d["temperature=1000"]
    assert np.all(hot[lost] > 0.1 * hot.max())
    np.testing.assert_allclose(hot[lost] / hot.max(), np.exp(-gap[lost] / 1000), rtol=1e-9)
    assert result.numbers["kept"]["temperature=1000"] == tok.vocab_size
    np.testing.assert_array_equal(result.numbers["logits"], np.asarray(logits, np.float64))


def test_sampling_same_seed_same_text_different_seeds_differ(tiny, tmp_path):
    from lmlab.sample import generate

    model, tok = tiny
    result = demo.sampling(tiny, "a cat", tmp_path, samples=3, seed=11, max_new_tokens=20, gif=False)
    texts = dict(result.numbers["samples"])
    assert result.numbers["repeat_identical"] is True
    assert texts["seed 11 again"] == texts["seed 11"]
    assert len({texts["seed 11"], texts["seed 12"], texts["seed 13"]}) == 3
    # the shown sample is what generate gives for that seed
    assert texts["seed 12"] == tok.decode(generate(model, tok.encode("a cat"), 20, seed=12))
    assert "identical" in result.explanation


def test_sampling_gif_replays_the_first_sample_token_by_token(tiny, tmp_path):
    from lmlab.sample import generate

    model, tok = tiny
    result = demo.sampling(tiny, "the", tmp_path, samples=1, seed=5, max_new_tokens=6)
    steps = result.numbers["generation_steps"]
    expected = generate(model, tok.encode("the"), 6, seed=5)
    assert [st["chosen"] for st in steps] == expected.tolist()
    for i, st in enumerate(steps):
        assert st["probs"].sum() == pytest.approx(1.0, abs=1e-9)
        context = np.concatenate([tok.encode("the"), expected[:i]])
        logits, _ = model.forward(context[None, :])
        assert st["p_chosen"] == pytest.approx(softmax64(logits[0, -1])[st["chosen"]], rel=1e-5)
    assert gif_frames(result.files["animation"]) == 6


def test_sampling_rejects_bad_settings(tiny, tmp_path):
    with pytest.raises(ValueError, match="top_p must be in"):
        demo.sampling(tiny, "a", tmp_path, top_p=1.5)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        demo.sampling(tiny, "a", tmp_path, top_k=0)
    with pytest.raises(ValueError, match="samples must be in 1..100, got 10000000000"):
        demo.sampling(tiny, "a", tmp_path, samples=10**10)  # it sampled for ever


def write_metrics(path, steps, with_val=True, torn=False):
    import json

    lines = []
    for s in steps:
        row = {"step": s, "loss": 4.0 - 0.05 * s, "lr": 1e-3 * min(1.0, s / 10), "tokens_per_s": 1000.0}
        if with_val and s % 10 == 0:
            row["val_loss"] = 4.1 - 0.05 * s
        lines.append(json.dumps(row))
    text = "\n".join(lines) + "\n" + ('{"step": 99, "lo' if torn else "")
    path.write_text(text, encoding="utf-8")


def test_training_view_reads_metrics_and_samples_each_checkpoint(tiny, tmp_path):
    from lmlab.checkpoint import save_run
    from lmlab.model import GPT
    from lmlab.sample import generate

    model, tok = tiny
    run = tmp_path / "run"
    save_run(run, model, tok, train_config={})
    early = {}
    for step, seed in ((10, 1), (20, 2)):
        early[step] = GPT(model.config, seed=seed)
        save_run(run / "checkpoints" / f"step_{step:05d}", early[step], tok, train_config={})
    write_metrics(run / "metrics.jsonl", range(5, 31, 5), torn=True)
    result = demo.training(str(run), tmp_path / "out", prompt="the ", max_new_tokens=15, seed=3)
    n = result.numbers
    np.testing.assert_array_equal(n["steps"], [5, 10, 15, 20, 25, 30])
    np.testing.assert_allclose(n["loss"], [4.0 - 0.05 * s for s in (5, 10, 15, 20, 25, 30)])
    assert n["val"] == [(10, pytest.approx(3.6)), (20, pytest.approx(3.1)), (30, pytest.approx(2.6))]
    assert [s["step"] for s in n["samples"]] == [10, 20, 30]
    prompt = tok.encode("the ")
    assert n["samples"][0]["text"] == tok.decode(generate(early[10], prompt, 15, seed=3))
    assert n["samples"][2]["text"] == tok.decode(generate(model, prompt, 15, seed=3))
    assert_png(result.files["figure"])


def test_training_view_labels_the_final_sample_with_the_checkpoint_step(tiny, tmp_path):
    """A run stopped between logged rows (Ctrl-C at step 37, rows every 5) holds the step-37 model:
    its sample is labelled 37, not the last row's 35; a run killed after logging a row but before
    saving it holds an older model, labelled with that model's step."""
    from lmlab.checkpoint import save_run

    model, tok = tiny
    run = tmp_path / "run"
    for step, logged in ((37, range(5, 36, 5)), (50, range(5, 61, 5))):
        save_run(run, model, tok, train_config={}, state={"step": step})
        write_metrics(run / "metrics.jsonl", logged)
        result = demo.training(str(run), tmp_path / f"out{step}", max_new_tokens=3)
        assert [s["step"] for s in result.numbers["samples"]][-1] == step


def test_training_view_without_checkpoints_samples_the_final_model(tiny, tmp_path):
    from lmlab.checkpoint import save_run

    model, tok = tiny
    save_run(tmp_path / "run", model, tok, train_config={})
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        demo.training(str(tmp_path / "run"), tmp_path / "out")
    write_metrics(tmp_path / "run" / "metrics.jsonl", [1, 2, 3], with_val=False)
    result = demo.training(str(tmp_path / "run"), tmp_path / "out", max_new_tokens=5)
    assert [s["step"] for s in result.numbers["samples"]] == [3]
    assert result.numbers["val"] == [] and "final model only" in result.explanation
    # the final model is itself a checkpoints/step_N/ directory: the view said there were none
    assert list((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert "no checkpoints/step_*/" not in result.explanation
    assert "no checkpoint before the final model" in result.explanation
    pair = demo.training(tiny, tmp_path / "out2", metrics=tmp_path / "run" / "metrics.jsonl", max_new_tokens=5)
    assert pair.numbers["samples"][0]["text"] == result.numbers["samples"][0]["text"]


def test_training_view_samples_a_run_with_many_checkpoints_at_an_even_spread(tiny, tmp_path):
    """A run saved every step with --keep-checkpoints 0 holds a checkpoint per step: the view loaded
    and sampled every one and drew a line for each (60 checkpoints: a picture 3,000 pixels tall; a
    few thousand: none at all). It samples at most MAX_SAMPLED, from the first to the final model,
    spread evenly, and says so."""
    from lmlab import demo_training
    from lmlab.checkpoint import save_run
    from lmlab.model import GPT
    from lmlab.sample import generate

    model, tok = tiny
    run = tmp_path / "run"
    save_run(run, model, tok, train_config={}, state={"step": 40})
    models = {}
    for step in range(1, 40):
        models[step] = GPT(model.config, seed=step)
        save_run(run / "checkpoints" / f"step_{step:06d}", models[step], tok, train_config={})
    models[40] = model
    write_metrics(run / "metrics.jsonl", range(1, 41))
    result = demo.training(str(run), tmp_path / "out", prompt="the ", max_new_tokens=4, seed=1)
    sampled = [s["step"] for s in result.numbers["samples"]]
    most = demo_training.MAX_SAMPLED
    assert 2 <= most < 40 and len(sampled) == most
    assert sampled[0] == 1 and sampled[-1] == 40 and sampled == sorted(set(sampled))
    gaps = np.diff(sampled)
    assert gaps.max() - gaps.min() <= 1  # evenly spread over the 40 models
    for s in result.numbers["samples"]:
        assert s["text"] == tok.decode(generate(models[s["step"]], tok.encode("the "), 4, seed=1))
    assert result.numbers["checkpoints"] == 40
    assert f"{most} of the run's 40 checkpoints sampled" in result.explanation
    assert_png(result.files["figure"])


def test_training_view_says_what_a_stage_logs_as_its_loss(tiny, tmp_path, monkeypatch):
    # rlhf logs loss = -(reward - kl_coef * KL) (lmlab.rl): the axis called it a cross-entropy
    from lmlab import demo_training
    from lmlab.checkpoint import save_run

    model, tok = tiny
    for name in ("rlhf", "pretrain"):
        save_run(tmp_path / name, model, tok, train_config={"stage": name})
        write_metrics(tmp_path / name / "metrics.jsonl", [1, 2, 3], with_val=False)
    shown = figure_texts(monkeypatch, demo_training)
    demo.training(str(tmp_path / "rlhf"), tmp_path / "out_rl", max_new_tokens=3)
    assert "loss = \u2212(reward \u2212 kl_coef\u00b7KL)" in shown and "loss (cross-entropy)" not in shown
    shown.clear()
    demo.training(str(tmp_path / "pretrain"), tmp_path / "out_lm", max_new_tokens=3)
    assert "loss (cross-entropy)" in shown


def test_embeddings_neighbours_and_pca_match_numpy(tiny, tmp_path):
    model, tok = tiny
    result = demo.embeddings(tiny, "e", tmp_path, k=5)
    wte = model.named_parameters()["wte"].astype(np.float64)
    q = int(tok.encode("e")[0])
    cos = np.array([wte[i] @ wte[q] / np.linalg.norm(wte[i]) / np.linalg.norm(wte[q]) for i in range(len(wte))])
    cos[q] = -np.inf
    expected = np.argsort(-cos)[:5]
    got = [nb["id"] for nb in result.numbers["neighbours"]]
    assert got == expected.tolist()
    np.testing.assert_allclose([nb["cosine"] for nb in result.numbers["neighbours"]], cos[expected], rtol=1e-10)
    # PCA against the covariance matrix's eigenvectors (signs are arbitrary)
    centred = wte - wte.mean(axis=0)
    evals, evecs = np.linalg.eigh(centred.T @ centred)
    top = evecs[:, ::-1][:, :2]
    np.testing.assert_allclose(np.abs(result.numbers["coords"]), np.abs(centred @ top), atol=1e-9)
    np.testing.assert_allclose(result.numbers["explained_variance_ratio"][:2], evals[::-1][:2] / evals.sum(), rtol=1e-8)
    assert_png(result.files["figure"])


def figure_texts(monkeypatch, module=None):
    """Every text each figure a model view saves shows, as matplotlib draws it: these titles hold no
    math, so an escaped dollar '\\$' is drawn as '$' and every other character as it is."""
    from lmlab import demo_model

    module = module or demo_model
    shown = []
    real = module.save_png

    def save_png(fig, path):
        for t in fig.findobj(lambda o: hasattr(o, "get_text")):
            shown.append(t.get_text().replace("\\$", "$"))
        return real(fig, path)

    monkeypatch.setattr(module, "save_png", save_png)
    return shown


def test_quoted_tokens_in_titles_and_legends_are_drawn_as_they_are(tmp_path, monkeypatch):
    # repr() of an escaped label drew '\\$' for '$' and '\\\\' for one backslash
    from lmlab.model import GPT, GPTConfig
    from lmlab.tokenizer import train_tokenizer

    tok = train_tokenizer("it costs $5 or $6 \\ a cat sat. " * 3, "char")
    pair = (GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=0), tok)
    shown = figure_texts(monkeypatch)
    demo.embeddings(pair, "$", tmp_path / "e1", k=3)
    assert "nearest tokens to '$'" in shown and "'$'" in shown  # the title and the legend
    demo.embeddings(pair, "\\", tmp_path / "e2", k=3)
    assert "nearest tokens to '\\'" in shown
    demo.sampling(pair, "costs $5", tmp_path / "s", samples=1, max_new_tokens=3, gif=False)
    assert any(t.startswith("What comes after 'costs\u2423$5'?") for t in shown)
    assert "Samples from the same prompt 'costs\u2423$5' (temperature 1)" in shown


def test_embeddings_token_must_be_one_token(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ValueError, match="exactly one token"):
        demo.embeddings(tiny, "the", tmp_path)
    by_id = demo.embeddings(tiny, int(tok.encode("o")[0]), tmp_path, k=3, labels=5)
    assert by_id.numbers["token_id"] == int(tok.encode("o")[0]) and len(by_id.numbers["neighbours"]) == 3


def test_cli_model_views_run_from_a_run_directory(tiny, tmp_path, capsys):
    from lmlab.checkpoint import save_run

    model, tok = tiny
    run = str(tmp_path / "run")
    save_run(run, model, tok, train_config={})
    parser = build_parser()
    for argv in (["loss", run, "--text", "the cat", "--color", "never"],
                 ["sampling", run, "--prompt", "the", "--samples", "2", "--max-new-tokens", "5", "--no-gif"],
                 ["embeddings", run, "--token", "t", "-k", "3"]):
        args = parser.parse_args(["demo", *argv, "--out", str(tmp_path / argv[0])])
        assert args.func(args) == 0
        assert f"{argv[0]}.png" in capsys.readouterr().out


def test_cli_names_the_flag_of_a_refused_setting(tiny, tmp_path, capsys):
    """A bad value is one line naming the flag typed, exit 2: the views' keyword names leaked
    ('temperatures must be > 0' for --temperature 0, 'top_p', 'adam_lr', 'k'). The line starts
    with the view's command, as its usage does ('lmlab demo embeddings: error: ...'; it was
    'lmlab demo: error: ...' for every view)."""
    from lmlab.checkpoint import save_run
    from lmlab.cli import main

    run = str(tmp_path / "run")
    save_run(run, *tiny, train_config={})
    out = str(tmp_path / "out")
    for argv, line in [
            (["sampling", run, "--prompt", "a", "--temperature", "0"], "--temperature must be > 0, got 0.0"),
            (["sampling", run, "--prompt", "a", "--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
            (["sampling", run, "--prompt", "a", "--samples", "101"], "--samples must be in 1..100, got 101"),
            (["training", run, "--seed", "-1"], "--seed must be >= 0, got -1"),
            (["embeddings", run, "--token", "th"],
             "--token must be exactly one token of the vocabulary; 'th' encodes to 2 tokens ['t', 'h']"),
            (["loss", run, "--text", "t"],
             "--text must encode to at least 2 tokens (one to read, one to predict), got 1"),
            (["landscape", "--adam-lr", "0"], "--adam-lr must be > 0, got 0.0"),
            (["landscape", "--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
            (["descent", "--steps", "1001"], "--steps must be in 1..1,000, got 1001"),
            # a start whose square overflows float64 drew and printed inf and 300-digit positions
            (["descent", "--start=-1e300"], "--start must be within \u00b11,000,000 of the minimum, got -1e+300"),
            (["landscape", "--start", "2e6"], "--start must be within \u00b11,000,000 of the minimum, got 2e+06"),
            # one step of a learning rate this large leapt past float64: overflow warnings, inf, nan
            (["descent", "--lr", "1e300"], "--lr must be within \u00b11,000, got 1e+300"),
            (["descent", "--lrs", "0.3", "2000"], "--lrs must be within \u00b11,000, got 2000"),
            (["landscape", "--lr", "1e300"], "--lr must be within \u00b11,000, got 1e+300"),
            (["landscape", "--adam-lr", "1001"], "--adam-lr must be within \u00b11,000, got 1001")]:
        assert main(["demo", *argv, "--out", out]) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == f"lmlab demo {argv[0]}: error: {line}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["x", "1.5"])
def test_cli_count_flags_refuse_what_is_no_positive_integer_in_words(value, capsys):
    """--steps x was refused as "invalid _positive_int value: 'x'", the parser's function name."""
    from lmlab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["demo", "descent", "--steps", value])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"lmlab demo descent: error: argument --steps: expected an integer >= 1, got {value!r}")


def test_cli_names_the_flag_of_text_the_tokenizer_cannot_encode(tiny, tmp_path, capsys):
    """Text holding a character the run's char tokenizer lacks was refused as 'text contains 1
    character ...', naming no flag; the line names the flag the text came from."""
    from lmlab.checkpoint import save_run
    from lmlab.cli import main

    run = str(tmp_path / "run")
    save_run(run, *tiny, train_config={})
    write_metrics(tmp_path / "run" / "metrics.jsonl", range(5, 31, 5))  # for the training view
    for argv, flag in [(["loss", run, "--text", "the \u00e9"], "--text"),
                       (["sampling", run, "--prompt", "the \u00e9", "--no-gif"], "--prompt"),
                       (["training", run, "--prompt", "the \u00e9"], "--prompt"),
                       (["embeddings", run, "--token", "\u00e9"], "--token")]:
        assert main(["demo", *argv, "--out", str(tmp_path / "out")]) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured.err
        assert captured.err.endswith(
            f": error: {flag} contains 1 character (1 distinct) that this char tokenizer cannot "
            "represent: '\u00e9' x1 (its vocabulary holds only what the text it was built from "
            "holds)\n"), captured.err
    assert not (tmp_path / "out").exists()


def test_an_empty_out_is_refused_not_read_as_the_current_directory(tiny, tmp_path, monkeypatch,
                                                                   capsys):
    """--out "" (an unset variable) wrote every view's pictures into the current directory,
    without a word; it is refused in one line naming --out, before any file is written."""
    from lmlab.checkpoint import save_run
    from lmlab.cli import main

    save_run(tmp_path / "run", *tiny, train_config={})
    write_metrics(tmp_path / "run" / "metrics.jsonl", range(5, 31, 5))
    monkeypatch.chdir(tmp_path)
    for argv in (["descent", "--steps", "2", "--no-gif"], ["landscape", "--steps", "2", "--no-gif"],
                 ["loss", "run", "--text", "the cat"], ["sampling", "run", "--prompt", "the", "--no-gif"],
                 ["training", "run"], ["embeddings", "run", "--token", "t"]):
        assert main(["demo", *argv, "--out", ""]) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == (
            f"lmlab demo {argv[0]}: error: --out '' is not allowed: expected the directory to "
            "write the images into; an empty path names none (the current directory is '.')\n")
    assert sorted(os.listdir(tmp_path)) == ["run"]
    with pytest.raises(ValueError, match="out='' is not allowed"):
        demo.descent("", steps=2, gif=False)


def test_a_learning_rate_at_the_bound_draws_without_overflow(tmp_path):
    """The largest learning rates allowed, from the farthest starts, give finite numbers
    everywhere: the path stops once it has escaped, and the escaping step stays in range."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in numpy or matplotlib fails the test
        d = demo.descent(tmp_path / "d", start=-1e6, lr=1e3, lrs=[-1e3], steps=50, gif=False)
        o = demo.optimizers(tmp_path / "o", start=1e6, lr=1e3, momentum=0.99, adam_lr=1e3,
                            steps=50, gif=False)
    assert all(np.all(np.isfinite(run["losses"])) for run in d.numbers["runs"])
    assert all(np.all(np.isfinite(np.asarray(v, float))) for v in _numbers(o.numbers))


def test_a_start_at_the_bound_draws_without_overflow(tmp_path):
    """The farthest start allowed gives finite numbers everywhere (x**2 of 1e300 overflowed)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in numpy or matplotlib fails the test
        d = demo.descent(tmp_path / "d", start=-1e6, lrs=[0.3], steps=3, gif=False)
        o = demo.optimizers(tmp_path / "o", start=1e6, steps=5, gif=False)
    assert np.all(np.isfinite(d.numbers["runs"][0]["losses"]))
    assert all(np.all(np.isfinite(np.asarray(v, float))) for v in _numbers(o.numbers))


def _numbers(tree):
    """Every numeric array or scalar inside a DemoResult's numbers."""
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _numbers(v)
    elif isinstance(tree, (list, tuple)) and not all(isinstance(v, (int, float)) for v in tree):
        for v in tree:
            yield from _numbers(v)
    elif isinstance(tree, (int, float, np.ndarray, list, tuple)) and not isinstance(tree, bool):
        if not (isinstance(tree, np.ndarray) and tree.dtype.kind not in "fiu"):
            yield tree


def test_a_refused_view_writes_nothing(tiny, tmp_path):
    """A value refused by a view leaves neither its output directory nor any picture: landscape
    wrote landscape_local_global.png before its second part checked --start, and every view made
    --out before checking its text, token or settings."""
    from lmlab.checkpoint import save_run

    model, tok = tiny
    run = str(tmp_path / "run")
    save_run(run, model, tok, train_config={})
    out = tmp_path / "out"
    for call, words in [
            (lambda: demo.landscape(out, start=float("nan"), gif=False), "start must be finite"),
            (lambda: demo.landscape(out, momentum=1.5, gif=False), r"momentum must be in \[0, 1\)"),
            (lambda: demo.loss(run, "", out), "at least 2 tokens"),
            (lambda: demo.sampling(run, "the", out, top_k=10**9, gif=False), "top_k"),
            (lambda: demo.embeddings(run, "the", out), "exactly one token"),
            (lambda: demo.training(str(tmp_path / "none"), out), "run directory not found")]:
        with pytest.raises((ValueError, FileNotFoundError), match=words):
            call()
        assert not out.exists(), words
    demo.descent(out / "a" / "b", steps=2, gif=False)  # made by its first file, parents too
    assert (out / "a" / "b" / "descent.png").is_file()
