"""Tests of the blocked GEMM behind matmul (and attention), on every instruction-set variant.

Through the public ops: the linear layer's forward and both backward products against float64 numpy
on awkward shapes (sizes around the register tiles and cache slices), the accumulate and skip
contracts, and bitwise-identical results for 1, 2 and 3 threads. Through a small C++ driver
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

import reference as ref
from drivers import check_gemm_rows
from drivers import gemm_tolerance as tolerance
from lmlab import ops

ISAS = ops.cpu_info()["available"]

# (N rows, C in, OC out): tile edges of every variant (MR 14/6/4, NR 32/16/8), reductions deeper than
# one slice (384 deep for AVX-512, 256 otherwise), and one row or column alone.
SHAPES = [(1, 1, 1), (7, 9, 33), (33, 7, 9), (9, 33, 7), (15, 257, 31), (29, 600, 65),
          (130, 64, 300), (1, 300, 5), (300, 5, 1),
          # one to four rows (generation's one new token): computed without packing
          (1, 385, 1153), (2, 37, 45), (3, 600, 70), (4, 1030, 17)]


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


# Large enough that several threads all get work: products whose rows the team takes a unit at a
# time (many rows of C), and products split once per thread by rows or by columns (few rows), with
# edge tiles, several reduction slices, and (1100 columns) several column blocks.
THREAD_SHAPES = [(333, 530, 97), (70, 300, 515), (1029, 64, 200), (300, 40, 1100), (1, 700, 1100),
                 (3, 1500, 330)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", THREAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bitwise_identical_for_1_2_and_3_threads(isa, precision, shape):
    N, C, OC = shape
    inp, weight, bias, dout = operands(N, C, OC, seed=7)
    results = []
    for threads in (1, 2, 3):
        out = np.empty((N, OC), np.float32)
        dinp = np.zeros((N, C), np.float32)
        dweight = np.zeros((OC, C), np.float32)
        dbias = np.zeros(OC, np.float32)
        with ops.use_isa(isa), ops.num_threads(threads):
            ops.matmul_forward(out, inp, weight, bias, precision=precision)
            ops.matmul_backward(dinp, dweight, dbias, dout, inp, weight, precision=precision)
        results.append((out, dinp, dweight, dbias))
    for other in results[1:]:
        for one, many in zip(results[0], other):
            assert np.array_equal(one.view(np.uint32), many.view(np.uint32))


# --- bf16: every path against float64 on the same rounded operands --------------------------------
# Every bf16 path multiplies the same bf16 operands exactly and sums in fp32, so the fp32 tolerance
# applies, plus what AVX512-BF16 and AMX flush: bf16 inputs and fp32 partial sums below 2^-126 count
# as zero (DAZ, FTZ), at most 2^-126 lost per step of k on top of the rounding: K * 2^-126 absolute.
FLUSH = 2.0 ** -126


def bf16_reference(inp, weight):
    """(exact, size): float64 product of the bf16-rounded operands and of their absolute values."""
    i, w = ref.round_bf16(inp), ref.round_bf16(weight)
    return i @ w.T, np.abs(i) @ np.abs(w).T


@pytest.mark.parametrize("shape", SHAPES + [(47, 1100, 200)], ids=lambda s: "x".join(map(str, s)))
def test_bf16_forward_matches_float64_on_rounded_operands(bf16_variant, shape):
    N, C, OC = shape
    inp, weight, bias, _ = operands(N, C, OC)
    out = np.full((N, OC), np.nan, np.float32)
    ops.matmul_forward(out, inp, weight, bias, precision=ops.Precision.BF16)
    exact, size = bf16_reference(inp, weight)
    assert rel_err(out, exact + bias, size + np.abs(bias)) < tolerance(C)


@pytest.mark.parametrize("scale", [2.0 ** -60, 2.0 ** -66, 2.0 ** -70])
def test_bf16_tiny_values_within_the_flush_bound(bf16_variant, scale):
    """Products near and below 2^-126: the native paths may flush them, within K * 2^-126."""
    N, C, OC = 9, 70, 33
    inp, weight, _, _ = operands(N, C, OC, seed=3)
    inp, weight = (inp * np.float32(scale)), (weight * np.float32(scale))
    out = ops.matmul_forward(np.zeros((N, OC), np.float32), inp, weight, precision="bf16")
    exact, size = bf16_reference(inp, weight)
    bound = tolerance(C) * size.max() + C * FLUSH
    assert np.all(np.abs(out - exact) <= bound)


def pair_sequence(inp, weight, odd_first: bool = True):
    """out = inp @ weight.T as Intel defines VDPBF16PS: per pair of k, acc += the odd product, then
    acc += the even one, each sum of the exact product rounded once to float32 (the float64 sum is
    exact here), bf16 inputs and float32 results below 2^-126 taken as zero. odd_first=False: the
    even product first, as TDPBF16PS's definition (and tests/simulated_isa) adds them."""
    def flush(x):
        return np.where(np.abs(x) < FLUSH, 0.0, x)
    i, w = flush(ref.round_bf16(inp)), flush(ref.round_bf16(weight))
    if i.shape[1] % 2:
        i, w = np.pad(i, ((0, 0), (0, 1))), np.pad(w, ((0, 0), (0, 1)))
    acc = np.zeros((i.shape[0], w.shape[0]), np.float32)
    for k in range(0, i.shape[1], 2):
        for kk in ((k + 1, k) if odd_first else (k, k + 1)):
            acc = flush((acc + np.outer(i[:, kk], w[:, kk])).astype(np.float32))
    return acc


@pytest.mark.skipif("avx512_bf16" not in ops.cpu_info()["bf16_paths"] or "avx512" not in ISAS,
                    reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("scale", [1.0, 2.0 ** -62, 2.0 ** -64])
def test_dpbf16_path_is_the_documented_instruction(scale):
    """The avx512_bf16 path, one slice deep, bit for bit as the instruction is defined: the
    accumulation order (odd k first in each pair) and the flushing the tolerance above allows for."""
    inp, weight, _, _ = operands(17, 75, 40, seed=5)
    inp, weight = inp * np.float32(scale), weight * np.float32(scale)
    out = np.zeros((17, 40), np.float32)
    with ops.use_isa("avx512"), ops.use_bf16_path("avx512_bf16"):
        ops.matmul_forward(out, inp, weight, precision="bf16")
    assert np.array_equal(out, pair_sequence(inp, weight))


# --- the internal gemm, through tests/gemm_check.cpp -------------------------------------------------

# Precision::bf16 runs on every path this CPU has, each checked in the avx512 build (the only one with
# native code; the other builds emulate whatever path is chosen).
MODES = ["fp32"] + [f"bf16:{p}" for p in ops.cpu_info()["bf16_paths"]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("isa", ISAS)
def test_gemm_strides_alpha_accumulate(isa, mode, driver):  # driver: conftest.py
    # bf16: the reference multiplies the same bf16-rounded operands, so the tolerance is fp32's.
    check_gemm_rows(driver.lines("gemm_check", isa, *mode.split(":")))
