"""Preference learning: rankings and pairs, judges, the DPO and Bradley-Terry gradients against
independent references, the sign of the policy gradient, and end-to-end tuning with a judge."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from lmlab import dpo as dpo_mod
from lmlab import judges as jg
from lmlab import rankings as rk
from lmlab import reward_model as rwd
from lmlab import rl
from lmlab import sequences as sq
from lmlab.metrics import read_metrics
from lmlab.errors import RunDirError
from lmlab.cli import build_parser, main
from lmlab.model import GPT, GPTConfig
from lmlab.stage import STAGE_DEFAULTS
from lmlab.tokenizer import train_tokenizer

def _corpus(n: int, seed: int = 0) -> str:
    """Generated sentences: a tiny language a small model learns in a few hundred steps."""
    rng = np.random.default_rng(seed)
    subj = ["the cat", "a dog", "my friend", "the bird", "a fox", "the old man"]
    verb = ["sees", "likes", "runs to", "finds", "eats", "jumps over"]
    obj = ["the tree", "a ball", "the cake", "a red box", "the moon", "some food"]
    return " ".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(n))


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_corpus(200), "char")


def _tiny(tok, seed=0, block_size=32, n_embd=16):
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=1, n_head=2,
                         n_embd=n_embd), seed=seed)


# --- rankings ------------------------------------------------------------------------------------


def _pairs_by_place(groups):
    """Reference: a pair (a, b) exactly when a's place is strictly ahead of b's."""
    place = {i: p for p, g in enumerate(groups) for i in g}
    return {(a, b) for a in place for b in place if place[a] < place[b]}


@pytest.mark.parametrize("ranking", [[2, [0, 1], 3], [[0, 1, 2]], [3, 2, 1, 0], [[1, 3], [0, 2]],
                                     [0]])
def test_pairs_from_ranking_with_ties(ranking):
    groups = [g if isinstance(g, list) else [g] for g in ranking]
    n = sum(len(g) for g in groups)
    pairs = rk.pairs_from_ranking(ranking, n)
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == _pairs_by_place(groups)


@pytest.mark.parametrize("ranking,msg", [
    ([0, 3, 1], "out of range"), ([0, 1, 1], r"\[1\] more than once"),
    ([0, [1]], r"leaves completion\(s\) \[2\] unranked"), ([0, [], 1, 2], "empty tie group"),
    ([0, "1", 2], "indices"), ("012", "non-empty list"), ([True, 1, 2], "indices"),
    ([], "non-empty list")])
def test_invalid_rankings_are_explained(ranking, msg):
    with pytest.raises(ValueError, match=msg):
        rk.normalize_ranking(ranking, 3)


def test_rankings_jsonl_round_trip_and_pair_import(tmp_path):
    path = tmp_path / "r.jsonl"
    recs = [{"prompt": "p1", "completions": ["a", "b", "c"], "ranking": [[2], [0, 1]],
             "judge": "human"},
            {"prompt": "", "completions": ["x\ny", "z"], "ranking": [1, 0]}]
    for r in recs:
        rk.append_ranking(path, r)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n" + json.dumps({"prompt": "q", "chosen": "good", "rejected": "bad"}) + "\n")
    back = rk.load_rankings(path)
    assert back[0] == {**recs[0], "ranking": [2, [0, 1]]}  # groups of one are written compactly
    assert back[1] == recs[1]
    assert back[2] == {"prompt": "q", "completions": ["good", "bad"], "ranking": [0, 1]}
    assert rk.preference_pairs(back) == [("p1", "c", "a", False, False),
                                         ("p1", "c", "b", False, False),
                                         ("", "z", "x\ny", False, False),
                                         ("q", "good", "bad", False, False)]


def _write_jsonl(tmp_path, records):
    p = tmp_path / "r.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return p


def test_load_rankings_ties_pairs_and_extras(tmp_path):
    p = _write_jsonl(tmp_path, [
        {"prompt": "p1", "completions": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1], "seeds": [1, 2, 3, 4]},
        {"prompt": "p2", "chosen": "good", "rejected": "bad"},
        {"prompt": "p3", "completions": ["x", "y"], "ranking": [[0, 1]]},
    ])
    recs = rk.load_rankings(p)
    assert recs[0] == {"prompt": "p1", "completions": ["a", "b", "c", "d"],
                       "ranking": [2, [0, 3], 1], "seeds": [1, 2, 3, 4]}
    assert recs[1] == {"prompt": "p2", "completions": ["good", "bad"], "ranking": [0, 1]}
    assert recs[2]["ranking"] == [[0, 1]]
    assert sorted(rk.pairs_from_ranking(recs[0]["ranking"])) == [(0, 1), (2, 0), (2, 1), (2, 3),
                                                                 (3, 1)]
    assert rk.pairs_from_ranking(recs[1]["ranking"]) == [(0, 1)]
    assert rk.pairs_from_ranking(recs[2]["ranking"]) == []


@pytest.mark.parametrize("bad,match", [
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 2]}, "index 2 is out of range for 2"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, -1]}, "index -1 is out of range"),
    ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, [1, 0], 2]}, r"\[0\] more than once"),
    ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 2]}, r"leaves completion\(s\) \[1\] unranked"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [True, 0]}, "must be completion indices"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, []]}, "empty tie group"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": []}, "non-empty list"),
    ({"prompt": "p", "completions": ["a"], "ranking": [0]}, "at least 2 strings"),
    ({"prompt": "p", "completions": ["a", "b"]}, "missing 'ranking'"),
    ({"prompt": "p", "chosen": "a"}, "expected 'completions' and 'ranking', or 'chosen' and 'rejected'"),
    ({"completions": ["a", "b"], "ranking": [0, 1]}, "missing 'prompt'"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "'prompt' must be a string"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1], "ended": [True]},
     "'ended' has 1 entries for 2 completions; give one true/false per completion"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1], "ended": [True, 1]},
     "'ended' entries must be true, false or the name of the end token the answer ended with, got 1"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1], "ended": True},
     "'ended' must be a list of 2 true/false values, one per completion"),
    ({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1], "ended": None},
     "'ended' must be a list of 2"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "ended": [False, ""]},
     "'ended' entries must be true, false or the name of the end token the answer ended with, "
     "got ''"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "ended": [False, True, True]},
     "'ended' has 3 entries for 2 completions"),
])
def test_load_rankings_errors_name_the_line(tmp_path, bad, match):
    p = _write_jsonl(tmp_path, [{"prompt": "ok", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(ValueError, match=match) as e:
        rk.load_rankings(p)
    assert f"{p}:2:" in str(e.value)


def test_bad_rankings_file_names_the_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "p", "completions": ["a"], "ranking": [0]}\n{not json\n')
    with pytest.raises(ValueError, match=r"r.jsonl:2: not valid JSON"):
        rk.load_rankings(path)
    path.write_text('{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 0]}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:1: .*more than once"):
        rk.load_rankings(path)
    path.write_text('{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:1: expected .completions. and .ranking."):
        rk.load_rankings(path)


def test_ended_is_kept_and_a_line_without_it_has_no_answer_ended(tmp_path):
    p = _write_jsonl(tmp_path, [
        {"prompt": "p1", "completions": ["a", "b", "c"], "ranking": [2, 0, 1],
         "ended": [True, False, True]},
        {"prompt": "p2", "chosen": "good", "rejected": "bad", "ended": [False, True]},
        {"prompt": "p3", "completions": ["x", "y"], "ranking": [0, 1]},  # an older line
    ])
    recs = rk.load_rankings(p)
    assert recs[0]["ended"] == [True, False, True] and recs[1]["ended"] == [False, True]
    assert "ended" not in recs[2] and rk.answers_ended(recs[2]) == [False, False]
    assert rk.preference_pairs(recs) == [("p1", "c", "a", True, True), ("p1", "c", "b", True, False),
                                         ("p1", "a", "b", True, False),
                                         ("p2", "good", "bad", False, True),
                                         ("p3", "x", "y", False, False)]
    rk.append_ranking(tmp_path / "w.jsonl", {**recs[0], "ended": [np.True_, False, True]})
    assert json.loads((tmp_path / "w.jsonl").read_text())["ended"] == [True, False, True]


def test_append_ranking_on_a_full_disk_names_the_file_and_leaves_no_torn_line(tmp_path,
                                                                              monkeypatch):
    """A disk that fills in the middle of the line: the error was "[Errno 28] No space left on
    device" naming no file, and the half line left behind made the next `lmlab rank` (which
    reads the file to resume) refuse it."""
    path = tmp_path / "r.jsonl"
    first = {"prompt": "p1", "completions": ["a", "b"], "ranking": [0, 1]}
    rk.append_ranking(path, first)
    real_pwrite = os.pwrite

    def fill_up(fd, data, offset):  # half the line fits, then the disk is full
        if len(data) > 1:
            return real_pwrite(fd, bytes(data[:len(data) // 2]), offset)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", fill_up)
    with pytest.raises(ValueError, match=re.escape(f"cannot write {path}: No space left on "
                                                   "device")):
        rk.append_ranking(path, {**first, "prompt": "p2"})
    monkeypatch.undo()
    assert path.read_text().count("\n") == 1 and path.read_text().endswith("\n")  # cut off again
    assert [r["prompt"] for r in rk.load_rankings(path)] == ["p1"]
    rk.append_ranking(path, {**first, "prompt": "p3"})
    assert [r["prompt"] for r in rk.load_rankings(path)] == ["p1", "p3"]


def test_read_prompts_lines_and_jsonl(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("first\n\nsecond line\\nwith newline\n")
    assert rk.read_prompts(a) == ["first", "second line\nwith newline"]
    b = tmp_path / "b.jsonl"
    b.write_text('{"prompt": "x"}\n{"prompt": "y", "id": 3}\n')
    assert rk.read_prompts(b) == ["x", "y"]


def test_read_prompts_odd_files(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "x"}\r\n\r\n{"prompt": "y"}\r\n')  # BOM, CRLF
    assert rk.read_prompts(p) == ["x", "y"]
    p.write_text("{not JSON, a prompt that starts with a brace\n")
    assert rk.read_prompts(p) == ["{not JSON, a prompt that starts with a brace"]
    # JSON the reader refuses names the file's own line: blank lines count (they were skipped
    # before numbering); nesting past the parser's limit was a RecursionError traceback.
    for bad, message in [('{"prompt": 3}', 'a JSON line needs a string "prompt"'),
                         ('{"prompt": "a", "prompt": "b"}', "the key 'prompt' appears twice"),
                         ('{"prompt": ' + "[" * 100000 + "]" * 100000 + "}",
                          "JSON nested too deeply")]:
        p.write_text('first\n\n\n' + bad + "\n")
        with pytest.raises(ValueError, match=re.escape(f"{p}:4: {message}")):
            rk.read_prompts(p)
    os.mkfifo(tmp_path / "fifo")  # reading it would wait for a writer forever
    with pytest.raises(ValueError, match=r"prompts file .*fifo is not a regular file"):
        rk.read_prompts(tmp_path / "fifo")


def test_split_records_is_by_ranking_and_disjoint():
    recs = [{"prompt": str(i)} for i in range(10)]
    train, val = rk.split_records(recs, 0.3, seed=1)
    assert len(val) == 3 and len(train) == 7
    assert sorted(r["prompt"] for r in train + val) == sorted(str(i) for i in range(10))


def test_split_records_holds_out_every_ranking_of_a_held_out_prompt():
    """A class ranks the same prompt (and the same answers) once per person: held-out accuracy
    means nothing if one person's ranking of a prompt trains and another's is held out."""
    recs = [{"prompt": f"p{i}", "completions": ["a", "b"], "ranking": [j % 2, 1 - j % 2],
             "by": j} for j in range(4) for i in range(10)]
    train, val = rk.split_records(recs, 0.3, seed=1)
    held = {r["prompt"] for r in val}
    assert len(held) == 3 and not held & {r["prompt"] for r in train}
    assert len(val) == 12 and len(train) == 28
    assert val == [r for r in recs if r["prompt"] in held]  # in file order
    # With distinct prompts the split is the one by ranking it always was.
    distinct = [{"prompt": str(i)} for i in range(10)]
    order = np.random.default_rng(1).permutation(10)
    assert rk.split_records(distinct, 0.3, seed=1)[1] == [distinct[i] for i in sorted(order[:3])]


# --- judges --------------------------------------------------------------------------------------


def test_judges_rank_by_their_rule_with_ties():
    comps = ["the cat the", "cat", "the the the", "dog"]
    assert jg.PreferWord("the")("p", comps) == [2, 0, [1, 3]]
    assert jg.make_judge("shorter")("p", comps) == [[1, 3], [0, 2]]
    assert jg.make_judge("longer")("p", comps) == [[0, 2], [1, 3]]
    assert jg.make_judge("word:cat").score("p", "catcat cat") == 3.0
    assert jg.judge_preference(jg.PreferWord("a"), "p", "aa", "a") == 1.0
    assert jg.judge_preference(jg.PreferWord("a"), "p", "b", "a") == 0.0
    assert jg.judge_preference(jg.PreferWord("a"), "p", "b", "c") == 0.5
    for spec in ("word:", "louder", 3):
        with pytest.raises((ValueError, TypeError)):
            jg.make_judge(spec)


# --- DPO -----------------------------------------------------------------------------------------


def test_dpo_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    pi_c, pi_r, ref_c, ref_r = rng.normal(-20, 3, size=(4, 5))
    beta = 0.3

    def loss(pc, pr):  # written independently: log(1 + exp(-beta * z))
        z = (pc - ref_c) - (pr - ref_r)
        return np.mean(np.log1p(np.exp(-beta * z)))

    val, g_c, g_r, margin = dpo_mod.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    assert val == pytest.approx(loss(pi_c, pi_r), rel=1e-12)
    np.testing.assert_allclose(margin, beta * ((pi_c - ref_c) - (pi_r - ref_r)), rtol=1e-12)
    h = 1e-6
    for i in range(5):
        e = np.zeros(5)
        e[i] = h
        np.testing.assert_allclose(g_c[i], (loss(pi_c + e, pi_r) - loss(pi_c - e, pi_r)) / (2 * h),
                                   rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(g_r[i], (loss(pi_c, pi_r + e) - loss(pi_c, pi_r - e)) / (2 * h),
                                   rtol=1e-6, atol=1e-12)


def _dpo_pairs():
    return [("the cat ", "sees a dog.", "likes the moon"), ("a dog ", "runs to", "the tree."),
            ("", "the red ball.", "a cat"), ("my friend ", "eats", "eats some food.")]


@pytest.mark.parametrize("sft_weight", [0.0, 0.7])
def test_dpo_stage_gradient_matches_finite_differences(tok, sft_weight):
    """The stage's accumulated gradient vs central differences of the DPO loss (plus the optional
    chosen-NLL anchor) computed from scratch (float64 sums over model.forward's per-token losses)
    along several directions."""
    model = _tiny(tok, seed=3)
    pairs = _dpo_pairs()
    stage = dpo_mod.DPOStage(model, tok, pairs, [], beta=0.5, batch_size=4, seed=0,
                        sft_weight=sft_weight)
    model.params += np.random.default_rng(1).normal(0, 0.02, model.params.size).astype(np.float32)
    state = stage.state_dict()
    idx = np.random.default_rng(0).integers(0, len(pairs), size=4)  # what the stage will draw
    model.zero_grad()
    out = stage.train_step(model)
    model.backward(out["weights"])
    grad = model.grads.astype(np.float64).copy()

    ref = stage.ref_train  # log-probabilities of the unperturbed (reference) weights

    def logp(prompt, resp):
        ids_p, ids_r = sq.encode_pair(tok, prompt, resp, 33)
        seq = np.concatenate([ids_p, ids_r])
        _, losses = model.forward(seq[None, :-1], seq[None, 1:])
        return -float(losses[0, ids_p.size - 1:].astype(np.float64).sum()), ids_r.size

    def loss_now(indices=idx):
        total = 0.0
        for i in indices:
            p, c, r = pairs[i]
            (lc, n_c), (lr, _) = logp(p, c), logp(p, r)
            z = (lc - ref[i][0]) - (lr - ref[i][1])
            total += np.log1p(np.exp(-0.5 * z)) - sft_weight * lc / n_c
        return total / len(indices)

    assert out["loss"] == pytest.approx(loss_now(), rel=1e-5)
    base = model.params.copy()
    rng = np.random.default_rng(2)
    directions = [grad / np.linalg.norm(grad)] + [rng.normal(size=grad.size) for _ in range(2)]
    for d in directions:
        d = d / np.linalg.norm(d)
        eps = 1e-2
        model.params[...] = base + (eps * d).astype(np.float32)
        up = loss_now()
        model.params[...] = base - (eps * d).astype(np.float32)
        down = loss_now()
        model.params[...] = base
        fd = (up - down) / (2 * eps)
        assert grad @ d == pytest.approx(fd, rel=0.03, abs=2e-4)
    stage.load_state_dict(state)  # resume restores the draw
    assert stage.rng.integers(0, len(pairs), size=4).tolist() == idx.tolist()
    # Evaluation scores the training objective, anchor included, over every pair (no pair is
    # held out here, so the training ones), so a run's loss and val loss are one quantity.
    ev = stage.evaluate(model)
    assert ev["val_loss"] == pytest.approx(loss_now(range(len(pairs))), rel=1e-5)
    if sft_weight:
        assert ev["val_dpo_loss"] < ev["val_loss"]


def _logp_float64(model, prompt_ids, answer_ids) -> float:
    """log p(answer | prompt) from the model's own logits, log-softmaxed in float64 numpy."""
    seq = np.concatenate([prompt_ids, answer_ids]).astype(np.int32)
    logits, _ = model.forward(seq[None, :-1])
    z = logits[0].astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    logsm = z - (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))
    pos = np.arange(prompt_ids.size - 1, seq.size - 1)
    return float(logsm[pos, seq[pos + 1]].sum())


def test_dpo_scores_an_ended_answer_with_its_end_token(tmp_path, tok):
    """A rankings line's ended answers are scored by DPO with <|endoftext|> after the text (so
    DPO can move the probability of stopping); a line without "ended" (an older file) is scored on
    the text alone, as before."""
    path = _write_jsonl(tmp_path, [
        {"prompt": "the cat ", "completions": ["sees a dog.", "likes"], "ranking": [0, 1],
         "ended": [True, False]},
        {"prompt": "a dog ", "chosen": "runs.", "rejected": "eats the", "ended": [False, True]},
        {"prompt": "my friend ", "completions": ["eats.", "sees"], "ranking": [1, 0]},
    ])
    pairs = rk.preference_pairs(rk.load_rankings(path))
    model = _tiny(tok, seed=4)
    stage = dpo_mod.DPOStage(model, tok, pairs, [], batch_size=2)
    eot = tok.eot_id
    expected = []
    for prompt, chosen, rejected, c_end, r_end in pairs:
        p = np.asarray(tok.encode(prompt), np.int32)
        expected.append([_logp_float64(model, p, np.asarray(list(tok.encode(a)) + [eot] * e, np.int32))
                         for a, e in ((chosen, c_end), (rejected, r_end))])
    np.testing.assert_allclose(stage.ref_train, expected, rtol=1e-5, atol=1e-5)
    # The end token's own log-probability is what the flag adds.
    p = np.asarray(tok.encode("the cat "), np.int32)
    a = np.asarray(tok.encode("sees a dog."), np.int32)
    log_p_end = (_logp_float64(model, p, np.append(a, eot).astype(np.int32))
                 - _logp_float64(model, p, a))
    assert log_p_end < -0.1
    assert stage.ref_train[0, 0] == pytest.approx(_logp_float64(model, p, a) + log_p_end, abs=1e-4)
    assert stage.train[0][1][-1] == eot and stage.train[0][2][-1] != eot
    assert stage.train[2][1][-1] != eot and stage.train[2][2][-1] != eot  # the older line
    # Plain (prompt, chosen, rejected) triples still mean answers that did not end.
    plain = dpo_mod.DPOStage(model, tok, [t[:3] for t in pairs], [], batch_size=2)
    np.testing.assert_allclose(plain.ref_train[2], stage.ref_train[2], rtol=1e-6)
    assert plain.ref_train[0, 0] == pytest.approx(stage.ref_train[0, 0] - log_p_end, abs=1e-4)
    with pytest.raises(ValueError, match="got 4 items"):
        dpo_mod.DPOStage(model, tok, [pairs[0][:4]], [])


def test_an_ended_answer_that_is_cut_loses_its_end_token(tok):
    """encode_pair fits prompt + answer + end token: the prompt loses its oldest tokens first; an
    answer cut at the end loses its end token first, so a cut answer never ends."""
    eot = tok.eot_id
    prompt, answer = "the cat sees ", "a dog."
    p, a = tok.encode(prompt).tolist(), tok.encode(answer).tolist()
    ids_p, ids_r = sq.encode_pair(tok, prompt, answer, 64, ended=True)
    assert ids_p.tolist() == p and ids_r.tolist() == a + [eot]
    np.testing.assert_array_equal(sq.answer_ids(tok, answer, True), a + [eot])
    np.testing.assert_array_equal(sq.answer_ids(tok, answer), a)
    # Room for the answer only once the prompt gives way: the prompt is cut, the end token kept.
    ids_p, ids_r = sq.encode_pair(tok, prompt, answer, len(a) + 3, ended=True)
    assert ids_p.tolist() == p[-2:] and ids_r.tolist() == a + [eot]
    # No room even with a one-token prompt: the answer is cut, and the end token goes first.
    ids_p, ids_r = sq.encode_pair(tok, prompt, answer, len(a) + 1, ended=True)
    assert ids_p.tolist() == p[-1:] and ids_r.tolist() == a
    ids_p, ids_r = sq.encode_pair(tok, prompt, answer, len(a) - 1, ended=True)
    assert ids_r.tolist() == a[:-2]
    # In DPO: a chosen answer longer than the block arrives cut, with no end token.
    model = _tiny(tok, block_size=16)
    long = "the cat sees a red box and the moon."
    stage = dpo_mod.DPOStage(model, tok, [("a ", long, "eats.", True, True)], [], batch_size=1)
    p_ids, c_ids, r_ids = stage.train[0]
    assert p_ids.size + c_ids.size == 17 and c_ids.tolist() == tok.encode(long).tolist()[:c_ids.size]
    assert r_ids.tolist() == tok.encode("eats.").tolist() + [eot]


def test_dpo_padding_and_prompt_tokens_get_no_weight(tok):
    p = [np.array([1, 2, 3], np.int32), np.array([4], np.int32)]
    r = [np.array([5, 6], np.int32), np.array([7, 8, 9], np.int32)]
    x, y, mask = sq.pack_for_loss(p, r, 6, pad_id=0)
    np.testing.assert_array_equal(x[0, :4], [1, 2, 3, 5])
    np.testing.assert_array_equal(y[0, :4], [2, 3, 5, 6])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    # Right padding leaves every real position's loss unchanged (causal attention).
    model = _tiny(tok)
    _, short = model.forward(x[:1, :4], y[:1, :4])
    short = short.copy()
    _, padded = model.forward(x[:1], y[:1])
    np.testing.assert_allclose(padded[0, :4], short[0], rtol=1e-5, atol=1e-6)


def test_dpo_rejects_bad_settings(tok):
    model = _tiny(tok)
    with pytest.raises(ValueError, match="beta"):
        dpo_mod.DPOStage(model, tok, _dpo_pairs(), [], beta=0)
    with pytest.raises(ValueError, match="at least one training pair"):
        dpo_mod.DPOStage(model, tok, [], [])


# --- reward model --------------------------------------------------------------------------------


def test_bradley_terry_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    d_phi = rng.normal(size=(12, 7))
    w = rng.normal(size=7)
    l2 = 0.05

    def loss(w):  # written independently: -log(sigmoid(d)) = log(1 + exp(-d))
        return np.mean(np.log1p(np.exp(-(d_phi @ w)))) + 0.5 * l2 * np.sum(w ** 2)

    val, grad = rwd.bt_loss_and_grad(w, d_phi, l2)
    assert val == pytest.approx(loss(w), rel=1e-12)
    h = 1e-6
    fd = np.array([(loss(w + h * e) - loss(w - h * e)) / (2 * h) for e in np.eye(7)])
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-10)


def test_reward_features_are_the_logits_at_the_right_positions(tok):
    model = _tiny(tok)
    phi = rwd.reward_features(model, tok, ["the cat", ""], [" sees", "a dog"])
    V = tok.vocab_size
    for row, (p, c) in enumerate([("the cat", " sees"), ("", "a dog")]):
        ids_p, ids_r = sq.encode_pair(tok, p, c, 32)
        seq = np.concatenate([ids_p, ids_r])
        logits, _ = model.forward(seq[None])
        np.testing.assert_allclose(phi[row, :V], logits[0, -1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(phi[row, V:], logits[0, ids_p.size:].mean(0), rtol=1e-5,
                                   atol=1e-5)


def test_reward_features_read_an_ended_answer_with_its_end_token(tmp_path, tok):
    """An ended answer's features are read with <|endoftext|> after the text: the last position
    is the end token's, and the mean over the answer includes it; the reward model's training
    features follow the rankings' "ended", and an older line reads as before."""
    model = _tiny(tok)
    V = tok.vocab_size
    phi = rwd.reward_features(model, tok, ["the cat", "the cat"], [" sees", " sees"],
                              ended=[True, False])
    ids_p, ids_a = np.asarray(tok.encode("the cat")), np.asarray(tok.encode(" sees"))
    for row, answer in enumerate([np.append(ids_a, tok.eot_id), ids_a]):
        logits, _ = model.forward(np.concatenate([ids_p, answer]).astype(np.int32)[None])
        np.testing.assert_allclose(phi[row, :V], logits[0, -1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(phi[row, V:], logits[0, ids_p.size:].mean(0), rtol=1e-5,
                                   atol=1e-5)
    assert not np.allclose(phi[0], phi[1])
    np.testing.assert_allclose(rwd.reward_features(model, tok, ["the cat"], [" sees"]), phi[1:])
    recs = rk.load_rankings(_write_jsonl(tmp_path, [
        {"prompt": "the cat", "completions": [" sees", " sees"], "ranking": [0, 1],
         "ended": [True, False]},
        {"prompt": "the cat", "completions": [" sees", " sees"], "ranking": [1, 0]}]))
    feats, pairs = rwd._pair_features(model, tok, recs, read_end_token=True)
    np.testing.assert_allclose(feats, np.concatenate([phi, phi[1:], phi[1:]]))
    assert pairs.tolist() == [[0, 1], [3, 2]]
    rm = rwd.RewardModel(model, tok, w=np.arange(2 * V, dtype=np.float64), reads_end_token=True)
    np.testing.assert_allclose(rm.score("the cat", [" sees", " sees"], [True, False]),
                               phi @ np.arange(2 * V))
    with pytest.raises(ValueError, match="ended has 1 entries for 2 completions"):
        rwd.reward_features(model, tok, ["a", "b"], ["c", "d"], ended=[True])


def test_a_reward_head_fitted_on_text_alone_scores_text_alone(tmp_path, tok):
    """A head fitted on rankings in which no answer ended (or saved before end tokens were read)
    scores RL's ended samples on their text, as it was fitted: with the end token appended its
    features would be ones it never saw. A head fitted with ended answers reads the end token,
    and the choice survives saving."""
    from lmlab.checkpoint import save_run

    model = _tiny(tok)
    text_only = [{"prompt": "the ", "completions": ["ab", "ba", "aa"], "ranking": [0, 1, 2]}] * 3
    with_end = [dict(text_only[0], ended=[True, False, True])] * 3
    save_run(tmp_path / "base", model, tok, train_config={})
    plain = rwd.reward_features(model, tok, ["the "] * 3, ["ab", "ba", "aa"])
    ended = rwd.reward_features(model, tok, ["the "] * 3, ["ab", "ba", "aa"], [True] * 3)
    for records, reads_end in ((text_only, False), (with_end, True)):
        rm, _ = rwd.train_reward_model(model, tok, records, steps=5)
        assert rm.reads_end_token is reads_end
        rm.save(tmp_path / f"rm_{reads_end}")
        back = rwd.RewardModel.load(tmp_path / f"rm_{reads_end}")
        assert back.reads_end_token is reads_end
        expected = rm.score_features(ended if reads_end else plain)
        np.testing.assert_allclose(back.score("the ", ["ab", "ba", "aa"], [True] * 3), expected,
                                   rtol=1e-6, atol=1e-9)


def test_reward_model_learns_a_judge_and_round_trips(tmp_path, tok):
    """A judge that counts 'x' in random strings; the frozen-trunk head must order held-out pairs."""
    from lmlab.checkpoint import save_run

    model = _tiny(tok, block_size=48, n_embd=32)
    rng = np.random.default_rng(0)
    letters = list("abcdefghx ")
    judge = jg.PreferWord("x")

    def record():
        comps = ["".join(rng.choice(letters, size=int(rng.integers(8, 20)))) for _ in range(4)]
        return {"prompt": "the ", "completions": comps, "ranking": judge("the ", comps)}

    train, val = [record() for _ in range(60)], [record() for _ in range(20)]
    rm, report = rwd.train_reward_model(model, tok, train, val, steps=200)
    assert report["val_pairs"] > 50
    assert report["val_accuracy"] >= 0.8
    save_run(tmp_path / "base", model, tok, train_config={})
    rm.save(tmp_path / "rm")
    back = rwd.RewardModel.load(tmp_path / "rm")
    comps = val[0]["completions"]
    np.testing.assert_allclose(back.score("the ", comps), rm.score("the ", comps), rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="not a reward model"):
        rwd.RewardModel.load(tmp_path / "base")


# --- RL ------------------------------------------------------------------------------------------


def test_leave_one_out_advantages():
    r = np.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    ref = np.array([[r[i, j] - np.mean([r[i, k] for k in range(3) if k != j]) for j in range(3)]
                    for i in range(2)])
    np.testing.assert_allclose(rl.leave_one_out_advantages(r), ref)
    with pytest.raises(ValueError, match="K >= 2"):
        rl.leave_one_out_advantages(np.ones((2, 1)))


def test_policy_gradient_step_raises_the_better_samples(tok):
    """One SGD step on the RL stage's gradient: completions with positive advantage become more
    likely, negative ones less likely (the sign of weights = +A/N on the token losses)."""
    model = _tiny(tok, seed=5)
    ref = _tiny(tok, seed=5)
    seen_ended = []

    def rank_reward(prompt, comps, ended):
        seen_ended.extend(ended)
        return np.arange(len(comps), dtype=float)

    stage = rl.RLStage(model, ref, tok, ["the cat "], [], rank_reward, k=4, prompts_per_step=1,
                       kl_coef=0.0, max_new_tokens=8, seed=0)
    model.zero_grad()
    model.backward(stage.train_step(model)["weights"])
    b = stage.last_batch
    np.testing.assert_allclose(b["advantage"], [-2, -2 / 3, 2 / 3, 2])  # rewards 0..3
    # The reward function is told which answers ended: those whose ids end with <|endoftext|>.
    last = [b["y"][i][b["mask"][i] > 0][-1] for i in range(4)]
    assert seen_ended == [bool(t == tok.eot_id) for t in last]
    before = sq.sequence_logprobs(model, b["x"], b["y"], b["mask"])
    model.params -= np.float32(0.05) * model.grads
    after = sq.sequence_logprobs(model, b["x"], b["y"], b["mask"])
    delta = after - before
    assert delta[3] > 0 and delta[0] < 0
    assert float(b["advantage"] @ delta) > 0


def test_rl_kl_term_is_the_log_ratio_to_the_reference(tok):
    model, ref = _tiny(tok, seed=1), _tiny(tok, seed=2)
    reward = lambda prompt, comps, ended: np.zeros(len(comps))  # noqa: E731
    stage = rl.RLStage(model, ref, tok, ["a dog "], [], reward, k=3, prompts_per_step=2,
                       kl_coef=0.5, max_new_tokens=6, seed=0)
    model.zero_grad()
    out = stage.train_step(model)
    model.backward(out["weights"])
    b = stage.last_batch
    lp = sq.sequence_logprobs(model, b["x"], b["y"], b["mask"])
    lr_ = sq.sequence_logprobs(ref, b["x"], b["y"], b["mask"])
    np.testing.assert_allclose(b["kl"], lp - lr_, rtol=1e-6)
    shaped = (-0.5 * (lp - lr_)).reshape(2, 3)
    np.testing.assert_allclose(b["advantage"], rl.leave_one_out_advantages(shaped).reshape(-1),
                               rtol=1e-5, atol=1e-6)
    assert out["loss"] == pytest.approx(-shaped.mean(), rel=1e-5)


def _imported_style(end: str = "e"):
    """A char tokenizer whose model declares its own end of text, `end`, as an imported
    checkpoint's "</s>" is (Tokenizer.eos_tokens, which import and load_model set)."""
    tok = train_tokenizer(_corpus(200), "char")
    tok.eos_tokens = (end,)
    return tok


def test_rl_rollouts_end_at_the_models_own_end_token_and_are_scored_with_it():
    """Rollouts of a run whose model declares another end of text stop there too; the policy's
    log-probabilities and the reward model read the answer with the token the policy chose, not
    with an <|endoftext|> it never sampled, and the reward function is told which one it was."""
    tok = _imported_style()
    end = tok.token_id("e")
    model, ref = _tiny(tok, seed=3), _tiny(tok, seed=3)
    V = tok.vocab_size
    rm = rwd.RewardModel(model, tok, w=np.linspace(-1, 1, 2 * V), reads_end_token=True)
    seen = []

    def reward(prompt, comps, ended):
        seen.extend(ended)
        return rm.score(prompt, comps, ended)

    stage = rl.RLStage(model, ref, tok, ["the cat "], [], reward, k=4, prompts_per_step=2,
                       kl_coef=0.0, max_new_tokens=16, seed=0)
    stage.train_step(model)
    b = stage.last_batch
    assert "e" in seen  # the setup: some rollout sampled the end token
    prompt_ids = sq.prompt_ids_for(tok, "the cat ", 32, 16)
    for i, ended in enumerate(seen):
        response = b["y"][i][b["mask"][i] > 0]
        assert end not in response[:-1]
        assert (response[-1] == end) == (ended == "e")
        # What the reward model scored is what the policy produced and is trained on.
        np.testing.assert_array_equal(sq.answer_ids(tok, b["texts"][i], ended), response)
        logits, _ = model.forward(np.concatenate([prompt_ids, response])[None].astype(np.int32))
        phi = np.concatenate([logits[0, -1], logits[0, prompt_ids.size:].mean(0)])
        assert b["reward"][i] == pytest.approx(rm.score_features(phi[None])[0], rel=1e-5)


def test_ranked_answers_that_ended_at_the_models_own_end_token_name_it(tmp_path):
    """`lmlab rank` samples stop at the model's own end token too; the rankings line names that
    token, which DPO and the reward model then append (and a name that ends no answer of the run
    is refused, naming the line)."""
    tok = _imported_style()
    model = _tiny(tok, seed=3)
    pids = sq.prompt_ids_for(tok, "the cat ", 32, 16)
    texts, ended = sq.sample_answers(model, tok, pids, 16, range(8))
    assert "e" in ended and all(e in ("e", True, False) for e in ended)
    path = _write_jsonl(tmp_path, [{"prompt": "the cat ", "completions": texts,
                                    "ranking": list(range(8)), "ended": ended}])
    rec = rk.load_rankings(path, tokenizer=tok)[0]
    assert rec["ended"] == ended
    i = ended.index("e")
    np.testing.assert_array_equal(sq.encode_pair(tok, "the cat ", texts[i], 32, "e")[1],
                                  np.append(tok.encode(texts[i], allow_special=True), tok.token_id("e")))
    _write_jsonl(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b", "ended": ["x", False]}])
    with pytest.raises(ValueError, match=r"r.jsonl:1: 'ended' names 'x', which ends no answer "
                                         r"of this run; expected true, false or one of "
                                         r"\['<\|endoftext\|>', 'e'\]"):
        rk.load_rankings(path, tokenizer=tok)


def test_rollouts_of_a_chat_run_stop_where_the_model_ends_its_text(tmp_path, monkeypatch):
    """An instruct-tuned run's sampled answers (rank, rlhf) ran past <|endoftext|> into a new
    document until the limit; they stop there, as chat does, and name it in "ended", so that DPO
    and the reward model score the token the policy chose."""
    from lmlab.chat import TEMPLATE

    tok = train_tokenizer(_corpus(200), "char")  # not the module's: it gets a chat template
    tok.chat_template = dict(TEMPLATE)
    script = [tok.token_id(t) for t in ["a", "b", "<|endoftext|>", "c", "<|end|>"]]
    step = []

    def forward(self, tokens, *args, **kwargs):  # emits the script, one token per call
        logits = np.zeros(np.shape(tokens) + (tok.vocab_size,), np.float32)
        logits[..., script[min(len(step), len(script) - 1)]] = 50.0
        step.append(1)
        return logits, None

    monkeypatch.setattr(GPT, "forward", forward)
    model = _tiny(tok)
    pids = sq.prompt_ids_for(tok, "the cat ", 32, 8)
    ids, text, ended = sq.sample_completion(model, tok, pids, 8, seed=0)
    assert (text, ended) == ("ab", "<|endoftext|>")
    np.testing.assert_array_equal(ids, [tok.token_id(t) for t in ["a", "b", "<|endoftext|>"]])
    np.testing.assert_array_equal(sq.answer_ids(tok, text, ended), ids)
    path = _write_jsonl(tmp_path, [{"prompt": "the cat ", "completions": [text, "x"],
                                    "ranking": [0, 1], "ended": [ended, False]}])
    assert rk.load_rankings(path, tokenizer=tok)[0]["ended"] == ["<|endoftext|>", False]


# --- command line --------------------------------------------------------------------------------


def test_preference_commands_parse(capsys):
    parser = build_parser()
    a = parser.parse_args(["rank", "run", "--prompts", "p.txt", "--out", "r.jsonl", "-k", "3",
                           "--judge", "word:cat"])
    assert (a.k, a.judge, a.func.__name__) == (3, "word:cat", "cmd_rank")
    a = parser.parse_args(["dpo", "run", "--rankings", "a.jsonl", "b.jsonl", "--out", "o",
                           "--beta", "0.2"])
    assert a.rankings == ["a.jsonl", "b.jsonl"] and a.beta == 0.2
    a = parser.parse_args(["rlhf", "run", "--prompts", "p", "--out", "o", "--judge", "shorter"])
    assert a.judge == "shorter" and a.reward_model is None
    with pytest.raises(SystemExit):  # two reward sources
        parser.parse_args(["rlhf", "run", "--prompts", "p", "--out", "o", "--judge", "shorter",
                           "--reward-model", "rm"])
    a = parser.parse_args(["reward", "run", "--rankings", "r.jsonl", "--out", "rm"])
    assert a.val_fraction is None  # not given: the stage's table says 0.2
    assert STAGE_DEFAULTS["reward"]["val_fraction"] == 0.2


def test_rlhf_without_a_reward_source_exits_2(tmp_path, tok, capsys):
    from lmlab.checkpoint import save_run

    save_run(tmp_path / "base", _tiny(tok), tok, train_config={})
    (tmp_path / "p.txt").write_text("a\nb\n")
    assert main(["rlhf", str(tmp_path / "base"), "--prompts", str(tmp_path / "p.txt"), "--out",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    assert "exactly one of reward_model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rlhf_refuses_a_reward_model_that_cannot_read_the_policys_answers(tmp_path, tok, capsys):
    """The reward model re-encodes the policy's sampled text with its own tokenizer: one whose char
    vocabulary lacks characters the policy can sample is refused before any sampling (it used to
    stop the run at the first sample holding one, however late), one that reads them all is taken,
    and a BPE policy (any character) needs a BPE reward model."""
    from lmlab.checkpoint import save_run

    wide = train_tokenizer(_corpus(200) + " QZ?", "char")
    save_run(tmp_path / "narrow", _tiny(tok), tok, train_config={})
    save_run(tmp_path / "wide", _tiny(wide), wide, train_config={})
    recs = [{"prompt": "the ", "completions": ["ab", "ba"], "ranking": [0, 1]}] * 2
    rm, _ = rwd.train_reward_model(_tiny(tok), tok, recs, steps=2)
    rm.save(tmp_path / "rm", parent=str(tmp_path / "narrow"))
    (tmp_path / "p.txt").write_text("the cat \na dog \n")
    argv = ["--prompts", str(tmp_path / "p.txt"), "--reward-model", str(tmp_path / "rm"), "-k",
            "2", "--prompts-per-step", "1", "--max-new-tokens", "4", "--steps", "1",
            "--no-progress", "--threads", "1"]
    assert main(["rlhf", str(tmp_path / "wide"), "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lacks 3 character(s)" in err and "'?', 'Q', 'Z'" in err, err
    assert not (tmp_path / "o").exists()
    # The reward model's own run (and any char run within its vocabulary) is read.
    assert main(["rlhf", str(tmp_path / "narrow"), "--out", str(tmp_path / "o"), *argv]) == 0
    rm.check_reads(train_tokenizer(_corpus(50), "char"))
    bpe = train_tokenizer(_corpus(200), "bpe", vocab_size=300)
    with pytest.raises(ValueError, match="byte-level BPE"):
        rm.check_reads(bpe)
    rwd.RewardModel(_tiny(bpe), bpe).check_reads(wide)


def test_rlhf_refuses_to_write_over_the_reward_model_it_scores_with(tmp_path, tok, capsys):
    """The reward model is a run rlhf reads, as its parent is: an --out naming it (or a directory
    inside it) was opened with --overwrite, which set the reward model aside and replaced it by
    the RL run."""
    from lmlab.checkpoint import save_run

    save_run(tmp_path / "base", _tiny(tok), tok, train_config={})
    recs = [{"prompt": "the ", "completions": ["ab", "ba"], "ranking": [0, 1]}] * 2
    rm, _ = rwd.train_reward_model(_tiny(tok), tok, recs, steps=2)
    rm.save(tmp_path / "rm", parent=str(tmp_path / "base"))
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "rm").rglob("*"))
    (tmp_path / "p.txt").write_text("the cat \na dog \n")
    argv = ["rlhf", str(tmp_path / "base"), "--prompts", str(tmp_path / "p.txt"),
            "--reward-model", str(tmp_path / "rm"), "-k", "2", "--prompts-per-step", "1",
            "--max-new-tokens", "4", "--steps", "1", "--no-progress", "--threads", "1",
            "--overwrite", "--out"]
    for out, message in [(tmp_path / "rm", "is the reward model it scores with"),
                         (tmp_path / "rm" / "rl", "is inside the reward model it scores with")]:
        assert main([*argv, str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "rm").rglob("*")) == before
    rwd.RewardModel.load(tmp_path / "rm")  # still the reward model


_EVAL_ALONE = [
    (["--eval-judge", ""], "unknown judge ''"),  # was no eval at all
    (["--eval-prompts", "P"], "--eval-prompts 'P' is not allowed: it applies only to the eval"),
    (["--eval-samples", "3"], "--eval-samples 3 is not allowed: it applies only to the eval"),
    (["--eval-max-new-tokens", "8"], "--eval-max-new-tokens 8 is not allowed: it applies only")]


@pytest.mark.parametrize("verb,extra,message", [
    ("rank", ["--judge", ""], "unknown judge ''"),  # was a human ranking session, reading stdin
    ("rlhf", ["--judge", ""], "unknown judge ''"),
    *[(verb, extra, message) for verb in ("dpo", "rlhf") for extra, message in _EVAL_ALONE]])
def test_an_empty_judge_or_an_eval_option_without_eval_judge_is_refused(tmp_path, tok, capsys,
                                                                       verb, extra, message):
    """An empty judge spec (--judge "$JUDGE" unset) is refused like any unknown one rather than
    read as none given, and an --eval-* option without --eval-judge is refused rather than
    silently ignored, before any work."""
    from lmlab.checkpoint import save_run

    save_run(tmp_path / "base", _tiny(tok), tok, train_config={})
    (tmp_path / "p.txt").write_text("a\nb\n")
    data = {"rank": ["--prompts", str(tmp_path / "p.txt")],
            "dpo": ["--rankings", str(tmp_path / "r.jsonl")],
            "rlhf": ["--prompts", str(tmp_path / "p.txt")]}[verb]
    if verb == "rlhf" and extra[0] != "--judge":
        data += ["--judge", "shorter"]
    out = tmp_path / ("o.jsonl" if verb == "rank" else "o")
    assert main([verb, str(tmp_path / "base"), *data, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lmlab {verb}: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("verb,extra,flag_name", [
    ("rank", ["--max-new-tokens", "32"], "--max-new-tokens"),
    ("rlhf", ["--max-new-tokens", "32"], "--max-new-tokens"),
    ("dpo", ["--eval-judge", "word:a", "--eval-max-new-tokens", "32"], "--eval-max-new-tokens"),
    ("rlhf", ["--eval-judge", "word:a", "--eval-max-new-tokens", "32"], "--eval-max-new-tokens")])
def test_answers_longer_than_the_block_are_refused_naming_the_flag_before_any_work(
        tmp_path, tok, capsys, verb, extra, flag_name):
    """An answer as long as the block leaves no room for the prompt. The error named the Python
    setting (max_new_tokens) for either flag, and --eval-max-new-tokens was refused only when the
    eval sampled, after the whole training."""
    from lmlab.checkpoint import save_run

    save_run(tmp_path / "base", _tiny(tok, block_size=32), tok, train_config={})
    (tmp_path / "p.txt").write_text("the cat \na dog \n")
    for prompt in ("the cat ", "a dog ", "the bird "):
        rk.append_ranking(tmp_path / "r.jsonl", {"prompt": prompt, "completions": ["a cat", "the"],
                                                 "ranking": [0, 1]})
    data = {"rank": ["--prompts", str(tmp_path / "p.txt"), "--judge", "shorter"],
            "dpo": ["--rankings", str(tmp_path / "r.jsonl"), "--batch-size", "2"],
            "rlhf": ["--prompts", str(tmp_path / "p.txt"), "--judge", "shorter", "-k", "2",
                     "--prompts-per-step", "2"]}[verb]
    tuning = [] if verb == "rank" else ["--steps", "1", "--no-progress"]
    out = tmp_path / ("o.jsonl" if verb == "rank" else "o")
    argv = [verb, str(tmp_path / "base"), *data, "--out", str(out), "--threads", "1", *tuning]
    assert main([*argv, *extra]) == 2
    assert capsys.readouterr().err == (
        f"lmlab {verb}: error: {flag_name} 32 is not allowed: expected an integer from 1 to 31: "
        "the run's block_size 32 also holds the prompt\n")
    assert not out.exists()


# --- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny char model pretrained on generated sentences (the tests' 'built-in corpus')."""
    from lmlab.pretrain import pretrain

    root = tmp_path_factory.mktemp("pref")
    (root / "corpus.txt").write_text(_corpus(3000), encoding="utf-8")
    pretrain(str(root / "corpus.txt"), root / "base", n_layer=2, n_head=2, n_embd=48,
             block_size=48, batch_size=16, steps=300, lr=3e-3, warmup_steps=20, eval_every=0,
             save_every=0, progress=False, seed=0)
    return root


def _prompts(n, seed):
    return [s + ". " for s in _corpus(n, seed).split(". ")][:n]


def test_end_to_end_dpo_and_rl_raise_the_judges_preference(base_run, capsys):
    from lmlab.checkpoint import load_model
    from lmlab.rank import run_session

    judge = jg.PreferWord("cat")
    model, tok, _ = load_model(base_run / "base")
    n_new = 24

    def sample(prompt, i, k):
        pids = sq.prompt_ids_for(tok, prompt, 48, n_new)
        seeds = [100 + k * i + j for j in range(k)]
        return [sq.sample_completion(model, tok, pids, n_new, seed=s)[1] for s in seeds], seeds

    rankings = base_run / "rankings.jsonl"
    run_session(_prompts(150, 1), sample, rankings, 4, judge=judge, judge_name=judge.name)
    held_out = _prompts(30, 2)
    reference, _, _ = load_model(base_run / "base")
    before = jg.compare_to_reference(reference, reference, tok, held_out, judge,
                                     max_new_tokens=n_new, samples_per_prompt=2, seed=7)
    assert 0.3 <= before["win_rate"] <= 0.7 and before["kl"] == 0.0

    result = dpo_mod.dpo(base_run / "base", rankings, base_run / "dpo", beta=0.5,
                         sft_weight=1.0, batch_size=8, val_fraction=0.1, steps=120, lr=1e-4,
                         warmup_steps=5, eval_every=40, weight_decay=0.0, progress=False,
                         save_every=0)
    assert result.details["eval"]["val_margin"] > 0  # held-out chosen answers gained on rejected ones
    tuned, _, _ = load_model(base_run / "dpo")
    after = jg.compare_to_reference(tuned, reference, tok, held_out, judge, max_new_tokens=n_new,
                                    samples_per_prompt=2, seed=7)
    assert after["win_rate"] >= before["win_rate"] + 0.15, (before, after)
    assert after["kl"] > 0

    prompts = base_run / "prompts.txt"
    prompts.write_text("\n".join(_prompts(100, 3)), encoding="utf-8")
    rl.rlhf(base_run / "base", prompts, base_run / "rl", judge="word:cat", k=4,
            prompts_per_step=4, kl_coef=0.05, max_new_tokens=n_new, steps=40, lr=3e-4,
            warmup_steps=5, eval_every=20, weight_decay=0.0, progress=False, save_every=0)
    rows = read_metrics(base_run / "rl")
    per_step = [r for r in rows if "reward" in r]
    assert [r["step"] for r in per_step] == list(range(1, 41))
    assert all(np.isfinite(r["kl"]) for r in per_step)
    tuned, _, _ = load_model(base_run / "rl")
    after = jg.compare_to_reference(tuned, reference, tok, held_out, judge, max_new_tokens=n_new,
                                    samples_per_prompt=2, seed=7)
    assert after["win_rate"] >= before["win_rate"] + 0.15, (before, after)
    assert np.mean([r["reward"] for r in per_step[-10:]]) > np.mean(
        [r["reward"] for r in per_step[:10]])


def test_reward_dpo_rlhf_verbs_run_end_to_end(tmp_path, tok, capsys):
    """The three verbs through their argparse handlers on a tiny untrained run: each writes its
    run directory and prints its report (accuracy, margin, reward/KL file, judge comparison)."""
    from lmlab.checkpoint import load_model, read_config, save_run

    save_run(tmp_path / "base", _tiny(tok, block_size=32), tok, train_config={})
    rng = np.random.default_rng(0)
    judge = jg.PreferWord("a")
    with open(tmp_path / "prompts.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(["the cat ", "a dog ", "my friend ", "the bird "]))
    for i in range(12):
        comps = ["".join(rng.choice(list("abcde "), size=int(rng.integers(3, 12))))
                 for _ in range(3)]
        prompt = ["the cat ", "a dog ", "my friend ", "the bird "][i % 4]  # 1 of 4 held out
        rk.append_ranking(tmp_path / "r.jsonl", {"prompt": prompt, "completions": comps,
                                                 "ranking": judge(prompt, comps)})
    parser = build_parser()
    quick = ["--steps", "3", "--eval-every", "2", "--no-progress", "--threads", "1"]
    runs = [
        (["reward", str(tmp_path / "base"), "--rankings", str(tmp_path / "r.jsonl"), "--out",
          str(tmp_path / "rm"), "--steps", "20"], r"held-out pairwise accuracy \d"),
        (["dpo", str(tmp_path / "base"), "--rankings", str(tmp_path / "r.jsonl"), "--out",
          str(tmp_path / "dpo"), "--batch-size", "2", "--eval-judge", "word:a", "--eval-prompts",
          str(tmp_path / "prompts.txt"), "--eval-max-new-tokens", "6", *quick],
         r"implicit reward margin -?\d.*prefers the tuned answer on \d"),
        (["rlhf", str(tmp_path / "base"), "--prompts", str(tmp_path / "prompts.txt"), "--out",
          str(tmp_path / "rl"), "--reward-model", str(tmp_path / "rm"), "-k", "2",
          "--prompts-per-step", "2", "--max-new-tokens", "6", *quick], r"metrics\.jsonl"),
    ]
    for argv, expect in runs:
        args = parser.parse_args(argv)
        assert args.func(args) == 0
        assert re.search(expect, capsys.readouterr().out, re.S), argv[0]
    assert read_config(tmp_path / "dpo")["parent"] == str(tmp_path / "base")
    assert read_config(tmp_path / "dpo")["train"]["stage"] == "dpo"
    steps = [r["step"] for r in read_metrics(tmp_path / "rl") if "reward" in r]
    assert steps == [1, 2, 3]
    load_model(tmp_path / "rl")
    args = parser.parse_args(runs[1][0])
    with pytest.raises(RunDirError, match="already holds a run"):
        args.func(args)


def test_eval_judge_on_a_file_of_one_prompt_judges_the_training_prompts(tmp_path, tok, capsys):
    """A classroom file: one prompt, a ranking per person. Held-out rankings go by prompt, so none
    is held out; --eval-judge then judges the training prompt and says so (it used to fail with
    exit 2 after the whole training), and a missing --eval-prompts file is refused before any."""
    from lmlab.checkpoint import save_run

    save_run(tmp_path / "base", _tiny(tok, block_size=32), tok, train_config={})
    rng, judge = np.random.default_rng(1), jg.PreferWord("a")
    for _ in range(6):
        comps = ["".join(rng.choice(list("abcde "), size=5)) for _ in range(3)]
        rk.append_ranking(tmp_path / "r.jsonl", {"prompt": "the cat ", "completions": comps,
                                                 "ranking": judge("the cat ", comps)})
    parser = build_parser()
    argv = ["dpo", str(tmp_path / "base"), "--rankings", str(tmp_path / "r.jsonl"), "--batch-size",
            "2", "--eval-judge", "word:a", "--eval-max-new-tokens", "4", "--steps", "2",
            "--no-progress", "--threads", "1"]
    args = parser.parse_args([*argv, "--out", str(tmp_path / "missing"), "--eval-prompts",
                              str(tmp_path / "nope.txt")])
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        args.func(args)
    assert not (tmp_path / "missing").exists()
    args = parser.parse_args([*argv, "--out", str(tmp_path / "dpo")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "on training pairs" in out
    assert re.search(r"judge word:a \(on the training prompts: none is held out\): prefers the "
                     r"tuned answer on \d", out)


# --- after instruct tuning -----------------------------------------------------------------------


def test_stages_tuned_from_an_instruct_run_prompt_through_its_chat_template(tmp_path, tok,
                                                                            monkeypatch):
    """reward, dpo and rlhf from an instruct-tuned run put every prompt in a user turn (the ids
    instruct tuning trained on, built here by hand), end sampled answers at <|end|>, and save runs
    that keep the template, so `lmlab sample` on them still answers as an assistant."""
    from lmlab import api
    from lmlab.chat import TEMPLATE
    from lmlab.checkpoint import load_model, read_config, save_run
    from lmlab.instruct import instruct_tune

    save_run(tmp_path / "base", _tiny(tok, block_size=48), tok, train_config={})
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"{s} sees", "response": f"{s} sees a ball."}) + "\n"
                          for s in ("the cat", "a dog", "my friend", "the bird", "a fox")),
                  encoding="utf-8")
    instruct_tune(tmp_path / "base", str(qa), tmp_path / "chat", steps=2, lr=1e-3, warmup_steps=1,
                  batch_size=2, eval_every=0, save_every=0, progress=False)
    model, chat_tok, _ = load_model(tmp_path / "chat")
    assert chat_tok.chat_template == TEMPLATE

    prompt = "the cat "
    user, assistant, end = (chat_tok.special_id(t) for t in ("<|user|>", "<|assistant|>", "<|end|>"))
    turn = np.concatenate([[user], tok.encode(prompt), [assistant]]).astype(np.int32)
    # A prompt longer than the block loses its oldest text but keeps the turn's <|user|>.
    long_prompt = "the cat sees a red box. " * 6
    cut = sq.prompt_ids_for(chat_tok, long_prompt, 48, 8)
    assert cut.size == 40 and cut[0] == user and cut[-1] == assistant
    np.testing.assert_array_equal(cut[1:-1], tok.encode(long_prompt)[-38:])
    plain = sq.prompt_ids_for(tok, long_prompt, 48, 8)
    np.testing.assert_array_equal(plain, tok.encode(long_prompt)[-40:])
    rng = np.random.default_rng(0)
    judge = jg.PreferWord("a")
    for _ in range(8):
        comps = ["".join(rng.choice(list("abcde "), size=int(rng.integers(3, 10))))
                 for _ in range(3)]
        rk.append_ranking(tmp_path / "r.jsonl", {"prompt": prompt, "completions": comps,
                                                 "ranking": judge(prompt, comps)})
    quick = dict(steps=2, eval_every=0, save_every=0, progress=False, threads=1)

    # DPO's pairs follow the user turn.
    dpo_result = dpo_mod.dpo(tmp_path / "chat", tmp_path / "r.jsonl", tmp_path / "dpo",
                             batch_size=2, **quick)
    assert all(np.array_equal(p, turn) for p, _, _ in dpo_result.details["tuner"].train)

    # The reward model reads the logits of the user turn and the answer.
    rwd.reward(tmp_path / "chat", tmp_path / "r.jsonl", tmp_path / "rm", steps=5)
    rm = rwd.RewardModel.load(tmp_path / "rm")
    answer = "a cab"
    phi = rwd.reward_features(rm.model, rm.tok, [prompt], [answer])
    logits, _ = model.forward(np.concatenate([turn, tok.encode(answer)])[None].astype(np.int32))
    np.testing.assert_allclose(phi[0, :chat_tok.vocab_size], logits[0, -1], rtol=1e-6, atol=1e-6)

    # RL samples after the user turn and stops at <|end|> (or where the model ends its text,
    # <|endoftext|>), which the rollout keeps.
    rl_result = rl.rlhf(tmp_path / "chat", [prompt, "a dog "], tmp_path / "rl",
                        reward_model=str(tmp_path / "rm"), k=2, prompts_per_step=1,
                        max_new_tokens=6, val_fraction=0.5, **quick)
    assert any(np.array_equal(ids, turn) for ids in rl_result.details["tuner"].ids
                                                     + rl_result.details["tuner"].val_ids)
    stops = []

    def answer_of_two_tokens(model, prompt_ids, max_new_tokens, *, stop_ids, keep_stop, **_):
        stops.append(list(stop_ids))
        return [int(tok.encode("a")[0])] * 2 + [end] * keep_stop  # the model chose <|end|>

    monkeypatch.setattr(sq, "generate", answer_of_two_tokens)
    ids, text, ended = sq.sample_completion(model, chat_tok, turn, 6, seed=0)
    assert stops == [[end, chat_tok.eot_id]] and ids[-1] == end and text == "aa" and ended is True
    np.testing.assert_array_equal(sq.answer_ids(chat_tok, text, ended), ids)

    for run in ("dpo", "rm", "rl"):
        assert read_config(tmp_path / run)["train"]["chat_template"] == TEMPLATE, run
        assert api.load(tmp_path / run).chat, run
    assert not api.load(tmp_path / "base").chat


def test_rankings_given_as_something_else_than_paths_are_named():
    from pathlib import Path

    from lmlab.rankings import ranking_paths
    for bad in (5, [5], {"a.jsonl": 1}, b"a.jsonl"):
        with pytest.raises(ValueError, match=r"rankings must be a rankings file \(a str or path\) "
                                             r"or a list of them, got "):
            ranking_paths(bad)
    assert ranking_paths(["a.jsonl", Path("b.jsonl")]) == ["a.jsonl", "b.jsonl"]
    assert ranking_paths(None) is None


# --- text the run cannot encode, and rankings that imply no pair, refused up front ---------------


def _unseen(text: str, corpus: str) -> list:
    """Reference: the characters of text a char tokenizer trained on corpus lacks (its vocabulary
    is the corpus's characters), ignoring nothing: callers pass text without special tokens."""
    return sorted(set(text) - set(corpus))


@pytest.mark.parametrize("verb", ["dpo", "reward"])
def test_rankings_the_run_cannot_encode_are_refused_naming_file_line_and_field(tmp_path, tok,
                                                                              capsys, verb):
    """A rankings line holding characters the run's char tokenizer never saw is refused before any
    work (it was refused at the first batch or feature pass that met it, naming neither file nor
    line, and the reward model left its output directory behind): every line is checked, the
    first offending line is named as an editor counts it, with the field, the characters and what
    to do, and the others are counted."""
    from lmlab.checkpoint import save_run

    corpus = _corpus(200)
    save_run(tmp_path / "base", _tiny(tok), tok, train_config={})
    bad_rejected = "a QZ box"
    lines = [json.dumps({"prompt": "the cat ", "chosen": "sees a ball", "rejected": "eats"}),
             "",  # a blank line still counts
             json.dumps({"prompt": "a dog ", "completions": ["runs", "finds", "eats"],
                         "ranking": [2, [0, 1]]}),
             json.dumps({"prompt": "my friend ", "chosen": "likes the moon",
                         "rejected": bad_rejected}),
             json.dumps({"prompt": "the bird ", "completions": ["sees", "jumps", "a Q"],
                         "ranking": [0, 1, 2]}),
             json.dumps({"prompt": "a fox ", "chosen": "eats", "rejected": "runs"})]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    first = 1 + next(i for i, ln in enumerate(lines) if bad_rejected in ln)
    other = 1 + next(i for i, ln in enumerate(lines) if "the bird" in ln)
    out = tmp_path / "o"
    argv = [verb, str(tmp_path / "base"), "--rankings", str(path), "--out", str(out), "--steps",
            "2", "--threads", "1"]
    assert main(argv + (["--no-progress"] if verb == "dpo" else [])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lmlab {verb}: error: {path}:{first}: "), err
    assert "the rejected answer holds" in err
    for c in _unseen(bad_rejected, corpus):
        assert f"{c!r} x1" in err, (c, err)
    assert f"(and 1 more: line {other})" in err and "--tokenizer bpe" in err
    assert not out.exists()
    assert len(rk.load_rankings(path)) == 5  # without a tokenizer to check against, all read
    # The ranking form names the completion.
    path.write_text("\n".join("" if i == first - 1 else ln for i, ln in enumerate(lines)) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:{other}: the answer completions[2] "
                                                   "holds character(s) the run's char tokenizer "
                                                   "cannot encode (its vocabulary holds only the "
                                                   "characters of the text it was trained on): "
                                                   "'Q' x1; edit")):
        rk.load_rankings(path, tokenizer=tok)


def test_a_lone_surrogate_is_refused_as_invalid_unicode_for_either_tokenizer(tmp_path, tok):
    bpe = train_tokenizer(_corpus(200), "bpe", vocab_size=300)
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "the \\ud800", "chosen": "a", "rejected": "the"}\n')
    for t in (tok, bpe):
        with pytest.raises(ValueError, match=re.escape(f"{path}:1: the prompt holds lone "
                                                       "surrogate(s), which are not valid")):
            rk.load_rankings(path, tokenizer=t)


def test_the_encodability_check_follows_how_prompts_and_answers_are_encoded(tok):
    """Reference: the stages' own encoding (sequences._prompt_ids, answer_ids) refuses exactly
    what unencodable reports. A special token's name is a token in an answer and in a plain
    prompt, but text in a chat prompt (user text cannot forge a turn)."""
    from lmlab.chat import TEMPLATE

    chat_tok = train_tokenizer(_corpus(200), "char")
    chat_tok.chat_template = TEMPLATE
    for t in (tok, chat_tok):
        for text in ("the cat", "the <|end|> cat", "the Q cat", "<|user|>", "a|b", ""):
            for is_prompt, encode in ((True, sq._prompt_ids), (False, sq.answer_ids)):
                try:
                    encode(t, text)
                    refused = False
                except ValueError:
                    refused = True
                assert bool(sq.unencodable(t, text, prompt=is_prompt)) == refused, (text, is_prompt)
    assert sq.unencodable(chat_tok, "a<|end|>", prompt=True) == {"<": 1, "|": 2, ">": 1}
    assert tok.unknown_chars("a<|end|>Q", allow_special=True) == {"Q": 1}


def test_answers_sampled_for_ranking_are_never_refused(tmp_path, tok):
    """What `lmlab rank` and the studio's Rank page write (sampled answers, which hold special
    tokens' names and U+FFFD) is read back by the verbs with the run's tokenizer."""
    model = _tiny(tok, seed=3)
    texts, ended = [], []
    for prompt in ("the cat ", "a dog "):
        t, e = sq.sample_answers(model, tok, sq.prompt_ids_for(tok, prompt, 32, 24), 24,
                                 range(6), temperature=2.0)
        rk.append_ranking(tmp_path / "r.jsonl", {"prompt": prompt, "completions": t,
                                                 "ranking": list(range(6)), "ended": e})
        texts += t
    assert any("<|" in t for t in texts)  # the reference below covers special tokens' names
    recs = rk.load_rankings(tmp_path / "r.jsonl", tokenizer=tok)
    assert [c for r in recs for c in r["completions"]] == texts


def test_rlhf_and_rank_prompts_the_run_cannot_encode_are_refused_naming_the_line(tmp_path, tok,
                                                                                 capsys):
    """rlhf's prompts file, rank's, and dpo's --eval-prompts: a prompt the run cannot encode is
    refused before any work (rank stopped at that prompt's turn mid-session, and the eval after
    the whole training, naming no line); lines count as an editor counts them (a form feed inside
    a prompt used to start a new line)."""
    from lmlab.checkpoint import save_run

    corpus = _corpus(200) + "\x0c"
    tok = train_tokenizer(corpus, "char")
    save_run(tmp_path / "base", _tiny(tok), tok, train_config={})
    prompts = tmp_path / "p.txt"
    lines = ["the cat\x0csees ", "a dog ", "my Friend ", "the bird ", "a Fox "]
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    bad = [i + 1 for i, ln in enumerate(lines) if _unseen(ln, corpus)]
    assert bad == [3, 5]
    head = f"{prompts}:{bad[0]}: the prompt holds character(s) the run's char tokenizer cannot "
    tail = f"'F' x1 (and 1 more: line {bad[1]}); edit or remove the line"
    (tmp_path / "r.jsonl").write_text('{"prompt": "a", "chosen": "the", "rejected": "a"}\n')
    for verb, argv in [
            ("rlhf", ["--prompts", str(prompts), "--judge", "shorter", "--max-new-tokens", "4"]),
            ("rank", ["--prompts", str(prompts), "--judge", "shorter", "--max-new-tokens", "4"]),
            ("dpo", ["--rankings", str(tmp_path / "r.jsonl"), "--eval-judge", "shorter",
                     "--eval-prompts", str(prompts)])]:
        out = tmp_path / ("o.jsonl" if verb == "rank" else "o")
        assert main([verb, str(tmp_path / "base"), *argv, "--out", str(out), "--steps", "1"]
                    if verb != "rank" else
                    [verb, str(tmp_path / "base"), *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and head in err and tail in err, (verb, err)
        assert not out.exists(), verb
    with pytest.raises(ValueError, match=re.escape("prompts[1]: the prompt holds")):
        rl.rlhf(tmp_path / "base", ["the cat ", "a Fox "], tmp_path / "o", judge="shorter",
                max_new_tokens=4, steps=1, progress=False)
    assert rk.read_prompts(prompts)[0] == lines[0]


@pytest.mark.parametrize("verb", ["dpo", "reward"])
def test_rankings_that_are_all_ties_are_refused_naming_the_files(tmp_path, tok, capsys, verb):
    """A file whose every ranking ties all its answers implies no pair: refused before any work
    naming the file (the reward model's refusal named none and left its output directory)."""
    from lmlab.checkpoint import save_run

    save_run(tmp_path / "base", _tiny(tok), tok, train_config={})
    path = tmp_path / "ties.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completions": ["a", "the"],
                                        "ranking": [[0, 1]]}) + "\n" for p in ("a ", "the ")))
    out = tmp_path / "o"
    # Two prompts: by default one is held out with its ranking, and the other trains.
    for extra, says in [(["--val-fraction", "0"], f"every ranking in {path} is a single tie"),
                        ([], f"every ranking in {path} that is not held out (1 of 2) is a single "
                             "tie")]:
        assert main([verb, str(tmp_path / "base"), "--rankings", str(path), "--out", str(out),
                     *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
        assert not out.exists()
