"""Tests of the teaching views (lmlab.demo): numbers against closed forms and independent loops, files on disk.

Every view runs headless (drawing goes to the Agg canvas) into a pytest tmp directory.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from lmlab import demo
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
        (dict(steps=0), ValueError, "steps must be >= 1"),
        (dict(steps=2.5), TypeError, "steps must be an integer"),
        (dict(start="four"), TypeError, "start must be a number"),
        (dict(lr=float("nan")), ValueError, "lr must be finite"),
        (dict(lrs=[]), ValueError, "at least one learning rate"),
    ],
)
def test_descent_rejects_bad_arguments(tmp_path, kwargs, error, words):
    with pytest.raises(error, match=words):
        demo.descent(tmp_path, gif=False, **kwargs)


def test_out_must_be_a_directory(tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="out must be a directory"):
        demo.descent(f, gif=False)


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
    demo.add_demo_arguments(sub)
    return parser


def test_cli_descent_runs_through_run_demo(tmp_path, capsys):
    args = build_parser().parse_args(
        ["demo", "descent", "--lr", "0.45", "--start", "2", "--steps", "5", "--no-gif", "--out", str(tmp_path)])
    assert args.func is demo.run_demo
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
