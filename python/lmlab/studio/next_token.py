"""The Next token page's endpoints: the distribution after a prompt, reshaped, and one pick.

The model's logits come from lmlab.sample.next_token_logits, the reshaping from
sample.filter_logits and the seeded draw from sample.draw_token: the same code `lmlab sample`
generates with, so the page shows exactly the distribution a pick draws from (reshaping the
probabilities instead lost every token the softmax had rounded to 0, which a high temperature
brings back). A slider move reshapes cached logits; only a new prompt runs the model.

The context is the typed prompt's ids followed by the ids of the tokens picked since (`ids`): the
page keeps the picks as ids, not text, so a byte-level BPE token that is only part of a UTF-8
character (shown as U+FFFD until the rest arrives) is fed back exactly as the model produced it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
from starlette.requests import Request

from ..demo_model import prompt_ids
from ..sample import draw_token, filter_logits, next_token_logits
from .common import (MAX_PICKED_IDS, MAX_SHOWN_TOKENS, BadRequest, api, choice_value, encodable,
                     json_body, number_value, sampling_values, text_value, token_text, with_model)

CACHED_PROMPTS = 64


class DistributionCache:
    """The next-token logits of recent (run, checkpoint, prompt)s."""

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


def _picked_ids(values: dict) -> list:
    ids = values.get("ids", [])
    if not isinstance(ids, list) or len(ids) > MAX_PICKED_IDS:
        raise BadRequest(f"ids must be a list of at most {MAX_PICKED_IDS} token ids")
    return [number_value({"id": i}, "id", lo=0, integer=True) for i in ids]


async def _distribution(request: Request, values: dict):
    run = request.app.state.runs.get(values.get("run", 0))
    prompt = text_value(values, "prompt", default="")
    ids = _picked_ids(values)
    cache = request.app.state.distributions

    def work(model, tok, config):
        encodable(tok, prompt, "prompt")
        if any(i >= tok.vocab_size for i in ids):
            raise BadRequest(f"ids must be in [0, {tok.vocab_size}) for this model")
        key = (run.index, str(run.loaded_checkpoint), prompt, tuple(ids))
        logits = cache.get(key)
        if logits is None:
            context = np.concatenate([prompt_ids(tok, prompt), np.array(ids, np.int32)])
            logits = next_token_logits(model, context)
            cache.put(key, logits)
        return logits, tok

    logits, tok = await with_model(run, work)
    return run, prompt, ids, logits, tok


@api
async def distribution_endpoint(request: Request) -> dict:
    values = await json_body(request)
    settings = sampling_values(values)
    show = number_value(values, "show", default=20, lo=1, hi=MAX_SHOWN_TOKENS, integer=True)
    run, prompt, _, logits, tok = await _distribution(request, values)
    probs = filter_logits(logits)  # temperature 1, no filter: the softmax
    shaped = filter_logits(logits, **settings)
    # by logit: tokens whose probability underflowed to 0 still come in the model's order
    order = np.argsort(-logits, kind="stable")[:show]
    return {"run": run.name, "prompt": prompt, "vocab_size": int(probs.size),
            "kept": int(np.count_nonzero(shaped)),
            "tokens": [{"id": int(i), "text": token_text(tok, int(i)), "p": float(probs[i]),
                        "shaped": float(shaped[i])} for i in order]}


@api
async def pick_endpoint(request: Request) -> dict:
    """The next token: the most likely one, or one drawn from the reshaped distribution with
    numpy's Generator seeded by `seed` (the same seed and prompt draw the same token). Answers the
    picked ids so far and the text they make after the prompt (decoded together, so the bytes of
    one character split over two tokens join up)."""
    values = await json_body(request)
    settings = sampling_values(values)
    mode = choice_value(values, "mode", ("greedy", "sample"), default="greedy")
    seed = number_value(values, "seed", default=0, lo=0, hi=2**63 - 1, integer=True)
    run, prompt, ids, logits, tok = await _distribution(request, values)
    probs = filter_logits(logits)
    if mode == "greedy":
        chosen = int(np.argmax(logits))
    else:
        chosen = draw_token(filter_logits(logits, **settings), np.random.default_rng(seed))
    ended = chosen == tok.eot_id  # the model ends its text here: nothing to append
    ids = ids if ended else ids + [chosen]
    added = tok.decode(np.array(ids, np.int32))
    return {"id": chosen, "text": token_text(tok, chosen), "p": float(probs[chosen]), "ended": ended,
            "ids": ids, "added": added, "prompt": prompt + added}
