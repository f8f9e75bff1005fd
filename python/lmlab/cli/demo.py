"""The `lmlab demo` verb: one sub-verb per teaching view (lmlab.demo), each printing its
explanation beside the files it wrote."""

from __future__ import annotations

import argparse

from .. import demo_model, demo_training
from ..demo_common import SettingValueError
from ..demo_descent import DEFAULT_LRS, descent, landscape

# The views' keywords whose flag is not the keyword with dashes.
FLAGS = {"temperatures": "--temperature", "k": "-k"}


def _positive_int(text: str) -> int:
    # ArgumentTypeError for "x" too: argparse words a ValueError with this function's name
    # ("invalid _positive_int value: 'x'")
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _add_common(p, default_out: str, animation: str | None = None) -> None:
    if animation is not None:
        p.add_argument("--no-gif", action="store_true", help=f"skip the {animation} (faster)")
    p.add_argument("--out", default=default_out, help=f"output directory for the images (default {default_out})")
    p.set_defaults(func=run_demo)


def add_demo_arguments(subparsers) -> argparse.ArgumentParser:
    """Add the `demo` verb, with one sub-verb per view, to an argparse subparsers object."""
    demo = subparsers.add_parser(
        "demo", help="teaching views: gradient descent, loss, sampling, training, embeddings",
        description="Draw one idea of how language models learn, from real computation, as PNG images "
        "(and an animated GIF where motion helps) with a short explanation.")
    views = demo.add_subparsers(dest="demo_view", metavar="VIEW", required=True)

    # each view: (name, help, needs a run dir, animation or None, options as (flags, type, default, help));
    # type None marks a required string option, a list default takes one or more values
    specs = [
        ("descent", "gradient descent on a parabola for four learning rates (and yours)", False, "animation", [
            ("--lr", float, None, "your learning rate, drawn beside the compared ones"),
            ("--lrs", float, list(DEFAULT_LRS), "the learning rates compared: slow, good, oscillates, diverges"),
            ("--start", float, 4.0, "starting x"),
            ("--steps", _positive_int, 20, "gradient steps")]),
        ("landscape", "what can go wrong: local minima, erratic slopes; momentum and Adam", False, "animation", [
            ("--start", float, 3.0, "start on the bumpy function"),
            ("--lr", float, 0.01, "plain GD and momentum learning rate"),
            ("--momentum", float, 0.9, "momentum coefficient beta"),
            ("--adam-lr", float, 0.3, "Adam learning rate"),
            ("--steps", _positive_int, 100, "steps per optimiser")]),
        ("loss", "a model's probability and cross-entropy for every token of a text", True, None, [
            ("--text", None, None, "the text to score")]),
        ("sampling", "the next-token distribution, temperature / top-k / top-p, samples", True,
         "token-by-token animation", [
            ("--prompt", None, None, "the text the model continues"),
            ("--temperature", float, [0.5, 1.5], "temperatures to compare with 1.0"),
            ("--top-k", _positive_int, 5, "k for the top-k panel"),
            ("--top-p", float, 0.9, "p for the top-p panel"),
            ("--show", _positive_int, 15, "tokens shown per bar chart"),
            ("--samples", _positive_int, 4, "samples with different seeds"),
            ("--seed", int, 0, "first seed; the repeat uses this one"),
            ("--max-new-tokens", _positive_int, 40, "length of each sample")]),
        ("training", "a run's loss curves, learning rate and samples along the way", True, None, [
            ("--prompt", str, "", "prompt for the samples (empty: start of a document)"),
            ("--max-new-tokens", _positive_int, 60, "length of each sample"),
            ("--seed", int, 0, "sampling seed, the same at every checkpoint sampled")]),
        ("embeddings", "nearest tokens by cosine similarity and a PCA map of embeddings", True, None, [
            ("--token", None, None, "the token whose neighbours to list (its text)"),
            ("-k --neighbours", _positive_int, 10, "neighbours listed"),
            ("--labels", _positive_int, 120, "most tokens labelled on the map")]),
    ]
    for name, summary, needs_run, animation, options in specs:
        p = views.add_parser(name, help=summary, description=summary)
        if needs_run:
            p.add_argument("run", help="run directory of a trained model (from lmlab pretrain / finetune / ...)")
        for flags, kind, default, text in options:
            if kind is None:
                p.add_argument(*flags.split(), required=True, help=text)
                continue
            many = {"nargs": "+"} if isinstance(default, list) else {}
            shown = " ".join(map(str, default)) if many else default
            text += "" if default is None else f" (default {shown})"
            p.add_argument(*flags.split(), type=kind, default=default, help=text, **many)
        if name == "loss":
            p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                           help="colour the tokens in the terminal (default auto: on a terminal, unless NO_COLOR)")
        _add_common(p, f"demo_out/{name}", animation)
    return demo


def run_demo(args) -> int:
    """Run the view chosen on the command line, print its explanation and the files it wrote; a
    refused setting is named by its flag."""
    try:
        result = _run_view(args)
    except SettingValueError as e:
        flag = FLAGS.get(e.name, "--" + e.name.replace("_", "-"))
        raise ValueError(f"{flag} {e.rest}") from None
    print(result.report(), end="")
    return 0


def _run_view(args):
    view = args.demo_view
    if view == "descent":
        result = descent(args.out, lr=args.lr, lrs=args.lrs, start=args.start, steps=args.steps, gif=not args.no_gif)
    elif view == "landscape":
        result = landscape(args.out, start=args.start, lr=args.lr, momentum=args.momentum, adam_lr=args.adam_lr,
                           steps=args.steps, gif=not args.no_gif)
    else:
        if view == "loss":
            colour = {"auto": None, "always": True, "never": False}[args.color]
            result = demo_model.loss(args.run, args.text, args.out, colour=colour)
        elif view == "sampling":
            result = demo_model.sampling(
                args.run, args.prompt, args.out, temperatures=args.temperature, top_k=args.top_k,
                top_p=args.top_p, show=args.show, samples=args.samples, seed=args.seed,
                max_new_tokens=args.max_new_tokens, gif=not args.no_gif)
        elif view == "training":
            result = demo_training.training(args.run, args.out, prompt=args.prompt,
                                         max_new_tokens=args.max_new_tokens, seed=args.seed)
        elif view == "embeddings":
            result = demo_model.embeddings(args.run, args.token, args.out, k=args.neighbours, labels=args.labels)
        else:
            raise ValueError(f"unknown demo view {view!r}")
    return result
