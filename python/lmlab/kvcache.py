"""The KV cache: keys and values of the positions a GPT has read, and attention over them.

`GPT.forward(tokens, cache=KVCache(model.config))` reads tokens at positions cache.length.. of one
sequence; each layer hands its new queries, keys and values to `KVCache.attend`, so decoding one
token costs O(T) attention instead of a whole O(T^2) forward (docs/DESIGN.md, "The model").
Attention over the cache runs on the same kernels as the rest of the model: per head, the scores
(q * scale) @ K.T and the output P @ V are matmuls, with the softmax kernel between them.
"""

from __future__ import annotations

import math

import numpy as np

from . import ops


class KVCache:
    """Keys and values of one sequence's positions, for decoding one token at a time.

    k (n_layer, n_head, block_size, head_size) and vt (n_layer, n_head, head_size, block_size): the
    layouts in which the matmul kernel (out = inp @ weight.T) takes them as its weight operand.
    `length` positions are filled. config: the model's GPTConfig.
    """

    def __init__(self, config) -> None:
        sizes = ("n_layer", "n_head", "n_embd", "block_size")
        if not all(isinstance(getattr(config, a, None), int) for a in sizes):
            # KVCache(model) or KVCache(lmlab.Model) failed as "'GPT' object has no attribute
            # 'n_layer'", naming neither the argument nor what it takes.
            raise TypeError(f"KVCache takes the model's GPTConfig (KVCache(model.config)), got "
                            f"{type(config).__name__}")
        self.shape = (config.n_layer, config.n_head, config.n_embd, config.block_size)
        self.n_head, self.block_size = config.n_head, config.block_size
        HS = config.n_embd // config.n_head
        self.k = np.zeros((config.n_layer, config.n_head, config.block_size, HS), np.float32)
        self.vt = np.zeros((config.n_layer, config.n_head, HS, config.block_size), np.float32)
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def check_fits(self, config) -> None:
        """ValueError unless this cache was made for a model of config's shape."""
        shape = (config.n_layer, config.n_head, config.n_embd, config.block_size)
        if shape != self.shape:
            raise ValueError(f"this KV cache was made for a model of (n_layer, n_head, n_embd, "
                             f"block_size) {self.shape}, not this one's {shape}: make it with "
                             "KVCache(model.config)")
        n = self.length
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or \
                not 0 <= n <= self.block_size:
            raise ValueError(f"this KV cache's length must be a whole number of filled positions "
                             f"in [0, {self.block_size}], got {n!r} (reset() empties it)")

    def attend(self, out: np.ndarray, qkv: np.ndarray, layer: int, start: int,
               precision) -> None:
        """Store the keys and values of qkv (1, T, 3C), the positions start.., for `layer`; unless
        they are a first fill (start 0, whose attention the model's own kernel computes), write
        their causal attention over every cached position into out (1, T, C).

        Positions not filled yet (and each new token's future) get -inf scores, so they weigh
        exactly 0. With bf16 the products' operands are rounded as the attention kernel rounds them.
        """
        T, NH = qkv.shape[1], self.n_head
        HS = qkv.shape[2] // 3 // NH
        heads = qkv[0].reshape(T, 3, NH, HS)
        self.k[layer, :, start:start + T] = heads[:, 1].transpose(1, 0, 2)
        self.vt[layer, :, :, start:start + T] = heads[:, 2].transpose(1, 2, 0)
        if start == 0:
            return
        q = np.ascontiguousarray(heads[:, 0].transpose(1, 0, 2))               # (NH, T, HS)
        q *= np.float32(1.0 / math.sqrt(HS))
        S = start + T                   # cached positions, the new ones included
        scores = np.empty((NH, T, S), np.float32)
        for h in range(NH):
            ops.matmul_forward(scores[h], q[h], self.k[layer, h, :S], precision=precision)
        if T > 1:                       # each new token's future
            scores[:, np.arange(S)[None, :] > np.arange(start, S)[:, None]] = -np.inf
        probs = np.empty_like(scores)
        ops.softmax_forward(probs, scores)
        # V is cached transposed, so its first S positions are not one block of memory: the
        # product runs over the whole cache with the probabilities of the rest set to 0.
        padded = np.zeros((NH, T, self.block_size), np.float32)
        padded[:, :, :S] = probs
        y = np.empty((NH, T, HS), np.float32)
        for h in range(NH):
            ops.matmul_forward(y[h], padded[h], self.vt[layer, h], precision=precision)
        out[0] = y.transpose(1, 0, 2).reshape(T, NH * HS)
