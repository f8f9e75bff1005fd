"""Tests of the blocked GEMM behind matmul (and attention), on every instruction-set variant.

Through the public ops: the linear layer's forward and both backward products against float64 numpy
on awkward shapes (sizes around the register tiles and cache slices), the accumulate and skip
contracts, and bitwise-identical results for 1 and 2 threads. Through a small C++ driver
(tests/gemm_check.cpp, compiled here against cpp/gemm.cpp once per instruction set by tests/drivers.py): any stride
pattern, alpha, accumulate on and off, and calls from inside a parallel region, which matmul alone
never exercises.

Tolerance: results are compared with the float64 product, relative to the float64 product of the
absolute values (the size of the terms summed); fp32 rounding over a depth-d reduction stays well
below 1e-5 * max(1, sqrt(d / 64)).
"""

from __future__ import annotations

import numpy as np
import pytest

from drivers import check_gemm_rows
from drivers import gemm_tolerance as tolerance
from lmlab import ops

ISAS = ops.cpu_info()["available"]

# (N rows, C in, OC out): tile edges of every variant (MR 14/6/4, NR 32/16/8), reductions deeper than
# one slice (384 deep for AVX-512, 256 otherwise), and one row or column alone.
SHAPES = [(1, 1, 1), (7, 9, 33), (33, 7, 9), (9, 33, 7), (15, 257, 31), (29, 600, 65),
          (130, 64, 300), (1, 300, 5), (300, 5, 1)]


def rel_err(got: np.ndarray, exact: np.ndarray, size: np.ndarray) -> float:
    return float(np.abs(got - exact).max() / size.max())


def operands(N: int, C: int, OC: int, seed: int = 0):
    rng = np.random.default_rng(seed + N * 10007 + C * 101 + OC)
    inp = rng.standard_normal((N, C), dtype=np.float32)
    weight = rng.standard_normal((OC, C), dtype=np.float32)
    bias = rng.standard_normal(OC, dtype=np.float32)
    dout = rng.standard_normal((N, OC), dtype=np.float32)
    return inp, weight, bias, dout


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_forward_matches_float64(isa, shape, with_bias):
    N, C, OC = shape
    inp, weight, bias, _ = operands(N, C, OC)
    out = np.full((N, OC), np.nan, np.float32)  # every element must be written
    with ops.use_isa(isa):
        ops.matmul_forward(out, inp, weight, bias if with_bias else None)
    i, w, b = (x.astype(np.float64) for x in (inp, weight, bias))
    exact = i @ w.T + (b if with_bias else 0.0)
    size = np.abs(i) @ np.abs(w).T + (np.abs(b) if with_bias else 0.0)
    assert rel_err(out, exact, size) < tolerance(C)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_accumulates_float64(isa, shape):
    N, C, OC = shape
    inp, weight, _, dout = operands(N, C, OC)
    rng = np.random.default_rng(1)
    dinp0 = rng.standard_normal((N, C), dtype=np.float32)
    dweight0 = rng.standard_normal((OC, C), dtype=np.float32)
    dbias0 = rng.standard_normal(OC, dtype=np.float32)
    dinp, dweight, dbias = dinp0.copy(), dweight0.copy(), dbias0.copy()
    with ops.use_isa(isa):
        ops.matmul_backward(dinp, dweight, dbias, dout, inp, weight)
    i, w, d = (x.astype(np.float64) for x in (inp, weight, dout))
    ai, aw, ad = np.abs(i), np.abs(w), np.abs(d)
    assert rel_err(dinp, dinp0 + d @ w, np.abs(dinp0) + ad @ aw) < tolerance(OC)
    assert rel_err(dweight, dweight0 + d.T @ i, np.abs(dweight0) + ad.T @ ai) < tolerance(N)
    assert rel_err(dbias, dbias0 + d.sum(0), np.abs(dbias0) + ad.sum(0)) < tolerance(N)


@pytest.mark.parametrize("isa", ISAS)
def test_backward_gradients_alone_equal_gradients_together(isa):
    inp, weight, _, dout = operands(20, 40, 24)
    together = [np.zeros_like(inp), np.zeros_like(weight), np.zeros(24, np.float32)]
    alone = [np.zeros_like(x) for x in together]
    with ops.use_isa(isa):
        ops.matmul_backward(*together, dout, inp, weight)
        ops.matmul_backward(alone[0], None, None, dout, inp, weight)
        ops.matmul_backward(None, alone[1], None, dout, inp, weight)
        ops.matmul_backward(None, None, alone[2], dout, inp, weight)
    for a, t in zip(alone, together):
        assert np.abs(t).max() > 0 and np.array_equal(a, t)


# Large enough that two threads both get work, split by rows (N >= OC) or by columns (N < OC), with
# edge tiles and several reduction slices.
THREAD_SHAPES = [(333, 530, 97), (70, 300, 515), (1029, 64, 200)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bitwise_identical_for_1_and_2_threads(isa, shape):
    N, C, OC = shape
    inp, weight, bias, dout = operands(N, C, OC, seed=7)
    results = []
    for threads in (1, 2):
        out = np.empty((N, OC), np.float32)
        dinp = np.zeros((N, C), np.float32)
        dweight = np.zeros((OC, C), np.float32)
        dbias = np.zeros(OC, np.float32)
        with ops.use_isa(isa), ops.num_threads(threads):
            ops.matmul_forward(out, inp, weight, bias)
            ops.matmul_backward(dinp, dweight, dbias, dout, inp, weight)
        results.append((out, dinp, dweight, dbias))
    for one, two in zip(*results):
        assert np.array_equal(one.view(np.uint32), two.view(np.uint32))


# --- the internal gemm, through tests/gemm_check.cpp -------------------------------------------------

# Precision::bf16 runs on every path this CPU has, each checked in the avx512 build (the only one with
# native code; the other builds emulate whatever path is chosen).
MODES = ["fp32"] + [f"bf16:{p}" for p in ops.cpu_info()["bf16_paths"]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("isa", ISAS)
def test_gemm_strides_alpha_accumulate(isa, mode, driver):  # driver: conftest.py
    # bf16: the reference multiplies the same bf16-rounded operands, so the tolerance is fp32's.
    check_gemm_rows(driver("gemm_check", isa, *mode.split(":")))
