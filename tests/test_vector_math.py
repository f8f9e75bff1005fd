"""Accuracy of the vectorised exp (cpp/simd.h) as the kernels use it, at the edges of its range, and
of layernorm on rows whose mean dwarfs their spread.

exp is not exposed on its own, so it is tested through the kernels built on it: GELU forward and
backward over inputs from 1e-30 to 3e38 in magnitude, softmax and cross-entropy on logits up to +-1e4,
rows spanning the range where exp flushes to 0, and NaN propagation. Every comparison is against float64
numpy, on every kernel variant this CPU runs (the `isa` fixture of conftest.py). Tolerances are stated
in units of fp32's epsilon (EPS32 = 2^-23) with the reason for each.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmlab import ops

EPS32 = float(np.finfo(np.float32).eps)
FLT_MAX = float(np.finfo(np.float32).max)
GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715
# exp returns 0 below this argument instead of a subnormal (see kExpLo in cpp/simd.h).
EXP_FLUSH = 1.7e-38


def f64(x):
    return np.asarray(x, dtype=np.float64)


def gelu_inputs():
    """Dense over [-12, 12] (where GELU bends), then logarithmic in magnitude up to FLT_MAX."""
    mags = np.logspace(-30, np.log10(FLT_MAX), 4000)
    x = np.concatenate([np.linspace(-12, 12, 48001), mags, -mags, [0.0, -0.0, FLT_MAX, -FLT_MAX]])
    return x.astype(np.float32)


def sigmoid_pair(z):
    """(sigmoid(z), 1 - sigmoid(z)) in float64, each without cancellation or overflow."""
    a = np.exp(-np.abs(z))
    return np.where(z < 0, a, 1.0) / (1.0 + a), np.where(z < 0, 1.0, a) / (1.0 + a)


def gelu_reference(x):
    """(GELU(x), GELU'(x), u) in float64, with 0.5 (1 + tanh u) taken as sigmoid(2u): the same value,
    but 1 + tanh u cancels even in float64 for u < -19. Beyond |x| = 20 GELU' equals 1 or 0 to 1e-300,
    so the derivative is evaluated at x clipped there (x**3 would overflow for |x| > 1e102)."""
    x = f64(x)
    with np.errstate(over="ignore"):
        u = GELU_SCALE * (x + GELU_CUBIC * x ** 3)
    out = x * sigmoid_pair(2 * u)[0]
    xc = np.clip(x, -20.0, 20.0)
    s, one_minus_s = sigmoid_pair(2 * GELU_SCALE * (xc + GELU_CUBIC * xc ** 3))
    du = GELU_SCALE * (1 + 3 * GELU_CUBIC * xc ** 2)
    return out, s + 2 * xc * du * s * one_minus_s, u


def test_gelu_forward_wide_range(isa):
    x = gelu_inputs()
    out = np.empty_like(x)
    ops.gelu_forward(out, x)
    ref, _, u = gelu_reference(x)
    assert np.all(np.isfinite(out)), "GELU produced inf/NaN for finite input"
    # Relative error: exp is good to ~1 ulp, but its argument -2|u| comes out of three fp32 roundings,
    # and exp turns that absolute error (~|u| EPS32) into a relative one: measured at most
    # 1.9 (1 + |u|) EPS32 on every variant, bounded here by 4 (1 + |u|). Where GELU's true value is
    # below EXP_FLUSH * |x| (x < -9.9) the kernel returns -0.
    bound = 4 * EPS32 * (1.0 + np.minimum(np.abs(u), 1e6)) * np.abs(ref) + EXP_FLUSH * np.abs(f64(x))
    err = np.abs(f64(out) - ref)
    worst = int(np.argmax(err - bound))
    assert err[worst] <= bound[worst], f"x={x[worst]!r}: got {out[worst]!r}, want {ref[worst]!r}"
    # The limits: x itself for large x, (-)0 for very negative x.
    assert out[x == FLT_MAX][0] == FLT_MAX and out[x == -FLT_MAX][0] == 0.0


def test_gelu_forward_typical_range_ulp(isa):
    # Where activations live the bound above is a few ulp (measured at most 14 on [-3, 3]).
    x = np.linspace(-3, 3, 100001).astype(np.float32)
    out = np.empty_like(x)
    ops.gelu_forward(out, x)
    ref = gelu_reference(x)[0]
    nonzero = ref != 0
    ulps = np.abs(f64(out) - ref)[nonzero] / np.spacing(np.abs(ref[nonzero]).astype(np.float32))
    assert ulps.max() <= 24, f"GELU error {ulps.max():.1f} ulp on [-3, 3]"


def test_gelu_backward_wide_range(isa):
    x = gelu_inputs()
    dout = np.ones_like(x)
    dinp = np.full_like(x, 0.25)
    ops.gelu_backward(dinp, x, dout)
    _, ref, _ = gelu_reference(x)
    assert np.all(np.isfinite(dinp)), "GELU backward produced inf/NaN for finite input"
    # Absolute error: GELU' lies in [-0.17, 1.13]; its terms are products of fp32 factors each a few ulp
    # off, the largest |2 x u'(x) s (1 - s)| about 1.3: measured at most 1.8 EPS32, bounded by 8.
    err = np.abs(f64(dinp) - 0.25 - ref)
    worst = int(np.argmax(err))
    assert err[worst] <= 8 * EPS32, f"x={x[worst]!r}: got {dinp[worst] - 0.25!r}, want {ref[worst]!r}"
    assert dinp[x == FLT_MAX][0] == 1.25 and dinp[x == -FLT_MAX][0] == 0.25


def test_gelu_infinities_and_nan(isa):
    # The limits at the infinities (GELU(-inf) used to come out NaN, from -inf * 0), and NaN kept.
    x = np.array([-np.inf, np.inf, np.nan, -1e30, 1e30], np.float32)
    out, dinp = np.empty_like(x), np.zeros_like(x)
    ops.gelu_forward(out, x)
    ops.gelu_backward(dinp, x, np.ones_like(x))
    np.testing.assert_array_equal(out, np.array([0.0, np.inf, np.nan, 0.0, 1e30], np.float32))
    np.testing.assert_array_equal(dinp, [0.0, 1.0, np.nan, 0.0, 1.0])


def softmax_reference(x):
    x = f64(x)
    m = x.max(-1, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(-1, keepdims=True), (m + np.log(e.sum(-1, keepdims=True)))[:, 0]


def huge_logits(rng, V):
    """Rows up to +-1e4: uniform over the whole range (one entry dominates), clustered near +1e4 and
    near -1e4 (many entries matter, all far from 0), and constant (a uniform distribution)."""
    rows = [rng.uniform(-1e4, 1e4, V), 1e4 - rng.uniform(0, 20, V), -1e4 + rng.uniform(0, 20, V),
            np.full(V, -1e4), np.full(V, 1e4)]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("V", [1, 7, 9, 33, 65, 1000])
def test_softmax_huge_logits(isa, rng, V):
    x = huge_logits(rng, V)
    probs = np.empty_like(x)
    ops.softmax_forward(probs, x)
    ref, _ = softmax_reference(x)
    # x - max is exact here (Sterbenz) wherever exp(x - max) is not negligible, so the error is that
    # of exp (~1 ulp), the row sum and the division: 8 ulp relative, plus the flush below EXP_FLUSH.
    err = np.abs(f64(probs) - ref)
    assert np.all(err <= 8 * EPS32 * ref + EXP_FLUSH), f"max error {err.max():.3g}"
    assert np.all(np.isfinite(probs))


@pytest.mark.parametrize("V", [1, 7, 9, 33, 65, 1000])
def test_crossentropy_huge_logits(isa, rng, V):
    x = huge_logits(rng, V)
    n = len(x)
    targets = rng.integers(0, V, n).astype(np.int32)
    losses, lse = np.empty(n, np.float32), np.empty(n, np.float32)
    ops.crossentropy_forward(losses, lse, x, targets)
    ref_p, ref_lse = softmax_reference(x)
    ref_loss = ref_lse - f64(x)[np.arange(n), targets]
    # lse = max + log(sum): rounding to fp32 at |lse| ~ 1e4 costs up to half an ulp of 1e4 (5e-4), and
    # the loss subtracts the target logit, rounded the same way.
    scale = np.abs(x).max(-1).astype(np.float64) + 1.0
    assert np.all(np.abs(f64(lse) - ref_lse) <= 2 * EPS32 * scale)
    assert np.all(np.abs(f64(losses) - ref_loss) <= 4 * EPS32 * scale)
    weights = np.linspace(0.5, 2.0, n).astype(np.float32)
    dlogits = np.zeros_like(x)
    ops.crossentropy_backward(dlogits, x, lse, targets, weights)
    ref_g = ref_p.copy()
    ref_g[np.arange(n), targets] -= 1.0
    ref_g *= f64(weights)[:, None]
    # softmax comes back as exp(x - lse) with the cached fp32 lse: its rounding (above) becomes a
    # relative error of the probabilities of the same size.
    bound = f64(weights)[:, None] * (4 * EPS32 * scale[:, None] * ref_p + EXP_FLUSH) + 4 * EPS32
    assert np.all(np.abs(f64(dlogits) - ref_g) <= bound)


def test_exp_flush_region_through_softmax(isa):
    # Differences from the row maximum straddling exp's flush point (-87) and beyond fp32's range:
    # exp(-86.9) is a normal float and must come back accurately; the rest are 0.
    diffs = np.array([0.0, -1.0, -20.0, -86.9, -87.1, -103.0, -104.0, -150.0, -1e30, -np.inf], np.float32)
    for shift in (0.0, 50.0, -50.0):
        x = (diffs + np.float32(shift))[None, :]
        probs = np.empty_like(x)
        ops.softmax_forward(probs, x)
        ref, _ = softmax_reference(diffs[None, :])
        assert np.all(np.abs(f64(probs) - ref) <= 8 * EPS32 * ref + EXP_FLUSH)
        assert probs[0, 3] > 0 and np.all(probs[0, 5:] == 0.0)


def test_nan_propagates(isa):
    # A NaN logit or activation must surface as NaN (a diverged run has to show it), and only in its
    # own row or element.
    x = np.zeros((3, 17), np.float32)
    x[1, 5] = np.nan
    probs = np.empty_like(x)
    ops.softmax_forward(probs, x)
    assert np.all(np.isnan(probs[1])) and np.all(np.isfinite(probs[[0, 2]]))
    losses, lse = np.empty(3, np.float32), np.empty(3, np.float32)
    ops.crossentropy_forward(losses, lse, x, np.zeros(3, np.int32))
    assert np.isnan(losses[1]) and np.all(np.isfinite(losses[[0, 2]]))
    g = np.array([1.0, np.nan, -1.0], np.float32)
    out = np.empty_like(g)
    ops.gelu_forward(out, g)
    assert np.isnan(out[1]) and np.all(np.isfinite(out[[0, 2]]))


def test_softmax_large_output_streamed(isa, rng):
    # Outputs of 2^22 floats or more take the streaming-store path (cpp/softmax.cpp): rows of odd
    # length written at every alignment, here into a buffer offset by one float on top.
    N, V = 70, 61441
    x = (rng.standard_normal((N, V)) * 4).astype(np.float32)
    x[3, :] = -1e4
    x[3, 7] = 1e4
    buf = np.empty(N * V + 1, np.float32)
    probs = buf[1:].reshape(N, V)
    results = []
    for threads in (1, 2):
        with ops.num_threads(threads):
            probs.fill(np.nan)
            ops.softmax_forward(probs, x)
            results.append(probs.copy())
    assert results[0].tobytes() == results[1].tobytes(), "streamed softmax differs between thread counts"
    ref, _ = softmax_reference(x)
    # Dominated by the rounding of the row's 61441-term fp32 sum. The kernel sums in blocks (measured
    # 3 EPS32 relative); the bound, 2 sqrt(V) EPS32, is what even a plain running sum stays within
    # (its error grows like a random walk), so it holds for any build of the portable path.
    err = np.abs(f64(results[0]) - ref)
    assert np.all(err <= 2 * np.sqrt(V) * EPS32 * ref + EXP_FLUSH), f"max error {err.max():.3g}"


@pytest.mark.parametrize("C", [1, 7, 33, 384])
def test_layernorm_large_mean_tiny_spread(isa, rng, C):
    # Rows at 1000 +- 1e-3 (and a constant row): the kernel centres each row on its first element, so
    # the normalised output keeps full precision although fp32 resolves 1000 only to 6e-5.
    x = (1000.0 + 1e-3 * rng.standard_normal((9, C))).astype(np.float32)
    x[4] = 1000.0
    weight, bias = np.ones(C, np.float32), np.zeros(C, np.float32)
    out, mean, rstd = np.empty_like(x), np.empty(9, np.float32), np.empty(9, np.float32)
    ops.layernorm_forward(out, mean, rstd, x, weight, bias)
    xd = f64(x)
    ref = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-5)
    # |norm| < sqrt(C): a few ulp of the largest output (measured 1.5e-7 at C = 384).
    assert np.all(np.abs(f64(out) - ref) <= 16 * EPS32 * max(1.0, np.sqrt(C)))
    assert np.all(out[4] == 0.0)


@pytest.mark.parametrize("V", [1500, 5000, 50304, 70000])
def test_long_rows_blockwise(isa, rng, V):
    # Rows longer than one summation block are reduced block by block with a running maximum: rows
    # that start with masked (-inf) blocks, whose maximum sits at the end, or at the start.
    x = (rng.standard_normal((4, V)) * 3).astype(np.float32)
    x[0, : V // 2] = -np.inf
    x[1, -1] = 40.0
    x[2, 0] = 40.0
    x[3, :] = np.linspace(-50, 50, V, dtype=np.float32)
    ref, ref_lse = softmax_reference(x)
    probs = np.empty_like(x)
    ops.softmax_forward(probs, x)
    assert np.all(np.abs(f64(probs) - ref) <= 2 * np.sqrt(V) * EPS32 * ref + EXP_FLUSH)
    losses, lse = np.empty(4, np.float32), np.empty(4, np.float32)
    ops.crossentropy_forward(losses, lse, x, np.full(4, V - 1, np.int32))
    assert np.all(np.abs(f64(lse) - ref_lse) <= 4 * EPS32 * (np.abs(ref_lse) + 1))
