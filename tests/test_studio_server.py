"""The studio's server: every endpoint against the library computed independently (numpy float64),
the refusals (token, Host, run names, sizes, bad values), server-sent events as metrics.jsonl grows,
and 20 simultaneous ranking submissions against a real uvicorn server."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from studio_fixtures import PROMPTS, studio_runs  # noqa: F401  (a fixture)

httpx = pytest.importorskip("httpx", reason="the studio's server tests need httpx")
from starlette.testclient import TestClient  # noqa: E402

from lmlab.checkpoint import load_model  # noqa: E402
from lmlab.cli import main  # noqa: E402
from lmlab.metrics import append_metrics, read_metrics  # noqa: E402
from lmlab.rankings import load_rankings, pairs_from_ranking  # noqa: E402
from lmlab.studio import create_app  # noqa: E402
from lmlab.studio.app import PAGES, STATIC, running  # noqa: E402
from lmlab.studio.runs import Runs  # noqa: E402
from lmlab.studio.security import MAX_BODY  # noqa: E402

LOCAL = "http://127.0.0.1"


def softmax64(logits):
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.fixture
def studio(studio_runs, tmp_path):  # noqa: F811
    """A TestClient on a studio over both runs, writing rankings into tmp_path."""
    app = create_app(studio_runs, rankings=tmp_path / "rankings.jsonl", prompts=PROMPTS,
                     stream_lifetime=1.0, allowed_hosts={"127.0.0.1"})
    with TestClient(app, base_url=LOCAL) as client:
        yield client


@pytest.fixture(scope="module")
def models(studio_runs):  # noqa: F811
    return [load_model(r) for r in studio_runs]


# --- pages and static files ----------------------------------------------------------------------

def test_every_page_and_every_asset_it_names_is_served_and_nothing_comes_from_elsewhere(studio):
    for page in ("",) + PAGES:
        r = studio.get(f"/{page}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', r.text)
        assert "/static/studio.js" in assets and "/static/style.css" in assets
        for asset in assets:
            assert studio.get(asset).status_code == 200, asset
    for f in STATIC.iterdir():  # offline: no CDN, no font or script from another host
        assert "://" not in f.read_text(encoding="utf-8"), f.name
    assert studio.get("/static/../app.py").status_code == 404
    assert studio.get("/nope").status_code == 404


def test_runs_are_listed_by_index_and_name_and_same_named_runs_are_told_apart(studio_runs, tmp_path):  # noqa: F811
    base, chat = studio_runs
    runs = Runs([base, chat, base])
    assert [r.name for r in runs.runs] == ["base", "chat", "base-2"]
    assert runs.get("1").path == chat.resolve() and runs.get(2).name == "base-2"
    assert runs.get("base-2").index == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Runs([tmp_path / "missing"])
    with pytest.raises(ValueError, match="not a run directory"):
        Runs([tmp_path])


def test_the_runs_endpoint_says_which_run_can_chat(studio):
    runs = studio.get("/api/runs").json()["runs"]
    assert [(r["name"], r["stage"], r["chat"]) for r in runs] == [
        ("base", "pretrain", False), ("chat", "instruct", True)]


# --- descent -------------------------------------------------------------------------------------

def test_descent_on_the_parabola_multiplies_x_by_one_minus_two_lr_each_step(studio):
    d = studio.get("/api/descent", params={"start": 3, "lr": 0.3, "steps": 12}).json()
    expected = 3 * (1 - 2 * 0.3) ** np.arange(13)
    np.testing.assert_allclose(d["xs"], expected, rtol=1e-12)
    np.testing.assert_allclose(d["slopes"], 2 * expected, rtol=1e-12)
    np.testing.assert_allclose(d["losses"], expected ** 2, rtol=1e-12)
    assert d["regime"] == "good: fast and steady"
    assert studio.get("/api/descent", params={"lr": 1.2, "steps": 20}).json()["regime"] == "diverges"


def test_descent_momentum_on_the_bumpy_function_follows_the_heavy_ball_recurrence(studio):
    d = studio.get("/api/descent", params={"function": "bumpy", "method": "momentum", "start": 3,
                                           "lr": 0.01, "steps": 30}).json()
    x, v, xs = 3.0, 0.0, [3.0]
    for _ in range(30):
        v = 0.9 * v + (2 * x + 3.6 * np.cos(6 * x))
        x -= 0.01 * v
        xs.append(x)
    np.testing.assert_allclose(d["xs"], xs, rtol=1e-12)
    np.testing.assert_allclose(d["losses"], np.array(xs) ** 2 + 0.6 * np.sin(6 * np.array(xs)), rtol=1e-12)


def test_descent_adam_on_the_double_well_steps_about_lr_each_time(studio):
    d = studio.get("/api/descent", params={"function": "double_well", "method": "adam", "start": 2,
                                           "lr": 0.05, "steps": 5}).json()
    assert abs(d["xs"][1] - d["xs"][0]) == pytest.approx(0.05, rel=1e-6)  # Adam's first step is lr
    assert d["curve"]["x"][0] < -2 and d["curve"]["x"][-1] > 2


@pytest.mark.parametrize("params, message", [
    ({"function": "../etc"}, "function must be one of"),
    ({"method": "sgd"}, "method must be one of"),
    ({"lr": "abc"}, "lr must be a number"),
    ({"lr": "nan"}, "lr must be a finite number"),
    ({"steps": 100000}, "steps must be in"),
    ({"steps": 2.5}, "steps must be a whole number"),
])
def test_descent_refuses_bad_settings_in_one_line(studio, params, message):
    r = studio.get("/api/descent", params=params)
    assert r.status_code == 400 and message in r.json()["error"]


# --- next token ----------------------------------------------------------------------------------

def test_next_token_distribution_is_the_models_softmax_reshaped(studio, models):
    model, tok, _ = models[0]
    prompt = "ROMEO: "
    ids = tok.encode(prompt)
    logits, _ = model.forward(ids[None, :])
    p = softmax64(logits[0, -1])
    raw = studio.post("/api/next", json={"prompt": prompt, "show": 64}).json()
    assert raw["vocab_size"] == p.size and raw["kept"] == p.size
    order = np.argsort(-p, kind="stable")[:64]
    assert [t["id"] for t in raw["tokens"]] == order.tolist()
    np.testing.assert_allclose([t["p"] for t in raw["tokens"]], p[order], rtol=1e-5)

    top3 = studio.post("/api/next", json={"prompt": prompt, "top_k": 3, "show": 10}).json()
    assert top3["kept"] == 3
    shaped = np.array([t["shaped"] for t in top3["tokens"]])
    np.testing.assert_allclose(shaped[:3], p[order[:3]] / p[order[:3]].sum(), rtol=1e-5)
    assert not shaped[3:].any()

    hot = studio.post("/api/next", json={"prompt": prompt, "temperature": 2.0, "show": 64}).json()
    q = p ** 0.5 / np.sum(p ** 0.5)
    np.testing.assert_allclose([t["shaped"] for t in hot["tokens"]], q[order], rtol=1e-5)

    nucleus = studio.post("/api/next", json={"prompt": prompt, "top_p": 0.5, "show": 64}).json()
    cum = np.cumsum(p[order])
    assert nucleus["kept"] == int(np.argmax(cum >= 0.5 - 1e-12)) + 1


def test_picking_the_most_likely_and_sampling_with_a_seed(studio, models):
    model, tok, _ = models[0]
    ids = tok.encode("To be")
    p = softmax64(model.forward(ids[None, :])[0][0, -1])
    greedy = studio.post("/api/next/pick", json={"prompt": "To be", "mode": "greedy"}).json()
    assert greedy["id"] == int(np.argmax(p)) and greedy["prompt"] == "To be" + greedy["text"]
    assert greedy["p"] == pytest.approx(p.max(), rel=1e-5)
    # sample: one uniform number u from Generator(seed) picks the token whose cdf passes u
    for seed in range(5):
        got = studio.post("/api/next/pick", json={"prompt": "To be", "mode": "sample", "seed": seed,
                                                   "top_k": 5}).json()
        keep = np.argsort(-p, kind="stable")[:5]
        q = np.zeros_like(p)
        q[keep] = p[keep] / p[keep].sum()
        u = np.random.default_rng(seed).random()
        assert got["id"] == int(np.searchsorted(np.cumsum(q), u * q.sum(), side="right"))


def test_next_token_page_shows_what_a_pick_draws_from_for_logits_thousands_of_nats_apart(
        studio_runs, models, tmp_path):  # noqa: F811
    """The page's bars are lmlab.sample.filter_logits of the model's logits, the distribution
    generation and the page's own pick draw from. With logits 1500 nats apart, half the tokens have
    probability 0 in float64 (more than ~745 nats below the top), yet at temperature 100 each keeps
    at least e^-15 of the top's weight: shaping the probabilities showed them at 0 and kept fewer."""
    from lmlab.checkpoint import save_run
    from lmlab.model import GPT
    from lmlab.sample import draw_token, filter_logits

    model, tok, _ = models[0]
    prompt = "ROMEO: "
    ids = tok.encode(prompt)
    factor = 1500.0 / float(np.ptp(model.forward(ids[None, :])[0][0, -1]))
    wide = GPT(model.config, seed=0)
    for name, w in wide.named_parameters().items():  # ln_f scaled: every logit times factor
        w[...] = model.named_parameters()[name] * (factor if name.startswith("ln_f.") else 1)
    run = tmp_path / "wide"
    save_run(run, wide, tok, train_config={})
    logits = wide.forward(ids[None, :])[0][0, -1]
    assert np.ptp(logits) == pytest.approx(1500, rel=1e-3)
    lost = softmax64(logits) == 0
    assert lost.any()
    app = create_app([run], rankings=tmp_path / "r.jsonl", allowed_hosts={"127.0.0.1"})
    with TestClient(app, base_url=LOCAL) as c:
        for settings in ({"temperature": 100.0}, {"temperature": 1.0}, {"temperature": 0.5},
                         {"temperature": 100.0, "top_k": 40}, {"temperature": 100.0, "top_p": 0.5}):
            shown = c.post("/api/next", json={"prompt": prompt, "show": 64, **settings}).json()
            want = filter_logits(logits, **settings)
            order = np.argsort(-np.asarray(logits, np.float64), kind="stable")[:64]
            assert [t["id"] for t in shown["tokens"]] == order.tolist(), settings
            np.testing.assert_allclose([t["shaped"] for t in shown["tokens"]], want[order],
                                       rtol=1e-12, atol=0, err_msg=str(settings))
            assert shown["kept"] == np.count_nonzero(want), settings
            for seed in range(3):
                got = c.post("/api/next/pick", json={"prompt": prompt, "mode": "sample",
                                                     "seed": seed, **settings}).json()
                assert got["id"] == draw_token(want, np.random.default_rng(seed)), settings
        hot = c.post("/api/next", json={"prompt": prompt, "show": 64, "temperature": 100}).json()
    assert hot["kept"] == tok.vocab_size
    shaped = {t["id"]: t["shaped"] for t in hot["tokens"]}
    assert all(shaped[i] > 0 for i in np.flatnonzero(lost) if i in shaped)


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "temperature": -1}, "temperature must be in"),
    ({"prompt": "x", "top_p": 0}, "top_p must be in (0, 1]"),
    ({"prompt": "x", "top_k": -2}, "top_k must be in"),
    ({"prompt": "x", "top_k": True}, "top_k must be a finite number"),
    ({"prompt": "x", "top_k": 10 ** 400}, "top_k must be in [0, "),  # beyond any float: not a 500
    ({"prompt": 5}, "prompt must be a string"),
    ({"prompt": "x" * 2001}, "at most 2000"),
    ({"prompt": "\u2603 snow"}, "cannot encode '\u2603'"),
    ({"prompt": "x", "show": 1000}, "show must be in"),
    ({"prompt": "x", "ids": "1,2"}, "ids must be a list"),
    ({"prompt": "x", "ids": [-1]}, "id must be >= 0, got -1"),
    ({"prompt": "x", "ids": [1 << 20]}, "ids must be in [0, "),
    ({"prompt": "x", "ids": [1] * 2001}, "at most 2000 token ids"),
])
def test_next_token_refuses_bad_values(studio, body, message):
    r = studio.post("/api/next", json=body)
    assert r.status_code == 400 and message in r.json()["error"]


def test_picks_go_back_as_ids_so_a_split_utf8_character_is_exact_on_a_byte_level_bpe_run(tmp_path):
    """Two byte-level BPE tokens make one character: after the first the text shows U+FFFD, yet the
    model is fed exactly the ids it picked, and the character is whole once the second arrives."""
    from lmlab.pretrain import pretrain
    from lmlab.sample import next_token_distribution

    corpus = tmp_path / "accents.txt"
    corpus.write_text("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, d\u00e9j\u00e0 vu. " * 200, encoding="utf-8")
    run = tmp_path / "bytes"
    pretrain(str(corpus), run, tokenizer="bpe", vocab_size=260, n_layer=1, n_head=2, n_embd=16,
             block_size=32, batch_size=4, steps=3, eval_every=0, save_every=0, progress=False, seed=0)
    model, tok, _ = load_model(run)
    first, second = (int(i) for i in tok.encode("\u00e9"))  # one character, two byte tokens
    app = create_app([run], rankings=tmp_path / "r.jsonl", allowed_hosts={"127.0.0.1"})
    with TestClient(app, base_url=LOCAL) as c:
        shown = c.post("/api/next", json={"prompt": "caf", "ids": [first], "show": 64}).json()
        exact = next_token_distribution(model, np.concatenate([tok.encode("caf"), [first]]))
        retyped = next_token_distribution(model, tok.encode("caf" + tok.decode([first])))
        assert not np.allclose(exact, retyped)  # the text would not give the model its own ids back
        for t in shown["tokens"]:
            assert t["p"] == pytest.approx(exact[t["id"]], rel=1e-5, abs=1e-9)
        pick = c.post("/api/next/pick", json={"prompt": "caf", "ids": [first], "mode": "greedy"}).json()
        assert pick["id"] == int(np.argmax(exact)) and pick["ids"] == [first, pick["id"]]
        assert pick["prompt"] == "caf" + tok.decode([first, pick["id"]])
        half = c.post("/api/next/pick", json={"prompt": "caf", "mode": "greedy"}).json()
        assert half["ids"] == [half["id"]] and half["prompt"] == "caf" + tok.decode([half["id"]])
    whole = tok.decode([first, second])
    assert whole == "\u00e9" and "\ufffd" in tok.decode([first])


# --- loss, embeddings, chat ----------------------------------------------------------------------

def test_loss_page_numbers_are_the_models_own_cross_entropy(studio, models):
    model, tok, _ = models[0]
    text = "First Citizen: we are all"
    ids = tok.encode(text)
    _, losses = model.forward(ids[None, :-1], ids[None, 1:])
    d = studio.post("/api/loss", json={"text": text}).json()
    assert "".join(t["text"] for t in d["tokens"]) == text and d["tokens"][0]["p"] is None
    np.testing.assert_allclose([t["ce"] for t in d["tokens"][1:]], losses[0], rtol=1e-4)
    np.testing.assert_allclose([t["p"] for t in d["tokens"][1:]], np.exp(-losses[0].astype(np.float64)), rtol=1e-4)
    assert d["mean_ce"] == pytest.approx(float(losses.mean()), rel=1e-5)
    assert d["uniform_ce"] == pytest.approx(np.log(tok.vocab_size))
    assert studio.post("/api/loss", json={"text": "a"}).status_code == 400  # one token: nothing to predict
    assert studio.post("/api/loss", json={"text": "  "}).status_code == 400


def test_embeddings_map_and_neighbours_by_cosine(studio, models):
    model, tok, _ = models[0]
    wte = np.array(model.named_parameters()["wte"][: tok.vocab_size], np.float64)
    m = studio.get("/api/embeddings", params={"run": "base"}).json()
    assert len(m["tokens"]) == tok.vocab_size and m["dims"] == wte.shape[1]
    centred = wte - wte.mean(0)
    # the map is centred and spans the widest direction: its variance is the top singular value's
    xs = np.array([[t["x"], t["y"]] for t in m["tokens"]])
    top = np.linalg.svd(centred, compute_uv=False)[:2] ** 2
    np.testing.assert_allclose((xs ** 2).sum(0), top, rtol=1e-6)

    q = int(tok.encode("e")[0])
    d = studio.get("/api/embeddings/neighbours", params={"run": 0, "token": "e", "k": 5}).json()
    cos = wte @ wte[q] / (np.linalg.norm(wte, axis=1) * np.linalg.norm(wte[q]))
    cos[q] = -np.inf
    assert [n["id"] for n in d["neighbours"]] == np.argsort(-cos, kind="stable")[:5].tolist()
    by_id = studio.get("/api/embeddings/neighbours", params={"run": 0, "id": q, "k": 5}).json()
    assert by_id["neighbours"] == d["neighbours"]
    assert studio.get("/api/embeddings/neighbours", params={"token": "ee"}).status_code == 400
    assert studio.get("/api/embeddings/neighbours", params={"id": 10 ** 6}).status_code == 400


def test_chat_answers_like_lmlab_chat_and_only_with_an_instruct_run(studio, models):
    from lmlab.instruct import respond

    model, tok, _ = models[1]
    messages = [{"role": "user", "content": "What is len?"}]
    want = respond(model, tok, messages, max_new_tokens=30)
    got = studio.post("/api/chat", json={"run": "chat", "messages": messages, "max_new_tokens": 30}).json()
    assert (got["reply"], got["ended"], got["stop"]) == want
    r = studio.post("/api/chat", json={"run": "base", "messages": messages})
    assert r.status_code == 400 and "not instruct-tuned" in r.json()["error"]
    for bad, message in [({"messages": []}, "non-empty list"),
                         ({"messages": [{"role": "system2", "content": "x"}]}, "messages[0]"),
                         ({"messages": [{"role": "assistant", "content": "x"}]}, "last message"),
                         ({"messages": messages * 21}, "at most 20"),
                         ({"messages": messages, "max_new_tokens": 10 ** 6}, "max_new_tokens")]:
        r = studio.post("/api/chat", json={"run": "chat", **bad})
        assert r.status_code == 400 and message in r.json()["error"]


# --- training ------------------------------------------------------------------------------------

def test_training_metrics_and_samples_come_from_the_run(studio, studio_runs, models):  # noqa: F811
    from lmlab.sample import generate

    base = studio_runs[0]
    d = studio.get("/api/training/metrics", params={"run": "base"}).json()
    assert d["rows"] == read_metrics(base) and d["checkpoint"].startswith("step_")
    model, tok, _ = models[0]
    s = studio.get("/api/training/sample", params={"run": 0, "tokens": 20, "seed": 4}).json()
    want = generate(model, np.array([tok.eot_id], np.int32), 20, temperature=0.8, seed=4,
                    stop_ids=[tok.eot_id])
    assert s["text"] == tok.decode(want)


def _events(text: str) -> list:
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            out.append((fields["event"], fields.get("id"), json.loads(fields["data"])))
    return out


def test_the_stream_sends_every_row_once_and_resumes_after_last_event_id(studio, studio_runs):  # noqa: F811
    rows = read_metrics(studio_runs[0])
    events = _events(studio.get("/api/training/stream", params={"run": "base"}).text)
    assert events[0] == ("rows", str(len(rows)), {"run": "base", "rows": rows})
    assert events[1][0] == "checkpoint" and events[1][2]["checkpoint"].startswith("step_")
    again = _events(studio.get("/api/training/stream", params={"run": "base"},
                               headers={"Last-Event-ID": str(len(rows) - 1)}).text)
    assert again[0][2]["rows"] == rows[-1:]
    assert studio.get("/api/training/stream", params={"run": "../base"}).status_code == 404


def test_the_stream_follows_a_growing_metrics_file_on_a_real_server(studio_runs, tmp_path):  # noqa: F811
    import shutil

    run = tmp_path / "growing"
    shutil.copytree(studio_runs[0], run)
    app = create_app([run], rankings=tmp_path / "r.jsonl", stream_lifetime=20)
    before = len(read_metrics(run))
    got = []
    with running(app) as url, httpx.stream("GET", f"{url}/api/training/stream?run=0", timeout=30) as r:
        buffer = ""
        for chunk in r.iter_text():
            buffer += chunk
            got = _events(buffer)
            if len([e for e in got if e[0] == "rows"]) == 1 and len(got) == 2:
                append_metrics(run, {"step": 1000, "loss": 1.25, "tokens_per_s": 5.0})
            if len([e for e in got if e[0] == "rows"]) == 2:
                break
    rows_events = [e for e in got if e[0] == "rows"]
    assert rows_events[1][1] == str(before + 1)
    assert rows_events[1][2]["rows"] == [{"step": 1000, "loss": 1.25, "tokens_per_s": 5.0}]


# --- rank ----------------------------------------------------------------------------------------

def test_a_round_is_sampled_like_lmlab_rank_and_a_submission_is_a_rankings_line(studio, models, tmp_path):
    from lmlab.sequences import prompt_ids_for, sample_completion

    assert studio.get("/api/rank/prompts").json()["prompts"] == PROMPTS
    model, tok, _ = models[0]
    body = {"run": "base", "prompt": "ROMEO: ", "k": 3, "seed": 7, "max_new_tokens": 12}
    first = studio.post("/api/rank/round", json=body).json()
    assert studio.post("/api/rank/round", json=body).json()["id"] == first["id"]
    pids = prompt_ids_for(tok, "ROMEO: ", model.config.block_size, 12)
    samples = [sample_completion(model, tok, pids, 12, seed=s) for s in (7, 8, 9)]
    assert first["completions"] == [text for _, text, _ in samples]
    assert first["ended"] == [ended for _, _, ended in samples]
    assert first["seeds"] == [7, 8, 9] and first["submitted"] == 0
    assert first["max_new_tokens"] == 12  # the page marks an answer that did not end as cut at 12

    r = studio.post("/api/rank/submit", json={"round": first["id"], "name": " Ada ", "places": [2, 1, 2]})
    assert r.status_code == 200 and r.json()["ranking"] == [1, [0, 2]]
    (rec,) = load_rankings(tmp_path / "rankings.jsonl")
    assert rec == {"prompt": "ROMEO: ", "completions": first["completions"], "ranking": [1, [0, 2]],
                   "ended": first["ended"], "judge": "Ada", "seeds": [7, 8, 9], "run": "base"}
    assert pairs_from_ranking(rec["ranking"]) == [(1, 0), (1, 2)]
    assert studio.post("/api/rank/round", json=body).json()["submitted"] == 1


@pytest.mark.parametrize("change, message", [
    ({"places": [1, 2]}, "list of 3 numbers"),
    ({"places": [1, 2, 4]}, "from 1 to 3"),
    ({"places": [1, 2, "3"]}, "from 1 to 3"),
    ({"places": [1, 2, True]}, "from 1 to 3"),
    ({"name": ""}, "name must not be empty"),
    ({"name": "a" * 41}, "at most 40"),
    ({"name": "bob\x1b[31m"}, "printable"),
    ({"round": "0" * 20}, "unknown round"),
    ({"round": ["x"]}, "unknown round"),
])
def test_a_bad_submission_is_refused_and_writes_nothing(studio, tmp_path, change, message):
    rid = studio.post("/api/rank/round", json={"prompt": "To be", "k": 3, "max_new_tokens": 5}).json()["id"]
    r = studio.post("/api/rank/submit", json={"round": rid, "name": "x", "places": [1, 2, 3], **change})
    assert r.status_code == 400 and message in r.json()["error"]
    assert not (tmp_path / "rankings.jsonl").exists()


def test_a_round_refuses_too_many_answers_and_too_long_generations(studio):
    for bad, message in [({"k": 1}, "k must be in"), ({"k": 9}, "k must be in"),
                         ({"max_new_tokens": 201}, "max_new_tokens must be in"),
                         ({"max_new_tokens": 48}, "max_new_tokens=48 is not allowed: expected an "
                                                  "integer from 1 to 47"),
                         ({"prompt": ""}, "prompt must not be empty")]:
        r = studio.post("/api/rank/round", json={"prompt": "To be", **bad})
        assert r.status_code == 400 and message in r.json()["error"]


def test_twenty_simultaneous_submissions_each_land_once_as_a_whole_line(studio_runs, tmp_path):  # noqa: F811
    path = tmp_path / "class.jsonl"
    app = create_app(studio_runs, rankings=path)
    n = 20
    with running(app) as url:
        rid = httpx.post(f"{url}/api/rank/round", json={"prompt": "ROMEO: ", "k": 4,
                                                        "max_new_tokens": 16}).json()["id"]
        barrier = threading.Barrier(n)
        places = [[(i + j) % 4 + 1 for j in range(4)] for i in range(n)]

        def submit(i):
            barrier.wait()  # all 20 requests leave together
            return httpx.post(f"{url}/api/rank/submit", timeout=60,
                              json={"round": rid, "name": f"student {i:02d}", "places": places[i]})

        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(submit, range(n)))
        elapsed = time.perf_counter() - start
    assert [a.status_code for a in answers] == [200] * n
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == n
    records = [json.loads(line) for line in lines]  # every line whole, valid JSON
    judges = sorted(r["judge"] for r in records)
    assert judges == [f"student {i:02d}" for i in range(n)]
    for r in records:
        i = int(r["judge"].split()[1])
        assert r["ranking"] == [places[i].index(p) for p in range(1, 5)]
    assert len(load_rankings(path)) == n  # and lmlab reward / dpo read the file as it is
    print(f"\n20 simultaneous ranking submissions: all {n} present once, {elapsed:.3f} s")


# --- the guard: token, Host header, content type, sizes, runs ------------------------------------

def test_a_token_is_needed_on_every_request_once_one_is_set(studio_runs, tmp_path):  # noqa: F811
    app = create_app(studio_runs, token="s3cret-token", rankings=tmp_path / "r.jsonl")
    with TestClient(app, base_url="http://192.0.2.1") as c:
        for path in ("/", "/descent", "/static/studio.js", "/api/runs", "/api/descent"):
            r = c.get(path)
            assert r.status_code == 403 and "access token" in r.json()["error"]
        assert c.get("/api/runs", params={"token": "wrong"}).status_code == 403
        assert c.get("/", headers={"Cookie": "lmlab_studio_token=wrong"}).status_code == 403
        ok = c.get("/", params={"token": "s3cret-token"})
        assert ok.status_code == 200 and "HttpOnly" in ok.headers["set-cookie"]
        assert "SameSite=Strict" in ok.headers["set-cookie"]
        assert c.get("/api/runs").status_code == 200  # the cookie now carries the token
        assert c.post("/api/rank/round", json={"prompt": "x"}).status_code in (200, 400)
    with TestClient(app, base_url="http://192.0.2.1") as fresh:
        assert fresh.post("/api/rank/submit", json={}).status_code == 403


def test_a_loopback_studio_refuses_other_host_names(studio):
    r = studio.get("/api/runs", headers={"Host": "evil.example:8000"})
    assert r.status_code == 403 and "127.0.0.1" in r.json()["error"]
    assert studio.get("/api/runs", headers={"Host": "127.0.0.1:8000"}).status_code == 200


def test_posts_must_be_json_and_small(studio):
    r = studio.post("/api/next", content=b"prompt=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = studio.post("/api/next", content=json.dumps({"prompt": "x" * (MAX_BODY + 10)}),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "too large" in r.json()["error"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(MAX_BODY // 1000 + 2):
            yield b" " * 1000

    r = studio.post("/api/next", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = studio.post("/api/next", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    assert studio.post("/api/next", json=[1, 2]).status_code == 400
    # Within the size limit, nesting past json's recursion limit was a 500 (RecursionError).
    r = studio.post("/api/next", content=b"[" * 30000 + b"]" * 30000,
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]


@pytest.mark.parametrize("ref", ["../base", "base/../chat", "/etc/passwd", "2", "-1", "chat/", "x" * 500,
                                 "~", "base\x00", "\u00b2"])  # "²" is a digit to str.isdigit
def test_only_the_runs_named_at_start_are_reachable(studio, ref):
    for r in (studio.get("/api/training/metrics", params={"run": ref}),
              studio.get("/api/embeddings", params={"run": ref}),
              studio.post("/api/loss", json={"run": ref, "text": "To be"})):
        assert r.status_code == 404 and "no run" in r.json()["error"]
    assert studio.post("/api/next", json={"run": [0], "prompt": "x"}).status_code == 404


# --- the command line ----------------------------------------------------------------------------

def test_lmlab_studio_prints_the_url_with_a_token_for_a_network_host(studio_runs, monkeypatch, capsys):  # noqa: F811
    import uvicorn

    seen = {}

    def fake_run(server, sockets=None):
        seen.update(app=server.config.app, host=server.config.host, port=server.config.port)

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    # Nothing is bound: the ports named here may be in use on the machine running the tests.
    monkeypatch.setattr("lmlab.studio.app.listen_socket", lambda host, port: socket.socket())
    assert main(["studio", str(studio_runs[0]), "--host", "0.0.0.0", "--port", "8123"]) == 0
    out = capsys.readouterr().out
    token = re.search(r"http://0\.0\.0\.0:8123/\?token=([\w-]+)", out).group(1)
    assert len(token) >= 30 and seen["app"].token == token and seen["port"] == 8123
    assert main(["studio", str(studio_runs[0])]) == 0
    assert "open http://127.0.0.1:8000/\n" in capsys.readouterr().out
    assert seen["app"].token is None and seen["app"].allowed_hosts


def test_lmlab_studio_errors_are_one_line(studio_runs, tmp_path, monkeypatch, capsys):  # noqa: F811
    assert main(["studio", str(tmp_path / "nothing")]) == 2
    assert "lmlab studio: error: run directory" in capsys.readouterr().err
    assert main(["studio", "--port", "0"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "starlette" else find(name, *a))
    assert main(["studio", str(studio_runs[0])]) == 2
    assert 'pip install "lmlab[studio]"' in capsys.readouterr().err


def test_lmlab_studio_on_a_port_in_use_or_an_address_not_here_says_so_in_one_line(
        studio_runs, monkeypatch, capsys):  # noqa: F811
    """A second studio on a port in use printed the URL to open (the first studio's), then
    uvicorn's ERROR line, and exited 3; an empty --host bound every interface."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: pytest.fail("served"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["studio", str(studio_runs[0]), "--port", str(port)]) == 2
        out, err = capsys.readouterr()
        assert "open http" not in out
        assert err == (f"lmlab studio: error: cannot serve on --host 127.0.0.1 --port {port}: "
                       "Address already in use: is a studio (or another server) already running "
                       "there? Stop it, or pass another --port\n")
    for host, message in [("192.0.2.1", "Cannot assign requested address"),  # TEST-NET-1
                          ("", "--host '' is empty: name an address")]:
        assert main(["studio", str(studio_runs[0]), "--host", host]) == 2
        out, err = capsys.readouterr()
        assert "open http" not in out and message in err and err.count("\n") == 1, err


def test_an_empty_run_train_into_or_rankings_is_refused_not_read_as_the_current_directory(
        studio_runs, tmp_path, monkeypatch, capsys):  # noqa: F811
    """--train-into "" (an unset variable) made the current directory a slot the Training page
    could write a run into, among its files; a run named "" was looked for there; --rankings ""
    was said to be '. is a directory', naming no flag."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: pytest.fail("served"))
    shutil.copytree(studio_runs[0], tmp_path / "base")
    monkeypatch.chdir(tmp_path / "base")  # the current directory holds a run
    for argv, message in [([str(studio_runs[0]), "--train-into", ""], "--train-into '' is empty"),
                          ([""], "the run directory is empty ('')"),
                          # it was '. is a directory; rankings go to a JSONL file'
                          ([str(studio_runs[0]), "--rankings", ""],
                           "--rankings '' is not allowed: expected the JSONL file to append the "
                           "rankings to; an empty path names none")]:
        assert main(["studio", *argv]) == 2
        out, err = capsys.readouterr()
        assert "open http" not in out and message in err and err.count("\n") == 1, err


def test_a_rankings_file_that_is_not_jsonl_is_refused_before_serving_as_rank_refuses_it(
        studio_runs, tmp_path, monkeypatch, capsys):  # noqa: F811
    """--rankings naming an existing binary file started the studio, whose Rank page then failed
    on it, while `lmlab rank --out` refused it as not UTF-8: both refuse it, in the same line,
    before any work."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: pytest.fail("served"))
    monkeypatch.setattr("lmlab.studio.app.listen_socket", lambda host, port: socket.socket())
    binary = tmp_path / "bin.dat"
    binary.write_bytes(b"\xd0\xff\x00abc\n")
    (tmp_path / "prompts.txt").write_text("the cat\n")
    assert main(["studio", str(studio_runs[0]), "--rankings", str(binary)]) == 2
    out, err = capsys.readouterr()
    assert "open http" not in out
    assert err == f"lmlab studio: error: {binary}:1: not UTF-8 (byte 0xd0 at column 1)\n", err
    assert main(["rank", str(studio_runs[0]), "--prompts", str(tmp_path / "prompts.txt"),
                 "--judge", "shorter", "--out", str(binary)]) == 2
    assert capsys.readouterr().err == err.replace("lmlab studio:", "lmlab rank:")
    assert binary.read_bytes() == b"\xd0\xff\x00abc\n"


def test_two_processes_appending_big_rankings_to_one_file_never_interleave(tmp_path):
    """The studio and a `lmlab rank` in another process may share a file: append_ranking writes
    each line whole under an exclusive flock."""
    import subprocess
    import sys

    path = tmp_path / "shared.jsonl"
    script = ("import sys\nfrom lmlab.rankings import append_ranking\n"
              "for i in range(30):\n"
              "    append_ranking(sys.argv[1], {'prompt': sys.argv[2], 'completions': [sys.argv[2] * 20000, 'b'],"
              " 'ranking': [0, 1], 'judge': f'{sys.argv[2]}{i}'})\n")
    import lmlab

    # the children import the same lmlab as this test (the source tree or the installed package)
    env = {**os.environ, "PYTHONPATH": str(Path(lmlab.__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), who], env=env) for who in ("x", "y")]
    assert [p.wait(120) for p in procs] == [0, 0]
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["judge"] for r in records) == sorted(f"{w}{i}" for w in "xy" for i in range(30))
    assert all(r["completions"][0] == r["prompt"] * 20000 for r in records)


def test_a_stalled_model_does_not_stall_the_other_pages(studio_runs, tmp_path):  # noqa: F811
    """Model work runs in worker threads: while run 0's model is busy (its lock held here), the
    descent, the other run and the ranking file still answer; run 0's request finishes after."""
    app = create_app(studio_runs, rankings=tmp_path / "r.jsonl")
    busy = app.app.state.runs.get(0).lock
    with running(app) as url:
        with ThreadPoolExecutor(1) as pool:
            busy.acquire()
            try:
                waiting = pool.submit(httpx.post, f"{url}/api/loss", json={"run": 0, "text": "To be"}, timeout=60)
                time.sleep(0.3)
                assert not waiting.done()
                assert httpx.get(f"{url}/api/descent", timeout=10).status_code == 200
                assert httpx.post(f"{url}/api/loss", json={"run": 1, "text": "To be"}, timeout=30).status_code == 200
                assert httpx.get(f"{url}/api/rank/prompts", timeout=10).status_code == 200
                assert not waiting.done()
            finally:
                busy.release()
            assert waiting.result().status_code == 200
