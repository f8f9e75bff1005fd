"""Benchmarks of causal self-attention, forward and forward + backward, against PyTorch's
scaled_dot_product_attention(is_causal=True) in the same pytest-benchmark group (same run).

Shapes are GPT training shapes (B, T, C, NH): the 6-layer / 384-wide model at block 256, batch 16
(the issue's target: lmlab at least 1.5x PyTorch forward + backward on 2 threads), and nanoGPT's small
CPU recipe (4 heads of 32, block 64, batch 12). Both libraries run on 2 threads. The flop count is
that of the six causal products (2 forward, 4 backward), each 2 * HS * B * NH * T(T+1)/2; the
summary prints GFLOP/s. After timing every benchmark checks its result against float64 numpy, so
`--benchmark-disable` makes this a test suite.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmlab import ops, reference

try:
    import torch
except ImportError:  # PyTorch is an optional baseline
    torch = None

SHAPES = [(16, 256, 384, 6), (12, 64, 128, 4)]
PASSES = ["forward", "forward+backward"]
THREADS = 2


def _data(B: int, T: int, C: int):
    rng = np.random.default_rng(B * 1000 + T + C)
    qkv = rng.standard_normal((B, T, 3 * C), dtype=np.float32)
    dout = rng.standard_normal((B, T, C), dtype=np.float32)
    return qkv, dout


def _reference(qkv: np.ndarray, dout: np.ndarray, NH: int):
    """float64 (out, dqkv) from lmlab.reference: masked softmax(q k^T / sqrt(HS)) v and its gradient."""
    return reference.attention_forward(qkv, NH)[0], reference.attention_backward(dout, qkv, NH)


def _flop(B: int, T: int, C: int, pass_: str) -> float:
    products = 2 if pass_ == "forward" else 6
    return products * float(C) * B * T * (T + 1)


def _check(out, dqkv, qkv, dout, NH: int) -> None:
    """Relative to the largest magnitude: float32 rounding over reductions of length T and HS."""
    e_out, e_dqkv = _reference(qkv, dout, NH)
    assert np.max(np.abs(out - e_out)) <= 1e-4 * np.max(np.abs(e_out))
    if dqkv is not None:
        assert np.max(np.abs(dqkv - e_dqkv)) <= 1e-4 * np.max(np.abs(e_dqkv))


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("B,T,C,NH", SHAPES)
def test_lmlab(benchmark, record_flop, B, T, C, NH, pass_):
    qkv, dout = _data(B, T, C)
    out, stats = np.empty((B, T, C), np.float32), np.empty((B, NH, T, 2), np.float32)
    dqkv = np.zeros_like(qkv)

    def run():
        ops.attention_forward(out, stats, qkv, NH)
        if pass_ != "forward":
            ops.attention_backward(dqkv, dout, qkv, stats, NH)

    benchmark.group = f"attention {pass_} B={B} T={T} C={C} NH={NH}"
    record_flop(benchmark.group, "lmlab", _flop(B, T, C, pass_))
    with ops.num_threads(THREADS):
        benchmark(run)
        dqkv[...] = 0.0  # backward accumulates: one clean call for the check
        run()
    _check(out, None if pass_ == "forward" else dqkv, qkv, dout, NH)


@pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("B,T,C,NH", SHAPES)
def test_torch(benchmark, record_flop, B, T, C, NH, pass_):
    qkv, dout = _data(B, T, C)
    x, g = torch.from_numpy(qkv), torch.from_numpy(dout)
    result = {}

    def run():
        xg = x.detach().requires_grad_(pass_ != "forward")
        q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in xg.split(C, dim=2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)
        if pass_ != "forward":
            y.backward(g)
        result["out"], result["dqkv"] = y.detach(), xg.grad

    benchmark.group = f"attention {pass_} B={B} T={T} C={C} NH={NH}"
    record_flop(benchmark.group, "torch", _flop(B, T, C, pass_))
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        benchmark(run)
    finally:
        torch.set_num_threads(previous)
    dqkv = None if result["dqkv"] is None else result["dqkv"].numpy()
    _check(result["out"].numpy(), dqkv, qkv, dout, NH)
