"""Hugging Face interop: `lmlab export --to hf` loads in transformers and computes what lmlab
computes; `lmlab import` turns a transformers GPT-2 checkpoint into a run that gives the same tensors
back and trains; what lmlab's GPT cannot represent is refused in one line, exit 2.

transformers and torch are the oracle where installed (tests needing them skip otherwise); the
refusals run on directories written by lmlab's own export and need neither.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lmlab import checkpoint, hf_export
from lmlab.checkpoint import load_model, read_config
from lmlab.cli import main
from lmlab.hf import LM_HEAD, TANH_GELU_NAMES, name_map
from lmlab.instruct import instruct_tune, render
from lmlab.pretrain import pretrain
from lmlab.reference import gelu_forward

SHAKESPEARE = Path(__file__).resolve().parents[1] / "python/lmlab/corpora/shakespeare.txt"
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_every=0,
            save_every=0, progress=False)
CONVERSATIONS = [
    [{"role": "user", "content": "What is a king?"}],
    [{"role": "system", "content": "Speak plainly."}, {"role": "user", "content": "Who art thou?"},
     {"role": "assistant", "content": "A player, my lord."}, {"role": "user", "content": "Why?"}],
]


def _transformers():
    pytest.importorskip("torch", reason="PyTorch is not installed (transformers needs it here)")
    return pytest.importorskip("transformers", reason="transformers is not installed")


def _corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "bard.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:30000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory)


@pytest.fixture(scope="module", params=["char", "bpe"])
def run(request, tmp_path_factory, corpus):
    """A tiny run pretrained for a few steps, with a char or a byte-level BPE tokenizer."""
    out = tmp_path_factory.mktemp(f"run-{request.param}") / "run"
    size = {"vocab_size": 300} if request.param == "bpe" else {}  # char: one id per character
    pretrain(str(corpus), out, tokenizer=request.param, steps=30, **size, **TINY)
    return out


@pytest.fixture(scope="module")
def instruct_run(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("instruct")
    pretrain(str(corpus), d / "base", tokenizer="bpe", vocab_size=300, steps=5, **TINY)
    data = d / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n"
                            for w in ("yes", "no", "aye", "nay", "good", "well")), encoding="utf-8")
    instruct_tune(d / "base", str(data), d / "qa", steps=2, lr=1e-3, warmup_steps=1, batch_size=2,
                  eval_every=0, save_every=0, progress=False)
    return d / "qa"


def _export(run, out) -> Path:
    assert main(["export", str(run), "--to", "hf", str(out)]) == 0
    return out


def _torch_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids, np.int64)[None])).logits[0].numpy()


def _safetensors(path) -> dict:
    from safetensors.numpy import load_file
    return load_file(str(path))


# -- export -----------------------------------------------------------------------------------------

def test_export_loads_in_transformers_with_lmlab_logits_and_tokens(run, tmp_path):
    tf = _transformers()
    out = _export(run, tmp_path / "hf")
    hf_model = tf.AutoModelForCausalLM.from_pretrained(out)
    hf_tok = tf.AutoTokenizer.from_pretrained(out)
    model, tok, _ = load_model(run)
    text = "MENENIUS:\nWhat say you?\n"
    ids = tok.encode(text)
    # The same tokenizer in both: same ids, and decoding gives the text back.
    assert hf_tok(text)["input_ids"] == ids.tolist()
    assert hf_tok.decode(ids.tolist()) == text
    logits, _ = model.forward(ids[None].astype(np.int32))
    # Both fp32; different summation orders leave differences of a few ulps of the logits.
    np.testing.assert_allclose(_torch_logits(hf_model, ids), logits[0], rtol=0, atol=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert (config["n_positions"], config["vocab_size"]) == (model.config.block_size, tok.vocab_size)
    assert config["tie_word_embeddings"] and LM_HEAD not in _safetensors(out / "model.safetensors")


def test_a_bf16_trained_run_exports_its_fp32_parameters(corpus, tmp_path):
    """The export of a run trained in bf16 holds its fp32 parameters bit for bit: transformers'
    fp32 logits are lmlab's in fp32 (its own bf16 products round, as the README says)."""
    tf = _transformers()
    run = tmp_path / "run"
    pretrain(str(corpus), run, tokenizer="char", steps=3, precision="bf16", **TINY)
    out = _export(run, tmp_path / "hf")
    model, tok, _ = load_model(run)
    assert model.matmul_precision == "bf16"
    stored = _safetensors(out / "model.safetensors")
    for name, hname, _, transposed in name_map(model.config):
        want = model.named_parameters()[name]
        assert np.array_equal(stored[hname], want.T if transposed else want), name
    ids = tok.encode("MENENIUS:\nWhat say you?\n")
    model.matmul_precision = "fp32"
    logits, _ = model.forward(ids[None].astype(np.int32))
    hf_model = tf.AutoModelForCausalLM.from_pretrained(out)
    np.testing.assert_allclose(_torch_logits(hf_model, ids), logits[0], rtol=0, atol=1e-4)


def test_the_exported_tokenizer_reads_unicode_whitespace_and_unseen_characters_as_lmlab(run,
                                                                                       tmp_path):
    """Whitespace runs, CRLF, accents, CJK and emoji, and (char) characters the vocabulary lacks,
    which both read as U+FFFD: the same ids and the same text back in transformers."""
    tf = _transformers()
    hf_tok = tf.AutoTokenizer.from_pretrained(_export(run, tmp_path / "hf"))
    _, tok, _ = load_model(run)
    for text in ("  \t\t  x\n\n\n", "a\r\nb   c\u00a0d", "café naïve 東京 🙂", " ROMEO ~ ^ `"):
        ids = tok.encode(text, unknown="replace")
        assert hf_tok(text)["input_ids"] == ids.tolist(), text
        assert hf_tok.decode(ids.tolist()) == tok.decode(ids), text
        if not tok.unknown_chars(text):
            assert tok.decode(ids) == text


def test_a_finetune_with_frozen_layers_exports_with_lmlab_logits(instruct_run, corpus, tmp_path):
    """Fine-tuned with the first layer and the embeddings frozen: the export holds the parent's
    frozen tensors bit for bit and the new ones, and transformers computes lmlab's logits."""
    tf = _transformers()
    ft = tmp_path / "ft"
    assert main(["finetune", str(instruct_run), "--corpus", str(corpus), "--out", str(ft),
                 "--steps", "2", "--warmup-steps", "1", "--eval-every", "0", "--no-progress",
                 "--batch-size", "2", "--freeze-layers", "1", "--freeze-embeddings"]) == 0
    parent = _safetensors(_export(instruct_run, tmp_path / "parent") / "model.safetensors")
    out = _export(ft, tmp_path / "hf")
    tensors = _safetensors(out / "model.safetensors")
    frozen = ("transformer.wte.", "transformer.wpe.", "transformer.h.0.")
    for name, tensor in tensors.items():
        assert np.array_equal(tensor, parent[name]) == name.startswith(frozen), name
    model, tok, _ = load_model(ft)
    ids = tok.encode("MENENIUS:\nWhat say you?\n")
    logits, _ = model.forward(ids[None].astype(np.int32))
    hf_model = tf.AutoModelForCausalLM.from_pretrained(out)
    np.testing.assert_allclose(_torch_logits(hf_model, ids), logits[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", TANH_GELU_NAMES)
def test_the_gelu_names_lmlab_writes_and_accepts_are_its_gelu(name):
    _transformers()
    import torch
    from transformers.activations import ACT2FN
    x = np.linspace(-6, 6, 1001)
    got = ACT2FN[name](torch.tensor(x, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, gelu_forward(x), rtol=0, atol=1e-9)


def test_greedy_generate_in_transformers_equals_lmlab_sample(run, tmp_path, capsys):
    tf = _transformers()
    import torch
    out = _export(run, tmp_path / "hf")
    hf_model = tf.AutoModelForCausalLM.from_pretrained(out)
    hf_tok = tf.AutoTokenizer.from_pretrained(out)
    prompt, n = "ROMEO:\n", 24
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", str(n), "--no-stream"]) == 0
    lmlab_text = capsys.readouterr().out[len(prompt):-1]
    ids = torch.tensor([hf_tok(prompt)["input_ids"]])
    new = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            do_sample=False)[0, ids.shape[1]:].tolist()
    if new and new[-1] == hf_tok.eos_token_id:
        new = new[:-1]  # lmlab stops at <|endoftext|> without printing it
    assert lmlab_text and hf_tok.decode(new) == lmlab_text


def test_chat_template_gives_the_prompt_lmlab_trains_on(instruct_run, tmp_path, capsys):
    tf = _transformers()
    import torch
    out = _export(instruct_run, tmp_path / "hf")
    hf_tok = tf.AutoTokenizer.from_pretrained(out)
    _, tok, _ = load_model(instruct_run)
    for messages in CONVERSATIONS + [CONVERSATIONS[1] + [{"role": "assistant", "content": "So."}]]:
        for gen in (True, False):
            ids, _ = render(tok, messages, add_generation_prompt=gen)
            text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert text == tok.decode(ids)
            assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids.tolist()
    # The answer ends where lmlab's does: transformers stops at <|end|>, and at <|endoftext|> where
    # the model ends its text, as `lmlab sample` does.
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == \
        [tok.special_id("<|end|>"), tok.eot_id]
    capsys.readouterr()
    assert main(["sample", str(instruct_run), "--prompt", "Say yes.", "--temperature", "0",
                 "--max-new-tokens", "12", "--no-stream"]) == 0
    lmlab_answer = capsys.readouterr().out.split("\n> ", 1)[1][:-1]
    hf_model = tf.AutoModelForCausalLM.from_pretrained(out)
    ids, _ = render(tok, [{"role": "user", "content": "Say yes."}], add_generation_prompt=True)
    ids = torch.tensor(ids[None].astype(np.int64))
    new = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                            do_sample=False)[0, ids.shape[1]:].tolist()
    assert hf_tok.decode([t for t in new if t not in (tok.special_id("<|end|>"), tok.eot_id)]) == lmlab_answer


def test_overwrite_replaces_only_what_an_export_writes(run, tmp_path, capsys, monkeypatch):
    """--overwrite used to replace any transformers model directory whole: the checkpoint a run
    was imported from (its other weights and vocabulary files), a trainer's checkpoint-* folders,
    a run kept inside it."""
    out = _export(run, tmp_path / "hf")
    assert sorted(os.listdir(out)) == sorted(hf_export.EXPORT_FILES)
    capsys.readouterr()
    extras = {"pytorch_model.bin": "weights", "vocab.json": "{}", "runs/r/current.json": "{}"}
    for name, text in extras.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["export", str(run), "--to", "hf", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pytorch_model.bin, runs, vocab.json" in err, err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    for name, text in extras.items():
        assert (out / name).read_text() == text
    for name in extras:  # with only the export's own files left, it is replaced
        path = out / name
        path.unlink()
    (out / "runs" / "r").rmdir()
    (out / "runs").rmdir()
    assert main(["export", str(run), "--to", "hf", str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == sorted(hf_export.EXPORT_FILES)
    assert main(["export", str(run), "--to", "hf", ""]) == 2  # was "the export directory . overlaps"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the export directory is empty ('')" in err, err
    # The current directory cannot be renamed aside ("Device or resource busy" was all it said).
    monkeypatch.chdir(out)
    capsys.readouterr()
    assert main(["export", str(Path(run).resolve()), "--to", "hf", ".", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the current directory" in err, err
    assert sorted(os.listdir(out)) == sorted(hf_export.EXPORT_FILES)


def test_export_refuses_an_existing_directory_and_overwrites_only_a_model_directory(run, tmp_path,
                                                                                   capsys):
    out = _export(run, tmp_path / "hf")
    capsys.readouterr()
    assert main(["export", str(run), "--to", "hf", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    (out / "model.safetensors").write_bytes(b"stale")
    assert main(["export", str(run), "--to", "hf", str(out), "--overwrite"]) == 0
    assert _safetensors(out / "model.safetensors")  # replaced by a whole new export
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    assert main(["export", str(run), "--to", "hf", str(other), "--overwrite"]) == 2
    assert "does not hold a transformers model" in capsys.readouterr().err
    assert (other / "mine.txt").read_text() == "keep me"
    (other / "config.json").write_text("{}")  # a config.json alone does not make a model
    assert main(["export", str(run), "--to", "hf", str(other), "--overwrite"]) == 2
    assert "does not hold a transformers model" in capsys.readouterr().err
    assert main(["export", str(run), "--to", "hf", str(Path(run) / "hf")]) == 2
    assert "overlaps the run" in capsys.readouterr().err
    # A file where a folder above OUT must be: os.makedirs's "[Errno 17] File exists" named the
    # file as if the folder were there.
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "afile" / "sub" / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (f"cannot write {tmp_path / 'afile' / 'sub' / 'hf'}: "
                                     f"{tmp_path / 'afile'} is a file, not a directory; nothing "
                                     "was written") in err, err
    (tmp_path / "afile").unlink()
    # Another run, or one of its checkpoints (each holds a config.json), is never replaced.
    victim = tmp_path / "victim"
    shutil.copytree(run, victim)
    step = checkpoint.current_checkpoint(victim)
    for target in (victim, step, victim / "inside"):
        assert main(["export", str(run), "--to", "hf", str(target), "--overwrite"]) == 2
        assert "the lmlab run or checkpoint" in capsys.readouterr().err
    assert checkpoint.load_model(victim)[0].config == checkpoint.load_model(run)[0].config
    # A folder that merely holds a config.json with a "model" key is no run.
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"model": "gpt2"}')
    assert main(["export", str(run), "--to", "hf", str(project / "exports")]) == 0
    shutil.rmtree(project)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "notes", "victim"]  # no temporary


def test_a_reward_model_is_refused_and_its_parent_is_the_model_to_export(instruct_run, tmp_path,
                                                                         capsys):
    """A reward model run is its parent's frozen transformer plus a head GPT2LMHeadModel has no
    place for: its export was the parent's language model under the reward model's name. Refused,
    naming the parent, whose export transformers computes as the reward run's transformer."""
    tf = _transformers()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": w, "rejected": "no"})
                             + "\n" for w in ("yes", "aye", "well", "good")), encoding="utf-8")
    rm = tmp_path / "rm"
    assert main(["reward", str(instruct_run), "--rankings", str(pairs), "--out", str(rm)]) == 0
    capsys.readouterr()
    assert main(["export", str(rm), "--to", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reward model" in err and str(instruct_run) in err, err
    assert not (tmp_path / "hf").exists()
    model, tok, _ = load_model(rm)
    hf_model = tf.AutoModelForCausalLM.from_pretrained(_export(instruct_run, tmp_path / "parent"))
    ids = tok.encode("Say yes.")
    logits, _ = model.forward(ids[None].astype(np.int32))
    np.testing.assert_allclose(_torch_logits(hf_model, ids), logits[0], rtol=0, atol=1e-4)


def test_an_export_killed_between_its_renames_is_put_back(run, tmp_path, capsys):
    out = _export(run, tmp_path / "hf")
    before = (out / "model.safetensors").read_bytes()
    os.rename(out, tmp_path / ".hf.old-12345678")  # the state a kill mid-overwrite leaves
    (tmp_path / ".hf.abcdef12.tmp").mkdir()
    assert main(["export", str(run), "--to", "hf", str(out)]) == 2  # put back, so it exists
    assert "restored" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_an_export_leaves_the_work_of_an_export_to_another_name_alone(run, tmp_path):
    """An export removed every ".NAME.*.tmp" beside it as a killed export's leftovers, so an
    export to hf deleted the directory an export to hf.v2 was writing at the same time."""
    sibling = tmp_path / ".hf.v2.0123abcd.tmp"  # an export to hf.v2 in progress
    sibling.mkdir()
    (sibling / "model.safetensors").write_bytes(b"being written")
    leftover = tmp_path / ".hf.abcdef12.tmp"  # a killed export to hf
    leftover.mkdir()
    _export(run, tmp_path / "hf")
    assert sibling.is_dir() and not leftover.exists()


@pytest.mark.parametrize("where", ["write", "rename", "sync"])
def test_ctrl_c_during_an_export_leaves_the_previous_one_and_no_temporary(run, tmp_path, capsys,
                                                                         monkeypatch, where):
    """Ctrl-C while the files are written (a model's size of them), between the renames of an
    overwrite, or while the directory is synced after them (the new export renamed in, the old one
    still aside: it was left as .hf.old-*): the previous export is in place at once, and nothing
    else is left beside it."""
    from lmlab import hf_export
    out = _export(run, tmp_path / "hf")
    before = (out / "model.safetensors").read_bytes()
    (out / "README.md").write_text("the previous export")
    real_write, real_rename = hf_export.write_new_file, os.rename

    def write_new_file(path, data):
        if where == "write" and path.name == "model.safetensors":
            raise KeyboardInterrupt
        real_write(path, data)

    def rename(src, dst):
        if where == "rename" and os.fspath(dst) == os.fspath(out) and ".tmp" in os.fspath(src):
            raise KeyboardInterrupt  # the new one in: the old export is already renamed aside
        real_rename(src, dst)

    def fsync_dir(path):
        if where == "sync" and os.fspath(path) == os.fspath(out.parent):
            raise KeyboardInterrupt
        real_fsync(path)

    real_fsync = hf_export.fsync_dir
    monkeypatch.setattr(hf_export, "write_new_file", write_new_file)
    monkeypatch.setattr(hf_export.os, "rename", rename)
    monkeypatch.setattr(hf_export, "fsync_dir", fsync_dir)
    assert main(["export", str(run), "--to", "hf", str(out), "--overwrite"]) == 130
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (out / "README.md").read_text() == "the previous export"
    assert (out / "model.safetensors").read_bytes() == before


def test_of_several_displaced_exports_the_newest_is_put_back_and_the_rest_removed(run, tmp_path,
                                                                                   capsys):
    """An overwrite killed after its rename-in leaves the export it replaced; a later one killed
    between its renames leaves the newer one too. The newest comes back, whatever the random
    part of the names, and the older copies (a model's size each) go."""
    out = _export(run, tmp_path / "hf")
    older = tmp_path / f".hf.old-{10**19:020d}-ffffffff"
    shutil.copytree(out, older)
    (older / "README.md").write_text("the older export")
    legacy = tmp_path / ".hf.old-fedcba98"  # named by an earlier lmlab: older still
    shutil.copytree(older, legacy)
    newest = (out / "README.md").read_text()
    os.rename(out, tmp_path / f".hf.old-{2 * 10**19:020d}-00000000")
    assert main(["export", str(run), "--to", "hf", str(out)]) == 2  # put back, so it exists
    assert "restored" in capsys.readouterr().err
    assert (out / "README.md").read_text() == newest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    # Left beside an export that is in place (killed before its last rmtree): removed too.
    shutil.copytree(out, older)
    assert main(["export", str(run), "--to", "hf", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# -- import -----------------------------------------------------------------------------------------

def _gpt2_tokenizer(text: str, vocab_size: int, specials):
    """A byte-level BPE tokenizer built like GPT-2's: the merges, then the special tokens last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([text], trainer=trainer)
    tk.add_special_tokens(list(specials))
    return tk


def _save_gpt2(d: Path, text: str, specials, dtype=None, tokenizer=None, **config) -> Path:
    """A randomly initialised GPT2LMHeadModel saved by transformers, with its tokenizer.json (a
    GPT-2-like BPE tokenizer of `text`, or `tokenizer`)."""
    tf = _transformers()
    import torch
    tk = tokenizer or _gpt2_tokenizer(text, 300, specials)
    eot = tk.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    sizes = {"n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 4, **config}
    cfg = tf.GPT2Config(vocab_size=tk.get_vocab_size(), bos_token_id=eot, eos_token_id=eot, **sizes)
    model = tf.GPT2LMHeadModel(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(d)
    tk.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, corpus):
    """A GPT-2 checkpoint whose tokenizer has only <|endoftext|>, as GPT-2's has."""
    return _save_gpt2(tmp_path_factory.mktemp("gpt2") / "hf", corpus.read_text(), ["<|endoftext|>"])


def _char_tokenizer(text: str, variant: str = "lmlab-like"):
    """A character-level WordLevel tokenizer written by hand, not by lmlab: lmlab's layout (special
    tokens, U+FFFD, one token per character) or a variant transformers reads otherwise."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from lmlab.tokenizer import REPLACEMENT_CHAR, SPECIAL_TOKENS
    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS + [REPLACEMENT_CHAR] + sorted(set(text)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="e" if variant == "other-unk"
                                    else REPLACEMENT_CHAR))
    tk.add_special_tokens(SPECIAL_TOKENS)
    tk.pre_tokenizer = (pre_tokenizers.WhitespaceSplit() if variant == "word-split"
                        else pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"))
    if variant != "no-decoder":
        tk.decoder = decoders.Fuse()
    return tk


@pytest.mark.parametrize("variant", ["word-split", "no-decoder", "other-unk", "bos"])
def test_import_refuses_a_tokenizer_transformers_reads_otherwise_than_lmlab(variant, tmp_path,
                                                                           corpus, capsys):
    """lmlab reads a WordLevel tokenizer one character per token (U+FFFD for an unseen one) and
    adds no tokens to a text; one whose own pre-tokenizer, decoder, unknown token or
    post-processor make transformers read it otherwise would feed the model ids it never saw, and
    its export would tokenize otherwise than lmlab: refused, naming tokenizer.json."""
    tf = _transformers()
    from tokenizers import processors
    text = corpus.read_text()
    if variant == "bos":  # a BPE tokenizer that starts every text with <|endoftext|>
        tk = _gpt2_tokenizer(text, 300, ["<|endoftext|>"])
        eot = tk.token_to_id("<|endoftext|>")
        tk.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                          special_tokens=[("<|endoftext|>", eot)])
    else:
        tk = _char_tokenizer(text, variant)
    hf = _save_gpt2(tmp_path / "hf", text, None, tokenizer=tk)
    hf_tok = tf.PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json"))
    sample = "First Citizen:\nBefore we proceed \u263a"
    ids = hf_tok(sample)["input_ids"]
    per_char = [hf_tok.convert_tokens_to_ids(c) if c in hf_tok.get_vocab() else
                hf_tok.convert_tokens_to_ids("\ufffd") for c in sample]
    # The reference disagrees with lmlab's reading: what the import would have taken on.
    assert (ids[0] == eot if variant == "bos" else
            ids != per_char or hf_tok.decode(per_char) != sample.replace("\u263a", "\ufffd"))
    capsys.readouterr()
    assert main(["import", str(hf), "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer.json" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", ["truncation", "padding"])
def test_truncation_and_padding_saved_in_tokenizer_json_are_ignored_as_transformers_does(
        setting, tmp_path, corpus):
    """A tokenizer.json saved with truncation or padding enabled: transformers encodes a text whole
    and unpadded unless the call asks otherwise. lmlab refused the first (as not giving text back)
    and padded every prompt with the second; both now encode as transformers does, here and in
    the export."""
    tf = _transformers()
    tk = _gpt2_tokenizer(corpus.read_text(), 300, ["<|endoftext|>"])
    if setting == "truncation":
        tk.enable_truncation(max_length=4)
    else:
        tk.enable_padding(length=24, pad_id=tk.token_to_id("<|endoftext|>"),
                          pad_token="<|endoftext|>")
    hf = _save_gpt2(tmp_path / "hf", "", None, tokenizer=tk)
    assert main(["import", str(hf), "--run", str(tmp_path / "run")]) == 0
    model, tok, _ = load_model(tmp_path / "run")
    out = _export(tmp_path / "run", tmp_path / "out")
    for hf_tok in (tf.PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json")),
                   tf.AutoTokenizer.from_pretrained(out)):
        for text in ("Hi", "First Citizen: Before we proceed any further, hear me speak."):
            ids = tok.encode(text)
            assert hf_tok(text)["input_ids"] == ids.tolist() and tok.decode(ids) == text
    ids = tok.encode("Hi")
    logits, _ = model.forward(ids[None].astype(np.int32))
    hf_model = tf.AutoModelForCausalLM.from_pretrained(hf)
    np.testing.assert_allclose(logits[0, :, :hf_model.config.vocab_size],
                               _torch_logits(hf_model, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("cls", ["GPT2Tokenizer", "PreTrainedTokenizerFast"])
def test_add_prefix_space_in_tokenizer_config_is_refused_where_transformers_applies_it(
        cls, gpt2_dir, tmp_path, capsys):
    """tokenizer_config.json's add_prefix_space makes transformers' GPT-2 tokenizer encode a space
    before every text, which tokenizer.json (what lmlab reads) does not say: refused there, and
    accepted where the class transformers loads ignores it, with transformers' ids."""
    tf = _transformers()
    hf = tmp_path / "hf"
    shutil.copytree(gpt2_dir, hf)
    (hf / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": cls, "add_prefix_space": True, "eos_token": "<|endoftext|>"}))
    text = "Before we proceed"
    hf_ids = tf.AutoTokenizer.from_pretrained(hf)(text)["input_ids"]
    plain = tf.PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json"))(text)["input_ids"]
    capsys.readouterr()
    if cls == "GPT2Tokenizer":
        assert hf_ids != plain  # transformers adds the space
        assert main(["import", str(hf), "--run", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "add_prefix_space" in err, err
    else:
        assert main(["import", str(hf), "--run", str(tmp_path / "run")]) == 0
        assert load_model(tmp_path / "run")[1].encode(text).tolist() == hf_ids


def test_a_char_tokenizer_not_written_by_lmlab_imports_and_reads_as_transformers_does(tmp_path,
                                                                                     corpus):
    """The control: a hand-made tokenizer of lmlab's char layout imports, and lmlab's ids, text and
    logits are transformers'."""
    tf = _transformers()
    hf = _save_gpt2(tmp_path / "hf", "", None, tokenizer=_char_tokenizer(corpus.read_text()))
    assert main(["import", str(hf), "--run", str(tmp_path / "run")]) == 0
    model, tok, _ = load_model(tmp_path / "run")
    hf_tok = tf.PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json"))
    sample = "First Citizen:\n  Before we proceed \u263a"
    ids = tok.encode(sample, unknown="replace")
    assert hf_tok(sample)["input_ids"] == ids.tolist()
    assert hf_tok.decode(ids.tolist()) == tok.decode(ids)
    ids = ids[: model.config.block_size]
    logits, _ = model.forward(ids[None].astype(np.int32))
    hf_model = tf.AutoModelForCausalLM.from_pretrained(hf)
    np.testing.assert_allclose(logits[0], _torch_logits(hf_model, ids), rtol=0, atol=1e-4)


def test_chat_tokens_a_checkpoint_holds_as_ordinary_tokens_become_special(tmp_path, corpus):
    """A tokenizer holding <|end|> as an ordinary added token turns the typed text "<|end|>" into the
    token; lmlab keeps user text as text (the token ends an answer), so the import makes it special:
    lmlab then encodes such text as transformers does with split_special_tokens, and its
    templates still reach the token."""
    tf = _transformers()
    tk = _gpt2_tokenizer(corpus.read_text(), 300, ["<|endoftext|>"])
    tk.add_tokens(["<|end|>"])
    hf = _save_gpt2(tmp_path / "hf", "", None, tokenizer=tk)
    end = tk.token_to_id("<|end|>")
    text = "Say <|end|> now."
    assert end in tf.PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json"))(text)[
        "input_ids"]
    assert main(["import", str(hf), "--run", str(tmp_path / "run")]) == 0
    _, tok, _ = load_model(tmp_path / "run")
    assert tok.special_id("<|end|>") == end
    ids = tok.encode(text).tolist()
    assert end not in ids and tok.decode(ids) == text
    assert end in tok.encode(text, allow_special=True).tolist()
    out = _export(tmp_path / "run", tmp_path / "out")
    as_text = tf.AutoTokenizer.from_pretrained(out, split_special_tokens=True)
    assert as_text(text)["input_ids"] == ids


def test_import_then_export_gives_back_the_same_tensors(tmp_path, corpus):
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
    hf = _save_gpt2(tmp_path / "hf", corpus.read_text(), specials)
    assert main(["import", str(hf), "--run", str(tmp_path / "run")]) == 0
    _export(tmp_path / "run", tmp_path / "back")
    original, back = _safetensors(hf / "model.safetensors"), _safetensors(tmp_path / "back/model.safetensors")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == np.float32 and np.array_equal(back[name], tensor), name
    assert json.loads((tmp_path / "back/tokenizer.json").read_text())["model"] == \
        json.loads((hf / "tokenizer.json").read_text())["model"]


def test_import_adds_lmlab_special_tokens_and_keeps_the_model(gpt2_dir, tmp_path):
    tf = _transformers()
    assert main(["import", str(gpt2_dir), "--run", str(tmp_path / "run")]) == 0
    model, tok, config = load_model(tmp_path / "run")
    hf_model = tf.AutoModelForCausalLM.from_pretrained(gpt2_dir)
    V = hf_model.config.vocab_size
    assert tok.vocab_size == V + 3 and config["train"]["added_tokens"] == ["<|user|>",
                                                                           "<|assistant|>", "<|end|>"]
    assert [tok.special_id(s) for s in ("<|user|>", "<|assistant|>", "<|end|>")] == [V, V + 1, V + 2]
    wte = model.named_parameters()["wte"]
    hf_wte = hf_model.transformer.wte.weight.detach().numpy()
    assert np.array_equal(wte[:V], hf_wte)
    np.testing.assert_allclose(wte[V:], np.broadcast_to(hf_wte.mean(0), (3, wte.shape[1])),
                               rtol=0, atol=1e-7)
    text = "MENENIUS: What work's, my countrymen, in hand?"
    ids = tok.encode(text)
    hf_tok = tf.PreTrainedTokenizerFast(tokenizer_file=str(gpt2_dir / "tokenizer.json"))
    assert hf_tok(text)["input_ids"] == ids.tolist() and tok.decode(ids) == text
    ids = ids[: model.config.block_size]
    logits, _ = model.forward(ids[None].astype(np.int32))
    np.testing.assert_allclose(logits[0, :, :V], _torch_logits(hf_model, ids), rtol=0, atol=1e-4)


def test_import_finetune_export_reimport_keeps_the_logits(gpt2_dir, corpus, tmp_path):
    """The round trip: an imported GPT-2, fine-tuned a few steps, exported and imported again is
    the fine-tuned model, in lmlab (exactly) and in transformers."""
    tf = _transformers()
    assert main(["import", str(gpt2_dir), "--run", str(tmp_path / "run")]) == 0
    assert main(["finetune", str(tmp_path / "run"), "--corpus", str(corpus), "--out",
                 str(tmp_path / "ft"), "--steps", "2", "--warmup-steps", "1", "--eval-every", "0",
                 "--no-progress", "--batch-size", "2"]) == 0
    out = _export(tmp_path / "ft", tmp_path / "hf")
    assert main(["import", str(out), "--run", str(tmp_path / "back")]) == 0
    (model, tok, _), (back, back_tok, _) = load_model(tmp_path / "ft"), load_model(tmp_path / "back")
    assert back_tok.vocab_size == tok.vocab_size
    ids = tok.encode("MENENIUS: What work's, my countrymen, in hand?")[: model.config.block_size]
    logits, _ = model.forward(ids[None].astype(np.int32))
    assert np.array_equal(back.forward(ids[None].astype(np.int32))[0], logits)
    hf_model = tf.AutoModelForCausalLM.from_pretrained(out)
    np.testing.assert_allclose(_torch_logits(hf_model, ids), logits[0], rtol=0, atol=1e-4)


def test_import_keeps_the_first_positions_with_block_size(gpt2_dir, tmp_path):
    tf = _transformers()
    assert main(["import", str(gpt2_dir), "--run", str(tmp_path / "run"), "--block-size", "8"]) == 0
    model, tok, _ = load_model(tmp_path / "run")
    assert model.config.block_size == 8
    hf_model = tf.AutoModelForCausalLM.from_pretrained(gpt2_dir)
    ids = tok.encode("To be, or not")[:8]
    logits, _ = model.forward(ids[None].astype(np.int32))
    V = hf_model.config.vocab_size
    np.testing.assert_allclose(logits[0, :, :V], _torch_logits(hf_model, ids), rtol=0, atol=1e-4)


def _as_pytorch_bin(hf: Path, shards: int) -> None:
    """Rewrite hf's model.safetensors as pytorch_model.bin, or as that many shards with the
    pytorch_model.bin.index.json transformers writes for them."""
    import torch
    from safetensors.torch import load_file
    state = load_file(str(hf / "model.safetensors"))
    os.unlink(hf / "model.safetensors")
    if shards == 1:
        torch.save(state, hf / "pytorch_model.bin")
        return
    names, weight_map = sorted(state), {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({k: state[k] for k in part}, hf / file)
        weight_map.update(dict.fromkeys(part, file))
    (hf / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {},
                                                                  "weight_map": weight_map}))


def test_a_context_longer_than_a_run_holds_is_refused_unless_block_size_crops_it(tmp_path, corpus,
                                                                                  capsys):
    """transformers computes a GPT-2 of more positions than an lmlab run may hold
    (checkpoint.MAX_BLOCK); imported whole, no verb could load the run, so the import refuses it
    and points to --block-size, with which the run loads and computes transformers' logits."""
    tf = _transformers()
    hf = _save_gpt2(tmp_path / "hf", corpus.read_text(), ["<|endoftext|>"],
                    n_positions=checkpoint.MAX_BLOCK + 1, n_layer=1, n_embd=8, n_head=2)
    hf_model = tf.AutoModelForCausalLM.from_pretrained(hf)
    capsys.readouterr()
    assert main(["import", str(hf), "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"n_positions {checkpoint.MAX_BLOCK + 1}" in err, err
    assert "--block-size" in err and not (tmp_path / "run").exists()
    assert main(["import", str(hf), "--run", str(tmp_path / "run"), "--block-size", "16"]) == 0
    model, tok, _ = load_model(tmp_path / "run")
    ids = tok.encode("Before we proceed any further, hear me speak.")[:16]
    logits, _ = model.forward(ids[None].astype(np.int32))
    V = hf_model.config.vocab_size
    np.testing.assert_allclose(logits[0, :, :V], _torch_logits(hf_model, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", ["bin", "bin-sharded", "bf16"])
def test_import_reads_pytorch_bin_and_bfloat16_weights(fmt, tmp_path, corpus):
    _transformers()
    import torch
    hf = _save_gpt2(tmp_path / "hf", corpus.read_text(), ["<|endoftext|>"],
                    dtype=torch.bfloat16 if fmt == "bf16" else None)
    if fmt.startswith("bin"):
        _as_pytorch_bin(hf, 3 if fmt == "bin-sharded" else 1)
    expected = {k: v.float().numpy() for k, v in
                __import__("transformers").GPT2LMHeadModel.from_pretrained(hf).state_dict().items()}
    assert main(["import", str(hf), "--run", str(tmp_path / "run")]) == 0
    model, _, _ = load_model(tmp_path / "run")
    params = model.named_parameters()
    for name, hname, _, transposed in name_map(model.config):
        want = expected[hname].T if transposed else expected[hname]
        got = params[name][: len(want)] if name == "wte" else params[name]
        assert np.array_equal(got, want), name


def test_a_pytorch_bin_that_is_not_a_state_dict_is_refused_in_one_line(exported, tmp_path, capsys):
    """torch.load may give back a list (or a tensor) rather than save_pretrained's {name: tensor}:
    refused naming the file and what it holds, not an AttributeError traceback."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")

    def as_list(d: Path) -> None:
        tensors = _safetensors(d / "model.safetensors")
        os.unlink(d / "model.safetensors")
        torch.save([torch.from_numpy(t) for t in tensors.values()], d / "pytorch_model.bin")

    rc, err = _import_edited(exported, tmp_path, capsys, as_list)
    assert rc == 2 and err.count("\n") == 1, err
    assert "pytorch_model.bin: holds a list, not a state dict" in err
    assert not (tmp_path / "run").exists()


def test_an_exported_instruct_run_imports_with_its_chat_template(instruct_run, tmp_path):
    _export(instruct_run, tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--run", str(tmp_path / "run")]) == 0
    config = read_config(tmp_path / "run")
    assert config["train"]["chat_template"] == read_config(instruct_run)["train"]["chat_template"]
    assert config["train"]["added_tokens"] == []


def test_an_export_saved_again_by_transformers_imports_with_its_chat_template(instruct_run,
                                                                               tmp_path):
    """transformers' save_pretrained writes the chat template to chat_template.jinja, not to
    tokenizer_config.json: an export loaded, fine-tuned or not, and saved by transformers is still
    the instruct model, and the imported run renders the conversations transformers renders."""
    tf = _transformers()
    out = _export(instruct_run, tmp_path / "hf")
    saved = tmp_path / "saved"
    tf.AutoModelForCausalLM.from_pretrained(out).save_pretrained(saved)
    hf_tok = tf.AutoTokenizer.from_pretrained(out)
    hf_tok.save_pretrained(saved)
    assert main(["import", str(saved), "--run", str(tmp_path / "run")]) == 0
    _, tok, config = load_model(tmp_path / "run")
    assert config["train"]["chat_template"] == read_config(instruct_run)["train"]["chat_template"]
    hf_tok = tf.AutoTokenizer.from_pretrained(saved)
    for messages in CONVERSATIONS:
        ids, _ = render(tok, messages, add_generation_prompt=True)
        assert tok.decode(ids) == hf_tok.apply_chat_template(messages, tokenize=False,
                                                             add_generation_prompt=True)


def test_an_imported_run_samples_finetunes_instructs_and_learns_from_rankings(gpt2_dir, tmp_path,
                                                                              corpus, capsys):
    run = tmp_path / "run"
    assert main(["import", str(gpt2_dir), "--run", str(run)]) == 0
    assert main(["sample", str(run), "--prompt", "KING:", "--seed", "1", "--max-new-tokens", "8",
                 "--no-stream"]) == 0
    common = ["--steps", "2", "--warmup-steps", "1", "--eval-every", "0", "--no-progress",
              "--batch-size", "2"]
    assert main(["finetune", str(run), "--corpus", str(corpus), "--out", str(tmp_path / "ft"),
                 *common]) == 0
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n"
                            for w in ("yes", "no", "aye", "nay")), encoding="utf-8")
    assert main(["instruct", str(run), "--data", str(data), "--out", str(tmp_path / "qa"),
                 *common]) == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": w, "rejected": "no"})
                             + "\n" for w in ("yes", "aye", "well", "good")), encoding="utf-8")
    assert main(["dpo", str(tmp_path / "qa"), "--rankings", str(pairs), "--out",
                 str(tmp_path / "dpo"), *common]) == 0
    assert capsys.readouterr().err.count("error") == 0
    for out in ("ft", "qa", "dpo"):
        assert read_config(tmp_path / out)["parent"] is not None


def test_import_refuses_an_existing_run(gpt2_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["import", str(gpt2_dir), "--run", str(run)]) == 0
    capsys.readouterr()
    assert main(["import", str(gpt2_dir), "--run", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["import", str(gpt2_dir), "--run", str(run), "--overwrite"]) == 0
    assert main(["import", str(gpt2_dir), "--run", str(gpt2_dir), "--overwrite"]) == 2


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_run_is_never_written_over_a_transformers_model(overwrite, exported, corpus, tmp_path,
                                                          capsys):
    """A transformers model directory holds config.json, model.safetensors and tokenizer.json, a
    flat-layout run's file names: import (and every verb) took it for a run, said "already holds
    a run; pass --overwrite", and with --overwrite removed the user's model files as the old run's.
    It is refused, --overwrite or not, and left as it was."""
    d = tmp_path / "model"
    shutil.copytree(exported, d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    flag = ["--overwrite"] if overwrite else []
    for argv in (["import", str(exported), "--run", str(d)],
                 ["pretrain", "--corpus", str(corpus), "--run", str(d), "--steps", "1"]):
        capsys.readouterr()
        assert main(argv + flag) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "holds a Hugging Face transformers model" in err, err
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_an_import_killed_in_its_save_runs_again_without_overwrite(exported, tmp_path):
    """kill -9 while the checkpoint's files are written: the same command then imports."""
    run = tmp_path / "run"
    kill_in_save = textwrap.dedent("""
        import os, sys
        from lmlab import checkpoint
        from lmlab.cli import main
        def killed(path, data):
            os._exit(137)
        checkpoint.write_new_file = killed
        sys.exit(main(sys.argv[1:]))
    """)
    child = subprocess.run([sys.executable, "-c", kill_in_save, "import", str(exported), "--run",
                            str(run)], capture_output=True, text=True, timeout=120)
    assert child.returncode == 137, child.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()][0].startswith(".tmp-")
    assert main(["import", str(exported), "--run", str(run)]) == 0
    assert os.listdir(run / "checkpoints") == ["step_000000"]
    assert load_model(run)[0].config == load_model(exported.parent / "run")[0].config


# -- refusals (on lmlab's own export: no transformers needed) ----------------------------------------

def _edit_config(**changes):
    def edit(d: Path):
        config = json.loads((d / "config.json").read_text())
        config.update(changes)
        (d / "config.json").write_text(json.dumps(config))
    return edit


def _edit_tensors(edit_fn):
    def edit(d: Path):
        from safetensors.numpy import save_file
        tensors = _safetensors(d / "model.safetensors")
        edit_fn(tensors)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return edit


def _untie(d: Path):
    _edit_config(tie_word_embeddings=False)(d)
    _edit_tensors(lambda t: t.update({LM_HEAD: t["transformer.wte.weight"] * 2}))(d)


def _tokenizer_of(kind):
    def edit(d: Path):
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
        vocab = json.loads((d / "config.json").read_text())["vocab_size"]
        tokens = {f"t{i}": i for i in range(vocab)}
        if kind == "WordPiece":
            tk = Tokenizer(models.WordPiece(tokens, unk_token="t0"))
        elif kind == "metaspace":  # sentencepiece-style BPE: not byte-level
            tk = Tokenizer(models.BPE(tokens, []))
            tk.pre_tokenizer = pre_tokenizers.Metaspace()
        else:  # byte-level BPE, one token short of the model's vocabulary
            tk = _gpt2_tokenizer(SHAKESPEARE.read_text()[:20000], vocab - 1, ["<|endoftext|>"])
            tk.normalizer = None if kind == "short" else normalizers.Lowercase()
            if kind == "lowercase":
                tk.add_tokens(["extra"])
        tk.save(str(d / "tokenizer.json"))
    return edit


REFUSALS = {
    "relu": (_edit_config(activation_function="relu"), "activation_function 'relu'"),
    "exact-gelu": (_edit_config(activation_function="gelu"), "activation_function 'gelu'"),
    "model-type": (_edit_config(model_type="gpt_neox"), "model_type 'gpt_neox'"),
    "architecture": (_edit_config(architectures=["GPT2ForSequenceClassification"]),
                     "architecture GPT2ForSequenceClassification"),
    # One name written as a string, not a list: read as that name (it used to be read letter by
    # letter: "architecture G").
    "architecture-string": (_edit_config(architectures="GPT2ForSequenceClassification"),
                            "architecture GPT2ForSequenceClassification"),
    "architecture-type": (_edit_config(architectures=3), "architectures is int 3"),
    "n-inner": (_edit_config(n_inner=96), "n_inner 96"),
    "epsilon": (_edit_config(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
    "inverse-layer-idx": (_edit_config(scale_attn_by_inverse_layer_idx=True),
                          "scale_attn_by_inverse_layer_idx"),
    "unscaled-attention": (_edit_config(scale_attn_weights=False), "scale_attn_weights"),
    "cross-attention": (_edit_config(add_cross_attention=True), "cross-attention"),
    "untied-head": (_untie, "untied"),
    "no-bias": (_edit_tensors(lambda t: t.pop("transformer.h.0.mlp.c_fc.bias")), "biases"),
    "extra-tensor": (_edit_tensors(lambda t: t.update({"score.weight": np.ones((2, 2), np.float32)})),
                     "no place for: score.weight"),
    "vocab-mismatch": (_tokenizer_of("short"), "vocab_size"),
    "normalizer": (_tokenizer_of("lowercase"), "not byte-level"),
    "wordpiece": (_tokenizer_of("WordPiece"), "WordPiece"),
    "not-byte-level": (_tokenizer_of("metaspace"), "not byte-level"),
    "no-tokenizer": (lambda d: os.unlink(d / "tokenizer.json"), "tokenizer.json not found"),
    "no-config": (lambda d: os.unlink(d / "config.json"), "config.json not found"),
    "no-weights": (lambda d: os.unlink(d / "model.safetensors"), "holds no weights"),
    "truncated": (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}"),
                  "model.safetensors"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("exported")
    pretrain(str(corpus), d / "run", tokenizer="bpe", vocab_size=300, steps=1, **TINY)
    return _export(d / "run", d / "hf")


def _import_edited(exported, tmp_path, capsys, edit) -> tuple:
    """(exit code, stderr) of `lmlab import` of a copy of `exported` changed by edit(dir)."""
    d = tmp_path / "hf"
    shutil.copytree(exported, d)
    edit(d)
    capsys.readouterr()
    rc = main(["import", str(d), "--run", str(tmp_path / "run")])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_import_refuses_what_lmlab_cannot_represent_in_one_line(case, exported, tmp_path, capsys):
    edit, named = REFUSALS[case]
    rc, err = _import_edited(exported, tmp_path, capsys, edit)
    assert rc == 2
    assert err.startswith("lmlab import: error: ") and err.count("\n") == 1, err
    assert named in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_unedited_export_imports(exported, tmp_path):
    """The refusals' control: the same directory, unedited, is accepted."""
    assert main(["import", str(exported), "--run", str(tmp_path / "run")]) == 0


SAME_FUNCTION = {f"activation-{name}": {"activation_function": name} for name in
                 ("gelu_pytorch_tanh", "gelu_fast", "gelu_accurate", "gelu_python_tanh")}
SAME_FUNCTION["reorder-and-upcast-attn"] = {"reorder_and_upcast_attn": True}
SAME_FUNCTION["architectures-as-a-string"] = {"architectures": "GPT2LMHeadModel"}


@pytest.mark.parametrize("case", sorted(SAME_FUNCTION))
def test_configs_that_spell_lmlab_s_function_otherwise_import_with_transformers_logits(
        case, tmp_path, corpus):
    """Config values with which transformers computes what lmlab computes are accepted, and the
    logits agree: GPT-2's tanh GELU under each of its names (gelu_accurate and gelu_python_tanh
    were refused though they are the same formula), and reorder_and_upcast_attn (the scores in
    fp32 with the scale folded in: the same attention)."""
    tf = _transformers()
    hf = _save_gpt2(tmp_path / "hf", corpus.read_text(), ["<|endoftext|>"], **SAME_FUNCTION[case])
    assert main(["import", str(hf), "--run", str(tmp_path / "run")]) == 0
    model, tok, _ = load_model(tmp_path / "run")
    hf_model = tf.AutoModelForCausalLM.from_pretrained(hf)
    ids = tok.encode("Before we proceed any further")[: model.config.block_size]
    logits, _ = model.forward(ids[None].astype(np.int32))
    V = hf_model.config.vocab_size
    np.testing.assert_allclose(logits[0, :, :V], _torch_logits(hf_model, ids), rtol=0, atol=1e-4)


def _rename_sizes(d: Path) -> None:
    """config.json with GPT-2's sizes under the names transformers' GPT2Config.attribute_map also
    reads (hidden_size, ...), as a hand-written or converted config may have them."""
    config = json.loads((d / "config.json").read_text())
    for ours, theirs in (("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers"),
                         ("n_head", "num_attention_heads"),
                         ("n_positions", "max_position_embeddings")):
        config[theirs] = config.pop(ours)
    (d / "config.json").write_text(json.dumps(config))


def _drop_n_positions(d: Path) -> None:
    """config.json without n_positions (and n_ctx): transformers uses GPT2Config's 1024."""
    config = json.loads((d / "config.json").read_text())
    del config["n_positions"]
    config.pop("n_ctx", None)
    (d / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("edit", [_rename_sizes, _drop_n_positions], ids=["aliases", "default"])
def test_sizes_under_other_names_or_left_to_defaults_import_as_transformers_reads_them(
        edit, tmp_path, corpus):
    """transformers reads a GPT-2 size under its attribute_map name (hidden_size, n_layer as
    num_hidden_layers, ...) and takes GPT2Config's default for one config.json leaves out; lmlab
    reads the same sizes (it refused both, saying the size was None) and computes the same
    logits."""
    tf = _transformers()
    hf = _save_gpt2(tmp_path / "hf", corpus.read_text(), ["<|endoftext|>"], n_positions=1024,
                    n_layer=1)
    edit(hf)
    hf_model = tf.AutoModelForCausalLM.from_pretrained(hf)
    assert main(["import", str(hf), "--run", str(tmp_path / "run")]) == 0
    model, tok, _ = load_model(tmp_path / "run")
    config = hf_model.config
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd,
            model.config.block_size) == (config.n_layer, config.n_head, config.n_embd, 1024)
    ids = tok.encode("Before we proceed any further")
    logits, _ = model.forward(ids[None].astype(np.int32))
    V = config.vocab_size
    np.testing.assert_allclose(logits[0, :, :V], _torch_logits(hf_model, ids), rtol=0, atol=1e-4)


def test_a_stored_head_other_than_wte_is_refused_even_when_the_config_says_tied(tmp_path, corpus,
                                                                                capsys):
    """transformers computes with a stored lm_head.weight that differs from wte, whatever
    tie_word_embeddings says; lmlab's head is wte, so such a checkpoint is refused, not imported
    as a different model."""
    tf = _transformers()
    from safetensors.numpy import save_file
    hf = _save_gpt2(tmp_path / "hf", corpus.read_text(), ["<|endoftext|>"])
    tensors = _safetensors(hf / "model.safetensors")
    tensors[LM_HEAD] = tensors["transformer.wte.weight"][::-1].copy()
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    hf_model = tf.AutoModelForCausalLM.from_pretrained(hf)
    assert np.array_equal(hf_model.lm_head.weight.detach().numpy(), tensors[LM_HEAD])
    capsys.readouterr()
    assert main(["import", str(hf), "--run", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lm_head.weight is not wte" in err, err


def test_an_untied_head_equal_to_wte_is_the_tied_model_and_imports(exported, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(exported, d)
    _edit_config(tie_word_embeddings=False)(d)
    _edit_tensors(lambda t: t.update({LM_HEAD: t["transformer.wte.weight"].copy()}))(d)
    assert main(["import", str(d), "--run", str(tmp_path / "run")]) == 0


def test_the_model_card_example_runs(instruct_run, tmp_path, monkeypatch, capsys):
    """The README.md an export writes shows how to load and prompt it; that code runs as written."""
    _transformers()
    out = _export(instruct_run, tmp_path / "hf")
    card = (out / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert "apply_chat_template" in code  # an instruct run's card prompts through its template
    monkeypatch.chdir(out)
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("<|user|>Hello<|assistant|>")


# -- the model's own end-of-text token ---------------------------------------------------------------

END_TOKEN = "</s>"
END_SOURCES = {  # where a transformers directory declares its end of text, as the edit writes it
    "config.json": lambda d, i: _edit_json(d / "config.json", eos_token_id=i),
    "generation_config.json": lambda d, i: _edit_json(d / "generation_config.json",
                                                      eos_token_id=[0, i]),
    "tokenizer_config.json": lambda d, i: _edit_json(d / "tokenizer_config.json",
                                                     eos_token=END_TOKEN),
    "special_tokens_map.json": lambda d, i: _edit_json(
        d / "special_tokens_map.json", eos_token={"content": END_TOKEN, "special": True}),
}


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def _with_end_token(exported: Path, d: Path, declared_in=None) -> int:
    """A copy of lmlab's export in d whose tokenizer gains the special token </s> (the model a row
    for it) and whose greedy choice is always </s> (ln_f gives every position the same output u,
    and </s>'s row is 10u), declared as the end of text in `declared_in` (END_SOURCES). Returns
    its id, as the tokenizers library reads it."""
    from tokenizers import Tokenizer
    shutil.copytree(exported, d)
    tk = Tokenizer.from_file(str(d / "tokenizer.json"))
    tk.add_special_tokens([END_TOKEN])
    tk.save(str(d / "tokenizer.json"))
    end = tk.token_to_id(END_TOKEN)
    vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    assert end == vocab  # the new last id

    def add_row(t):
        u = np.random.default_rng(0).standard_normal(t["transformer.ln_f.bias"].shape)
        u = (u / np.linalg.norm(u)).astype(np.float32)
        t["transformer.ln_f.weight"][:] = 0
        t["transformer.ln_f.bias"][:] = u
        t["transformer.wte.weight"] = np.concatenate([t["transformer.wte.weight"], 10 * u[None]])
    _edit_tensors(add_row)(d)
    _edit_json(d / "config.json", vocab_size=vocab + 1)
    if declared_in:
        END_SOURCES[declared_in](d, end)
    return end


def _greedy_until(model, ids, n, stops) -> list:
    """The greedy continuation of ids by argmax of the model's distributions, cut before the first
    of `stops`: what generation that stops there gives."""
    from lmlab.sample import next_token_distribution
    out = []
    for _ in range(n):
        t = int(np.argmax(next_token_distribution(model, np.concatenate([ids, out]).astype(np.int32))))
        if t in stops:
            break
        out.append(t)
    return out


@pytest.mark.parametrize("declared_in", sorted(END_SOURCES) + [None])
def test_an_imported_model_stops_at_its_own_end_token(declared_in, exported, tmp_path, capsys):
    """A checkpoint whose end of text is </s> (declared in any of the files transformers reads it
    from) imports as a run that records it and stops generating there, as transformers does; the
    control, undeclared, runs on through </s> (its greedy choice at every step)."""
    import lmlab
    end = _with_end_token(exported, tmp_path / "hf", declared_in)
    capsys.readouterr()
    assert main(["import", str(tmp_path / "hf"), "--run", str(tmp_path / "run")]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    config = read_config(tmp_path / "run")
    model = lmlab.load(tmp_path / "run")
    ids = model.tokenizer.encode("KING:")
    assert _greedy_until(model.gpt, ids, 1, ()) == [end]   # the setup: </s> is the greedy choice
    text = model.generate("KING:", max_new_tokens=6, temperature=0)
    assert main(["sample", str(tmp_path / "run"), "--prompt", "KING:", "--max-new-tokens", "6",
                 "--temperature", "0", "--no-stream"]) == 0
    printed = capsys.readouterr().out
    if declared_in is None:
        assert "eos_tokens" not in config["train"]
        assert text == END_TOKEN * 6 and printed == "KING:" + END_TOKEN * 6 + "\n"
    else:
        assert config["train"]["eos_tokens"] == [END_TOKEN]
        assert f"also stops at its end-of-text token {END_TOKEN}" in out.out
        assert text == "" and printed == "KING:\n"


def test_runs_tuned_from_an_imported_run_keep_stopping_at_its_end_token(exported, tmp_path,
                                                                         corpus, capsys):
    """finetune and instruct keep the imported run's end token (as they keep a chat template): each
    tuned run's greedy answer is its greedy continuation cut before the first end token, <|end|>
    or </s> for the instruct-tuned run, <|endoftext|> or </s> for the fine-tuned one."""
    import lmlab
    from lmlab.chat import user_turn
    from tokenizers import Tokenizer
    _with_end_token(exported, tmp_path / "hf", "generation_config.json")
    hf_tok = Tokenizer.from_file(str(tmp_path / "hf/tokenizer.json"))
    run = tmp_path / "run"
    assert main(["import", str(tmp_path / "hf"), "--run", str(run)]) == 0
    common = ["--steps", "2", "--warmup-steps", "1", "--eval-every", "0", "--no-progress",
              "--batch-size", "2", "--lr", "0.05"]
    assert main(["finetune", str(run), "--corpus", str(corpus), "--out", str(tmp_path / "ft"),
                 *common]) == 0
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n"
                            for w in ("yes", "no", "aye", "nay")), encoding="utf-8")
    assert main(["instruct", str(run), "--data", str(data), "--out", str(tmp_path / "qa"),
                 *common]) == 0
    assert main(["finetune", str(tmp_path / "qa"), "--corpus", str(corpus), "--out",
                 str(tmp_path / "qa-ft"), *common]) == 0
    for name, chat_end in (("ft", None), ("qa", "<|end|>"), ("qa-ft", "<|end|>")):
        assert read_config(tmp_path / name)["train"]["eos_tokens"] == [END_TOKEN], name
        model = lmlab.load(tmp_path / name)
        assert model.chat == (chat_end is not None)
        prompt = "Say yes."
        ids = (user_turn(model.tokenizer, prompt) if chat_end
               else model.tokenizer.encode(prompt))
        stops = {hf_tok.token_to_id(chat_end or "<|endoftext|>"), hf_tok.token_to_id(END_TOKEN)}
        expected = model.tokenizer.decode(_greedy_until(model.gpt, ids, 12, stops))
        assert model.generate(prompt, max_new_tokens=12, temperature=0) == expected, name


def test_export_writes_the_end_token_back_and_import_reads_it(exported, tmp_path):
    end = _with_end_token(exported, tmp_path / "hf", "config.json")
    assert main(["import", str(tmp_path / "hf"), "--run", str(tmp_path / "run")]) == 0
    out = _export(tmp_path / "run", tmp_path / "out")
    eot = json.loads((out / "tokenizer.json").read_text())
    eot = next(t["id"] for t in eot["added_tokens"] if t["content"] == "<|endoftext|>")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text())["eos_token_id"] == [eot, end], name
    assert main(["import", str(out), "--run", str(tmp_path / "back")]) == 0
    assert read_config(tmp_path / "back")["train"]["eos_tokens"] == [END_TOKEN]


def test_transformers_stops_the_export_where_lmlab_stops(exported, tmp_path):
    tf = _transformers()
    import torch
    end = _with_end_token(exported, tmp_path / "hf", "tokenizer_config.json")
    assert main(["import", str(tmp_path / "hf"), "--run", str(tmp_path / "run")]) == 0
    out = _export(tmp_path / "run", tmp_path / "out")
    hf_model = tf.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([load_model(tmp_path / "run")[1].encode("KING:").tolist()])
    got = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                            do_sample=False)[0, ids.shape[1]:].tolist()
    assert got == [end]  # transformers stops at once, as lmlab's sample does (the test above)


@pytest.mark.parametrize("edit, warned", [
    (lambda d: _edit_json(d / "tokenizer_config.json", eos_token="<missing>"),
     "tokenizer_config.json's eos_token '<missing>' is not a token"),
    (lambda d: _edit_json(d / "config.json", eos_token_id=50256),
     "config.json's eos_token_id 50256 is not a token"),
])
def test_an_end_token_the_vocabulary_lacks_is_left_out_with_a_warning(edit, warned, exported,
                                                                      tmp_path, capsys):
    """An end token the model can never produce (a GPT-2 config's default 50256 with a smaller
    vocabulary; a name tokenizer.json lacks) imports, said in one line, and is not recorded."""
    rc, err = _import_edited(exported, tmp_path, capsys, edit)
    assert rc == 0
    assert err.startswith("lmlab import: warning: ") and err.count("\n") == 1 and warned in err, err
    assert "eos_tokens" not in read_config(tmp_path / "run")["train"]


@pytest.mark.parametrize("file, changes", [
    ("config.json", {"eos_token_id": "two"}),
    ("generation_config.json", {"eos_token_id": [0, 1.5]}),
    ("special_tokens_map.json", {"eos_token": 7}),
])
def test_an_end_token_of_the_wrong_type_is_refused_in_one_line(file, changes, exported, tmp_path,
                                                               capsys):
    rc, err = _import_edited(exported, tmp_path, capsys, lambda d: _edit_json(d / file, **changes))
    assert rc == 2
    assert err.startswith("lmlab import: error: ") and err.count("\n") == 1, err
    assert file in err and "eos_token" in err
    assert not (tmp_path / "run").exists()


def test_a_run_whose_recorded_end_token_its_tokenizer_lacks_is_refused_in_one_line(exported,
                                                                                   tmp_path, capsys):
    _with_end_token(exported, tmp_path / "hf", "config.json")
    run = tmp_path / "run"
    assert main(["import", str(tmp_path / "hf"), "--run", str(run)]) == 0
    config = checkpoint.current_checkpoint(run) / "config.json"
    _edit_json(config, train={**json.loads(config.read_text())["train"], "eos_tokens": ["<none>"]})
    capsys.readouterr()
    assert main(["sample", str(run), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eos_tokens names '<none>'" in err, err
