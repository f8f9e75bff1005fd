"""One GPT training step (forward + backward + AdamW), lmlab and PyTorch eager in one benchmark group.

The tiny config keeps the suite quick; `lmlab bench train` (lmlab.trainbench) measures the real
configs in separate processes with peak memory. Each benchmark then checks that a few more steps on
one fixed batch drive the loss down, so the timed code is also shown to learn.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmlab import trainbench

CFG = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, batch_size=8, vocab_size=65)
NO_TORCH = pytest.mark.skipif(not trainbench.torch_available(), reason="torch is not installed")
# (implementation, matmul precision); PyTorch's bf16 is CPU autocast.
IMPLS = [("lmlab", "fp32"), ("lmlab", "bf16"), pytest.param(("pytorch", "fp32"), marks=NO_TORCH),
         pytest.param(("pytorch", "bf16"), marks=NO_TORCH)]


@pytest.mark.parametrize("impl", IMPLS, ids=lambda p: "-".join(p))
def test_train_step(benchmark, impl):
    name, precision = impl
    benchmark.group = "train step: 2 layers, 64 wide, T=32, B=8"
    make = trainbench.lmlab_step_fn if name == "lmlab" else trainbench.pytorch_step_fn
    step = make(CFG, lr=3e-3, precision=precision)
    x, y = trainbench._batches(CFG, 1)[0]
    first = step(x, y)
    benchmark(step, x, y)
    for _ in range(10):
        last = step(x, y)
    assert last < first - 0.5, (first, last)


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "no-cache"])
def test_generate(benchmark, use_cache):
    from lmlab.model import GPT, GPTConfig
    from lmlab.sample import generate

    benchmark.group = "generate 32 tokens: 2 layers, 64 wide, block 64"
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64), seed=0)
    prompt = [1, 2, 3, 4]
    out = benchmark(generate, model, prompt, 32, temperature=0, use_cache=use_cache)
    np.testing.assert_array_equal(out, generate(model, prompt, 32, temperature=0,
                                                use_cache=not use_cache))


def test_model_flops_per_token_counts_every_weight_matrix():
    """6N + 12 L C T, N from the weight shapes of one block (qkv 3C x C, projection C x C, MLP
    4C x C and C x 4C) and the tied LM head (V x C)."""
    cfg = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65)
    C = 384
    block = 3 * C * C + C * C + 4 * C * C + C * 4 * C
    n = 6 * block + 65 * C
    assert trainbench.model_flops_per_token(cfg) == 6 * n + 12 * 6 * C * 256
    assert trainbench.model_flops_per_token(dict(cfg, n_layer=12)) > trainbench.model_flops_per_token(cfg)


TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2, steps=1, warmup=0,
            rounds=1, threads=1)


def test_bench_train_reports_mfu_against_the_run_s_fastest_matmul():
    rows = trainbench.bench_train(impls=("lmlab",), precisions=("fp32", "bf16"), **TINY)
    for r in rows:
        assert r["flops_per_token"] == trainbench.model_flops_per_token(r["config"])
        peak = r["peak"]
        assert peak["impl"] == "lmlab" and peak["gflops"] > 0
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / (peak["gflops"] * 1e9))


@pytest.mark.skipif("avx2" not in __import__("lmlab").cpu_info()["available"], reason="no AVX2 here")
def test_bench_train_isa_avx2_restricts_both_libraries():
    impls = ("lmlab", "pytorch") if trainbench.torch_available() else ("lmlab",)
    rows = trainbench.bench_train(impls=impls, precisions=("fp32",), isa="avx2", mfu=False, **TINY)
    isas = {r["impl"]: r["isa"] for r in rows}
    assert isas["lmlab"] == "avx2"
    if "pytorch" in isas:
        assert isas["pytorch"] == "AVX2"
    with pytest.raises(ValueError, match="isa must be one of"):
        trainbench.bench_train(isa="sse2", **TINY)
