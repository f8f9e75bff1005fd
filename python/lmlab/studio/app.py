"""The studio's web application: its routes, its state, and the uvicorn server that runs it.

Pages are plain HTML files under static/ (no build step, nothing fetched from elsewhere); each
page's script calls the JSON endpoints below. Layers, outermost first: security.Guard (token, Host,
sizes) -> these routes -> one module of endpoints per page -> lmlab's library code, run in worker
threads for anything that touches a model.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import LmlabError
from . import descent, next_token, ranking, training, views
from .common import api
from .runs import Runs
from .security import LOOPBACK_HOSTS, Guard, is_loopback, new_token
from .trainer import Trainer

STATIC = Path(__file__).parent / "static"
PAGES = ("descent", "next", "loss", "training", "rank", "chat", "embeddings")
DEFAULT_RANKINGS = "rankings.jsonl"


def _page(name: str):
    async def page(request: Request):
        return FileResponse(STATIC / f"{name}.html", headers={"Cache-Control": "no-cache"})

    return page


@api
async def runs_endpoint(request: Request) -> dict:
    return {"runs": request.app.state.runs.describe()}


def create_app(run_paths: Sequence = (), *, token: Optional[str] = None, allowed_hosts=None,
               rankings=DEFAULT_RANKINGS, prompts: Sequence[str] = (),
               stream_lifetime: float = training.STREAM_LIFETIME_S, train_into: Sequence = ()):
    """The ASGI app for these runs. token=None: no token asked (loopback only); allowed_hosts:
    the Host header names accepted (None: any; the server passes the loopback names then);
    train_into: run directories the Training page may train (see trainer.py). Whoever serves the
    app calls stop_training(app) when it stops."""
    routes = [Route("/", _page("index"))]
    routes += [Route(f"/{name}", _page(name)) for name in PAGES]
    routes += [
        Route("/api/runs", runs_endpoint),
        Route("/api/descent", descent.descent_endpoint),
        Route("/api/next", next_token.distribution_endpoint, methods=["POST"]),
        Route("/api/next/pick", next_token.pick_endpoint, methods=["POST"]),
        Route("/api/loss", views.loss_endpoint, methods=["POST"]),
        Route("/api/embeddings", views.embeddings_endpoint),
        Route("/api/embeddings/neighbours", views.neighbours_endpoint),
        Route("/api/chat", views.chat_endpoint, methods=["POST"]),
        Route("/api/training/metrics", training.metrics_endpoint),
        Route("/api/training/stream", training.stream_endpoint),
        Route("/api/training/sample", training.sample_endpoint),
        Route("/api/training/options", training.train_options_endpoint),
        Route("/api/training/job", training.train_job_endpoint),
        Route("/api/training/start", training.train_start_endpoint, methods=["POST"]),
        Route("/api/training/stop", training.train_stop_endpoint, methods=["POST"]),
        Route("/api/rank/prompts", ranking.prompts_endpoint),
        Route("/api/rank/round", ranking.round_endpoint, methods=["POST"]),
        Route("/api/rank/submit", ranking.submit_endpoint, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.runs = Runs(run_paths, train_into)
    app.state.trainer = Trainer()
    app.state.rankings = ranking.RankingBook(Path(os.fspath(rankings)).resolve(), prompts)
    app.state.distributions = next_token.DistributionCache()
    app.state.stream_lifetime = float(stream_lifetime)
    app.state.stopping = False  # set when the server is told to stop: the streams end
    return Guard(app, token=token, allowed_hosts=allowed_hosts)


def stop_training(app) -> None:
    """Stop the training children the pages started (each saves a checkpoint first)."""
    app.app.state.trainer.stop_all()


def serve(run_paths: Sequence, *, host: str = "127.0.0.1", port: int = 8000,
          rankings=DEFAULT_RANKINGS, prompts: Sequence[str] = (), train_into: Sequence = (),
          announce=print) -> None:
    """Run the studio until Ctrl-C. A host other than loopback gets a fresh access token."""
    token = None if is_loopback(host) else new_token()
    allowed = LOOPBACK_HOSTS if token is None else None
    app = create_app(run_paths, token=token, allowed_hosts=allowed, rankings=rankings, prompts=prompts,
                     train_into=train_into)
    # Bound before the URL is shown: a port in use (a studio already running, another server on
    # 8000) or an address not of this computer is refused in one line, not after the URL as
    # uvicorn's own error and exit status 3.
    sock = listen_socket(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    announce(f"lmlab studio: open {url}")
    if token:
        announce("  (every device must open this URL once: the token is its key; share it only with the class)")
    if host in ("0.0.0.0", "::"):
        announce(f"  from another computer, put this computer's address in place of {host}")
    slots = [r.name for r in app.app.state.runs.runs if r.trainable]
    if slots:
        announce(f"  the Training page may train into: {', '.join(slots)}")
    announce(f"  rankings go to {app.app.state.rankings.path}; Ctrl-C stops the studio")
    try:
        _server(app, host, port).run(sockets=[sock])
    finally:
        stop_training(app)
        sock.close()


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) for the studio to serve on; LmlabError in one line naming
    --host and --port when it cannot be (in use, not an address of this computer, unknown name)."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind(address)
    except OSError as e:
        if sock is not None:
            sock.close()
        why = e.strerror or str(e)
        hint = (": is a studio (or another server) already running there? Stop it, or pass "
                "another --port" if e.errno == errno.EADDRINUSE else "")
        raise LmlabError(f"cannot serve on --host {host} --port {port}: {why}{hint}") from None
    return sock


def _server(app, host: str, port: int):
    """A uvicorn server that, when told to stop (Ctrl-C), first tells the open training streams,
    which end within a poll so that the shutdown waits for nothing."""
    import uvicorn

    class StudioServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.app.state.stopping = True
            super().handle_exit(sig, frame)

    return StudioServer(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                       lifespan="off", timeout_graceful_shutdown=10))


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0):
    """Serve `app` with uvicorn in a background thread (port 0: a free one); yields its base URL.
    For scripts and tests that drive a real browser or many clients at once."""
    server = _server(app, host, port)
    thread = threading.Thread(target=server.run, name="lmlab-studio", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the studio did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.handle_exit(None, None)
        thread.join(30)
        stop_training(app)
