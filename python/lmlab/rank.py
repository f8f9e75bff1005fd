"""Collecting rankings in the terminal, from a person or a scripted judge (`lmlab rank`).

For each prompt the model samples K completions with distinct seeds; they are shown numbered from
1 and the person types a ranking, best first:
    2 1 3        completion 2 is best, then 1, then 3   (commas or ">" also separate)
    2=1 3        2 and 1 tie for best, 3 is worst
    s            skip this prompt (it is asked again next time)
    q            quit (Ctrl-D and Ctrl-C also quit); every judgement so far is already saved
Invalid input (a number out of range, a duplicate, one left out, a stray word) is explained and
asked again. Each judgement is appended to the rankings JSONL and synced to disk at once; running
the same command again skips the prompts that file already ranks. With each answer the line records
whether it ended with the end-of-answer token ("ended", lmlab.rankings), since the text alone does
not say; so the person can judge that too, an answer cut at the --max-new-tokens limit is shown
with a mark after it, e.g. "… (cut at 32 tokens)" (the studio's Rank page shows the same mark).
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Callable, Sequence

from .rankings import append_ranking, compact_ranking, load_rankings
from .sequences import prompt_ids_for, sample_answers

HELP = 'best first, e.g. "2 1 3"; ties "2=1 3"; "s" skips, "q" quits'


class RankingInputError(ValueError):
    """What was wrong with a typed ranking, in words for the person who typed it."""


def parse_ranking_input(text: str, k: int):
    """("rank", ranking over 0-based indices) | ("skip", None) | ("quit", None) for typed text."""
    s = text.strip().lower()
    if s in ("s", "skip"):
        return "skip", None
    if s in ("q", "quit", "exit"):
        return "quit", None
    if not s:
        raise RankingInputError(f"nothing typed; rank {HELP}")
    groups, seen = [], {}
    for place, item in enumerate(t for t in re.split(r"[\s,>]+", s) if t):
        group = []
        for part in item.split("="):
            if not part:
                raise RankingInputError(f"{item!r}: a tie needs a number on each side of '=', "
                                        "as in 2=1")
            if not part.isdigit():
                raise RankingInputError(f"{part!r} is not a completion number (1..{k})")
            n = int(part)
            if not 1 <= n <= k:
                raise RankingInputError(f"{n} is out of range: the completions are numbered "
                                        f"1..{k}")
            if n in seen:
                raise RankingInputError(f"{n} appears twice; give each completion one place")
            seen[n] = place
            group.append(n - 1)
        groups.append(group)
    missing = [n for n in range(1, k + 1) if n not in seen]
    if missing:
        left = ", ".join(map(str, missing))
        raise RankingInputError(f"completion{'s' if len(missing) > 1 else ''} {left} "
                                f"{'are' if len(missing) > 1 else 'is'} missing: rank all {k} "
                                "(use = for ties)")
    return "rank", compact_ranking(groups)


def cut_mark(max_new_tokens=None) -> str:
    """What follows an answer cut at the token limit (worded as on the studio's Rank page)."""
    limit = f"{max_new_tokens} tokens" if max_new_tokens else "the token limit"
    return f"\u2026 (cut at {limit})"


def show_completions(prompt: str, completions: Sequence[str], write: Callable, ended=None,
                     max_new_tokens=None) -> None:
    """Each completion on its numbered line; one that did not end (ended[j] False) is marked as
    cut at the limit, since "it stops" vs "it was cut mid-sentence" is part of what a person
    judges. ended=None (not known) marks none."""
    write(f"prompt: {prompt!r}, continued by:")
    for i, c in enumerate(completions, 1):
        # Newlines are shown as a visible mark so every completion stays on its numbered line.
        mark = "" if ended is None or ended[i - 1] else cut_mark(max_new_tokens)
        write(f"  {i}) ...{c}".replace("\n", "\u21b5") + mark)


def ranked_prompts(path) -> collections.Counter:
    """How many rankings the file already holds for each prompt (an absent file holds none)."""
    if not Path(path).exists():
        return collections.Counter()
    return collections.Counter(r["prompt"] for r in load_rankings(path, allow_empty=True))


def answer_sampler(model, tok, max_new_tokens: int, *, seed: int = 0, **settings) -> Callable:
    """run_session's sample function for a model: completion j of the prompt at index i uses seed
    SEED + k*i + j; returns (completions, seeds, ended) (sequences.sample_answers). settings:
    temperature, top_k, top_p."""
    bs = model.config.block_size

    def sample(prompt: str, index: int, k: int):
        pids = prompt_ids_for(tok, prompt, bs, max_new_tokens)
        seeds = [seed + k * index + j for j in range(k)]
        texts, ended = sample_answers(model, tok, pids, max_new_tokens, seeds, **settings)
        return texts, seeds, ended

    return sample


def run_session(prompts: Sequence[str], sample: Callable, out_path, k: int, *, judge=None,
                read: Callable = input, write: Callable = print, judge_name: str = "human",
                max_new_tokens=None) -> dict:
    """Rank every prompt not yet in out_path; sample(prompt, index, k) -> (completions, seeds,
    ended) with ended[j] whether completion j ended with the end-of-answer token (answer_sampler
    makes such a function). A sample that returns only (completions, seeds) writes no "ended"
    (no answer ended, as for an older file) and shows no answer as cut. max_new_tokens (the
    sampler's limit) only words the mark of a cut answer: "cut at N tokens".

    With judge=None a person answers through read(); otherwise judge(prompt, completions) does.
    Returns counts: ranked, skipped, already (ranked in an earlier session), quit (bool).
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 completions to rank, got {k}")
    # A prompt listed n times is ranked n times: its j-th listing is done once the file holds
    # more than j rankings of it, so an interrupted session resumes to the same set.
    done, seen = ranked_prompts(out_path), collections.Counter()
    todo = []
    for i, p in enumerate(prompts):
        if seen[p] >= done[p]:
            todo.append((i, p))
        seen[p] += 1
    stats = {"ranked": 0, "skipped": 0, "already": len(prompts) - len(todo), "quit": False}
    if stats["already"]:
        write(f"{stats['already']} of {len(prompts)} prompts already ranked in {out_path}; "
              "continuing with the rest")
    for n, (i, prompt) in enumerate(todo, 1):
        completions, seeds, *ended = sample(prompt, i, k)
        if judge is not None:
            action, ranking = "rank", judge(prompt, completions)
        else:
            write(f"\n[{n}/{len(todo)}]")
            show_completions(prompt, completions, write, ended[0] if ended else None,
                             max_new_tokens)
            action, ranking = _ask(read, write, k)
        if action == "quit":
            stats["quit"] = True
            break
        if action == "skip":
            stats["skipped"] += 1
            continue
        record = {"prompt": prompt, "completions": list(completions), "ranking": ranking,
                  "judge": judge_name, "seeds": [int(s) for s in seeds]}
        if ended:
            record["ended"] = list(ended[0])
        append_ranking(out_path, record)
        stats["ranked"] += 1
    write(f"ranked {stats['ranked']}, skipped {stats['skipped']}"
          + (" (quit: run the same command again to resume)" if stats["quit"] else "")
          + f"; rankings in {out_path}")
    return stats


def _ask(read: Callable, write: Callable, k: int):
    while True:
        try:
            text = read(f"your ranking ({HELP})> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return "quit", None
        try:
            return parse_ranking_input(text, k)
        except RankingInputError as exc:
            write(f"  not a ranking: {exc}. Try again.")
