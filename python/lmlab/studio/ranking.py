"""The Rank page's endpoints: a round (a prompt and K sampled answers) and the class's submissions.

A round's answers are sampled the way `lmlab rank` samples them (lmlab.sequences.sample_answers,
answer j with seed SEED + j), so every browser asking for the same prompt, K and seed gets the same
answers; the round keeps whether each ended with the end-of-answer token, which the line records,
and the page marks an answer cut at the round's max_new_tokens as `lmlab rank` does
("… (cut at N tokens)"). The server keeps each round it handed out; a submission names the round
by id and sends only a name and the places, so what lands in the file is the prompt and answers
the server showed.

Every submission is one line of the rankings JSONL `lmlab rank` writes (lmlab.rankings checks the
record and appends it: one write of the whole line under an exclusive flock, then fsync), plus a
"judge" (the typed name) and the run's name; `lmlab reward` and `lmlab dpo` read the file as it is.
A lock in the server puts the submissions of many browsers in a queue of their own, so the flock
is only ever contended by another process.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ..rankings import append_ranking, compact_ranking, load_rankings, normalize_ranking
from ..sequences import prompt_ids_for, sample_answers
from .common import (MAX_NEW_TOKENS, BadRequest, api, encodable, json_body, number_value,
                     sampling_values, text_value, with_model)

MAX_ANSWERS = 8
MAX_NAME_CHARS = 40
KEPT_ROUNDS = 256


class RankingBook:
    """The rounds handed out and the one rankings file the studio appends to."""

    def __init__(self, path, prompts=()):
        self.path = path
        self.prompts = list(prompts)
        self.rounds: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def keep(self, round_: dict) -> None:
        with self.lock:
            self.rounds[round_["id"]] = round_
            self.rounds.move_to_end(round_["id"])
            while len(self.rounds) > KEPT_ROUNDS:
                self.rounds.popitem(last=False)

    def round(self, round_id) -> dict:
        with self.lock:
            found = self.rounds.get(round_id) if isinstance(round_id, str) else None
        if found is None:
            raise BadRequest("unknown round: sample the answers again (the studio may have restarted)")
        return found

    def append(self, record: dict) -> None:
        with self.lock:
            append_ranking(self.path, record)

    def count(self, round_: dict) -> int:
        """How many submissions the file holds for this round's prompt and answers."""
        with self.lock:
            try:
                records = load_rankings(self.path, allow_empty=True)
            except FileNotFoundError:
                return 0
        return sum(r["prompt"] == round_["prompt"] and r["completions"] == round_["completions"]
                   for r in records)


def places_to_ranking(places, k: int) -> list:
    """Places per answer (1 = best; equal places tie) -> the compact ranking, best first."""
    if not isinstance(places, list) or len(places) != k:
        raise BadRequest(f"places must be a list of {k} numbers, one per answer (1 = best)")
    for p in places:
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= k:
            raise BadRequest(f"each place must be a whole number from 1 to {k}, got {p!r}")
    groups = [[i for i in range(k) if places[i] == p] for p in sorted(set(places))]
    return compact_ranking(normalize_ranking(groups, k))


@api
async def prompts_endpoint(request: Request) -> dict:
    book = request.app.state.rankings
    return {"prompts": book.prompts, "file": str(book.path)}


@api
async def round_endpoint(request: Request) -> dict:
    values = await json_body(request)
    run = request.app.state.runs.get(values.get("run", 0))
    prompt = text_value(values, "prompt", allow_empty=False)
    k = number_value(values, "k", default=4, lo=2, hi=MAX_ANSWERS, integer=True)
    seed = number_value(values, "seed", default=0, lo=0, hi=2**62, integer=True)
    max_new = number_value(values, "max_new_tokens", default=32, lo=1, hi=MAX_NEW_TOKENS, integer=True)
    settings = sampling_values(values)
    book = request.app.state.rankings

    def work(model, tok, config):
        encodable(tok, prompt, "prompt")
        pids = prompt_ids_for(tok, prompt, model.config.block_size, max_new)
        seeds = [seed + j for j in range(k)]
        texts, ended = sample_answers(model, tok, pids, max_new, seeds, **settings)
        return texts, ended, seeds, str(run.loaded_checkpoint)

    texts, ended, seeds, checkpoint = await with_model(run, work)
    key = json.dumps([run.name, checkpoint, prompt, seeds, max_new, settings], sort_keys=True)
    round_ = {"id": hashlib.sha256(key.encode()).hexdigest()[:20], "run": run.name, "prompt": prompt,
              "completions": texts, "ended": ended, "seeds": seeds}
    book.keep(round_)
    return {**round_, "max_new_tokens": max_new,
            "submitted": await run_in_threadpool(book.count, round_)}


@api
async def submit_endpoint(request: Request) -> dict:
    values = await json_body(request)
    book = request.app.state.rankings
    round_ = book.round(values.get("round"))
    name = text_value(values, "name", max_chars=MAX_NAME_CHARS, allow_empty=False).strip()
    if any(not ch.isprintable() for ch in name):
        raise BadRequest("name must be printable text (no control characters)")
    ranking = places_to_ranking(values.get("places"), len(round_["completions"]))
    record = {"prompt": round_["prompt"], "completions": round_["completions"], "ranking": ranking,
              "ended": round_["ended"], "judge": name, "seeds": round_["seeds"],
              "run": round_["run"]}
    await run_in_threadpool(book.append, record)
    return {"saved": True, "ranking": ranking, "judge": name, "file": str(book.path)}
