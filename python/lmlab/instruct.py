"""Instruct tuning: prompt/response pairs through one chat template, the loss on responses only.

The template (lmlab.chat) marks a user turn with <|user|>, an assistant turn with <|assistant|> and
the end of a response with <|end|>; the tuned run keeps it on its tokenizer. Only the tokens of
assistant turns and their <|end|> are supervised: the stage puts weight 1/(supervised tokens in the
batch) on them and 0 on everything else, through the same weighted cross-entropy as pretraining.
Examples are padded one per row, so no example attends to another.

Also here: the built-in instruct dataset (questions about the running Python's standard library,
answered by the first sentence of each docstring), `inspect_examples` for `lmlab inspect-data` (how
it shows tokens: shown_pieces), and the evaluation that compares a base model with an
instruct-tuned one.
"""

from __future__ import annotations

import collections
import importlib
import inspect
import re
import shlex
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Iterable, List, Optional

import numpy as np

from . import _CallableStage, distributed
from .chat import (END, TEMPLATE, crop_context, render, reply_stop_ids, stop_ids, template_of,
                   turn_ids, user_turn)
from .checkpoint import load_model
from .data import load_instruct_jsonl
from .sample import generate
from .stage import StageResult, open_stage
from .tokenizer import SPECIAL_TOKENS
from .train import train


@dataclass
class Example:
    ids: np.ndarray  # int32 (L,): the rendered conversation
    supervised: np.ndarray  # bool (L,): token i is a response token (or its <|end|>)
    truncated: bool  # longer than block_size + 1 and cut
    source: int  # index of the conversation in the dataset
    rendered: int = 0  # its length in tokens before any cut (len(ids) when not truncated)

    @property
    def n_supervised(self) -> int:
        # Position 0 is never a target, so it cannot count.
        return int(self.supervised[1:].sum())


# What each kind of problem build_examples reports means, for inspect-data and instruct's notes.
PROBLEMS = {"unencodable": "contain text the tokenizer cannot encode (skipped)",
            "truncated": "are cut off by the block size",
            "no_supervised": "have no supervised token"}


def build_examples(conversations: Iterable[List[dict]], tokenizer, block_size: int):
    """Render every conversation; returns (examples, problems) where problems lists, per kind, the
    conversation indices that cannot be encoded, were cut by the block size, or supervise nothing."""
    examples, problems = [], {"unencodable": [], "truncated": [], "no_supervised": []}
    for i, messages in enumerate(conversations):
        try:
            ids, mask = render(tokenizer, messages)
        except ValueError:
            problems["unencodable"].append(i)
            continue
        rendered = len(ids)
        truncated = rendered > block_size + 1
        if truncated:
            ids, mask = ids[: block_size + 1], mask[: block_size + 1]
            problems["truncated"].append(i)
        ex = Example(ids, mask, truncated, i, rendered)
        if ex.n_supervised == 0:
            problems["no_supervised"].append(i)
        examples.append(ex)
    return examples, problems


def batch_arrays(examples: List[Example], block_size: int, pad_id: int):
    """(x, y, mask) of shape (len(examples), block_size), one example per row, right-padded.

    Right padding is safe under causal attention: real tokens never attend to the padding after
    them, and padded positions get weight 0.
    """
    B = len(examples)
    x = np.full((B, block_size), pad_id, dtype=np.int32)
    y = np.full((B, block_size), pad_id, dtype=np.int32)
    mask = np.zeros((B, block_size), dtype=bool)
    for r, ex in enumerate(examples):
        n = len(ex.ids) - 1
        x[r, :n] = ex.ids[:-1]
        y[r, :n] = ex.ids[1:]
        mask[r, :n] = ex.supervised[1:]
    return x, y, mask


class InstructStage:
    """Random batches of whole examples; the loss is the mean over supervised tokens only."""

    def __init__(self, train_examples: List[Example], val_examples: List[Example],
                 batch_size: int, block_size: int, pad_id: int, seed: int):
        usable = [e for e in train_examples if e.n_supervised > 0]
        if not usable:
            raise ValueError("the instruct dataset has no supervised token: every example's "
                             "response is empty or cut off by the block size "
                             f"({block_size}); nothing would be learned")
        self.train_examples, self.val_examples = usable, val_examples
        self.batch_size, self.block_size, self.pad_id = batch_size, block_size, pad_id
        self.rng = np.random.default_rng(seed)

    def train_step(self, model) -> dict:
        pick = self.rng.integers(0, len(self.train_examples), size=self.batch_size)
        x, y, mask = batch_arrays([self.train_examples[i] for i in pick], self.block_size,
                                  self.pad_id)
        _, losses = model.forward(x, y)
        n = mask.sum()
        weights = (mask * np.float32(1.0 / n)).astype(np.float32)
        return {"loss": float(losses[mask].mean(dtype=np.float64)), "tokens": int(x.size),
                "weights": weights}

    def skip_step(self) -> None:
        self.rng.integers(0, len(self.train_examples), size=self.batch_size)

    def data_fingerprint(self) -> str:
        return distributed.fingerprint(*(a for e in self.train_examples + self.val_examples
                                         for a in (e.ids, e.supervised)))

    def evaluate(self, model) -> dict:
        return {"val_loss": masked_loss(model, self.val_examples, self.batch_size,
                                        self.block_size, self.pad_id)}

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, d: dict) -> None:
        self.rng.bit_generator.state = d["rng"]


def masked_loss(model, examples: List[Example], batch_size: int, block_size: int,
                pad_id: int) -> float:
    """Mean loss over the supervised tokens of every example (all of them, in order)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        x, y, mask = batch_arrays(examples[start:start + batch_size], block_size, pad_id)
        _, losses = model.forward(x, y)
        total += float(losses[mask].sum(dtype=np.float64))
        count += int(mask.sum())
    return total / max(count, 1)


# --- the built-in dataset ------------------------------------------------------------------------

# Modules whose public functions make the questions; a fixed list, so the dataset is the same on
# every run of the same Python.
_QA_MODULES = sorted({
    "abc", "argparse", "array", "base64", "binascii", "bisect", "calendar", "cmath", "codecs",
    "collections", "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "enum", "errno", "filecmp", "fnmatch", "fractions", "functools", "gc", "getpass",
    "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "html", "inspect", "io", "ipaddress",
    "itertools", "json", "keyword", "linecache", "locale", "logging", "math", "mimetypes",
    "operator", "os", "os.path", "pathlib", "pickle", "pkgutil", "platform", "pprint", "queue",
    "quopri", "random", "re", "sched", "secrets", "shlex", "shutil", "signal", "socket", "stat",
    "statistics", "string", "struct", "subprocess", "sys", "sysconfig", "tarfile", "tempfile",
    "textwrap", "threading", "time", "tokenize", "traceback", "types", "typing", "unicodedata",
    "urllib.parse", "uuid", "warnings", "weakref", "zipfile", "zlib",
})
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


def _first_sentence(doc: str, max_chars: int) -> Optional[str]:
    lines = [ln.strip() for ln in doc.strip().splitlines()]
    while lines and (not lines[0] or _SIGNATURE_LINE.match(lines[0])):
        lines.pop(0)  # builtins start with their signature
    para = []
    for ln in lines:
        if not ln:
            break
        para.append(ln)
    text = " ".join(para)
    m = re.search(r"(.+?[.!?])(\s|$)", text)
    sentence = (m.group(1) if m else text).strip()
    if len(sentence) < 12 or len(sentence) > max_chars:
        return None
    return sentence


def builtin_instruct_dataset(max_answer_chars: int = 90):
    """(train, held_out) conversations: "What does json.dumps do?" -> the docstring's first sentence.

    Every tenth question (in a fixed order) is held out for evaluation.
    """
    pairs = []
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in _QA_MODULES:
            try:
                mod = importlib.import_module(modname)
            except ImportError:
                continue
            for name in sorted(vars(mod)):
                obj = getattr(mod, name)
                if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                    continue
                doc = inspect.getdoc(obj)
                answer = _first_sentence(doc, max_answer_chars) if doc else None
                if answer is None or answer in seen:
                    continue
                seen.add(answer)
                pairs.append((f"What does {modname}.{name} do?", answer))
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]
    train_set = [c for i, c in enumerate(convs) if i % 10 != 0]
    held_out = [c for i, c in enumerate(convs) if i % 10 == 0]
    return train_set, held_out


BUILTIN_INSTRUCT = {"python-qa": "questions about the running Python's standard library functions, "
                                 "answered by the first sentence of each docstring"}


def load_instruct_data(spec: str):
    """(train, held_out) conversations from "builtin:python-qa" or a JSONL file (10% held out)."""
    if spec.startswith("builtin:"):
        _builtin_name(spec)
        return builtin_instruct_dataset()
    convs = load_instruct_jsonl(spec)
    if len(convs) < 2:
        return convs, convs
    held_out = [c for i, c in enumerate(convs) if i % 10 == 0]
    return [c for i, c in enumerate(convs) if i % 10 != 0], held_out


def _builtin_name(spec: str) -> str:
    name = spec[len("builtin:"):]
    if name not in BUILTIN_INSTRUCT:
        raise ValueError(f"unknown built-in instruct dataset {name!r}; known: "
                         + ", ".join(f"builtin:{k}" for k in BUILTIN_INSTRUCT))
    return name


def instruct_dataset(spec: str) -> tuple:
    """(conversations, labels): every conversation of the data, held-out ones included, in order,
    and what a message calls each ("line 7" of a JSONL file, "#3" of a built-in)."""
    if spec.startswith("builtin:"):
        _builtin_name(spec)
        train_set, held_out = builtin_instruct_dataset()
        convs = train_set + held_out
        return convs, [f"#{i + 1}" for i in range(len(convs))]
    convs, lines = load_instruct_jsonl(spec, line_numbers=True)
    return convs, [f"line {n}" for n in lines]


# --- inspect-data --------------------------------------------------------------------------------

def inspect_examples(tokenizer, conversations, block_size: int, n: int = 3, color: bool = True,
                     labels: Optional[List[str]] = None) -> str:
    """A printable view: for the first n examples, every token with the supervised ones highlighted,
    the supervised-token count, and a summary of problems over the whole dataset. labels name each
    conversation in the view (default "#1", "#2", ... in order)."""
    if labels is None:
        labels = [f"#{i + 1}" for i in range(len(conversations))]
    examples, problems = build_examples(conversations, tokenizer, block_size)
    on, off = ("\x1b[42;30m", "\x1b[0m") if color else ("[", "]")
    out = []
    spelled = joined = False
    for ex in examples[:n]:
        pieces, spells = shown_pieces(tokenizer, ex.ids.tolist(), ex.supervised.tolist())
        spelled |= spells
        if not color:
            # Without colour the brackets are the only token boundaries shown, so a character
            # made of several tokens says how many, or [🙂] would read as one token.
            joined |= any(count > 1 for _, _, count in pieces)
            pieces = [(joined_text(piece, count), sup, count) for piece, sup, count in pieces]
        parts = [f"{on}{piece}{off}" if sup else piece for piece, sup, _ in pieces]
        cut = (f", TRUNCATED to its first {len(ex.ids)} by block size {block_size}"
               if ex.truncated else "")
        out.append(f"example {labels[ex.source]}: {ex.rendered} tokens{cut}, {ex.n_supervised} "
                   "supervised")
        out.append("  " + "".join(parts).replace("\n", "\n  "))
    if spelled:
        out.append(f"({SPELLED_MARK}<|...|>: text that spells a special token, which the model "
                   "reads as plain characters, not as the token)")
    if joined:
        out.append(f"({joined_text('text', 'N')}: N byte-level tokens that split a character "
                   "between them, shown together)")
    total = len(examples) + len(problems["unencodable"])
    out.append(f"{total} examples; {sum(e.n_supervised for e in examples)} supervised tokens")
    for kind, what in PROBLEMS.items():
        if kind == "truncated":
            what += f" {block_size}"
        if problems[kind]:
            shown = ", ".join(labels[i] for i in problems[kind][:5])
            more = ", ..." if len(problems[kind]) > 5 else ""
            out.append(f"  {len(problems[kind])} {what}: {shown}{more}")
    return "\n".join(out)


# Shown before text that spells a special token (shown_pieces).
SPELLED_MARK = "\\"


def joined_text(text: str, count) -> str:
    """How the plain (--no-color) view shows a piece of `count` tokens: as it is for one token,
    {text:N tokens} for several (a character split across byte-level tokens)."""
    return text if count == 1 else f"{{{text}:{count} tokens}}"


def shown_pieces(tokenizer, ids: List[int], supervised: List[bool]) -> tuple:
    """(pieces, spelled): how inspect_examples shows a conversation's tokens, as [(text,
    supervised, count)] (count: how many tokens the piece is), and whether its text spells a
    special token.
    - A special token is shown as itself.
    - Other tokens as the text they decode to; the tokens that make up a character together as one
      piece (a byte-level BPE token may hold part of a character, which decoded alone is U+FFFD);
      bytes that make no character (cut off by the block size) as <0xE2>.
    - Text that merely spells a special token ("<|assistant|>" typed by a user), which the
      tokenizer encodes as plain characters, with SPELLED_MARK before it: \\<|assistant|>."""
    specials = tokenizer.special_tokens()
    pieces: list = []  # [text, supervised, special, count]
    pending, pending_sup, pending_count = b"", False, 0

    def flush():
        nonlocal pending, pending_count
        if pending:
            text = pending.decode("utf-8", "surrogateescape")
            text = re.sub("[\udc80-\udcff]", lambda m: f"<0x{ord(m.group()) - 0xDC00:02X}>", text)
            pieces.append([text, pending_sup, False, pending_count])
            pending, pending_count = b"", 0

    for tid, sup in zip(ids, supervised):
        if tid in specials:
            flush()
            pieces.append([specials[tid], sup, True, 1])
            continue
        if sup != pending_sup:
            flush()
        pending, pending_sup = pending + tokenizer.token_bytes(tid), sup
        pending_count += 1
        try:
            pending.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data":
                continue  # a character the next token completes
        flush()
    flush()
    spelled = re.compile("|".join(re.escape(t) for t in sorted(set(specials.values()),
                                                                key=len, reverse=True)))
    found = False
    i = 0
    while i < len(pieces):  # each run of text pieces between special tokens
        j = i
        while j < len(pieces) and not pieces[j][2]:
            j += 1
        starts = np.cumsum([0] + [len(p[0]) for p in pieces[i:j]]).tolist()
        for m in reversed(list(spelled.finditer("".join(p[0] for p in pieces[i:j])))):
            k = i + int(np.searchsorted(starts, m.start(), side="right")) - 1
            at = m.start() - starts[k - i]
            pieces[k][0] = pieces[k][0][:at] + SPELLED_MARK + pieces[k][0][at:]
            found = True
        i = j + 1
    return [(text, sup, count) for text, sup, _, count in pieces], found


# --- evaluation and generation -------------------------------------------------------------------

def respond(model, tokenizer, messages: List[dict], *, max_new_tokens: int = 100,
            temperature: float = 0.0, top_k=None, top_p=None, seed=None, callback=None):
    """The assistant's reply to a conversation, put in the chat template whether or not the run
    has one: (text, ended, stop).

    stop: the name of the token the reply stopped at (chat.reply_stop_ids: "<|end|>",
    "<|endoftext|>", or the model's own end-of-text token, e.g. "</s>"), None for a reply that ran
    into max_new_tokens. ended: whether the reply ended as an answer, at <|end|> or at the model's
    own end-of-text token (as sequences.sample_completion counts an answer to a user turn). A reply
    that stops at <|endoftext|> has not ended: the model ended its text, as a document ends (what
    a base run, never having seen a conversation, does), and what would follow is a new document,
    never the reply. (sample_completion reads a base run's prompt as plain text, not as a turn:
    there <|endoftext|> is what ends the answer, a continuation of that text.) text: the reply
    without any special token (one the model emits mid-reply, <|user|>, ..., is left out), so it
    can go back into a conversation (chat --history) as plain content. callback(token_id): each
    id of the reply as it is chosen, the stop id not among them."""
    ids, _ = render(tokenizer, messages, add_generation_prompt=True)
    turns = turn_ids(tokenizer, TEMPLATE)  # what render wrote, template or not
    ids = crop_context(ids, model.config.block_size, turns)
    stops = reply_stop_ids(tokenizer)
    out = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, stop_ids=stops, callback=callback, turns=turns, keep_stop=True)
    last = int(out[-1]) if len(out) else None
    stop = tokenizer.token(last) if last in stops else None
    ended = last in stop_ids(tokenizer, tokenizer.special_id(END))  # the ends of an answer
    specials = {tokenizer.special_id(t) for t in SPECIAL_TOKENS}
    body = [int(t) for t in (out[:-1] if stop is not None else out) if int(t) not in specials]
    return tokenizer.decode(body), ended, stop


def generation_prompt(tokenizer, prompt: str, *, raw: bool = False) -> tuple:
    """What `lmlab sample` feeds the model for a prompt: (prompt ids, stop ids, turns). A run with a
    chat template (instruct-tuned, lmlab.chat) gets the prompt as a user turn and answers until
    <|end|> (turns: chat.turn_ids, with which generation crops the context), unless raw; otherwise
    the prompt is continued as plain text (an empty prompt starts after <|endoftext|>, as every
    training document does) until <|endoftext|> (turns None). Either way generation also stops at
    the model's own end-of-text tokens (chat.stop_ids), and an answer also at <|endoftext|>, where
    the model ended its text (chat.reply_stop_ids, as in respond)."""
    if template_of(tokenizer) and not raw:
        return (user_turn(tokenizer, prompt, name="prompt"), reply_stop_ids(tokenizer),
                turn_ids(tokenizer))
    ids = (tokenizer.encode(prompt, name="prompt") if prompt
           else np.array([tokenizer.eot_id], dtype=np.int32))
    return ids, stop_ids(tokenizer, tokenizer.eot_id), None


def _first_words(text: str, n: int) -> list:
    return re.findall(r"\w+", text.lower())[:n]


def evaluate_instruct(model, tokenizer, conversations, *, max_new_tokens: int = 100,
                      first_words: int = 2) -> dict:
    """Greedy answers to held-out prompts (respond): the fraction that end as an answer (<|end|>,
    or the model's own end-of-text token) within the limit, and the fraction whose first words
    match the reference answer's. A reply that stops at <|endoftext|> (a base model ending its
    text as a document) has not ended its answer: that is what instruct tuning teaches."""
    ended = matched = 0
    for conv in conversations:
        prompt, reference = conv[:-1], conv[-1]["content"]
        text, did_end, _ = respond(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
        ended += did_end
        matched += _first_words(text, first_words) == _first_words(reference, first_words)
    n = max(len(conversations), 1)
    return {"n": len(conversations), "ended": ended / n, "first_words_match": matched / n}


# --- the stage entry point -----------------------------------------------------------------------

def _nothing_to_learn(data, parent, conversations, problems, tok, block_size: int) -> str:
    """The refusal of a dataset none of whose training conversations supervises a token, saying
    why: text the parent's tokenizer cannot encode (naming the characters), or a response that
    starts past the block size."""
    why = []
    if problems["unencodable"]:
        unknown = collections.Counter()
        for i in problems["unencodable"]:
            for turn in conversations[i]:
                unknown.update(tok.unknown_chars(turn["content"]))
        shown = ", ".join(f"{c!r} x{n}" for c, n in unknown.most_common(10))
        shown += f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        if all("\ud800" <= c <= "\udfff" for c in unknown):  # what even byte-level BPE refuses
            cause = ("lone surrogates, which are not valid Unicode: a \\ud800-style escape in "
                     "the JSON makes one")
        else:
            cause = ("its vocabulary holds only the characters of the text it was trained on: "
                     "pretrain on text that holds them, or with --tokenizer bpe")
        why.append(f"{len(problems['unencodable'])} hold text the {tok.kind} tokenizer of "
                   f"{parent} cannot encode ({shown}; {cause})")
    if problems["no_supervised"]:
        why.append(f"{len(problems['no_supervised'])} have no response token within the block "
                   f"size ({block_size})")
    return (f"{data}: none of its {len(conversations)} training conversations can be learned "
            f"from: {'; '.join(why)}; `lmlab inspect-data {shlex.quote(str(parent))} --data "
            f"{shlex.quote(str(data))}` shows each")


def instruct_tune(parent, data: Optional[str], run_dir, *, resume: bool = False,
                  overwrite: bool = False, threads: Optional[int] = None,
                  **settings) -> StageResult:
    """Instruct-tune the model in `parent` on `data` (builtin:python-qa or a JSONL file).

    settings: any of STAGE_DEFAULTS["instruct"]. The result's details hold "problems": per kind
    (unencodable, truncated, no_supervised), the indices of the training conversations affected.
    """
    with open_stage("instruct", run_dir, {"data": data, **settings}, resume=resume,
                    overwrite=overwrite, parent=parent, threads=threads) as run:
        s = run.settings
        model, tok, parent_config = load_model(parent)
        tok.chat_template = dict(TEMPLATE)  # saved with the run, and by every run tuned from it
        T = model.config.block_size
        train_convs, held_out = load_instruct_data(s["data"])
        train_examples, problems = build_examples(train_convs, tok, T)
        if not any(e.n_supervised for e in train_examples):
            raise ValueError(_nothing_to_learn(s["data"], parent, train_convs, problems, tok, T))
        val_examples, _ = build_examples(held_out, tok, T)
        val_examples = [e for e in val_examples if e.n_supervised > 0]
        cfg = run.train_config()
        if not val_examples and cfg.eval_every:
            # A loss over no token would read as a perfect 0.0: measure none, and say so.
            if distributed.world().is_root:
                print(f"lmlab instruct: no held-out conversation ({len(held_out)} held out) can be "
                      "scored: each cannot be encoded, or supervises no token within the block "
                      "size (`lmlab inspect-data` shows which); no validation loss is measured",
                      file=sys.stderr)
            cfg = replace(cfg, eval_every=0)
        stage = InstructStage(train_examples, val_examples, s["batch_size"], T, tok.eot_id,
                              s["seed"])
        run_config = run.run_config(
            data=s["data"], model=asdict(model.config), batch_size=s["batch_size"],
            corpus=(parent_config.get("train") or {}).get("corpus"),
            data_problems={k: len(v) for k, v in problems.items()})
        result = train(model, stage, cfg, run.hold(), tokenizer=tok,
                       run_config=run_config, resume=resume, parent=str(parent))
    return StageResult.from_training("instruct", run_dir, result, problems=problems)


# lmlab.instruct(...) calls lmlab.api.instruct (see lmlab._CallableStage).
sys.modules[__name__].__class__ = _CallableStage
