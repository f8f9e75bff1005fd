"""Teaching views: `lmlab demo <view>` draws one idea of how language models learn from real computation.

Each view is a library function that writes PNG files (and an animated GIF where motion helps) into
an output directory and returns a DemoResult (files written, every number shown, the explanation):

  descent     gradient descent on x^2 for slow / good / oscillating / diverging learning rates
  landscape   what can go wrong (local vs global minimum, erratic slope) and momentum / Adam
  loss        a trained model's probability of each right next token in a text, and -log p
  sampling    the next-token distribution, reshaped by temperature / top-k / top-p, and samples
  training    a run's loss curves and learning rate, and samples along its checkpoints
  embeddings  nearest tokens by cosine similarity, and a 2-D PCA map of the token embeddings

The first two live in lmlab.demo_descent and need only numpy and matplotlib; the others live in
lmlab.demo_model and take a run directory or a (model, tokenizer) pair. This module also wires the
views into the command line: add_demo_arguments(subparsers) adds the `demo` verb, run_demo(args)
runs the chosen view and prints its explanation beside the files it wrote.
"""

from __future__ import annotations

import argparse

from .demo_common import DemoResult
from .demo_descent import DEFAULT_LRS, descent, landscape, local_global, optimizers, erratic

__all__ = [
    "DemoResult", "descent", "landscape", "local_global", "erratic", "optimizers",
    "loss", "sampling", "training", "embeddings", "add_demo_arguments", "run_demo",
]

_MODEL_VIEWS = ("loss", "sampling", "training", "embeddings")


def __getattr__(name):
    # the model views import lmlab.model / sample / checkpoint: only load them when asked for
    if name in _MODEL_VIEWS:
        from . import demo_model

        return getattr(demo_model, name)
    raise AttributeError(f"module 'lmlab.demo' has no attribute {name!r}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _add_common(p, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help=f"output directory for the images (default {default_out})")
    p.set_defaults(func=run_demo)


def _add_run(p) -> None:
    p.add_argument("run", help="run directory of a trained model (from lmlab pretrain / finetune / ...)")


def add_demo_arguments(subparsers) -> argparse.ArgumentParser:
    """Add the `demo` verb, with one sub-verb per view, to an argparse subparsers object."""
    demo = subparsers.add_parser(
        "demo", help="teaching views: gradient descent, loss, sampling, training, embeddings",
        description="Draw one idea of how language models learn, from real computation, as PNG images "
        "(and an animated GIF where motion helps) with a short explanation.")
    views = demo.add_subparsers(dest="demo_view", metavar="VIEW", required=True)

    p = views.add_parser("descent", help="gradient descent on a parabola for four learning rates (and yours)")
    p.add_argument("--lr", type=float, default=None, help="your learning rate, drawn beside the four defaults")
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS),
                   help="the learning rates compared (default: 0.05 slow, 0.3 good, 0.9 oscillates, 1.05 diverges)")
    p.add_argument("--start", type=float, default=4.0, help="starting x (default 4)")
    p.add_argument("--steps", type=_positive_int, default=20, help="gradient steps (default 20)")
    p.add_argument("--no-gif", action="store_true", help="skip the animation (faster)")
    _add_common(p, "demo_out/descent")

    p = views.add_parser("landscape", help="what can go wrong: local minima, erratic slopes; momentum and Adam")
    p.add_argument("--start", type=float, default=3.0, help="start on the bumpy function (default 3)")
    p.add_argument("--lr", type=float, default=0.01, help="plain GD and momentum learning rate (default 0.01)")
    p.add_argument("--momentum", type=float, default=0.9, help="momentum coefficient beta (default 0.9)")
    p.add_argument("--adam-lr", type=float, default=0.3, help="Adam learning rate (default 0.3)")
    p.add_argument("--steps", type=_positive_int, default=100, help="steps per optimiser (default 100)")
    p.add_argument("--no-gif", action="store_true", help="skip the animation (faster)")
    _add_common(p, "demo_out/landscape")

    p = views.add_parser("loss", help="a model's probability and cross-entropy for every token of a text")
    _add_run(p)
    p.add_argument("--text", required=True, help="the text to score")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the tokens in the terminal (default: auto, off when NO_COLOR is set)")
    _add_common(p, "demo_out/loss")

    p = views.add_parser("sampling", help="the next-token distribution, temperature / top-k / top-p, samples")
    _add_run(p)
    p.add_argument("--prompt", required=True, help="the text the model continues")
    p.add_argument("--temperature", type=float, nargs="+", default=[0.5, 1.5],
                   help="temperatures to compare with 1.0 (default 0.5 1.5)")
    p.add_argument("--top-k", type=_positive_int, default=5, help="k for the top-k panel (default 5)")
    p.add_argument("--top-p", type=float, default=0.9, help="p for the top-p panel (default 0.9)")
    p.add_argument("--show", type=_positive_int, default=15, help="tokens shown per bar chart (default 15)")
    p.add_argument("--samples", type=_positive_int, default=4, help="samples with different seeds (default 4)")
    p.add_argument("--seed", type=int, default=0, help="first seed; the repeat uses this one (default 0)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=40, help="length of each sample (default 40)")
    p.add_argument("--no-gif", action="store_true", help="skip the token-by-token animation (faster)")
    _add_common(p, "demo_out/sampling")

    p = views.add_parser("training", help="a run's loss curves, learning rate and samples along the way")
    _add_run(p)
    p.add_argument("--prompt", default="", help="prompt for the samples (default: start of text)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=60, help="length of each sample (default 60)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same at every checkpoint (default 0)")
    _add_common(p, "demo_out/training")

    p = views.add_parser("embeddings", help="nearest tokens by cosine similarity and a PCA map of embeddings")
    _add_run(p)
    p.add_argument("--token", required=True, help="the token whose neighbours to list (its text)")
    p.add_argument("-k", "--neighbours", type=_positive_int, default=10, help="neighbours listed (default 10)")
    p.add_argument("--labels", type=_positive_int, default=120, help="most tokens labelled on the map (default 120)")
    _add_common(p, "demo_out/embeddings")
    return demo


def run_demo(args) -> int:
    """Run the view chosen on the command line, print its explanation and the files it wrote."""
    view = args.demo_view
    if view == "descent":
        result = descent(args.out, lr=args.lr, lrs=args.lrs, start=args.start, steps=args.steps, gif=not args.no_gif)
    elif view == "landscape":
        result = landscape(args.out, start=args.start, lr=args.lr, momentum=args.momentum, adam_lr=args.adam_lr,
                           steps=args.steps, gif=not args.no_gif)
    else:
        from . import demo_model

        if view == "loss":
            colour = {"auto": None, "always": True, "never": False}[args.color]
            result = demo_model.loss(args.run, args.text, args.out, colour=colour)
        elif view == "sampling":
            result = demo_model.sampling(
                args.run, args.prompt, args.out, temperatures=args.temperature, top_k=args.top_k,
                top_p=args.top_p, show=args.show, samples=args.samples, seed=args.seed,
                max_new_tokens=args.max_new_tokens, gif=not args.no_gif)
        elif view == "training":
            result = demo_model.training(args.run, args.out, prompt=args.prompt,
                                         max_new_tokens=args.max_new_tokens, seed=args.seed)
        elif view == "embeddings":
            result = demo_model.embeddings(args.run, args.token, args.out, k=args.neighbours, labels=args.labels)
        else:
            raise ValueError(f"unknown demo view {view!r}")
    print(result.report(), end="")
    return 0
