"""Style fine-tuning: continue next-token training from a run on a new corpus.

The parent's tokenizer is kept (the model's embeddings are indexed by it), so text it cannot encode
is found and reported before any training, and handled as the user chooses: fail, skip the
characters, or replace them. The report gives validation loss on the new corpus and on the parent's
corpus before and after, so both the shift in style and any forgetting are numbers, plus samples from
both models for the same prompt.
"""

from __future__ import annotations

import collections
import sys
from dataclasses import asdict
from typing import Optional

from . import _CallableStage, checks, distributed
from .checkpoint import load_model
from .data import corpus_files_if_large, load_corpus, split_tokens, tokenize_corpus
from .pretrain import (LanguageModelingStage, check_tokens_fit, evaluate_loss, sample_prompt_ids,
                       sample_text)
from .stage import StageResult, open_stage
from .train import train

UNKNOWN_POLICIES = ("error", "skip", "replace")


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


def freeze_prefixes(n_layers_frozen: int, freeze_embeddings: bool, n_layer: int) -> list:
    if not 0 <= n_layers_frozen <= n_layer:
        raise ValueError(f"freeze_layers must be between 0 and n_layer = {n_layer}, got {n_layers_frozen}")
    prefixes = [f"h.{i}." for i in range(n_layers_frozen)]
    if freeze_embeddings:
        prefixes += ["wte", "wpe"]  # wte is tied to the LM head: freezing it freezes the head too
    return prefixes


def finetune(parent, corpus: Optional[str], run_dir, *, prompt: str = "",
             sample_tokens: int = 200, resume: bool = False, overwrite: bool = False,
             threads: Optional[int] = None, **settings) -> StageResult:
    """Fine-tune the model in run directory `parent` on `corpus`, writing a new run to `run_dir`.

    settings: any of STAGE_DEFAULTS["finetune"] (unknown-character policy, freeze_layers,
    freeze_embeddings, batch_size (default: the parent's), TrainConfig's steps, lr, ...; a lower
    learning rate than pretraining's is typical). The result's details hold the report: val loss
    on the new corpus and on the parent's before and after ("new_val_before", "new_val_after",
    "old_val_before", "old_val_after"; old_* None when the parent's corpus is not readable here;
    both models measured in the fine-tune's precision),
    "unknown_chars" (character -> count, before handling; None for a corpus of files over 64 MB,
    which is tokenized in a streaming pass as pretraining's is) and "samples" (parent, finetuned).
    """
    checks.check_values(sample_tokens=sample_tokens)
    with open_stage("finetune", run_dir, {"corpus": corpus, **settings}, resume=resume,
                    overwrite=overwrite, parent=parent, threads=threads) as run:
        s = run.settings
        if s.get("corpus") is None:
            raise ValueError("finetune needs a corpus (--corpus)")
        base, tok, parent_config = load_model(parent)
        # The samples' prompt is encoded now, so one the tokenizer cannot encode is refused
        # before training rather than after it.
        prompt_ids = sample_prompt_ids(tok, prompt) if sample_tokens > 0 else None
        model, _, _ = load_model(parent)  # the copy that trains; `base` stays as the parent
        if corpus_files_if_large(s["corpus"]):
            # Never held whole: tokenized in a streaming pass into memory-mapped shards (the
            # unknown characters are handled there, not counted); under MPI rank 0 first, as in
            # pretrain, so the other ranks read its shards rather than all writing them at once.
            tokens = distributed.world().root_first(
                lambda: tokenize_corpus(s["corpus"], tok, unknown=s["unknown"],
                                        progress=s["progress"]))
            unknown_counts = None
        else:
            tokens, unknown_counts = encode_new_corpus(load_corpus(s["corpus"]), tok, s["unknown"])
        train_tokens, val_tokens = split_tokens(tokens, s["val_fraction"])
        parent_run = parent_config.get("train") or {}
        if s["batch_size"] is None:
            s["batch_size"] = int(parent_run.get("batch_size", 12))
        bs, T = s["batch_size"], model.config.block_size
        frozen = freeze_prefixes(s["freeze_layers"], s["freeze_embeddings"], model.config.n_layer)
        cfg = run.train_config(frozen=frozen)
        # The parent is measured (and sampled) in the fine-tune's precision, so before and after
        # differ by the training alone, not by the parent's precision too.
        base.matmul_precision = cfg.precision
        check_tokens_fit(s["corpus"], train_tokens, val_tokens, T, cfg.eval_every)
        # The parent's own corpus, to measure forgetting; skipped when it is not readable here.
        old_val = None
        old_spec = parent_run.get("corpus")
        if old_spec:
            try:
                old_tokens = tok.encode(load_corpus(old_spec), unknown="skip")
                _, old_val = split_tokens(old_tokens,
                                          float(parent_run.get("val_fraction", s["val_fraction"])))
            except (OSError, ValueError):
                old_val = None
        if old_val is not None and len(old_val) < 2:
            old_val = None  # too short to measure anything

        def losses(m) -> tuple:
            new = evaluate_loss(m, val_tokens, bs, T, s["eval_batches"], s["seed"] + 1)
            old = (evaluate_loss(m, old_val, bs, T, s["eval_batches"], s["seed"] + 1)
                   if old_val is not None else None)
            return new, old

        stage = LanguageModelingStage(train_tokens, val_tokens, bs, T, s["seed"], s["eval_batches"])
        run_config = run.run_config(
            corpus=s["corpus"], model=asdict(model.config), batch_size=bs,
            val_fraction=s["val_fraction"], unknown=s["unknown"],
            freeze_layers=s["freeze_layers"], freeze_embeddings=s["freeze_embeddings"])
        new_before, old_before = losses(base)
        result = train(model, stage, cfg, run.hold(), tokenizer=tok,
                       run_config=run_config, resume=resume, parent=str(parent))
    new_after, old_after = losses(model)
    samples = {}
    if sample_tokens > 0:
        samples = {"parent": sample_text(base, tok, prompt, prompt_ids, sample_tokens, s["seed"]),
                   "finetuned": sample_text(model, tok, prompt, prompt_ids, sample_tokens,
                                            s["seed"])}
    return StageResult.from_training(
        "finetune", run_dir, result, parent=str(parent), new_val_before=new_before,
        new_val_after=new_after, old_val_before=old_before, old_val_after=old_after,
        unknown_chars=None if unknown_counts is None else dict(collections.Counter(unknown_counts)),
        samples=samples)


def finetune_summary(result: StageResult) -> str:
    """The report's lines: val loss on the new corpus and the parent's, before -> after."""
    d = result.details
    lines = [f"fine-tuned {d['parent']} -> {result.run_dir}",
             f"  new corpus val loss: {d['new_val_before']:.4f} -> {d['new_val_after']:.4f} "
             f"({d['new_val_after'] - d['new_val_before']:+.4f})"]
    if d["old_val_before"] is not None:
        lines.append(f"  parent corpus val loss: {d['old_val_before']:.4f} -> "
                     f"{d['old_val_after']:.4f} ({d['old_val_after'] - d['old_val_before']:+.4f})")
    return "\n".join(lines)


# lmlab.finetune(...) calls lmlab.api.finetune (see lmlab._CallableStage).
sys.modules[__name__].__class__ = _CallableStage
