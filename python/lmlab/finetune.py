"""Style fine-tuning: continue next-token training from a run on a new corpus.

The parent's tokenizer is kept (the model's embeddings are indexed by it), so text it cannot encode
is found and reported before any training, and handled as the user chooses: fail, skip the
characters, or replace them. The report gives validation loss on the new corpus and on the parent's
corpus before and after, so both the shift in style and any forgetting are numbers, plus samples from
both models for the same prompt.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import ops
from .pretrain import LanguageModelingStage, evaluate_loss
from .train import TrainConfig, train

UNKNOWN_POLICIES = ("error", "skip", "replace")


@dataclass
class FinetuneReport:
    run_dir: str
    parent: str
    new_val_before: float
    new_val_after: float
    old_val_before: Optional[float]  # None when the parent's corpus is not readable here
    old_val_after: Optional[float]
    unknown_chars: dict = field(default_factory=dict)  # character -> count, before handling
    samples: dict = field(default_factory=dict)  # "parent" / "finetuned" -> text
    stopped_early: bool = False

    def summary(self) -> str:
        lines = [f"fine-tuned {self.parent} -> {self.run_dir}",
                 f"  new corpus val loss: {self.new_val_before:.4f} -> {self.new_val_after:.4f} "
                 f"({self.new_val_after - self.new_val_before:+.4f})"]
        if self.old_val_before is not None:
            lines.append(f"  parent corpus val loss: {self.old_val_before:.4f} -> "
                         f"{self.old_val_after:.4f} ({self.old_val_after - self.old_val_before:+.4f})")
        return "\n".join(lines)


def encode_new_corpus(text: str, tokenizer, policy: str) -> tuple:
    """Token ids of the new corpus under the unknown-character policy ("error", "skip" or
    "replace" with U+FFFD), and the Counter of characters the tokenizer cannot encode."""
    if policy not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown-character policy must be one of {UNKNOWN_POLICIES}, got {policy!r}")
    unknown = tokenizer.unknown_chars(text)
    if unknown and policy == "error":
        shown = ", ".join(f"{c!r} x{n}" for c, n in unknown.most_common(10))
        more = "" if len(unknown) <= 10 else f" and {len(unknown) - 10} more"
        raise ValueError(
            f"the parent's tokenizer cannot encode {sum(unknown.values())} characters of the new "
            f"corpus ({len(unknown)} distinct: {shown}{more}). Choose unknown='skip' "
            f"(--unknown skip) to drop them or unknown='replace' (--unknown replace) to map them "
            f"to the replacement character.")
    return tokenizer.encode(text, unknown=policy), unknown


def _sample_text(model, tok, prompt: str, n: int, seed: int) -> str:
    from .sample import generate
    ids = tok.encode(prompt) if prompt else np.array([tok.eot_id], dtype=np.int32)
    out = generate(model, ids, n, temperature=0.8, seed=seed, stop_ids=[tok.eot_id])
    return prompt + tok.decode(out)


def freeze_prefixes(n_layers_frozen: int, freeze_embeddings: bool, n_layer: int) -> list:
    if not 0 <= n_layers_frozen <= n_layer:
        raise ValueError(f"freeze_layers must be between 0 and n_layer = {n_layer}, got {n_layers_frozen}")
    prefixes = [f"h.{i}." for i in range(n_layers_frozen)]
    if freeze_embeddings:
        prefixes += ["wte", "wpe"]  # wte is tied to the LM head: freezing it freezes the head too
    return prefixes


def finetune(parent, corpus: str, run_dir, *, unknown: str = "error", freeze_layers: int = 0,
             freeze_embeddings: bool = False, batch_size: Optional[int] = None,
             val_fraction: float = 0.1, eval_batches: int = 20, prompt: str = "",
             sample_tokens: int = 200, threads: Optional[int] = None, resume: bool = False,
             seed: int = 1337, **train_kwargs) -> FinetuneReport:
    """Fine-tune the model in run directory `parent` on `corpus`, writing a new run to `run_dir`.

    Keyword arguments beyond these go to TrainConfig (steps, lr, warmup_steps, ...); a lower learning
    rate than pretraining's is typical (the default here is 3e-4 with 50 warmup steps).
    """
    from .checkpoint import load_model
    from .data import load_corpus, split_tokens

    if threads:
        ops.set_num_threads(threads)
    parent, run_dir = Path(parent), Path(run_dir)
    if run_dir.resolve() == parent.resolve():
        raise ValueError("the fine-tuned run needs its own directory (it records its parent)")
    base, tok, parent_config = load_model(parent)
    model, _, _ = load_model(parent)  # the copy that trains; `base` stays as the parent
    tokens, unknown_counts = encode_new_corpus(load_corpus(corpus), tok, unknown)
    train_tokens, val_tokens = split_tokens(tokens, val_fraction)
    parent_run = parent_config.get("train") or {}
    bs = batch_size or int(parent_run.get("batch_size", 12))
    T = model.config.block_size
    # The parent's own corpus, to measure forgetting; skipped when it is not readable here.
    old_val = None
    old_spec = parent_run.get("corpus")
    if old_spec:
        try:
            old_tokens = tok.encode(load_corpus(old_spec), unknown="skip")
            _, old_val = split_tokens(old_tokens, float(parent_run.get("val_fraction", val_fraction)))
        except (OSError, ValueError):
            old_val = None

    def losses(m) -> tuple:
        new = evaluate_loss(m, val_tokens, bs, T, eval_batches, seed + 1)
        old = evaluate_loss(m, old_val, bs, T, eval_batches, seed + 1) if old_val is not None else None
        return new, old

    new_before, old_before = losses(base)
    train_kwargs.setdefault("lr", 3e-4)
    train_kwargs.setdefault("warmup_steps", 50)
    train_kwargs.setdefault("steps", 500)
    frozen = freeze_prefixes(freeze_layers, freeze_embeddings, model.config.n_layer)
    cfg = TrainConfig(seed=seed, frozen=frozen, **train_kwargs)
    stage = LanguageModelingStage(train_tokens, val_tokens, bs, T, seed, eval_batches)
    run_config = {"stage": "finetune", "corpus": corpus, "model": asdict(model.config),
                  "batch_size": bs, "val_fraction": val_fraction, "unknown": unknown,
                  "freeze_layers": freeze_layers, "freeze_embeddings": freeze_embeddings,
                  **{k: v for k, v in parent_run.items() if k in ("chat_template",)}}
    result = train(model, stage, cfg, run_dir, tokenizer=tok, run_config=run_config,
                   resume=resume, parent=str(parent))
    new_after, old_after = losses(model)
    samples = {}
    if sample_tokens > 0:
        samples = {"parent": _sample_text(base, tok, prompt, sample_tokens, seed),
                   "finetuned": _sample_text(model, tok, prompt, sample_tokens, seed)}
    return FinetuneReport(run_dir=str(run_dir), parent=str(parent), new_val_before=new_before,
                          new_val_after=new_after, old_val_before=old_before,
                          old_val_after=old_after,
                          unknown_chars=dict(collections.Counter(unknown_counts)),
                          samples=samples, stopped_early=result.stopped_early)
