"""Runs for the studio's tests: a tiny char model pretrained for a few steps on the built-in
Shakespeare corpus and an instruct-tuned child of it (a few seconds on one core, made once)."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the studio's tests need starlette (pip install \"lmlab[studio]\")")
pytest.importorskip("uvicorn", reason="the studio's tests need uvicorn (pip install \"lmlab[studio]\")")

PROMPTS = ["ROMEO: ", "To be"]


@pytest.fixture(scope="session")
def studio_runs(tmp_path_factory):
    """(base run, instruct run) directories."""
    from lmlab.instruct import instruct_tune
    from lmlab.pretrain import pretrain

    root = tmp_path_factory.mktemp("studio")
    base, chat = root / "base", root / "chat"
    pretrain("builtin:shakespeare", base, n_layer=1, n_head=2, n_embd=32, block_size=48,
             batch_size=8, steps=40, lr=3e-3, warmup_steps=5, eval_every=10, eval_batches=2, save_every=0,
             progress=False, seed=0)
    instruct_tune(base, None, chat, steps=10, eval_every=0, progress=False, seed=0)
    return base, chat
