"""The `lmlab` command line end to end on a tiny run: pretrain, sample, predict, finetune, instruct,
inspect-data, chat, and clear errors with exit status 2."""

from __future__ import annotations

import io
import json

import pytest

from lmlab.cli import main

TEXT = "what is one plus one? two. what colour is the sky? blue. the cat sat on the mat. " * 30


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(TEXT)
    rc = main(["pretrain", "--corpus", str(root / "corpus.txt"), "--run", str(root / "base"),
               "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "48",
               "--batch-size", "4", "--steps", "30", "--eval-every", "15", "--no-progress"])
    assert rc == 0
    return root


def test_pretrain_leaves_a_complete_run(run):
    names = {p.name for p in (run / "base").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.safetensors",
            "state.json", "metrics.jsonl", "loss.png"} <= names


def test_sample_is_reproducible_by_seed(run, capsys):
    args = ["sample", str(run / "base"), "--prompt", "the ", "--max-new-tokens", "20", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("the ")
    assert main(args[:-1] + ["4"]) == 0
    assert capsys.readouterr().out != first


def test_sample_stop_string_cuts_the_output(run, capsys):
    assert main(["sample", str(run / "base"), "--prompt", "the ", "--max-new-tokens", "40",
                 "--temperature", "0", "--stop", " "]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the ") and " " not in out[len("the "):].rstrip("\n")


def test_predict_table_and_json(run, capsys):
    assert main(["predict", str(run / "base"), "--prompt", "the ", "--top-k", "5", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    probs = [r["probability"] for r in rows]
    assert len(rows) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    png = run / "next.png"
    assert main(["predict", str(run / "base"), "--prompt", "the ", "--png", str(png)]) == 0
    assert "next token after" in capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_finetune_reports_both_corpora(run, capsys):
    (run / "new.txt").write_text("the sky is blue. the mat is one. " * 30)
    assert main(["finetune", str(run / "base"), "--corpus", str(run / "new.txt"), "--out",
                 str(run / "ft"), "--steps", "10", "--eval-every", "5", "--no-progress",
                 "--sample-tokens", "10"]) == 0
    out = capsys.readouterr().out
    assert "new corpus val loss" in out and "parent corpus val loss" in out
    assert "--- parent ---" in out and "--- finetuned ---" in out


def test_instruct_inspect_and_chat(run, capsys, monkeypatch):
    data = run / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in
                            [("what is one plus one?", "two."), ("what colour is the sky?", "blue.")] * 5))
    assert main(["inspect-data", str(run / "base"), "--data", str(data), "--no-color"]) == 0
    assert "supervised" in capsys.readouterr().out
    assert main(["instruct", str(run / "base"), "--data", str(data), "--out", str(run / "qa"),
                 "--steps", "10", "--eval-every", "5", "--batch-size", "4", "--no-progress"]) == 0
    assert "finished: 10 steps" in capsys.readouterr().out
    config = json.loads((run / "qa" / "config.json").read_text())
    assert config["train"]["chat_template"]["end"] == "<|end|>"
    # An instruct-tuned run answers a prompt through its template; --raw continues plain text.
    assert main(["sample", str(run / "qa"), "--prompt", "what is one plus one?",
                 "--max-new-tokens", "8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("what is one plus one?\n> ")
    assert main(["sample", str(run / "qa"), "--prompt", "the ", "--raw", "--max-new-tokens", "8",
                 "--seed", "0"]) == 0
    assert not capsys.readouterr().out.startswith("the \n> ")
    monkeypatch.setattr("sys.stdin", io.StringIO("what is one plus one?\n\n"))
    assert main(["chat", str(run / "qa"), "--max-new-tokens", "8"]) == 0
    assert "model> " in capsys.readouterr().out


def test_errors_exit_2_with_a_message(run, capsys):
    assert main(["sample", str(run / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert main(["pretrain", "--corpus", str(run / "corpus.txt"), "--run", str(run / "base"),
                 "--steps", "5", "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    (run / "bad.txt").write_text("ZZZ unknown " * 20)
    assert main(["finetune", str(run / "base"), "--corpus", str(run / "bad.txt"), "--out",
                 str(run / "bad"), "--steps", "2", "--no-progress"]) == 2
    assert "cannot encode" in capsys.readouterr().err
