"""`lmlab studio`: serve the teaching pages for the runs named (lmlab.studio does the work)."""

from __future__ import annotations

import importlib.util

from ..rankings import check_rankings_output, read_prompts

INSTALL_HINT = 'the studio needs starlette and uvicorn: pip install "lmlab[studio]"'


def add_commands(sub) -> None:
    p = sub.add_parser(
        "studio", help="the lecture in the browser: descent, next token, loss, training, rank, "
                       "chat, embeddings",
        description="Serve a local web app over the runs named. It binds 127.0.0.1 unless --host "
                    "says otherwise; any other host gets a random access token, printed in the "
                    "URL, which every request must carry. The pages read only these runs and "
                    "write only the rankings file and the runs named with --train-into.")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run directories the pages may use")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; "
                        "0.0.0.0 lets a class in, with a token)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--rankings", default="rankings.jsonl",
                   help="the rankings JSONL the Rank page appends to (default rankings.jsonl)")
    p.add_argument("--train-into", action="append", default=[], metavar="DIR",
                   help="a run directory the Training page may train (pretrain on a built-in "
                        "corpus, or finetune / instruct from a run named here); it need not exist "
                        "yet, and one holding a run can only be resumed. Repeat for several")
    p.add_argument("--prompts", default=None,
                   help="prompts offered on the Rank page (one per line, or JSONL)")
    p.set_defaults(func=cmd_studio)


def cmd_studio(args) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if not args.host.strip():  # "" binds every interface, as 0.0.0.0 does: say which
        raise ValueError(f"--host {args.host!r} is empty: name an address (127.0.0.1, this "
                         "computer only; 0.0.0.0 for a class)")
    if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None:
        raise ValueError(INSTALL_HINT)
    from ..studio import serve

    prompts = read_prompts(args.prompts) if args.prompts else []
    # Not whether it can be written: a studio that only shows runs may start anywhere.
    check_rankings_output(args.rankings, writable=False)
    serve(args.runs, host=args.host, port=args.port, rankings=args.rankings, prompts=prompts,
          train_into=args.train_into)
    return 0
