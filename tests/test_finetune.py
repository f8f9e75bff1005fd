"""Style fine-tuning: unknown characters reported before training, the new corpus's loss falls,
the parent is recorded, frozen layers stay put."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmlab.checkpoint import load_model, read_config
from lmlab.finetune import finetune
from lmlab.data import split_tokens
from lmlab.pretrain import evaluate_loss, pretrain

OLD = "the cat sat on the mat and the dog sat on the log. " * 60
NEW = "no one sees the moon as the sea does. " * 60


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    (root / "old.txt").write_text(OLD)
    run = root / "parent"
    pretrain(str(root / "old.txt"), run, n_layer=2, n_head=2, n_embd=32, block_size=32,
             batch_size=8, steps=120, lr=3e-3, warmup_steps=10, eval_every=60, save_every=0,
             progress=False)
    return root, run


def test_finetune_moves_loss_on_the_new_corpus_and_records_parent(parent, tmp_path):
    root, run = parent
    new = tmp_path / "new.txt"
    new.write_text(NEW)
    report = finetune(run, str(new), tmp_path / "child", steps=80, lr=3e-3, warmup_steps=5,
                      eval_every=40, save_every=0, progress=False, prompt="the ", sample_tokens=20)
    d = report.details
    assert d["new_val_after"] < d["new_val_before"] - 0.5
    assert d["old_val_before"] is not None and d["old_val_after"] is not None
    assert set(d["samples"]) == {"parent", "finetuned"}
    config = read_config(tmp_path / "child")
    assert config["parent"] == str(run) and config["train"]["stage"] == "finetune"


def test_unknown_characters_reported_before_training(parent, tmp_path):
    _, run = parent
    new = tmp_path / "new.txt"
    new.write_text(NEW + "Zebra! Zebra!")
    with pytest.raises(ValueError, match=r"'Z' x2"):
        finetune(run, str(new), tmp_path / "child", steps=5, progress=False)
    assert not (tmp_path / "child").exists()
    report = finetune(run, str(new), tmp_path / "child", unknown="skip", steps=5,
                      save_every=0, eval_every=0, progress=False, sample_tokens=0)
    assert report.details["unknown_chars"]["Z"] == 2 and report.details["unknown_chars"]["!"] == 2


def test_a_sample_prompt_the_tokenizer_cannot_encode_is_refused_before_training(parent, tmp_path):
    """The before/after samples come after training; their prompt is checked before it, so a
    typo costs no training (and leaves no run) rather than failing at the very end."""
    _, run = parent
    new = tmp_path / "new.txt"
    new.write_text(NEW)
    with pytest.raises(ValueError, match=r"'Z' x1"):
        finetune(run, str(new), tmp_path / "child", steps=5, progress=False, prompt="Zoo ",
                 sample_tokens=5)
    assert not (tmp_path / "child").exists()
    # Without samples the prompt is not used, so not checked.
    finetune(run, str(new), tmp_path / "child", steps=2, eval_every=0, progress=False,
             prompt="Zoo ", sample_tokens=0)


def test_frozen_layers_do_not_change(parent, tmp_path):
    _, run = parent
    new = tmp_path / "new.txt"
    new.write_text(NEW)
    finetune(run, str(new), tmp_path / "child", freeze_layers=1, freeze_embeddings=True, steps=10,
             save_every=0, eval_every=0, progress=False, sample_tokens=0)
    before, _, _ = load_model(run)
    after, _, _ = load_model(tmp_path / "child")
    b, a = before.named_parameters(), after.named_parameters()
    for name in b:
        same = np.array_equal(b[name], a[name])
        if name.startswith("h.0.") or name in ("wte", "wpe"):
            assert same, name
        elif name.startswith("h.1.") and name.endswith("weight") and b[name].ndim == 2:
            assert not same, name


def test_before_and_after_are_measured_in_the_fine_tunes_precision(parent, tmp_path):
    """A bf16 fine-tune of an fp32 parent: "before" is the parent's loss with bf16 products, as
    "after" is the fine-tune's, so the two differ by training alone (the parent was measured in
    its own fp32)."""
    _, run = parent
    new = tmp_path / "new.txt"
    new.write_text(NEW)
    report = finetune(run, str(new), tmp_path / "child", precision="bf16", steps=1, lr=1e-9,
                      warmup_steps=0, eval_every=0, save_every=0, progress=False,
                      sample_tokens=0)
    d = report.details
    model, tok, _ = load_model(run)
    _, val = split_tokens(tok.encode(NEW), 0.1)

    def loss_in(precision) -> float:
        model.matmul_precision = precision
        return evaluate_loss(model, val, 8, 32, 20, 1337 + 1)

    fp32, bf16 = loss_in("fp32"), loss_in("bf16")
    assert fp32 != bf16  # the two precisions do give different numbers here
    assert d["new_val_before"] == bf16
    assert d["old_val_before"] is not None
