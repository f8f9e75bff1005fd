"""Next-token prediction: the language-modelling stage, and `pretrain()`, the main job.

Pretraining and style fine-tuning share this stage: every position of every window counts, each
with weight 1/(B*T), through the one weighted cross-entropy kernel.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np

from . import ops
from .rundir import is_run
from .train import TrainConfig, TrainResult, train


class LanguageModelingStage:
    """Random windows of a token stream; the loss is the mean over every position."""

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, batch_size: int,
                 block_size: int, seed: int, eval_batches: int = 20):
        from .data import BatchSampler

        self.sampler = BatchSampler(train_tokens, batch_size, block_size, seed)
        self.val_tokens = val_tokens
        self.batch_size, self.block_size = batch_size, block_size
        self.eval_batches = eval_batches
        self.eval_seed = seed + 1
        self._weights = np.full((batch_size, block_size), 1.0 / (batch_size * block_size),
                                dtype=np.float32)

    def train_step(self, model, scale: float) -> dict:
        x, y = self.sampler.next()
        _, losses = model.forward(x, y)
        loss = float(losses.mean(dtype=np.float64))
        model.backward(self._weights * np.float32(scale))
        return {"loss": loss, "tokens": x.size}

    def evaluate(self, model) -> dict:
        return {"val_loss": evaluate_loss(model, self.val_tokens, self.batch_size, self.block_size,
                                          self.eval_batches, self.eval_seed)}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.sampler.load_state_dict(d["sampler"])


def evaluate_loss(model, tokens: np.ndarray, batch_size: int, block_size: int, batches: int,
                  seed: int) -> float:
    """Mean next-token loss over `batches` seeded random windows (the same windows every call)."""
    from .data import BatchSampler

    block_size = min(block_size, len(tokens) - 1)
    sampler = BatchSampler(tokens, batch_size, block_size, seed)
    total = 0.0
    for _ in range(batches):
        x, y = sampler.next()
        _, losses = model.forward(x, y)
        total += float(losses.mean(dtype=np.float64))
    return total / batches


DEFAULT_CORPUS = "builtin:python-docs"


def pretrain(corpus: Optional[str] = None, run_dir="runs/pretrain", *,
             tokenizer: str = "char", vocab_size: int = 512, n_layer: int = 4, n_head: int = 4,
             n_embd: int = 128, block_size: int = 64, batch_size: int = 12,
             val_fraction: float = 0.1, eval_batches: int = 20, threads: Optional[int] = None,
             resume: bool = False, seed: int = 1337, **train_kwargs) -> TrainResult:
    """Train a GPT from scratch on a corpus by next-token prediction; everything lands in run_dir.

    corpus: a file, directory, glob or "builtin:NAME" (default builtin:python-docs; when resuming,
    the run's own corpus). Model-shape arguments are ignored when resuming. tokenizer: "char" or "bpe" (vocab_size
    applies to "bpe"). Other keyword arguments go to TrainConfig (steps, lr, warmup_steps, ...).
    """
    from .data import load_corpus, split_tokens, tokenize_corpus
    from .model import GPT, GPTConfig
    from .tokenizer import Tokenizer, train_tokenizer

    if threads:
        ops.set_num_threads(threads)
    run_dir = Path(run_dir)
    cfg = TrainConfig(seed=seed, **train_kwargs)
    if resume:
        from .checkpoint import load_model
        model, tok, saved = load_model(run_dir)
        model_config = model.config
        corpus = corpus or (saved.get("train") or {}).get("corpus") or DEFAULT_CORPUS
    else:
        if is_run(run_dir):
            raise FileExistsError(f"{run_dir} already holds a run; pass resume=True (--resume) to "
                                  "continue it, or choose another run directory")
        corpus = corpus or DEFAULT_CORPUS
        text = load_corpus(corpus)
        tok = train_tokenizer(text, tokenizer, vocab_size)
        model_config = GPTConfig(vocab_size=tok.vocab_size, block_size=block_size,
                                 n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        model = GPT(model_config, seed=seed)
    tokens = tokenize_corpus(corpus, tok)
    train_tokens, val_tokens = split_tokens(tokens, val_fraction)
    stage = LanguageModelingStage(train_tokens, val_tokens, batch_size, model_config.block_size,
                                  seed, eval_batches)
    run_config = {"stage": "pretrain", "corpus": corpus, "model": asdict(model_config),
                  "batch_size": batch_size, "val_fraction": val_fraction,
                  "threads": ops.get_num_threads(), "cpu": ops.cpu_info()["isa"]}
    return train(model, stage, cfg, run_dir, tokenizer=tok, run_config=run_config, resume=resume)
