"""The Next token page's endpoints: the distribution after a prompt, reshaped, and one pick.

The model's distribution comes from lmlab.sample.next_token_distribution, the reshaping from
sample.filter_distribution and the seeded draw from sample.draw_token: the same code `lmlab sample`
generates with. A slider move reshapes a cached distribution; only a new prompt runs the model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
from starlette.requests import Request

from ..demo_model import prompt_ids
from ..sample import draw_token, filter_distribution, next_token_distribution
from .common import (MAX_SHOWN_TOKENS, api, choice_value, encodable, json_body, number_value,
                     sampling_values, text_value, token_text, with_model)

CACHED_PROMPTS = 64


class DistributionCache:
    """The raw next-token distributions of recent (run, checkpoint, prompt)s."""

    def __init__(self, size: int = CACHED_PROMPTS):
        self.size = size
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value) -> None:
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)


async def _distribution(request: Request, values: dict):
    run = request.app.state.runs.get(values.get("run", 0))
    prompt = text_value(values, "prompt", default="")
    cache = request.app.state.distributions

    def work(model, tok, config):
        encodable(tok, prompt, "prompt")
        key = (run.index, str(run.loaded_checkpoint), prompt)
        probs = cache.get(key)
        if probs is None:
            probs = next_token_distribution(model, prompt_ids(tok, prompt))
            cache.put(key, probs)
        return probs, tok

    probs, tok = await with_model(run, work)
    return run, prompt, probs, tok


@api
async def distribution_endpoint(request: Request) -> dict:
    values = await json_body(request)
    settings = sampling_values(values)
    show = number_value(values, "show", default=20, lo=1, hi=MAX_SHOWN_TOKENS, integer=True)
    run, prompt, probs, tok = await _distribution(request, values)
    shaped = filter_distribution(probs, **settings)
    order = np.argsort(-probs, kind="stable")[:show]
    return {"run": run.name, "prompt": prompt, "vocab_size": int(probs.size),
            "kept": int(np.count_nonzero(shaped)),
            "tokens": [{"id": int(i), "text": token_text(tok, int(i)), "p": float(probs[i]),
                        "shaped": float(shaped[i])} for i in order]}


@api
async def pick_endpoint(request: Request) -> dict:
    """The next token: the most likely one, or one drawn from the reshaped distribution with
    numpy's Generator seeded by `seed` (the same seed and prompt draw the same token)."""
    values = await json_body(request)
    settings = sampling_values(values)
    mode = choice_value(values, "mode", ("greedy", "sample"), default="greedy")
    seed = number_value(values, "seed", default=0, lo=0, hi=2**63 - 1, integer=True)
    run, prompt, probs, tok = await _distribution(request, values)
    if mode == "greedy":
        chosen = int(np.argmax(probs))
    else:
        chosen = draw_token(filter_distribution(probs, **settings), np.random.default_rng(seed))
    ended = chosen == tok.eot_id  # the model ends its text here: nothing to append
    text = token_text(tok, chosen)
    return {"id": chosen, "text": text, "p": float(probs[chosen]), "ended": ended,
            "prompt": prompt if ended else prompt + text}
