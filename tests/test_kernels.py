"""Every kernel, forward and backward, against independent references.

- float64 numpy references (tests/reference.py) on awkward shapes (1, 7, 9, 33, 65, sizes that are no
  multiple of any tile) and extreme values, on every kernel variant this CPU runs (the `isa` fixture);
- backward semantics: gradients accumulate into pre-filled buffers, None gradients are skipped, rows
  of weight 0 leave the cross-entropy gradient untouched;
- finite differences of the float64 reference forward against the float32 kernel backward;
- PyTorch (float64, autograd) for every kernel and torch.optim.AdamW, when torch is installed;
- determinism: bitwise-identical outputs for 1, 2 and 3 threads on shapes large enough to split.

Tolerances are stated next to each kernel and are relative to the magnitude of the result (see
reference.assert_close): float32 rounding, grown by the length of the reductions involved.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import reference as ref
from lmlab import ops
from reference import assert_close, assert_stats_close, randn

EPS32 = float(np.finfo(np.float32).eps)

# --- tolerances (relative to max |expected| unless stated) ---------------------------------------------
ELEMENTWISE_TOL = 1e-6  # one or two float32 roundings: residual, embedding forward
NORMALISE_TOL = 1e-5  # softmax, layernorm forward: a row reduction, then an exp or a sqrt
LN_BACKWARD_TOL = 5e-5  # two row reductions and one column reduction
ATTENTION_TOL = 5e-5  # q.k over HS, softmax over T, att.v over T (backward: the same chain twice)
FD_TOL = 1e-4  # float32 kernel gradient against float64 central differences


def matmul_tol(K: int) -> float:
    """float32 rounding of a length-K dot product of random data grows like sqrt(K)."""
    return 1e-5 * max(1.0, math.sqrt(K / 16.0))


def logits_tol(logits: np.ndarray) -> float:
    """Softmax-type results: 1e-5, plus the rounding of a float32 log-sum-exp of size max|logit|,
    which shifts every exp(x - lse) by that much relative error (it matters for logits ~1e4)."""
    return 1e-5 + 4.0 * EPS32 * float(np.max(np.abs(logits)))


def zeros32(shape) -> np.ndarray:
    return np.zeros(shape, dtype=np.float32)


def prefill(rng, shape) -> np.ndarray:
    """A gradient buffer holding earlier contributions, to check that backward adds to it."""
    return randn(rng, *shape)


# === matmul ============================================================================================

MATMUL_SHAPES = [  # (N, C, OC); (67, 300, 97) crosses the usual K blocks and every micro-tile edge;
    # (768, 512, 128) is a docs/DESIGN.md training shape, large enough for a GEMM's packed, threaded path
    (1, 1, 1), (7, 9, 33), (33, 65, 7), (65, 33, 9), (9, 1, 65), (1, 65, 7), (67, 300, 97), (768, 512, 128)]


@pytest.mark.parametrize("N,C,OC", MATMUL_SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matmul_forward(isa, rng, N, C, OC, with_bias):
    inp, weight = randn(rng, N, C), randn(rng, OC, C)
    bias = randn(rng, OC) if with_bias else None
    out = ops.matmul_forward(zeros32((N, OC)), inp, weight, bias)
    assert_close(out, ref.matmul_forward(inp, weight, bias), matmul_tol(C), "out")


def test_matmul_forward_leading_dims(isa, rng):
    inp, weight, bias = randn(rng, 2, 7, 9), randn(rng, 33, 9), randn(rng, 33)
    out = ops.matmul_forward(zeros32((2, 7, 33)), inp, weight, bias)
    assert_close(out, ref.matmul_forward(inp, weight, bias), matmul_tol(9), "out (B, T, OC)")


@pytest.mark.parametrize("N,C,OC", MATMUL_SHAPES)
def test_matmul_backward_accumulates(isa, rng, N, C, OC):
    inp, weight, dout = randn(rng, N, C), randn(rng, OC, C), randn(rng, N, OC)
    dinp0, dweight0, dbias0 = prefill(rng, (N, C)), prefill(rng, (OC, C)), prefill(rng, (OC,))
    dinp, dweight, dbias = dinp0.copy(), dweight0.copy(), dbias0.copy()
    ops.matmul_backward(dinp, dweight, dbias, dout, inp, weight)
    e_dinp, e_dweight, e_dbias = ref.matmul_backward(dout, inp, weight)
    assert_close(dinp, dinp0 + e_dinp, matmul_tol(OC), "dinp")
    assert_close(dweight, dweight0 + e_dweight, matmul_tol(N), "dweight")
    assert_close(dbias, dbias0 + e_dbias, matmul_tol(N), "dbias")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("N,C,OC", MATMUL_SHAPES)
def test_matmul_backward_overwrites_dinp_only(isa, rng, precision, N, C, OC):
    inp, weight, dout = randn(rng, N, C), randn(rng, OC, C), randn(rng, N, OC)
    dinp, dweight0, dbias0 = garbage((N, C)), prefill(rng, (OC, C)), prefill(rng, (OC,))
    dweight, dbias = dweight0.copy(), dbias0.copy()
    ops.matmul_backward(dinp, dweight, dbias, dout, inp, weight, precision=precision,
                        accumulate=False)
    r = ref.round_bf16 if precision == "bf16" else (lambda x: x)
    e_dinp, e_dweight, _ = ref.matmul_backward(r(dout), r(inp), r(weight))
    _, _, e_dbias = ref.matmul_backward(dout, inp, weight)
    assert_close(dinp, e_dinp, matmul_tol(OC), "dinp")
    assert_close(dweight, dweight0 + e_dweight, matmul_tol(N), "dweight (still accumulates)")
    assert_close(dbias, dbias0 + e_dbias, matmul_tol(N), "dbias (still accumulates)")


@pytest.mark.parametrize("wanted", ["dinp", "dweight", "dbias"])
def test_matmul_backward_skips_none(isa, rng, wanted):
    N, C, OC = 33, 9, 7
    inp, weight, dout = randn(rng, N, C), randn(rng, OC, C), randn(rng, N, OC)
    grads = {"dinp": zeros32((N, C)), "dweight": zeros32((OC, C)), "dbias": zeros32((OC,))}
    args = {name: (buf if name == wanted else None) for name, buf in grads.items()}
    ops.matmul_backward(args["dinp"], args["dweight"], args["dbias"], dout, inp, weight)
    expected = dict(zip(["dinp", "dweight", "dbias"], ref.matmul_backward(dout, inp, weight)))
    assert_close(grads[wanted], expected[wanted], matmul_tol(N), wanted)


# --- precision="bf16": operands rounded to bfloat16, fp32 accumulation -------------------------------
# The reference multiplies operands it rounds itself (reference.round_bf16), so the tolerance is the
# fp32 one: what is tested is that exactly the operands, and nothing else, lose precision.

@pytest.mark.parametrize("N,C,OC", MATMUL_SHAPES + [(100, 1100, 70)])  # 1100: several AMX k-slices
@pytest.mark.parametrize("with_bias", [True, False])
def test_matmul_bf16_forward(bf16_variant, rng, N, C, OC, with_bias):
    inp, weight = randn(rng, N, C), randn(rng, OC, C)
    bias = randn(rng, OC) if with_bias else None
    out = ops.matmul_forward(zeros32((N, OC)), inp, weight, bias, precision="bf16")
    r_inp, r_weight = ref.round_bf16(inp), ref.round_bf16(weight)
    assert_close(out, ref.matmul_forward(r_inp, r_weight, bias), matmul_tol(C), "out")


@pytest.mark.parametrize("N,C,OC", MATMUL_SHAPES + [(1100, 70, 100)])
def test_matmul_bf16_backward_accumulates(bf16_variant, rng, N, C, OC):
    inp, weight, dout = randn(rng, N, C), randn(rng, OC, C), randn(rng, N, OC)
    dinp0, dweight0, dbias0 = prefill(rng, (N, C)), prefill(rng, (OC, C)), prefill(rng, (OC,))
    dinp, dweight, dbias = dinp0.copy(), dweight0.copy(), dbias0.copy()
    ops.matmul_backward(dinp, dweight, dbias, dout, inp, weight, precision="bf16")
    e_dinp, e_dweight, _ = ref.matmul_backward(ref.round_bf16(dout), ref.round_bf16(inp),
                                               ref.round_bf16(weight))
    _, _, e_dbias = ref.matmul_backward(dout, inp, weight)  # the bias gradient stays an fp32 sum
    assert_close(dinp, dinp0 + e_dinp, matmul_tol(OC), "dinp")
    assert_close(dweight, dweight0 + e_dweight, matmul_tol(N), "dweight")
    assert_close(dbias, dbias0 + e_dbias, matmul_tol(N), "dbias")


def test_matmul_bf16_rounds_the_operands(bf16_variant, rng):
    # Against the unrounded product the bf16 result is off by about 2^-9 relative: far outside the
    # fp32 tolerance, so the test above could not pass by computing in fp32.
    inp, weight = randn(rng, 64, 256), randn(rng, 96, 256)
    out = ops.matmul_forward(zeros32((64, 96)), inp, weight, precision="bf16")
    exact = ref.matmul_forward(inp, weight)
    err = np.max(np.abs(out - exact)) / np.max(np.abs(exact))
    assert 20 * matmul_tol(256) < err < 1e-2


@pytest.mark.parametrize("precision", ["fp16", "BF16", "", "float32", 1, None])
def test_matmul_rejects_unknown_precision(rng, precision):
    inp, weight = randn(rng, 4, 8), randn(rng, 3, 8)
    message = f"precision must be one of fp32, bf16 .*got {precision!r}"
    with pytest.raises(ValueError, match=message):
        ops.matmul_forward(zeros32((4, 3)), inp, weight, precision=precision)
    with pytest.raises(ValueError, match=message):
        ops.matmul_backward(zeros32((4, 8)), None, None, randn(rng, 4, 3), inp, weight,
                            precision=precision)
    with pytest.raises(ValueError, match=message):
        ops.attention_forward(zeros32((1, 2, 8)), zeros32((1, 2, 2, 2)), randn(rng, 1, 2, 24), 2,
                              precision=precision)


def test_precision_enum_and_names_agree(rng):
    assert ops.parse_precision("fp32") is ops.Precision.FP32
    assert ops.parse_precision("bf16") is ops.Precision.BF16
    assert ops.parse_precision(ops.Precision.BF16) is ops.Precision.BF16
    assert [ops.precision_name(p) for p in (ops.Precision.FP32, ops.Precision.BF16)] == list(
        ops.MATMUL_PRECISIONS)
    inp, weight = randn(rng, 9, 33), randn(rng, 7, 33)
    by_name = ops.matmul_forward(zeros32((9, 7)), inp, weight, precision="bf16")
    by_enum = ops.matmul_forward(zeros32((9, 7)), inp, weight, precision=ops.Precision.BF16)
    np.testing.assert_array_equal(by_name, by_enum)


def test_resolve_precision_auto_follows_the_native_bf16_path():
    native = ops.cpu_info()["bf16_matmul"] in ("amx", "avx512_bf16")
    assert ops.resolve_precision("auto") is (ops.Precision.BF16 if native else ops.Precision.FP32)
    with ops.use_isa("portable"):  # no native bf16 code in the portable variant
        assert ops.resolve_precision("auto") is ops.Precision.FP32
    assert ops.resolve_precision("fp32") is ops.Precision.FP32
    with pytest.raises(ValueError, match="got 'Auto'"):
        ops.resolve_precision("Auto")


def test_binding_takes_the_enum_only(rng):
    """The names are parsed once in Python (ops); the compiled boundary takes the enum."""
    from lmlab import _core
    inp, weight = randn(rng, 4, 8), randn(rng, 3, 8)
    with pytest.raises(TypeError):
        _core.matmul_forward(zeros32((4, 3)), inp, weight, None, precision="bf16")


def test_round_bf16_kernel(isa, rng):
    x = np.concatenate([randn(rng, 1000, scale=100.0),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8,
                                  3.3895e38], np.float32)])
    got = ops.round_bf16(x)
    np.testing.assert_array_equal(got, ref.round_bf16(x).astype(np.float32))
    assert np.isnan(ops.round_bf16(np.array([np.nan], np.float32)))[0]
    inplace = x.copy()
    assert ops.round_bf16(inplace, out=inplace) is inplace
    np.testing.assert_array_equal(inplace, got)


# === softmax ===========================================================================================

SOFTMAX_SHAPES = [(1, 1), (1, 7), (7, 9), (9, 33), (33, 65), (3, 1000)]


@pytest.mark.parametrize("N,V", SOFTMAX_SHAPES)
@pytest.mark.parametrize("kind", ["normal", "offset_1e4", "spread_1e4"])
def test_softmax_forward(isa, rng, N, V, kind):
    logits = extreme_logits(rng, N, V, kind)
    probs = ops.softmax_forward(zeros32((N, V)), logits)
    expected = ref.softmax_forward(logits)
    assert_close(probs, expected, logits_tol(logits), "probs")
    assert_close(probs.astype(np.float64).sum(axis=-1), np.ones(N), 1e-5, "row sums")


def extreme_logits(rng, N, V, kind) -> np.ndarray:
    """normal: N(0, 1); offset_1e4: 1e4 + N(0, 1), where exp overflows unless the max is subtracted;
    spread_1e4: N(0, 1e4), rows that are nearly one-hot."""
    x = rng.standard_normal((N, V))
    if kind == "offset_1e4":
        x = x + 1e4
    elif kind == "spread_1e4":
        x = x * 1e4
    return x.astype(np.float32)


@pytest.mark.parametrize("N,V", SOFTMAX_SHAPES)
def test_softmax_backward_accumulates(isa, rng, N, V):
    probs = ref.softmax_forward(randn(rng, N, V)).astype(np.float32)
    dprobs = randn(rng, N, V)
    dlogits0 = prefill(rng, (N, V))
    dlogits = dlogits0.copy()
    ops.softmax_backward(dlogits, dprobs, probs)
    assert_close(dlogits, dlogits0 + ref.softmax_backward(dprobs, probs), NORMALISE_TOL, "dlogits")


# === cross-entropy =====================================================================================

@pytest.mark.parametrize("N,V", [(1, 1), (1, 7), (7, 9), (9, 33), (33, 65), (4, 1000)])
@pytest.mark.parametrize("kind", ["normal", "offset_1e4", "spread_1e4"])
def test_crossentropy_forward(isa, rng, N, V, kind):
    logits = extreme_logits(rng, N, V, kind)
    targets = rng.integers(0, V, N).astype(np.int32)
    losses, lse = zeros32(N), zeros32(N)
    ops.crossentropy_forward(losses, lse, logits, targets)
    e_losses, e_lse = ref.crossentropy_forward(logits, targets)
    tol = logits_tol(logits)
    # A loss is a difference of two numbers of size max|logit|: its error is relative to that size.
    scale = max(float(np.max(np.abs(logits))), float(np.max(np.abs(e_losses))), 1.0)
    assert_close(lse, e_lse, tol, "lse")
    assert_close(losses, e_losses, tol, "losses", scale=scale)
    assert np.all(losses >= -tol * scale), "a cross-entropy loss is never negative"


@pytest.mark.parametrize("N,V", [(1, 7), (7, 9), (9, 33), (33, 65), (4, 1000)])
@pytest.mark.parametrize("kind", ["normal", "offset_1e4", "spread_1e4"])
def test_crossentropy_backward_accumulates(isa, rng, N, V, kind):
    logits = extreme_logits(rng, N, V, kind)
    targets = rng.integers(0, V, N).astype(np.int32)
    weights = rng.uniform(0.1, 2.0, N).astype(np.float32)
    lse = ref.logsumexp(logits).astype(np.float32)
    dlogits0 = prefill(rng, (N, V))
    dlogits = dlogits0.copy()
    ops.crossentropy_backward(dlogits, logits, lse, targets, weights)
    expected = ref.crossentropy_backward(logits, targets, weights)
    assert_close(dlogits, dlogits0 + expected, logits_tol(logits), "dlogits",
                 scale=max(float(np.max(np.abs(dlogits0))), float(np.max(np.abs(expected)))))


def test_crossentropy_backward_zero_weight_rows_untouched(isa, rng):
    """Instruct tuning puts weight 0 on prompt tokens: those rows must come back bit for bit."""
    N, V = 33, 65
    logits, targets = randn(rng, N, V), rng.integers(0, V, N).astype(np.int32)
    weights = rng.uniform(0.5, 1.5, N).astype(np.float32)
    masked = rng.random(N) < 0.5
    masked[0] = True
    weights[masked] = 0.0
    dlogits0 = prefill(rng, (N, V))
    dlogits = dlogits0.copy()
    ops.crossentropy_backward(dlogits, logits, ref.logsumexp(logits).astype(np.float32), targets, weights)
    np.testing.assert_array_equal(dlogits[masked], dlogits0[masked])
    expected = dlogits0 + ref.crossentropy_backward(logits, targets, weights)
    assert_close(dlogits[~masked], expected[~masked], NORMALISE_TOL, "unmasked rows")


def test_crossentropy_with_leading_dims(isa, rng):
    B, T, V = 2, 9, 33
    logits, targets = randn(rng, B, T, V), rng.integers(0, V, (B, T)).astype(np.int32)
    losses, lse = zeros32((B, T)), zeros32((B, T))
    ops.crossentropy_forward(losses, lse, logits, targets)
    assert_close(losses, ref.crossentropy_forward(logits, targets)[0], NORMALISE_TOL, "losses (B, T)")


# === layernorm =========================================================================================

LAYERNORM_SHAPES = [(1, 1), (1, 7), (7, 9), (9, 33), (33, 65), (65, 384)]


def layernorm_input(rng, N, C, kind) -> np.ndarray:
    """normal: N(0, 1); tiny_variance: rows of spread 1e-3 (variance far below eps) around 0, rows of
    spread 1e-1 around 10 (a one-pass E[x^2] - E[x]^2 would cancel catastrophically), and constant
    rows (variance exactly 0)."""
    x = rng.standard_normal((N, C))
    if kind == "tiny_variance":
        for n in range(N):
            x[n] = [x[n] * 1e-3, 10.0 + x[n] * 1e-1, np.full(C, 3.0)][n % 3]
    return x.astype(np.float32)


def layernorm_row_tol(inp) -> np.ndarray:
    """Per row (N, 1): NORMALISE_TOL, plus the float32 error of the row mean (~sqrt(C) eps |mean|)
    magnified by rstd in x - mean: rows with a large mean and a small spread lose those digits in any
    float32 kernel."""
    _, mean, rstd = ref.layernorm_forward(inp, np.ones(inp.shape[-1]), np.zeros(inp.shape[-1]))
    growth = 4.0 * math.sqrt(inp.shape[-1]) * EPS32 * np.abs(mean) * rstd
    return (NORMALISE_TOL + growth)[:, None]


@pytest.mark.parametrize("N,C", LAYERNORM_SHAPES)
@pytest.mark.parametrize("kind", ["normal", "tiny_variance"])
def test_layernorm_forward(isa, rng, N, C, kind):
    inp, weight, bias = layernorm_input(rng, N, C, kind), randn(rng, C), randn(rng, C)
    out, mean, rstd = zeros32((N, C)), zeros32(N), zeros32(N)
    ops.layernorm_forward(out, mean, rstd, inp, weight, bias)
    e_out, e_mean, e_rstd = ref.layernorm_forward(inp, weight, bias)
    row_tol = layernorm_row_tol(inp)
    assert_close(out, e_out, 1.0, "out", scale=row_tol * np.max(np.abs(e_out)))
    # The mean's error is relative to the size of the row's entries, not to the mean itself.
    assert_close(mean, e_mean, NORMALISE_TOL, "mean", scale=np.max(np.abs(inp), axis=1))
    assert_close(rstd, e_rstd, 1.0, "rstd", scale=row_tol[:, 0] * e_rstd)
    constant = np.all(inp == inp[:, :1], axis=1)
    assert_close(out[constant], np.broadcast_to(bias, out[constant].shape), NORMALISE_TOL,
                 "constant rows give the bias", scale=float(np.max(np.abs(bias))))


@pytest.mark.parametrize("N,C", LAYERNORM_SHAPES)
@pytest.mark.parametrize("kind", ["normal", "tiny_variance"])
def test_layernorm_backward_accumulates(isa, rng, N, C, kind):
    inp, weight, dout = layernorm_input(rng, N, C, kind), randn(rng, C), randn(rng, N, C)
    _, mean, rstd = ref.layernorm_forward(inp, weight, np.zeros(C))
    mean, rstd = mean.astype(np.float32), rstd.astype(np.float32)
    dinp0, dweight0, dbias0 = prefill(rng, (N, C)), prefill(rng, (C,)), prefill(rng, (C,))
    dinp, dweight, dbias = dinp0.copy(), dweight0.copy(), dbias0.copy()
    ops.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd)
    e_dinp, e_dweight, e_dbias = ref.layernorm_backward(dout, inp, weight)
    assert_close(dinp, dinp0 + e_dinp, 1.0, "dinp",
                 scale=layernorm_dinp_bound(inp, weight, dout, e_dinp, dinp0))
    assert_close(dweight, dweight0 + e_dweight, LN_BACKWARD_TOL, "dweight",
                 scale=float(np.max(np.abs(e_dweight)) + np.max(np.abs(dweight0))))
    assert_close(dbias, dbias0 + e_dbias, LN_BACKWARD_TOL, "dbias",
                 scale=float(np.max(np.abs(e_dbias)) + np.max(np.abs(dbias0))))


def layernorm_dinp_bound(inp, weight, dout, e_dinp, dinp0) -> np.ndarray:
    """Per row (N, 1), the bound on dinp's error. dinp is scaled by rstd (~316 on the tiny-variance
    rows): each row is judged against its own size, plus 4 fp32 ulps of rstd * max |dnorm| (dnorm =
    weight * dout): where the compiler fuses that product into the subtraction of its row mean (FMA
    contraction: GCC does it for AArch64, whose portable variant has FMA too), dnorm - mean(dnorm)
    keeps one rounding of dnorm that the unfused form cancels, and a row of one channel, whose exact
    gradient is 0, has no size of its own to hide it in."""
    row_scale = np.max(np.abs(e_dinp), axis=1, keepdims=True) + np.max(np.abs(dinp0))
    row_tol = layernorm_row_tol(inp) * (LN_BACKWARD_TOL / NORMALISE_TOL)
    _, _, rstd = ref.layernorm_forward(inp, weight, np.zeros_like(weight))
    dnorm = np.max(np.abs(ref.f64(weight) * ref.f64(dout)), axis=1, keepdims=True)
    return row_tol * row_scale + 4 * EPS32 * rstd[:, None] * dnorm


@pytest.mark.parametrize("skip", ["dweight", "dbias", "both"])
def test_layernorm_backward_skips_none(isa, rng, skip):
    N, C = 9, 33
    inp, weight, dout = randn(rng, N, C), randn(rng, C), randn(rng, N, C)
    _, mean, rstd = ref.layernorm_forward(inp, weight, np.zeros(C))
    dinp, dweight, dbias = zeros32((N, C)), zeros32(C), zeros32(C)
    ops.layernorm_backward(dinp, None if skip in ("dweight", "both") else dweight,
                           None if skip in ("dbias", "both") else dbias, dout, inp, weight,
                           mean.astype(np.float32), rstd.astype(np.float32))
    e_dinp, e_dweight, e_dbias = ref.layernorm_backward(dout, inp, weight)
    assert_close(dinp, e_dinp, LN_BACKWARD_TOL, "dinp")
    assert_close(dweight, np.zeros(C) if skip in ("dweight", "both") else e_dweight, LN_BACKWARD_TOL,
                 "dweight", scale=float(np.max(np.abs(e_dweight))))
    assert_close(dbias, np.zeros(C) if skip in ("dbias", "both") else e_dbias, LN_BACKWARD_TOL,
                 "dbias", scale=float(np.max(np.abs(e_dbias))))


# === GELU ==============================================================================================

GELU_SIZES = [1, 7, 9, 33, 65, 1031]


def gelu_input(rng, n, kind) -> np.ndarray:
    """normal: N(0, 2); large: |x| up to 1e4, plus the region where tanh saturates (|x| ~ 3..30),
    where an exp-based tanh can overflow to inf/inf."""
    if kind == "normal":
        return randn(rng, n, scale=2.0)
    mags = np.exp(rng.uniform(np.log(3.0), np.log(1e4), n))
    return (mags * rng.choice([-1.0, 1.0], n)).astype(np.float32)


def gelu_scale(x) -> np.ndarray:
    """GELU(x) = 0.5 x (1 + tanh(u)): float32 rounds 1 + tanh(u) to an absolute error ~eps, so the
    error bound scales with |x| elementwise (results near 0 for negative x keep an absolute bound)."""
    return np.maximum(np.abs(x.astype(np.float64)), 1.0)


@pytest.mark.parametrize("n", GELU_SIZES)
@pytest.mark.parametrize("kind", ["normal", "large"])
def test_gelu_forward(isa, rng, n, kind):
    inp = gelu_input(rng, n, kind)
    out = ops.gelu_forward(zeros32(n), inp)
    assert_close(out, ref.gelu_forward(inp), 1e-5, "out", scale=gelu_scale(inp))


@pytest.mark.parametrize("n", GELU_SIZES)
@pytest.mark.parametrize("kind", ["normal", "large"])
def test_gelu_backward_accumulates(isa, rng, n, kind):
    inp, dout = gelu_input(rng, n, kind), randn(rng, n)
    dinp0 = prefill(rng, (n,))
    dinp = dinp0.copy()
    ops.gelu_backward(dinp, inp, dout)
    expected = dinp0 + ref.gelu_backward(inp, dout)
    assert_close(dinp, expected, 1e-5, "dinp", scale=np.abs(dout) * gelu_scale(inp) + np.abs(dinp0))


def garbage(shape) -> np.ndarray:
    """An output buffer an overwriting kernel must never read: NaN everywhere, so any read shows."""
    return np.full(shape, np.nan, np.float32)


@pytest.mark.parametrize("n", GELU_SIZES)
def test_gelu_backward_overwrites(isa, rng, n):
    inp, dout = gelu_input(rng, n, "normal"), randn(rng, n)
    dinp = garbage((n,))
    ops.gelu_backward(dinp, inp, dout, accumulate=False)
    assert_close(dinp, ref.gelu_backward(inp, dout), 1e-5, "dinp",
                 scale=np.abs(dout) * gelu_scale(inp))


def test_gelu_multidimensional(isa, rng):
    inp = randn(rng, 3, 7, 9)
    out = ops.gelu_forward(zeros32(inp.shape), inp)
    assert_close(out, ref.gelu_forward(inp), 1e-5, "out (3, 7, 9)", scale=gelu_scale(inp))


# === residual ==========================================================================================

@pytest.mark.parametrize("shape", [(1,), (7,), (9, 33), (2, 7, 65)])
def test_residual_forward_and_backward(isa, rng, shape):
    a, b, dout = randn(rng, *shape), randn(rng, *shape), randn(rng, *shape)
    out = ops.residual_forward(zeros32(shape), a, b)
    assert_close(out, ref.residual_forward(a, b), ELEMENTWISE_TOL, "out")
    da0, db0 = prefill(rng, shape), prefill(rng, shape)
    da, db = da0.copy(), db0.copy()
    ops.residual_backward(da, db, dout)
    e_da, e_db = ref.residual_backward(dout)
    assert_close(da, da0 + e_da, ELEMENTWISE_TOL, "da")
    assert_close(db, db0 + e_db, ELEMENTWISE_TOL, "db")


# === attention =========================================================================================

ATTENTION_SHAPES = [  # (B, T, C, NH); the last is the docs/DESIGN.md model's (6 heads of 64, block 256)
    (1, 1, 1, 1), (1, 7, 9, 3), (2, 9, 33, 11), (1, 33, 12, 2), (2, 65, 64, 4), (1, 130, 96, 1),
    (1, 256, 384, 6)]


def run_attention(qkv, NH):
    B, T, C3 = qkv.shape
    out, stats = zeros32((B, T, C3 // 3)), np.full((B, NH, T, 2), np.nan, dtype=np.float32)
    ops.attention_forward(out, stats, qkv, NH)
    return out, stats


@pytest.mark.parametrize("B,T,C,NH", ATTENTION_SHAPES)
def test_attention_forward(isa, rng, B, T, C, NH):
    qkv = randn(rng, B, T, 3 * C)
    out, stats = run_attention(qkv, NH)
    assert_close(out, ref.attention_forward(qkv, NH)[0], ATTENTION_TOL, "out")
    assert_stats_close(stats, ref.attention_stats(qkv, NH), ATTENTION_TOL)


def test_attention_forward_large_scores(isa, rng):
    """q.k of size ~1e3 makes the softmax nearly one-hot: exp overflows unless the max is subtracted."""
    qkv = randn(rng, 2, 33, 3 * 16, scale=8.0)
    out, stats = run_attention(qkv, 2)
    tol = ATTENTION_TOL + 4 * EPS32 * float(np.max(np.abs(qkv))) ** 2
    assert_close(out, ref.attention_forward(qkv, 2)[0], tol, "out")
    assert_stats_close(stats, ref.attention_stats(qkv, 2), tol)


@pytest.mark.parametrize("B,T,C,NH", ATTENTION_SHAPES)
def test_attention_backward_accumulates(isa, rng, B, T, C, NH):
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    _, stats = run_attention(qkv, NH)
    dqkv0 = prefill(rng, (B, T, 3 * C))
    dqkv = dqkv0.copy()
    ops.attention_backward(dqkv, dout, qkv, stats, NH)
    expected = ref.attention_backward(dout, qkv, NH)
    assert_close(dqkv, dqkv0 + expected, ATTENTION_TOL, "dqkv",
                 scale=float(np.max(np.abs(expected)) + np.max(np.abs(dqkv0))))


@pytest.mark.parametrize("B,T,C,NH", ATTENTION_SHAPES)
def test_attention_backward_overwrites(isa, rng, B, T, C, NH):
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    _, stats = run_attention(qkv, NH)
    dqkv = garbage((B, T, 3 * C))
    ops.attention_backward(dqkv, dout, qkv, stats, NH, accumulate=False)
    expected = ref.attention_backward(dout, qkv, NH)
    assert_close(dqkv, expected, ATTENTION_TOL, "dqkv", scale=float(np.max(np.abs(expected))))


# Attention in bf16. The reference (float64 products of operands it rounds itself) and the kernel
# round the same operands, except three the kernel computes in fp32 first: q * scale, the
# probabilities P and dS * scale. Where such a value lies within fp32 noise of a bfloat16 rounding
# boundary, the kernel's and the reference's roundings can land on adjacent bfloat16 values, one
# bfloat16 ulp apart (up to 2^-7 relative), which no fixed tolerance covers: one P_ij flipped
# shifts out_i by ulp(P_ij) * |v_j|. So the bound is elementwise and derived, not tuned:
#   error <= ATTENTION_TOL * max|expected|             (fp32 accumulation, as in fp32 attention)
#          + sum over each product's reduction of slack(operand) * |other operand|,
# where slack(x) = r(x + w) - r(x - w) is the largest distance between the bfloat16 roundings of two
# values within w of x, and w bounds the kernel's fp32 error on x (propagated below from stated
# error bounds: a length-n fp32 sum within gamma(n) relative, vexp within 2 fp32 ulp). slack is zero
# except within w of a rounding boundary, so the bound stays as tight as the fp32 one everywhere
# else, and holds on every bf16 path (emulated, AMX, AVX512-BF16: each sums exact bf16 products in
# fp32).

def gamma(n: int) -> float:
    """Relative error bound of an fp32 sum of n terms (Higham's gamma_n)."""
    return n * EPS32 / (1.0 - n * EPS32)


def bf16_slack(x, w):
    """Largest |r(a) - r(b)| over a, b within w of x (r rounds to bfloat16; r is monotonic)."""
    return ref.round_bf16(x + w) - ref.round_bf16(x - w)


def attention_bf16_expected(qkv, dout, NH):
    """(out, stats, dqkv) of the bf16 reference and the elementwise bound on the kernel's error of
    each, following the kernel's operation order (cpp/attention.cpp)."""
    r = ref.round_bf16
    q, k, v = ref.split_heads(qkv, NH)  # (B, NH, T, HS) float64
    B, _, T, HS = q.shape
    scale = 1.0 / math.sqrt(HS)
    dy = np.asarray(dout, np.float64).reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
    tr = lambda x: x.swapaxes(-1, -2)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)

    # Scores: the kernel's q * scale is an fp32 product with an fp32 scale (three roundings).
    qs = q * scale
    rq, rk, rv, rdy = r(qs), r(k), r(v), r(dy)
    S = rq @ tr(rk)
    dS_abs = bf16_slack(qs, 2 * EPS32 * np.abs(qs)) @ tr(np.abs(rk)) + gamma(HS) * (np.abs(rq) @ tr(np.abs(rk)))
    S = np.where(future, -np.inf, S)
    dS_abs = np.where(future, 0.0, dS_abs)
    m = S.max(-1, keepdims=True)
    e = np.exp(S - m)
    P = e / e.sum(-1, keepdims=True)
    # Relative error of P: the score's and the max's error (through exp), the rounding of S - m,
    # vexp (2 ulp), the sum over T, and 1 / sum and the product (one rounding each).
    with np.errstate(invalid="ignore"):
        rho_e = dS_abs + dS_abs.max(-1, keepdims=True) + 0.5 * EPS32 * np.where(future, 0.0, m - S) + 2 * EPS32
    rho_e = np.where(future, 0.0, rho_e)
    rho_P = rho_e + rho_e.max(-1, keepdims=True) + gamma(T) + 2 * EPS32
    wP = 1.01 * P * rho_P  # first order in rho, which is below 1e-2: 1% covers the rest
    slack_P = bf16_slack(P, wP)

    out = ref.merge_heads(r(P) @ rv)
    out_bound = ref.merge_heads(slack_P @ np.abs(rv))
    stats = np.stack([m[..., 0], 1.0 / e.sum(-1)], axis=-1)
    stats_bound = np.stack([dS_abs.max(-1), stats[..., 1] * (1.01 * rho_e.max(-1) + gamma(T) + EPS32)], axis=-1)

    # Backward: dP = dO V^T from exact operands; dS = P (dP - sum P dP), scaled, then rounded.
    dP = rdy @ tr(rv)
    w_dP = gamma(HS) * (np.abs(rdy) @ tr(np.abs(rv)))
    dot = (P * dP).sum(-1, keepdims=True)
    w_dot = (wP * np.abs(dP) + P * w_dP).sum(-1, keepdims=True) + gamma(T) * (P * np.abs(dP)).sum(-1, keepdims=True)
    dSc = P * (dP - dot) * scale
    w_dSc = 1.01 * scale * (wP * np.abs(dP - dot) + P * (w_dP + w_dot)) + 3 * EPS32 * np.abs(dSc)
    slack_dS = bf16_slack(dSc, w_dSc)
    rdS = r(dSc)
    dq, dk, dv = rdS @ rk, tr(rdS) @ r(q), tr(r(P)) @ rdy
    bq, bk, bv = slack_dS @ np.abs(rk), tr(slack_dS) @ np.abs(r(q)), tr(slack_P) @ np.abs(rdy)
    merge = lambda a, b, c: np.concatenate([ref.merge_heads(a), ref.merge_heads(b), ref.merge_heads(c)], -1)
    return (out, out_bound), (stats, stats_bound), (merge(dq, dk, dv), merge(bq, bk, bv))


def assert_bf16_close(actual, expected, bound, what):
    """|actual - expected| <= ATTENTION_TOL * max|expected| + bound, elementwise."""
    fp32_part = ATTENTION_TOL * float(np.max(np.abs(expected)))
    assert_close(actual, expected, 1.0, what, scale=fp32_part + bound)


@pytest.mark.parametrize("B,T,C,NH", ATTENTION_SHAPES)
def test_attention_bf16_forward_backward(bf16_variant, rng, B, T, C, NH):
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    out, stats, dqkv = zeros32((B, T, C)), zeros32((B, NH, T, 2)), garbage((B, T, 3 * C))
    ops.attention_forward(out, stats, qkv, NH, precision="bf16")
    ops.attention_backward(dqkv, dout, qkv, stats, NH, precision="bf16", accumulate=False)
    (e_out, b_out), (e_stats, b_stats), (e_dqkv, b_dqkv) = attention_bf16_expected(qkv, dout, NH)
    assert_bf16_close(out, e_out, b_out, "out")
    assert_close(stats[..., 0], e_stats[..., 0], 1.0, "stats max",
                 scale=ATTENTION_TOL * float(np.max(np.abs(e_stats[..., 0]))) + b_stats[..., 0])
    assert_close(stats[..., 1], e_stats[..., 1], 1.0, "stats 1/sum",
                 scale=ATTENTION_TOL * e_stats[..., 1] + b_stats[..., 1])
    assert_bf16_close(dqkv, e_dqkv, b_dqkv, "dqkv")


def test_attention_bf16_rounds_the_operands(bf16_variant, rng):
    # Against exact (unrounded) attention the bf16 result is off by ~2^-9 relative: far outside the
    # fp32 accumulation tolerance the test above allows, so that test would see unrounded operands.
    B, T, C, NH = 2, 64, 64, 2
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    out, stats, dqkv = zeros32((B, T, C)), zeros32((B, NH, T, 2)), zeros32((B, T, 3 * C))
    ops.attention_forward(out, stats, qkv, NH, precision="bf16")
    ops.attention_backward(dqkv, dout, qkv, stats, NH, precision="bf16")
    for got, exact in ((out, ref.attention_forward(qkv, NH)[0]),
                       (dqkv, ref.attention_backward(dout, qkv, NH))):
        err = np.max(np.abs(got - exact)) / np.max(np.abs(exact))
        assert 20 * ATTENTION_TOL < err < 3e-2


# === embedding =========================================================================================

EMBEDDING_SHAPES = [(1, 1, 1, 1, 1), (2, 7, 9, 33, 9), (3, 33, 5, 65, 40)]  # (B, T, V, C, maxT)


@pytest.mark.parametrize("B,T,V,C,maxT", EMBEDDING_SHAPES)
def test_embedding_forward(isa, rng, B, T, V, C, maxT):
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe = randn(rng, V, C), randn(rng, maxT, C)
    out = ops.embedding_forward(zeros32((B, T, C)), tokens, wte, wpe)
    assert_close(out, ref.embedding_forward(tokens, wte, wpe), ELEMENTWISE_TOL, "out")


@pytest.mark.parametrize("B,T,V,C,maxT", EMBEDDING_SHAPES)
@pytest.mark.parametrize("wanted", ["both", "dwte", "dwpe"])
def test_embedding_backward_accumulates(isa, rng, B, T, V, C, maxT, wanted):
    """V small against B*T: tokens repeat, so the scatter-add must sum collisions."""
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    dout = randn(rng, B, T, C)
    dwte0, dwpe0 = prefill(rng, (V, C)), prefill(rng, (maxT, C))
    dwte, dwpe = dwte0.copy(), dwpe0.copy()
    ops.embedding_backward(dwte if wanted != "dwpe" else None, dwpe if wanted != "dwte" else None,
                           dout, tokens)
    e_dwte, e_dwpe = ref.embedding_backward(dout, tokens, V, maxT)
    tol = 1e-5 * max(1.0, math.sqrt(B * T / 16.0))
    scale_te = float(np.max(np.abs(e_dwte)) + np.max(np.abs(dwte0)))
    scale_pe = float(np.max(np.abs(e_dwpe)) + np.max(np.abs(dwpe0)))
    assert_close(dwte, dwte0 + (e_dwte if wanted != "dwpe" else 0.0), tol, "dwte", scale=scale_te)
    assert_close(dwpe, dwpe0 + (e_dwpe if wanted != "dwte" else 0.0), tol, "dwpe", scale=scale_pe)


# === AdamW and the gradient norm =======================================================================

ADAMW = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("n", [1, 7, 33, 65, 4099])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("grad_size", [1.0, 1e-8])
def test_adamw_update(isa, rng, n, masked, grad_size):
    """Five steps, each against the float64 reference taken from the kernel's own state before it.
    grad_size 1e-8 makes sqrt(vhat) comparable to eps, so where eps enters the denominator matters."""
    params, m, v = randn(rng, n), np.zeros(n, np.float32), np.zeros(n, np.float32)
    mask = (rng.random(n) < 0.5).astype(np.float32) if masked else None
    for t in range(1, 6):
        grads = randn(rng, n, scale=grad_size)
        e_params, e_m, e_v = ref.adamw_update(params, m, v, grads, mask, grad_scale=0.5, t=t, **ADAMW)
        start = params.astype(np.float64)
        ops.adamw_update(params, m, v, grads, mask, grad_scale=0.5, t=t, **ADAMW)
        assert_close(m, e_m, 1e-5, f"m at step {t}")
        assert_close(v, e_v, 1e-5, f"v at step {t}")
        # The step is ~lr while params are ~1: judge the step to 1e-5 of the largest step, plus the
        # rounding of each parameter to float32.
        e_step = e_params - start
        assert_close(params - start, e_step, 1.0, f"params step at {t}",
                     scale=1e-5 * np.max(np.abs(e_step)) + EPS32 * np.abs(e_params))


def test_adamw_decay_mask_and_no_mask(isa, rng):
    """A mask of ones decays like no mask; a mask of zeros is plain Adam."""
    n = 65
    params, grads = randn(rng, n), randn(rng, n)
    runs = {}
    for name, mask in [("none", None), ("ones", np.ones(n, np.float32)), ("zeros", np.zeros(n, np.float32))]:
        p, m, v = params.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
        ops.adamw_update(p, m, v, grads, mask, grad_scale=1.0, t=1, **ADAMW)
        runs[name] = p
    np.testing.assert_array_equal(runs["none"], runs["ones"])
    plain = ref.adamw_update(params, np.zeros(n), np.zeros(n), grads, None, grad_scale=1.0, t=1,
                             **{**ADAMW, "weight_decay": 0.0})[0]
    assert_close(runs["zeros"] - params.astype(np.float64), plain - params, 1e-4, "undecayed step")


@pytest.mark.parametrize("n", [1, 7, 4095, 4096, 4097, 20000])
def test_sum_squares(isa, rng, n):
    x = randn(rng, n)
    got = ops.sum_squares(x)
    assert isinstance(got, float)
    assert got == pytest.approx(ref.sum_squares(x), rel=1e-12)
    assert ops.global_norm(x) == pytest.approx(math.sqrt(ref.sum_squares(x)), rel=1e-12)


# === finite differences: float64 central differences of the reference forward vs the kernel backward ===

def check_gradient(what: str, loss, x, kernel_grad) -> None:
    """loss: float64 scalar function of a float64 copy of x (the others held fixed)."""
    assert_close(kernel_grad, ref.numerical_grad(loss, x), FD_TOL, f"d{what} vs finite differences")


def weighted(f, G):
    """The scalar sum(G * f(...)): its gradient is what a backward kernel computes for dout = G."""
    G = ref.f64(G)
    return lambda *args: float(np.sum(G * f(*args)))


def test_fd_matmul(isa, rng):
    N, C, OC = 3, 5, 4
    inp, weight, bias, G = randn(rng, N, C), randn(rng, OC, C), randn(rng, OC), randn(rng, N, OC)
    dinp, dweight, dbias = zeros32((N, C)), zeros32((OC, C)), zeros32(OC)
    ops.matmul_backward(dinp, dweight, dbias, G, inp, weight)
    L = weighted(ref.matmul_forward, G)
    check_gradient("inp", lambda x: L(x, weight, bias), inp, dinp)
    check_gradient("weight", lambda w: L(inp, w, bias), weight, dweight)
    check_gradient("bias", lambda b: L(inp, weight, b), bias, dbias)


def test_fd_softmax(isa, rng):
    logits, G = randn(rng, 3, 7), randn(rng, 3, 7)
    probs = ops.softmax_forward(zeros32((3, 7)), logits)
    dlogits = zeros32((3, 7))
    ops.softmax_backward(dlogits, G, probs)
    check_gradient("logits", weighted(ref.softmax_forward, G), logits, dlogits)


def test_fd_crossentropy(isa, rng):
    N, V = 4, 7
    logits, targets = randn(rng, N, V), rng.integers(0, V, N).astype(np.int32)
    weights = np.array([0.25, 0.0, 1.5, -0.5], dtype=np.float32)  # DPO and RL weights can be negative
    losses, lse = zeros32(N), zeros32(N)
    ops.crossentropy_forward(losses, lse, logits, targets)
    dlogits = zeros32((N, V))
    ops.crossentropy_backward(dlogits, logits, lse, targets, weights)
    check_gradient("logits", weighted(lambda x: ref.crossentropy_forward(x, targets)[0], weights),
                   logits, dlogits)


def test_fd_layernorm(isa, rng):
    N, C = 3, 7
    inp, weight, bias, G = randn(rng, N, C), randn(rng, C), randn(rng, C), randn(rng, N, C)
    out, mean, rstd = zeros32((N, C)), zeros32(N), zeros32(N)
    ops.layernorm_forward(out, mean, rstd, inp, weight, bias)
    dinp, dweight, dbias = zeros32((N, C)), zeros32(C), zeros32(C)
    ops.layernorm_backward(dinp, dweight, dbias, G, inp, weight, mean, rstd)
    L = weighted(lambda x, w, b: ref.layernorm_forward(x, w, b)[0], G)
    check_gradient("inp", lambda x: L(x, weight, bias), inp, dinp)
    check_gradient("weight", lambda w: L(inp, w, bias), weight, dweight)
    check_gradient("bias", lambda b: L(inp, weight, b), bias, dbias)


def test_fd_gelu(isa, rng):
    inp = np.concatenate([randn(rng, 9, scale=2.0), np.float32([-6.0, -3.0, 0.0, 3.0, 6.0])])
    G = randn(rng, inp.size)
    dinp = zeros32(inp.size)
    ops.gelu_backward(dinp, inp, G)
    check_gradient("inp", weighted(ref.gelu_forward, G), inp, dinp)


def test_fd_residual(isa, rng):
    a, b, G = randn(rng, 7), randn(rng, 7), randn(rng, 7)
    da, db = zeros32(7), zeros32(7)
    ops.residual_backward(da, db, G)
    L = weighted(ref.residual_forward, G)
    check_gradient("a", lambda x: L(x, b), a, da)
    check_gradient("b", lambda x: L(a, x), b, db)


def test_fd_attention(isa, rng):
    B, T, C, NH = 2, 3, 4, 2
    qkv, G = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    _, stats = run_attention(qkv, NH)
    dqkv = zeros32((B, T, 3 * C))
    ops.attention_backward(dqkv, G, qkv, stats, NH)
    check_gradient("qkv", weighted(lambda x: ref.attention_forward(x, NH)[0], G), qkv, dqkv)


def test_fd_embedding(isa, rng):
    B, T, V, C, maxT = 2, 3, 4, 5, 4
    tokens = np.array([[1, 3, 1], [0, 1, 3]], dtype=np.int32)
    wte, wpe, G = randn(rng, V, C), randn(rng, maxT, C), randn(rng, B, T, C)
    dwte, dwpe = zeros32((V, C)), zeros32((maxT, C))
    ops.embedding_backward(dwte, dwpe, G, tokens)
    L = weighted(lambda e, p: ref.embedding_forward(tokens, e, p), G)
    check_gradient("wte", lambda e: L(e, wpe), wte, dwte)
    check_gradient("wpe", lambda p: L(wte, p), wpe, dwpe)


# === PyTorch parity (float64 autograd as an independent oracle), when torch is installed ============

def _torch():
    return pytest.importorskip("torch")


def tensor(x, grad: bool = False):
    torch = _torch()
    return torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=grad)


def test_torch_matmul(rng):
    torch = _torch()
    N, C, OC = 33, 65, 9
    inp, weight, bias, dout = randn(rng, N, C), randn(rng, OC, C), randn(rng, OC), randn(rng, N, OC)
    ti, tw, tb = tensor(inp, True), tensor(weight, True), tensor(bias, True)
    t_out = torch.nn.functional.linear(ti, tw, tb)
    (t_out * tensor(dout)).sum().backward()
    assert_close(ops.matmul_forward(zeros32((N, OC)), inp, weight, bias), t_out.detach(), matmul_tol(C), "out")
    dinp, dweight, dbias = zeros32((N, C)), zeros32((OC, C)), zeros32(OC)
    ops.matmul_backward(dinp, dweight, dbias, dout, inp, weight)
    assert_close(dinp, ti.grad, matmul_tol(OC), "dinp")
    assert_close(dweight, tw.grad, matmul_tol(N), "dweight")
    assert_close(dbias, tb.grad, matmul_tol(N), "dbias")


def test_torch_softmax(rng):
    torch = _torch()
    logits, dprobs = randn(rng, 9, 65, scale=3.0), randn(rng, 9, 65)
    tx = tensor(logits, True)
    t_probs = torch.softmax(tx, dim=-1)
    (t_probs * tensor(dprobs)).sum().backward()
    probs = ops.softmax_forward(zeros32((9, 65)), logits)
    assert_close(probs, t_probs.detach(), NORMALISE_TOL, "probs")
    dlogits = zeros32((9, 65))
    ops.softmax_backward(dlogits, dprobs, probs)
    assert_close(dlogits, tx.grad, NORMALISE_TOL, "dlogits")


def test_torch_crossentropy(rng):
    torch = _torch()
    N, V = 33, 65
    logits, targets = randn(rng, N, V, scale=3.0), rng.integers(0, V, N).astype(np.int32)
    weights = rng.uniform(-1.0, 1.0, N).astype(np.float32)
    tx = tensor(logits, True)
    t_losses = torch.nn.functional.cross_entropy(tx, torch.tensor(targets, dtype=torch.long), reduction="none")
    (t_losses * tensor(weights)).sum().backward()
    losses, lse = zeros32(N), zeros32(N)
    ops.crossentropy_forward(losses, lse, logits, targets)
    assert_close(losses, t_losses.detach(), NORMALISE_TOL, "losses", scale=float(np.max(np.abs(logits))))
    assert_close(lse, torch.logsumexp(tx.detach(), dim=-1), NORMALISE_TOL, "lse")
    dlogits = zeros32((N, V))
    ops.crossentropy_backward(dlogits, logits, lse, targets, weights)
    assert_close(dlogits, tx.grad, NORMALISE_TOL, "dlogits")


def test_torch_layernorm(rng):
    torch = _torch()
    N, C = 33, 65
    inp, weight, bias, dout = randn(rng, N, C), randn(rng, C), randn(rng, C), randn(rng, N, C)
    ti, tw, tb = tensor(inp, True), tensor(weight, True), tensor(bias, True)
    t_out = torch.nn.functional.layer_norm(ti, (C,), tw, tb, eps=1e-5)
    (t_out * tensor(dout)).sum().backward()
    out, mean, rstd = zeros32((N, C)), zeros32(N), zeros32(N)
    ops.layernorm_forward(out, mean, rstd, inp, weight, bias)
    assert_close(out, t_out.detach(), NORMALISE_TOL, "out")
    dinp, dweight, dbias = zeros32((N, C)), zeros32(C), zeros32(C)
    ops.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd)
    assert_close(dinp, ti.grad, LN_BACKWARD_TOL, "dinp")
    assert_close(dweight, tw.grad, LN_BACKWARD_TOL, "dweight")
    assert_close(dbias, tb.grad, LN_BACKWARD_TOL, "dbias")


def test_torch_gelu(rng):
    torch = _torch()
    inp = np.concatenate([randn(rng, 1000, scale=3.0), gelu_input(rng, 33, "large")])
    dout = randn(rng, inp.size)
    ti = tensor(inp, True)
    t_out = torch.nn.functional.gelu(ti, approximate="tanh")
    (t_out * tensor(dout)).sum().backward()
    assert_close(ops.gelu_forward(zeros32(inp.size), inp), t_out.detach(), 1e-5, "out", scale=gelu_scale(inp))
    dinp = zeros32(inp.size)
    ops.gelu_backward(dinp, inp, dout)
    assert_close(dinp, ti.grad, 1e-5, "dinp", scale=np.abs(dout) * gelu_scale(inp))


def test_torch_residual(rng):
    _torch()
    a, b, dout = randn(rng, 7, 9), randn(rng, 7, 9), randn(rng, 7, 9)
    ta, tb = tensor(a, True), tensor(b, True)
    ((ta + tb) * tensor(dout)).sum().backward()
    assert_close(ops.residual_forward(zeros32((7, 9)), a, b), (ta + tb).detach(), ELEMENTWISE_TOL, "out")
    da, db = zeros32((7, 9)), zeros32((7, 9))
    ops.residual_backward(da, db, dout)
    assert_close(da, ta.grad, ELEMENTWISE_TOL, "da")
    assert_close(db, tb.grad, ELEMENTWISE_TOL, "db")


def test_torch_attention(rng):
    torch = _torch()
    B, T, C, NH = 2, 33, 24, 3
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    tx = tensor(qkv, True)
    q, k, v = (t.reshape(B, T, NH, C // NH).transpose(1, 2) for t in tx.split(C, dim=-1))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    t_out = y.transpose(1, 2).reshape(B, T, C)
    (t_out * tensor(dout)).sum().backward()
    out, stats = run_attention(qkv, NH)
    assert_close(out, t_out.detach(), ATTENTION_TOL, "out")
    scores = (q @ k.transpose(-2, -1)).detach() / math.sqrt(C // NH)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    m = scores.max(dim=-1).values
    expected = torch.stack([m, 1.0 / torch.exp(scores - m[..., None]).sum(dim=-1)], dim=-1)
    assert_stats_close(stats, expected.numpy(), ATTENTION_TOL)
    dqkv = zeros32((B, T, 3 * C))
    ops.attention_backward(dqkv, dout, qkv, stats, NH)
    assert_close(dqkv, tx.grad, ATTENTION_TOL, "dqkv")


def test_torch_embedding(rng):
    torch = _torch()
    B, T, V, C, maxT = 3, 9, 7, 33, 12
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe, dout = randn(rng, V, C), randn(rng, maxT, C), randn(rng, B, T, C)
    te, tp = tensor(wte, True), tensor(wpe, True)
    t_out = torch.nn.functional.embedding(torch.tensor(tokens, dtype=torch.long), te) + tp[:T]
    (t_out * tensor(dout)).sum().backward()
    assert_close(ops.embedding_forward(zeros32((B, T, C)), tokens, wte, wpe), t_out.detach(),
                 ELEMENTWISE_TOL, "out")
    dwte, dwpe = zeros32((V, C)), zeros32((maxT, C))
    ops.embedding_backward(dwte, dwpe, dout, tokens)
    assert_close(dwte, te.grad, 1e-5, "dwte")
    assert_close(dwpe, tp.grad, 1e-5, "dwpe")


def test_torch_adamw(rng):
    """torch.optim.AdamW with two groups (decayed, not decayed) against the kernel with a decay mask;
    torch has no grad_scale, so it is handed the scaled gradients."""
    torch = _torch()
    n, steps, scale = 257, 6, 0.7
    params = randn(rng, n)
    mask = (rng.random(n) < 0.5).astype(np.float32)
    decayed, kept = tensor(params[mask == 1], True), tensor(params[mask == 0], True)
    opt = torch.optim.AdamW([{"params": [decayed], "weight_decay": ADAMW["weight_decay"]},
                             {"params": [kept], "weight_decay": 0.0}], lr=ADAMW["lr"],
                            betas=(ADAMW["beta1"], ADAMW["beta2"]), eps=ADAMW["eps"])
    p, m, v = params.copy(), zeros32(n), zeros32(n)
    for t in range(1, steps + 1):
        grads = randn(rng, n)
        decayed.grad, kept.grad = tensor(grads[mask == 1] * scale), tensor(grads[mask == 0] * scale)
        opt.step()
        ops.adamw_update(p, m, v, grads, mask, grad_scale=scale, t=t, **ADAMW)
    expected = np.empty(n)
    expected[mask == 1], expected[mask == 0] = decayed.detach().numpy(), kept.detach().numpy()
    moved = expected - params
    assert_close(p - params.astype(np.float64), moved, 1.0, "params moved",
                 scale=1e-4 * np.max(np.abs(moved)) + steps * EPS32 * np.abs(expected))


def test_torch_sum_squares(rng):
    torch = _torch()
    x = randn(rng, 10007)
    assert ops.sum_squares(x) == pytest.approx(float((tensor(x) ** 2).sum()), rel=1e-12)


# === determinism: bitwise-identical results for any thread count ====================================

def _det_matmul(rng, N, C, OC):
    inp, weight, bias, dout = randn(rng, N, C), randn(rng, OC, C), randn(rng, OC), randn(rng, N, OC)
    def run():
        out, dinp, dweight, dbias = zeros32((N, OC)), zeros32((N, C)), zeros32((OC, C)), zeros32(OC)
        ops.matmul_forward(out, inp, weight, bias)
        ops.matmul_backward(dinp, dweight, dbias, dout, inp, weight)
        return [out, dinp, dweight, dbias]
    return run


def _det_matmul_bf16(rng, N, C, OC):
    inp, weight, bias, dout = randn(rng, N, C), randn(rng, OC, C), randn(rng, OC), randn(rng, N, OC)
    def run():
        out, dinp, dweight, dbias = zeros32((N, OC)), zeros32((N, C)), zeros32((OC, C)), zeros32(OC)
        ops.matmul_forward(out, inp, weight, bias, precision="bf16")
        ops.matmul_backward(dinp, dweight, dbias, dout, inp, weight, precision="bf16")
        fresh = np.full((N, C), np.nan, np.float32)
        ops.matmul_backward(fresh, None, None, dout, inp, weight, precision="bf16", accumulate=False)
        return [out, dinp, dweight, dbias, fresh]
    return run


def _det_softmax(rng, N, V):
    logits, dprobs = randn(rng, N, V, scale=3.0), randn(rng, N, V)
    targets, weights = rng.integers(0, V, N).astype(np.int32), randn(rng, N)
    def run():
        probs, dlogits, losses, lse, dce = zeros32((N, V)), zeros32((N, V)), zeros32(N), zeros32(N), zeros32((N, V))
        ops.softmax_forward(probs, logits)
        ops.softmax_backward(dlogits, dprobs, probs)
        ops.crossentropy_forward(losses, lse, logits, targets)
        ops.crossentropy_backward(dce, logits, lse, targets, weights)
        return [probs, dlogits, losses, lse, dce]
    return run


def _det_layernorm(rng, N, C):
    inp, weight, bias, dout = randn(rng, N, C), randn(rng, C), randn(rng, C), randn(rng, N, C)
    def run():
        out, mean, rstd = zeros32((N, C)), zeros32(N), zeros32(N)
        ops.layernorm_forward(out, mean, rstd, inp, weight, bias)
        dinp, dweight, dbias = zeros32((N, C)), zeros32(C), zeros32(C)
        ops.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd)
        return [out, mean, rstd, dinp, dweight, dbias]
    return run


def _det_elementwise(rng, n):
    inp, a, dout = randn(rng, n, scale=3.0), randn(rng, n), randn(rng, n)
    def run():
        out, dinp, res, da, db = zeros32(n), zeros32(n), zeros32(n), zeros32(n), zeros32(n)
        ops.gelu_forward(out, inp)
        ops.gelu_backward(dinp, inp, dout)
        ops.residual_forward(res, inp, a)
        ops.residual_backward(da, db, dout)
        return [out, dinp, res, da, db]
    return run


def _det_attention(rng, B, T, C, NH):
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    def run():
        out, stats, dqkv = zeros32((B, T, C)), zeros32((B, NH, T, 2)), zeros32((B, T, 3 * C))
        ops.attention_forward(out, stats, qkv, NH)
        ops.attention_backward(dqkv, dout, qkv, stats, NH)
        fresh = np.full((B, T, 3 * C), np.nan, np.float32)
        ops.attention_backward(fresh, dout, qkv, stats, NH, accumulate=False)
        return [out, stats, dqkv, fresh]
    return run


def _det_attention_bf16(rng, B, T, C, NH):
    qkv, dout = randn(rng, B, T, 3 * C), randn(rng, B, T, C)
    def run():
        out, stats, dqkv = zeros32((B, T, C)), zeros32((B, NH, T, 2)), zeros32((B, T, 3 * C))
        ops.attention_forward(out, stats, qkv, NH, precision="bf16")
        ops.attention_backward(dqkv, dout, qkv, stats, NH, precision="bf16")
        return [out, stats, dqkv]
    return run


def _det_embedding(rng, B, T, V, C):
    tokens, wte, wpe = rng.integers(0, V, (B, T)).astype(np.int32), randn(rng, V, C), randn(rng, T, C)
    dout = randn(rng, B, T, C)
    def run():
        out, dwte, dwpe = zeros32((B, T, C)), zeros32((V, C)), zeros32((T, C))
        ops.embedding_forward(out, tokens, wte, wpe)
        ops.embedding_backward(dwte, dwpe, dout, tokens)
        return [out, dwte, dwpe]
    return run


def _det_adamw(rng, n):
    params, grads, mask = randn(rng, n), randn(rng, n), (rng.random(n) < 0.5).astype(np.float32)
    def run():
        p, m, v = params.copy(), zeros32(n), zeros32(n)
        for t in (1, 2):
            ops.adamw_update(p, m, v, grads, mask, grad_scale=0.9, t=t, **ADAMW)
        return [p, m, v, np.float64(ops.sum_squares(grads))]
    return run


DETERMINISM_CASES = {  # sizes a kernel splits across threads, including row reductions > kRowChunk
    "matmul-768x128x512": (_det_matmul, (768, 128, 512)),
    "matmul-64x1536x96": (_det_matmul, (64, 1536, 96)),  # few rows, long K: tempting to split K
    "matmul-300x65x33": (_det_matmul, (300, 65, 33)),
    "matmul-bf16-768x128x512": (_det_matmul_bf16, (768, 128, 512)),
    "matmul-bf16-64x1536x96": (_det_matmul_bf16, (64, 1536, 96)),
    "matmul-bf16-300x65x33": (_det_matmul_bf16, (300, 65, 33)),
    "softmax-ce-64x2000": (_det_softmax, (64, 2000)),
    "softmax-ce-2x50257": (_det_softmax, (2, 50257)),  # fewer rows than threads: any split is in-row
    "layernorm-300x384": (_det_layernorm, (300, 384)),
    "gelu-residual-100003": (_det_elementwise, (100003,)),
    "attention-2x128x64x4": (_det_attention, (2, 128, 64, 4)),
    "attention-1x256x384x6": (_det_attention, (1, 256, 384, 6)),
    "attention-bf16-2x128x64x4": (_det_attention_bf16, (2, 128, 64, 4)),
    "attention-bf16-1x256x384x6": (_det_attention_bf16, (1, 256, 384, 6)),
    "embedding-4x128x100x64": (_det_embedding, (4, 128, 100, 64)),
    "adamw-sumsq-300007": (_det_adamw, (300007,)),
}


def check_thread_counts(rng, case):
    make, dims = DETERMINISM_CASES[case]
    run = make(rng, *dims)
    results = {}
    for threads in (1, 2, 3):
        with ops.num_threads(threads):
            results[threads] = run()
    for threads in (2, 3):
        for i, (a, b) in enumerate(zip(results[1], results[threads])):
            # Compare bit patterns, so -0.0 against 0.0 and NaN payloads count as differences.
            a, b = np.asarray(a), np.asarray(b)
            assert a.tobytes() == b.tobytes(), (
                f"{case}: output {i} differs between 1 and {threads} threads "
                f"({int(np.sum(a != b))} entries, max |diff| {float(np.max(np.abs(a.astype(np.float64) - b))):.3g})")


@pytest.mark.parametrize("case", [c for c in DETERMINISM_CASES if "bf16" not in c])
def test_bitwise_identical_across_thread_counts(isa, rng, case):
    check_thread_counts(rng, case)


@pytest.mark.parametrize("case", [c for c in DETERMINISM_CASES if "bf16" in c])
def test_bf16_bitwise_identical_across_thread_counts(bf16_variant, rng, case):
    check_thread_counts(rng, case)