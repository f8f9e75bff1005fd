"""What the studio's JSON endpoints share: reading and checking request values, running model work
in a worker thread under the run's lock, and turning errors into one-line JSON answers.

Every bound a request is held to lives here (prompt length, generation length, answers to rank),
so the pages, the server and the README quote the same numbers.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..files import JSONTextError, parse_json
from .runs import UnknownRun

MAX_TEXT_CHARS = 2000        # a prompt, a text to score, a chat message
MAX_NEW_TOKENS = 200         # tokens one request may generate
MAX_CHAT_MESSAGES = 20
MAX_SHOWN_TOKENS = 64        # bars on the Next token page
MAX_PICKED_IDS = 2000        # tokens the Next token page may append to a prompt


class BadRequest(ValueError):
    """A request value that is missing, of the wrong kind or out of range (answered 400)."""


class Conflict(RuntimeError):
    """A request the studio's state refuses now (a second training of one run; answered 409)."""


def api(handler):
    """Wrap an endpoint: its dict becomes JSON; BadRequest and the library's ValueErrors (a prompt
    the tokenizer cannot encode, a damaged checkpoint) a 400, an unknown run a 404, a Conflict a
    409, one line each."""

    @functools.wraps(handler)
    async def endpoint(request: Request):
        try:
            return JSONResponse(await handler(request))
        except UnknownRun as exc:
            return JSONResponse({"error": str(exc)}, status_code=404)
        except Conflict as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        except (ValueError, FileNotFoundError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    return endpoint


async def json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = parse_json(raw or b"{}")
    except JSONTextError as exc:
        raise BadRequest(f"the request body: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def text_value(values: dict, name: str, *, default=None, max_chars: int = MAX_TEXT_CHARS,
               allow_empty: bool = True) -> str:
    value = values.get(name, default)
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise BadRequest(f"{name} is {len(value)} characters long; at most {max_chars}")
    if not allow_empty and not value.strip():
        raise BadRequest(f"{name} must not be empty")
    return value


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    if lo is not None:
        return f">= {lo}"
    return f"<= {hi}" if hi is not None else "a finite number"


def number_value(values: dict, name: str, *, default=None, lo=None, hi=None, integer: bool = False,
                 optional: bool = False):
    """A number from a JSON body or query string (strings are parsed), within [lo, hi]."""
    value = values.get(name, default)
    if value is None or value == "":
        if optional:
            return None
        raise BadRequest(f"{name} is required")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise BadRequest(f"{name} must be a number, got {value[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name} must be a finite number, got {value!r}"[:120])
    try:
        finite = math.isfinite(value)
    except OverflowError:  # a JSON integer of hundreds of digits, beyond any float
        raise BadRequest(f"{name} must be {_range(lo, hi)}, got an integer of "
                         f"{len(str(abs(value)))} digits") from None
    if not finite:
        raise BadRequest(f"{name} must be a finite number, got {value!r}")
    if integer:
        if value != int(value):
            raise BadRequest(f"{name} must be a whole number, got {value}")
        value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadRequest(f"{name} must be {_range(lo, hi)}, got {value}")
    return value


def choice_value(values: dict, name: str, choices, *, default=None) -> str:
    value = values.get(name, default)
    if value not in choices:
        raise BadRequest(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def sampling_values(values: dict) -> dict:
    """temperature, top_k (0 or absent: off), top_p (1 or absent: off) within lmlab's own rules."""
    top_k = number_value(values, "top_k", default=0, lo=0, hi=1 << 20, integer=True)
    top_p = number_value(values, "top_p", default=1.0, lo=0.0, hi=1.0)
    if top_p == 0:
        raise BadRequest("top_p must be in (0, 1], got 0")
    return {"temperature": number_value(values, "temperature", default=1.0, lo=0.0, hi=100.0),
            "top_k": top_k or None, "top_p": top_p if top_p < 1 else None}


async def with_model(run, work):
    """work(model, tokenizer, config) in a worker thread, alone on this run's model."""

    def locked():
        with run.lock:
            return work(*run.model())

    return await run_in_threadpool(locked)


def token_text(tokenizer, i: int) -> str:
    """The text of one token id."""
    return tokenizer.decode(np.array([i], np.int32))


def encodable(tokenizer, text: str, name: str) -> None:
    """Refuse text the run's tokenizer cannot encode, naming the characters."""
    unknown = tokenizer.unknown_chars(text)
    if unknown:
        shown = ", ".join(repr(c) for c in list(unknown)[:10])
        raise BadRequest(f"{name}: this model's tokenizer cannot encode {shown}")
