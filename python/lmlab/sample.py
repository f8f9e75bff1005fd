"""Sampling from a GPT: the next-token distribution, its filters, generation, and the text of the
generated ids as it streams (TextStream).

Generation picks a token from the model's next-token distribution and appends it, over and over.
The distribution is shaped by temperature (T = 0 is greedy: always the most likely token), then
top-k (keep the k most likely) and top-p (keep the smallest set of most likely tokens whose mass
reaches p), renormalising after each filter. Temperature divides the logits before the softmax
(filter_logits), so every token keeps its exact share at any T: shaping float64 probabilities
instead (filter_distribution) cannot bring back a token whose softmax underflowed to 0. Each call
owns a numpy Generator seeded from `seed`, so the same seed gives the same tokens and different
seeds give different samples. A view of what generation draws from (the studio's Next token page,
`lmlab demo sampling`) shows filter_logits of next_token_logits, the same numbers.

With use_cache=True (the default) the model keeps each layer's keys and values and feeds one new
token per step (O(T) work per token); without it every step reruns the whole context (O(T^2)).
Both give the same tokens. Contexts longer than block_size are cropped to the last block_size
tokens (a sliding window; chat.crop_context): plain text keeps exactly those, a chat context
(generate's `turns`) keeps them starting as a turn of the template, the first one replaced by the
role token of the turn it lies in. Because positions are absolute, the cache cannot slide, so once
the window slides each further step refills the cache from the cropped window, costing what an
uncached step costs.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np

from . import checks
from .chat import crop_context
from .kvcache import KVCache
from .model import GPT


def _softmax64(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _check_options(temperature, top_k, top_p) -> None:
    # The same rules as the command line's flags (lmlab.checks).
    checks.check_values(temperature=temperature, top_k=top_k, top_p=top_p)


def filter_distribution(probs, temperature: float = 1.0, top_k: Optional[int] = None,
                        top_p: Optional[float] = None) -> np.ndarray:
    """Apply temperature, then top-k, then top-p to probs (V,); returns float64 (V,) summing to 1.

    temperature rescales logits (p ** (1/T), renormalised); 0 puts all mass on the most likely
    token (the first one on ties). top_k keeps exactly the k most likely tokens (ties broken by
    lower id). top_p keeps the smallest set of most likely tokens whose mass is >= top_p.
    A probability that is already 0 (a token more than ~745 nats below the most likely one, whose
    float64 softmax underflowed) stays 0 at any temperature: filter_logits, from the logits, is
    exact there, and is what generate uses.
    """
    p = np.asarray(probs, np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"probs must be a non-empty 1-D array, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError("probs must be finite, non-negative and not all zero")
    _check_options(temperature, top_k, top_p)
    if temperature == 0:
        return _one_hot(p)
    if temperature != 1.0:
        with np.errstate(divide="ignore"):
            p = _tempered(np.log(p), temperature)
    return _truncated(p / p.sum(), top_k, top_p)


def filter_logits(logits, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> np.ndarray:
    """filter_distribution of the softmax of logits (V,), with temperature applied to the logits
    themselves (softmax(logits / T), in float64 with the max subtracted): exact for every token,
    where the softmax first would have rounded a token more than ~745 nats below the most likely
    one to probability 0, which no temperature could then raise. -inf is a token never drawn."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 1 or z.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {z.shape}")
    if np.any(np.isnan(z)) or np.any(z == np.inf) or not np.any(np.isfinite(z)):
        raise ValueError("logits must be finite or -inf, and not all -inf")
    _check_options(temperature, top_k, top_p)
    if temperature == 0:
        return _one_hot(z)
    p = _tempered(z, temperature)
    return _truncated(p / p.sum(), top_k, top_p)


def _one_hot(weights: np.ndarray) -> np.ndarray:
    """Temperature 0: all mass on the most likely token (the first one on ties)."""
    out = np.zeros(weights.shape, np.float64)
    out[int(np.argmax(weights))] = 1.0
    return out


def _tempered(z: np.ndarray, temperature: float) -> np.ndarray:
    """exp(z / T) up to a constant factor, for log-weights z (float64, -inf for weight 0): the max
    is subtracted before dividing by T, so the most likely token's term is exactly 0 and every
    other one <= 0 (at worst -inf, weight 0), and no T > 0 makes NaN (dividing first, a T near the
    smallest float turned every term into -inf)."""
    z = z - z.max()
    if temperature != 1.0:
        with np.errstate(over="ignore"):
            z = z / temperature
    return np.exp(z)


def _truncated(p: np.ndarray, top_k: Optional[int], top_p: Optional[float]) -> np.ndarray:
    """top-k, then top-p, on the distribution p, renormalising after each."""
    order = None
    if top_k is not None and top_k < p.size:
        order = np.argsort(-p, kind="stable")
        p = p.copy()
        p[order[top_k:]] = 0.0
        p /= p.sum()
    if top_p is not None and top_p < 1.0:
        if order is None:
            order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # The first index where the running mass reaches top_p ends the kept set; the tolerance
        # keeps a set whose mass equals top_p up to rounding.
        keep = int(np.searchsorted(cum, top_p - 1e-12, side="left")) + 1
        p = p.copy()
        p[order[keep:]] = 0.0
        p /= p.sum()
    return p


def draw_token(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token id drawn from the (filtered) distribution p with one uniform number from rng."""
    p = np.asarray(p)
    cdf = np.cumsum(p)
    if p.ndim != 1 or p.size == 0 or not np.isfinite(cdf[-1]) or cdf[-1] <= 0 or np.any(p < 0):
        # all zeros walked back past the first id ("index -4 is out of bounds"); a negative entry
        # made the cdf non-monotone, so searchsorted's answer meant nothing
        raise ValueError(f"p must be a non-empty 1-D array of finite, non-negative weights that "
                         f"are not all zero (filter_distribution gives one), got "
                         f"{np.array2string(p, threshold=6)}")
    nxt = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    nxt = min(nxt, p.size - 1)
    while p[nxt] == 0.0:        # rounding at the cdf's flat end: step back to a kept id
        nxt -= 1
    return nxt


def _check_model(model) -> None:
    """TypeError unless model is a GPT: an lmlab.Model (lmlab.load) failed deep inside as
    "'dict' object has no attribute 'block_size'" (its .config is the run's config.json)."""
    if not isinstance(model, GPT):
        held = " (an lmlab.Model holds it as .gpt)" if isinstance(getattr(model, "gpt", None),
                                                                 GPT) else ""
        raise TypeError(f"model must be an lmlab GPT (what lmlab.checkpoint.load_model returns "
                        f"first){held}, got {type(model).__name__}")


def _context(model: GPT, ids) -> np.ndarray:
    _check_model(model)
    if isinstance(ids, (str, bytes)):  # np.asarray made it a 0-d array: "got shape ()"
        raise TypeError(f"prompt_ids must be token ids, not text ({type(ids).__name__}): encode "
                        "it with the run's tokenizer (tokenizer.encode), or call lmlab.Model's "
                        "methods, which take text")
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"prompt_ids must be a non-empty 1-D sequence of token ids, got shape "
                         f"{arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"prompt_ids must hold integer token ids, got dtype {arr.dtype}")
    V = model.config.vocab_size
    if arr.min() < 0 or arr.max() >= V:
        raise ValueError(f"prompt_ids must lie in [0, {V}), got min {arr.min()} max {arr.max()}")
    return arr.astype(np.int32)


def next_token_logits(model: GPT, prompt_ids) -> np.ndarray:
    """The model's logits (float64, (V,)) for the token after prompt_ids: what generate shapes
    with filter_logits, so a view that shows filter_logits of them shows the distribution
    generation draws from (the probabilities alone lose every token ~745 nats below the top).

    A prompt longer than block_size is cropped to its last block_size tokens.
    """
    ctx = _context(model, prompt_ids)[-model.config.block_size:]
    logits, _ = model.forward(ctx[None, :])
    return np.asarray(logits[0, -1], np.float64)


def next_token_distribution(model: GPT, prompt_ids) -> np.ndarray:
    """The model's probabilities (float64, (V,)) for the token after prompt_ids: the softmax of
    next_token_logits.

    A prompt longer than block_size is cropped to its last block_size tokens.
    """
    return _softmax64(next_token_logits(model, prompt_ids))


def score_tokens(model: GPT, ids) -> tuple:
    """How the model scores each token of `ids` given the ones before it: (logp, losses), logp the
    float64 log-probabilities of every token at each of the len(ids) - 1 positions (N-1, V), and
    losses the model's own per-position cross-entropy (float64 (N-1,), computed by its kernel).

    A sequence longer than block_size + 1 tokens is scored in consecutive windows of block_size
    predictions, the context starting afresh in each (as training batches do).
    """
    ids = _context(model, ids)
    if ids.size < 2:
        raise ValueError(f"scoring needs at least 2 tokens (one to read, one to predict), got "
                         f"{ids.size}")
    block = int(model.config.block_size)
    logps, losses = [], []
    for s in range(0, ids.size - 1, block):
        y = ids[s + 1: s + 1 + block]
        x = ids[s: s + y.size]
        logits, loss = model.forward(x[None, :], y[None, :])
        z = np.asarray(logits[0], np.float64)
        z = z - z.max(axis=-1, keepdims=True)  # log-softmax in float64, max subtracted
        logps.append(z - np.log(np.exp(z).sum(axis=-1, keepdims=True)))
        losses.append(np.asarray(loss[0], np.float64))
    return np.concatenate(logps), np.concatenate(losses)


class TextStream:
    """The text of generated ids, told as it becomes final and cut before a stop string: what
    `lmlab sample` streams and `Model.generate` returns.

    add(token_id) returns the text that may be shown now. Decoding is incremental, so n ids cost
    O(n) however long the text grows (decoding the whole text at every id cost O(n^2)): a byte-level
    BPE id that ends inside a UTF-8 character waits for the rest of it (decoding it alone would
    show U+FFFD), and text that may be the start of `stop` waits until it is known not to be.
    Once `stop` has appeared, `stopped` is True and no text from it on is ever returned.
    """

    def __init__(self, tokenizer, stop: Optional[str] = None) -> None:
        self._tok, self._stop = tokenizer, stop or None
        self._pending: list = []    # ids whose text may still change (an unfinished character)
        self._held = ""             # final text, held back because it may begin the stop string
        self.stopped = False

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._pending.append(int(token_id))
        piece = self._tok.decode(self._pending)
        # The text of ids up to one that ends a character never changes (the UTF-8 decoder is
        # back in its initial state there), so those ids are decoded once and dropped.
        if piece.endswith("\ufffd"):
            return ""
        self._pending = []
        return self._release(piece)

    def finish(self) -> str:
        """The rest of the text once generation has ended (an unfinished character as U+FFFD)."""
        if self.stopped:
            return ""
        rest = self._release(self._tok.decode(self._pending)) + self._held
        self._pending, self._held = [], ""
        return rest

    def _release(self, piece: str) -> str:
        text = self._held + piece
        stop = self._stop
        if stop is None:
            return text
        if stop in text:            # every earlier start of it lay in the held-back text
            self.stopped, self._held = True, ""
            return text[: text.index(stop)]
        # Hold back the longest ending of text that begins the stop string.
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                self._held = text[-k:]
                return text[:-k]
        self._held = ""
        return text


def _stop_set(stop_ids, vocab_size: int) -> set:
    """The ids of stop_ids (an iterable of whole numbers in [0, vocab_size), or None) as a set of
    ints. An id outside the vocabulary is refused: the model never produces it, so it would
    silently never stop generation."""
    if stop_ids is None:
        return set()
    if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, Iterable):
        raise TypeError(f"stop_ids must be a collection of token ids (or None), got "
                        f"{type(stop_ids).__name__}")
    stops = set()
    for s in stop_ids:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"stop_ids must hold whole-number token ids, got {s!r}")
        if not 0 <= s < vocab_size:
            raise ValueError(f"stop_ids holds token id {s}; ids must lie in [0, {vocab_size}) "
                             "(the model never produces another, so it would never stop)")
        stops.add(int(s))
    return stops


def _check_turns(turns) -> None:
    """TypeError unless turns is None or three whole-number ids (user, assistant, end): turns=5
    passed unnoticed while the context fitted the block, then failed in crop_context's unpacking
    once it slid."""
    ok = turns is None or (isinstance(turns, (tuple, list)) and len(turns) == 3 and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_)) for t in turns))
    if not ok:
        raise TypeError(f"turns must be None (plain text) or the (user, assistant, end) token ids "
                        f"of a chat template (lmlab.chat.turn_ids), got {turns!r}")


def generate(model: GPT, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, seed=None,
             stop_ids: Optional[Iterable[int]] = None, use_cache: bool = True,
             callback: Optional[Callable[[int], None]] = None,
             turns: Optional[tuple] = None, keep_stop: bool = False) -> np.ndarray:
    """Generate up to max_new_tokens ids after prompt_ids; returns the new ids (int32, 1-D).

    Generation stops early when it produces any id in stop_ids; that id is not returned (so a
    result shorter than max_new_tokens means a stop id was produced), unless keep_stop is True:
    then it is the last id returned, so a caller with several stop ids sees which one the model
    chose (a result ends with a stop id exactly when one was produced). callback(token_id) is called
    with each returned id but a stop id as soon as it is chosen, for streaming. turns: for a context in the chat
    template, its (user, assistant, end) ids (chat.turn_ids), with which a context longer than
    block_size is cropped to a window that starts as a turn (chat.crop_context); None: plain text.
    """
    checks.check("max_new_tokens", max_new_tokens)
    _check_model(model)
    cfg = model.config
    _check_options(temperature, top_k, top_p)
    if not isinstance(use_cache, (bool, np.bool_)):  # use_cache="no" would be true
        raise TypeError(f"use_cache must be True or False, got {use_cache!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (called with each new id), got "
                        f"{type(callback).__name__}")
    stops = _stop_set(stop_ids, cfg.vocab_size)
    _check_turns(turns)
    if not isinstance(seed, np.random.Generator):
        # numpy's own refusals ("SeedSequence expects int ...", "expected non-negative integer")
        # would not name the seed; a float seed 1.5 or True would otherwise be someone's guess.
        # Any size is numpy's to take (stages pass seed + k), so only the kind and sign are checked.
        if seed is not None and (isinstance(seed, (bool, np.bool_))
                                 or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed must be a whole number >= 0, a numpy Generator or None, got "
                             f"{seed!r}")
        seed = int(seed) if seed is not None else None
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    bs = cfg.block_size
    tokens = list(crop_context(_context(model, prompt_ids), bs, turns))
    out: list[int] = []
    cache = KVCache(cfg) if use_cache else None

    def logits_for_next() -> np.ndarray:
        if len(tokens) <= bs:           # the whole context: the cache holds all but the newest
            window = np.asarray(tokens, np.int32)[None, :]
            if cache is not None and 0 < cache.length == len(tokens) - 1:
                window = window[:, -1:]
            elif cache is not None:
                cache.reset()           # first call: fill it
        else:                           # the window slid: refill the cache from scratch
            window = crop_context(tokens, bs, turns).astype(np.int32)[None, :]
            if cache is not None:
                cache.reset()
        logits, _ = model.forward(window, cache=cache)
        return logits[0, -1]

    for _ in range(int(max_new_tokens)):
        logits = logits_for_next()
        if temperature == 0:
            nxt = int(np.argmax(logits))
        else:
            nxt = draw_token(filter_logits(logits, temperature, top_k, top_p), rng)
        if nxt in stops:
            if keep_stop:
                out.append(nxt)
            break
        tokens.append(nxt)
        out.append(nxt)
        if callback is not None:
            callback(nxt)
    return np.asarray(out, np.int32)

