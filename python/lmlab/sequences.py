"""Prompt/response sequences for the preference stages: encoding (and the check, before any work,
of text it cannot encode), packing into batches, their log-probabilities under a model, and
sampling one completion. A prompt is the context its answer
follows: a user turn for a run with a chat template (lmlab.chat), else plain text.

A sequence's log-probability is minus the sum of the model's per-token losses over its response,
so any loss on sequence log-probabilities (DPO, the policy gradient) reaches the model as one
scalar coefficient per sequence on that sequence's response tokens, through the same weighted
cross-entropy backward as every other stage.
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from .chat import answer_stop_ids, crop_context, template_of, turn_ids, user_turn
from .checks import SettingError
from .sample import generate

def _encode(tok, text: str) -> np.ndarray:
    # Special tokens are allowed: sampled text decodes them to their names (e.g. "<|user|>"), and
    # the ids must round-trip.
    return np.asarray(tok.encode(text, allow_special=True), dtype=np.int32)


def _prompt_ids(tok, prompt: str) -> np.ndarray:
    # A run with a chat template answers the prompt as a user turn (lmlab.chat); otherwise an
    # empty prompt becomes the context generation starts from.
    if template_of(tok):
        return user_turn(tok, prompt)
    ids = _encode(tok, prompt)
    return ids if ids.size else np.array([tok.eot_id], dtype=np.int32)


def unencodable(tok, text: str, *, prompt: bool = False) -> collections.Counter:
    """Characters of a prompt (prompt=True) or an answer that the encoding here cannot give ids:
    what _prompt_ids or answer_ids would refuse (a special token's name is a token, except in a
    chat prompt, where user text is text). The stages check their data with it before any work."""
    return tok.unknown_chars(text, allow_special=not (prompt and template_of(tok)))


def unencodable_refusal(where: str, field: str, unknown, tok, others: Sequence = ()) -> str:
    """The one-line refusal of `field` at `where` (file:line) holding the characters `unknown`
    (unencodable's Counter) that tok cannot encode; `others`: the further places that hold some
    ("line 7"; counted, the first few named). Says what to do: edit the line, or tune a run whose
    tokenizer covers them."""
    shown = ", ".join(f"{c!r} x{n}" for c, n in unknown.most_common(10))
    shown += f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
    if all("\ud800" <= c <= "\udfff" for c in unknown):  # what even byte-level BPE refuses
        what = "lone surrogate(s), which are not valid Unicode and no tokenizer encodes"
        fix = "edit or remove the line (a \\ud800-style escape in the JSON makes one)"
    else:
        what = ("character(s) the run's char tokenizer cannot encode (its vocabulary holds "
                "only the characters of the text it was trained on)")
        fix = ("edit or remove the line, or tune a run whose tokenizer covers them (a parent "
               "pretrained on text that holds them, or with a byte-level BPE tokenizer: lmlab "
               "pretrain --tokenizer bpe)")
    more = ""
    if others:
        named = ", ".join(str(o) for o in others[:5]) + (", ..." if len(others) > 5 else "")
        more = f" (and {len(others)} more: {named})"
    return f"{where}: the {field} holds {what}: {shown}{more}; {fix}"


def answer_ids(tok, text: str, ended=False) -> np.ndarray:
    """The ids of an answer: its text, then the token it ended with (sample_completion's `ended`;
    a rankings line's "ended"): True, the end-of-answer token (chat.answer_end_id); a token's name,
    that token (the model's own end of text where an imported checkpoint declared others, e.g.
    "</s>": chat.stop_ids); False, none. The one place that decides what DPO, the reward model
    and RL score as an answer."""
    ids = _encode(tok, text)
    end = ended_id(tok, ended)
    return ids if end is None else np.append(ids, np.int32(end))


def ended_id(tok, ended):
    """The id of the token an answer ended with, `ended` as answer_ids takes it (None for False);
    ValueError for a name that ends no answer of this run (chat.answer_stop_ids)."""
    if not ended:
        return None
    stops = answer_stop_ids(tok)
    end = tok.token_id(ended) if isinstance(ended, str) else stops[0]
    if end not in stops:
        raise ValueError(f"'ended' names {ended!r}, which ends no answer of this run; expected "
                         f"true, false or one of {[tok.token(i) for i in stops]}")
    return end


def encode_pair(tok, prompt: str, response: str, max_len: int, ended: bool = False) -> tuple:
    """(prompt ids, response ids) fitted into max_len tokens; the response is answer_ids(tok,
    response, ended).

    The prompt becomes the context its answer follows (module docstring; an empty plain prompt
    becomes <|endoftext|>). Too long: the prompt loses its oldest tokens first (a chat prompt
    still starting with its turn's role token, chat.crop_context), then
    the response is cut at the end, so an answer that is cut loses its end token first: a cut
    answer never ends.
    """
    p = _prompt_ids(tok, prompt)
    r = answer_ids(tok, response, ended)
    if p.size + r.size > max_len:
        p = crop_context(p, max(1, max_len - r.size), turn_ids(tok))
        r = r[: max_len - p.size]
    return p, r


def pack_for_loss(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], T: int,
                  pad_id: int) -> tuple:
    """Batch prompt+response sequences for next-token losses: x, y (N, T) and the response mask.

    mask[b, t] = 1 where y[b, t] is a response token. Right padding (mask 0) leaves the real
    positions unchanged, since attention is causal.
    """
    n = len(prompts)
    x = np.full((n, T), pad_id, dtype=np.int32)
    y = np.full((n, T), pad_id, dtype=np.int32)
    mask = np.zeros((n, T), dtype=np.float32)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        seq = np.concatenate([p, r])
        m = seq.size - 1
        if m > T:
            raise ValueError(f"sequence of {seq.size} tokens does not fit T={T} (+1)")
        x[b, :m] = seq[:-1]
        y[b, :m] = seq[1:]
        mask[b, p.size - 1: m] = 1.0
    return x, y, mask


def sequence_logprobs(model, x, y, mask) -> np.ndarray:
    """log p(response | prompt) per row, float64: minus the masked sum of per-token losses."""
    _, losses = model.forward(x, y)
    return -(losses.astype(np.float64) * mask).sum(axis=1)


def batched_logprobs(model, prompts, responses, T, pad_id, batch_size) -> np.ndarray:
    out = np.zeros(len(prompts), dtype=np.float64)
    for i in range(0, len(prompts), batch_size):
        j = min(len(prompts), i + batch_size)
        x, y, mask = pack_for_loss(prompts[i:j], responses[i:j], T, pad_id)
        out[i:j] = sequence_logprobs(model, x, y, mask)
    return out


def log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def sigmoid(z):
    return np.exp(log_sigmoid(z))


def check_answer_fits(name: str, max_new_tokens: int, block_size: int) -> None:
    """Refuse an answer length the model's block cannot hold with at least one prompt token
    (SettingError naming the setting `name`, so the command line names its flag)."""
    if not 0 < max_new_tokens < block_size:
        raise SettingError(name, max_new_tokens, f"expected an integer from 1 to "
                           f"{block_size - 1}: the run's block_size {block_size} also holds "
                           "the prompt")


def prompt_ids_for(tok, prompt: str, block_size: int, max_new_tokens: int) -> np.ndarray:
    """The prompt's ids, oldest tokens dropped so that max_new_tokens still fit the block."""
    check_answer_fits("max_new_tokens", max_new_tokens, block_size)
    return crop_context(_prompt_ids(tok, prompt), block_size - max_new_tokens, turn_ids(tok))


def sample_completion(model, tok, prompt_ids, max_new_tokens: int, *, seed: int,
                      temperature: float = 1.0, top_k=None, top_p=None) -> tuple:
    """One sampled answer: (response ids, text, ended). Generation stops at a sampled end of
    answer (<|endoftext|>, or <|end|> for a run with a chat template) or at the model's own end
    of text (an imported checkpoint's, e.g. "</s>", and <|endoftext|> for a run with a chat
    template: chat.answer_stop_ids). The ids keep the end token
    the policy chose (it is part of what the policy chose; they are answer_ids(tok, text, ended)
    up to the text's round trip), the text does not; `ended` names it as answer_ids reads it:
    True for the end of answer, the token's name for another end token. An answer that runs
    into max_new_tokens has not ended (False)."""
    stops = answer_stop_ids(tok)
    end = stops[0]
    new = np.asarray(generate(model, prompt_ids, max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, stop_ids=stops,
                              keep_stop=True), dtype=np.int32)
    last = int(new[-1]) if new.size else None
    ended = last in stops and (last == end or tok.token(last))
    return new, tok.decode(new[:-1] if ended else new), ended


def sample_answers(model, tok, prompt_ids, max_new_tokens: int, seeds, **settings) -> tuple:
    """Answers to one prompt for ranking, one per seed, by sample_completion: (texts, ended), the
    two lists a rankings line holds as "completions" and "ended". settings: temperature, top_k,
    top_p."""
    outs = [sample_completion(model, tok, prompt_ids, max_new_tokens, seed=int(s), **settings)
            for s in seeds]
    return [text for _, text, _ in outs], [ended for _, _, ended in outs]
