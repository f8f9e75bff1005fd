"""Instruct tuning: the chat template, the response-only loss mask, data checks, the built-in
dataset, and that tuning teaches a model to answer and stop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmlab import instruct, metrics
from lmlab.instruct import (END, InstructStage, batch_arrays, build_examples,
                            builtin_instruct_dataset, evaluate_instruct, inspect_examples, render)
from lmlab.model import GPT, GPTConfig
from lmlab.tokenizer import train_tokenizer
from lmlab.train import TrainConfig, train

QA = [("what is one plus one?", "two."), ("what is two plus two?", "four."),
      ("what colour is the sky?", "blue."), ("what colour is grass?", "green."),
      ("what is the opposite of up?", "down."), ("what is the opposite of hot?", "cold.")]
CONVS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA]
ALPHABET = "abcdefghijklmnopqrstuvwxyz ?.,"


def tiny(block_size=48, seed=0):
    tok = train_tokenizer(ALPHABET * 3, "char")
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32)
    return tok, GPT(cfg, seed=seed)


def test_render_supervises_exactly_the_response_and_end():
    tok, _ = tiny()
    ids, mask = render(tok, CONVS[0])
    text_ids = tok.encode("two.")
    sup = ids[mask]
    assert sup.tolist() == text_ids.tolist() + [tok.special_id(END)]
    # Everything before the response (user marker, prompt, assistant marker) is unsupervised.
    assert not mask[: len(ids) - len(sup)].any()
    gen, _ = render(tok, CONVS[0][:1], add_generation_prompt=True)
    assert gen[-1] == tok.special_id("<|assistant|>")


def test_masked_gradient_equals_sum_over_response_tokens_alone():
    tok, model = tiny()
    examples, _ = build_examples(CONVS[:3], tok, 48)
    x, y, mask = batch_arrays(examples, 48, tok.eot_id)
    n = mask.sum()
    model.zero_grad()
    model.forward(x, y)
    model.backward((mask / n).astype(np.float32))
    masked = model.grads.copy()
    # Reference: the gradient of each supervised position on its own, added up in float64.
    reference = np.zeros(model.grads.shape, dtype=np.float64)
    for b, t in zip(*np.nonzero(mask)):
        one = np.zeros(mask.shape, dtype=np.float32)
        one[b, t] = 1.0 / n
        model.zero_grad()
        model.forward(x, y)
        model.backward(one)
        reference += model.grads
    np.testing.assert_allclose(masked, reference, rtol=1e-4, atol=1e-6)


def test_prompt_targets_contribute_exactly_nothing():
    tok, model = tiny()
    examples, _ = build_examples(CONVS[:3], tok, 48)
    x, y, mask = batch_arrays(examples, 48, tok.eot_id)
    w = (mask / mask.sum()).astype(np.float32)
    model.zero_grad()
    _, losses = model.forward(x, y)
    model.backward(w)
    g1 = model.grads.copy()
    # Change every unsupervised target: the gradient must not change by a single bit.
    y2 = np.where(mask, y, (y + 5) % tok.vocab_size).astype(np.int32)
    model.zero_grad()
    model.forward(x, y2)
    model.backward(w)
    assert np.array_equal(g1, model.grads)


def test_empty_mask_is_refused_with_reason():
    tok, _ = tiny(block_size=8)
    long = [[{"role": "user", "content": "a very long prompt that fills the block"},
             {"role": "assistant", "content": "x"}]]
    examples, problems = build_examples(long, tok, 8)
    assert problems["truncated"] == [0] and problems["no_supervised"] == [0]
    with pytest.raises(ValueError, match="no supervised token"):
        InstructStage(examples, examples, 2, 8, tok.eot_id, 0)


def test_unencodable_and_truncated_examples_are_reported():
    tok, _ = tiny(block_size=20)
    convs = CONVS[:2] + [[{"role": "user", "content": "Ünïcode?"}, {"role": "assistant", "content": "no"}]]
    view = inspect_examples(tok, convs, 20, n=2, color=False)
    assert "supervised" in view and "cannot encode" in view and "cut off" in view


def test_inspect_data_shows_a_truncated_example_s_real_length_and_the_cut():
    tok, _ = tiny(block_size=20)
    full = len(render(tok, CONVS[0])[0])
    assert full > 21
    first = inspect_examples(tok, CONVS[:1], 20, n=1, color=False).splitlines()[0]
    assert first.startswith(f"example #1: {full} tokens, TRUNCATED to its first 21 by block "
                            "size 20, "), first
    whole = inspect_examples(tok, CONVS[:1], 48, n=1, color=False).splitlines()[0]
    assert whole.startswith(f"example #1: {full} tokens, ") and "TRUNCATED" not in whole


def test_inspect_data_shows_characters_that_byte_level_tokens_split():
    """A character split across byte-level BPE tokens (an accent, an emoji) was shown as one
    U+FFFD per token; it is shown once, whole, and bytes a cut leaves without their character as
    <0xF0>."""
    tok = train_tokenizer(ALPHABET * 3, "bpe", vocab_size=300)  # no merges for é, ü or 🙂
    conv = [[{"role": "user", "content": "what is café?"},
             {"role": "assistant", "content": "über 🙂."}]]
    ids = render(tok, conv[0])[0]
    assert sum(tok.decode([i]) == "\ufffd" for i in ids) >= 8  # two tokens each, four for 🙂
    view = inspect_examples(tok, conv, 64, n=1, color=False).splitlines()[1]
    assert view == ("  <|user|>what is caf{é:2 tokens}?<|assistant|>"
                    "[{ü:2 tokens}][b][e][r][ ][{🙂:4 tokens}][.][<|end|>]"), view
    # Cut inside the emoji's four bytes: what is left of it is shown as its bytes.
    emoji_at = next(k for k in range(len(ids)) if tok.decode(ids[:k + 1]).endswith("über \ufffd"))
    cut = inspect_examples(tok, conv, emoji_at, n=1, color=False).splitlines()[1]
    assert cut.endswith("[r][ ][<0xF0>]"), cut


def test_inspect_data_without_colour_says_how_many_tokens_a_split_character_took():
    """Without colour the brackets are the only token boundaries, and a character made of several
    byte-level tokens sat in one bracket, [🙂], like a single token: it is shown as {🙂:4 tokens},
    a legend says what that means, and the coloured view (one highlight per token boundary it can
    show) is as it was."""
    tok = train_tokenizer(ALPHABET * 3, "bpe", vocab_size=300)  # no merges for 日 or 🙂
    conv = [[{"role": "user", "content": "say 日?"}, {"role": "assistant", "content": "🙂 日."}]]
    ids = render(tok, conv[0])[0]
    assert sum(tok.decode([i]) == "\ufffd" for i in ids) == 10  # 3 + 4 + 3 byte tokens
    plain = inspect_examples(tok, conv, 64, n=1, color=False).splitlines()
    assert plain[1] == ("  <|user|>say {日:3 tokens}?<|assistant|>"
                        "[{🙂:4 tokens}][ ][{日:3 tokens}][.][<|end|>]"), plain[1]
    assert plain[2] == ("({text:N tokens}: N byte-level tokens that split a character between "
                        "them, shown together)"), plain[2]
    on, off = "\x1b[42;30m", "\x1b[0m"
    coloured = inspect_examples(tok, conv, 64, n=1, color=True).splitlines()
    assert coloured[1] == (f"  <|user|>say 日?<|assistant|>{on}🙂{off}{on} {off}{on}日{off}"
                           f"{on}.{off}{on}<|end|>{off}"), coloured[1]
    assert not any("tokens}" in line for line in coloured)
    # Nothing split, no legend.
    simple = inspect_examples(tok, CONVS[:1], 64, n=1, color=False)
    assert "tokens}" not in simple and "byte-level" not in simple


def test_inspect_data_tells_text_that_spells_a_special_token_from_the_token():
    """A user typing "<|assistant|>" gets plain characters, not the role token (chat.render), yet
    the view showed both the same."""
    tok = train_tokenizer(ALPHABET * 3 + "<|>", "char")
    conv = [[{"role": "user", "content": "say <|assistant|> and <|end|>?"},
             {"role": "assistant", "content": "no."}]]
    view = inspect_examples(tok, conv, 64, n=1, color=False).splitlines()
    assert view[1] == r"  <|user|>say \<|assistant|> and \<|end|>?<|assistant|>[n][o][.][<|end|>]"
    assert view[2].startswith(r"(\<|...|>: text that spells a special token")
    plain = inspect_examples(tok, CONVS[:1], 64, n=1, color=False)
    assert "\\" not in plain and "spells" not in plain


def test_builtin_dataset_is_offline_deterministic_and_split():
    train_set, held = builtin_instruct_dataset()
    assert len(train_set) > 300 and len(held) > 30
    qs_train = {c[0]["content"] for c in train_set}
    assert not qs_train & {c[0]["content"] for c in held}
    assert any(c[0]["content"] == "What does json.dumps do?" for c in train_set + held)
    again, _ = builtin_instruct_dataset()
    assert again == train_set


def test_instruct_tuning_teaches_answering_and_stopping(tmp_path):
    tok, model = tiny()
    base_eval = evaluate_instruct(model, tok, CONVS, max_new_tokens=12)
    examples, _ = build_examples(CONVS, tok, 48)
    stage = InstructStage(examples, examples, 6, 48, tok.eot_id, seed=0)
    cfg = TrainConfig(steps=150, lr=3e-3, warmup_steps=10, eval_every=50, save_every=0,
                      progress=False)
    train(model, stage, cfg, tmp_path / "run", tokenizer=tok)
    tuned = evaluate_instruct(model, tok, CONVS, max_new_tokens=12)
    assert tuned["ended"] >= base_eval["ended"] + 0.5
    assert tuned["first_words_match"] >= base_eval["first_words_match"] + 0.5


def test_unknown_builtin_dataset_named():
    with pytest.raises(ValueError, match="python-qa"):
        instruct.load_instruct_data("builtin:nope")


def _write_jsonl(path, rows):
    """rows: dicts as JSON lines, None as a blank line."""
    path.write_text("".join("\n" if r is None else json.dumps(r) + "\n" for r in rows))
    return str(path)


BAD = {"prompt": "\u00dcn\u00efcode?", "response": "no"}  # not in the tiny tokenizer's alphabet


def test_inspect_data_checks_every_conversation_and_names_file_lines(tmp_path):
    """Held-out conversations (every tenth, from the first) are checked too, and problems are named
    by their line in the file, blank lines counted."""
    tok, _ = tiny()
    rows = [BAD, {"prompt": QA[0][0], "response": QA[0][1]}, None, BAD,
            *({"prompt": q, "response": a} for q, a in QA[1:])]
    convs, labels = instruct.instruct_dataset(_write_jsonl(tmp_path / "qa.jsonl", rows))
    assert labels[:3] == ["line 1", "line 2", "line 4"] and len(convs) == 2 + len(QA)
    view = inspect_examples(tok, convs, 48, n=1, color=False, labels=labels)
    assert view.splitlines()[0].startswith("example line 2: ")
    assert "2 contain text the tokenizer cannot encode (skipped): line 1, line 4" in view
    assert f"{len(convs)} examples" in view


def test_instruct_with_no_scorable_held_out_conversation_measures_no_validation_loss(tmp_path,
                                                                                     capsys):
    """A loss over no token is not 0.0: with every held-out conversation unencodable, the run logs
    no validation loss, returns None for it, and says why."""
    import lmlab
    (tmp_path / "corpus.txt").write_text(ALPHABET * 40)
    lmlab.pretrain(str(tmp_path / "corpus.txt"), tmp_path / "base", steps=2, n_layer=1, n_head=1,
                   n_embd=8, block_size=48, batch_size=2, progress=False)
    data = _write_jsonl(tmp_path / "qa.jsonl", [BAD] + [{"prompt": q, "response": a} for q, a in QA])
    model = lmlab.instruct(tmp_path / "base", data, out=tmp_path / "qa", steps=3, batch_size=2,
                           eval_every=1, progress=False)
    assert model.result.val_loss is None
    assert model.result.steps_done == 3 and np.isfinite(model.result.final_loss)
    assert not any("val_loss" in row for row in metrics.read_metrics(tmp_path / "qa"))
    assert "no held-out conversation (1 held out) can be scored" in capsys.readouterr().err


def test_a_dataset_the_parent_cannot_encode_is_refused_naming_the_characters(tmp_path, capsys):
    """When no training conversation can be encoded by the parent's char tokenizer, the refusal
    says so and names the characters; it used to say every response was empty or cut off by the
    block size, which sent a student to the wrong setting. No run is written."""
    from lmlab.cli import main
    (tmp_path / "corpus.txt").write_text(ALPHABET * 40)
    assert main(["pretrain", "--corpus", str(tmp_path / "corpus.txt"), "--run",
                 str(tmp_path / "base"), "--steps", "1", "--n-layer", "1", "--n-head", "1",
                 "--n-embd", "8", "--block-size", "48", "--batch-size", "2",
                 "--no-progress"]) == 0
    capsys.readouterr()
    data = _write_jsonl(tmp_path / "qa.jsonl", [BAD, {"prompt": "caf\u00e9?", "response": "no"},
                                                {"prompt": "ok?", "response": "\u00fcber"}])
    assert main(["instruct", str(tmp_path / "base"), "--data", data, "--out",
                 str(tmp_path / "qa"), "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    # line 1 is held out (every tenth conversation, from the first): two train
    assert "none of its 2 training conversations" in err and "cannot encode" in err, err
    assert "'\u00e9' x1" in err and "'\u00fc' x1" in err, err
    assert "inspect-data" in err and "empty or cut off" not in err, err
    assert not (tmp_path / "qa").exists()


@pytest.mark.parametrize("path", ["respond", "Model.generate", "lmlab sample"])
def test_an_answer_outgrowing_the_block_is_read_as_the_assistant_s_turn(path, tmp_path,
                                                                        monkeypatch, capsys):
    """Every way a chat run answers slides its window as a turn of the template. Block 16, the
    prompt "what is one plus one?" (21 characters) as a user turn, cut to <|user|> + its last 14
    characters + <|assistant|>. Written out by hand: after k generated tokens the model reads
    <|user|> + the context's last 15 tokens while those still hold the <|assistant|> header
    (k <= 14); from then on <|assistant|> + the answer's last 15 tokens. (A plain slide would
    have read 16 tokens with no role token once the header slid out.)"""
    from lmlab import api
    from lmlab.chat import TEMPLATE
    from lmlab.checkpoint import save_run
    from lmlab.cli import main

    tok, model = tiny(block_size=16)
    tok.chat_template = dict(TEMPLATE)
    user, asst = tok.special_id("<|user|>"), tok.special_id("<|assistant|>")
    ends = [tok.special_id(t) for t in ("<|end|>", "<|endoftext|>")]
    question = "what is one plus one?"
    fed = []
    forward = GPT.forward

    def record(self, tokens, *args, **kwargs):
        fed.append(np.asarray(tokens)[0].tolist())
        logits, loss = forward(self, tokens, *args, **kwargs)
        logits[..., ends] = -1e9                   # the answer never ends: it outgrows the block
        return logits, loss

    monkeypatch.setattr(GPT, "forward", record)
    n = 30
    if path == "respond":
        instruct.respond(model, tok, [{"role": "user", "content": question}], max_new_tokens=n)
    else:
        save_run(tmp_path / "run", model, tok, train_config={})
        if path == "Model.generate":
            api.load(tmp_path / "run").generate(question, max_new_tokens=n, temperature=0)
        else:
            assert main(["sample", str(tmp_path / "run"), "--prompt", question,
                         "--max-new-tokens", str(n), "--temperature", "0", "--no-stream"]) == 0
            capsys.readouterr()
    prompt = [user] + tok.encode(question[-14:]).tolist() + [asst]
    assert fed[0] == prompt                        # the prompt, cut to the block
    steps = [w for w in fed[1:] if len(w) > 1]     # the cache fed one token until the first slide
    generated = [w[-1] for w in fed[1:]]           # each step's newest token
    assert len(steps) == n - 1 and all(len(w) == 16 for w in steps)
    for k, window in enumerate(steps, start=1):
        context = prompt + generated[:k]
        if k <= 14:
            assert window == [user] + context[-15:], k
        else:
            assert window == [asst] + generated[:k][-15:], k


def _scripted(monkeypatch, tok, script):
    """Make every GPT emit `script` (token names or characters), one per forward call (one call
    per generated token), and keep emitting "a" after it."""
    ids = [tok.token_id(t) for t in script]
    step = []

    def forward(self, tokens, *args, **kwargs):
        want = ids[len(step)] if len(step) < len(ids) else tok.token_id("a")
        step.append(want)
        logits = np.zeros(np.shape(tokens) + (tok.vocab_size,), np.float32)
        logits[..., want] = 10.0
        return logits, None

    monkeypatch.setattr(GPT, "forward", forward)


# (chat template?, what the model emits after "ab", the reply's text, ended, stop): <|endoftext|>
# ends the model's text, so the reply stops there whether or not the run has a template, yet it has
# not ended as an answer; <|end|> and the model's own end-of-text token ("z" declared as one here,
# as an import declares "</s>") end the answer; a reply that runs into the limit has neither.
STOPS = [(False, "<|endoftext|>", "ab", False, "<|endoftext|>"),
         (True, "<|endoftext|>", "ab", False, "<|endoftext|>"),
         (False, "<|end|>", "ab", True, "<|end|>"),
         (True, "<|end|>", "ab", True, "<|end|>"),
         (True, "z", "ab", True, "z"),
         (True, "c", "abcdefgh", False, None)]


@pytest.mark.parametrize("template, end, text, ended, stop", STOPS)
def test_a_reply_stops_at_the_end_of_the_model_s_text_and_says_why(monkeypatch, template, end,
                                                                   text, ended, stop):
    from lmlab.chat import TEMPLATE

    tok, model = tiny()
    tok.chat_template = dict(TEMPLATE) if template else None
    tok.eos_tokens = ("z",)
    _scripted(monkeypatch, tok, ["a", "b", end, "d", "e", "f", "g", "h"])
    messages = [{"role": "user", "content": "what is one plus one?"}]
    assert instruct.respond(model, tok, messages, max_new_tokens=8) == (text, ended, stop)


def test_evaluate_instruct_counts_a_reply_that_ends_the_text_as_not_ended(monkeypatch):
    tok, model = tiny()
    """The base model's way of stopping (its text ends) is not an answer that ended: the contrast
    with an instruct-tuned one that the notebook and benchmarks/stages_eval.py draw. The reply is
    the text before it ("two", the reference's first word), not the next document's."""
    _scripted(monkeypatch, tok, ["t", "w", "o", "<|endoftext|>", "o", "<|end|>"])
    assert evaluate_instruct(model, tok, CONVS[:1], max_new_tokens=12) == {
        "n": 1, "ended": 0.0, "first_words_match": 1.0}


@pytest.mark.parametrize("template", [False, True])
def test_chat_and_sample_stop_where_the_model_ends_its_text(template, tmp_path, monkeypatch,
                                                            capsys):
    """`lmlab chat` on a base run went on past <|endoftext|> into a new document until the token
    limit (and marked the reply cut); a chat run's `lmlab sample` and Model.generate did too."""
    import io

    from lmlab import api
    from lmlab.chat import TEMPLATE
    from lmlab.checkpoint import save_run
    from lmlab.cli import main

    tok, model = tiny()
    tok.chat_template = dict(TEMPLATE) if template else None
    save_run(tmp_path / "run", model, tok, train_config={})
    script = ["t", "w", "o", "<|endoftext|>", "f", "o", "u", "r"]
    _scripted(monkeypatch, tok, script)
    monkeypatch.setattr("sys.stdin", io.StringIO("what is one plus one?\n\n"))
    assert main(["chat", str(tmp_path / "run"), "--max-new-tokens", "8"]) == 0
    assert "model> two\n" in capsys.readouterr().out
    _scripted(monkeypatch, tok, script)
    got = api.load(tmp_path / "run").generate("what is", max_new_tokens=8, temperature=0)
    assert got == "two"
    # The limit is still marked as a cut.
    _scripted(monkeypatch, tok, ["t", "w", "o"])
    monkeypatch.setattr("sys.stdin", io.StringIO("what is one plus one?\n\n"))
    assert main(["chat", str(tmp_path / "run"), "--max-new-tokens", "8"]) == 0
    assert "model> twoaaaaa [...]\n" in capsys.readouterr().out
