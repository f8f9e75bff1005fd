"""Causal self-attention (cpp/attention.cpp) against independent references, on every kernel variant.

The kernel cuts each head into query blocks of 64 rows and register tiles of 6 x (4 vectors)
(AVX-512), 6 x (2 vectors) (AVX2) or 4 x 4 (portable), and computes exp with simd.h's polynomial.
So the shapes here straddle those edges: T = 1, 7, 9, 33, 63, 64, 65, 130 (one row into a block,
a partial block, several blocks); head sizes 1, 4, 9, 20 and 72 (no multiple of any vector width, so
the masked partial vectors run) next to 16 and 64. References: float64 numpy (tests/reference.py),
central differences of sum(out * R), PyTorch's scaled_dot_product_attention when torch is installed.
Also: accumulation into a pre-filled dqkv, the cached log-sum-exp per row (all that backward keeps
of the probabilities), softmax stability and the accuracy of tiny probabilities, and
bitwise-identical results for 1, 2 and 3 threads.

Tolerances are relative to max |expected| (reference.assert_close) unless stated: float32 rounding
of a length-HS dot product, a softmax over T and a length-T sum, grown like sqrt(T).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import reference as ref
from lmlab import ops
from reference import assert_close, assert_stats_close, randn

EPS32 = float(np.finfo(np.float32).eps)

SHAPES = [  # (B, T, C, NH); HS = C / NH
    (1, 1, 12, 3), (2, 7, 12, 3), (1, 9, 27, 3), (2, 33, 40, 2), (1, 63, 64, 4), (2, 64, 80, 5),
    (1, 65, 12, 3), (2, 65, 144, 2), (1, 130, 64, 1), (1, 9, 3, 3)]


def tol(T: int) -> float:
    return 5e-5 * max(1.0, math.sqrt(T / 64.0))


def forward(qkv: np.ndarray, NH: int):
    """(out, stats) from the kernel; both pre-filled with NaN so every entry must be written."""
    B, T, C3 = qkv.shape
    out = np.full((B, T, C3 // 3), np.nan, dtype=np.float32)
    stats = np.full((B, NH, T, 2), np.nan, dtype=np.float32)
    ops.attention_forward(out, stats, qkv, NH)
    return out, stats


def backward(dqkv: np.ndarray, dout: np.ndarray, qkv: np.ndarray, NH: int) -> np.ndarray:
    """dqkv += the kernel's gradient, from the kernel's own cached softmax statistics."""
    _, stats = forward(qkv, NH)
    ops.attention_backward(dqkv, dout, qkv, stats, NH)
    return dqkv


def probabilities(qkv: np.ndarray) -> np.ndarray:
    """The kernel's probabilities (T, T) of a single head of size 1 (B = NH = 1, HS = 1), read out
    through its output: with v the unit vector of key j, out[t] = P[t, j] (one product, exact)."""
    T = qkv.shape[1]
    x = qkv.copy()
    P = np.empty((T, T), np.float64)
    for j in range(T):
        x[0, :, 2] = 0.0
        x[0, j, 2] = 1.0
        P[:, j] = forward(x, 1)[0][0, :, 0]
    return P


def scores64(qkv, NH: int) -> np.ndarray:
    """float64 q.k / sqrt(HS), (B, NH, T, T), unmasked."""
    B, T, C3 = qkv.shape
    HS = C3 // 3 // NH
    x = ref.f64(qkv).reshape(B, T, 3, NH, HS)
    return np.einsum("bqhd,bkhd->bhqk", x[:, :, 0], x[:, :, 1]) / math.sqrt(HS)


@pytest.mark.parametrize("B,T,C,NH", SHAPES)
def test_forward(isa, rng, B, T, C, NH):
    qkv = randn(rng, B, T, 3 * C)
    out, stats = forward(qkv, NH)
    assert_close(out, ref.attention_forward(qkv, NH)[0], tol(T), "out")
    # The softmax statistics backward recomputes the probabilities from: the row maximum and 1 / sum.
    assert_stats_close(stats, ref.attention_stats(qkv, NH), tol(T))


@pytest.mark.parametrize("B,T,C,NH", SHAPES)
def test_backward_accumulates(isa, rng, B, T, C, NH):
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    dqkv0 = randn(rng, B, T, 3 * C)
    dqkv = backward(dqkv0.copy(), dout, qkv, NH)
    expected = ref.attention_backward(dout, qkv, NH)
    # The increment alone, to the full tolerance of the gradient; the slack for reading it back out
    # of the float32 sum is the rounding of dqkv0 (1e-2 * tol * |dqkv0| is about 4 ulp of it).
    assert_close(dqkv - dqkv0, expected, tol(T), "dqkv increment",
                 scale=float(np.max(np.abs(expected)) + np.max(np.abs(dqkv0)) * 1e-2))
    assert_close(dqkv, dqkv0 + expected, tol(T), "dqkv",
                 scale=float(np.max(np.abs(expected)) + np.max(np.abs(dqkv0))))


def test_backward_twice_adds_twice(isa, rng):
    """Accumulation, not assignment: two calls on a zeroed buffer give twice one call."""
    B, T, C, NH = 2, 70, 40, 2
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    once = backward(np.zeros((B, T, 3 * C), np.float32), dout, qkv, NH)
    twice = backward(once.copy(), dout, qkv, NH)
    assert_close(twice, 2.0 * once.astype(np.float64), 1e-6, "two backward calls")


@pytest.mark.parametrize("magnitude", [8.0, 40.0])
def test_large_scores_stay_finite_and_accurate(isa, rng, magnitude):
    """q.k up to ~1e4: without the row maximum subtracted exp would overflow; with it the softmax is
    nearly one-hot and its gradient nearly zero. The error bound grows with the float32 rounding of
    scores that large (a relative EPS32 of |score| shifts each exp by that much)."""
    B, T, C, NH = 2, 65, 32, 2
    qkv, dout = randn(rng, B, T, 3 * C, scale=magnitude), randn(rng, B, T, C)
    out, stats = forward(qkv, NH)
    e_out, _ = ref.attention_forward(qkv, NH)
    bound = tol(T) + 8 * EPS32 * float(np.max(np.abs(scores64(qkv, NH))))
    assert_close(out, e_out, bound, "out")
    assert_stats_close(stats, ref.attention_stats(qkv, NH), bound)
    dqkv = backward(np.zeros_like(qkv), dout, qkv, NH)
    e_dqkv = ref.attention_backward(dout, qkv, NH)
    assert_close(dqkv, e_dqkv, bound, "dqkv", scale=float(np.max(np.abs(e_dqkv))) + bound)


def test_exp_is_accurate_to_an_ulp_or_two(isa, rng):
    """HS = 1 and q = 1 make the scores exactly the keys; keys on a 1/64 grid in [-100, 0] make
    score - row maximum exact in float32 too. So the ratio P[t, s] / P[t, argmax] is the kernel's
    exp(score - max) up to the rounding of the normalisation: it must match float64 to 4 ulp (a
    degree-5 instead of degree-7 polynomial is off by 2e-6 and fails). Probabilities that fall below
    the float32 normal range (exp below 1e-36) may flush to zero, and nothing else may."""
    B, T, C, NH = 1, 200, 1, 1
    qkv = np.ones((B, T, 3), dtype=np.float32)
    keys = -rng.integers(0, 64 * 100, T) / 64.0
    qkv[0, :, 1] = keys
    qkv[0, :, 2] = randn(rng, T)
    att = probabilities(qkv)
    checked = 0
    for t in range(T):
        m = int(np.argmax(keys[:t + 1]))
        expected = np.exp(keys[:t + 1] - keys[m])
        ratio = att[t, :t + 1] / att[t, m]
        normal = expected > 1e-30
        err = np.abs(ratio[normal] - expected[normal])
        assert np.all(err <= 4 * EPS32 * expected[normal]), (
            f"row {t}: relative error {np.max(err / expected[normal]):.3g} of exp")
        assert np.all(att[t, :t + 1][expected < 1e-36] < 1e-36)
        assert np.all(att[t, t + 1:] == 0.0), "no weight on future keys"
        checked += int(normal.sum())
    assert checked > T * T / 4, "the grid must put many scores into exp's accurate range"


def test_finite_differences(isa, rng):
    """The float32 kernel gradient against float64 central differences of sum(out * R)."""
    B, T, C, NH = 2, 5, 6, 2
    qkv, R = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    dqkv = backward(np.zeros_like(qkv), R, qkv, NH)
    numeric = ref.numerical_grad(lambda x: float(np.sum(ref.f64(R) * ref.attention_forward(x, NH)[0])),
                                 qkv)
    assert_close(dqkv, numeric, 1e-4, "dqkv vs finite differences")


@pytest.mark.parametrize("B,T,C,NH", [(2, 65, 80, 5), (1, 130, 144, 2)])
def test_torch_sdpa_parity(isa, rng, B, T, C, NH):
    torch = pytest.importorskip("torch")
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    x = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
    q, k, v = (t.reshape(B, T, NH, C // NH).transpose(1, 2) for t in x.split(C, dim=2))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    y = y.transpose(1, 2).reshape(B, T, C)
    y.backward(torch.tensor(dout, dtype=torch.float64))
    out, _ = forward(qkv, NH)
    assert_close(out, y.detach().numpy(), tol(T), "out vs torch")
    dqkv = backward(np.zeros_like(qkv), dout, qkv, NH)
    assert_close(dqkv, x.grad.numpy(), tol(T), "dqkv vs torch")


@pytest.mark.parametrize("B,T,C,NH", [(3, 130, 72, 3), (1, 200, 20, 1), (2, 9, 12, 3)])
def test_bitwise_identical_for_any_thread_count(isa, rng, B, T, C, NH):
    qkv, dout, dqkv0 = randn(rng, B, T, 3 * C), randn(rng, B, T, C), randn(rng, B, T, 3 * C)
    results = {}
    for threads in (1, 2, 3):
        with ops.num_threads(threads):
            out, stats = forward(qkv, NH)
            dqkv = dqkv0.copy()
            ops.attention_backward(dqkv, dout, qkv, stats, NH)
            results[threads] = (out, stats, dqkv)
    for threads in (2, 3):
        for name, a, b in zip(("out", "stats", "dqkv"), results[1], results[threads]):
            assert a.tobytes() == b.tobytes(), f"{name} differs between 1 and {threads} threads"
