"""The float64 reference: every kernel of lmlab.ops and the whole GPT, written from the math in numpy.

This is the oracle the tests and benchmarks compare the kernels and the model against, and the
shortest complete statement of what lmlab computes: read it beside model.py to see one training
step without buffers, threads or SIMD. Nothing here calls a kernel.

Conventions: each function takes the kernel's inputs (any float dtype), computes in float64 and
returns new arrays instead of writing into buffers. A backward function returns the gradient itself
(what the kernel writes, or adds to a zeroed buffer). `operand`, where taken, is applied to both
operands of every product (matmul, attention's Q.K^T and P.V and their backward products, with
attention's scale folded into its left operand first, as the kernels do): `operand=round_bf16`
gives the reference of the "bf16" matmul precision.

Shape legend: B batch, T time, C channels, NH heads, HS = C / NH, V vocabulary, OC output channels,
N rows, L layers.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

__all__ = [
    "LAYERNORM_EPS", "GELU_SCALE", "GELU_CUBIC", "f64", "round_bf16",
    "matmul_forward", "matmul_backward", "logsumexp", "softmax_forward", "softmax_backward",
    "crossentropy_forward", "crossentropy_backward", "layernorm_forward", "layernorm_backward",
    "gelu_forward", "gelu_backward", "residual_forward", "residual_backward", "attention_forward",
    "split_heads", "merge_heads", "attention_stats", "attention_backward", "embedding_forward", "embedding_backward",
    "adamw_update", "sum_squares", "gpt_forward", "gpt_backward", "gpt_loss_and_grads",
]

LAYERNORM_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715

Operand = Optional[Callable[[np.ndarray], np.ndarray]]


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _identity(x):
    return x


def round_bf16(x) -> np.ndarray:
    """x rounded to the nearest bfloat16 (8 significant bits, ties to even), as float64.

    Written with frexp/ldexp on the float64 value, independently of the kernels' bit manipulation:
    the mantissa m in [0.5, 1) scaled by 2^8 and rounded by np.rint (ties to even)."""
    x = np.asarray(x, dtype=np.float64)
    m, e = np.frexp(x)
    return np.ldexp(np.rint(np.ldexp(m, 8)), e - 8)


# --- matmul: out = inp @ weight.T + bias ----------------------------------------------------------

def matmul_forward(inp, weight, bias=None, operand: Operand = None) -> np.ndarray:
    r = operand or _identity
    out = r(f64(inp)) @ r(f64(weight)).T
    return out if bias is None else out + f64(bias)


def matmul_backward(dout, inp, weight, operand: Operand = None):
    """(dinp, dweight, dbias) for out = inp @ weight.T + bias; leading dims of inp are rows.
    dbias is a plain sum (no operand: it is no product)."""
    r = operand or _identity
    g = f64(dout).reshape(-1, np.shape(weight)[0])
    x = f64(inp).reshape(-1, np.shape(weight)[1])
    dinp = (r(g) @ r(f64(weight))).reshape(np.shape(inp))
    return dinp, r(g).T @ r(x), g.sum(axis=0)


# --- softmax and cross-entropy --------------------------------------------------------------------

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


# --- layernorm ------------------------------------------------------------------------------------

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


# --- GELU (GPT-2's tanh form) and residual --------------------------------------------------------

def gelu_forward(inp) -> np.ndarray:
    x = f64(inp)
    with np.errstate(over="ignore", invalid="ignore"):
        out = 0.5 * x * (1.0 + np.tanh(GELU_SCALE * (x + GELU_CUBIC * x ** 3)))
    return np.where(x == -np.inf, 0.0, out)  # the limit, where the formula gives -inf * 0


def gelu_backward(inp, dout) -> np.ndarray:
    # Past |x| = 20 GELU' is 0 or 1 to within 1e-300; clipping there keeps inf * 0 out of the formula
    # (x ** 3 overflows beyond 1e102).
    x = np.clip(f64(inp), -20.0, 20.0)
    th = np.tanh(GELU_SCALE * (x + GELU_CUBIC * x ** 3))
    du = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x ** 2)
    return (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th ** 2) * du) * f64(dout)


def residual_forward(a, b) -> np.ndarray:
    return f64(a) + f64(b)


def residual_backward(dout):
    g = f64(dout)
    return g.copy(), g.copy()


# --- causal multi-head self-attention -------------------------------------------------------------

def split_heads(qkv, n_head: int):
    x = f64(qkv)
    B, T, C3 = x.shape
    C = C3 // 3
    q, k, v = (x[..., i * C:(i + 1) * C].reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)
               for i in range(3))
    return q, k, v  # each (B, NH, T, HS)


def merge_heads(x) -> np.ndarray:
    B, NH, T, HS = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, NH * HS)


def _causal_scores(q, k, operand: Operand):
    """Scaled scores (B, NH, T, T) with every future position at -inf."""
    r = operand or _identity
    T, HS = q.shape[2], q.shape[3]
    scores = r(q / math.sqrt(HS)) @ r(k).transpose(0, 1, 3, 2)
    return np.where(np.triu(np.ones((T, T), dtype=bool), k=1), -np.inf, scores)


def attention_forward(qkv, n_head: int, operand: Operand = None):
    """(out (B, T, C), att (B, NH, T, T)); att is zero above the diagonal."""
    r = operand or _identity
    q, k, v = split_heads(qkv, n_head)
    att = softmax_forward(_causal_scores(q, k, operand))
    return merge_heads(r(att) @ r(v)), att


def attention_stats(qkv, n_head: int, operand: Operand = None) -> np.ndarray:
    """(B, NH, T, 2): each row's softmax statistics over the causal scaled scores, what the kernel
    caches: [..., 0] the maximum score, [..., 1] 1 / sum of exp(score - maximum)."""
    q, k, _ = split_heads(qkv, n_head)
    scores = _causal_scores(q, k, operand)
    m = scores.max(-1, keepdims=True)
    return np.stack([m[..., 0], 1.0 / np.exp(scores - m).sum(-1)], axis=-1)


def attention_backward(dout, qkv, n_head: int, operand: Operand = None) -> np.ndarray:
    """dqkv (B, T, 3C), recomputing the probabilities from qkv."""
    r = operand or _identity
    q, k, v = split_heads(qkv, n_head)
    HS = q.shape[3]
    _, att = attention_forward(qkv, n_head, operand)
    B, T, C = np.shape(dout)
    dy = f64(dout).reshape(B, T, n_head, HS).transpose(0, 2, 1, 3)
    dv = r(att).transpose(0, 1, 3, 2) @ r(dy)
    datt = r(dy) @ r(v).transpose(0, 1, 3, 2)
    dscores = r(softmax_backward(datt, att) / math.sqrt(HS))
    dq = dscores @ r(k)
    dk = dscores.transpose(0, 1, 3, 2) @ r(q)
    return np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)


# --- token + position embedding -------------------------------------------------------------------

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


# --- optimiser ------------------------------------------------------------------------------------

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


# --- the GPT (model.py's architecture, parameters by GPT-2 name) -----------------------------------

def gpt_forward(params: dict, config, tokens, targets=None, operand: Operand = None):
    """(logits (B, T, V), losses (B, T) or None, acts): acts is what gpt_backward reads.

    params maps GPT-2 names to arrays (GPT.named_parameters()); config is a GPTConfig.
    """
    P = {name: f64(value) for name, value in params.items()}
    tokens = np.asarray(tokens)
    NH = config.n_head
    x = embedding_forward(tokens, P["wte"], P["wpe"])
    layers = []
    for i in range(config.n_layer):
        p = {name[len(f"h.{i}."):]: value for name, value in P.items()
             if name.startswith(f"h.{i}.")}
        ln1, _, _ = layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"])
        qkv = matmul_forward(ln1, p["attn.c_attn.weight"], p["attn.c_attn.bias"], operand)
        atty, _ = attention_forward(qkv, NH, operand)
        res2 = residual_forward(x, matmul_forward(atty, p["attn.c_proj.weight"],
                                                  p["attn.c_proj.bias"], operand))
        ln2, _, _ = layernorm_forward(res2, p["ln_2.weight"], p["ln_2.bias"])
        fch = matmul_forward(ln2, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"], operand)
        gelu = gelu_forward(fch)
        layers.append(dict(res=x, ln1=ln1, qkv=qkv, atty=atty, res2=res2, ln2=ln2, fch=fch,
                           gelu=gelu))
        x = residual_forward(res2, matmul_forward(gelu, p["mlp.c_proj.weight"],
                                                  p["mlp.c_proj.bias"], operand))
    lnf, _, _ = layernorm_forward(x, P["ln_f.weight"], P["ln_f.bias"])
    logits = matmul_forward(lnf, P["wte"], None, operand)      # the LM head tied to wte
    acts = dict(tokens=tokens, layers=layers, res_final=x, lnf=lnf, logits=logits,
                targets=targets)
    if targets is None:
        return logits, None, acts
    losses, _ = crossentropy_forward(logits, targets)
    return logits, losses, acts


def gpt_backward(params: dict, config, acts: dict, weights, operand: Operand = None) -> dict:
    """The gradient of sum(weights * losses) for every parameter, by name, from gpt_forward's acts."""
    P = {name: f64(value) for name, value in params.items()}
    G = {name: np.zeros_like(value) for name, value in P.items()}
    NH = config.n_head
    dlogits = crossentropy_backward(acts["logits"], acts["targets"], weights)
    dlnf, G["wte"], _ = matmul_backward(dlogits, acts["lnf"], P["wte"], operand)
    dres, G["ln_f.weight"], G["ln_f.bias"] = layernorm_backward(dlnf, acts["res_final"],
                                                                P["ln_f.weight"])
    for i in reversed(range(config.n_layer)):
        a, h = acts["layers"][i], f"h.{i}."
        # MLP: res[i+1] = res2 + c_proj(gelu(c_fc(ln_2(res2))))
        dgelu, G[h + "mlp.c_proj.weight"], G[h + "mlp.c_proj.bias"] = matmul_backward(
            dres, a["gelu"], P[h + "mlp.c_proj.weight"], operand)
        dfch = gelu_backward(a["fch"], dgelu)
        dln2, G[h + "mlp.c_fc.weight"], G[h + "mlp.c_fc.bias"] = matmul_backward(
            dfch, a["ln2"], P[h + "mlp.c_fc.weight"], operand)
        dres2, G[h + "ln_2.weight"], G[h + "ln_2.bias"] = layernorm_backward(
            dln2, a["res2"], P[h + "ln_2.weight"])
        dres2 = dres2 + dres                  # the residual connection
        # attention: res2 = res[i] + c_proj(attn(c_attn(ln_1(res[i]))))
        datty, G[h + "attn.c_proj.weight"], G[h + "attn.c_proj.bias"] = matmul_backward(
            dres2, a["atty"], P[h + "attn.c_proj.weight"], operand)
        dqkv = attention_backward(datty, a["qkv"], NH, operand)
        dln1, G[h + "attn.c_attn.weight"], G[h + "attn.c_attn.bias"] = matmul_backward(
            dqkv, a["ln1"], P[h + "attn.c_attn.weight"], operand)
        dres, G[h + "ln_1.weight"], G[h + "ln_1.bias"] = layernorm_backward(
            dln1, a["res"], P[h + "ln_1.weight"])
        dres = dres + dres2                   # the residual connection
    dwte, G["wpe"] = embedding_backward(dres, acts["tokens"], config.vocab_size, config.block_size)
    G["wte"] = G["wte"] + dwte                # wte is both the embedding and the LM head
    return G


def gpt_loss_and_grads(params: dict, config, tokens, targets, weights, operand: Operand = None):
    """(loss = sum(weights * losses), losses, logits, gradients by name), all float64."""
    logits, losses, acts = gpt_forward(params, config, tokens, targets, operand)
    grads = gpt_backward(params, config, acts, weights, operand)
    return float((f64(weights) * losses).sum()), losses, logits, grads
