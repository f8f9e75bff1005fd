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
lmlab.demo_model and take a run directory or a (model, tokenizer) pair; this module gathers them
in one namespace. The `lmlab demo` verb is in lmlab.cli.demo.
"""

from __future__ import annotations

from .demo_common import DemoResult
from .demo_descent import descent, landscape, local_global, optimizers, erratic

__all__ = [
    "DemoResult", "descent", "landscape", "local_global", "erratic", "optimizers",
    "loss", "sampling", "training", "embeddings",
]

_MODEL_VIEWS = ("loss", "sampling", "training", "embeddings")


def __getattr__(name):
    # the model views import lmlab.model / sample / checkpoint: only load them when asked for
    if name in _MODEL_VIEWS:
        if name == "training":
            from .demo_training import training

            return training
        from . import demo_model

        return getattr(demo_model, name)
    raise AttributeError(f"module 'lmlab.demo' has no attribute {name!r}")
