"""lmlab studio: the lecture's views as a local web app (`lmlab studio RUN ...`).

    app.py        routes, state, and the uvicorn server (serve)
    security.py   host binding, access token, Host header and request-size guard
    runs.py       the runs named on the command line, looked up by index or name, their models
    common.py     request values and their bounds, model work in worker threads, JSON errors
    descent.py    Descent page: optimiser paths from lmlab.demo_descent
    next_token.py Next token page: distributions and picks through lmlab.sample
    views.py      Loss, Embeddings and Chat pages through lmlab.demo_model and lmlab.instruct
    training.py   Training page: metrics.jsonl over server-sent events, samples
    ranking.py    Rank page: rounds and submissions appended to a rankings JSONL
    static/       the pages: plain HTML, CSS and JavaScript, shipped in the wheel

Needs the optional dependencies starlette and uvicorn (pip install "lmlab[studio]"); importing
this package without them raises ImportError.
"""

from __future__ import annotations

from .app import create_app, serve

__all__ = ["create_app", "serve"]
