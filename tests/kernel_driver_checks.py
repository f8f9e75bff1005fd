"""Every kernel of cpp/kernels.h, run through tests/kernel_run.cpp (a process per call) against
tests/reference.py with test_kernels.py's tolerances: shapes off every tile and vector width, NaN
propagation, and bitwise-identical results for 1 and 3 threads.

For the variants the Python module cannot load here: the AArch64 build under qemu
(tests/test_aarch64.py) and the avx512 build on simulated intrinsics (tests/test_avx512_simulated.py).
Each of those modules imports these tests and supplies the `kernel` fixture: kernel(name, *args,
threads=None) calls one kernel as tests/drivers.py's Drivers.kernel does.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from reference import assert_close, assert_stats_close, randn
from test_kernels import (ADAMW, ATTENTION_TOL, ELEMENTWISE_TOL, LN_BACKWARD_TOL, NORMALISE_TOL,
                          assert_bf16_close, attention_bf16_expected, extreme_logits, gelu_input,
                          gelu_scale, layernorm_dinp_bound, layernorm_row_tol, logits_tol,
                          matmul_tol)

FP32, BF16 = 0, 1  # Precision (cpp/kernels.h), passed as its integer value


def f32(*shape):
    return np.zeros(shape, np.float32)

@pytest.mark.parametrize("N,C,OC", [(1, 1, 1), (7, 9, 33), (67, 300, 97)])
@pytest.mark.parametrize("precision", [FP32, BF16], ids=["fp32", "bf16"])
def test_matmul(kernel, rng, N, C, OC, precision):
    inp, weight, bias, dout = randn(rng, N, C), randn(rng, OC, C), randn(rng, OC), randn(rng, N, OC)
    r = ref.round_bf16 if precision == BF16 else (lambda x: x)
    out = f32(N, OC)
    kernel("matmul_forward", out, inp, weight, bias, N, C, OC, precision)
    assert_close(out, ref.matmul_forward(r(inp), r(weight), bias), matmul_tol(C), "out")
    dinp0, dweight0, dbias0 = randn(rng, N, C), randn(rng, OC, C), randn(rng, OC)
    dinp, dweight, dbias = dinp0.copy(), dweight0.copy(), dbias0.copy()
    kernel("matmul_backward", dinp, dweight, dbias, dout, inp, weight, N, C, OC, precision, True)
    e_dinp, e_dweight, _ = ref.matmul_backward(r(dout), r(inp), r(weight))
    _, _, e_dbias = ref.matmul_backward(dout, inp, weight)
    assert_close(dinp, dinp0 + e_dinp, matmul_tol(OC), "dinp")
    assert_close(dweight, dweight0 + e_dweight, matmul_tol(N), "dweight")
    assert_close(dbias, dbias0 + e_dbias, matmul_tol(N), "dbias")


@pytest.mark.parametrize("N,V", [(1, 1), (7, 9), (4, 1000)])
@pytest.mark.parametrize("kind", ["normal", "offset_1e4", "spread_1e4"])
def test_softmax_and_crossentropy(kernel, rng, N, V, kind):
    logits, dprobs = extreme_logits(rng, N, V, kind), randn(rng, N, V)
    targets = rng.integers(0, V, N).astype(np.int32)
    weights = rng.uniform(0.1, 2.0, N).astype(np.float32)
    tol = logits_tol(logits)
    probs = f32(N, V)
    kernel("softmax_forward", probs, logits, N, V)
    assert_close(probs, ref.softmax_forward(logits), tol, "probs")
    dlogits = f32(N, V)
    kernel("softmax_backward", dlogits, dprobs, probs, N, V)
    assert_close(dlogits, ref.softmax_backward(dprobs, probs), NORMALISE_TOL, "softmax dlogits")
    losses, lse = f32(N), f32(N)
    kernel("crossentropy_forward", losses, lse, logits, targets, N, V)
    e_losses, e_lse = ref.crossentropy_forward(logits, targets)
    assert_close(lse, e_lse, tol, "lse")
    assert_close(losses, e_losses, tol, "losses",
                 scale=max(float(np.max(np.abs(logits))), float(np.max(np.abs(e_losses))), 1.0))
    dlogits = f32(N, V)
    kernel("crossentropy_backward", dlogits, logits, lse, targets, weights, N, V)
    assert_close(dlogits, ref.crossentropy_backward(logits, targets, weights), tol,
                 "crossentropy dlogits")


def test_nan_propagates(kernel):
    # As test_vector_math.py asks of every variant: a NaN shows as NaN in its own row or element only
    # (on neon, FMAXV behind vhmax propagates NaN where x86's reductions need not).
    x = np.zeros((3, 17), np.float32)
    x[1, 5] = np.nan
    probs, losses, lse = f32(3, 17), f32(3), f32(3)
    kernel("softmax_forward", probs, x, 3, 17)
    assert np.all(np.isnan(probs[1])) and np.all(np.isfinite(probs[[0, 2]]))
    kernel("crossentropy_forward", losses, lse, x, np.zeros(3, np.int32), 3, 17)
    assert np.isnan(losses[1]) and np.all(np.isfinite(losses[[0, 2]]))
    g, out = np.array([1.0, np.nan, -1.0], np.float32), f32(3)
    kernel("gelu_forward", out, g, 3)
    assert np.isnan(out[1]) and np.all(np.isfinite(out[[0, 2]]))


@pytest.mark.parametrize("N,C", [(1, 1), (7, 9), (33, 65), (5, 384)])
def test_layernorm(kernel, rng, N, C):
    inp, weight, bias, dout = randn(rng, N, C), randn(rng, C), randn(rng, C), randn(rng, N, C)
    out, mean, rstd = f32(N, C), f32(N), f32(N)
    kernel("layernorm_forward", out, mean, rstd, inp, weight, bias, N, C)
    e_out, e_mean, e_rstd = ref.layernorm_forward(inp, weight, bias)
    row_tol = layernorm_row_tol(inp)
    assert_close(out, e_out, 1.0, "out", scale=row_tol * np.max(np.abs(e_out)))
    assert_close(rstd, e_rstd, 1.0, "rstd", scale=row_tol[:, 0] * e_rstd)
    # Accumulating into filled buffers, judged as test_kernels.py judges it: dinp row by row.
    dinp0, dweight0, dbias0 = randn(rng, N, C), randn(rng, C), randn(rng, C)
    dinp, dweight, dbias = dinp0.copy(), dweight0.copy(), dbias0.copy()
    kernel("layernorm_backward", dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C)
    e_dinp, e_dweight, e_dbias = ref.layernorm_backward(dout, inp, weight)
    assert_close(dinp, dinp0 + e_dinp, 1.0, "dinp",
                 scale=layernorm_dinp_bound(inp, weight, dout, e_dinp, dinp0))
    for got, start, expected, what in ((dweight, dweight0, e_dweight, "dweight"),
                                       (dbias, dbias0, e_dbias, "dbias")):
        assert_close(got, start + expected, LN_BACKWARD_TOL, what,
                     scale=float(np.max(np.abs(expected)) + np.max(np.abs(start))))


@pytest.mark.parametrize("n", [1, 7, 1031])
@pytest.mark.parametrize("kind", ["normal", "large"])
def test_gelu(kernel, rng, n, kind):
    inp, dout = gelu_input(rng, n, kind), randn(rng, n)
    out, dinp = f32(n), np.full(n, np.nan, np.float32)
    kernel("gelu_forward", out, inp, n)
    assert_close(out, ref.gelu_forward(inp), 1e-5, "out", scale=gelu_scale(inp))
    kernel("gelu_backward", dinp, inp, dout, n, False)
    assert_close(dinp, ref.gelu_backward(inp, dout), 1e-5, "dinp",
                 scale=np.abs(dout) * gelu_scale(inp))


# (B, T, C, NH): head sizes 3, 16 and 96 against 4-lane vectors and 6 x 4-vector tiles, T past 64.
@pytest.mark.parametrize("B,T,C,NH", [(1, 7, 9, 3), (2, 65, 64, 4), (1, 130, 96, 1)])
def test_attention(kernel, rng, B, T, C, NH):
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    out, stats, dqkv = f32(B, T, C), f32(B, NH, T, 2), f32(B, T, 3 * C)
    kernel("attention_forward", out, stats, qkv, B, T, C, NH, FP32)
    assert_close(out, ref.attention_forward(qkv, NH)[0], ATTENTION_TOL, "out")
    assert_stats_close(stats, ref.attention_stats(qkv, NH), ATTENTION_TOL)
    kernel("attention_backward", dqkv, dout, qkv, stats, B, T, C, NH, FP32, False)
    expected = ref.attention_backward(dout, qkv, NH)
    assert_close(dqkv, expected, ATTENTION_TOL, "dqkv")


def test_attention_bf16(kernel, rng):
    # test_kernels.py's bound: fp32 accumulation plus, elementwise, the bfloat16 rounding flips the
    # kernel's fp32 intermediates can cause.
    B, T, C, NH = 2, 65, 64, 4
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    out, stats, dqkv = f32(B, T, C), f32(B, NH, T, 2), f32(B, T, 3 * C)
    kernel("attention_forward", out, stats, qkv, B, T, C, NH, BF16)
    kernel("attention_backward", dqkv, dout, qkv, stats, B, T, C, NH, BF16, False)
    (e_out, b_out), _, (e_dqkv, b_dqkv) = attention_bf16_expected(qkv, dout, NH)
    assert_bf16_close(out, e_out, b_out, "out")
    assert_bf16_close(dqkv, e_dqkv, b_dqkv, "dqkv")


def test_embedding_and_residual(kernel, rng):
    B, T, V, C, maxT = 3, 33, 5, 65, 40
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe, dout = randn(rng, V, C), randn(rng, maxT, C), randn(rng, B, T, C)
    out, dwte, dwpe = f32(B, T, C), f32(V, C), f32(maxT, C)
    kernel("embedding_forward", out, tokens, wte, wpe, B, T, C)
    assert_close(out, ref.embedding_forward(tokens, wte, wpe), ELEMENTWISE_TOL, "out")
    kernel("embedding_backward", dwte, dwpe, dout, tokens, B, T, C)
    e_dwte, e_dwpe = ref.embedding_backward(dout, tokens, V, maxT)
    assert_close(dwte, e_dwte, NORMALISE_TOL, "dwte")
    assert_close(dwpe, e_dwpe, NORMALISE_TOL, "dwpe")
    a, b, total = randn(rng, 77), randn(rng, 77), f32(77)
    kernel("residual_forward", total, a, b, 77)
    assert_close(total, ref.residual_forward(a, b), ELEMENTWISE_TOL, "residual")


@pytest.mark.parametrize("n", [7, 4097])
def test_adamw_sum_squares_round_bf16(kernel, rng, n):
    params, m, v, grads = randn(rng, n), f32(n), f32(n), randn(rng, n)
    mask = (rng.random(n) < 0.5).astype(np.float32)
    e_params, e_m, e_v = ref.adamw_update(params, m, v, grads, mask, grad_scale=0.5, t=1, **ADAMW)
    start = params.astype(np.float64)
    kernel("adamw_update", params, m, v, grads, mask, n, ADAMW["lr"], ADAMW["beta1"], ADAMW["beta2"],
         ADAMW["eps"], ADAMW["weight_decay"], 0.5, 1)
    assert_close(m, e_m, 1e-5, "m")
    assert_close(v, e_v, 1e-5, "v")
    e_step = e_params - start
    assert_close(params - start, e_step, 1.0, "params step",
                 scale=1e-5 * np.max(np.abs(e_step)) + np.finfo(np.float32).eps * np.abs(e_params))
    assert kernel("sum_squares", grads, n) == pytest.approx(ref.sum_squares(grads), rel=1e-12)
    rounded = f32(n)
    kernel("round_bf16", rounded, grads, n)
    np.testing.assert_array_equal(rounded, ref.round_bf16(grads).astype(np.float32))


@pytest.mark.parametrize("precision", [FP32, BF16], ids=["fp32", "bf16"])
def test_bitwise_identical_for_1_and_3_threads(kernel, rng, precision):
    # Products split by rows and by columns (in the given precision), attention's heads, layernorm's
    # fixed row chunks.
    N, C, OC = 200, 96, 130
    B, T, CA, NH = 2, 70, 48, 3
    inp, weight, dout = randn(rng, N, C), randn(rng, OC, C), randn(rng, N, OC)
    qkv, datt = randn(rng, B, T, 3 * CA), randn(rng, B, T, CA)
    ln_w, ln_dout = randn(rng, C), randn(rng, N, C)
    runs = []
    for threads in (1, 3):
        got = dict(dinp=f32(N, C), dweight=f32(OC, C), dbias=f32(OC), out=f32(B, T, CA),
                   stats=f32(B, NH, T, 2), dqkv=f32(B, T, 3 * CA), ln_out=f32(N, C), mean=f32(N),
                   rstd=f32(N), ln_dinp=f32(N, C), ln_dw=f32(C), ln_db=f32(C))
        kernel("matmul_backward", got["dinp"], got["dweight"], got["dbias"], dout, inp, weight, N, C,
               OC, precision, False, threads=threads)
        kernel("attention_forward", got["out"], got["stats"], qkv, B, T, CA, NH, precision,
               threads=threads)
        kernel("attention_backward", got["dqkv"], datt, qkv, got["stats"], B, T, CA, NH, precision,
               False, threads=threads)
        kernel("layernorm_forward", got["ln_out"], got["mean"], got["rstd"], inp, ln_w, ln_w, N, C,
               threads=threads)
        kernel("layernorm_backward", got["ln_dinp"], got["ln_dw"], got["ln_db"], ln_dout, inp, ln_w,
               got["mean"], got["rstd"], N, C, threads=threads)
        runs.append(got)
    for name in runs[0]:
        assert np.array_equal(runs[0][name].view(np.uint32), runs[1][name].view(np.uint32)), name
