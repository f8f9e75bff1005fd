"""Sampling: determinism, seeds, cached vs uncached generation, the distribution filters, stop ids
and the sliding window beyond block_size. References: numpy float64 softmax and sorting written
here; the uncached model.forward for the KV cache.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmlab import ops
from lmlab.chat import crop_context
from lmlab.kvcache import KVCache
from lmlab.model import GPT, GPTConfig
from lmlab.sample import (TextStream, filter_distribution, filter_logits, generate,
                          next_token_distribution)
from lmlab.tokenizer import train_tokenizer

CFG = dict(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def model():
    """A small random GPT with weights large enough that its distributions are far from uniform."""
    m = GPT(GPTConfig(**CFG), seed=0)
    rng = np.random.default_rng(1)
    m.params[:] = rng.standard_normal(m.params.size).astype(np.float32) * 0.4
    for name, v in m.named_parameters().items():
        if "ln" in name and name.endswith("weight"):
            v[...] = 1.0
    return m


PROMPT = [3, 1, 4]


def test_greedy_is_deterministic_and_follows_argmax(model):
    a = generate(model, PROMPT, 6, temperature=0)
    assert a.dtype == np.int32 and a.shape == (6,)
    np.testing.assert_array_equal(a, generate(model, PROMPT, 6, temperature=0, seed=99))
    ctx = list(PROMPT)
    for tok in a:                   # each greedy token is the argmax of the uncached distribution
        assert tok == int(np.argmax(next_token_distribution(model, ctx)))
        ctx.append(int(tok))


def test_seeded_sampling_is_reproducible_and_seeds_differ(model):
    a = generate(model, PROMPT, 20, seed=5)
    np.testing.assert_array_equal(a, generate(model, PROMPT, 20, seed=5))
    others = [generate(model, PROMPT, 20, seed=s) for s in range(6, 10)]
    assert any(not np.array_equal(a, o) for o in others)


@pytest.mark.parametrize("kwargs", [dict(temperature=0), dict(seed=11), dict(seed=12, top_k=5),
                                    dict(seed=13, top_p=0.8, temperature=0.7)])
def test_cached_equals_uncached(model, kwargs):
    # 20 new tokens after a 3-token prompt crosses block_size (12): the window slides too.
    cached = generate(model, PROMPT, 20, use_cache=True, **kwargs)
    uncached = generate(model, PROMPT, 20, use_cache=False, **kwargs)
    np.testing.assert_array_equal(cached, uncached)


def test_cached_logits_match_forward(model):
    ctx = np.array([5, 2, 7, 7, 1, 0, 9, 22], np.int32)
    cache = KVCache(model.config)
    first = model.forward(ctx[None, :5], cache=cache)[0][0, -1].copy()
    logits, _ = model.forward(ctx[None, :5])
    np.testing.assert_array_equal(first, logits[0, -1])     # the fill runs forward's kernels
    for t in range(5, ctx.size):
        step = model.forward(ctx[None, t:t + 1], cache=cache)[0][0, -1].copy()
        ref, _ = model.forward(ctx[None, :t + 1])
        np.testing.assert_allclose(step, ref[0, -1], rtol=1e-5, atol=1e-5)
    assert cache.length == ctx.size
    with pytest.raises(ValueError, match="exceed block_size"):
        model.forward(np.zeros((1, CFG["block_size"]), np.int32), cache=cache)
    with pytest.raises(ValueError, match="one sequence"):
        model.forward(np.zeros((2, 1), np.int32), cache=KVCache(model.config))
    with pytest.raises(ValueError, match="no targets"):
        model.forward(ctx[None, :2], ctx[None, 1:3], cache=KVCache(model.config))


def test_cached_block_of_new_tokens_matches_forward(model):
    """Several new tokens after a filled cache attend causally among themselves too."""
    ctx = np.array([5, 2, 7, 7, 1, 0, 9, 22, 3], np.int32)
    cache = KVCache(model.config)
    model.forward(ctx[None, :4], cache=cache)
    block = model.forward(ctx[None, 4:], cache=cache)[0][0].copy()
    ref, _ = model.forward(ctx[None, :])
    np.testing.assert_allclose(block, ref[0, 4:], rtol=1e-5, atol=1e-5)


def test_sliding_window_beyond_block_size(model):
    long_prompt = np.arange(30) % CFG["vocab_size"]
    out = generate(model, long_prompt, 15, temperature=0)
    assert out.shape == (15,)
    # Only the last block_size tokens matter: the cropped prompt gives the same continuation.
    np.testing.assert_array_equal(out, generate(model, long_prompt[-CFG["block_size"]:], 15,
                                                temperature=0))
    p = next_token_distribution(model, long_prompt)
    np.testing.assert_allclose(p, next_token_distribution(model, long_prompt[-12:]))


# (user, assistant, end) ids standing in for a chat template's turn tokens (chat.turn_ids).
USER, ASSISTANT, END = 1, 2, 3
TURNS = (USER, ASSISTANT, END)
# A conversation: a user turn (5 6 7), an answer (8 9) ended, a user turn (10 11), the next answer's
# header and its first words (12 13 14).
CONVERSATION = [1, 5, 6, 7, 2, 8, 9, 3, 1, 10, 11, 2, 12, 13, 14]


def test_a_chat_context_is_cropped_to_a_window_that_starts_as_a_turn():
    """The rule (chat.crop_context), window by window, written out by hand for the conversation
    1 5 6 7 2 8 9 3 1 10 11 2 12 13 14: the last n tokens, the first of them replaced by the role
    token of the turn it lies in; a first token that is <|end|> is dropped."""
    by_hand = {
        15: CONVERSATION,
        20: CONVERSATION,
        3: [ASSISTANT, 13, 14],                    # 12 lies in the answer: <|assistant|>
        4: [ASSISTANT, 12, 13, 14],                # starts at the header already
        5: [USER, ASSISTANT, 12, 13, 14],          # 11 lies in the user turn
        6: [USER, 11, ASSISTANT, 12, 13, 14],      # 10 lies in the user turn
        7: [USER, 10, 11, ASSISTANT, 12, 13, 14],  # starts at the user's role token
        8: [USER, 10, 11, ASSISTANT, 12, 13, 14],  # <|end|> first: dropped
        9: [ASSISTANT, END, USER, 10, 11, ASSISTANT, 12, 13, 14],  # 9: the first answer's
        14: [USER, 6, 7, ASSISTANT, 8, 9, END, USER, 10, 11, ASSISTANT, 12, 13, 14],
    }
    for n, window in by_hand.items():
        assert crop_context(CONVERSATION, n, TURNS).tolist() == window, n
        assert crop_context(CONVERSATION, n).tolist() == CONVERSATION[-n:], n  # plain text
    assert crop_context(CONVERSATION, 1, TURNS).tolist() == [14]  # no room for a role token


def _windows(model, prompt, n, **kwargs):
    """(generated ids, every window generate() fed the model) with the cache off (each call then
    reads the whole window)."""
    fed = []
    forward = model.forward

    def record(tokens, *args, **kw):
        fed.append(np.asarray(tokens)[0].tolist())
        return forward(tokens, *args, **kw)

    model.forward = record
    try:
        out = generate(model, prompt, n, use_cache=False, **kwargs)
    finally:
        del model.forward
    return out, fed


def test_generation_past_the_block_keeps_the_current_turn_s_role_token(model):
    """A chat context (turns) outgrowing the block slides a window that starts as a turn: every
    window is a role token followed by the context's latest tokens, the role token being the one of
    the turn the cut falls in (the last role token at or before the first token dropped), except
    where that first token is an <|end|>: the window then starts at the next turn's role token.
    Plain text slides its plain window. Cached generation gives the same tokens."""
    bs = CFG["block_size"]
    prompt = CONVERSATION[:bs]                     # a full block: 1 5 6 7 2 8 9 3 1 10 11 2
    out, fed = _windows(model, prompt, 25, temperature=0, turns=TURNS)
    assert out.size == 25
    assert fed[0] == prompt
    ends_first = 0
    for k, window in enumerate(fed[1:], start=1):
        context = prompt + out[:k].tolist()
        assert len(context) > bs
        assert window[0] in (USER, ASSISTANT) and 1 < len(window) <= bs
        assert window[1:] == context[-(len(window) - 1):]
        dropped = context[: len(context) - (len(window) - 1)]   # everything before the tail kept
        if len(window) == bs - 1:               # the first token of the plain window was <|end|>
            assert context[-bs] == END and window == context[-(bs - 1):]
            ends_first += 1
        else:
            assert len(window) == bs
            assert window[0] == [t for t in dropped if t in (USER, ASSISTANT)][-1]
    assert ends_first >= 1                         # the prompt's <|end|> reached the cut once
    assert any(w[0] == ASSISTANT for w in fed[1:])  # the answer outgrew the block
    np.testing.assert_array_equal(generate(model, prompt, 25, temperature=0, turns=TURNS), out)
    plain_out, plain_fed = _windows(model, prompt, 25, temperature=0)
    for k, window in enumerate(plain_fed):
        assert window == (prompt + plain_out[:k].tolist())[-bs:]


def test_stop_ids_and_callback(model):
    free = generate(model, PROMPT, 12, seed=3)
    stop = int(free[4])
    first = int(np.flatnonzero(free == stop)[0])
    seen = []
    out = generate(model, PROMPT, 12, seed=3, stop_ids=[stop], callback=seen.append)
    np.testing.assert_array_equal(out, free[:first])
    assert seen == list(out)
    assert generate(model, PROMPT, 0).size == 0


def test_next_token_distribution_is_softmax_of_logits(model):
    p = next_token_distribution(model, PROMPT)
    logits, _ = model.forward(np.array([PROMPT]))
    z = logits[0, -1].astype(np.float64)
    ref = np.exp(z - z.max())
    ref /= ref.sum()
    np.testing.assert_allclose(p, ref, rtol=1e-12)
    assert p.shape == (CFG["vocab_size"],)


# --- filters ------------------------------------------------------------------------------------------

@pytest.fixture
def probs():
    rng = np.random.default_rng(0)
    p = rng.random(50) ** 3
    return p / p.sum()


def test_filters_sum_to_one(probs):
    for kw in [dict(), dict(temperature=0.5), dict(temperature=3.0), dict(top_k=7),
               dict(top_p=0.5), dict(top_k=10, top_p=0.9, temperature=0.8), dict(temperature=0)]:
        q = filter_distribution(probs, **kw)
        assert q.shape == probs.shape and np.all(q >= 0)
        assert abs(q.sum() - 1.0) < 1e-12, kw


def test_temperature(probs):
    np.testing.assert_allclose(filter_distribution(probs, 1.0), probs, rtol=1e-12)
    q = filter_distribution(probs, 0.5)
    ref = probs ** 2 / (probs ** 2).sum()
    np.testing.assert_allclose(q, ref, rtol=1e-10)
    greedy = filter_distribution(probs, 0)
    assert greedy[np.argmax(probs)] == 1.0 and greedy.sum() == 1.0


@pytest.mark.parametrize("temperature", [1e-300, 1e-320, 5e-324])
def test_temperature_near_zero_is_greedy(model, probs, temperature):
    # As T -> 0+, p ** (1/T) renormalised tends to all mass on the most likely token (no ties
    # here); the smallest positive floats must reach that limit, not NaN.
    with np.errstate(invalid="raise"):  # NaN is the failure; underflow to 0 is the limit
        q = filter_distribution(probs, temperature)
    expected = np.zeros_like(probs)
    expected[np.argmax(probs)] = 1.0
    np.testing.assert_array_equal(q, expected)
    np.testing.assert_array_equal(generate(model, PROMPT, 15, temperature=temperature, seed=1),
                                  generate(model, PROMPT, 15, temperature=0))


def test_top_k_restricts_support(probs):
    q = filter_distribution(probs, top_k=5)
    kept = np.flatnonzero(q)
    assert kept.size == 5
    np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-probs)[:5]))
    np.testing.assert_allclose(q[kept], probs[kept] / probs[kept].sum(), rtol=1e-12)


def test_top_p_keeps_smallest_set_reaching_p(probs):
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order])
    for p in (0.1, 0.5, 0.9, 0.999):
        q = filter_distribution(probs, top_p=p)
        n = np.count_nonzero(q)
        assert cum[n - 1] >= p - 1e-12                      # the kept mass reaches p
        assert n == 1 or cum[n - 2] < p                     # and one fewer would not
        np.testing.assert_array_equal(np.sort(np.flatnonzero(q)), np.sort(order[:n]))
    assert np.count_nonzero(filter_distribution(probs, top_p=1.0)) == probs.size


def test_sampled_tokens_stay_in_support(model):
    V = CFG["vocab_size"]
    out = generate(model, PROMPT, 30, seed=4, top_k=1)
    np.testing.assert_array_equal(out, generate(model, PROMPT, 30, temperature=0))
    out = generate(model, PROMPT, 8, seed=2, top_k=3)
    ctx = list(PROMPT)
    for tok in out:
        p = next_token_distribution(model, ctx)
        assert tok in np.argsort(-p)[:3]
        ctx.append(int(tok))
    assert out.max() < V


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_options_raise(model, probs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, PROMPT, 3, **kwargs)
    with pytest.raises(ValueError, match=match):
        filter_distribution(probs, **kwargs)


def test_bad_prompts_raise(model):
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match=r"\[0, 23\)"):
        generate(model, [1, 99], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1], -1)
    with pytest.raises(ValueError, match="probs"):
        filter_distribution(np.array([0.5, -0.1, 0.6]))


# --- the text of generated ids ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_text_stream_shows_final_text_cut_before_the_stop_string(kind):
    """Reference: the whole id sequence decoded at once, cut where the stop string first starts.
    At every id, the text shown so far is a prefix of that reference (no U+FFFD for half a
    character, no start of a stop string that then arrives), and all of it is shown in the end."""
    text = "naïve café 😀 ok\n€5 → déjà vu, naïve café\n" * 3
    tok = train_tokenizer(text, kind, vocab_size=300)
    byte_level = np.arange(tok.vocab_size)  # bpe: the 256 single bytes among them
    rng = np.random.default_rng(0)
    for trial in range(200):
        if trial % 2:
            ids = tok.encode(text[int(rng.integers(0, 40)):][: int(rng.integers(1, 60))]).tolist()
        else:               # anything, bytes that end inside a character and special tokens too
            ids = rng.choice(byte_level, int(rng.integers(1, 40))).tolist()
        whole = tok.decode(ids)
        starts = int(rng.integers(0, len(whole)))
        for stop in (None, whole[starts:starts + int(rng.integers(1, 4))] or None, "é", "zz"):
            expected = whole[: whole.index(stop)] if stop and stop in whole else whole
            stream, shown = TextStream(tok, stop), ""
            for i in ids:
                shown += stream.add(i)
                assert expected.startswith(shown), (ids, stop, shown)
                if stream.stopped:
                    assert shown == expected
                    break
            shown += stream.finish()
            assert shown == expected, (ids, stop)
            assert stream.stopped == (stop is not None and stop in whole)


def test_bad_seed_stop_ids_use_cache_and_callback_are_refused_by_name(model):
    # numpy's refusals ("SeedSequence expects int or sequence of ints for entropy not a") did not
    # name the seed; use_cache="no" ran with the cache; stop_ids="ab" failed in int("a").
    for seed in ("a", 1.5, -1, True):
        with pytest.raises(ValueError, match=r"seed must be a whole number >= 0"):
            generate(model, PROMPT, 2, seed=seed)
    for stop_ids in ("ab", 3):
        with pytest.raises(TypeError, match="stop_ids must be a collection of token ids"):
            generate(model, PROMPT, 2, stop_ids=stop_ids)
    with pytest.raises(TypeError, match="stop_ids must hold whole-number token ids, got 1.5"):
        generate(model, PROMPT, 2, stop_ids=[1.5])
    # An id the model cannot produce never stopped generation, without a word.
    V = model.config.vocab_size
    for bad in (-1, V):
        with pytest.raises(ValueError, match=rf"stop_ids holds token id {bad}; ids must lie in "
                                             rf"\[0, {V}\)"):
            generate(model, PROMPT, 2, stop_ids=[0, bad])
    with pytest.raises(TypeError, match="use_cache must be True or False, got 'no'"):
        generate(model, PROMPT, 2, use_cache="no")
    with pytest.raises(TypeError, match="callback must be callable"):
        generate(model, PROMPT, 2, callback=3)
    # What stays allowed: numpy integers, a seed past int64 (stages add to a seed), a Generator.
    a = generate(model, PROMPT, 5, seed=np.int64(7), stop_ids=np.array([0], np.int32))
    b = generate(model, PROMPT, 5, seed=np.random.default_rng(7), stop_ids=[0])
    assert np.array_equal(a, b)
    assert generate(model, PROMPT, 3, seed=2**64 + 1).shape[0] <= 3


def test_a_model_prompt_cache_or_turns_of_the_wrong_kind_is_refused_by_name(model):
    """An lmlab.Model (its .gpt is the GPT; its .config is the run's config.json, a dict) failed
    deep inside as "'dict' object has no attribute 'block_size'"; text for prompt_ids as "got shape
    ()"; KVCache(model) as "'GPT' object has no attribute 'n_layer'"; turns=5 ran while the context
    fitted the block and failed unpacking it once the window slid."""
    from types import SimpleNamespace

    from lmlab.sample import score_tokens

    wrapped = SimpleNamespace(gpt=model, config={"model": CFG})  # what lmlab.Model holds
    for call in (lambda m: generate(m, PROMPT, 2), lambda m: next_token_distribution(m, PROMPT),
                 lambda m: score_tokens(m, PROMPT)):
        with pytest.raises(TypeError, match=r"model must be an lmlab GPT .*\.gpt\), got "
                                            r"SimpleNamespace"):
            call(wrapped)
        with pytest.raises(TypeError, match="model must be an lmlab GPT"):
            call(CFG)
    with pytest.raises(TypeError, match=r"prompt_ids must be token ids, not text \(str\)"):
        generate(model, "the cat", 2)
    with pytest.raises(TypeError, match=r"prompt_ids must be token ids, not text \(str\)"):
        next_token_distribution(model, "the cat")
    for wrong in (model, wrapped, CFG):
        with pytest.raises(TypeError, match=r"KVCache takes the model's GPTConfig"):
            KVCache(wrong)
    long_prompt = list(range(4, 4 + CFG["block_size"] + 3))
    for turns in (5, (1, 2), "abc", (1, 2, 3.0), (True, 2, 3)):
        with pytest.raises(TypeError, match="turns must be None"):
            generate(model, PROMPT, 2, turns=turns)
        with pytest.raises(TypeError, match="turns must be None"):
            generate(model, long_prompt, 2, turns=turns)
    # What stays allowed, with the same tokens as before: a GPT, its config, numpy ids, turns.
    np.testing.assert_array_equal(generate(model, PROMPT, 4, temperature=0, turns=[1, 2, 3]),
                                  generate(model, PROMPT, 4, temperature=0, turns=TURNS))
    assert KVCache(model.config).length == 0


@pytest.mark.parametrize("kwargs", [dict(top_k=4), dict(temperature=0.5, top_k=6, top_p=0.9),
                                    dict(temperature=2.0, top_p=0.8)])
def test_first_token_frequencies_match_the_filtered_model_distribution(model, kwargs):
    """generate's first tokens, drawn many times, follow the model's float64 softmax shaped by the
    filters as written here (p ** (1/T), the k most likely, the smallest set reaching p, each
    renormalised): nothing outside the kept set, and a chi-square statistic far below what a
    mismatch gives (fixed seed: the counts are the same on every run, so this cannot flake)."""
    logits, _ = model.forward(np.array([PROMPT]))
    z = logits[0, -1].astype(np.float64) / kwargs.get("temperature", 1.0)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = order[: kwargs.get("top_k", p.size)]
    q = np.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()
    if "top_p" in kwargs:
        cum = np.cumsum(q[order])
        n = int(np.argmax(cum >= kwargs["top_p"])) + 1
        q[order[n:]] = 0.0
        q /= q.sum()
    N, rng = 1500, np.random.default_rng(11)
    with ops.num_threads(1):  # tiny forwards: waking a thread team would cost more than they do
        counts = np.bincount([int(generate(model, PROMPT, 1, seed=rng, **kwargs)[0])
                              for _ in range(N)], minlength=p.size)
    assert counts[q == 0].sum() == 0
    kept = q > 0
    chi2 = float((((counts - N * q) ** 2)[kept] / (N * q[kept])).sum())
    df = int(kept.sum()) - 1
    # df + 6 sd of the chi-square law: a sampler off by a few percent on a common token exceeds it
    assert chi2 < df + 6 * np.sqrt(2 * max(df, 1)), (kwargs, chi2, df)


# Logits spread over 5000 nats: at T = 1 every token but the first lies more than 745 nats below
# it, so its float64 probability is 0; at T = 1000 they are 0.3 to 5 nats apart.
SPREAD = np.array([0.0, -300.0, -800.0, -1200.0, -2000.0, -5000.0, -np.inf])


def _softmax_at(z, T):
    """The float64 reference: softmax(z / T), the logits divided first."""
    z = np.asarray(z, np.float64) / T
    w = np.exp(z - z.max())
    return w / w.sum()


@pytest.mark.parametrize("T", [1.0, 0.5, 50.0, 300.0, 1000.0])
def test_temperature_applies_to_logits_exactly_however_far_apart(T):
    np.testing.assert_allclose(filter_logits(SPREAD, T), _softmax_at(SPREAD, T), rtol=1e-12,
                               atol=0)
    with np.errstate(over="ignore"):   # the reference's own z / T at T = 1e-300
        tiny = _softmax_at(SPREAD, 1e-300)
    np.testing.assert_array_equal(filter_logits(SPREAD, 1e-300), tiny)
    np.testing.assert_array_equal(filter_logits(SPREAD, 0), tiny)
    # top-k and top-p act on the tempered distribution, as filter_distribution's do.
    ref = _softmax_at(SPREAD, 1000.0)
    np.testing.assert_allclose(filter_logits(SPREAD, 1000.0, top_k=3, top_p=0.9),
                               filter_distribution(ref, 1.0, top_k=3, top_p=0.9), rtol=1e-12)


def test_sampling_at_a_high_temperature_reaches_tokens_far_below_the_top(model, monkeypatch):
    """generate's first tokens at T = 1000 on logits spread over 5000 nats follow softmax(z / T)
    (float64, divided first): tempering the rounded softmax gave every token but the top one
    probability 0, so the sampler never drew them."""
    V = CFG["vocab_size"]
    z = np.full(V, -np.inf, np.float32)
    z[: SPREAD.size - 1] = SPREAD[:-1]

    def forward(self, tokens, *args, **kwargs):
        return np.broadcast_to(z, np.shape(tokens) + (V,)).copy(), None

    monkeypatch.setattr(GPT, "forward", forward)
    q = _softmax_at(z, 1000.0)
    N, rng = 2000, np.random.default_rng(5)
    counts = np.bincount([int(generate(model, PROMPT, 1, seed=rng, temperature=1000.0,
                                       use_cache=False)[0]) for _ in range(N)], minlength=V)
    assert counts[q == 0].sum() == 0
    kept = q > 0
    chi2 = float((((counts - N * q) ** 2)[kept] / (N * q[kept])).sum())
    df = int(kept.sum()) - 1
    assert chi2 < df + 6 * np.sqrt(2 * df), (counts, N * q)


@pytest.mark.parametrize("logits", [[], [[0.0, 1.0]], [0.0, np.nan], [0.0, np.inf],
                                    [-np.inf, -np.inf]])
def test_filter_logits_refuses_what_is_no_logits(logits):
    with pytest.raises(ValueError, match="logits"):
        filter_logits(np.asarray(logits, np.float64))


def test_draw_token_refuses_weights_that_are_no_distribution():
    """All zeros walked back past id 0 to an IndexError ('index -4 is out of bounds'); a negative
    or NaN weight drew from a meaningless cdf. A valid p draws as before: the first id whose cdf
    passes u * total, the same id for the same seed."""
    from lmlab.sample import draw_token

    for p in (np.zeros(3), np.array([0.5, -0.2, 0.7]), np.array([np.nan, 1.0]),
              np.array([np.inf, 1.0]), np.zeros(0), np.ones((2, 2)) / 4):
        with pytest.raises(ValueError, match="p must be a non-empty 1-D array of finite"):
            draw_token(p, np.random.default_rng(0))
    p = np.array([0.0, 0.25, 0.0, 0.75])
    u = np.random.default_rng(3).random()
    expected = 1 if u < 0.25 else 3
    assert draw_token(p, np.random.default_rng(3)) == expected
