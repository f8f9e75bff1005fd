"""Next-token prediction: the language-modelling stage, and `pretrain()`, the main job.

Pretraining and style fine-tuning share this stage: every position of every window counts, each
with weight 1/(B*T), through the one weighted cross-entropy kernel.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Optional

import numpy as np

from . import _CallableStage, checks, distributed, ops
from .chat import stop_ids
from .checkpoint import load_model
from .data import (BatchSampler, corpus_files_if_large, load_corpus, split_tokens,
                   tokenize_corpus)
from .model import GPT, GPTConfig
from .sample import generate
from .stage import StageResult, open_stage
from .token_shards import corpus_text_for_tokenizer
from .tokenizer import train_tokenizer, train_tokenizer_on_chunks
from .train import train


# A new run's tokenizer is built from its corpus, so only a corpus edited before a resume can
# hold characters the tokenizer cannot represent; pretraining has no policy for them to choose.
EDITED_HINT = ("; the corpus has changed since this run's tokenizer was built from it: restore it, "
               "or train on it with `lmlab finetune RUN --corpus CORPUS --out NEW --unknown skip` "
               "(or a new run)")


class LanguageModelingStage:
    """Random windows of a token stream; the loss is the mean over every position."""

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, batch_size: int,
                 block_size: int, seed: int, eval_batches: int = 20):
        self.sampler = BatchSampler(train_tokens, batch_size, block_size, seed)
        self.val_tokens = val_tokens
        self.batch_size, self.block_size = batch_size, block_size
        self.eval_batches = eval_batches
        self.eval_seed = seed + 1
        self._weights = np.full((batch_size, block_size), 1.0 / (batch_size * block_size),
                                dtype=np.float32)

    def train_step(self, model) -> dict:
        x, y = self.sampler.next()
        _, losses = model.forward(x, y)
        loss = float(losses.mean(dtype=np.float64))
        return {"loss": loss, "tokens": x.size, "weights": self._weights}

    def skip_step(self) -> None:
        self.sampler.skip()

    def data_fingerprint(self) -> str:
        return distributed.fingerprint(self.sampler.tokens, self.val_tokens)

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
    block_size = min(block_size, len(tokens) - 1)
    sampler = BatchSampler(tokens, batch_size, block_size, seed)
    total = 0.0
    for _ in range(batches):
        x, y = sampler.next()
        _, losses = model.forward(x, y)
        total += float(losses.mean(dtype=np.float64))
    return total / batches


def check_tokens_fit(corpus: str, train_tokens, val_tokens, block_size: int,
                     eval_every: int) -> None:
    """Refuse, before training, a split too short for one window of block_size + 1 tokens (a
    validation split is needed only when evaluation is on)."""
    need = block_size + 1
    if len(train_tokens) < need:
        raise ValueError(f"the training split of {corpus} has {len(train_tokens)} tokens; a "
                         f"window of block_size {block_size} needs {need}: use a longer corpus "
                         "or a smaller block size")
    if eval_every and len(val_tokens) < need:
        raise ValueError(f"the validation split of {corpus} has {len(val_tokens)} tokens; a "
                         f"window of block_size {block_size} needs {need}: raise val_fraction "
                         "(--val-fraction), use a longer corpus, or turn evaluation off "
                         "(eval_every 0)")


def sample_prompt_ids(tok, prompt: str) -> np.ndarray:
    """The ids a sample after training continues: the prompt's, or for an empty prompt
    <|endoftext|>, where every document starts. A stage encodes it before training, so a prompt
    its tokenizer cannot encode is refused before any work."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be text (a str), got {type(prompt).__name__}")
    return tok.encode(prompt, name="prompt") if prompt else np.array([tok.eot_id], dtype=np.int32)


def sample_text(model, tok, prompt: str, ids, n: int, seed: int) -> str:
    """The prompt and up to n tokens sampled after it (temperature 0.8, ends at <|endoftext|> or
    at the model's own end-of-text tokens, chat.stop_ids)."""
    out = generate(model, ids, n, temperature=0.8, seed=seed, stop_ids=stop_ids(tok, tok.eot_id))
    return prompt + tok.decode(out)


def pretrain(corpus: Optional[str] = None, run_dir="runs/pretrain", *, prompt: str = "",
             sample_after: int = 0, resume: bool = False, overwrite: bool = False,
             threads: Optional[int] = None, **settings) -> StageResult:
    """Train a GPT from scratch on a corpus by next-token prediction; everything lands in run_dir.

    corpus: a file, directory, glob or "builtin:NAME" (default builtin:python-docs). settings: any
    of STAGE_DEFAULTS["pretrain"] (model shape, tokenizer "char"/"bpe", vocab_size for "bpe",
    batch_size, val_fraction, and TrainConfig's steps, lr, warmup_steps, ...). resume=True
    continues the run in run_dir with its own settings (lmlab.stage says which may change).
    sample_after > 0 samples that many tokens after `prompt` when training ends (not when it
    stopped early): the result's details["sample"], the prompt included.
    """
    checks.check("sample_after", sample_after)
    with open_stage("pretrain", run_dir, {"corpus": corpus, **settings}, resume=resume,
                    overwrite=overwrite, threads=threads) as run:
        s = run.settings
        if resume:
            model, tok, _ = load_model(run_dir)
        else:
            large = corpus_files_if_large(s["corpus"])
            if large:  # never held whole: the tokenizer learns from it chunk by chunk
                tok = train_tokenizer_on_chunks(corpus_text_for_tokenizer(large),
                                                s["tokenizer"], s["vocab_size"])
            else:
                tok = train_tokenizer(load_corpus(s["corpus"]), s["tokenizer"], s["vocab_size"])
            if (s["tokenizer"] == "bpe" and tok.vocab_size < s["vocab_size"]
                    and distributed.world().is_root):
                # Kept as asked in the settings; the model's (and tokenizer's) size is the real one.
                print(f"lmlab: BPE: the corpus yields only {tok.vocab_size} tokens of the "
                      f"{s['vocab_size']} asked (vocab_size); the model has {tok.vocab_size} "
                      "(config.json: model.vocab_size)", file=sys.stderr)
            model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=s["block_size"],
                                  n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"]),
                        seed=s["seed"])
        prompt_ids = sample_prompt_ids(tok, prompt) if sample_after > 0 else None
        T = model.config.block_size
        # Under MPI rank 0 tokenizes (or streams the corpus into its cache) first, then the
        # others read that cache rather than all writing it at once.
        tokens = distributed.world().root_first(
            lambda: tokenize_corpus(s["corpus"], tok, progress=s["progress"], hint=EDITED_HINT))
        train_tokens, val_tokens = split_tokens(tokens, s["val_fraction"])
        cfg = run.train_config()
        check_tokens_fit(s["corpus"], train_tokens, val_tokens, T, cfg.eval_every)
        stage = LanguageModelingStage(train_tokens, val_tokens, s["batch_size"], T, s["seed"],
                                      s["eval_batches"])
        run_config = run.run_config(corpus=s["corpus"], model=asdict(model.config),
                                    batch_size=s["batch_size"], val_fraction=s["val_fraction"],
                                    threads=ops.get_num_threads(), cpu=ops.cpu_info()["isa"])
        result = train(model, stage, cfg, run.hold(), tokenizer=tok,
                       run_config=run_config, resume=resume)
    details = {}
    if sample_after > 0 and not result.stopped_early:
        details["sample"] = sample_text(model, tok, prompt, prompt_ids, sample_after, seed=0)
    return StageResult.from_training("pretrain", run_dir, result, **details)


# lmlab.pretrain(...) calls lmlab.api.pretrain (see lmlab._CallableStage).
sys.modules[__name__].__class__ = _CallableStage
