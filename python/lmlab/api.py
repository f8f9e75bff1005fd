"""The top-level Python API: lmlab.pretrain, lmlab.finetune, lmlab.instruct and lmlab.load, and the
Model they return, whose methods take and give text rather than token ids.

A thin layer: training is the stage functions (lmlab.pretrain.pretrain, lmlab.finetune.finetune,
lmlab.instruct.instruct_tune), reading a run is lmlab.checkpoint.load_model, and the Model's
methods are lmlab.sample's generate, next_token_distribution and score_tokens with the tokenizer on
either side. Every keyword is the command line's flag with underscores (`--min-lr` is min_lr), with
the same defaults (lmlab.stage.STAGE_DEFAULTS) and the same checks (lmlab.checks): a bad value or
an unknown keyword is a ValueError naming it and what is allowed, raised before any work.

lmlab.pretrain, lmlab.finetune and lmlab.instruct are also the names of the modules that hold the
stages; those modules are callable (lmlab._CallableStage), and calling one calls the function of
the same name here, so `lmlab.pretrain(...)` and `lmlab.pretrain.pretrain(...)` both work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from . import checks
from . import finetune as _finetune_stage
from . import instruct as _instruct_stage
from . import pretrain as _pretrain_stage
from .chat import crop_context, template_of
from .checkpoint import load_model
from .rundir import run_path
from .sample import generate as _generate
from .sample import next_token_distribution as _next_token_distribution
from .sample import TextStream, score_tokens
from .stage import StageResult


class _StopString(Exception):
    """Raised from generate's callback once the stop string has appeared."""


def _text(name: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text (a str), got {type(value).__name__}")
    return value


@dataclass(frozen=True, eq=False)  # eq: comparing arrays has no single answer
class NextTokens:
    """A model's distribution over every token of its vocabulary for what follows a prompt.

    probs[i] is the probability of token id i (float64, sums to 1); top(k) lists the k most likely
    as (token text, probability), most likely first, ties broken by lower id (as `lmlab predict`
    shows them); dist["e"] is the probability of the token whose text is "e" (`"e" in dist`: is
    "e" one token).

    >>> dist = model.next_token_distribution("the ")
    >>> len(dist) == model.tokenizer.vocab_size, dist.top(2)[0][1] >= dist.top(2)[1][1]
    (True, True)
    """
    prompt: str
    probs: np.ndarray
    tokenizer: object

    def top(self, k: int = 10) -> List[Tuple[str, float]]:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive whole number of tokens, got {k!r}")
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(self.tokenizer.decode([int(i)]), float(self.probs[i])) for i in order]

    def most_likely(self) -> str:
        """The text of the most likely next token (what greedy decoding picks)."""
        return self.top(1)[0][0]

    def __getitem__(self, token: str) -> float:
        ids = self.tokenizer.encode(_text("token", token), allow_special=True)
        if len(ids) != 1:
            raise KeyError(f"{token!r} is {len(ids)} tokens for this tokenizer, not one")
        return float(self.probs[int(ids[0])])

    def __contains__(self, token) -> bool:
        """Whether `token` is the text of exactly one token, so that dist[token] answers."""
        try:
            return isinstance(token, str) and len(
                self.tokenizer.encode(token, allow_special=True)) == 1
        except ValueError:  # characters this tokenizer cannot encode
            return False

    # Not a sequence: without this, `for t in dist` and `"x" in dist` would fall back to
    # dist[0], dist[1], ... and fail with "token must be text". .top(k) lists, .probs is by id.
    __iter__ = None

    def __len__(self) -> int:
        return len(self.probs)


class Model:
    """A trained run, read for use from Python: generate text, see the next-token distribution,
    score a text's loss. `model.gpt`, `model.tokenizer` and `model.config` are what
    lmlab.checkpoint.load_model returns; `model.result` is the training's StageResult when the
    model came from lmlab.pretrain / finetune / instruct (None from lmlab.load).

    >>> model = lmlab.load(RUN)
    >>> model.result is None, model.tokenizer.kind
    (True, 'char')
    >>> text = model.generate("the ", max_new_tokens=20, seed=1)
    >>> text == model.generate("the ", max_new_tokens=20, seed=1)  # same seed, same text
    True
    """

    def __init__(self, run, *, result: Optional[StageResult] = None):
        self.run = _run_of(run)
        self.gpt, self.tokenizer, self.config = load_model(self.run)
        self.result = result

    def __repr__(self) -> str:
        c = self.gpt.config
        kind = "instruct-tuned " if self.chat else ""
        return (f"<lmlab.Model {kind}{c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, "
                f"block {c.block_size}, {self.tokenizer.kind} vocabulary of {c.vocab_size}; "
                f"run {str(self.run)!r}>")

    @property
    def chat(self) -> bool:
        """True for an instruct-tuned run: generate() answers its prompt through the chat template."""
        return template_of(self.tokenizer) is not None

    def generate(self, prompt: str = "", *, max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 seed: Optional[int] = None, stop: Optional[str] = None, raw: bool = False) -> str:
        """The text the model writes after `prompt` (without the prompt): what `lmlab sample RUN
        --prompt PROMPT` prints, with the same keywords and defaults. temperature 0 is greedy;
        the same seed gives the same text. An instruct-tuned run answers the prompt as a user
        turn and stops at its end of answer (or at <|endoftext|>, where the model ends its text),
        unless raw=True. `stop` cuts the text where that
        string first appears.

        >>> greedy = model.generate("the ", max_new_tokens=40, temperature=0)
        >>> greedy == model.generate("the ", max_new_tokens=40, temperature=0)
        True
        >>> " " in model.generate("the ", max_new_tokens=40, temperature=0, stop=" ")
        False
        """
        prompt = _text("prompt", prompt)
        if stop is not None and not _text("stop", stop):
            raise ValueError("stop must be a non-empty string (or None)")
        if seed is not None:
            checks.check("seed", seed)
        checks.check("raw", raw)  # raw="False" would be true
        ids, stop_ids, turns = _instruct_stage.generation_prompt(self.tokenizer, prompt, raw=raw)
        text = TextStream(self.tokenizer, stop)
        pieces: list = []

        def on_token(token_id: int) -> None:
            pieces.append(text.add(token_id))
            if text.stopped:
                raise _StopString

        try:
            _generate(self.gpt, crop_context(ids, self.gpt.config.block_size, turns),
                      max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      seed=seed, stop_ids=stop_ids, callback=on_token, turns=turns)
        except _StopString:
            pass
        return "".join(pieces) + text.finish()

    def next_token_distribution(self, prompt: str) -> NextTokens:
        """The probability of every token to come next after `prompt` (the text as given, as
        `lmlab predict` reads it; a prompt longer than the block keeps its last block_size tokens).

        >>> dist = model.next_token_distribution("the c")
        >>> [token for token, probability in dist.top(3)] == [t for t, _ in dist.top(5)[:3]]
        True
        >>> round(float(dist.probs.sum()), 9), dist[dist.most_likely()] == dist.top(1)[0][1]
        (1.0, True)
        """
        prompt = _text("prompt", prompt)
        ids = self.tokenizer.encode(prompt)
        if not len(ids):
            ids = np.array([self.tokenizer.eot_id], np.int32)  # where every document starts
        return NextTokens(prompt, _next_token_distribution(self.gpt, ids), self.tokenizer)

    def token_losses(self, text: str) -> List[Tuple[str, float]]:
        """For each token of `text` after the first: (its text, -log p), p the probability the
        model gave it from the tokens before it (natural log, float64). A text longer than
        block_size + 1 tokens is scored in windows of block_size predictions, as training is.

        >>> [token for token, loss in model.token_losses("the cat")]
        ['h', 'e', ' ', 'c', 'a', 't']
        """
        ids = self.tokenizer.encode(_text("text", text))
        if len(ids) < 2:
            raise ValueError(f"text must be at least 2 tokens long (one to read, one to predict); "
                             f"{text!r} is {len(ids)}")
        logp, _ = score_tokens(self.gpt, ids)
        right = logp[np.arange(len(ids) - 1), ids[1:]]
        return [(self.tokenizer.decode([int(t)]), float(-lp)) for t, lp in zip(ids[1:], right)]

    def loss(self, text: str) -> float:
        """The mean cross-entropy of predicting each token of `text` from the ones before it: the
        number training drives down (token_losses gives each term).

        >>> losses = [loss for token, loss in model.token_losses("the cat")]
        >>> abs(model.loss("the cat") - sum(losses) / len(losses)) < 1e-12
        True
        """
        return float(np.mean([ce for _, ce in self.token_losses(text)]))


def load(run) -> Model:
    """The model of a run directory's current checkpoint, every file checked (lmlab.checkpoint).

    >>> import lmlab
    >>> model = lmlab.load(RUN)
    >>> model.gpt.config.n_layer, model.run.name
    (1, 'base')
    """
    if isinstance(run, Model):
        return run
    return Model(run)


def _run_of(run, name: str = "run") -> Path:
    if isinstance(run, Model):
        return run.run
    if not isinstance(run, (str, os.PathLike)):
        raise ValueError(f"{name} must be a run directory (a str or path) or an lmlab.Model, got "
                         f"{type(run).__name__}")
    return run_path(run)  # refuses '' (which a Path would turn into the current directory)


# The stage functions' own names for the run directories, which these functions call run and out.
_STAGE_RUN_NAMES = {"pretrain": {"run_dir": "run"},
                    "finetune": {"parent": "run", "run_dir": "out"},
                    "instruct": {"parent": "run", "run_dir": "out"}}


def _refuse_stage_names(function: str, settings: dict) -> None:
    """Refuse a stage function's own name for a run directory among `settings`: passed on, it met
    the stage's parameter and Python's "got multiple values for argument 'run_dir'" named a
    parameter this function does not have."""
    for name, ours in _STAGE_RUN_NAMES[function].items():
        if name in settings:
            raise checks.UnknownSettingError(f"{function}() got unknown keyword {name!r}: its run "
                                             f"directory is {ours!r}")


def pretrain(corpus: Optional[str] = None, run="runs/pretrain", *, prompt: str = "",
             sample_after: int = 0, resume: bool = False, overwrite: bool = False,
             threads: Optional[int] = None, **settings) -> Model:
    """Pretrain a GPT from scratch on `corpus` by next-token prediction, into the run directory
    `run`, and return it as a Model (its .result says how training went). `lmlab pretrain
    --corpus CORPUS --run RUN ...`: keywords are the flags (n_layer, n_head, n_embd, block_size,
    batch_size, tokenizer "char"/"bpe", vocab_size, steps, lr, min_lr, warmup_steps, seed,
    precision, progress, ...), defaults from lmlab.stage.STAGE_DEFAULTS["pretrain"].
    sample_after=N samples N tokens after `prompt` when training ends: .result.details["sample"].

    >>> import tempfile, lmlab
    >>> run = tempfile.mkdtemp() + "/base"
    >>> model = lmlab.pretrain("builtin:shakespeare", run, steps=20, n_layer=1, n_head=2,
    ...                        n_embd=32, block_size=32, batch_size=4, progress=False)
    >>> model.result.steps_done, model.chat
    (20, False)
    >>> lmlab.pretrain("builtin:shakespeare", run, setps=10)
    Traceback (most recent call last):
    ...
    lmlab.checks.UnknownSettingError: pretrain() got unknown keyword(s) 'setps' (did you mean 'steps'?); ...
    """
    _refuse_stage_names("pretrain", settings)
    out = _run_of(run)
    result = _pretrain_stage.pretrain(corpus, out, prompt=prompt, sample_after=sample_after,
                                      resume=resume, overwrite=overwrite, threads=threads,
                                      **settings)
    return Model(out, result=result)


def finetune(run, corpus: Optional[str] = None, *, out, prompt: str = "",
             sample_tokens: int = 200, resume: bool = False, overwrite: bool = False,
             threads: Optional[int] = None, **settings) -> Model:
    """Fine-tune the model of `run` (a run directory or a Model) on `corpus`, into the new run
    `out`, and return it. `lmlab finetune RUN --corpus CORPUS --out OUT ...`: keywords are the
    flags (steps, lr, unknown "error"/"skip"/"replace", freeze_layers, freeze_embeddings,
    batch_size, ...). .result.details holds the report: validation loss on the new corpus and on
    the parent's, before and after, and a sample from each model for `prompt`.

    >>> bard = lmlab.finetune(base, "builtin:shakespeare", out=tmp + "/bard", steps=20,
    ...                       unknown="skip", sample_tokens=0, progress=False)
    >>> bard.result.details["new_val_after"] < bard.result.details["new_val_before"]
    True
    """
    _refuse_stage_names("finetune", settings)
    target = _run_of(out, "out")
    result = _finetune_stage.finetune(_run_of(run), corpus, target, prompt=prompt,
                                      sample_tokens=sample_tokens, resume=resume,
                                      overwrite=overwrite, threads=threads, **settings)
    return Model(target, result=result)


def instruct(run, data: Optional[str] = None, *, out, resume: bool = False,
             overwrite: bool = False, threads: Optional[int] = None, **settings) -> Model:
    """Instruct-tune the model of `run` on prompt/response data (builtin:python-qa, the default,
    or a JSONL file), into the new run `out`, and return it: the loss counts only response
    tokens. `lmlab instruct RUN --data DATA --out OUT ...`: keywords are the flags (steps, lr,
    batch_size, ...). The returned model answers through its chat template.

    >>> import json
    >>> with open(tmp + "/qa.jsonl", "w") as f:
    ...     for q, a in [("what is one plus one?", "two."), ("what colour is the sky?", "blue.")] * 8:
    ...         print(json.dumps({"prompt": q, "response": a}), file=f)
    >>> qa = lmlab.instruct(base, tmp + "/qa.jsonl", out=tmp + "/qa", steps=20, batch_size=4,
    ...                     progress=False)
    >>> qa.chat, type(qa.generate("what is one plus one?", temperature=0))
    (True, <class 'str'>)
    """
    _refuse_stage_names("instruct", settings)
    target = _run_of(out, "out")
    result = _instruct_stage.instruct_tune(_run_of(run), data, target, resume=resume,
                                           overwrite=overwrite, threads=threads, **settings)
    return Model(target, result=result)
