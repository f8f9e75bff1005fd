"""The chat template: how a conversation becomes tokens, and what a run's answer to a prompt
follows and ends with.

lmlab has one template (TEMPLATE). A user (or system) turn is <|user|> and its text; an assistant
turn is <|assistant|>, its text and <|end|>. Each segment is encoded on its own and the special
tokens are inserted as ids, so a prompt/response boundary is never merged by the tokenizer and
user text can never forge a turn.

Instruct tuning gives a run the template; it lives on the run's tokenizer (Tokenizer.chat_template,
as Hugging Face keeps it on theirs), is saved in config.json's train section by every stage that
saves that tokenizer, and is set again by checkpoint.load_model. So a run tuned from an
instruct-tuned one (finetune, reward, dpo, rlhf) keeps it: its rankings, rollouts, reward features
and samples put each prompt in a user turn and end each answer at <|end|>, as instruct tuning
taught the model. A run without it continues its prompt as plain text until <|endoftext|>.
Either way generation also stops at the model's own end-of-text tokens where an imported
checkpoint declared others (stop_ids). A reply in the template (lmlab chat, and a prompt to a run
with the template) stops at <|endoftext|> too (reply_stop_ids): a model that emits it has ended its
text, and what would follow is a new document, never the reply; but the reply has then not ended
as an answer, which only <|end|> (or the model's own end-of-text token) does.

A context longer than the block is cut to its last block_size tokens (crop_context: a prompt cut to
fit, and generation's sliding window). A chat context is cut so that it still starts as a turn of
the template: the first token kept becomes the role token of the turn it lies in, so an answer
that outgrows the block is still read as the assistant's answer to a user turn.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
TEMPLATE = {"name": "lmlab-chat-v1", "user": USER, "assistant": ASSISTANT, "end": END}


def render(tokenizer, messages: List[dict], *, add_generation_prompt: bool = False,
           name: Optional[str] = None):
    """Token ids and the supervised mask of a conversation in the chat template; `name`: what the
    messages' text came from, named by the error for characters the tokenizer cannot encode."""
    ids: list = []
    mask: list = []
    user_id, asst_id, end_id = (tokenizer.special_id(t) for t in (USER, ASSISTANT, END))
    for turn in messages:
        role, content = turn["role"], turn["content"]
        body = tokenizer.encode(content, name=name).tolist()
        if role in ("user", "system"):
            ids += [user_id] + body
            mask += [False] * (1 + len(body))
        elif role == "assistant":
            ids += [asst_id] + body + [end_id]
            mask += [False] + [True] * (len(body) + 1)
        else:
            raise ValueError(f"message role must be 'user', 'system' or 'assistant', got {role!r}")
    if add_generation_prompt:
        ids.append(asst_id)
        mask.append(False)
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)


def template_of(tokenizer) -> Optional[dict]:
    """The tokenizer's chat template, or None for a run that continues plain text."""
    return getattr(tokenizer, "chat_template", None)


def user_turn(tokenizer, prompt: str, name: Optional[str] = None) -> np.ndarray:
    """The ids an assistant's answer to `prompt` follows: the prompt as a user turn, then the
    assistant's header (`name`: as for render)."""
    return render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                  name=name)[0]


def answer_end_id(tokenizer) -> int:
    """The token that ends an answer: <|end|> for a run with a chat template, else <|endoftext|>."""
    template = template_of(tokenizer)
    return tokenizer.special_id(template["end"]) if template else tokenizer.eot_id


def stop_ids(tokenizer, end_id: int) -> list:
    """The ids generation stops at: end_id (the end of an answer, answer_end_id, for a prompt in
    the chat template; <|endoftext|> for plain text) and the model's own end-of-text tokens where it
    declares others (an imported checkpoint's eos_token_id, e.g. "</s>": Tokenizer.eos_tokens,
    kept by every run tuned from it), at which the model learnt to end its text."""
    ids = [int(end_id)]
    for token in getattr(tokenizer, "eos_tokens", ()) or ():
        i = tokenizer.token_id(token)
        if i is not None and i not in ids:
            ids.append(int(i))
    return ids


def answer_stop_ids(tokenizer) -> list:
    """Every token a sampled answer (sequences.sample_completion: rank, reward, dpo, rlhf) may end
    with, and "ended" may name: stop_ids of the end of an answer (answer_end_id) first, then the
    model's own end-of-text tokens, and <|endoftext|> for a run with a chat template too, where
    the model that emits it has ended its text (reply_stop_ids) and chose that token."""
    ids = stop_ids(tokenizer, answer_end_id(tokenizer))
    return ids if tokenizer.eot_id in ids else ids + [int(tokenizer.eot_id)]


def reply_stop_ids(tokenizer) -> list:
    """The ids a reply in the chat template stops at: stop_ids of its <|end|> (the ends of an
    answer, <|end|> first), then <|endoftext|>. A model that emits <|endoftext|> has ended its text
    (every training document ends with it): what would follow is a new document, never the reply,
    so the reply stops there, though it has not ended as an answer (instruct.respond's `ended`)."""
    ids = stop_ids(tokenizer, tokenizer.special_id(END))
    return ids if tokenizer.eot_id in ids else ids + [int(tokenizer.eot_id)]


def turn_ids(tokenizer, template: Optional[dict] = None) -> Optional[tuple]:
    """(user, assistant, end) ids of `template` (default: the tokenizer's chat template), what
    crop_context keeps a chat context well-formed with; None for a run without a template."""
    template = template or template_of(tokenizer)
    if not template:
        return None
    return tuple(tokenizer.special_id(template[k]) for k in ("user", "assistant", "end"))


def crop_context(ids, n: int, turns: Optional[tuple] = None) -> np.ndarray:
    """The last n tokens of a context (n >= 1): a prompt cut to leave room in the block, and the
    sliding window generation reads once its context outgrows the block (sample.generate).

    Plain text (turns None) keeps exactly its last n tokens. A chat context (turns: turn_ids, the
    context rendered in the template) keeps the conversation a turn of the template the model was
    tuned on: where the first of those n tokens is not a role token (<|user|>, <|assistant|>), it
    is replaced by the role token of the turn it lies in, the last one before it, so the window
    starts as that turn did; where it is an <|end|> (whose turn is over), it is dropped, and the
    window starts at the next turn's role token. Without a role token before it, or with n < 2, the
    cut is plain.
    """
    if len(ids) <= n:
        return np.asarray(ids)
    start = len(ids) - n
    if turns is None or n < 2:
        return np.asarray(ids[start:])  # a list is sliced before it is copied: generation's loop
    ids = np.asarray(ids)
    user, assistant, end = turns
    first = int(ids[start])
    if first in (user, assistant):
        return ids[start:]
    if first == end:
        return ids[start + 1:]
    roles = np.flatnonzero((ids[:start] == user) | (ids[:start] == assistant))
    if roles.size == 0:
        return ids[start:]
    return np.concatenate([ids[roles[-1]: roles[-1] + 1], ids[start + 1:]])
