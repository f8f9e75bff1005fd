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
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
TEMPLATE = {"name": "lmlab-chat-v1", "user": USER, "assistant": ASSISTANT, "end": END}


def render(tokenizer, messages: List[dict], *, add_generation_prompt: bool = False):
    """Token ids and the supervised mask of a conversation in the chat template."""
    ids: list = []
    mask: list = []
    user_id, asst_id, end_id = (tokenizer.special_id(t) for t in (USER, ASSISTANT, END))
    for turn in messages:
        role, content = turn["role"], turn["content"]
        body = tokenizer.encode(content).tolist()
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


def user_turn(tokenizer, prompt: str) -> np.ndarray:
    """The ids an assistant's answer to `prompt` follows: the prompt as a user turn, then the
    assistant's header."""
    return render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)[0]


def answer_end_id(tokenizer) -> int:
    """The token that ends an answer: <|end|> for a run with a chat template, else <|endoftext|>."""
    template = template_of(tokenizer)
    return tokenizer.special_id(template["end"]) if template else tokenizer.eot_id


def cut_prompt(prompt_ids: np.ndarray, n: int, *, turn: bool) -> np.ndarray:
    """A prompt's ids cut to its last n tokens (n >= 1) to leave room in the block. A chat
    prompt (turn=True: rendered in the template, starting with <|user|>) keeps its first token, so
    the model still sees a turn of the template it was tuned on."""
    prompt_ids = np.asarray(prompt_ids)
    if prompt_ids.size <= n:
        return prompt_ids
    if turn and n >= 2:
        return np.concatenate([prompt_ids[:1], prompt_ids[prompt_ids.size - (n - 1):]])
    return prompt_ids[prompt_ids.size - n:]
