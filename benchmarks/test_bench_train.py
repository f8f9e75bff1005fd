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
