"""Kernel benchmarks: each lmlab kernel timed against a vectorised numpy reference (and PyTorch's
scaled_dot_product_attention when torch is importable) in the same run, on the shapes a GPT of the
docs/DESIGN.md sizes uses (6 layers, 384 wide, block 256, batch 16: B*T = 4096 rows).

`bench_kernels()` returns one row per measurement; `lmlab bench kernels [--json] [--threads N]
[--repeat N]` prints them (lmlab.cli.bench). Each row: kernel, shape, lmlab, reference, unit ("GFLOP/s" for matmul, higher is
better; "ms" otherwise, lower is better), ratio (lmlab's speed over the reference's: > 1 means lmlab is
faster, in either unit), reference_name, threads, isa, and max_rel_err (the two results compared,
normwise, so a fast wrong kernel shows).

Timing is best-of-N wall time after one warm-up call. numpy/OpenBLAS is limited to the same thread
count as lmlab when threadpoolctl is installed, and every PyTorch reference runs on it too. OpenBLAS
reads OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE at load: set, they pin slower kernels, so the numpy matmul
figures are depressed; a warning says so.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Callable, Iterator, List, Optional

import numpy as np

from . import ops
from .reference import GELU_SCALE

# (M, K, N): inp (M, K) . weight (N, K)^T. M = B*T rows; K, N the layer's in/out widths.
MATMUL_SHAPES = {
    "gpt": [(768, 128, 512), (768, 512, 128), (4096, 384, 1536), (4096, 1536, 384), (4096, 384, 384)],
    "tiny": [(33, 17, 9)],
}
# rows, channels, vocabulary, attention (B, T, NH, C), flat parameter count
SIZES = {
    "gpt": dict(N=4096, C=384, V=4096, attn=(16, 256, 6, 384), params=10_000_000),
    "tiny": dict(N=33, C=24, V=65, attn=(2, 9, 2, 8), params=1000),
}
DEFAULT_REPEAT = {"gpt": 5, "tiny": 2}
# Seconds of idleness before each measurement. OpenBLAS's, oneDNN's and OpenMP's worker threads
# busy-wait for a while after their last job; timing the next implementation inside that window
# would measure it on a fraction of the cores. Set per run.
DEFAULT_SETTLE_S = {"gpt": 0.3, "tiny": 0.0}
_settle_s = 0.0


def _best_ms(fn: Callable[[], object], repeat: int) -> float:
    if _settle_s > 0:
        time.sleep(_settle_s)
    fn()  # warm-up: first-touch page faults, thread-pool start
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


@contextlib.contextmanager
def _torch_threads(torch, n: int) -> Iterator[None]:
    """PyTorch on `n` threads for the block, its previous count restored after. Setting lmlab's
    count is not enough: torch's pool may be its own (MKL's, or another OpenMP runtime than
    lmlab's), and threadpoolctl does not reach it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _blas_threads(n: int) -> Iterator[None]:
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # numpy then uses its own default thread count
        yield
        return
    with threadpool_limits(limits=n):
        yield


def blas_threads_warning(threads: int) -> Optional[str]:
    """The warning to print when numpy's BLAS cannot be held to `threads` (no threadpoolctl) and
    they differ from the count it took at load (the environment's, as lmlab's default), else None."""
    if threads == ops.get_num_threads():
        return None
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return (f"warning: threadpoolctl is not installed, so numpy's BLAS keeps its own thread "
                f"count ({ops.get_num_threads()}), not {threads}: the numpy matmul rows are not at "
                "lmlab's thread count. pip install threadpoolctl, or set OMP_NUM_THREADS instead")
    return None


def openblas_warning() -> Optional[str]:
    """The warning to print when OpenBLAS's environment pins slower kernels, else None."""
    pinned = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if os.environ.get(v)]
    if not pinned:
        return None
    return (f"warning: {' and '.join(pinned)} set; numpy's OpenBLAS matmul figures are depressed. "
            "For a fair comparison rerun as: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE lmlab bench kernels")


# --- vectorised numpy references (float32, what a numpy user would write) -----------------------------

def _np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def _np_ce_forward(x, targets):
    m = x.max(axis=-1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=-1))
    return lse - x[np.arange(x.shape[0]), targets], lse


def _np_ce_backward(dx, x, lse, targets, weights):
    p = np.exp(x - lse[:, None])
    p[np.arange(x.shape[0]), targets] -= 1.0
    p *= weights[:, None]
    dx += p


def _np_layernorm_forward(x, w, b, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    return xc * rstd * w + b, mean, rstd


def _np_layernorm_backward(dout, x, w, mean, rstd):
    xhat = (x - mean) * rstd
    dxhat = dout * w
    dinp = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                   - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dinp, (dout * xhat).sum(axis=0), dout.sum(axis=0)


def _np_gelu(x):
    return 0.5 * x * (1.0 + np.tanh(GELU_SCALE * (x + 0.044715 * x * x * x)))


def _np_gelu_backward(x, dout):
    th = np.tanh(GELU_SCALE * (x + 0.044715 * x * x * x))
    du = GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x)
    return (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du) * dout


def _np_adamw(p, m, v, g, lr, b1, b2, eps, wd, t):
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * g * g
    p -= lr * ((m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + wd * p)


def _np_attention(qkv, NH):
    """Forward and backward of causal attention with batched matmuls; returns (out, dqkv)."""
    B, T, C3 = qkv.shape
    C, HS = C3 // 3, C3 // 3 // NH
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, NH, HS).transpose(0, 2, 1, 3) for i in range(3))
    s = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1.0 / math.sqrt(HS))
    s[..., np.triu(np.ones((T, T), dtype=bool), 1)] = -np.inf
    att = _np_softmax(s)
    y = att @ v
    dy = np.ones_like(y)
    dv = att.transpose(0, 1, 3, 2) @ dy
    da = dy @ v.transpose(0, 1, 3, 2)
    ds = att * (da - (da * att).sum(axis=-1, keepdims=True)) * np.float32(1.0 / math.sqrt(HS))
    dq, dk = ds @ k, ds.transpose(0, 1, 3, 2) @ q
    merge = lambda x: x.transpose(0, 2, 1, 3).reshape(B, T, C)  # noqa: E731
    return merge(y), np.concatenate([merge(dq), merge(dk), merge(dv)], axis=-1)


# --- the benchmark -----------------------------------------------------------------------------------

def bench_kernels(threads: Optional[int] = None, json_lines: bool = False, shapes: str = "gpt",
                  repeat: Optional[int] = None, out=None) -> List[dict]:
    """Time every kernel against its reference in this process; print rows (a table, or one JSON object
    per line with json_lines) to `out` (stdout by default) as they finish, and return them."""
    if shapes not in SIZES:
        raise ValueError(f"shapes must be one of {sorted(SIZES)}, got {shapes!r}")
    out = sys.stdout if out is None else out
    repeat = DEFAULT_REPEAT[shapes] if repeat is None else int(repeat)
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    warning = openblas_warning()
    if warning:
        print(warning, file=sys.stderr)
    try:
        import torch  # noqa: F401
    except ImportError as exc:  # its rows are left out: say so, rather than leave them missing
        print(f"note: torch cannot be imported ({exc}); the PyTorch reference rows are skipped "
              "(bf16 matmuls are compared with numpy's fp32 product)", file=sys.stderr)
    threads = ops.get_num_threads() if threads is None else int(threads)
    warning = blas_threads_warning(threads)
    if warning:
        print(warning, file=sys.stderr)
    global _settle_s
    _settle_s = DEFAULT_SETTLE_S[shapes]
    rows: List[dict] = []
    isa = ops.cpu_info()["isa"]
    if not json_lines:
        print(f"lmlab kernels ({isa}, {threads} thread{'s' if threads != 1 else ''}, best of {repeat}) against numpy in the same run",
              file=out)
        print(f"{'kernel':<22} {'shape':<22} {'lmlab':>10} {'reference':>10} {'unit':<8} {'ratio':>6}  reference",
              file=out)

    def record(kernel, shape, lm_ms, ref_ms, ref_name, err, flops=None):
        if flops is not None:
            lm, rf, unit = flops / lm_ms / 1e6, flops / ref_ms / 1e6, "GFLOP/s"
        else:
            lm, rf, unit = lm_ms, ref_ms, "ms"
        row = dict(kernel=kernel, shape=shape, lmlab=round(lm, 4), reference=round(rf, 4), unit=unit,
                   ratio=round(ref_ms / lm_ms, 3), reference_name=ref_name, threads=threads, isa=isa,
                   max_rel_err=float(f"{err:.3g}"))
        rows.append(row)
        if json_lines:
            print(json.dumps(row), file=out, flush=True)
        else:
            print(f"{kernel:<22} {shape:<22} {row['lmlab']:>10.3f} {row['reference']:>10.3f} {unit:<8} "
                  f"{row['ratio']:>6.2f}  {ref_name}", file=out, flush=True)

    rng = np.random.default_rng(0)

    def randn(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    with ops.num_threads(threads), _blas_threads(threads):
        _bench_matmul(record, randn, shapes, threads, repeat)
        _bench_rowwise(record, randn, rng, SIZES[shapes], repeat)
        _bench_attention(record, randn, SIZES[shapes]["attn"], threads, repeat)
    return rows


def _bench_matmul(record, randn, shapes, threads, repeat):
    blas = "numpy matmul (" + _blas_name() + ")"
    for M, K, N in MATMUL_SHAPES[shapes]:
        inp, w, dout = randn(M, K), randn(N, K), randn(M, N)
        out, ref = np.empty((M, N), np.float32), np.empty((M, N), np.float32)
        dinp, ref_dinp = np.zeros((M, K), np.float32), np.empty((M, K), np.float32)
        dw, ref_dw = np.zeros((N, K), np.float32), np.empty((N, K), np.float32)
        flops, shape = 2.0 * M * K * N, f"{M}x{K}x{N}"
        cases = [
            ("matmul fwd", lambda: ops.matmul_forward(out, inp, w), lambda: np.matmul(inp, w.T, out=ref),
             lambda: _rel_err(out, ref)),
            # Backward kernels accumulate, so the error check runs on one fresh call below.
            ("matmul bwd-input", lambda: ops.matmul_backward(dinp, None, None, dout, inp, w),
             lambda: np.matmul(dout, w, out=ref_dinp), None),
            ("matmul bwd-weight", lambda: ops.matmul_backward(None, dw, None, dout, inp, w),
             lambda: np.matmul(dout.T, inp, out=ref_dw), None),
        ]
        for kernel, lm, rf, err in cases:
            lm_ms, ref_ms = _best_ms(lm, repeat), _best_ms(rf, repeat)
            if err is None:
                fresh_i, fresh_w = np.zeros_like(dinp), np.zeros_like(dw)
                ops.matmul_backward(fresh_i if "input" in kernel else None,
                                    fresh_w if "weight" in kernel else None, None, dout, inp, w)
                e = _rel_err(fresh_i, ref_dinp) if "input" in kernel else _rel_err(fresh_w, ref_dw)
            else:
                e = err()
            record(kernel, shape, lm_ms, ref_ms, blas, e, flops=flops)
        _bench_matmul_bf16(record, inp, w, dout, out, dinp, dw, ref, ref_dinp, ref_dw, flops, shape,
                           threads, repeat, blas)


def _bench_matmul_bf16(record, inp, w, dout, out, dinp, dw, ref, ref_dinp, ref_dw, flops, shape,
                       threads, repeat, blas):
    """precision="bf16" rows. The reference is PyTorch's bf16 matmul on tensors already in bf16
    (oneDNN; lmlab's time includes rounding its fp32 inputs) when torch is importable, else the
    fp32 numpy product. max_rel_err is against the fp32 product: the cost of bf16 operands."""
    try:
        import torch
    except ImportError:
        torch = None
    reference_threads = contextlib.nullcontext  # numpy's BLAS: bench_kernels already holds it
    if torch is not None:
        reference_threads = lambda: _torch_threads(torch, threads)  # noqa: E731
        t_inp, t_w, t_dout = (torch.from_numpy(x).to(torch.bfloat16) for x in (inp, w, dout))
        refs = [lambda: torch.matmul(t_inp, t_w.T), lambda: torch.matmul(t_dout, t_w),
                lambda: torch.matmul(t_dout.T, t_inp)]
        ref_name = f"torch {torch.__version__} bf16 matmul"
    else:
        refs = [lambda: np.matmul(inp, w.T, out=ref), lambda: np.matmul(dout, w, out=ref_dinp),
                lambda: np.matmul(dout.T, inp, out=ref_dw)]
        ref_name = blas + ", fp32"
    np.matmul(inp, w.T, out=ref)
    np.matmul(dout, w, out=ref_dinp)
    np.matmul(dout.T, inp, out=ref_dw)
    cases = [
        ("matmul fwd bf16", lambda: ops.matmul_forward(out, inp, w, precision="bf16"), ref, None),
        ("matmul bwd-input bf16",
         lambda: ops.matmul_backward(dinp, None, None, dout, inp, w, precision="bf16"), ref_dinp,
         "input"),
        ("matmul bwd-weight bf16",
         lambda: ops.matmul_backward(None, dw, None, dout, inp, w, precision="bf16"), ref_dw,
         "weight"),
    ]
    for (kernel, lm, expected, grad), rf in zip(cases, refs):
        lm_ms = _best_ms(lm, repeat)
        with reference_threads():
            ref_ms = _best_ms(rf, repeat)
        if grad is None:
            got = out
        else:  # backward accumulates: check one fresh call
            fresh_i, fresh_w = np.zeros_like(dinp), np.zeros_like(dw)
            ops.matmul_backward(fresh_i if grad == "input" else None,
                                fresh_w if grad == "weight" else None, None, dout, inp, w,
                                precision="bf16")
            got = fresh_i if grad == "input" else fresh_w
        record(kernel, shape, lm_ms, ref_ms, ref_name, _rel_err(got, expected), flops=flops)


def _blas_name() -> str:
    try:
        from threadpoolctl import threadpool_info
        for lib in threadpool_info():
            if lib.get("user_api") == "blas":
                return str(lib.get("internal_api", "BLAS"))
    except ImportError:
        pass
    return "BLAS"


def _bench_rowwise(record, randn, rng, size, repeat):
    N, C, V, n = size["N"], size["C"], size["V"], size["params"]
    ref = "numpy (vectorised)"

    logits, dprobs = randn(N, V) * 3.0, randn(N, V)
    probs = np.empty_like(logits)
    targets = rng.integers(0, V, N).astype(np.int32)
    weights = np.full(N, 1.0 / N, np.float32)
    losses, lse, dlogits = np.empty(N, np.float32), np.empty(N, np.float32), np.zeros_like(logits)
    shape = f"{N}x{V}"
    ms = _best_ms(lambda: ops.softmax_forward(probs, logits), repeat)
    record("softmax fwd", shape, ms, _best_ms(lambda: _np_softmax(logits), repeat), ref,
           _rel_err(probs, _np_softmax(logits)))
    ms = _best_ms(lambda: ops.softmax_backward(dlogits, dprobs, probs), repeat)
    np_sm_bwd = lambda: probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True))  # noqa: E731
    fresh = np.zeros_like(logits)
    ops.softmax_backward(fresh, dprobs, probs)
    record("softmax bwd", shape, ms, _best_ms(np_sm_bwd, repeat), ref, _rel_err(fresh, np_sm_bwd()))
    ms = _best_ms(lambda: ops.crossentropy_forward(losses, lse, logits, targets), repeat)
    record("crossentropy fwd", shape, ms, _best_ms(lambda: _np_ce_forward(logits, targets), repeat), ref,
           _rel_err(losses, _np_ce_forward(logits, targets)[0]))
    np_dx, fresh = np.zeros_like(logits), np.zeros_like(logits)
    ms = _best_ms(lambda: ops.crossentropy_backward(dlogits, logits, lse, targets, weights), repeat)
    ref_ms = _best_ms(lambda: _np_ce_backward(np_dx, logits, lse, targets, weights), repeat)
    ops.crossentropy_backward(fresh, logits, lse, targets, weights)
    np_dx[...] = 0.0
    _np_ce_backward(np_dx, logits, lse, targets, weights)
    record("crossentropy bwd", shape, ms, ref_ms, ref, _rel_err(fresh, np_dx))

    x, w, b, dout = randn(N, C), randn(C), randn(C), randn(N, C)
    y, mean, rstd = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
    dx, dw, db = np.zeros_like(x), np.zeros(C, np.float32), np.zeros(C, np.float32)
    shape = f"{N}x{C}"
    ms = _best_ms(lambda: ops.layernorm_forward(y, mean, rstd, x, w, b), repeat)
    record("layernorm fwd", shape, ms, _best_ms(lambda: _np_layernorm_forward(x, w, b), repeat), ref,
           _rel_err(y, _np_layernorm_forward(x, w, b)[0]))
    _, np_mean, np_rstd = _np_layernorm_forward(x, w, b)
    ms = _best_ms(lambda: ops.layernorm_backward(dx, dw, db, dout, x, w, mean, rstd), repeat)
    ref_ms = _best_ms(lambda: _np_layernorm_backward(dout, x, w, np_mean, np_rstd), repeat)
    fresh = np.zeros_like(x)
    ops.layernorm_backward(fresh, None, None, dout, x, w, mean, rstd)
    record("layernorm bwd", shape, ms, ref_ms, ref,
           _rel_err(fresh, _np_layernorm_backward(dout, x, w, np_mean, np_rstd)[0]))

    h, dh = randn(N, 4 * C), randn(N, 4 * C)
    g, dg = np.empty_like(h), np.zeros_like(h)
    shape = f"{N}x{4 * C}"
    ms = _best_ms(lambda: ops.gelu_forward(g, h), repeat)
    record("gelu fwd", shape, ms, _best_ms(lambda: _np_gelu(h), repeat), ref, _rel_err(g, _np_gelu(h)))
    ms = _best_ms(lambda: ops.gelu_backward(dg, h, dh), repeat)
    fresh = np.zeros_like(h)
    ops.gelu_backward(fresh, h, dh)
    record("gelu bwd", shape, ms, _best_ms(lambda: _np_gelu_backward(h, dh), repeat), ref,
           _rel_err(fresh, _np_gelu_backward(h, dh)))

    grads = randn(n) * 1e-2
    p, m, v = randn(n), np.zeros(n, np.float32), np.zeros(n, np.float32)
    p2, m2, v2 = p.copy(), m.copy(), v.copy()
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    ms = _best_ms(lambda: ops.adamw_update(p, m, v, grads, None, t=1, **hp), repeat)
    ref_ms = _best_ms(lambda: _np_adamw(p2, m2, v2, grads, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"],
                                        hp["weight_decay"], 1), repeat)
    # Both ran warm-up + repeat steps from the same start, so their states must agree.
    record("adamw", f"{n}", ms, ref_ms, ref, _rel_err(p, p2))


def _bench_attention(record, randn, dims, threads, repeat):
    B, T, NH, C = dims
    qkv, dout = randn(B, T, 3 * C), np.ones((B, T, C), np.float32)
    y, stats, dqkv = np.empty((B, T, C), np.float32), np.empty((B, NH, T, 2), np.float32), np.zeros_like(qkv)

    def lmlab_step():
        ops.attention_forward(y, stats, qkv, NH)
        ops.attention_backward(dqkv, dout, qkv, stats, NH)

    shape = f"B{B} T{T} NH{NH} C{C}"
    ms = _best_ms(lmlab_step, repeat)
    fresh = np.zeros_like(qkv)
    ops.attention_backward(fresh, dout, qkv, stats, NH)
    np_y, np_dqkv = _np_attention(qkv, NH)
    err = max(_rel_err(y, np_y), _rel_err(fresh, np_dqkv))
    record("attention fwd+bwd", shape, ms, _best_ms(lambda: _np_attention(qkv, NH), repeat),
           "numpy (vectorised)", err)
    try:
        import torch
    except ImportError:
        return
    with _torch_threads(torch, threads):
        q, k, v = (torch.from_numpy(np.ascontiguousarray(
            qkv[..., i * C:(i + 1) * C].reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3))).requires_grad_()
            for i in range(3))
        g = torch.ones(B, NH, T, C // NH)

        def torch_step():
            for t in (q, k, v):
                t.grad = None
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            o.backward(g)
            return o

        o = torch_step()
        t_y = o.detach().numpy().transpose(0, 2, 1, 3).reshape(B, T, C)
        record("attention fwd+bwd", shape, ms, _best_ms(torch_step, repeat),
               f"torch {torch.__version__} scaled_dot_product_attention", _rel_err(y, t_y))
