"""The GPT model: configuration, parameters, forward (with an optional KV cache) and backward.

GPT-2's architecture (Radford et al. 2019, as laid out in nanoGPT's model.py and llm.c's
train_gpt2.c): token + learned position embeddings, pre-LayerNorm blocks of causal multi-head
self-attention and a GELU MLP of width 4C, a final LayerNorm, and an LM head tied to the token
embedding. Every computation is one kernel call (lmlab.ops); this file owns memory, in three
arenas each laid out by one named table (llm.c's names): `params` and `grads` (parameter_layout;
views by GPT-2 name, weights stored (out, in) like torch.nn.Linear, so y = x @ W.T + b), `acts`
(what backward reads, per (B, T)) and `grads_acts` (activation gradients shared by all layers).

Gradient rule (cpp/kernels.h): parameter gradients accumulate and zero_grad() clears them once per
optimiser step; the input gradients of matmul, GELU and attention are written (accumulate=False),
so those buffers are never zero-filled; LayerNorm adds its input gradient into the residual
stream's (that add is the residual connection's backward) and cross-entropy adds into dlogits,
two buffers cleared once per backward. docs/DESIGN.md, "The model", says more.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from . import checks, ops
from .kvcache import KVCache

# The most parameters a GPT may have: far above any model a CPU trains, far below what would exhaust
# memory (float32 parameters, gradients and decay mask: 24 GiB). A run's checkpoint holds no more
# (lmlab.checkpoint reads this bound), so a larger model could be neither allocated nor loaded.
MAX_PARAMS = 1 << 31


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


# --- layout tables: (name, shape), in storage order ---------------------------------------------------

# One block's parameters: the attribute _Layer gives each, its GPT-2 name after "h.{i}.", and its
# shape as multiples of C (rows, columns).
_LAYER_PARAMETERS = (
    ("ln1w", "ln_1.weight", (1,)), ("ln1b", "ln_1.bias", (1,)),
    ("qkvw", "attn.c_attn.weight", (3, 1)), ("qkvb", "attn.c_attn.bias", (3,)),
    ("attprojw", "attn.c_proj.weight", (1, 1)), ("attprojb", "attn.c_proj.bias", (1,)),
    ("ln2w", "ln_2.weight", (1,)), ("ln2b", "ln_2.bias", (1,)),
    ("fcw", "mlp.c_fc.weight", (4, 1)), ("fcb", "mlp.c_fc.bias", (4,)),
    ("fcprojw", "mlp.c_proj.weight", (1, 4)), ("fcprojb", "mlp.c_proj.bias", (1,)),
)


def parameter_count(cfg: GPTConfig) -> int:
    """The number of parameters of parameter_layout(cfg), from the sizes alone (no table is built,
    so it answers at once for any config): wte, wpe, 12C^2 + 13C per layer, ln_f."""
    V, C, maxT, L = cfg.vocab_size, cfg.n_embd, cfg.block_size, cfg.n_layer
    return V * C + maxT * C + L * (12 * C * C + 13 * C) + 2 * C


def parameter_layout(cfg: GPTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The table of the flat parameter (and gradient) buffer."""
    V, C, maxT = cfg.vocab_size, cfg.n_embd, cfg.block_size
    layout = [("wte", (V, C)), ("wpe", (maxT, C))]
    for i in range(cfg.n_layer):
        layout += [(f"h.{i}.{suffix}", tuple(m * C for m in shape))
                   for _, suffix, shape in _LAYER_PARAMETERS]
    layout += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    return layout


def _activation_layout(cfg: GPTConfig, B: int, T: int) -> list[tuple[str, tuple[int, ...]]]:
    """The table of the activation arena for one (B, T)."""
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


def _grad_activation_layout(cfg: GPTConfig, B: int,
                            T: int) -> list[tuple[str, tuple[int, ...], Optional[str]]]:
    """The table of the activation-gradient arena: (name, shape, the earlier buffer whose memory it
    reuses, or None). A buffer reuses one that backward no longer reads when it is written."""
    C, V = cfg.n_embd, cfg.vocab_size
    return [
        ("dres", (B, T, C), None),       # the residual stream's gradient, carried down the layers
        ("dx", (B, T, C), None),         # d(ln_f output), then d(attention output) in each layer
        ("dgelu", (B, T, 4 * C), None),  # d(GELU output)
        ("dln", (B, T, C), "dgelu"),     # d(LayerNorm output): written after dgelu's last read
        ("dfch", (B, T, 4 * C), None),   # d(MLP pre-activation)
        ("dqkv", (B, T, 3 * C), "dfch"),  # d(qkv): written after dfch's last read
        ("dlogits", (B, T, V), None),
    ]


def _spans(layout) -> dict[str, tuple[int, int]]:
    """Name -> [start, stop) of each entry, one after another; an entry naming an earlier one as
    its third element reuses that one's memory."""
    spans, offset = {}, 0
    for name, shape, *shares in layout:
        start = spans[shares[0]][0] if shares and shares[0] else offset
        spans[name] = (start, start + math.prod(shape))
        offset = max(offset, spans[name][1])
    return spans


def _views(flat: np.ndarray, layout) -> dict[str, np.ndarray]:
    return {name: flat[start:stop].reshape(shape)
            for (name, shape, *_), (start, stop) in zip(layout, _spans(layout).values())}


class _Layer:
    """One block's parameters (or gradients, None where frozen): attributes instead of lookups."""
    __slots__ = tuple(attr for attr, _, _ in _LAYER_PARAMETERS)

    def __init__(self, named: dict, i: int) -> None:
        for attr, suffix, _ in _LAYER_PARAMETERS:
            setattr(self, attr, named[f"h.{i}.{suffix}"])


class _Buffers:
    """Views of an arena for one (B, T), one attribute per entry of its layout table."""

    def __init__(self, arena: np.ndarray, layout, B: int, T: int) -> None:
        self.B, self.T = B, T
        for name, view in _views(arena, layout).items():
            setattr(self, name, view)


def check_parameter_count(config: GPTConfig) -> None:
    """Refuse (ValueError) a config of more than MAX_PARAMS parameters."""
    n_params = parameter_count(config)
    if n_params > MAX_PARAMS:
        raise ValueError(f"the config describes {n_params:,} parameters ({config}), more than "
                         f"the {MAX_PARAMS:,} an lmlab GPT may have")


class GPT:
    """A GPT-2 language model whose parameters and gradients each live in one flat buffer."""

    def __init__(self, config: GPTConfig, seed: int = 0, matmul_precision="fp32") -> None:
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        checks.check("seed", seed)  # numpy's own refusal would not name the seed
        # Before any table or buffer: a config of terabytes (or of 10**12 layers, whose layout
        # table alone would never finish) is refused, not allocated.
        check_parameter_count(config)
        self.config = cfg = config
        self.matmul_precision = matmul_precision
        layout = parameter_layout(cfg)
        self._offsets = _spans(layout)
        n = self._offsets["ln_f.bias"][1]
        self.params = np.zeros(n, np.float32)
        self.grads = np.zeros(n, np.float32)
        self._named = _views(self.params, layout)
        self._named_grads = _views(self.grads, layout)
        # nanoGPT's rule: decay every parameter with ndim >= 2 (all matmul weights and both
        # embeddings), never biases or LayerNorm gains.
        self.decay_mask = np.zeros(n, np.float32)
        for name, view in _views(self.decay_mask, layout).items():
            if view.ndim >= 2:
                view[...] = 1.0
        self._frozen: frozenset = frozenset()
        self._init_weights(seed)

        self._layers = [_Layer(self._named, i) for i in range(cfg.n_layer)]
        self._acts: Optional[_Buffers] = None
        self._acts_arena: Optional[np.ndarray] = None
        self._grads_acts: Optional[_Buffers] = None
        self._grads_acts_arena: Optional[np.ndarray] = None
        self._tokens: Optional[np.ndarray] = None
        self._targets: Optional[np.ndarray] = None
        self._has_targets = False
        self._grad_plan = None

    # --- matmul precision --------------------------------------------------------------------------

    @property
    def matmul_precision(self) -> str:
        """What every matmul and attention product computes in: "fp32" (the default) or "bf16"
        (operands rounded to bfloat16, fp32 accumulation; everything else stays fp32). Set it by
        name or as an ops.Precision; the kernels get the enum, parsed once here."""
        return ops.precision_name(self._precision)

    @matmul_precision.setter
    def matmul_precision(self, value) -> None:
        try:
            self._precision = ops.parse_precision(value)
        except ValueError:
            raise ValueError(f"matmul_precision must be one of {', '.join(ops.MATMUL_PRECISIONS)} "
                             f"(or an lmlab.ops.Precision), got {value!r}") from None

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

    def parameter_offsets(self) -> dict[str, tuple[int, int]]:
        """Name -> [start, stop) of that parameter in `params` (and its gradient in `grads`)."""
        return dict(self._offsets)

    def num_params(self) -> int:
        """Number of parameters (the tied LM head counted once, as part of wte)."""
        return int(self.params.size)

    def zero_grad(self) -> None:
        self.grads.fill(0.0)

    # --- frozen parameters ---------------------------------------------------------------------------

    @property
    def frozen(self) -> frozenset:
        """The frozen name prefixes (see freeze)."""
        return self._frozen

    def freeze(self, prefixes: Iterable[str] = ()) -> None:
        """Freeze the parameters under these name prefixes (and unfreeze every other one).

        A prefix is whole dotted components: "h.0", "h.1.attn", "wte" ("h.1" is not "h.10").
        ValueError for a prefix that names no parameter; TypeError for one string, which would be
        taken character by character (freeze("h") froze every layer as the prefix "h").
        """
        if isinstance(prefixes, str):
            raise TypeError(f"prefixes must be a collection of name prefixes, e.g. [{prefixes!r}], "
                            f"not one string (its characters would each be a prefix)")
        if not isinstance(prefixes, Iterable):   # freeze(None): "'NoneType' is not iterable"
            raise TypeError(f"prefixes must be a collection of name prefixes, e.g. ['h.0'], got "
                            f"{type(prefixes).__name__}")
        prefixes = frozenset(prefixes)
        for prefix in prefixes:
            if not isinstance(prefix, str):
                raise TypeError(f"frozen prefixes must be str (parameter name prefixes such as "
                                f"'h.0'), got {prefix!r}")
            if not any(frozen_by(n, prefix) for n in self._named):
                raise ValueError(f"frozen prefix {prefix!r} matches no parameter name")
        self._frozen = prefixes
        self._grad_plan = None

    def trainable_ranges(self) -> list[tuple[int, int]]:
        """The contiguous [start, stop) spans of `params` holding parameters that are not frozen."""
        spans: list[tuple[int, int]] = []
        for name, (start, stop) in self._offsets.items():      # in storage order
            if any(frozen_by(name, p) for p in self._frozen):
                continue
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], stop)
            else:
                spans.append((start, stop))
        if not spans:
            raise ValueError(f"every parameter is frozen by {sorted(self._frozen)}; nothing would "
                             f"train")
        return spans

    def _gradient_plan(self):
        """Per-parameter gradient views (None where frozen), per-layer ones, and the lowest layer
        backward must reach (-1: down to the embeddings)."""
        if self._grad_plan is not None:
            return self._grad_plan
        grads = {n: (None if any(frozen_by(n, p) for p in self._frozen) else g)
                 for n, g in self._named_grads.items()}
        layer_grads = [_Layer(grads, i) for i in range(self.config.n_layer)]
        # Below the lowest layer holding a trainable parameter nothing needs a gradient.
        trains = [any(getattr(layer, attr) is not None for attr in _Layer.__slots__)
                  for layer in layer_grads]
        lowest = -1 if grads["wte"] is not None or grads["wpe"] is not None else \
            (trains + [True]).index(True)
        self._grad_plan = grads, layer_grads, lowest
        return self._grad_plan

    # --- activations -------------------------------------------------------------------------------

    def _buffers(self, name: str, layout_of, B: int, T: int) -> _Buffers:
        """The views self.<name> for (B, T), in the arena self.<name>_arena, grown when too small."""
        views = getattr(self, name)
        if views is not None and views.B == B and views.T == T:
            return views
        layout = layout_of(self.config, B, T)
        need = max(stop for _, stop in _spans(layout).values())
        arena = getattr(self, name + "_arena")
        if arena is None or arena.size < need:
            # Free the old arena (and the views into it) before taking the new one.
            setattr(self, name, None)
            setattr(self, name + "_arena", None)
            arena = None
            arena = np.empty(need, np.float32)
            setattr(self, name + "_arena", arena)
        views = _Buffers(arena, layout, B, T)
        setattr(self, name, views)
        return views

    def _copy_tokens(self, tokens, name: str, out: Optional[np.ndarray]) -> np.ndarray:
        """tokens checked (2-D, integer, ids in [0, V)) and copied into out (int32), one pass each."""
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
        # Seen as unsigned, a negative id is huge: one max() finds ids outside [0, V) either way.
        if int(arr.view(arr.dtype.str.replace("i", "u")).max()) >= V:
            bad = arr[(arr < 0) | (arr >= V)].flat[0]
            raise ValueError(f"{name} holds token id {bad}; ids must lie in [0, {V})")
        if out is None or out.shape != arr.shape:
            out = np.empty(arr.shape, np.int32)
        out[...] = arr
        return out

    # --- forward and backward ----------------------------------------------------------------------

    def forward(self, tokens, targets=None, cache: Optional[KVCache] = None):
        """Logits (B, T, V) and, with targets, per-token losses (B, T) (else None).

        Both are views of internal buffers, valid until the next forward. With a KV cache (B = 1)
        the tokens sit at positions cache.length.. and attend to the cached ones as well; their keys
        and values join the cache. A first fill runs forward's own kernels on forward's shapes, so
        its logits are bitwise those of a forward without the cache. Positions are absolute
        (learned wpe): once the cache holds block_size tokens the caller resets it and refills it
        with the cropped context (lmlab.sample.generate does).
        """
        cfg = self.config
        self._has_targets = False       # until this forward has succeeded with targets
        start = 0
        if cache is not None:
            if targets is not None:
                raise ValueError("a forward with a KV cache is for inference: it takes no targets "
                                 "(backward needs a forward over the whole sequence)")
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be an lmlab KVCache, got {type(cache).__name__}")
            cache.check_fits(cfg)
            start = cache.length
        self._tokens = tokens = self._copy_tokens(tokens, "tokens", self._tokens)
        B, T = tokens.shape
        if cache is not None:
            if B != 1:
                raise ValueError(f"a KV cache holds one sequence: tokens must be (1, T), got "
                                 f"shape {tokens.shape}")
            if start + T > cfg.block_size:
                raise ValueError(f"the cache holds {start} positions; {T} more would exceed "
                                 f"block_size {cfg.block_size}")
        if targets is not None:
            self._targets = self._copy_tokens(targets, "targets", self._targets)
            if self._targets.shape != tokens.shape:
                raise ValueError(f"targets must have the shape of tokens {tokens.shape}, got "
                                 f"{self._targets.shape}")
        acts = self._buffers("_acts", _activation_layout, B, T)
        params, prec, NH = self._named, self._precision, cfg.n_head
        # One token's kernels are single rows, too little work to pay for waking the thread team
        # (docs/DESIGN.md, "The model", KV cache).
        threads = ops.num_threads(1) if cache is not None and T == 1 else contextlib.nullcontext()
        with threads:
            ops.embedding_forward(acts.res[0], tokens, params["wte"], params["wpe"][start:])
            for l, layer in enumerate(self._layers):
                ops.layernorm_forward(acts.ln1[l], acts.ln1_mean[l], acts.ln1_rstd[l], acts.res[l],
                                      layer.ln1w, layer.ln1b)
                ops.matmul_forward(acts.qkv[l], acts.ln1[l], layer.qkvw, layer.qkvb, precision=prec)
                if cache is None or start == 0:
                    ops.attention_forward(acts.atty[l], acts.att_stats[l], acts.qkv[l], NH,
                                          precision=prec)
                if cache is not None:
                    cache.attend(acts.atty[l], acts.qkv[l], l, start, prec)
                ops.matmul_forward(acts.proj, acts.atty[l], layer.attprojw, layer.attprojb,
                                   precision=prec)
                ops.residual_forward(acts.res2[l], acts.res[l], acts.proj)
                ops.layernorm_forward(acts.ln2[l], acts.ln2_mean[l], acts.ln2_rstd[l],
                                      acts.res2[l], layer.ln2w, layer.ln2b)
                ops.matmul_forward(acts.fch[l], acts.ln2[l], layer.fcw, layer.fcb, precision=prec)
                ops.gelu_forward(acts.gelu[l], acts.fch[l])
                ops.matmul_forward(acts.proj, acts.gelu[l], layer.fcprojw, layer.fcprojb,
                                   precision=prec)
                ops.residual_forward(acts.res[l + 1], acts.res2[l], acts.proj)
            ops.layernorm_forward(acts.lnf, acts.lnf_mean, acts.lnf_rstd, acts.res[cfg.n_layer],
                                  params["ln_f.weight"], params["ln_f.bias"])
            ops.matmul_forward(acts.logits, acts.lnf, params["wte"], None, precision=prec)  # tied
        if cache is not None:
            cache.length = start + T
        if targets is None:
            return acts.logits, None
        ops.crossentropy_forward(acts.losses, acts.lse, acts.logits, self._targets)
        self._has_targets = True
        return acts.logits, acts.losses

    def backward(self, weights) -> None:
        """Accumulate d(sum(weights * losses)) / d(params) into grads.

        weights (B, T) float32 (1/N everywhere for a mean loss, 0 on tokens that do not count).
        Needs the preceding forward to have been given targets.
        """
        acts = self._acts
        if acts is None or not self._has_targets:
            raise ValueError("backward needs a preceding forward(tokens, targets) with targets")
        B, T = acts.B, acts.T
        weights = np.asarray(weights)
        if weights.shape != (B, T):
            raise ValueError(f"weights must have shape (B, T) = {(B, T)} like the last forward, "
                             f"got {weights.shape}")
        if weights.dtype != np.float32 or not weights.flags.c_contiguous:
            weights = np.ascontiguousarray(weights, dtype=np.float32)
        grads, layer_grads, lowest = self._gradient_plan()
        grads_acts = self._buffers("_grads_acts", _grad_activation_layout, B, T)
        params, NH, prec = self._named, self.config.n_head, self._precision
        L = self.config.n_layer

        # crossentropy_backward adds into dlogits (its one gradient): clear it first.
        grads_acts.dlogits.fill(0.0)
        ops.crossentropy_backward(grads_acts.dlogits, acts.logits, acts.lse, self._targets, weights)
        ops.matmul_backward(grads_acts.dx, grads["wte"], None, grads_acts.dlogits, acts.lnf,
                            params["wte"], precision=prec, accumulate=False)
        # dres starts as d(res[L]); each LayerNorm below adds its input gradient into it.
        grads_acts.dres.fill(0.0)
        ops.layernorm_backward(grads_acts.dres, grads["ln_f.weight"], grads["ln_f.bias"],
                               grads_acts.dx, acts.res[L], params["ln_f.weight"], acts.lnf_mean,
                               acts.lnf_rstd)
        for l in range(L - 1, max(lowest, 0) - 1, -1):
            layer, layer_grad = self._layers[l], layer_grads[l]
            # MLP: res[l+1] = res2 + c_proj(gelu(c_fc(ln_2(res2)))); dres holds d(res[l+1]).
            ops.matmul_backward(grads_acts.dgelu, layer_grad.fcprojw, layer_grad.fcprojb,
                                grads_acts.dres, acts.gelu[l], layer.fcprojw, precision=prec,
                                accumulate=False)
            ops.gelu_backward(grads_acts.dfch, acts.fch[l], grads_acts.dgelu, accumulate=False)
            ops.matmul_backward(grads_acts.dln, layer_grad.fcw, layer_grad.fcb, grads_acts.dfch,
                                acts.ln2[l], layer.fcw, precision=prec, accumulate=False)
            ops.layernorm_backward(grads_acts.dres, layer_grad.ln2w, layer_grad.ln2b,
                                   grads_acts.dln, acts.res2[l], layer.ln2w, acts.ln2_mean[l],
                                   acts.ln2_rstd[l])
            # Attention: res2 = res[l] + c_proj(attn(c_attn(ln_1(res[l])))); dres holds d(res2).
            ops.matmul_backward(grads_acts.dx, layer_grad.attprojw, layer_grad.attprojb,
                                grads_acts.dres, acts.atty[l], layer.attprojw, precision=prec,
                                accumulate=False)
            ops.attention_backward(grads_acts.dqkv, grads_acts.dx, acts.qkv[l], acts.att_stats[l],
                                   NH, precision=prec, accumulate=False)
            # d(res[l]) is needed only if something below this layer trains (or ln_1 itself).
            need_dln = lowest < l or layer_grad.ln1w is not None or layer_grad.ln1b is not None
            ops.matmul_backward(grads_acts.dln if need_dln else None, layer_grad.qkvw,
                                layer_grad.qkvb, grads_acts.dqkv, acts.ln1[l], layer.qkvw,
                                precision=prec, accumulate=False)
            if need_dln:
                ops.layernorm_backward(grads_acts.dres, layer_grad.ln1w, layer_grad.ln1b,
                                       grads_acts.dln, acts.res[l], layer.ln1w, acts.ln1_mean[l],
                                       acts.ln1_rstd[l])
        if lowest < 0:
            ops.embedding_backward(grads["wte"], grads["wpe"], grads_acts.dres, self._tokens)


def check_precision(value, name: str = "precision") -> str:
    """value if it names a matmul precision (ops.MATMUL_PRECISIONS), else a ValueError."""
    if not isinstance(value, str) or value not in ops.MATMUL_PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(ops.MATMUL_PRECISIONS)}, "
                         f"got {value!r}")
    return value


def frozen_by(name: str, prefix: str) -> bool:
    """Whether a frozen prefix covers a parameter: whole dotted components ("h.1" is not "h.10")."""
    return name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".")
