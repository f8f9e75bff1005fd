"""Benchmarks of the linear layer's three matrix products against numpy (OpenBLAS), same run.

Shapes are (M, K, N) = (rows B*T, input channels, output channels); the passes are
  forward          out (M, N) = inp (M, K) . weight (N, K)^T
  backward-input   dinp (M, K) += dout (M, N) . weight (N, K)
  backward-weight  dweight (N, K) += dout (M, N)^T . inp (M, K)
each 2*M*N*K floating-point operations. lmlab and numpy share a benchmark group per shape and pass;
the summary at the end prints GFLOP/s. Both run on THREADS threads (numpy's BLAS pool is limited
through threadpoolctl where it is installed). Time numpy with
`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` so OpenBLAS picks its own kernels. Every benchmark
checks its result against float64 numpy afterwards, so `--benchmark-disable` makes this a test suite.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from lmlab import ops

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # numpy's BLAS then keeps its own thread count
    threadpool_limits = None

THREADS = 2

SHAPES = [(768, 128, 512), (768, 512, 128), (4096, 384, 1536), (4096, 1536, 384), (4096, 384, 384)]
PASSES = ["forward", "backward-input", "backward-weight"]


def _operands(M: int, K: int, N: int):
    rng = np.random.default_rng(M * 7 + K * 5 + N)
    inp = rng.standard_normal((M, K), dtype=np.float32)
    weight = rng.standard_normal((N, K), dtype=np.float32) * np.float32(0.05)
    dout = rng.standard_normal((M, N), dtype=np.float32)
    return inp, weight, dout


def _reference(pass_: str, inp, weight, dout) -> np.ndarray:
    """The pass in float64 (callers pass float64 operands, or their absolute values for a scale)."""
    return {"forward": lambda: inp @ weight.T, "backward-input": lambda: dout @ weight,
            "backward-weight": lambda: dout.T @ inp}[pass_]()


def _lmlab_call(pass_: str, inp, weight, dout, precision: str = "fp32"):
    """A zero-argument call of the lmlab pass and the array it writes (zeroed for accumulation)."""
    M, K = inp.shape
    N = weight.shape[0]
    if pass_ == "forward":
        out = np.empty((M, N), np.float32)
        return (lambda: ops.matmul_forward(out, inp, weight, precision=precision)), out
    if pass_ == "backward-input":
        dinp = np.zeros((M, K), np.float32)
        return (lambda: ops.matmul_backward(dinp, None, None, dout, inp, weight,
                                            precision=precision)), dinp
    dweight = np.zeros((N, K), np.float32)
    return (lambda: ops.matmul_backward(None, dweight, None, dout, inp, weight,
                                        precision=precision)), dweight


def _numpy_call(pass_: str, inp, weight, dout):
    M, K = inp.shape
    N = weight.shape[0]
    if pass_ == "forward":
        out = np.empty((M, N), np.float32)
        return (lambda: np.matmul(inp, weight.T, out=out)), out
    if pass_ == "backward-input":
        dinp = np.empty((M, K), np.float32)
        return (lambda: np.matmul(dout, weight, out=dinp)), dinp
    dweight = np.empty((N, K), np.float32)
    return (lambda: np.matmul(dout.T, inp, out=dweight)), dweight


def _tolerance(K_reduced: int) -> float:
    # fp32 accumulation error grows like sqrt(depth) * 2^-24 times the size of the summands; the
    # comparison is relative to the largest |a|.|b| product sum, so a generous bound stays tight enough
    # to catch any wrong element.
    return 1e-5 * max(1.0, np.sqrt(K_reduced / 64))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", ["numpy", "lmlab", "lmlab-bf16"])
def test_matmul(benchmark, record_flop, shape, pass_, impl):
    """lmlab-bf16: precision="bf16" (bfloat16 operands, fp32 accumulation) beside the fp32 rows;
    its result is checked against float64 products of the operands rounded to bfloat16."""
    M, K, N = shape
    group = f"matmul {pass_} {M}x{K}x{N}"
    benchmark.group = group
    record_flop(group, impl, 2.0 * M * N * K)
    inp, weight, dout = _operands(M, K, N)
    if impl == "numpy":
        call, result = _numpy_call(pass_, inp, weight, dout)
    else:
        precision = "bf16" if impl == "lmlab-bf16" else "fp32"
        call, result = _lmlab_call(pass_, inp, weight, dout, precision)
    with ops.num_threads(THREADS), (threadpool_limits(THREADS) if threadpool_limits is not None
                                    else contextlib.nullcontext()):
        benchmark(call)

    # The backward passes accumulate: check one call on a zeroed buffer.
    result[...] = 0.0
    call()
    operands = (inp, weight, dout)
    if impl == "lmlab-bf16":
        operands = tuple(ops.round_bf16(x) for x in operands)
    exact = [x.astype(np.float64) for x in operands]
    expected = _reference(pass_, *exact)
    scale = _reference(pass_, *(np.abs(x) for x in exact)).max()
    depth = {"forward": K, "backward-input": N, "backward-weight": M}[pass_]
    err = np.abs(result - expected).max() / scale
    assert err < _tolerance(depth), f"relative error {err:.3g}"
