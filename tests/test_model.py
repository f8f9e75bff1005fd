"""The GPT model against independent references: the float64 numpy GPT of lmlab.reference (forward
and a hand-derived backward, no kernel involved), and PyTorch float64 autograd when torch is installed.

Tolerance: lmlab computes in float32, the references in float64. Every tensor is compared with
|lmlab - ref| <= RTOL * |ref| + ATOL_REL * max|ref| (per tensor), RTOL = ATOL_REL = 1e-4 for losses
and logits and 1e-3 for gradients (a few float32 roundings through two layers, tanh-approximated
GELU in the kernels).

bf16 matmul precision: the same reference with exactly the matmul operands rounded to bfloat16
(reference.round_bf16, written from the format's definition). Against it lmlab agrees to BF16_RTOL =
1e-5 (logits, losses) and BF16_GRAD_RTOL = 5e-4 (gradients): both round the same operands, so only
float32 accumulation differs, plus the rare operand that lies within float32 noise of a bfloat16
rounding boundary and rounds the other way. Against the fp32 model (8 significant bits, 2^-9
relative per rounded operand) bf16 logits stay within 2e-2 of max|logits| and each gradient tensor
within 1e-1 normwise (||g_bf16 - g_fp32|| / ||g_fp32||; at most 0.052 measured on eight seeds of the
tiny model, whose weights are scaled far beyond init on purpose).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import reference
from lmlab import ops
from lmlab.kvcache import KVCache
from lmlab.model import GPT, GPTConfig
from lmlab.reference import gpt_loss_and_grads, round_bf16

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=12)
B, T = 3, 7


def assert_close(got, ref, rel, what):
    """|got - ref| <= rel * |ref| + rel * max|ref| elementwise (the module docstring's bound)."""
    ref = np.asarray(ref, np.float64)
    reference.assert_close(got, ref, rel, what, scale=np.abs(ref) + (float(np.abs(ref).max()) or 1.0))


# --- fixtures ------------------------------------------------------------------------------------------

def tiny_model(seed=0):
    """A tiny GPT with weights far from init (larger, non-zero biases) so every path is exercised."""
    m = GPT(GPTConfig(**TINY), seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name, v in m.named_parameters().items():
        scale = 0.1 if name.endswith(".bias") else 0.3
        base = 1.0 if "ln" in name and name.endswith("weight") else 0.0
        v[...] = base + scale * rng.standard_normal(v.shape)
    return m


def fresh_grads(m, x, y, w):
    """Forward with targets, zeroed gradients, backward with weights w; returns a copy of grads."""
    m.forward(x, y)
    m.zero_grad()
    m.backward(w)
    return m.grads.copy()


def tiny_batch(seed=1, zero_some=False):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, TINY["vocab_size"], (B, T))
    y = rng.integers(0, TINY["vocab_size"], (B, T))
    w = rng.uniform(0.1, 1.0, (B, T)).astype(np.float32)
    if zero_some:
        w[0, :4] = 0.0
        w[2, 3] = 0.0
    return x, y, w


# --- against the float64 reference GPT --------------------------------------------------------------------

@pytest.mark.parametrize("zero_some", [False, True])
def test_forward_backward_match_numpy_float64(zero_some):
    m = tiny_model()
    x, y, w = tiny_batch(zero_some=zero_some)
    ref_loss, ref_losses, ref_logits, ref_grads = gpt_loss_and_grads(
        m.named_parameters(), m.config, x, y, w.astype(np.float64))
    logits, losses = m.forward(x, y)
    assert_close(logits, ref_logits, 1e-4, "logits")
    assert_close(losses, ref_losses, 1e-4, "losses")
    assert math.isclose(float((w.astype(np.float64) * losses).sum()), ref_loss, rel_tol=1e-4)
    m.zero_grad()
    m.backward(w)
    grads = m.named_grads()
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert np.abs(ref_grads[name]).max() > 0 or name == "wpe", name
        assert_close(g, ref_grads[name], 1e-3, name)
    # The last row of wpe is beyond T and gets no gradient.
    assert np.all(grads["wpe"][T:] == 0)


def test_zero_weights_drop_their_tokens():
    """Weights 0 on some positions give the gradient of the loss over the remaining positions only."""
    m = tiny_model()
    x, y, w = tiny_batch(zero_some=True)
    g_masked = fresh_grads(m, x, y, w)
    # Changing the targets where the weight is 0 must not change the gradient.
    y2 = y.copy()
    y2[w == 0] = (y2[w == 0] + 1) % TINY["vocab_size"]
    np.testing.assert_array_equal(fresh_grads(m, x, y2, w), g_masked)


def test_backward_accumulates():
    m = tiny_model()
    x, y, w = tiny_batch()
    once = fresh_grads(m, x, y, w)
    m.forward(x, y)
    m.backward(w)
    np.testing.assert_allclose(m.grads, 2 * once, rtol=1e-6, atol=1e-7)


def test_finite_difference_of_one_direction():
    """The gradient's projection on a random direction equals the float64-evaluated loss slope."""
    m = tiny_model(seed=3)
    x, y, w = tiny_batch(seed=4)
    fresh_grads(m, x, y, w)
    rng = np.random.default_rng(5)
    d = rng.standard_normal(m.params.size)
    d /= np.linalg.norm(d)
    P0 = {k: v.astype(np.float64) for k, v in m.named_parameters().items()}
    offsets, eps = {}, 1e-5
    start = 0
    for k, v in P0.items():
        offsets[k] = d[start:start + v.size].reshape(v.shape)
        start += v.size
    plus = gpt_loss_and_grads({k: P0[k] + eps * offsets[k] for k in P0}, m.config, x, y, w)[0]
    minus = gpt_loss_and_grads({k: P0[k] - eps * offsets[k] for k in P0}, m.config, x, y, w)[0]
    assert math.isclose(float(m.grads.astype(np.float64) @ d), (plus - minus) / (2 * eps),
                        rel_tol=1e-3, abs_tol=1e-5)


def test_reference_backward_matches_its_own_finite_differences():
    """The float64 reference's hand-derived backward against central differences of its forward,
    on a few entries of every parameter (float64 throughout: agreement to ~1e-7 relative)."""
    m = tiny_model(seed=6)
    x, y, w = tiny_batch(seed=7, zero_some=True)
    P0 = {k: v.astype(np.float64) for k, v in m.named_parameters().items()}
    w64 = w.astype(np.float64)
    grads = gpt_loss_and_grads(P0, m.config, x, y, w64)[3]
    rng = np.random.default_rng(8)
    for name, value in P0.items():
        for flat in rng.choice(value.size, size=min(3, value.size), replace=False):
            i = np.unravel_index(flat, value.shape)

            def loss_at(v):
                P = dict(P0)
                P[name] = value.copy()
                P[name][i] = v
                return gpt_loss_and_grads(P, m.config, x, y, w64)[0]
            h = 1e-5
            slope = (loss_at(value[i] + h) - loss_at(value[i] - h)) / (2 * h)
            assert math.isclose(grads[name][i], slope, rel_tol=1e-5, abs_tol=1e-8), (name, i)


# --- against PyTorch --------------------------------------------------------------------------------------

def test_matches_torch_float64():
    torch = pytest.importorskip("torch")
    from torch_helpers import from_lmlab, grads_by_name

    m = tiny_model(seed=7)
    x, y, w = tiny_batch(seed=8, zero_some=True)
    tm = from_lmlab(m, torch.float64)
    t_logits, t_losses = tm(torch.from_numpy(x), torch.from_numpy(y))
    (t_losses * torch.from_numpy(w).double()).sum().backward()
    logits, losses = m.forward(x, y)
    assert_close(logits, t_logits.detach().numpy(), 1e-4, "logits")
    assert_close(losses, t_losses.detach().numpy(), 1e-4, "losses")
    m.zero_grad()
    m.backward(w)
    t_grads = grads_by_name(tm)
    assert set(t_grads) == set(m.named_grads())
    for name, g in m.named_grads().items():
        assert_close(g, t_grads[name], 1e-3, name)


def test_torch_reference_round_trip_and_init():
    torch = pytest.importorskip("torch")
    from lmlab.torch_reference import TorchGPT
    from torch_helpers import copy_to_lmlab, from_lmlab

    m = tiny_model(seed=9)
    tm = from_lmlab(m)
    m2 = GPT(GPTConfig(**TINY), seed=1)
    copy_to_lmlab(tm, m2)
    np.testing.assert_array_equal(m2.params, m.params)
    # Same initialisation scheme: per-name standard deviations agree.
    cfg = GPTConfig(vocab_size=50, block_size=64, n_layer=3, n_head=2, n_embd=64)
    torch.manual_seed(0)
    t_named = dict(TorchGPT(cfg).named_parameters())
    for name, v in GPT(cfg, seed=0).named_parameters().items():
        tv = t_named[name].detach().numpy()
        assert tv.shape == v.shape, name
        assert math.isclose(float(v.std()), float(tv.std()), rel_tol=0.15, abs_tol=1e-6), name
        assert math.isclose(float(v.mean()), float(tv.mean()), abs_tol=0.01), name


# --- layout, init, decay mask, freezing -------------------------------------------------------------------

def test_named_views_alias_flat_buffers():
    m = tiny_model()
    named, grads = m.named_parameters(), m.named_grads()
    C, V, L = TINY["n_embd"], TINY["vocab_size"], TINY["n_layer"]
    expected = {"wte": (V, C), "wpe": (TINY["block_size"], C), "ln_f.weight": (C,),
                "h.1.attn.c_attn.weight": (3 * C, C), "h.0.mlp.c_proj.weight": (C, 4 * C),
                "h.0.mlp.c_fc.bias": (4 * C,)}
    for name, shape in expected.items():
        assert named[name].shape == shape and grads[name].shape == shape
    assert len(named) == 2 + 12 * L + 2
    assert sum(v.size for v in named.values()) == m.num_params() == m.params.size
    for name in named:
        assert np.shares_memory(named[name], m.params)
        assert np.shares_memory(grads[name], m.grads)
        named[name].flat[0] = 123.0
        grads[name].flat[-1] = -7.0
    assert np.count_nonzero(m.params == 123.0) == len(named)
    assert np.count_nonzero(m.grads == -7.0) == len(named)
    m.zero_grad()
    assert not m.grads.any()


def test_gpt2_init():
    cfg = GPTConfig(vocab_size=100, block_size=32, n_layer=4, n_head=4, n_embd=64)
    m = GPT(cfg, seed=0)
    named = m.named_parameters()
    assert math.isclose(float(named["wte"].std()), 0.02, rel_tol=0.05)
    assert math.isclose(float(named["h.0.attn.c_attn.weight"].std()), 0.02, rel_tol=0.05)
    proj = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert math.isclose(float(named["h.3.mlp.c_proj.weight"].std()), proj, rel_tol=0.05)
    assert math.isclose(float(named["h.2.attn.c_proj.weight"].std()), proj, rel_tol=0.05)
    assert np.all(named["h.1.ln_2.weight"] == 1) and np.all(named["ln_f.bias"] == 0)
    assert np.all(named["h.1.attn.c_attn.bias"] == 0)
    np.testing.assert_array_equal(GPT(cfg, seed=0).params, m.params)
    assert not np.array_equal(GPT(cfg, seed=1).params, m.params)


def test_decay_mask():
    m = tiny_model()
    mask = m.decay_mask
    assert mask.shape == m.params.shape and mask.dtype == np.float32
    start = 0
    for name, v in m.named_parameters().items():
        part = mask[start:start + v.size]
        start += v.size
        assert np.all(part == (1.0 if v.ndim >= 2 else 0.0)), name


def test_frozen_prefixes_skip_their_gradients():
    m = tiny_model()
    x, y, w = tiny_batch()
    fresh_grads(m, x, y, w)
    full = {k: v.copy() for k, v in m.named_grads().items()}
    m.freeze({"wte", "wpe", "h.0."})
    fresh_grads(m, x, y, w)
    for name, g in m.named_grads().items():
        if name in ("wte", "wpe") or name.startswith("h.0."):
            assert not g.any(), name
        else:
            np.testing.assert_allclose(g, full[name], rtol=1e-6, atol=1e-7, err_msg=name)
    m.freeze({"h.1.attn"})          # freezing a middle part still backpropagates through it
    fresh_grads(m, x, y, w)
    for name, g in m.named_grads().items():
        if name.startswith("h.1.attn"):
            assert not g.any(), name
        else:
            np.testing.assert_allclose(g, full[name], rtol=1e-6, atol=1e-7, err_msg=name)
    with pytest.raises(ValueError, match="matches no parameter"):
        m.freeze({"h.0.ln"})        # prefixes are whole dotted components: ln_1 is not "ln"
    with pytest.raises(ValueError, match="matches no parameter"):
        m.freeze({"h.9"})
    # One string is not a collection of prefixes: "h.1" would be "h", ".", "1" ("h" alone froze
    # every layer silently; "wte" failed naming the prefix 'e').
    for one in ("h.1", "wte", "h"):
        with pytest.raises(TypeError, match=rf"e.g. \['{one}'\], not one string"):
            m.freeze(one)
    assert m.frozen == {"h.1.attn"}     # a refused freeze leaves the previous one


def test_parameter_offsets_and_trainable_ranges_follow_the_layout():
    m = tiny_model()
    offsets = m.parameter_offsets()
    base = m.params.ctypes.data
    for name, view in m.named_parameters().items():     # offsets agree with the views' addresses
        start, stop = offsets[name]
        assert ((view.ctypes.data - base) // 4, view.size) == (start, stop - start), name
    assert m.trainable_ranges() == [(0, m.params.size)]
    m.freeze({"wpe", "h.1"})
    ranges = m.trainable_ranges()
    covered = np.zeros(m.params.size, bool)
    for start, stop in ranges:
        covered[start:stop] = True
    for name, (start, stop) in offsets.items():
        frozen = name == "wpe" or name.startswith("h.1.")
        assert covered[start:stop].all() != frozen and covered[start:stop].any() != frozen, name
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))     # merged and ordered
    m.freeze({"wte", "wpe", "h.0", "h.1", "ln_f"})
    with pytest.raises(ValueError, match="nothing would train"):
        m.trainable_ranges()


def test_activation_buffers_follow_batch_shape():
    m = tiny_model()
    x, y, w = tiny_batch()
    logits, _ = m.forward(x, y)
    arena = m._acts_arena
    small, _ = m.forward(x[:2, :5], y[:2, :5])
    assert small.shape == (2, 5, TINY["vocab_size"])
    assert m._acts_arena is arena                        # smaller shapes reuse the arena
    fresh_grads(m, x, y, w)
    ref = gpt_loss_and_grads(m.named_parameters(), m.config, x[:2, :5], y[:2, :5],
                        w[:2, :5].astype(np.float64))
    fresh_grads(m, x[:2, :5], y[:2, :5], w[:2, :5])
    assert_close(m.named_grads()["h.0.mlp.c_fc.weight"], ref[3]["h.0.mlp.c_fc.weight"], 1e-3, "fc")


# --- bad inputs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, match", [
    (np.zeros((2, 3), np.float32), "integer"),
    (np.zeros(3, np.int64), "2-D"),
    (np.zeros((2, 9), np.int64), "block_size"),
    (np.full((2, 3), 11), r"\[0, 11\)"),
    (np.full((2, 3), -1), r"\[0, 11\)"),
    (np.zeros((0, 3), np.int64), "non-empty"),
])
def test_bad_tokens_raise(tokens, match):
    m = tiny_model()
    with pytest.raises(ValueError, match=match):
        m.forward(tokens)


def test_bad_targets_weights_and_config_raise():
    m = tiny_model()
    x, y, w = tiny_batch()
    with pytest.raises(ValueError, match="backward needs"):
        GPT(GPTConfig(**TINY)).backward(w)
    with pytest.raises(ValueError, match="targets must have the shape"):
        m.forward(x, y[:, :3])
    m.forward(x)
    with pytest.raises(ValueError, match="backward needs"):
        m.backward(w)
    m.forward(x, y)
    with pytest.raises(ValueError, match="weights must have shape"):
        m.backward(w[:2])
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(vocab_size=10, n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="positive integer"):
        GPTConfig(vocab_size=0)
    for seed in (-1, "1", 1.5):   # numpy refused these without naming the seed
        with pytest.raises(ValueError, match=f"seed={seed!r} is not allowed: expected an integer"):
            GPT(GPTConfig(**TINY), seed=seed)


# --- bf16 matmul precision --------------------------------------------------------------------------------

BF16_RTOL, BF16_GRAD_RTOL = 1e-5, 5e-4      # against the bf16-rounded float64 reference
BF16_VS_FP32_RTOL, BF16_VS_FP32_GRAD_NORMWISE = 2e-2, 1e-1


def max_relative_error(got, ref):
    """The smallest rel for which assert_close(got, ref, rel) passes."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = float(np.abs(ref).max()) or 1.0
    return float((np.abs(got - ref) / (np.abs(ref) + scale)).max())


def test_round_bf16_matches_the_format():
    one = 1.0
    cases = {one: one, one + 2 ** -7: one + 2 ** -7,           # representable: unchanged
             one + 2 ** -8: one,                                  # tie: to the even neighbour 1
             one + 3 * 2 ** -8: one + 2 ** -6,                    # tie: to the even 1 + 2*2^-7
             one + 2 ** -8 + 2 ** -20: one + 2 ** -7,             # above the tie: up
             -3.0 - 2 ** -7: -3.0,                                # spacing 2^-6 in [2, 4)
             0.0: 0.0, 2.0 ** -100 * 1.00390625: 2.0 ** -100}
    for x, expected in cases.items():
        assert round_bf16(x) == expected, x
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal(10000) * np.exp2(np.arange(10000) % 40 - 20)
    x32 = x.astype(np.float32)
    via_torch = torch.from_numpy(x32).to(torch.bfloat16).to(torch.float64).numpy()
    np.testing.assert_array_equal(round_bf16(x32), via_torch)


def test_matmul_precision_attribute_and_validation():
    m = GPT(GPTConfig(**TINY))
    assert m.matmul_precision == "fp32"
    assert GPT(GPTConfig(**TINY), matmul_precision="bf16").matmul_precision == "bf16"
    for bad in ("fp16", "BF16", None, 16):
        with pytest.raises(ValueError, match="matmul_precision must be one of fp32, bf16"):
            m.matmul_precision = bad
        with pytest.raises(ValueError, match="fp32, bf16"):
            GPT(GPTConfig(**TINY), matmul_precision=bad)
    assert m.matmul_precision == "fp32"
    assert set(ops.MATMUL_PRECISIONS) == {"fp32", "bf16"}


@pytest.mark.parametrize("zero_some", [False, True])
def test_bf16_forward_backward_match_rounded_float64_reference(bf16_variant, zero_some):
    """On every kernel variant and every bf16 path this CPU runs (AMX tiles, AVX512-BF16, and the
    emulated rounding), against one reference."""
    m = tiny_model()
    m.matmul_precision = "bf16"
    x, y, w = tiny_batch(zero_some=zero_some)
    w64 = w.astype(np.float64)
    ref_loss, ref_losses, ref_logits, ref_grads = gpt_loss_and_grads(
        m.named_parameters(), m.config, x, y, w64, operand=round_bf16)
    fp32_ref = gpt_loss_and_grads(m.named_parameters(), m.config, x, y, w64)
    # The tolerances tell bf16 from fp32: the unrounded reference is far outside them.
    assert max_relative_error(fp32_ref[2], ref_logits) > 100 * BF16_RTOL
    assert max(max_relative_error(fp32_ref[3][k], ref_grads[k]) for k in ref_grads) \
        > 10 * BF16_GRAD_RTOL
    logits, losses = m.forward(x, y)
    assert_close(logits, ref_logits, BF16_RTOL, "logits")
    assert_close(losses, ref_losses, BF16_RTOL, "losses")
    assert math.isclose(float((w64 * losses).sum()), ref_loss, rel_tol=BF16_RTOL)
    m.zero_grad()
    m.backward(w)
    grads = m.named_grads()
    for name, g in grads.items():
        assert np.abs(ref_grads[name]).max() > 0 or name == "wpe", name
        assert_close(g, ref_grads[name], BF16_GRAD_RTOL, name)


def test_bf16_model_close_to_fp32_model():
    x, y, w = tiny_batch(seed=2)
    results = {}
    for precision in ops.MATMUL_PRECISIONS:
        m = tiny_model(seed=4)
        m.matmul_precision = precision
        logits, _ = m.forward(x, y)
        logits = logits.copy()
        fresh_grads(m, x, y, w)
        results[precision] = logits, m.named_grads()
    (l32, g32), (l16, g16) = results["fp32"], results["bf16"]
    assert not np.array_equal(l16, l32)
    assert_close(l16, l32, BF16_VS_FP32_RTOL, "logits")
    for name in g32:
        diff = np.linalg.norm(g16[name] - g32[name]) / np.linalg.norm(g32[name])
        assert diff <= BF16_VS_FP32_GRAD_NORMWISE, f"{name}: normwise difference {diff:.3g}"


def test_bf16_kv_cache_runs_in_bf16(bf16_variant):
    """The KV-cached forward uses the model's precision too: a fill is bitwise forward()'s, one-token
    steps agree with the full forward to float32 accumulation order, and both differ from fp32."""
    m = tiny_model(seed=5)
    m.matmul_precision = "bf16"
    ctx = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.int32)
    cache = KVCache(m.config)
    first = m.forward(ctx[None, :4], cache=cache)[0][0, -1].copy()
    logits, _ = m.forward(ctx[None, :4])
    np.testing.assert_array_equal(first, logits[0, -1])
    for t in range(4, ctx.size):
        step = m.forward(ctx[None, t:t + 1], cache=cache)[0][0, -1].copy()
        ref, _ = m.forward(ctx[None, :t + 1])
        assert_close(step, ref[0, -1], 1e-5, f"position {t}")
    m.matmul_precision = "fp32"
    fp32 = m.forward(ctx[None, :], cache=KVCache(m.config))[0][0, -1]
    assert not np.allclose(fp32, step, rtol=1e-5, atol=1e-5)


def test_a_kv_cache_made_for_another_model_is_refused_by_name():
    m = tiny_model(seed=5)
    other = GPTConfig(**{**m.config.__dict__, "n_embd": m.config.n_embd * 2})
    ctx = np.array([[3, 1, 4]], np.int32)
    with pytest.raises(ValueError, match=r"this KV cache was made for a model of \(n_layer, "
                                         r"n_head, n_embd, block_size\) .*KVCache\(model.config\)"):
        m.forward(ctx, cache=KVCache(other))
    with pytest.raises(TypeError, match="cache must be an lmlab KVCache, got dict"):
        m.forward(ctx, cache={})
    logits, _ = m.forward(ctx, cache=KVCache(m.config))  # its own still works
    assert np.isfinite(logits).all()


def test_parameter_count_is_gpt2_small_and_the_layout_total():
    from lmlab.model import parameter_count, parameter_layout
    # GPT-2 small (Radford et al. 2019; the 124M of nanoGPT's report, tied head counted once).
    gpt2 = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    assert parameter_count(gpt2) == 124_439_808
    for cfg in (GPTConfig(**TINY), GPTConfig(vocab_size=7, block_size=3, n_layer=2, n_head=1,
                                             n_embd=5)):
        assert parameter_count(cfg) == sum(math.prod(s) for _, s in parameter_layout(cfg))
        assert parameter_count(cfg) == GPT(cfg).num_params()


def test_a_model_of_terabytes_is_refused_before_anything_is_allocated():
    """GPT(config) allocated first: 10**12 layers built a layout table without end, and a wide
    model asked numpy for terabytes. In a subprocess under a memory and time limit, so that the
    old behaviour fails the test instead of taking the machine."""
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        from lmlab.checkpoint import MAX_PARAMS
        from lmlab.model import GPT, GPTConfig
        for sizes in ({"n_layer": 10**12, "n_embd": 8, "n_head": 1},
                      {"n_embd": 2**40, "n_head": 1, "n_layer": 1},
                      {"vocab_size": 10**9, "n_embd": 10**5, "n_head": 1}):
            try:
                GPT(GPTConfig(**{"vocab_size": 10, **sizes}))
            except ValueError as e:
                assert "parameters" in str(e) and f"{MAX_PARAMS:,}" in str(e), e
            else:
                raise SystemExit(f"accepted {sizes}")
        print("refused")
    """)
    import os
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "refused", done.stderr[-2000:]


def test_a_kv_cache_length_outside_its_positions_is_refused():
    m = tiny_model(seed=5)
    cache = KVCache(m.config)
    # A negative length read wpe from its end (start -1), then failed inside matmul_forward.
    for bad in (-1, m.config.block_size + 1, 1.5, True):
        cache.length = bad
        with pytest.raises(ValueError, match=r"KV cache's length must be a whole number .* got"):
            m.forward(np.array([[1]], np.int32), cache=cache)
    cache.reset()
    logits, _ = m.forward(np.array([[3, 1]], np.int32), cache=cache)
    ref, _ = m.forward(np.array([[3, 1]], np.int32))
    assert np.array_equal(logits, ref)


def test_freeze_names_a_prefix_of_the_wrong_kind():
    m = tiny_model()
    m.freeze(["h.0"])
    # freeze(None) failed in frozenset ("'NoneType' object is not iterable"); freeze([1]) said
    # the prefix 1 "matches no parameter name", as if it were a name.
    with pytest.raises(TypeError, match="prefixes must be a collection of name prefixes.*NoneType"):
        m.freeze(None)
    for bad in (1, None, b"h.0"):
        with pytest.raises(TypeError, match=rf"frozen prefixes must be str .* got {bad!r}"):
            m.freeze(["wte", bad])
    assert m.frozen == {"h.0"}          # a refused freeze leaves the previous one
    m.freeze(())
    assert m.frozen == frozenset()
