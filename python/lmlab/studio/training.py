"""The Training page's endpoints: a run's metrics.jsonl as it grows, over server-sent events, a
sample from its newest checkpoint, and training started and stopped from the page (trainer.py).

The rows are read with lmlab.metrics.read_metrics (which ignores a torn last line, so a row being
appended right now is sent once complete). The stream polls the file's size and mtime; it sends
"rows" events whose id is the number of rows sent so far, so a browser that reconnects (EventSource
does so by itself, with Last-Event-ID) gets only what it lacks. A stream ends after `lifetime`
seconds and the browser reconnects: no request holds the server forever.
"""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from ..chat import stop_ids
from ..checkpoint import current_checkpoint
from ..metrics import read_metrics
from ..sample import generate
from . import trainer
from .common import MAX_NEW_TOKENS, api, json_body, number_value, with_model
from .runs import UnknownRun

POLL_S = 0.5
KEEPALIVE_S = 15.0
STREAM_LIFETIME_S = 60.0
SAMPLE_TOKENS = 80


def _signature(run):
    try:
        st = os.stat(run.metrics_path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return None


def _checkpoint_name(run):
    try:
        return current_checkpoint(run.path).name
    except (OSError, ValueError):
        return None


def _event(name: str, data, event_id=None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data)}\n\n"


@api
async def metrics_endpoint(request: Request) -> dict:
    run = request.app.state.runs.get(request.query_params.get("run", "0"))
    rows = await run_in_threadpool(read_metrics, run.path)
    return {"run": run.name, "rows": rows, "checkpoint": _checkpoint_name(run)}


async def stream_endpoint(request: Request):
    try:
        run = request.app.state.runs.get(request.query_params.get("run", "0"))
        sent = int(number_value({"n": request.headers.get("last-event-id", "0")}, "n", lo=0, integer=True))
    except (UnknownRun, ValueError) as exc:
        return JSONResponse({"error": str(exc)}, status_code=404 if isinstance(exc, UnknownRun) else 400)
    lifetime = request.app.state.stream_lifetime

    async def events():
        nonlocal sent
        loop = asyncio.get_running_loop()
        end = loop.time() + lifetime
        seen, checkpoint, quiet_since = None, None, loop.time()
        yield "retry: 1000\n\n"
        while loop.time() < end and not request.app.state.stopping:
            signature = _signature(run)
            if signature != seen:
                seen = signature
                rows = await run_in_threadpool(read_metrics, run.path)
                if len(rows) < sent:  # the file was cut back (a resumed run): start over
                    sent = 0
                    yield _event("reset", {"run": run.name})
                if len(rows) > sent:
                    yield _event("rows", {"run": run.name, "rows": rows[sent:]}, len(rows))
                    sent, quiet_since = len(rows), loop.time()
                now = _checkpoint_name(run)
                if now != checkpoint:
                    checkpoint = now
                    yield _event("checkpoint", {"run": run.name, "checkpoint": now})
            elif loop.time() - quiet_since > KEEPALIVE_S:
                quiet_since = loop.time()
                yield ": still here\n\n"
            await asyncio.sleep(POLL_S)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@api
async def sample_endpoint(request: Request) -> dict:
    """A short sample from the run's current checkpoint (temperature 0.8, a fixed seed, so two
    checkpoints differ only by what the model learned)."""
    q = request.query_params
    run = request.app.state.runs.get(q.get("run", "0"))
    n = number_value(q, "tokens", default=SAMPLE_TOKENS, lo=1, hi=MAX_NEW_TOKENS, integer=True)
    seed = number_value(q, "seed", default=0, lo=0, hi=2**63 - 1, integer=True)

    def work(model, tok, config):
        ids = generate(model, np.array([tok.eot_id], np.int32), n, temperature=0.8, seed=seed,
                       stop_ids=stop_ids(tok, tok.eot_id))
        return {"run": run.name, "checkpoint": run.loaded_checkpoint.name, "text": tok.decode(ids)}

    return await with_model(run, work)


@api
async def train_options_endpoint(request: Request) -> dict:
    """What the page may train: the run slots, the runs to start from, and the bounded choices."""
    runs = request.app.state.runs
    return {**trainer.options(), "runs": runs.describe(),
            "jobs": {r.name: _job(request, r) for r in runs.runs if r.trainable}}


def _job(request: Request, run) -> dict:
    job = request.app.state.trainer.job(run)
    return {"run": run.name, "state": "idle"} if job is None else {"run": run.name, **job.describe()}


@api
async def train_start_endpoint(request: Request) -> dict:
    values = await json_body(request)
    runs, jobs = request.app.state.runs, request.app.state.trainer
    run, argv = await run_in_threadpool(trainer.command, values, runs)
    await run_in_threadpool(jobs.start, run, argv)
    return _job(request, run)


@api
async def train_stop_endpoint(request: Request) -> dict:
    run = request.app.state.runs.get((await json_body(request)).get("run", ""))
    job = request.app.state.trainer.job(run)
    if job is not None:
        job.stop()
    return _job(request, run)


@api
async def train_job_endpoint(request: Request) -> dict:
    return _job(request, request.app.state.runs.get(request.query_params.get("run", "0")))
