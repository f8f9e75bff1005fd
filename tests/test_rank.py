"""`lmlab rank`: typed rankings parsed and explained, and the session driven through a real
pseudo-terminal: valid rankings, ties, invalid input asked again, skip, quit, resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect  # a test dependency (pyproject's [test] extra): drives the real terminal session
import pytest

import lmlab
from lmlab.rank import RankingInputError, parse_ranking_input, run_session

PROMPTS = ["alpha ", "beta ", "gamma ", "delta "]


@pytest.mark.parametrize("text,expected", [
    ("2 1 3", [1, 0, 2]), ("2=1 3", [[1, 0], 2]), (" 3,1>2 ", [2, 0, 1]), ("1=2=3", [[0, 1, 2]]),
])
def test_parse_valid_rankings(text, expected):
    assert parse_ranking_input(text, 3) == ("rank", expected)


@pytest.mark.parametrize("text,msg", [
    ("4 1 2", "4 is out of range"), ("0 1 2", "0 is out of range"), ("1 1 2", "1 appears twice"),
    ("2=2 1 3", "2 appears twice"), ("1 2", "3 is missing"), ("1", "2, 3 are missing"),
    ("1 two 3", "'two' is not a completion number"), ("", "nothing typed"), ("1 =2 3", "a tie needs a number on each side"),
])
def test_parse_invalid_rankings_explains(text, msg):
    with pytest.raises(RankingInputError, match=msg):
        parse_ranking_input(text, 3)


def test_parse_skip_and_quit():
    assert parse_ranking_input("s", 3) == ("skip", None)
    assert parse_ranking_input(" Q ", 3) == ("quit", None)


def test_session_with_scripted_input_and_judge(tmp_path):
    out = tmp_path / "r.jsonl"
    sample = lambda prompt, i, k: ([f"{prompt}{j}" * (j + 1) for j in range(k)], list(range(k)))  # noqa: E731
    answers = iter(["9 1", "3 2 1", "s", "q"])
    lines: list = []
    stats = run_session(PROMPTS, sample, out, 3, read=lambda _: next(answers), write=lines.append)
    assert stats == {"ranked": 1, "skipped": 1, "already": 0, "quit": True}
    assert any("9 is out of range" in ln for ln in lines)
    from lmlab.judges import PreferShorter
    from lmlab.rankings import load_rankings
    stats = run_session(PROMPTS, sample, out, 3, judge=PreferShorter(), write=lines.append)
    assert stats == {"ranked": 3, "skipped": 0, "already": 1, "quit": False}
    recs = load_rankings(out)
    assert [r["prompt"] for r in recs] == ["alpha ", "beta ", "gamma ", "delta "]
    assert recs[0]["ranking"] == [2, 1, 0] and recs[1]["ranking"] == [0, 1, 2]


def test_a_session_records_which_answers_ended(tmp_path):
    """A sample function that says which answers ended gets them recorded; one that does not (the
    older two-item form) writes lines without "ended", which read as no answer ended."""
    from lmlab.judges import PreferShorter
    from lmlab.rankings import answers_ended, load_rankings
    with_end = lambda prompt, i, k: (["a", "bb", "ccc"], [1, 2, 3], [True, False, True])  # noqa: E731
    without = lambda prompt, i, k: (["a", "bb", "ccc"], [1, 2, 3])  # noqa: E731
    run_session(["p "], with_end, tmp_path / "new.jsonl", 3, judge=PreferShorter(),
                write=lambda _: None)
    run_session(["p "], without, tmp_path / "old.jsonl", 3, judge=PreferShorter(),
                write=lambda _: None)
    (new,), (old,) = load_rankings(tmp_path / "new.jsonl"), load_rankings(tmp_path / "old.jsonl")
    assert new["ended"] == [True, False, True] and "ended" not in old
    assert answers_ended(old) == [False] * 3


def test_the_terminal_view_marks_the_answers_cut_at_the_token_limit(tmp_path):
    """A person ranking sees which answers were cut at --max-new-tokens (they did not stop by
    themselves) and which ended: the cut one is marked, the ended ones are not; without the limit
    the mark still says it was cut, and a sample that does not say which ended marks none."""
    sample = lambda prompt, i, k: (["a", "bb\ncc", "ccc"], [1, 2, 3], [True, False, True])  # noqa: E731
    lines: list = []
    run_session(["p "], sample, tmp_path / "r.jsonl", 3, read=lambda _: "2 1 3", write=lines.append,
                max_new_tokens=32)
    shown = [ln for ln in lines if ln.startswith("  ")]
    assert shown == ["  1) ...a", "  2) ...bb\u21b5cc\u2026 (cut at 32 tokens)", "  3) ...ccc"]

    lines.clear()
    run_session(["q "], sample, tmp_path / "r.jsonl", 3, read=lambda _: "s", write=lines.append)
    assert [ln for ln in lines if "cut" in ln] == ["  2) ...bb\u21b5cc\u2026 (cut at the token limit)"]

    lines.clear()
    older = lambda prompt, i, k: (["a", "bb", "ccc"], [1, 2, 3])  # noqa: E731
    run_session(["q "], older, tmp_path / "r.jsonl", 3, read=lambda _: "s", write=lines.append,
                max_new_tokens=32)
    assert [ln for ln in lines if ln.startswith("  ")] == ["  1) ...a", "  2) ...bb", "  3) ...ccc"]


def test_a_prompt_listed_twice_is_ranked_twice_across_an_interrupted_session(tmp_path):
    """Resuming counts the rankings of each prompt: an interrupted session ends with the same
    records as one run straight through."""
    from lmlab.judges import PreferShorter
    from lmlab.rankings import load_rankings
    prompts = ["alpha ", "beta ", "alpha ", "beta ", "alpha "]
    sample = lambda prompt, i, k: ([f"{prompt}{i}" * (j + 1) for j in range(k)], list(range(k)))  # noqa: E731
    whole = tmp_path / "whole.jsonl"
    run_session(prompts, sample, whole, 2, judge=PreferShorter(), write=lambda _: None)
    parts = tmp_path / "parts.jsonl"
    run_session(prompts[:3], sample, parts, 2, judge=PreferShorter(), write=lambda _: None)
    stats = run_session(prompts, sample, parts, 2, judge=PreferShorter(), write=lambda _: None)
    assert stats["already"] == 3 and stats["ranked"] == 2
    assert load_rankings(parts) == load_rankings(whole) and len(load_rankings(whole)) == 5


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from lmlab.checkpoint import save_run
    from lmlab.model import GPT, GPTConfig
    from lmlab.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("rank")
    tok = train_tokenizer("abcdefgh ijkl mnop alpha beta gamma delta", "char")
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=1,
                          n_embd=8), seed=0)
    save_run(root / "run", model, tok, train_config={})
    (root / "prompts.txt").write_text("\n".join(PROMPTS), encoding="utf-8")
    return root


def _env():
    env = dict(os.environ)
    pkg_root = str(Path(lmlab.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _spawn(root, out):
    args = ["-m", "lmlab", "rank", str(root / "run"), "--prompts", str(root / "prompts.txt"),
            "--out", str(out), "-k", "3", "--max-new-tokens", "6", "--seed", "5"]
    return pexpect.spawn(sys.executable, args, env=_env(), encoding="utf-8", timeout=60)


ASK = r"your ranking \(best first"


def test_rank_in_a_terminal_with_invalid_input_skip_quit_and_resume(tiny_run, tmp_path):
    out = tmp_path / "rankings.jsonl"
    child = _spawn(tiny_run, out)
    child.expect(r"prompt: 'alpha '")
    child.expect(ASK)
    shown = re.findall(r"^  (\d)\) \.\.\.(.*?)\r?$", child.before, re.M)
    for typed, why in [("4 1 2", "4 is out of range"), ("1 1 2", "1 appears twice"),
                       ("1 2", "3 is missing"), ("first", "is not a completion number")]:
        child.sendline(typed)
        child.expect(why)
        child.expect(ASK)  # asked again, nothing written
    assert not out.exists()
    child.sendline("2 1 3")
    child.expect(r"prompt: 'beta '")
    child.expect(ASK)
    assert len(out.read_text().splitlines()) == 1  # on disk before the next prompt is answered
    child.sendline("2=1 3")
    child.expect(r"prompt: 'gamma '")
    child.expect(ASK)
    child.sendline("s")
    child.expect(r"prompt: 'delta '")
    child.expect(ASK)
    child.sendline("q")
    child.expect(r"ranked 2, skipped 1 \(quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["prompt"] for r in recs] == ["alpha ", "beta "]
    assert recs[0]["ranking"] == [1, 0, 2] and recs[1]["ranking"] == [[1, 0], 2]
    assert recs[0]["seeds"] == [5, 6, 7] and recs[1]["seeds"] == [8, 9, 10]
    assert all(r["judge"] == "human" and len(r["completions"]) == 3 for r in recs)
    # Each answer shown as it was recorded, the ones that did not end within the 6 tokens marked
    assert [n for n, _ in shown] == ["1", "2", "3"]
    cut = [line.endswith("\u2026 (cut at 6 tokens)") for _, line in shown]
    assert cut == [not e for e in recs[0]["ended"]]
    assert all(line.startswith(c.replace("\n", "\u21b5"))
               for (_, line), c in zip(shown, recs[0]["completions"]))

    # Resume: the ranked prompts are skipped, the skipped one comes back; Ctrl-D quits.
    child = _spawn(tiny_run, out)
    child.expect(r"2 of 4 prompts already ranked")
    child.expect(r"prompt: 'gamma '")
    child.expect(ASK)
    child.sendline("3 2 1")
    child.expect(r"prompt: 'delta '")
    child.expect(ASK)
    child.sendeof()
    child.expect(r"ranked 1, skipped 0 \(quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["prompt"] for r in recs] == ["alpha ", "beta ", "gamma "]
    assert recs[2]["ranking"] == [2, 1, 0] and recs[2]["seeds"] == [11, 12, 13]


def test_rank_refuses_an_out_file_that_is_not_jsonl_and_keeps_it(tiny_run, tmp_path):
    # A file without a final newline whose last line is not JSON was taken for a torn ranking and
    # cut off: `rank --out notes.txt` deleted the notes.
    out = tmp_path / "notes.txt"
    out.write_text("my notes, no final newline")
    cmd = [sys.executable, "-m", "lmlab", "rank", str(tiny_run / "run"), "--prompts",
           str(tiny_run / "prompts.txt"), "--out", str(out), "-k", "2", "--max-new-tokens", "4",
           "--judge", "word:a"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "notes.txt:1" in res.stderr and "not valid JSON" in res.stderr, res.stderr
    assert out.read_text() == "my notes, no final newline"


def test_rank_with_a_scripted_judge(tiny_run, tmp_path):
    out = tmp_path / "judged.jsonl"
    cmd = [sys.executable, "-m", "lmlab", "rank", str(tiny_run / "run"), "--prompts",
           str(tiny_run / "prompts.txt"), "--out", str(out), "-k", "4", "--max-new-tokens", "8",
           "--judge", "word:a"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["prompt"] for r in recs] == PROMPTS
    for r in recs:
        counts = [c.count("a") for c in r["completions"]]
        flat = [i for g in r["ranking"] for i in (g if isinstance(g, list) else [g])]
        assert sorted(flat) == [0, 1, 2, 3]
        assert [counts[i] for i in flat] == sorted(counts, reverse=True)
        assert r["judge"] == "word:a"
    # Each line says which answers ended with <|endoftext|> within the 8 tokens: checked against
    # the same seeds sampled without stopping (the draws agree up to the end token).
    from lmlab.checkpoint import load_model
    from lmlab.sample import generate
    from lmlab.sequences import prompt_ids_for

    model, tok, _ = load_model(tiny_run / "run")
    ended = []
    for i, r in enumerate(recs):
        pids = prompt_ids_for(tok, r["prompt"], 16, 8)
        assert r["seeds"] == [4 * i + j for j in range(4)]
        for text, end, seed in zip(r["completions"], r["ended"], r["seeds"]):
            full = [int(t) for t in generate(model, pids, 8, seed=seed)]
            stop = full.index(tok.eot_id) if tok.eot_id in full else None
            assert end is (stop is not None)  # cut at 8 tokens: not ended
            assert text == tok.decode(full[:stop])
            ended.append(end)
    assert True in ended and False in ended
    res = subprocess.run(cmd[:-2] + ["--judge", "nonsense"], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "unknown judge 'nonsense'" in res.stderr


# A `lmlab rank` killed in the middle of writing its third line: the kernel cuts a long write at a
# page boundary when kill -9 arrives (a full disk cuts any write); half a write, then an exit,
# stands in for it (os.write or os.pwrite, whichever the append uses).
KILLED_MID_LINE = """
import os, sys
from lmlab.cli import main
calls = [0]
def torn(real):
    def write(fd, data, *offset):
        calls[0] += 1
        if calls[0] == 3:
            real(fd, bytes(data)[:len(data) // 2], *offset)
            os._exit(137)
        return real(fd, data, *offset)
    return write
os.write, os.pwrite = torn(os.write), torn(os.pwrite)
sys.exit(main(sys.argv[1:]))
"""


def test_rank_killed_mid_line_resumes_and_its_file_stays_readable(tiny_run, tmp_path):
    from lmlab.rankings import load_rankings
    out = tmp_path / "judged.jsonl"
    args = ["rank", str(tiny_run / "run"), "--prompts", str(tiny_run / "prompts.txt"), "--out",
            str(out), "-k", "2", "--max-new-tokens", "6", "--judge", "shorter"]
    res = subprocess.run([sys.executable, "-c", KILLED_MID_LINE, *args], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 137, res.stderr
    assert not out.read_bytes().endswith(b"\n")  # the torn third line
    # Readers (reward, dpo, the studio) take the whole lines; the run resumes with the third.
    assert [r["prompt"] for r in load_rankings(out)] == PROMPTS[:2]
    res = subprocess.run([sys.executable, "-m", "lmlab", *args], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "2 of 4 prompts already ranked" in res.stdout
    assert f"the last line of {out} is cut short" in res.stderr
    assert [json.loads(ln)["prompt"] for ln in out.read_text().splitlines()] == PROMPTS


def test_a_file_without_a_final_newline_gets_one_before_the_next_ranking(tmp_path):
    """Another tool's pairs whose last line has no newline: kept whole, not glued to the next."""
    from lmlab.rankings import append_ranking, load_rankings
    out = tmp_path / "pairs.jsonl"
    out.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}')
    append_ranking(out, {"prompt": "q", "completions": ["c", "d"], "ranking": [1, 0]})
    assert [r["prompt"] for r in load_rankings(out)] == ["p", "q"]
    assert out.read_text().count("\n") == 2
