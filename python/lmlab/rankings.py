"""The rankings format: judgements of several completions of one prompt, read, checked and written.

Rankings (JSONL, one judgement per line):
    {"prompt": str, "completions": [str, str, ...], "ranking": [...], "ended": [bool, ...]}
`ranking` lists every completion index exactly once, best first. An item is either an index or a
list of indices tied at that place: [2, [0, 1], 3] means 2 is best, 0 and 1 tie, 3 is worst.
`ended` (optional, one entry per completion) says how the answer ended: with the end-of-answer
token (true: <|endoftext|>, or <|end|> for a run with a chat template), with another end token the
model declares (its name, e.g. "</s>" for a run imported with it: lmlab.chat.stop_ids), or at the
sampling limit (false). The text never holds that token, yet it is part of what the model chose,
so the reward model and DPO score it (lmlab.sequences.answer_ids). `lmlab rank` and the studio
write it; a line without it (older files, other tools) has no answer ended. Pairwise data as other tools write
it, {"prompt", "chosen", "rejected"}, is read as a two-item ranking [0, 1] over [chosen, rejected]
(its `ended`, if given, is [chosen's, rejected's]). Extra keys (who judged, sampling seeds) are
kept. Rankings are handed around in the compact form written here: a group of one as its bare
index.

This is the one place the format is checked (`normalize_ranking`) and its pairs derived
(`pairs_from_ranking`); the reward model, DPO and `lmlab rank` all go through it. Given the run's
tokenizer, the readers (`load_rankings`, `read_prompts`) also check, before any work, that every
line's text can be encoded (sequences.unencodable) and every end token named in 'ended' ends the
run's answers, naming the first line that fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .checks import check_output_path
from .data import need_regular_file, need_str, read_jsonl_objects
from .files import JSONTextError, NotJSON, append_line, check_parent_dir, parse_json
from .sequences import ended_id, unencodable, unencodable_refusal


def normalize_ranking(ranking, n: int, *, where: str = "ranking") -> list:
    """Check a ranking over n completions; return it as a list of groups (lists of indices).

    Items are ints or lists of ints (ties); every index 0..n-1 must appear exactly once.
    """
    if not isinstance(ranking, (list, tuple)) or not ranking:
        raise ValueError(f"{where}: 'ranking' must be a non-empty list of completion indices, "
                         f"best first, got {ranking!r}")
    groups = []
    for item in ranking:
        group = list(item) if isinstance(item, (list, tuple)) else [item]
        if not group:
            raise ValueError(f"{where}: 'ranking' has an empty tie group: {ranking!r}")
        for i in group:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise ValueError(f"{where}: ranking entries must be completion indices (ints) "
                                 f"or lists of them, got {i!r} in {ranking!r}")
            if not 0 <= i < n:
                raise ValueError(f"{where}: ranking index {i} is out of range for {n} "
                                 f"completions (0..{n - 1})")
        groups.append([int(i) for i in group])
    flat = [i for g in groups for i in g]
    dupes = sorted({i for i in flat if flat.count(i) > 1})
    if dupes:
        raise ValueError(f"{where}: ranking lists completion(s) {dupes} more than once")
    unranked = sorted(set(range(n)) - set(flat))
    if unranked:
        raise ValueError(f"{where}: ranking leaves completion(s) {unranked} unranked; rank all {n}")
    return groups


def compact_ranking(groups) -> list:
    """The JSON form: a single index for a group of one, a list for ties."""
    return [g[0] if len(g) == 1 else list(g) for g in groups]


def pairs_from_ranking(ranking, n: Optional[int] = None) -> list:
    """Every (better, worse) index pair a ranking implies, best pairs first; ties give no pair."""
    if n is None:
        n = sum(len(g) if isinstance(g, (list, tuple)) else 1 for g in ranking)
    groups = normalize_ranking(ranking, n)
    pairs = []
    for a, better in enumerate(groups):
        for worse in groups[a + 1:]:
            pairs.extend((b, w) for b in better for w in worse)
    return pairs


def parse_record(obj, *, where: str = "record") -> dict:
    """One JSON object -> {"prompt", "completions", "ranking" (compact), ...extra keys}."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" not in obj:
        raise ValueError(f"{where}: missing 'prompt'")
    rec = dict(obj)
    rec["prompt"] = need_str(obj, "prompt", where)
    if "completions" in obj or "ranking" in obj:
        for key in ("completions", "ranking"):
            if key not in obj:
                raise ValueError(f"{where}: missing {key!r}")
        comps = obj["completions"]
        if not isinstance(comps, list) or len(comps) < 2 or not all(isinstance(c, str) for c in comps):
            raise ValueError(f"{where}: 'completions' must be a list of at least 2 strings")
        rec["ranking"] = compact_ranking(normalize_ranking(obj["ranking"], len(comps), where=where))
    elif "chosen" in obj and "rejected" in obj:
        rec["completions"] = [need_str(obj, "chosen", where), need_str(obj, "rejected", where)]
        rec["ranking"] = [0, 1]
        del rec["chosen"], rec["rejected"]
    else:
        raise ValueError(f"{where}: expected 'completions' and 'ranking', or 'chosen' and "
                         f"'rejected'; got {sorted(obj)}")
    if "ended" in obj:
        rec["ended"] = _check_ended(obj["ended"], len(rec["completions"]), where)
    return rec


def _check_ended(ended, n: int, where: str) -> list:
    if not isinstance(ended, (list, tuple)):
        raise ValueError(f"{where}: 'ended' must be a list of {n} true/false values, one per "
                         f"completion (did it end with the end-of-answer token?), got {ended!r}")
    if len(ended) != n:
        raise ValueError(f"{where}: 'ended' has {len(ended)} entries for {n} completions; give "
                         "one true/false per completion")
    for e in ended:
        if not isinstance(e, (bool, np.bool_)) and not (isinstance(e, str) and e):
            raise ValueError(f"{where}: 'ended' entries must be true, false or the name of the "
                             f"end token the answer ended with, got {e!r}")
    return [e if isinstance(e, str) else bool(e) for e in ended]


def _check_end_tokens(tok, path, lines) -> None:
    """Refuse the first (line number, record) whose 'ended' names a token that ends no answer of
    tok's run (sequences.ended_id), naming the line."""
    for lineno, rec in lines:
        for e in answers_ended(rec):
            try:
                ended_id(tok, e)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: {exc}") from None


def answers_ended(record: dict) -> list:
    """How each completion of a (parsed) record ended (True, an end token's name, or False); a
    record without 'ended' (an older file, another tool's pairs) has none ended."""
    return list(record.get("ended") or [False] * len(record["completions"]))


def ranking_paths(rankings) -> Optional[list]:
    """One rankings file or several, as a list of path strings (None stays None: not given)."""
    if rankings is None:
        return None
    if isinstance(rankings, (str, os.PathLike)):
        rankings = [rankings]
    if not isinstance(rankings, (list, tuple)) or not all(
            isinstance(p, (str, os.PathLike)) for p in rankings):
        raise ValueError(f"rankings must be a rankings file (a str or path) or a list of them, "
                         f"got {rankings!r}")
    return [os.fspath(p) for p in rankings]


def load_rankings(path, *, allow_empty: bool = False, tokenizer=None) -> list:
    """Every record of a rankings JSONL file (rankings and/or pairs); errors name file and line.
    A torn last line, which an interrupted append leaves, is skipped (files.complete_lines).
    allow_empty: a file without a record gives [] rather than an error. tokenizer: the run the
    records will train; a prompt or answer holding characters it cannot encode is refused here,
    every line checked, naming the first such line and field and counting the others."""
    path, objs = read_jsonl_objects(path, appended=True, allow_empty=allow_empty)
    records = [parse_record(obj, where=f"{path}:{lineno}") for lineno, obj in objs]
    if tokenizer is not None:
        _check_encodable(tokenizer, path, [(lineno, obj, rec) for (lineno, obj), rec
                                           in zip(objs, records)])
        _check_end_tokens(tokenizer, path, [(lineno, rec) for (lineno, _), rec
                                            in zip(objs, records)])
    return records


def _check_encodable(tok, path, lines) -> None:
    """Refuse the first (line number, object, record) whose prompt or an answer tok cannot encode
    (sequences.unencodable), naming its field as the line names it, and count the others."""
    first, others = None, []
    for lineno, obj, rec in lines:
        fields = [("prompt", rec["prompt"], True)]
        names = ([f"answer completions[{i}]" for i in range(len(rec["completions"]))]
                 if "completions" in obj else ["chosen answer", "rejected answer"])
        fields += [(name, text, False) for name, text in zip(names, rec["completions"])]
        for name, text, is_prompt in fields:
            unknown = unencodable(tok, text, prompt=is_prompt)
            if unknown:
                if first is None:
                    first = (lineno, name, unknown)
                else:
                    others.append(f"line {lineno}")
                break
    if first is not None:
        lineno, name, unknown = first
        raise ValueError(unencodable_refusal(f"{path}:{lineno}", name, unknown, tok, others))


def append_ranking(path, record: dict) -> None:
    """Append one judgement and force it to disk, so a crash or Ctrl-C never loses it.

    files.append_line writes the whole line in one write under an exclusive flock, so writers in
    several processes (`lmlab rank` and `lmlab studio` on one file) never interleave their lines,
    first removes a torn last line a killed writer left, and cuts off again a write that fails (disk
    full, file too large), so the file keeps its whole lines only; a failure comes out as
    CheckpointError naming the file."""
    line = (json.dumps(parse_record(record), ensure_ascii=False) + "\n").encode("utf-8")
    append_line(path, line)


def preference_pairs(records: Iterable[dict]) -> list:
    """(prompt, chosen, rejected, chosen ended, rejected ended) for every pair implied by every
    ranking; 'ended' as answers_ended says."""
    out = []
    for rec in records:
        comps, ended = rec["completions"], answers_ended(rec)
        out.extend((rec["prompt"], comps[b], comps[w], ended[b], ended[w])
                   for b, w in pairs_from_ranking(rec["ranking"], len(comps)))
    return out


def split_records(records: Sequence[dict], val_fraction: float, seed: int) -> tuple:
    """Split by prompt (not by pair, nor by ranking: a class in the studio ranks one prompt's
    answers once per person), so no held-out prompt's pairs leak into training. val_fraction of
    the distinct prompts are held out, with every ranking of each; the order is kept."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    prompts = list(dict.fromkeys(r["prompt"] for r in records))  # distinct, in order of appearance
    order = np.random.default_rng(seed).permutation(len(prompts))
    n_val = int(round(len(prompts) * val_fraction))
    if val_fraction > 0 and len(prompts) >= 2:
        n_val = min(max(n_val, 1), len(prompts) - 1)
    held_out = {prompts[i] for i in order[:n_val]}
    val = [r for r in records if r["prompt"] in held_out]
    train = [r for r in records if r["prompt"] not in held_out]
    return train, val



def load_split_rankings(paths, val_fraction: float, seed: int, needed_by: str,
                        tokenizer=None) -> tuple:
    """(train, held-out) records of every rankings file a preference stage was given, split by
    split_records; `needed_by` names the stage in the error when none was given. Refused before
    any work: text `tokenizer` (the run's) cannot encode (load_rankings), and training rankings
    that imply no pair (every one a single tie), naming the files."""
    if not paths:
        raise ValueError(f"{needed_by} needs rankings (--rankings FILE ...)")
    records = [r for p in paths for r in load_rankings(p, tokenizer=tokenizer)]
    train, val = split_records(records, val_fraction, seed)
    if not any(pairs_from_ranking(r["ranking"], len(r["completions"])) for r in train):
        held = f" that is not held out ({len(train)} of {len(records)})" if val else ""
        raise ValueError(f"{needed_by} needs a (better, worse) pair to train on, and every "
                         f"ranking in {', '.join(paths)}{held} is a single tie (all its answers "
                         "tied); rank at least one answer above another")
    return train, val


def check_rankings_output(path, *, writable: bool = True, name: str = "rankings") -> Path:
    """The rankings file `lmlab rank` or the studio will append to, checked before any work: named
    (an empty path is refused as the setting `name`: rank's --out, the studio's --rankings), not a
    directory, nor a FIFO or device (opening a FIFO to write waits for a reader forever), in a
    directory that exists, (writable) one this process may write, and, where it exists, holding
    rankings as load_rankings reads them (a binary file, not UTF-8 JSONL, was refused by rank only
    once its model had loaded, and the studio started on it, its Rank page failing later)."""
    check_output_path(name, path, "the JSONL file to append the rankings to")
    path = Path(os.fspath(path))
    if path.is_dir():
        raise ValueError(f"{path} is a directory; rankings go to a JSONL file (e.g. "
                         f"{path / 'rankings.jsonl'})")
    if path.exists():
        need_regular_file(os.fspath(path), "rankings file", "a JSONL file")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        check_parent_dir(path)  # a file named as a folder (out.jsonl/r.jsonl) is named as such
        raise FileNotFoundError(f"cannot write rankings to {path}: the directory {folder} does "
                                "not exist")
    if writable and not os.access(path if path.exists() else folder, os.W_OK):
        raise PermissionError(f"cannot write rankings to {path}: permission denied")
    if path.exists():
        load_rankings(path, allow_empty=True)  # what rank resumes from and the Rank page counts
    return path


def read_prompts(path, *, tokenizer=None) -> list:
    """Prompts from a file: JSONL objects with "prompt", or else one prompt per line. tokenizer:
    the run that will answer them; a prompt holding characters it cannot encode is refused here,
    every line checked, naming the first such line and counting the others."""
    path = Path(need_regular_file(os.fspath(path), "prompts file", "a text file of prompts, one "
                                  "per line, or JSONL with \"prompt\""))
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is dropped
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts file {path} is not UTF-8 text (byte offset {e.start}); convert "
                         "it, e.g. with iconv -t UTF-8") from None
    prompts, linenos = [], []
    # Lines as a text editor counts them: split at newlines only (read_text has made \r\n and
    # \r newlines), not at the other breaks str.splitlines knows (\x0c, \u2028, ...).
    for lineno, ln in enumerate(text.split("\n"), 1):
        if not ln.strip():
            continue
        obj = None
        if ln.lstrip().startswith("{"):
            try:
                obj = parse_json(ln)
            except NotJSON:  # a prompt that happens to start with "{"
                obj = None
            except JSONTextError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
        if isinstance(obj, dict):
            if not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: a JSON line needs a string \"prompt\"")
            prompts.append(obj["prompt"])
        else:
            # One prompt per line; "\n" in the file stands for a newline inside the prompt.
            prompts.append(ln.replace("\\n", "\n"))
        linenos.append(lineno)
    if not prompts:
        raise ValueError(f"{path}: no prompts (expected one per line, or JSONL with \"prompt\")")
    if tokenizer is not None:
        check_prompts(prompts, tokenizer, path=path, linenos=linenos)
    return prompts


def check_prompts(prompts, tokenizer, *, path=None, linenos=None) -> None:
    """Refuse, every prompt checked, one that `tokenizer` cannot encode (sequences.unencodable):
    the first is named by its place (path:line, given the file and each prompt's line; else
    prompts[i]), the others counted."""
    bad = [i for i, p in enumerate(prompts) if unencodable(tokenizer, p, prompt=True)]
    if not bad:
        return
    places = ([f"line {n}" for n in linenos] if path is not None
              else [f"prompts[{i}]" for i in range(len(prompts))])
    where = f"{path}:{linenos[bad[0]]}" if path is not None else places[bad[0]]
    raise ValueError(unencodable_refusal(where, "prompt", unencodable(tokenizer, prompts[bad[0]],
                                                                      prompt=True),
                                         tokenizer, [places[i] for i in bad[1:]]))
