"""The Loss, Embeddings and Chat pages' endpoints, each a thin call into the library code behind
`lmlab demo loss`, `demo embeddings` (lmlab.demo_model) and `lmlab chat` (lmlab.instruct.respond).
"""

from __future__ import annotations

import numpy as np
from starlette.requests import Request

from ..demo_common import confidence_rgb
from ..demo_model import embedding_rows, nearest_tokens, pca_2d, token_id, token_losses
from ..instruct import respond
from .common import (MAX_CHAT_MESSAGES, MAX_NEW_TOKENS, BadRequest, api, encodable, json_body,
                     number_value, sampling_values, text_value, token_text, with_model)

MAX_NEIGHBOURS = 50


@api
async def loss_endpoint(request: Request) -> dict:
    values = await json_body(request)
    run = request.app.state.runs.get(values.get("run", 0))
    text = text_value(values, "text", allow_empty=False)

    def work(model, tok, config):
        encodable(tok, text, "text")
        scored = token_losses(model, tok, text)
        ids = scored["ids"]
        tokens = [{"text": token_text(tok, int(ids[0])), "p": None, "ce": None}]
        for i in range(scored["targets"].size):
            tokens.append({"text": token_text(tok, int(ids[i + 1])), "p": float(scored["probs"][i]),
                           "ce": float(scored["ce"][i]),
                           "rgb": list(confidence_rgb(float(scored["probs"][i]))),
                           "guess": token_text(tok, int(scored["top_guess"][i])),
                           "guess_p": float(scored["top_guess_p"][i])})
        return {"run": run.name, "tokens": tokens, "mean_ce": float(scored["ce"].mean()),
                "uniform_ce": float(np.log(tok.vocab_size))}

    return await with_model(run, work)


@api
async def embeddings_endpoint(request: Request) -> dict:
    """Every token's position on the 2-D PCA map of the embeddings."""
    run = request.app.state.runs.get(request.query_params.get("run", "0"))

    def work(model, tok, config):
        wte = embedding_rows(model, tok)
        coords, explained = pca_2d(wte)
        return {"run": run.name, "dims": int(wte.shape[1]),
                "explained": [float(v) for v in explained[:2]],
                "tokens": [{"id": i, "text": token_text(tok, i), "x": float(coords[i, 0]),
                            "y": float(coords[i, 1]) if coords.shape[1] > 1 else 0.0}
                           for i in range(wte.shape[0])]}

    return await with_model(run, work)


@api
async def neighbours_endpoint(request: Request) -> dict:
    """The tokens nearest one token (given by id or by its text) by cosine similarity."""
    q = request.query_params
    run = request.app.state.runs.get(q.get("run", "0"))
    k = number_value(q, "k", default=10, lo=1, hi=MAX_NEIGHBOURS, integer=True)
    if q.get("id") is not None:
        query = number_value(q, "id", lo=0, integer=True)
    else:
        query = text_value(q, "token", default="", max_chars=64, allow_empty=False)

    def work(model, tok, config):
        wte = embedding_rows(model, tok)
        i = token_id(tok, query)
        _, neighbours = nearest_tokens(tok, wte, i, k)
        return {"run": run.name, "id": i, "text": token_text(tok, i), "neighbours": neighbours}

    return await with_model(run, work)


def _messages(values: dict) -> list:
    messages = values.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content}")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise BadRequest(f"at most {MAX_CHAT_MESSAGES} messages, got {len(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise BadRequest(f"messages[{i}] must be {{\"role\": \"user\" or \"assistant\", \"content\": ...}}")
        out.append({"role": m["role"], "content": text_value(m, "content")})
    if out[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's")
    return out


@api
async def chat_endpoint(request: Request) -> dict:
    values = await json_body(request)
    run = request.app.state.runs.get(values.get("run", 0))
    messages = _messages(values)
    settings = sampling_values({"temperature": 0.0, **values})
    max_new = number_value(values, "max_new_tokens", default=120, lo=1, hi=MAX_NEW_TOKENS, integer=True)
    seed = number_value(values, "seed", default=0, lo=0, hi=2**63 - 1, integer=True)

    def work(model, tok, config):
        if not (config.get("train") or {}).get("chat_template"):
            raise BadRequest(f"run {run.name} is not instruct-tuned (no chat template): chat needs a "
                             "run made by lmlab instruct, dpo or rlhf on one")
        for m in messages:
            encodable(tok, m["content"], "message")
        text, ended, stop = respond(model, tok, messages, max_new_tokens=max_new, seed=seed,
                                    **settings)
        return {"run": run.name, "reply": text, "ended": ended, "stop": stop}

    return await with_model(run, work)
