"""Test helpers around lmlab.reference, the float64 reference of every kernel and of the GPT.

The kernel tests `import reference` (tests/ is on sys.path) and find here every op reference of
lmlab.reference (re-exported, so `reference.matmul_forward`, `reference.round_bf16`, ... keep working)
and the helpers the tests share: the tolerance checks (assert_close, assert_stats_close), central
differences (numerical_grad) and float32 test data (randn).
"""

from __future__ import annotations

import numpy as np
import pytest

from lmlab.reference import *  # noqa: F401,F403  (every op reference, re-exported)
from lmlab.reference import f64


# --- comparing a float32 kernel result with a reference ------------------------------------------------

def assert_close(actual, expected, tol: float, what: str, scale=None) -> None:
    """|actual - expected| <= tol * scale elementwise.

    scale defaults to max |expected| (a normwise bound: the error relative to the magnitude of the
    result), and may be an array for elementwise bounds. float32 actual against a float64 expected.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values in the kernel result"
    if scale is None:
        scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    err = np.abs(actual.astype(np.float64) - expected)
    bound = tol * np.asarray(scale, dtype=np.float64)
    bad = err > bound
    if np.any(bad):
        i = np.unravel_index(int(np.argmax(err - bound)), err.shape) if err.ndim else ()
        pytest.fail(f"{what}: {int(bad.sum())} of {err.size} entries outside tolerance {tol:g}; worst at "
                    f"{i}: got {actual[i]!r}, expected {expected[i]!r}, error {err[i]:.3g} > bound "
                    f"{np.broadcast_to(bound, err.shape)[i]:.3g}")


def assert_stats_close(stats, expected, tol: float) -> None:
    """Attention's softmax statistics (..., 2): the row maxima to tol of their largest size, and
    1 / sum (in (0, 1]) to tol relative, entry by entry."""
    stats, expected = np.asarray(stats), np.asarray(expected, np.float64)
    assert_close(stats[..., 0], expected[..., 0], tol, "stats max")
    assert_close(stats[..., 1], expected[..., 1], tol, "stats 1/sum", scale=np.abs(expected[..., 1]))


def randn(rng, *shape, scale: float = 1.0) -> np.ndarray:
    """Standard normal float32 data, C-contiguous."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def numerical_grad(f, x, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar function f at x, in float64 (error O(h^2) for smooth f)."""
    x = f64(x).copy()
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        orig = x[i]
        x[i] = orig + h
        up = f(x)
        x[i] = orig - h
        down = f(x)
        x[i] = orig
        grad[i] = (up - down) / (2.0 * h)
    return grad
