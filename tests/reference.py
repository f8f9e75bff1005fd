"""float64 numpy references for every kernel in cpp/kernels.h, forward and backward.

Written from the math, not from the C++: each function takes the kernel's inputs (any float dtype),
computes in float64 and returns new arrays instead of writing into buffers. Backward references return
the gradient itself (what a kernel adds to a zeroed buffer). Other tests may use these as oracles, and
the finite-difference checks differentiate the forward functions here. At the end: the tolerance check
(assert_close), central differences (numerical_grad) and float32 test data (randn) the tests share.

Shape legend: B batch, T time, C channels, NH heads, HS = C / NH, V vocabulary, OC output channels,
N rows.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pytest

LAYERNORM_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# --- matmul: out = inp @ weight.T + bias --------------------------------------------------------------

def round_bf16(x) -> np.ndarray:
    """x rounded to the nearest bfloat16 (8 significant bits, ties to even), as float64.

    Written with frexp/ldexp on the float64 value, independently of the kernels' bit manipulation:
    the mantissa m in [0.5, 1) scaled by 2^8 and rounded by np.rint (ties to even)."""
    x = np.asarray(x, dtype=np.float64)
    m, e = np.frexp(x)
    return np.ldexp(np.rint(np.ldexp(m, 8)), e - 8)


def matmul_forward(inp, weight, bias=None) -> np.ndarray:
    out = f64(inp) @ f64(weight).T
    return out if bias is None else out + f64(bias)


def matmul_backward(dout, inp, weight):
    """(dinp, dweight, dbias) for out = inp @ weight.T + bias; leading dims of inp are rows."""
    g = f64(dout).reshape(-1, np.shape(weight)[0])
    x = f64(inp).reshape(-1, np.shape(weight)[1])
    dinp = (g @ f64(weight)).reshape(np.shape(inp))
    return dinp, g.T @ x, g.sum(axis=0)


# --- softmax and cross-entropy ------------------------------------------------------------------------

def logsumexp(logits) -> np.ndarray:
    x = f64(logits)
    m = x.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]


def softmax_forward(logits) -> np.ndarray:
    x = f64(logits)
    return np.exp(x - logsumexp(x)[..., None])


def softmax_backward(dprobs, probs) -> np.ndarray:
    """dlogits for probs = softmax(logits): the Jacobian-vector product p * (dp - <dp, p>)."""
    p, dp = f64(probs), f64(dprobs)
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


def crossentropy_forward(logits, targets):
    """(losses, lse): loss = lse - logits[target] per row."""
    x = f64(logits)
    lse = logsumexp(x)
    picked = np.take_along_axis(x, np.asarray(targets)[..., None].astype(np.int64), axis=-1)[..., 0]
    return lse - picked, lse


def crossentropy_backward(logits, targets, weights) -> np.ndarray:
    """Gradient of sum_n weights_n * loss_n with respect to the logits."""
    probs = softmax_forward(logits)
    onehot = np.zeros_like(probs)
    np.put_along_axis(onehot, np.asarray(targets)[..., None].astype(np.int64), 1.0, axis=-1)
    return f64(weights)[..., None] * (probs - onehot)


# --- layernorm ----------------------------------------------------------------------------------------

def layernorm_forward(inp, weight, bias, eps: float = LAYERNORM_EPS):
    """(out, mean, rstd) over the last dimension, biased variance as GPT-2 uses."""
    x = f64(inp)
    mean = x.mean(axis=-1)
    var = ((x - mean[..., None]) ** 2).mean(axis=-1)
    rstd = 1.0 / np.sqrt(var + eps)
    out = (x - mean[..., None]) * rstd[..., None] * f64(weight) + f64(bias)
    return out, mean, rstd


def layernorm_backward(dout, inp, weight, eps: float = LAYERNORM_EPS):
    """(dinp, dweight, dbias), recomputing the statistics from inp rather than trusting a cache."""
    x, g, w = f64(inp), f64(dout), f64(weight)
    C = x.shape[-1]
    _, mean, rstd = layernorm_forward(x, w, np.zeros(C), eps)
    xhat = (x - mean[..., None]) * rstd[..., None]
    dxhat = g * w
    dinp = rstd[..., None] * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                              - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    rows = (-1, C)
    return dinp, (g * xhat).reshape(rows).sum(axis=0), g.reshape(rows).sum(axis=0)


# --- GELU (GPT-2's tanh form) and residual ------------------------------------------------------------

def gelu_forward(inp) -> np.ndarray:
    x = f64(inp)
    return 0.5 * x * (1.0 + np.tanh(GELU_SCALE * (x + GELU_CUBIC * x ** 3)))


def gelu_backward(inp, dout) -> np.ndarray:
    x = f64(inp)
    th = np.tanh(GELU_SCALE * (x + GELU_CUBIC * x ** 3))
    du = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x ** 2)
    return (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th ** 2) * du) * f64(dout)


def residual_forward(a, b) -> np.ndarray:
    return f64(a) + f64(b)


def residual_backward(dout):
    g = f64(dout)
    return g.copy(), g.copy()


# --- causal multi-head self-attention -----------------------------------------------------------------

def _split_heads(qkv, n_head: int):
    x = f64(qkv)
    B, T, C3 = x.shape
    C = C3 // 3
    q, k, v = (x[..., i * C:(i + 1) * C].reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)
               for i in range(3))
    return q, k, v  # each (B, NH, T, HS)


def _merge_heads(x) -> np.ndarray:
    B, NH, T, HS = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, NH * HS)


def attention_forward(qkv, n_head: int, operand=None):
    """(out (B, T, C), att (B, NH, T, T)); att is zero above the diagonal.

    operand, if given, is applied to both operands of each product (the scale folded into q first,
    as the kernel does): round_bf16 gives the reference of precision="bf16"."""
    r = operand or (lambda t: t)
    q, k, v = _split_heads(qkv, n_head)
    T, HS = q.shape[2], q.shape[3]
    scores = r(q / math.sqrt(HS)) @ r(k).transpose(0, 1, 3, 2)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores)
    att = softmax_forward(scores)
    return _merge_heads(r(att) @ r(v)), att


def attention_stats(qkv, n_head: int, operand=None) -> np.ndarray:
    """(B, NH, T, 2): each row's softmax statistics over the causal scaled scores, what the kernel
    caches: [..., 0] the maximum score, [..., 1] 1 / sum of exp(score - maximum)."""
    r = operand or (lambda t: t)
    q, k, _ = _split_heads(qkv, n_head)
    T, HS = q.shape[2], q.shape[3]
    scores = r(q / math.sqrt(HS)) @ r(k).transpose(0, 1, 3, 2)
    scores = np.where(np.triu(np.ones((T, T), dtype=bool), k=1), -np.inf, scores)
    m = scores.max(-1, keepdims=True)
    return np.stack([m[..., 0], 1.0 / np.exp(scores - m).sum(-1)], axis=-1)


def attention_backward(dout, qkv, n_head: int, operand=None) -> np.ndarray:
    """dqkv (B, T, 3C), recomputing the probabilities from qkv; operand as in attention_forward."""
    r = operand or (lambda t: t)
    q, k, v = _split_heads(qkv, n_head)
    HS = q.shape[3]
    _, att = attention_forward(qkv, n_head, operand)
    B, T, C = np.shape(dout)
    dy = f64(dout).reshape(B, T, n_head, HS).transpose(0, 2, 1, 3)
    dv = r(att).transpose(0, 1, 3, 2) @ r(dy)
    datt = r(dy) @ r(v).transpose(0, 1, 3, 2)
    dscores = r(softmax_backward(datt, att) / math.sqrt(HS))
    dq = dscores @ r(k)
    dk = dscores.transpose(0, 1, 3, 2) @ r(q)
    return np.concatenate([_merge_heads(dq), _merge_heads(dk), _merge_heads(dv)], axis=-1)


# --- token + position embedding -----------------------------------------------------------------------

def embedding_forward(tokens, wte, wpe) -> np.ndarray:
    T = np.shape(tokens)[1]
    return f64(wte)[np.asarray(tokens)] + f64(wpe)[:T]


def embedding_backward(dout, tokens, V: int, maxT: int):
    """(dwte (V, C), dwpe (maxT, C))."""
    g = f64(dout)
    B, T, C = g.shape
    dwte = np.zeros((V, C))
    np.add.at(dwte, np.asarray(tokens).reshape(-1), g.reshape(-1, C))
    dwpe = np.zeros((maxT, C))
    dwpe[:T] = g.sum(axis=0)
    return dwte, dwpe


# --- optimiser ----------------------------------------------------------------------------------------

def adamw_update(params, m, v, grads, decay_mask: Optional[np.ndarray], *, lr: float, beta1: float,
                 beta2: float, eps: float, weight_decay: float, grad_scale: float, t: int):
    """One AdamW step as cpp/kernels.h states it; returns the new (params, m, v).

    Decoupled decay: the decay term uses the parameters from before the step and is not scaled by the
    bias corrections (the same update as torch.optim.AdamW).
    """
    p, g = f64(params), f64(grads) * grad_scale
    m_new = beta1 * f64(m) + (1.0 - beta1) * g
    v_new = beta2 * f64(v) + (1.0 - beta2) * g * g
    mhat = m_new / (1.0 - beta1 ** t)
    vhat = v_new / (1.0 - beta2 ** t)
    decay = weight_decay * (np.ones_like(p) if decay_mask is None else f64(decay_mask))
    return p - lr * (mhat / (np.sqrt(vhat) + eps) + decay * p), m_new, v_new


def sum_squares(x) -> float:
    return float(np.sum(f64(x) ** 2))


# --- comparing a float32 kernel result with a reference ------------------------------------------------

def assert_close(actual, expected, tol: float, what: str, scale=None) -> None:
    """|actual - expected| <= tol * scale elementwise.

    scale defaults to max |expected| (a normwise bound: the error relative to the magnitude of the
    result), and may be an array for elementwise bounds. float32 actual against a float64 expected.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values in the kernel result"
    if scale is None:
        scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    err = np.abs(actual.astype(np.float64) - expected)
    bound = tol * np.asarray(scale, dtype=np.float64)
    bad = err > bound
    if np.any(bad):
        i = np.unravel_index(int(np.argmax(err - bound)), err.shape) if err.ndim else ()
        pytest.fail(f"{what}: {int(bad.sum())} of {err.size} entries outside tolerance {tol:g}; worst at "
                    f"{i}: got {actual[i]!r}, expected {expected[i]!r}, error {err[i]:.3g} > bound "
                    f"{np.broadcast_to(bound, err.shape)[i]:.3g}")


def assert_stats_close(stats, expected, tol: float) -> None:
    """Attention's softmax statistics (..., 2): the row maxima to tol of their largest size, and
    1 / sum (in (0, 1]) to tol relative, entry by entry."""
    stats, expected = np.asarray(stats), np.asarray(expected, np.float64)
    assert_close(stats[..., 0], expected[..., 0], tol, "stats max")
    assert_close(stats[..., 1], expected[..., 1], tol, "stats 1/sum", scale=np.abs(expected[..., 1]))


def randn(rng, *shape, scale: float = 1.0) -> np.ndarray:
    """Standard normal float32 data, C-contiguous."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def numerical_grad(f, x, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar function f at x, in float64 (error O(h^2) for smooth f)."""
    x = f64(x).copy()
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        orig = x[i]
        x[i] = orig + h
        up = f(x)
        x[i] = orig - h
        down = f(x)
        x[i] = orig
        grad[i] = (up - down) / (2.0 * h)
    return grad
