"""The `lmlab` command line end to end on a tiny run: pretrain, sample, predict, finetune, instruct,
inspect-data, chat, --precision bf16 (recorded, kept on resume, used for sampling), bench train's
precision rows, and clear errors with exit status 2."""

from __future__ import annotations

import argparse
import io
import json
import os
import re

import numpy as np
import pytest

from lmlab import checkpoint, ops, trainbench
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
    assert {"current.json", "checkpoints", "metrics.jsonl", "loss.png"} <= names
    names = {p.name for p in checkpoint.current_checkpoint(run / "base").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.safetensors",
            "state.json"} == names


def test_an_omp_num_threads_above_what_threads_takes_is_refused(run, capsys, monkeypatch):
    """OpenMP starts every thread at OMP_NUM_THREADS: OMP_NUM_THREADS=100000 segfaulted at the
    first kernel, 4000000000 (which OpenMP wraps to a negative count, outside this test's reach)
    aborted out of memory. The command line refuses what --threads refuses, in one line, before
    any work. The process's count is set here as OpenMP would have set it from the variable."""
    from lmlab import _core, checks
    before = ops.get_num_threads()
    try:
        for count in (checks.max_threads() + 1, 100_000):
            _core.set_num_threads(count)
            monkeypatch.setenv("OMP_NUM_THREADS", str(count))
            assert main(["sample", str(run / "base"), "--prompt", "t", "--max-new-tokens", "2",
                         "--seed", "1"]) == 2
            out, err = capsys.readouterr()
            assert out == "" and err == (f"lmlab sample: error: OMP_NUM_THREADS='{count}' is "
                                         "not allowed: expected "
                                         f"an integer from 1 to {checks.max_threads()} (4 per "
                                         "core, as --threads takes); lower or unset it\n")
    finally:
        _core.set_num_threads(before)


def test_sample_after_prompt_is_checked_before_training_and_samples_as_lmlab_sample(run, capsys):
    """README: every value is checked before any work. A --prompt for --sample-after that the
    corpus's char tokenizer cannot encode ("Z") is refused before training and leaves no run,
    not after the whole training; a good one prints what `lmlab sample --seed 0` prints."""
    out = run / "sampled"
    shape = ["--corpus", str(run / "corpus.txt"), "--run", str(out), "--n-layer", "1",
             "--n-head", "2", "--n-embd", "16", "--block-size", "48", "--batch-size", "4",
             "--steps", "3", "--eval-every", "0", "--no-progress", "--sample-after", "12"]
    assert main(["pretrain", *shape, "--prompt", "Zoo "]) == 2
    assert "'Z' x1" in capsys.readouterr().err
    assert not out.exists()
    assert main(["pretrain", *shape, "--prompt", "the "]) == 0
    printed = capsys.readouterr().out.split("--- a sample from the trained model ---\n")[1]
    assert main(["sample", str(out), "--prompt", "the ", "--max-new-tokens", "12", "--seed", "0",
                 "--temperature", "0.8"]) == 0
    assert printed == capsys.readouterr().out


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
    # An empty stop string (an unset shell variable: --stop "$STOP") is refused, as the API's is,
    # not taken as no stop string.
    assert main(["sample", str(run / "base"), "--prompt", "the ", "--stop", ""]) == 2
    assert "--stop must be a non-empty string" in capsys.readouterr().err


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
                            [("what is one plus one?", "two."), ("what colour is the sky?", "blue.")] * 5
                            # a prompt that fills the block of 48: its answer is cut off entirely
                            + [("the sky " * 8, "blue.")] * 2))
    assert main(["inspect-data", str(run / "base"), "--data", str(data), "--no-color"]) == 0
    assert "supervised" in capsys.readouterr().out
    assert main(["instruct", str(run / "base"), "--data", str(data), "--out", str(run / "qa"),
                 "--steps", "10", "--eval-every", "5", "--batch-size", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "finished: 10 steps" in out
    # The notes are sentences ("examples no supervised" was the key's name, not one).
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes and all(re.fullmatch(r"note: \d+ training examples (are cut off by the block size|"
                                      r"have no supervised token) \(see lmlab inspect-data\)", line)
                         for line in notes), notes
    assert any("have no supervised token" in line for line in notes)
    config = checkpoint.read_config(run / "qa")
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
    chatted = capsys.readouterr()
    assert "model> " in chatted.out and "not instruct-tuned" not in chatted.err


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


@pytest.mark.parametrize("argv", [["sample", "BASE", "--prompt", "the \u00e9", "--max-new-tokens", "2"],
                                  ["predict", "BASE", "--prompt", "the \u00e9"],
                                  ["pretrain", "--corpus", "CORPUS", "--run", "NEVER", "--steps", "1",
                                   "--sample-after", "2", "--prompt", "the \u00e9"]])
def test_a_prompt_the_tokenizer_cannot_encode_is_named_by_its_flag(run, tmp_path, capsys, argv):
    """'text contains 1 character ... cannot represent' said what was wrong but not which flag
    held the text; the line names --prompt, as a refused setting names its flag."""
    where = {"BASE": str(run / "base"), "CORPUS": str(run / "corpus.txt"),
             "NEVER": str(tmp_path / "never")}
    assert main([where.get(a, a) for a in argv] + ["--no-progress"] * (argv[0] == "pretrain")) == 2
    out, err = capsys.readouterr()
    assert err == (f"lmlab {argv[0]}: error: --prompt contains 1 character (1 distinct) that this "
                   "char tokenizer cannot represent: '\u00e9' x1 (its vocabulary holds only what "
                   "the text it was built from holds)\n"), err
    assert not (tmp_path / "never").exists()


def test_an_empty_output_path_is_refused_in_one_line_naming_its_flag(run, tmp_path, monkeypatch,
                                                                    capsys):
    """predict --png "" (an unset variable) printed the table and drew no chart, without a word;
    rank --out "" said '. is a directory'. Both are refused before any work, naming the flag."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("the cat\n")
    for argv, flag, expected in [
            (["predict", str(run / "base"), "--prompt", "the", "--png", ""], "--png",
             "the PNG file to draw the chart in"),
            (["rank", str(run / "base"), "--prompts", "prompts.txt", "--judge", "shorter",
              "--out", ""], "--out", "the JSONL file to append the rankings to")]:
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and err == (f"lmlab {argv[0]}: error: {flag} '' is not allowed: expected "
                                     f"{expected}; an empty path names none (the current "
                                     "directory is '.')\n"), err
    assert sorted(os.listdir(tmp_path)) == ["prompts.txt"]


def test_a_sub_commands_error_starts_with_its_own_name(capsys):
    """An error a sub-command raised after parsing said 'lmlab bench: error: ...', not the name
    its usage shows ('lmlab bench train')."""
    assert main(["bench", "train", "--steps", "0"]) == 2
    assert capsys.readouterr().err == ("lmlab bench train: error: --steps 0 is not allowed: "
                                       "expected an integer >= 1 and <= 1000000000\n")


def test_bf16_run_records_its_precision_and_keeps_it(run, capsys):
    base = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "48",
            "--batch-size", "4", "--eval-every", "5", "--no-progress"]
    out = str(run / "bf16")
    assert main(["pretrain", "--corpus", str(run / "corpus.txt"), "--run", out, "--steps", "5",
                 "--precision", "bf16", *base]) == 0
    assert checkpoint.read_config(out)["train"]["precision"] == "bf16"
    assert checkpoint.load_model(out)[0].matmul_precision == "bf16"    # sample/predict/chat
    capsys.readouterr()
    # --resume without --precision continues in the run's own bf16, silently; asking for another
    # precision is refused (a resumed run keeps its precision), and nothing changes.
    assert main(["pretrain", "--run", out, "--resume", "--steps", "8", *base]) == 0
    assert "precision" not in capsys.readouterr().err
    assert main(["pretrain", "--run", out, "--resume", "--steps", "10", "--precision", "fp32",
                 *base]) == 2
    err = capsys.readouterr().err
    assert "--precision 'fp32' is not allowed: the run was set up with 'bf16'" in err
    assert checkpoint.read_config(out)["train"]["precision"] == "bf16"
    assert checkpoint.load_training_state(out)[1]["step"] == 8
    # A run derived from it trains in what its own command line says.
    assert main(["finetune", out, "--corpus", str(run / "corpus.txt"), "--out",
                 str(run / "bf16-ft"), "--steps", "2", "--eval-every", "0", "--no-progress",
                 "--sample-tokens", "0", "--precision", "fp32"]) == 0
    assert checkpoint.read_config(run / "bf16-ft")["train"]["precision"] == "fp32"


def test_auto_precision_is_what_ops_resolves(run):
    out = run / "auto"
    assert main(["pretrain", "--corpus", str(run / "corpus.txt"), "--run", str(out), "--steps", "2",
                 "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                 "--batch-size", "2", "--eval-every", "0", "--no-progress"]) == 0
    expected = ops.precision_name(ops.resolve_precision("auto"))
    assert checkpoint.read_config(out)["train"]["precision"] == expected


@pytest.mark.parametrize("verb", ["pretrain", "finetune", "instruct", "dpo", "rlhf"])
def test_bad_precision_exits_2_naming_the_choices(run, capsys, verb):
    args = {"pretrain": ["pretrain"], "finetune": ["finetune", "r", "--corpus", "c", "--out", "o"],
            "instruct": ["instruct", "r", "--out", "o"],
            "dpo": ["dpo", "r", "--rankings", "x", "--out", "o"],
            "rlhf": ["rlhf", "r", "--prompts", "p", "--judge", "shorter", "--out", "o"]}[verb]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--precision", "fp16"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--precision" in err and "'fp32'" in err and "'bf16'" in err


def test_bench_train_measures_each_precision(capsys):
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
            "--batch-size", "2", "--steps", "1", "--warmup", "0", "--threads", "1",
            "--rounds", "1"]
    assert main(["bench", "train", "--impl", "lmlab", "--json", *tiny]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["impl"], r["precision"]) for r in rows] == [("lmlab", "fp32"), ("lmlab", "bf16")]
    assert all(r["tokens_per_s"] > 0 and r["first_loss"] > 0 for r in rows)
    assert main(["bench", "train", "--impl", "lmlab", "--precision", "bf16", *tiny]) == 0
    assert "lmlab    bf16" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train", "--precision", "fp16"])
    assert exc.value.code == 2


def test_speed_ratios_pair_equal_precisions_and_bf16_against_fp32():
    rows = [{"impl": i, "precision": p, "tokens_per_s": t}
            for i, p, t in [("lmlab", "fp32", 60.0), ("lmlab", "bf16", 90.0),
                            ("pytorch", "fp32", 30.0), ("pytorch", "bf16", 45.0)]]
    assert trainbench.speed_ratios(rows) == [("lmlab fp32 / pytorch fp32", 2.0, [2.0]),
                                             ("lmlab bf16 / pytorch bf16", 2.0, [2.0]),
                                             ("lmlab bf16 / pytorch fp32", 3.0, [3.0])]
    assert trainbench.speed_ratios(rows[:2]) == []


def test_speed_ratio_is_the_median_of_the_rounds_ratios():
    """Each round's ratio is between runs that followed one another; a burst that slowed one
    library in one round must not decide the ratio (the ratio of the median rounds would be 4x)."""
    rows = [{"impl": "lmlab", "precision": "fp32", "tokens_per_s": 20.0,
             "round_tokens_per_s": [10.0, 30.0, 20.0]},
            {"impl": "pytorch", "precision": "fp32", "tokens_per_s": 5.0,
             "round_tokens_per_s": [5.0, 30.0, 5.0]}]
    assert trainbench.speed_ratios(rows) == [("lmlab fp32 / pytorch fp32", 2.0, [2.0, 1.0, 4.0])]


def test_bench_train_interleaves_rounds_and_reports_the_median_round(monkeypatch):
    """Every implementation runs once per round, in reversed order every other round; a row is its
    median round (the slower middle one of an even count) with every round's tokens/s."""
    order = []
    speeds = iter([100.0, 10.0, 11.0, 300.0, 200.0, 12.0, 50.0, 13.0])

    def child(spec, threads, isa):
        order.append((spec["impl"], spec["precision"]))
        return {"impl": spec["impl"], "precision": spec["precision"], "tokens_per_s": next(speeds),
                "peak_rss_mib": len(order)}
    monkeypatch.setattr(trainbench, "_child", child)
    monkeypatch.setattr(trainbench, "torch_available", lambda: True)
    rows = trainbench.bench_train(1, 1, 8, 4, 1, 1, impls=("lmlab", "pytorch"), mfu=False,
                                  rounds=4)
    lm, pt = ("lmlab", "fp32"), ("pytorch", "fp32")
    assert order == [lm, pt, pt, lm, lm, pt, pt, lm]
    assert rows[0]["round_tokens_per_s"] == [100.0, 300.0, 200.0, 13.0]
    assert rows[0]["tokens_per_s"] == 100.0 and rows[0]["peak_rss_mib"] == 8
    assert rows[1]["round_tokens_per_s"] == [10.0, 11.0, 12.0, 50.0]
    assert rows[1]["tokens_per_s"] == 11.0
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        trainbench.bench_train(1, 1, 8, 4, 1, 1, rounds=0)


def test_pytorch_autocast_step_trains_in_bf16():
    torch = pytest.importorskip("torch")
    cfg = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2, vocab_size=11)
    x, y = trainbench._batches(cfg, 1)[0]
    losses = {}
    for precision in ("fp32", "bf16"):
        step = trainbench.pytorch_step_fn(cfg, precision=precision)
        losses[precision] = [step(x, y) for _ in range(3)]
    assert losses["bf16"][-1] < losses["bf16"][0]
    assert losses["bf16"] != losses["fp32"]           # autocast really computed in bf16
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=2e-2)
    assert not torch.is_autocast_enabled("cpu")      # the step leaves autocast off after it


def test_dpo_and_rl_references_compute_in_the_policy_precision(run):
    """DPO's reference log-probabilities and RL's KL reference are computed by models set up
    before train() starts: they must already use the run's precision, so the policy starts at
    exactly the reference."""
    from lmlab.dpo import DPOStage
    from lmlab.stage import open_stage

    opened = open_stage("dpo", run / "pref-bf16", {"precision": "bf16", "progress": False},
                        parent=run / "base")
    cfg = opened.train_config()
    model = checkpoint.load_model(run / "base")[0]
    model.matmul_precision = cfg.precision  # as lmlab.dpo.dpo does before building its stage
    assert cfg.precision == model.matmul_precision == "bf16"
    stage = DPOStage(model, checkpoint.load_model(run / "base")[1],
                     [("the cat", " sat.", " blue.")], [], batch_size=1)
    policy = stage._logps(model, stage.train)
    np.testing.assert_array_equal(policy, stage.ref_train)
    model.matmul_precision = "fp32"
    assert not np.array_equal(stage._logps(model, stage.train), stage.ref_train)


def test_chat_asks_again_after_an_unencodable_message(run, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("what is \u2603?\nwhat is one plus one?\n\n"))
    assert main(["chat", str(run / "base"), "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "cannot encode '\u2603'" in out and "type the message without them" in out
    assert "is not instruct-tuned (no chat template)" in err  # a base model: said, not refused
    assert out.count("model> ") == 1  # the second message was answered; the session went on


def test_chat_says_so_when_a_message_is_not_utf8_and_asks_again(run, capsys, monkeypatch):
    """Piped bytes that are not UTF-8 reach Python as lone surrogates: chat named those
    ('cannot encode '\\udce9'') as characters the tokenizer lacks."""
    raw = b"caf\xe9 \xff\nwhat is one plus one?\n\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(raw.decode("utf-8", "surrogateescape")))
    assert main(["chat", str(run / "base"), "--max-new-tokens", "4"]) == 0
    out, _ = capsys.readouterr()
    assert "the message is not UTF-8 text (bytes 0xe9, 0xff); please type it again" in out
    assert "\\udc" not in out and "cannot encode" not in out
    assert out.count("model> ") == 1  # the second message was answered; the session went on


def test_chat_history_keeps_only_text(run, capsys, monkeypatch):
    """A reply holding the template's own tokens goes into the history as its text only, so a
    later turn renders through the template like any message."""
    from lmlab import instruct

    _, tok, _ = checkpoint.load_model(run / "base")
    reply = [tok.special_id("<|user|>"), *tok.encode("two").tolist(), tok.special_id("<|end|>")]
    prompts = []

    def fake_generate(model, ids, max_new_tokens, **kwargs):
        prompts.append(tok.decode(ids))
        return np.asarray(reply, dtype=np.int32)  # respond keeps the stop id (keep_stop)

    monkeypatch.setattr(instruct, "generate", fake_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("one\nthe cat\n\n"))
    assert main(["chat", str(run / "base"), "--history", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.count("model> two") == 2
    assert prompts[1] == ("<|user|>one<|assistant|>two<|end|><|user|>the cat<|assistant|>")


def _every_option(parser, name="lmlab"):
    """(verb, parser, action) for every option of every verb and sub-verb."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                yield from _every_option(sub, f"{name} {verb}")
        elif action.option_strings:
            yield name, parser, action


def test_every_verbs_help_shows_every_default_and_describes_every_option():
    """README: "Each verb has --help, which shows every default". An option whose default is a
    value shows it; one that defaults to None (not given) or a switch says in words what it does."""
    from lmlab.cli import build_parser
    missing = []
    for verb, parser, action in _every_option(build_parser()):
        if action.dest in ("help", "version"):
            continue
        text = parser._get_formatter()._expand_help(action) if action.help else ""
        if not text:
            missing.append(f"{verb} {action.option_strings[0]}: no help")
        elif action.default not in (None, False, "") and "default" not in text:
            if action.nargs != 0:
                missing.append(f"{verb} {action.option_strings[0]}: default {action.default!r} "
                               "not shown")
        if action.nargs == 0 and "(default" in text:
            # A switch has no value to show: "--no-mfu ... (default True)" reads as "skipped
            # unless asked", the opposite of what it does.
            missing.append(f"{verb} {action.option_strings[0]}: a switch showing a default")
    assert not missing, "\n".join(missing)


def test_predict_of_an_empty_prompt_starts_a_document_and_png_goes_where_named(run, tmp_path,
                                                                               capsys):
    """An empty prompt is the start of a document, as for sample; --png PATH writes exactly PATH
    (matplotlib alone would add .png to a name without one)."""
    from lmlab.sample import next_token_distribution
    assert main(["predict", str(run / "base"), "--prompt", "", "--top-k", "3", "--json",
                 "--png", str(tmp_path / "chart")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()[:3]]
    model, tok, _ = checkpoint.load_model(run / "base")
    probs = next_token_distribution(model, np.array([tok.eot_id], np.int32))
    assert [r["id"] for r in rows] == np.argsort(-probs, kind="stable")[:3].tolist()
    assert (tmp_path / "chart").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "chart.png").exists()


def test_predict_png_into_a_folder_is_refused_before_the_table_and_missing_folders_are_made(
        run, tmp_path, capsys):
    """--png naming a folder was refused only after the table was printed, and a PNG in a folder
    not yet there failed ('No such file or directory') where the demo views make it."""
    (tmp_path / "folder").mkdir()
    assert main(["predict", str(run / "base"), "--prompt", "a", "--png",
                 str(tmp_path / "folder")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == (f"lmlab predict: error: cannot write {tmp_path / 'folder'}"
                                         ": it is a directory, not a file")
    chart = tmp_path / "new" / "deeper" / "chart.png"
    assert main(["predict", str(run / "base"), "--prompt", "a", "--png", str(chart)]) == 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_json_with_png_keeps_standard_output_json_lines(run, tmp_path, capsys):
    """--json promises one JSON object per line: with --png, "wrote PATH" went to standard output
    as a line no JSON reader takes; it goes to standard error."""
    chart = tmp_path / "chart.png"
    assert main(["predict", str(run / "base"), "--prompt", "the ", "--top-k", "4", "--json",
                 "--png", str(chart)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 4
    for line in lines:
        assert set(json.loads(line)) == {"token", "id", "probability"}
    assert err == f"wrote {chart}\n" and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_chart_title_shows_the_prompt_as_typed_and_the_end_of_a_long_one(
        run, tmp_path, monkeypatch):
    """The chart's title drew a prompt holding two '$' as mathtext ('x $a$ y' became 'x a y' with
    an italic a), and a prompt longer than the title cut off both ends, hiding the text the next
    token follows. The title shows the prompt's end, spaces made visible as the demo views do."""
    from lmlab import demo_common

    titles = []
    real = demo_common.save_png

    def save_png(fig, path):
        titles.extend(ax.get_title() for ax in fig.axes)
        return real(fig, path)

    monkeypatch.setattr(demo_common, "save_png", save_png)
    from lmlab.model import GPT, GPTConfig
    from lmlab.tokenizer import train_tokenizer
    tok = train_tokenizer("the $cat$ sat. " * 4, "char")
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8))
    checkpoint.save_run(tmp_path / "dollars", gpt, tok, train_config={})
    assert main(["predict", str(tmp_path / "dollars"), "--prompt", "the $cat$ sat", "--top-k",
                 "2", "--png", str(tmp_path / "a.png")]) == 0
    assert re.search(r"(?<!\\)\$", titles[-1]) is None  # every '$' escaped: no mathtext
    assert titles[-1].replace("\\$", "$") == "next token after 'the\u2423$cat$\u2423sat'"
    long_prompt = "what is one plus one? two. " * 10 + "the sky"
    assert main(["predict", str(run / "base"), "--prompt", long_prompt, "--top-k", "2",
                 "--png", str(tmp_path / "b.png")]) == 0
    end = long_prompt[-39:].replace(" ", "\u2423")  # 40 characters shown: an ellipsis and 39
    assert titles[-1] == f"next token after '\u2026{end}'"


def test_predict_chart_draws_at_most_chart_rows_bars(tmp_path, capsys):
    """--top-k N --png drew N bars, 0.4 inch each: every token of an imported GPT-2 (--top-k 50000)
    made a canvas some two million pixels tall (gigabytes), 2,000 bars a chart no one can read.
    The table and JSON list all N; the chart the CHART_ROWS most likely, as --top-k CHART_ROWS
    draws them (the same PNG height), and says so."""
    from lmlab.model import GPT, GPTConfig
    from lmlab.tokenizer import train_tokenizer

    CHART_ROWS = 50  # what predict --help names
    tok = train_tokenizer("the cat sat on the mat. " * 8, "bpe", vocab_size=260)
    assert tok.vocab_size > CHART_ROWS
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8))
    checkpoint.save_run(tmp_path / "bytes", gpt, tok, train_config={})

    def png_height(path):  # the IHDR chunk: width, then height, big-endian
        return int.from_bytes(path.read_bytes()[20:24], "big")

    assert main(["predict", str(tmp_path / "bytes"), "--prompt", "the", "--top-k",
                 str(CHART_ROWS), "--png", str(tmp_path / "some.png"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == CHART_ROWS and err == f"wrote {tmp_path / 'some.png'}\n"
    assert main(["predict", str(tmp_path / "bytes"), "--prompt", "the", "--top-k", "100000",
                 "--png", str(tmp_path / "all.png"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == tok.vocab_size
    assert err == (f"lmlab predict: the chart shows the {CHART_ROWS} most likely of the "
                   f"{tok.vocab_size} tokens listed\nwrote {tmp_path / 'all.png'}\n")
    assert png_height(tmp_path / "all.png") == png_height(tmp_path / "some.png")


def test_predict_png_under_a_file_is_refused_before_the_table(run, tmp_path, capsys):
    """--png a.png/chart.png with a.png a file failed only after the table was printed."""
    (tmp_path / "a.png").write_bytes(b"not a folder")
    chart = tmp_path / "a.png" / "deeper" / "chart.png"
    assert main(["predict", str(run / "base"), "--prompt", "a", "--png", str(chart)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"lmlab predict: error: cannot write {chart}: "
                                 f"{tmp_path / 'a.png'} is a file, not a directory\n")
    assert (tmp_path / "a.png").read_bytes() == b"not a folder"


def test_values_are_checked_before_training_and_paths_of_the_wrong_kind_named(run, tmp_path,
                                                                               capsys):
    out = tmp_path / "never"
    assert main(["pretrain", "--corpus", str(run / "corpus.txt"), "--run", str(out), "--steps", "2",
                 "--sample-after", "-5", "--no-progress"]) == 2
    assert "--sample-after -5 is not allowed: expected an integer >= 0" in capsys.readouterr().err
    assert not out.exists()  # refused before any training
    (tmp_path / "afile").write_text("x")
    assert main(["sample", str(tmp_path / "afile")]) == 2
    assert f"{tmp_path / 'afile'} is a file, not a run directory" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n")
    (tmp_path / "binary.dat").write_bytes(b"\xd0\xff\x00abc")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    for argv, message in [
            (["--prompts", str(prompts), "--out", str(tmp_path)], "is a directory; rankings go to "
                                                                   "a JSONL file"),
            (["--prompts", str(prompts), "--out", str(tmp_path / "no" / "r.jsonl")],
             "the directory " + str(tmp_path / "no") + " does not exist"),
            # A file where the folder should be was said not to exist.
            (["--prompts", str(prompts), "--out", str(prompts / "r.jsonl")],
             f"cannot write {prompts / 'r.jsonl'}: {prompts} is a file, not a directory"),
            # Opening a FIFO to append waited for a reader forever.
            (["--prompts", str(prompts), "--out", str(fifo)],
             f"rankings file {fifo} is not a regular file (a FIFO, device or socket): expected a "
             "JSONL file"),
            (["--prompts", str(tmp_path / "binary.dat"), "--out", str(tmp_path / "r.jsonl")],
             "is not UTF-8 text"),
            (["--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "r.jsonl")],
             "prompts file " + str(tmp_path / "none.txt") + " not found"),
            (["--prompts", str(prompts), "--out", str(tmp_path / "r.jsonl"), "--judge", "word:"],
             "judge 'word:' names no word")]:
        assert main(["rank", str(run / "base"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r.jsonl").exists()


def test_an_empty_run_to_read_is_refused_not_read_as_the_current_directory(run, tmp_path,
                                                                          monkeypatch, capsys):
    """sample "$RUN" with RUN unset sampled whatever run the current directory held (and finetune
    "" --out tuned it), with no word that no run was named; writing there was already refused."""
    monkeypatch.chdir(run / "base")
    for argv in (["sample", "", "--max-new-tokens", "2"],
                 ["finetune", "", "--corpus", str(run / "corpus.txt"), "--out",
                  str(tmp_path / "ft"), "--steps", "1", "--no-progress"],
                 ["export", "", "--to", "hf", str(tmp_path / "hf")]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, (argv, err)
        assert "the run directory is empty ('')" in err, (argv, err)
    assert not (tmp_path / "ft").exists() and not (tmp_path / "hf").exists()


def test_a_streamed_sample_is_cut_where_the_stop_string_starts_as_a_whole_one_is(run, capsys):
    """Streaming shows text as it comes, but not the first characters of a stop string that then
    arrives: the streamed output equals --no-stream's for every stop string and seed."""
    for seed in range(3):
        args = ["sample", str(run / "base"), "--prompt", "t", "--max-new-tokens", "40", "--seed",
                str(seed)]
        assert main(args + ["--no-stream"]) == 0
        text = capsys.readouterr().out
        sampled = text[1:-1]  # between the prompt and the final newline
        assert len(sampled) >= 4
        # Stop strings taken from the sample itself, so each is met, a character at a time.
        for stop in (sampled[len(sampled) // 2:][:2], sampled[-3:]):
            assert main(args + ["--stop", stop]) == 0
            streamed = capsys.readouterr().out
            assert main(args + ["--stop", stop, "--no-stream"]) == 0
            whole = capsys.readouterr().out
            assert text.startswith(whole[:-1] + stop)  # cut where the stop string starts
            assert streamed == whole


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux's /proc")
@pytest.mark.parametrize("argv", [["pretrain", "--corpus", "/proc/self/mem", "--steps", "1"],
                                  ["instruct", "BASE", "--data", "/proc/self/mem"]])
def test_a_file_the_system_cannot_read_is_one_line_naming_it(run, tmp_path, capsys, argv):
    """A read that fails with a plain OSError (EIO here: /proc/self/mem opens but cannot be read
    from offset 0) is an error line naming the file, exit 2, as a missing or unreadable one is;
    it was a traceback."""
    argv = [str(run / "base") if a == "BASE" else a for a in argv]
    out = ["--run" if argv[0] == "pretrain" else "--out", str(tmp_path / "never")]
    assert main(argv + out + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lmlab {argv[0]}: error: ") and "/proc/self/mem" in err, err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "never").exists()


_PIPE_CHILD = """
import argparse, os, sys
from lmlab import cli

def flood(args):  # a verb printing more than any reader takes
    while True:
        print("x" * 1000, flush=True)

def worker_pipe(args):  # a pipe of lmlab's own breaking: not the reader of stdout going away
    raise BrokenPipeError(32, "Broken pipe")

def build():
    parser = argparse.ArgumentParser(prog="lmlab")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("flood").set_defaults(func=flood)
    sub.add_parser("worker").set_defaults(func=worker_pipe)
    return parser

if sys.argv[1] == "flood":
    r, w = os.pipe()
    os.close(r)      # the reader (`| head`) has taken what it wanted and gone
    os.dup2(w, 1)
cli.build_parser = build
sys.exit(cli.main([sys.argv[1]]))
"""


def test_output_into_a_closed_pipe_stops_quietly_as_a_shell_tool_does():
    """`lmlab sample ... | head` printed "error: [Errno 32] Broken pipe" and exited 2; it now ends
    as a process SIGPIPE ends (141) and prints nothing. A broken pipe that is not stdout's reader
    going away is still an error."""
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(ops.__file__)), os.environ.get("PYTHONPATH"))
        if p))
    flood = subprocess.run([sys.executable, "-c", _PIPE_CHILD, "flood"], capture_output=True,
                           text=True, env=env, timeout=60)
    assert flood.returncode == 141 and flood.stderr == ""
    worker = subprocess.run([sys.executable, "-c", _PIPE_CHILD, "worker"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert worker.returncode == 2
    assert worker.stderr.strip() == "lmlab worker: error: [Errno 32] Broken pipe"


# Starts as the console script does (sys.argv[0] "lmlab", then `from lmlab.cli import main`), with
# Ctrl-C arriving while lmlab.cli imports its verbs (argv[1]: "import"), or once main runs the
# verb ("verb").
_CTRL_C_CHILD = """
import importlib.abc, os, signal, sys
when = sys.argv[1]
sys.argv = ["lmlab", "doctor"]

class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lmlab.cli.training":
            os.kill(os.getpid(), signal.SIGINT)
        return None

if when == "import":
    sys.meta_path.insert(0, CtrlC())
from lmlab.cli import main, doctor
if when == "verb":
    def interrupted(args):
        os.kill(os.getpid(), signal.SIGINT)
        signal.pause()  # the KeyboardInterrupt arrives here
    doctor.run_doctor = interrupted
sys.exit(main())
"""


@pytest.mark.parametrize("when", ["import", "verb"])
def test_ctrl_c_while_the_command_line_starts_ends_in_one_line(when):
    """Ctrl-C in the second the command line takes to import and build its parser printed
    Python's KeyboardInterrupt traceback of the import it cut; it ends as Ctrl-C during a verb
    does: one line, exit status 130."""
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(ops.__file__)), os.environ.get("PYTHONPATH"))
        if p))
    child = subprocess.run([sys.executable, "-c", _CTRL_C_CHILD, when], capture_output=True,
                           text=True, env=env, timeout=60)
    assert child.returncode == 130 and child.stderr == "\nlmlab: interrupted\n", child.stderr


@pytest.mark.parametrize("argv, command, usage_flag", [
    (["reward", "r", "--out", "o", "--rankings", "x.jsonl", "--resume"], "lmlab reward", "--l2"),
    (["bench", "train", "--foo"], "lmlab bench train", "--no-mfu"),
    (["sample", "r", "--temprature", "0.5"], "lmlab sample", "--temperature"),
])
def test_an_unknown_flag_is_refused_with_the_commands_own_usage(argv, command, usage_flag, capsys):
    """argparse hands a sub-command's unknown arguments to the top-level parser, whose usage
    ('lmlab [-h] [--version] COMMAND ...') names none of the command's flags."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"{command}: error: unrecognized arguments: {argv[-1] if argv[-1] != '0.5' else '--temprature 0.5'}" in err
    assert usage_flag in err and "COMMAND ..." not in err
