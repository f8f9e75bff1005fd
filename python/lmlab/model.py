"""The GPT model: configuration, parameters, forward, backward and KV-cache inference.

GPT-2's architecture (Radford et al. 2019, as laid out in nanoGPT's model.py and llm.c's
train_gpt2.c): token + learned position embeddings, pre-LayerNorm blocks of causal multi-head
self-attention and a GELU MLP of width 4C, a final LayerNorm, and an LM head tied to the token
embedding. Every computation runs through the kernels in lmlab.ops; this file only owns memory.

Memory layout
- Parameters live in ONE flat float32 buffer (`params`) and gradients in another (`grads`), so
  AdamW, clipping and checkpoints each work on one array. `named_parameters()` / `named_grads()`
  are views with GPT-2's names (wte and wpe without ".weight"); weights are stored (out, in)
  like torch.nn.Linear, so `y = x @ W.T + b`, as in nanoGPT's state dict minus its
  "transformer." prefix and the tied lm_head (Hugging Face GPT-2 files store (in, out) Conv1D
  weights, which need a transpose).
- Activations live in one arena allocated for a (B, T) and kept while later calls fit in it; the
  per-(B, T) views are rebuilt only when B or T change. Per layer the forward keeps only what the
  backward reads (residual streams, LayerNorm outputs and statistics, qkv, attention's softmax
  statistics per row (its backward recomputes the probabilities, so no T x T array is kept), the
  attention output, the MLP's GELU input and output); the projections' outputs go to one shared
  buffer (only their sum with the residual is needed), and the gradient buffers are shared by all
  layers: about 16C + 2 NH floats per token per layer in all. (Recomputing the GELU output
  in the backward instead would save 4C per token per layer for one more GELU pass per layer; on
  the 6x384, T=256 config that was 1.5% of the step against 150 MiB, and speed won.)

Matmul precision: `GPT.matmul_precision` ("fp32" or "bf16") is handed to every matmul and
attention kernel call (forward, backward, KV-cached forward); with "bf16" the operands of their
products are rounded to bfloat16 and accumulated in fp32, while parameters, gradients and every
other op stay fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from . import ops


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 64   # longest context: rows of the position embedding wpe
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128      # C, the model width; must be divisible by n_head

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head "
                             f"({self.n_head})")


def _parameter_shapes(cfg: GPTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The size table of the flat parameter buffer, in storage order."""
    V, C, maxT = cfg.vocab_size, cfg.n_embd, cfg.block_size
    shapes = [("wte", (V, C)), ("wpe", (maxT, C))]
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (C,)), (p + "ln_1.bias", (C,)),
            (p + "attn.c_attn.weight", (3 * C, C)), (p + "attn.c_attn.bias", (3 * C,)),
            (p + "attn.c_proj.weight", (C, C)), (p + "attn.c_proj.bias", (C,)),
            (p + "ln_2.weight", (C,)), (p + "ln_2.bias", (C,)),
            (p + "mlp.c_fc.weight", (4 * C, C)), (p + "mlp.c_fc.bias", (4 * C,)),
            (p + "mlp.c_proj.weight", (C, 4 * C)), (p + "mlp.c_proj.bias", (C,)),
        ]
    shapes += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    return shapes


def _views(flat: np.ndarray, shapes: Iterable[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    views, offset = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        views[name] = flat[offset:offset + n].reshape(shape)
        offset += n
    return views


class _Layer:
    """One block's parameters (or gradients): attribute access instead of string lookups."""
    __slots__ = ("ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b", "fcw",
                 "fcb", "fcprojw", "fcprojb")
    _suffixes = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                 "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                 "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")

    def __init__(self, named: dict, i: int) -> None:
        for slot, suffix in zip(self.__slots__, self._suffixes):
            setattr(self, slot, named[f"h.{i}.{suffix}"])


def _activation_layout(cfg: GPTConfig, B: int, T: int) -> list[tuple[str, tuple[int, ...]]]:
    """The size table of the activation arena for one (B, T)."""
    L, C, NH, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size
    return [
        ("res", (L + 1, B, T, C)),      # residual stream entering each layer (and leaving the last)
        ("ln1", (L, B, T, C)), ("ln1_mean", (L, B, T)), ("ln1_rstd", (L, B, T)),
        ("qkv", (L, B, T, 3 * C)),
        ("att_stats", (L, B, NH, T, 2)),  # attention's softmax max and 1/sum per row
        ("atty", (L, B, T, C)),         # attention output, before c_proj
        ("res2", (L, B, T, C)),         # residual stream after attention
        ("ln2", (L, B, T, C)), ("ln2_mean", (L, B, T)), ("ln2_rstd", (L, B, T)),
        ("fch", (L, B, T, 4 * C)),      # MLP pre-activation (GELU input)
        ("gelu", (L, B, T, 4 * C)),     # GELU output (c_proj's input)
        ("proj", (B, T, C)),            # shared: a c_proj output before the residual add
        ("lnf", (B, T, C)), ("lnf_mean", (B, T)), ("lnf_rstd", (B, T)),
        ("logits", (B, T, V)), ("losses", (B, T)), ("lse", (B, T)),
    ]


class _Activations:
    """Views of the activation arena for one (B, T); see the module docstring for what is kept."""

    def __init__(self, arena: np.ndarray, cfg: GPTConfig, B: int, T: int) -> None:
        self.B, self.T = B, T
        for name, view in _views(arena, _activation_layout(cfg, B, T)).items():
            setattr(self, name, view)

    @staticmethod
    def size(cfg: GPTConfig, B: int, T: int) -> int:
        return sum(math.prod(shape) for _, shape in _activation_layout(cfg, B, T))


class _GradActivations:
    """Gradient buffers for one (B, T), shared by every layer."""

    def __init__(self, arena: np.ndarray, cfg: GPTConfig, B: int, T: int) -> None:
        C, V = cfg.n_embd, cfg.vocab_size
        BT = B * T
        self.dres = arena[:BT * C].reshape(B, T, C)                    # the residual stream's gradient
        self.dx = arena[BT * C:2 * BT * C].reshape(B, T, C)            # input gradient of a C-wide op
        big_a = arena[2 * BT * C:6 * BT * C]
        big_b = arena[6 * BT * C:10 * BT * C]
        self.dgelu = big_a.reshape(B, T, 4 * C)                         # d(GELU output)
        self.dfch = big_b.reshape(B, T, 4 * C)                          # d(MLP pre-activation)
        self.dqkv = big_b[:3 * BT * C].reshape(B, T, 3 * C)
        self.dln = big_a[:BT * C].reshape(B, T, C)                     # d(LayerNorm output)
        self.dlogits = arena[10 * BT * C:10 * BT * C + BT * V].reshape(B, T, V)

    @staticmethod
    def size(cfg: GPTConfig, B: int, T: int) -> int:
        return B * T * (10 * cfg.n_embd + cfg.vocab_size)


class KVCache:
    """Per-layer keys and values of the tokens seen so far, for incremental decoding.

    k, v: (n_layer, n_head, block_size, head_size); `length` positions are filled.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        HS = cfg.n_embd // cfg.n_head
        self.k = np.zeros((cfg.n_layer, cfg.n_head, cfg.block_size, HS), np.float32)
        self.v = np.zeros_like(self.k)
        self.length = 0

    def reset(self) -> None:
        self.length = 0


class GPT:
    """A GPT-2 language model whose parameters and gradients each live in one flat buffer."""

    def __init__(self, config: GPTConfig, seed: int = 0, matmul_precision: str = "fp32") -> None:
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.matmul_precision = matmul_precision
        shapes = _parameter_shapes(cfg)
        n = sum(math.prod(s) for _, s in shapes)
        self.params = np.zeros(n, np.float32)
        self.grads = np.zeros(n, np.float32)
        self._named = _views(self.params, shapes)
        self._named_grads = _views(self.grads, shapes)
        # nanoGPT's rule: decay every parameter with ndim >= 2 (all matmul weights and both
        # embeddings), never biases or LayerNorm gains.
        self.decay_mask = np.zeros(n, np.float32)
        for name, view in _views(self.decay_mask, shapes).items():
            if view.ndim >= 2:
                view[...] = 1.0
        # Name prefixes (whole dotted components: "h.0", "h.1.attn", "wte") whose gradients
        # backward skips; backward also stops below the lowest trainable layer.
        self.frozen: set[str] = set()
        self._init_weights(seed)

        self._layers = [_Layer(self._named, i) for i in range(cfg.n_layer)]
        self._arena: Optional[np.ndarray] = None
        self._acts: Optional[_Activations] = None
        self._grad_arena: Optional[np.ndarray] = None
        self._gacts: Optional[_GradActivations] = None
        self._tokens: Optional[np.ndarray] = None
        self._targets: Optional[np.ndarray] = None
        self._has_targets = False
        self._grad_plan_key = None
        self._grad_plan = None

    # --- matmul precision --------------------------------------------------------------------------

    @property
    def matmul_precision(self) -> str:
        """What every matmul of forward, backward and forward_cached computes in.

        "fp32" (the default), or "bf16": both operands of each matmul rounded to bfloat16, products
        accumulated in fp32 (on the AMX unit where the CPU has one). Parameters, gradients and
        every other op stay fp32 either way (mixed precision).
        """
        return self._precision

    @matmul_precision.setter
    def matmul_precision(self, value: str) -> None:
        self._precision = check_precision(value, "matmul_precision")

    # --- parameters ------------------------------------------------------------------------------

    def _init_weights(self, seed: int) -> None:
        """GPT-2 init: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 n_layer)."""
        rng = np.random.default_rng(seed)
        proj_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, view in self._named.items():
            if view.ndim >= 2:
                std = proj_std if name.endswith("c_proj.weight") else 0.02
                view[...] = rng.standard_normal(view.shape, dtype=np.float32) * np.float32(std)
            elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
                view[...] = 1.0
            else:
                view[...] = 0.0

    def named_parameters(self) -> dict[str, np.ndarray]:
        """Views into `params` by GPT-2 name; writing a view writes the model."""
        return dict(self._named)

    def named_grads(self) -> dict[str, np.ndarray]:
        """Views into `grads`, same names and shapes as named_parameters()."""
        return dict(self._named_grads)

    def num_params(self) -> int:
        """Number of parameters (the tied LM head counted once, as part of wte)."""
        return int(self.params.size)

    def zero_grad(self) -> None:
        self.grads.fill(0.0)

    # --- activations -------------------------------------------------------------------------------

    def _activations(self, B: int, T: int) -> _Activations:
        acts = self._acts
        if acts is not None and acts.B == B and acts.T == T:
            return acts
        need = _Activations.size(self.config, B, T)
        if self._arena is None or self._arena.size < need:
            self._acts = None
            self._arena = None          # free the old arena before taking the new one
            self._arena = np.empty(need, np.float32)
        self._acts = _Activations(self._arena, self.config, B, T)
        return self._acts

    def _grad_activations(self, B: int, T: int) -> _GradActivations:
        g = self._gacts
        if g is not None and g.dres.shape[:2] == (B, T):
            return g
        need = _GradActivations.size(self.config, B, T)
        if self._grad_arena is None or self._grad_arena.size < need:
            self._gacts = None
            self._grad_arena = None
            self._grad_arena = np.empty(need, np.float32)
        self._gacts = _GradActivations(self._grad_arena, self.config, B, T)
        return self._gacts

    def _check_tokens(self, tokens, name: str) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
        if arr.ndim != 2:
            raise ValueError(f"{name} must be 2-D (B, T), got shape {arr.shape}")
        B, T = arr.shape
        if B < 1 or T < 1:
            raise ValueError(f"{name} must be non-empty (B, T), got shape {arr.shape}")
        if T > self.config.block_size:
            raise ValueError(f"{name} has T = {T} positions but block_size is "
                             f"{self.config.block_size}; crop the context to the last block_size")
        V = self.config.vocab_size
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} holds token id {bad}; ids must lie in [0, {V})")
        return arr

    # --- forward and backward ----------------------------------------------------------------------

    def forward(self, tokens, targets=None):
        """Logits (B, T, V) and, with targets, per-token losses (B, T) (else None).

        Both are views of internal buffers, valid until the next forward.
        """
        tokens = self._check_tokens(tokens, "tokens")
        B, T = tokens.shape
        if targets is not None:
            targets = self._check_tokens(targets, "targets")
            if targets.shape != tokens.shape:
                raise ValueError(f"targets must have the shape of tokens {tokens.shape}, got "
                                 f"{targets.shape}")
        a = self._activations(B, T)
        # Own copies: the backward needs them and the caller may reuse its arrays.
        if self._tokens is None or self._tokens.shape != (B, T):
            self._tokens = np.empty((B, T), np.int32)
            self._targets = np.empty((B, T), np.int32)
        self._tokens[...] = tokens
        self._has_targets = targets is not None
        if targets is not None:
            self._targets[...] = targets

        cfg, P, prec = self.config, self._named, self._precision
        NH = cfg.n_head
        ops.embedding_forward(a.res[0], self._tokens, P["wte"], P["wpe"])
        for l, w in enumerate(self._layers):
            ops.layernorm_forward(a.ln1[l], a.ln1_mean[l], a.ln1_rstd[l], a.res[l], w.ln1w, w.ln1b)
            ops.matmul_forward(a.qkv[l], a.ln1[l], w.qkvw, w.qkvb, precision=prec)
            ops.attention_forward(a.atty[l], a.att_stats[l], a.qkv[l], NH, precision=prec)
            ops.matmul_forward(a.proj, a.atty[l], w.attprojw, w.attprojb, precision=prec)
            ops.residual_forward(a.res2[l], a.res[l], a.proj)
            ops.layernorm_forward(a.ln2[l], a.ln2_mean[l], a.ln2_rstd[l], a.res2[l], w.ln2w, w.ln2b)
            ops.matmul_forward(a.fch[l], a.ln2[l], w.fcw, w.fcb, precision=prec)
            ops.gelu_forward(a.gelu[l], a.fch[l])
            ops.matmul_forward(a.proj, a.gelu[l], w.fcprojw, w.fcprojb, precision=prec)
            ops.residual_forward(a.res[l + 1], a.res2[l], a.proj)
        ops.layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, a.res[cfg.n_layer], P["ln_f.weight"],
                              P["ln_f.bias"])
        ops.matmul_forward(a.logits, a.lnf, P["wte"], None, precision=prec)   # tied LM head
        if targets is None:
            return a.logits, None
        ops.crossentropy_forward(a.losses, a.lse, a.logits, self._targets)
        return a.logits, a.losses

    def _gradient_plan(self):
        """Per-parameter gradient views, None where frozen, and the lowest layer to backprop into."""
        key = frozenset(self.frozen)
        if key == self._grad_plan_key:
            return self._grad_plan
        names = list(self._named_grads)
        for prefix in key:
            if not isinstance(prefix, str) or not any(frozen_by(n, prefix) for n in names):
                raise ValueError(f"frozen prefix {prefix!r} matches no parameter name")
        G = {n: (None if any(frozen_by(n, p) for p in key) else g)
             for n, g in self._named_grads.items()}
        layers = []
        for i in range(self.config.n_layer):
            lg = _Layer.__new__(_Layer)
            for slot, suffix in zip(_Layer.__slots__, _Layer._suffixes):
                setattr(lg, slot, G[f"h.{i}.{suffix}"])
            layers.append(lg)
        # Below the lowest layer holding a trainable parameter nothing needs a gradient.
        lowest = self.config.n_layer
        if G["wte"] is not None or G["wpe"] is not None:
            lowest = -1
        else:
            for i in range(self.config.n_layer):
                if any(getattr(layers[i], s) is not None for s in _Layer.__slots__):
                    lowest = i
                    break
        self._grad_plan_key, self._grad_plan = key, (G, layers, lowest)
        return self._grad_plan

    def backward(self, weights) -> None:
        """Accumulate d(sum(weights * losses)) / d(params) into grads.

        weights (B, T) float32 (1/N everywhere for a mean loss, 0 on tokens that do not count).
        Needs the preceding forward to have been given targets.
        """
        a = self._acts
        if a is None or not self._has_targets:
            raise ValueError("backward needs a preceding forward(tokens, targets) with targets")
        B, T = a.B, a.T
        w_arr = np.asarray(weights)
        if w_arr.shape != (B, T):
            raise ValueError(f"weights must have shape (B, T) = {(B, T)} like the last forward, "
                             f"got {w_arr.shape}")
        if w_arr.dtype != np.float32 or not w_arr.flags.c_contiguous:
            w_arr = np.ascontiguousarray(w_arr, dtype=np.float32)
        G, glayers, lowest = self._gradient_plan()
        g = self._grad_activations(B, T)
        cfg, P, NH = self.config, self._named, self.config.n_head
        L, prec = cfg.n_layer, self._precision

        g.dlogits.fill(0.0)
        ops.crossentropy_backward(g.dlogits, a.logits, a.lse, self._targets, w_arr)
        ops.matmul_backward(g.dx, G["wte"], None, g.dlogits, a.lnf, P["wte"], precision=prec,
                            accumulate=False)
        g.dres.fill(0.0)
        ops.layernorm_backward(g.dres, G["ln_f.weight"], G["ln_f.bias"], g.dx, a.res[L],
                               P["ln_f.weight"], a.lnf_mean, a.lnf_rstd)
        for l in range(L - 1, max(lowest, 0) - 1, -1):
            w, gw = self._layers[l], glayers[l]
            # MLP: res[l+1] = res2 + c_proj(gelu(c_fc(ln_2(res2)))); dres is d(res[l+1]) here.
            # Input gradients are written, not added (accumulate=False): no zero-fill passes.
            ops.matmul_backward(g.dgelu, gw.fcprojw, gw.fcprojb, g.dres, a.gelu[l], w.fcprojw,
                                precision=prec, accumulate=False)
            ops.gelu_backward(g.dfch, a.fch[l], g.dgelu, accumulate=False)
            ops.matmul_backward(g.dln, gw.fcw, gw.fcb, g.dfch, a.ln2[l], w.fcw,
                                precision=prec, accumulate=False)
            ops.layernorm_backward(g.dres, gw.ln2w, gw.ln2b, g.dln, a.res2[l], w.ln2w,
                                   a.ln2_mean[l], a.ln2_rstd[l])
            # Attention: res2 = res[l] + c_proj(attn(c_attn(ln_1(res[l])))); dres is d(res2).
            ops.matmul_backward(g.dx, gw.attprojw, gw.attprojb, g.dres, a.atty[l], w.attprojw,
                                precision=prec, accumulate=False)
            ops.attention_backward(g.dqkv, g.dx, a.qkv[l], a.att_stats[l], NH, precision=prec,
                                   accumulate=False)
            # d(res[l]) is needed only if something below this layer is trainable.
            need_below = lowest < l
            need_dln = need_below or gw.ln1w is not None or gw.ln1b is not None
            ops.matmul_backward(g.dln if need_dln else None, gw.qkvw, gw.qkvb, g.dqkv, a.ln1[l],
                                w.qkvw, precision=prec, accumulate=False)
            if need_dln:
                ops.layernorm_backward(g.dres, gw.ln1w, gw.ln1b, g.dln, a.res[l], w.ln1w,
                                       a.ln1_mean[l], a.ln1_rstd[l])
        if lowest < 0:
            ops.embedding_backward(G["wte"], G["wpe"], g.dres, self._tokens)

    # --- inference with a KV cache -------------------------------------------------------------------

    def new_cache(self) -> KVCache:
        return KVCache(self.config)

    def forward_cached(self, cache: KVCache, new_tokens) -> np.ndarray:
        """Feed new_tokens (1-D) at positions cache.length.. and return the last position's logits (V,).

        Keys and values of the new tokens are appended to the cache, so decoding one token costs
        O(T) attention instead of a full O(T^2) forward. A fill from an empty cache runs the same
        kernels on the same shapes as forward(), so its logits are bitwise those of forward().
        Positions are absolute (learned wpe): once the cache holds block_size tokens the caller
        must reset it and refill with the cropped context (see lmlab.sample.generate).

        A one-token step runs its kernels on one thread: each is a single row, too little work to
        pay for waking the thread team (on a busy machine a team barrier can cost a whole
        scheduler time slice, which made two-thread decoding ~20x slower there).
        """
        toks = np.asarray(new_tokens)
        if toks.ndim != 1:
            raise ValueError(f"new_tokens must be 1-D, got shape {toks.shape}")
        toks = self._check_tokens(toks[None, :], "new_tokens")[0].astype(np.int32)
        if toks.size + cache.length > self.config.block_size:
            raise ValueError(f"the cache holds {cache.length} positions; {toks.size} more would "
                             f"exceed block_size {self.config.block_size}")
        if toks.size > 1:
            return self._forward_cached(cache, toks)
        with ops.num_threads(1):
            return self._forward_cached(cache, toks)

    def _forward_cached(self, cache: KVCache, toks: np.ndarray) -> np.ndarray:
        cfg, P, prec = self.config, self._named, self._precision
        n, p0 = toks.size, cache.length
        C, NH = cfg.n_embd, cfg.n_head
        HS = C // NH
        x = (P["wte"][toks] + P["wpe"][p0:p0 + n])[None]                    # (1, n, C)
        ln = np.empty_like(x)
        mean = np.empty((1, n), np.float32)
        rstd = np.empty((1, n), np.float32)
        qkv = np.empty((1, n, 3 * C), np.float32)
        y = np.empty_like(x)
        proj = np.empty_like(x)
        fch = np.empty((1, n, 4 * C), np.float32)
        gel = np.empty_like(fch)
        att_stats = np.empty((1, NH, n, 2), np.float32) if p0 == 0 else None
        for l, w in enumerate(self._layers):
            ops.layernorm_forward(ln, mean, rstd, x, w.ln1w, w.ln1b)
            ops.matmul_forward(qkv, ln, w.qkvw, w.qkvb, precision=prec)
            heads = qkv[0].reshape(n, 3, NH, HS)
            cache.k[l, :, p0:p0 + n] = heads[:, 1].transpose(1, 0, 2)
            cache.v[l, :, p0:p0 + n] = heads[:, 2].transpose(1, 0, 2)
            if p0 == 0:
                ops.attention_forward(y, att_stats, qkv, NH, precision=prec)
            else:
                y[0] = _cached_attention(heads[:, 0], cache.k[l, :, :p0 + n],
                                         cache.v[l, :, :p0 + n], p0, prec)
            ops.matmul_forward(proj, y, w.attprojw, w.attprojb, precision=prec)
            x2 = np.empty_like(x)
            ops.residual_forward(x2, x, proj)
            ops.layernorm_forward(ln, mean, rstd, x2, w.ln2w, w.ln2b)
            ops.matmul_forward(fch, ln, w.fcw, w.fcb, precision=prec)
            ops.gelu_forward(gel, fch)
            ops.matmul_forward(proj, gel, w.fcprojw, w.fcprojb, precision=prec)
            x = np.empty_like(x2)
            ops.residual_forward(x, x2, proj)
        cache.length = p0 + n
        ops.layernorm_forward(ln, mean, rstd, x, P["ln_f.weight"], P["ln_f.bias"])
        logits = np.empty((1, n, cfg.vocab_size), np.float32)
        ops.matmul_forward(logits, ln, P["wte"], None, precision=prec)
        return logits[0, -1]

    def generate(self, prompt_ids, max_new_tokens: int, **kwargs) -> np.ndarray:
        """Sample continuation ids; see lmlab.sample.generate for the options."""
        from .sample import generate
        return generate(self, prompt_ids, max_new_tokens, **kwargs)


def check_precision(value, name: str = "precision") -> str:
    """value if it names a matmul precision (ops.MATMUL_PRECISIONS), else a ValueError."""
    if not isinstance(value, str) or value not in ops.MATMUL_PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(ops.MATMUL_PRECISIONS)}, "
                         f"got {value!r}")
    return value


def frozen_by(name: str, prefix: str) -> bool:
    """Whether a frozen prefix covers a parameter: whole dotted components ("h.1" is not "h.10")."""
    return name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def _cached_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, p0: int,
                      precision: str = "fp32") -> np.ndarray:
    """Causal attention of n new queries q (n, NH, HS) at positions p0.. over k, v (NH, p0+n, HS).

    Returns (n, NH*HS). Computed in float32 like the kernel, max subtracted before exp; in bf16
    the products' operands are rounded as the kernel rounds them (the scale folded into q first).
    """
    n, NH, HS = q.shape
    scale = np.float32(1.0 / math.sqrt(HS))
    r = ops.round_bf16 if precision == "bf16" else (lambda x: x)
    qh = q.transpose(1, 0, 2)                                       # (NH, n, HS)
    if precision == "bf16":
        scores = np.matmul(r(np.ascontiguousarray(qh * scale)), r(np.ascontiguousarray(k)).transpose(0, 2, 1))
    else:
        scores = np.matmul(qh, k.transpose(0, 2, 1)) * scale       # (NH, n, p0+n)
    if n > 1:
        future = np.arange(p0 + n)[None, :] > (p0 + np.arange(n))[:, None]
        scores[:, future] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = np.matmul(r(scores), r(np.ascontiguousarray(v)))          # (NH, n, HS)
    return out.transpose(1, 0, 2).reshape(n, NH * HS)
