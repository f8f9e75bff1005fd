"""Scripted judges: rank completions by a rule, so a class can run the preference loop without a
person, and measure how often a judge prefers a tuned model's answers to its reference's.

A judge is any callable (prompt, completions) -> ranking (the format of lmlab.rankings); the
scripted ones score each completion and rank by score, equal scores tied.
"""

from __future__ import annotations

import abc
from typing import Callable, Sequence

import numpy as np

from .rankings import compact_ranking, normalize_ranking
from .sequences import pack_for_loss, prompt_ids_for, sample_completion, sequence_logprobs

class ScoreJudge(abc.ABC):
    """A judge that scores each completion and ranks by score, best first; equal scores tie.
    Subclasses define score()."""

    name = "score"

    @abc.abstractmethod
    def score(self, prompt: str, completion: str) -> float:
        """Higher is better."""

    def __call__(self, prompt: str, completions: Sequence[str]) -> list:
        scores = [self.score(prompt, c) for c in completions]
        groups: list = []
        for i in sorted(range(len(completions)), key=lambda i: -scores[i]):
            if groups and scores[groups[-1][0]] == scores[i]:
                groups[-1].append(i)
            else:
                groups.append([i])
        return compact_ranking(groups)

    def __repr__(self) -> str:
        return self.name


class PreferWord(ScoreJudge):
    """More (non-overlapping) occurrences of `word` is better."""

    def __init__(self, word: str):
        if not isinstance(word, str) or not word:
            raise ValueError(f"PreferWord needs a non-empty word, got {word!r}")
        self.word = word
        self.name = f"word:{word}"

    def score(self, prompt: str, completion: str) -> float:
        return float(completion.count(self.word))


class PreferShorter(ScoreJudge):
    """Fewer characters is better."""

    name = "shorter"

    def score(self, prompt: str, completion: str) -> float:
        return -float(len(completion))


class PreferLonger(ScoreJudge):
    """More characters is better."""

    name = "longer"

    def score(self, prompt: str, completion: str) -> float:
        return float(len(completion))


def make_judge(spec: str) -> ScoreJudge:
    """"word:WORD", "shorter" or "longer" -> the scripted judge."""
    if not isinstance(spec, str):
        raise TypeError(f"judge spec must be a string, got {type(spec).__name__}")
    if spec.startswith("word:"):
        if spec == "word:":
            raise ValueError("judge 'word:' names no word: expected word:WORD (e.g. word:python), "
                             "shorter or longer")
        return PreferWord(spec[len("word:"):])
    if spec == "shorter":
        return PreferShorter()
    if spec == "longer":
        return PreferLonger()
    raise ValueError(f"unknown judge {spec!r}: expected word:WORD, shorter or longer")


def judge_preference(judge, prompt: str, a: str, b: str) -> float:
    """1 if the judge ranks a above b, 0 if below, 0.5 for a tie."""
    groups = normalize_ranking(judge(prompt, [a, b]), 2, where="judge ranking")
    if len(groups) == 1:
        return 0.5
    return 1.0 if groups[0] == [0] else 0.0


def judge_reward(judge: ScoreJudge) -> Callable:
    """A reward function (prompt, completions, ended) -> rewards from a scoring judge (which
    reads the text only)."""
    return lambda prompt, comps, ended=None: np.array([judge.score(prompt, c) for c in comps],
                                                      np.float64)


def compare_to_reference(policy, reference, tok, prompts: Sequence[str], judge, *,
                         max_new_tokens: int = 32, samples_per_prompt: int = 1,
                         temperature: float = 1.0, top_k=None, seed: int = 0) -> dict:
    """How often the judge prefers the policy's answer to the reference's (ties count half), and
    KL(policy || reference) estimated on the policy's own samples (nats per answer and per token).

    The two models sample with different seeds, so comparing a model with itself gives ~50%.
    """
    bs = policy.config.block_size
    prefs, kls, ntok, wins, ties = [], [], 0.0, 0, 0
    for i, prompt in enumerate(prompts):
        pids = prompt_ids_for(tok, prompt, bs, max_new_tokens)
        for s in range(samples_per_prompt):
            base = seed + 2 * (i * samples_per_prompt + s)
            ids, mine, _ = sample_completion(policy, tok, pids, max_new_tokens, seed=base,
                                          temperature=temperature, top_k=top_k)
            _, theirs, _ = sample_completion(reference, tok, pids, max_new_tokens, seed=base + 1,
                                          temperature=temperature, top_k=top_k)
            pref = judge_preference(judge, prompt, mine, theirs)
            prefs.append(pref)
            wins += pref == 1.0
            ties += pref == 0.5
            x, y, mask = pack_for_loss([pids], [ids], bs, tok.eot_id)
            kls.append(float(sequence_logprobs(policy, x, y, mask)[0]
                             - sequence_logprobs(reference, x, y, mask)[0]))
            ntok += float(mask.sum())
    n = len(prefs)
    return {"win_rate": float(np.mean(prefs)), "wins": int(wins), "ties": int(ties),
            "losses": int(n - wins - ties), "comparisons": n, "kl": float(np.mean(kls)),
            "kl_per_token": float(np.sum(kls) / max(ntok, 1.0))}

