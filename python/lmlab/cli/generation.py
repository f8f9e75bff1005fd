"""The verbs that read a trained run: sample, predict, chat and inspect-data (they take no lock
and write nothing into the run)."""

from __future__ import annotations

import json
import sys

import numpy as np

from .. import checks
from ..chat import crop_context, template_of
from ..checkpoint import load_model
from ..files import check_parent_dir, check_replaceable
from ..instruct import generation_prompt, inspect_examples, instruct_dataset, respond
from ..sample import TextStream, generate, next_token_distribution
from ..tokenizer import undecodable_bytes
from .common import add_sampling_options, add_threads, apply_threads, check_sampling


def add_commands(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", default="",
                   help="the text to continue, or for an instruct-tuned run the question to answer "
                        "(default: none, so a plain run starts a document)")
    p.add_argument("--num-samples", type=int, default=1, help="how many samples, >= 1")
    p.add_argument("--stop", default=None, help="stop string: output is cut where it appears")
    p.add_argument("--no-stream", action="store_true", help="print each sample when complete")
    p.add_argument("--raw", action="store_true",
                   help="continue the prompt as plain text even if the run has a chat template")
    add_sampling_options(p, max_new_tokens=200, temperature=0.8)
    add_threads(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("predict", help="the next-token distribution for a prompt")
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", required=True, help="the text whose next token is predicted")
    p.add_argument("--top-k", type=int, default=10, help="show the k most likely (default 10)")
    p.add_argument("--png", default=None,
                   help=f"also draw a bar chart to this PNG (of the --top-k most likely, at most "
                        f"{CHART_ROWS})")
    p.add_argument("--json", action="store_true", help="one JSON object per token")
    add_threads(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("inspect-data", help="show which tokens of an instruct dataset get loss")
    p.add_argument("run", help="run directory whose tokenizer and block size to use")
    p.add_argument("--data", default="builtin:python-qa",
                   help="instruct data: builtin:python-qa or a JSONL file of prompt/response pairs "
                        "or messages")
    p.add_argument("-n", type=int, default=3, help="examples to show")
    p.add_argument("--block-size", type=int, default=None,
                   help="cut examples at this many tokens (default: the run's block size)")
    p.add_argument("--no-color", action="store_true",
                   help="mark supervised tokens with [brackets] instead of colour, and text "
                        "made of several byte-level tokens that split a character between "
                        "them as {text:N tokens}")
    p.set_defaults(func=cmd_inspect_data)

    p = sub.add_parser("chat", help="talk to an instruct-tuned run")
    p.add_argument("run", help="run directory")
    p.add_argument("--history", action="store_true",
                   help="keep earlier turns (their text) in the context")
    add_sampling_options(p, max_new_tokens=120, temperature=0.0)
    add_threads(p)
    p.set_defaults(func=cmd_chat)


class _StopString(Exception):
    """Raised from the streaming callback when the stop string has appeared."""


def generate_and_print(run, *, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                       num_samples, stop, stream, raw=False) -> None:
    """Sample from a run and print as tokens arrive. A run with a chat template (instruct-tuned)
    gets the prompt as a user turn and answers until <|end|> (or <|endoftext|>, where the model
    ends its text: instruct.generation_prompt), unless raw is set."""
    model, tok, _ = load_model(run)
    prompt_ids, stop_ids, turns = generation_prompt(tok, prompt, raw=raw)
    echo = f"{prompt}\n> " if turns else prompt
    prompt_ids = crop_context(prompt_ids, model.config.block_size, turns)
    for i in range(num_samples):
        s = None if seed is None else seed + i
        if num_samples > 1:
            print(f"--- sample {i + 1}" + (f" (seed {s})" if s is not None else "") + " ---")
        sys.stdout.write(echo)
        # A character split across BPE tokens appears whole, and text that may begin the stop
        # string waits until it is known not to (TextStream).
        text = TextStream(tok, stop)
        kept: list = []

        def on_token(token_id: int) -> None:
            piece = text.add(token_id)
            if stream and piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
            elif piece:
                kept.append(piece)
            if text.stopped:
                raise _StopString

        try:
            generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=s, stop_ids=stop_ids, callback=on_token, turns=turns)
        except _StopString:
            pass
        sys.stdout.write("".join(kept) + text.finish() + "\n")
        sys.stdout.flush()


def cmd_sample(args) -> int:
    apply_threads(args)
    check_sampling(args)
    checks.check("num_samples", args.num_samples)
    if args.stop == "":  # as Model.generate(stop="") refuses it; it would cut nothing, silently
        raise ValueError("--stop must be a non-empty string (or left out)")
    generate_and_print(args.run, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, num_samples=args.num_samples, stop=args.stop,
                       stream=not args.no_stream, raw=args.raw)
    return 0


def cmd_predict(args) -> int:
    apply_threads(args)
    checks.check("top_k", args.top_k)
    if args.png is not None:
        checks.check_output_path("png", args.png, "the PNG file to draw the chart in")
        # a folder, a device, or a file where a folder must be: refused before any work
        check_replaceable(args.png)
        check_parent_dir(args.png)
    model, tok, _ = load_model(args.run)
    ids = tok.encode(args.prompt, name="prompt")
    if not len(ids):
        ids = np.array([tok.eot_id], np.int32)  # an empty prompt: where every document starts
    probs = next_token_distribution(model, ids)
    order = np.argsort(-probs, kind="stable")[: args.top_k]
    rows = [(tok.decode([int(i)]), int(i), float(probs[i])) for i in order]
    if args.json:
        for text, i, p in rows:
            print(json.dumps({"token": text, "id": i, "probability": p}))
    else:
        print(f"next token after {args.prompt!r}:")
        width = max(len(repr(t)) for t, _, _ in rows)
        for text, i, p in rows:
            bar = "#" * int(round(p * 50))
            print(f"  {repr(text):<{width}}  {p:7.2%}  {bar}")
    if args.png is not None:
        _bar_chart(rows[:CHART_ROWS], args.prompt, args.png)
        if len(rows) > CHART_ROWS:
            print(f"lmlab predict: the chart shows the {CHART_ROWS} most likely of the {len(rows)} "
                  "tokens listed", file=sys.stderr)
        # with --json, standard output holds JSON lines only
        print(f"wrote {args.png}", file=sys.stderr if args.json else sys.stdout)
    return 0


PROMPT_SHOWN = 40  # characters of the prompt's end in the chart's title
# Bars in predict's chart, 0.4 inch each: --top-k 50000 --png (every token of an imported GPT-2)
# drew a figure some two million pixels tall, gigabytes of canvas, and 2,000 bars no one can read.
CHART_ROWS = 50


def _bar_chart(rows, prompt, path) -> None:
    # only here: drawing is optional and slow to import; the demo views' figure, label and
    # atomic PNG helpers (Agg canvas, no pyplot; a '$' is drawn, not read as mathtext)
    from ..demo_common import new_figure, quoted_label, save_png

    fig = new_figure(8, 0.4 * len(rows) + 1.5)
    ax = fig.subplots()
    ax.barh(range(len(rows))[::-1], [p for _, _, p in rows], color="tab:blue")
    ax.set_yticks(range(len(rows))[::-1], [quoted_label(t) for t, _, _ in rows])
    ax.set_xlabel("probability")
    # the end of a long prompt is what the next token follows; an empty one starts a document
    shown = prompt if len(prompt) <= PROMPT_SHOWN else "\u2026" + prompt[-(PROMPT_SHOWN - 1):]
    shown = shown or "<|endoftext|>"
    ax.set_title(f"next token after {quoted_label(shown)}")
    # PNG at exactly the path named (matplotlib would add ".png" to a name without one), atomically.
    save_png(fig, path)


def cmd_inspect_data(args) -> int:
    checks.check("n", args.n)
    if args.block_size is not None:
        checks.check("block_size", args.block_size)
    model, tok, _ = load_model(args.run)
    block = args.block_size or model.config.block_size
    conversations, labels = instruct_dataset(args.data)
    print(inspect_examples(tok, conversations, block, n=args.n,
                           color=not args.no_color and sys.stdout.isatty(), labels=labels))
    return 0


def cmd_chat(args) -> int:
    apply_threads(args)
    check_sampling(args)
    model, tok, _ = load_model(args.run)
    if template_of(tok) is None:
        # Allowed, since a base model failing to answer is itself worth seeing; but said.
        print(f"lmlab chat: note: {args.run} is not instruct-tuned (no chat template), so it has "
              "never seen a conversation and will most likely continue text rather than answer; "
              "`lmlab instruct` tunes one", file=sys.stderr)
    print("lmlab chat: type a message, an empty line or Ctrl-D to quit.")
    history: list = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            return 0
        undecodable = undecodable_bytes(line)
        if undecodable:
            shown = ", ".join(f"0x{b:02x}" for b in undecodable)
            print(f"lmlab chat: the message is not UTF-8 text (bytes {shown}); please type it "
                  "again as UTF-8")
            continue
        unknown = tok.unknown_chars(line)
        if unknown:
            # Asked again rather than ended: the session (and its history) goes on.
            shown = ", ".join(repr(c) for c in unknown)
            print(f"lmlab chat: this model's tokenizer cannot encode {shown}; please type the "
                  "message without them")
            continue
        messages = (history if args.history else []) + [{"role": "user", "content": line}]
        sys.stdout.write("model> ")
        sys.stdout.flush()
        text, _, stop = respond(model, tok, messages, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                seed=args.seed)
        # " [...]": cut at --max-new-tokens. A reply that stopped, at <|end|> or where the model
        # ended its text (<|endoftext|>), is shown whole.
        print(text + ("" if stop else " [...]"))
        # The history holds text only (respond() leaves out every special token), so a later
        # turn renders it through the template like any message.
        history = messages + [{"role": "assistant", "content": text}]
