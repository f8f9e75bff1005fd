"""Typed Python wrappers over the compiled kernels (lmlab._core), one per kernel.

Each wrapper mirrors its kernel in cpp/kernels.h: outputs first, then cached statistics, then inputs
and weights; every array is float32 (token ids int32) and C-contiguous. The compiled module validates
every argument and raises ValueError/TypeError naming the argument and the expected vs actual shape,
so these wrappers stay thin: they exist to document and to return outputs.

Gradients (the rule of cpp/kernels.h): parameter gradients (dweight, dbias, dwte, dwpe) always
accumulate (+=), so a step sums its micro-batches and the trainer zeroes them once per optimiser step.
Input gradients of the kernels taking `accumulate` (matmul's dinp, GELU's dinp, attention's dqkv) are
written when accumulate=False, as the model calls them, and added to when True (the default here).
layernorm's dinp, residual's da/db and the softmax/cross-entropy dlogits always accumulate. None for a
gradient skips it.

Matmul precision: the Precision enum (FP32, BF16) crosses into C++; the wrappers also take the names
"fp32" and "bf16" (parse_precision).

Shape legend: B batch, T time, C channels, NH heads, V vocabulary, OC output channels, N rows.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import numpy as np

from . import _core

Array = np.ndarray


# How matmul and attention products multiply: Precision.FP32, or Precision.BF16 (operands rounded to
# bfloat16, fp32 accumulation; everything else stays fp32). Names as the command line spells them.
Precision = _core.Precision
MATMUL_PRECISIONS = ("fp32", "bf16")
_BY_NAME = {"fp32": Precision.FP32, "bf16": Precision.BF16}
NATIVE_BF16_PATHS = ("amx", "avx512_bf16")


def parse_precision(value) -> Precision:
    """A Precision from itself or its name ("fp32", "bf16"); ValueError naming the value otherwise."""
    if isinstance(value, Precision):
        return value
    if isinstance(value, str) and value in _BY_NAME:
        return _BY_NAME[value]
    raise ValueError(f"precision must be one of {', '.join(MATMUL_PRECISIONS)} (or an "
                     f"lmlab.ops.Precision), got {value!r}")


def resolve_precision(name) -> Precision:
    """parse_precision, plus "auto": BF16 where this CPU multiplies bf16 natively (AMX or
    AVX512-BF16, ``cpu_info()["bf16_matmul"]``), else FP32."""
    if isinstance(name, str) and name == "auto":
        native = cpu_info()["bf16_matmul"] in NATIVE_BF16_PATHS
        return Precision.BF16 if native else Precision.FP32
    return parse_precision(name)


def precision_name(precision) -> str:
    """ "fp32" or "bf16": the name of a Precision (or of a name), as configs and reports spell it."""
    p = parse_precision(precision)
    return next(name for name, value in _BY_NAME.items() if value == p)


def _flag(name: str, value) -> bool:
    """value if it is True or False; else a one-line TypeError naming it (pybind11's own lists
    every signature over several lines)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _whole(name: str, value) -> int:
    """value if it is an integer (not a bool); else a one-line TypeError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a whole number, got {value!r}")
    if not -2**63 <= value < 2**63:  # the kernels' 64-bit sizes: pybind11 lists every signature
        raise ValueError(f"{name} = {value} is out of range")
    return int(value)


def _name(what: str, value) -> str:
    """value if it is a str; else a one-line TypeError naming it."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a name (str), got {value!r}")
    return value


def matmul_forward(out: Array, inp: Array, weight: Array, bias: Optional[Array] = None,
                   precision: Precision | str = Precision.FP32) -> Array:
    """out (..., OC) = inp (..., C) @ weight (OC, C).T + bias (OC).

    Precision.BF16 rounds inp and weight to bfloat16 (nearest even) and accumulates in fp32, with
    native bf16 instructions where the CPU has them (``cpu_info()["bf16_matmul"]``); arrays stay
    float32.
    """
    _core.matmul_forward(out, inp, weight, bias, precision=parse_precision(precision))
    return out


def matmul_backward(dinp: Optional[Array], dweight: Optional[Array], dbias: Optional[Array],
                    dout: Array, inp: Array, weight: Array,
                    precision: Precision | str = Precision.FP32, accumulate: bool = True) -> None:
    """dinp (+)= dout @ weight; dweight += dout.T @ inp; dbias += dout summed over rows.

    precision as in matmul_forward, for the two products (dbias is always an fp32 sum).
    accumulate=False writes dinp instead of adding to it (no zero-fill needed); the weight and bias
    gradients always accumulate.
    """
    _core.matmul_backward(dinp, dweight, dbias, dout, inp, weight,
                          precision=parse_precision(precision),
                          accumulate=_flag("accumulate", accumulate))


def softmax_forward(probs: Array, logits: Array) -> Array:
    """probs (..., V) = softmax of each row of logits, computed stably (max subtracted)."""
    _core.softmax_forward(probs, logits)
    return probs


def softmax_backward(dlogits: Array, dprobs: Array, probs: Array) -> None:
    """dlogits += probs * (dprobs - sum(dprobs * probs)) per row."""
    _core.softmax_backward(dlogits, dprobs, probs)


def crossentropy_forward(losses: Array, lse: Array, logits: Array, targets: Array) -> Array:
    """losses (...) = -log softmax(logits)[target]; lse (...) caches each row's log-sum-exp."""
    _core.crossentropy_forward(losses, lse, logits, targets)
    return losses


def crossentropy_backward(dlogits: Array, logits: Array, lse: Array, targets: Array,
                          weights: Array) -> None:
    """dlogits += weights[..., None] * (softmax(logits) - onehot(targets)).

    The per-row weight is how every training stage expresses its loss: 1/N for pretraining, 0 on
    prompt tokens for instruct tuning, a sequence's coefficient for DPO and policy gradients.
    """
    _core.crossentropy_backward(dlogits, logits, lse, targets, weights)


def layernorm_forward(out: Array, mean: Array, rstd: Array, inp: Array, weight: Array,
                      bias: Array) -> Array:
    """out = (inp - mean) * rstd * weight + bias over the last dim (eps 1e-5); caches mean, rstd."""
    _core.layernorm_forward(out, mean, rstd, inp, weight, bias)
    return out


def layernorm_backward(dinp: Array, dweight: Optional[Array], dbias: Optional[Array], dout: Array,
                       inp: Array, weight: Array, mean: Array, rstd: Array) -> None:
    """Adds the layernorm gradients to dinp, dweight and dbias (all three accumulate: dinp is the
    residual stream's gradient, which sums every branch)."""
    _core.layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd)


def gelu_forward(out: Array, inp: Array) -> Array:
    """out = GELU(inp), GPT-2's tanh approximation."""
    _core.gelu_forward(out, inp)
    return out


def gelu_backward(dinp: Array, inp: Array, dout: Array, accumulate: bool = True) -> None:
    """dinp (+)= GELU'(inp) * dout: written with accumulate=False, added to with True."""
    _core.gelu_backward(dinp, inp, dout, accumulate=_flag("accumulate", accumulate))


def residual_forward(out: Array, a: Array, b: Array) -> Array:
    """out = a + b."""
    _core.residual_forward(out, a, b)
    return out


def residual_backward(da: Array, db: Array, dout: Array) -> None:
    """da += dout; db += dout."""
    _core.residual_backward(da, db, dout)


def attention_forward(out: Array, stats: Array, qkv: Array, n_head: int,
                      precision: Precision | str = Precision.FP32) -> Array:
    """Causal self-attention: qkv (B, T, 3C) -> out (B, T, C); stats (B, NH, T, 2) caches each row's
    softmax statistics (max score, 1 / sum of exp(score - max)), from which backward recomputes the
    probabilities: no T x T array is kept.

    Precision.BF16 gives the products Q.K^T and P.V bf16 operands (as matmul_forward does); the
    softmax stays fp32.
    """
    _core.attention_forward(out, stats, qkv, _whole("n_head", n_head),
                            precision=parse_precision(precision))
    return out


def attention_backward(dqkv: Array, dout: Array, qkv: Array, stats: Array, n_head: int,
                       precision: Precision | str = Precision.FP32, accumulate: bool = True) -> None:
    """dqkv (B, T, 3C) (+)= gradient of the attention output dout (B, T, C): written with
    accumulate=False, added to with True.

    precision as in attention_forward, for the six products of the backward pass.
    """
    _core.attention_backward(dqkv, dout, qkv, stats, _whole("n_head", n_head),
                             precision=parse_precision(precision),
                             accumulate=_flag("accumulate", accumulate))


def embedding_forward(out: Array, tokens: Array, wte: Array, wpe: Array) -> Array:
    """out (B, T, C) = wte[tokens] + wpe[:T]."""
    _core.embedding_forward(out, tokens, wte, wpe)
    return out


def embedding_backward(dwte: Optional[Array], dwpe: Optional[Array], dout: Array,
                       tokens: Array) -> None:
    """Scatter-adds dout rows into dwte by token id and into dwpe by position."""
    _core.embedding_backward(dwte, dwpe, dout, tokens)


def adamw_update(params: Array, m: Array, v: Array, grads: Array, decay_mask: Optional[Array], *,
                 lr: float, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
                 weight_decay: float = 0.0, grad_scale: float = 1.0, t: int) -> None:
    """One AdamW step (decoupled weight decay, decay_mask of 0/1 per parameter) at step t >= 1.

    Gradients are multiplied by grad_scale first, which is how global-norm clipping is applied
    without another pass over the buffer.
    """
    numbers = {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay,
               "grad_scale": grad_scale}
    for name, value in {**numbers, "t": t}.items():
        # int(t) would run step 1.7 as step 1; float("x") would not say which argument it was.
        kinds = (int, np.integer) if name == "t" else (int, float, np.integer, np.floating)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, kinds):
            what = "a whole number of steps" if name == "t" else "a number"
            raise TypeError(f"adamw_update: {name} must be {what}, got {value!r}")
    if not -2**63 <= t < 2**63:  # past int64 pybind11 would list every signature (t < 1: the core)
        raise ValueError(f"adamw_update: step t must be >= 1 and < 2**63, got {t}")
    _core.adamw_update(params, m, v, grads, decay_mask, *(float(x) for x in numbers.values()),
                       int(t))


def round_bf16(x: Array, out: Optional[Array] = None) -> Array:
    """x rounded to the nearest bfloat16 (ties to even), as float32: exactly what Precision.BF16
    does to a matmul operand. out may be x itself."""
    if out is None:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise TypeError(f"x must be a float32 numpy array, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        out = np.empty_like(x)
    _core.round_bf16(out, x)
    return out


# sum_squares sums x in chunks of this many floats, each on its own, then adds the chunks' sums in
# order, starting from 0.0 (cpp/adamw.cpp): the same total for any thread count.
SUM_SQUARES_CHUNK = 4096


def sum_squares(x: Array) -> float:
    """Sum of squares of a float32 array, accumulated in float64 in a fixed order."""
    return _core.sum_squares(x)


def sum_squares_parts(x: Array) -> list:
    """The chunk sums sum_squares(x) adds up: norm_of_parts of them is global_norm(x), bit for bit;
    a buffer cut on multiples of SUM_SQUARES_CHUNK gives the same chunk sums piece by piece."""
    if not (isinstance(x, np.ndarray) and x.flags.c_contiguous):
        _core.sum_squares(x)  # refuses it, naming what is wrong (not an array, not contiguous)
    flat = x.reshape(-1)      # a view: the chunks are of elements, whatever x's shape
    return [_core.sum_squares(flat[i:i + SUM_SQUARES_CHUNK])
            for i in range(0, flat.size, SUM_SQUARES_CHUNK)]


def norm_of_parts(parts) -> float:
    """The L2 norm from chunk sums (sum_squares_parts), added in order as sum_squares adds them."""
    total = 0.0
    for part in parts:
        total += part
    return float(np.sqrt(total))


def global_norm(x: Array) -> float:
    """The L2 norm of a flat gradient buffer, for clipping."""
    return float(np.sqrt(_core.sum_squares(x)))


# --- runtime -------------------------------------------------------------------------------------

def cpu_info() -> dict:
    """The active kernel variant ('avx512', 'avx2', 'neon', 'portable'), those available, OpenMP, threads;
    bf16_matmul: what runs Precision.BF16 products now ('amx', 'avx512_bf16', or 'emulated' = the
    fp32 kernels on rounded operands); bf16_path: the path chosen for the avx512 variant (the others
    always emulate), among bf16_paths, those this CPU can run (LMLAB_BF16 or set_bf16_path chooses)."""
    return _core.cpu_info()


def set_bf16_path(name: str) -> None:
    """Run bf16 products on a named path ('amx', 'avx512_bf16', 'emulated'); ValueError if this CPU
    cannot. The environment variable LMLAB_BF16 does the same at import."""
    _core.set_bf16_path(_name("bf16 path", name))


@contextlib.contextmanager
def use_bf16_path(name: str) -> Iterator[None]:
    """Run a block with bf16 products on one path, then restore the previous one."""
    previous = _core.cpu_info()["bf16_path"]
    _core.set_bf16_path(_name("bf16 path", name))
    try:
        yield
    finally:
        _core.set_bf16_path(previous)


def set_isa(name: str) -> None:
    """Switch every kernel to another instruction-set variant (ValueError if unavailable here)."""
    _core.set_isa(_name("isa", name))


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run a block on one kernel variant, then restore the previous one."""
    previous = _core.cpu_info()["isa"]
    _core.set_isa(_name("isa", name))
    try:
        yield
    finally:
        _core.set_isa(previous)


def set_num_threads(n: int) -> None:
    """Set the number of OpenMP threads the kernels use: an integer from 1 to 4 per core
    (lmlab.checks.max_threads), as threads= and --threads take; SettingError (a ValueError) else.

    The count belongs to the Python thread that sets it (OpenMP's per-thread setting): kernels
    called from another thread (threading, concurrent.futures) use that thread's own count, which
    starts at the default (OMP_NUM_THREADS, else every core); set it there too."""
    global _thread_count_chosen
    from .checks import Rule, max_threads  # lmlab.checks imports this module
    Rule(int, 1, max_threads()).check("threads", n)
    _core.set_num_threads(int(n))
    _thread_count_chosen = True


# Whether the thread count is one the user chose (OMP_NUM_THREADS, set_num_threads: --threads and
# threads= come through it) rather than lmlab's default, which a training run may adapt to how busy
# the cores are (lmlab.threads).
_thread_count_chosen = "OMP_NUM_THREADS" in os.environ


def thread_count_chosen() -> bool:
    """True once the user has chosen the kernels' thread count (see _thread_count_chosen)."""
    return _thread_count_chosen


def set_default_num_threads(n: int) -> None:
    """Set the thread count as lmlab's own default, not as the user's choice: an MPI rank's share
    of its machine's cores, or the count lmlab.threads adapts a run to."""
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of OpenMP threads the kernels called from this Python thread use."""
    return _core.get_num_threads()


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run a block with n threads, then restore the previous count."""
    global _thread_count_chosen
    previous, chosen = get_num_threads(), _thread_count_chosen
    set_num_threads(n)
    try:
        yield
    finally:
        # Unchecked: the count before may be one OMP_NUM_THREADS set above what callers may ask.
        _core.set_num_threads(previous)
        _thread_count_chosen = chosen
