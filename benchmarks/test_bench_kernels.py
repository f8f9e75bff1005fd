"""Benchmarks of softmax, cross-entropy, layernorm and GELU (forward and backward) against numpy.

Each kernel, shape and pass is one pytest-benchmark group holding two entries, `numpy` (a reasonable
vectorised float32 numpy implementation: max-subtracted exp, logsumexp with take_along_axis, mean/var
layernorm, np.tanh GELU) and `lmlab` (2 OpenMP threads unless LMLAB_BENCH_THREADS says otherwise), timed in the same run; compare their times
within a group. Shapes are those of GPT training here: rows B*T = 12*64 and 16*256, widths 384/1536,
the 65-character vocabulary, a (4096, 2048) row-softmax and GPT-2's 50304-token vocabulary.
Backward passes accumulate into their gradient buffers, as lmlab's kernels do. Every benchmark checks
its result against float64 numpy afterwards, so `pytest benchmarks --benchmark-disable` is a test.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

from lmlab import ops
from lmlab import reference as f64ref   # the float64 oracle for both implementations
from lmlab.reference import GELU_CUBIC, GELU_SCALE, LAYERNORM_EPS as EPS

# lmlab's thread count (the machine's two cores); LMLAB_BENCH_THREADS=1 gives the single-core view.
THREADS = int(os.environ.get("LMLAB_BENCH_THREADS", "2"))

ROW_SHAPES = [(12 * 64, 65), (16 * 256, 65), (4096, 2048), (512, 50304)]
WIDTH_SHAPES = [(16 * 256, 384), (16 * 256, 1536)]
PASSES = ["forward", "backward"]


# --- one problem per kernel: inputs, the two implementations, the reference --------------------------
# Each `impl(pass_)` returns (call, outputs): a zero-argument call that writes (forward) or accumulates
# (backward) into `outputs`, freshly allocated and zeroed, so one call leaves exactly one result.

def one_output(like, pass_, forward, backward):
    """(call, [out]) for a kernel with a single output shaped like `like`: forward(out) writes it,
    backward(out) accumulates into it."""
    out = np.zeros_like(like)
    step = forward if pass_ == "forward" else backward
    return (lambda: step(out)), [out]


def np_softmax(out, x):
    np.subtract(x, x.max(-1, keepdims=True), out=out)
    np.exp(out, out=out)
    np.divide(out, out.sum(-1, keepdims=True), out=out)


def np_gelu(out, x):
    c, k = np.float32(GELU_SCALE), np.float32(GELU_CUBIC)
    np.multiply(0.5 * x, 1.0 + np.tanh(c * (x + k * x * x * x)), out=out)


def np_gelu_backward(dinp, x, dy):
    c, k = np.float32(GELU_SCALE), np.float32(GELU_CUBIC)
    th = np.tanh(c * (x + k * x * x * x))
    grad = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * c * (1.0 + 3.0 * k * x * x)
    np.add(dinp, grad * dy, out=dinp)


class Softmax:
    def __init__(self, shape, rng):
        self.x = (rng.standard_normal(shape) * 3).astype(np.float32)
        self.dp = rng.standard_normal(shape).astype(np.float32)
        self.p = f64ref.softmax_forward(self.x).astype(np.float32)

    def numpy(self, pass_):
        x, dp, p = self.x, self.dp, self.p
        return one_output(x, pass_, lambda out: np_softmax(out, x),
                          lambda out: np.add(out, p * (dp - (dp * p).sum(-1, keepdims=True)), out=out))

    def lmlab(self, pass_):
        return one_output(self.x, pass_, lambda out: ops.softmax_forward(out, self.x),
                          lambda out: ops.softmax_backward(out, self.dp, self.p))

    def reference(self, pass_):
        if pass_ == "forward":
            return [f64ref.softmax_forward(self.x)]
        return [f64ref.softmax_backward(self.dp, self.p)]


class CrossEntropy:
    def __init__(self, shape, rng):
        n, v = shape
        self.x = (rng.standard_normal(shape) * 3).astype(np.float32)
        self.t = rng.integers(0, v, n).astype(np.int32)
        self.w = np.full(n, 1.0 / n, np.float32)
        self.w[: n // 4] = 0.0  # masked rows, as instruct tuning has
        self.lse = f64ref.logsumexp(self.x).astype(np.float32)
        self.rows = np.arange(n)

    def numpy(self, pass_):
        x, t, w, lse, rows = self.x, self.t, self.w, self.lse, self.rows
        if pass_ == "forward":
            losses = np.zeros(len(x), np.float32)
            logsum = np.zeros(len(x), np.float32)

            def call():
                m = x.max(-1, keepdims=True)
                logsum[:] = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
                losses[:] = logsum - np.take_along_axis(x, t[:, None], -1)[:, 0]
            return call, [losses, logsum]
        dx = np.zeros_like(x)

        def call():
            np.add(dx, w[:, None] * np.exp(x - lse[:, None]), out=dx)
            dx[rows, t] -= w
        return call, [dx]

    def lmlab(self, pass_):
        if pass_ == "forward":
            losses = np.zeros(len(self.x), np.float32)
            logsum = np.zeros(len(self.x), np.float32)
            return (lambda: ops.crossentropy_forward(losses, logsum, self.x, self.t)), [losses, logsum]
        dx = np.zeros_like(self.x)
        return (lambda: ops.crossentropy_backward(dx, self.x, self.lse, self.t, self.w)), [dx]

    def reference(self, pass_):
        if pass_ == "forward":
            return list(f64ref.crossentropy_forward(self.x, self.t))
        return [f64ref.crossentropy_backward(self.x, self.t, self.w)]


class LayerNorm:
    def __init__(self, shape, rng):
        c = shape[1]
        self.x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
        self.weight = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
        self.bias = (0.1 * rng.standard_normal(c)).astype(np.float32)
        self.dy = rng.standard_normal(shape).astype(np.float32)
        _, mean, rstd = f64ref.layernorm_forward(self.x, self.weight, self.bias)
        self.mean, self.rstd = mean.astype(np.float32), rstd.astype(np.float32)

    def numpy(self, pass_):
        x, w, b, dy = self.x, self.weight, self.bias, self.dy
        n, c = x.shape
        if pass_ == "forward":
            out = np.zeros_like(x)
            mean = np.zeros(n, np.float32)
            rstd = np.zeros(n, np.float32)

            def call():
                mean[:] = x.mean(-1)
                rstd[:] = 1.0 / np.sqrt(x.var(-1) + np.float32(EPS))
                np.multiply((x - mean[:, None]) * rstd[:, None], w, out=out)
                np.add(out, b, out=out)
            return call, [out, mean, rstd]
        dx, dw, db = np.zeros_like(x), np.zeros(c, np.float32), np.zeros(c, np.float32)
        mean, rstd = self.mean[:, None], self.rstd[:, None]

        def call():
            norm = (x - mean) * rstd
            dnorm = dy * w
            np.add(dx, (dnorm - dnorm.mean(-1, keepdims=True)
                         - norm * (dnorm * norm).mean(-1, keepdims=True)) * rstd, out=dx)
            np.add(dw, (dy * norm).sum(0), out=dw)
            np.add(db, dy.sum(0), out=db)
        return call, [dx, dw, db]

    def lmlab(self, pass_):
        n, c = self.x.shape
        if pass_ == "forward":
            out, mean, rstd = np.zeros_like(self.x), np.zeros(n, np.float32), np.zeros(n, np.float32)
            return (lambda: ops.layernorm_forward(out, mean, rstd, self.x, self.weight, self.bias)), \
                [out, mean, rstd]
        dx, dw, db = np.zeros_like(self.x), np.zeros(c, np.float32), np.zeros(c, np.float32)
        return (lambda: ops.layernorm_backward(dx, dw, db, self.dy, self.x, self.weight, self.mean,
                                               self.rstd)), [dx, dw, db]

    def reference(self, pass_):
        if pass_ == "forward":
            return list(f64ref.layernorm_forward(self.x, self.weight, self.bias))
        return list(f64ref.layernorm_backward(self.dy, self.x, self.weight))


class Gelu:
    def __init__(self, shape, rng):
        self.x = (rng.standard_normal(shape) * 2).astype(np.float32)
        self.dy = rng.standard_normal(shape).astype(np.float32)

    def numpy(self, pass_):
        return one_output(self.x, pass_, lambda out: np_gelu(out, self.x),
                          lambda out: np_gelu_backward(out, self.x, self.dy))

    def lmlab(self, pass_):
        return one_output(self.x, pass_, lambda out: ops.gelu_forward(out, self.x),
                          lambda out: ops.gelu_backward(out, self.x, self.dy))

    def reference(self, pass_):
        if pass_ == "forward":
            return [f64ref.gelu_forward(self.x)]
        return [f64ref.gelu_backward(self.x, self.dy)]


KERNELS = {"softmax": (Softmax, ROW_SHAPES), "crossentropy": (CrossEntropy, ROW_SHAPES),
           "layernorm": (LayerNorm, WIDTH_SHAPES), "gelu": (Gelu, WIDTH_SHAPES)}
CASES = [(name, shape) for name, (_, shapes) in KERNELS.items() for shape in shapes]


def _check(got, want):
    # fp32 results against float64: a few ulp per element, sums over up to 50304 terms; the absolute
    # part is relative to the output's scale, so a wrong element anywhere fails.
    for g, w in zip(got, want):
        err = np.abs(g - w)
        bound = 1e-4 * np.abs(w) + 2e-5 * max(float(np.abs(w).max()), 1e-30)
        worst = int(np.argmax(err - bound))
        assert err.flat[worst] <= bound.flat[worst], \
            f"element {np.unravel_index(worst, w.shape)}: got {g.flat[worst]}, want {w.flat[worst]}"


@functools.lru_cache(maxsize=1)
def _problem(name, shape):
    return KERNELS[name][0](shape, np.random.default_rng(shape[0] * 31 + shape[1]))


@functools.lru_cache(maxsize=1)
def _reference(name, shape, pass_):
    return _problem(name, shape).reference(pass_)


# Ordered so that consecutive tests share a problem and its reference (built once, cached above).
PARAMS = [(name, shape, pass_, impl) for name, shape in CASES for pass_ in PASSES
          for impl in ["numpy", "lmlab"]]


@pytest.mark.parametrize("name, shape, pass_, impl", PARAMS,
                         ids=[f"{n}-{s[0]}x{s[1]}-{p}-{i}" for n, s, p, i in PARAMS])
def test_kernel(benchmark, name, shape, pass_, impl):
    benchmark.group = f"{name} {pass_} {shape[0]}x{shape[1]}"
    problem = _problem(name, shape)
    # Large problems get fewer rounds so the suite stays short on a shared machine.
    rounds = int(min(200, max(5, 2e7 / (shape[0] * shape[1]))))
    with ops.num_threads(THREADS):
        call, _ = getattr(problem, impl)(pass_)
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)
        call, outputs = getattr(problem, impl)(pass_)
        call()
    _check(outputs, _reference(name, shape, pass_))
