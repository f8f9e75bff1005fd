"""Runs in the flat layout, written the way lmlab wrote them before checkpoints were directories:
one checkpoint's files at the run's top, each stamped with one save_id, and weights-only snapshots
in checkpoints/step_N/. Used to check that such runs still load and resume."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from safetensors.numpy import save

from lmlab import checkpoint


def write_flat(run, *, weights: dict, tokenizer_json: str, config: dict, optimizer=None, state=None,
               save_id=None) -> str:
    """Write one flat-layout checkpoint into `run` (model first, state.json last, as main did)."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    save_id = save_id or uuid.uuid4().hex
    meta = {"format": "lmlab", "save_id": save_id}
    (run / "model.safetensors").write_bytes(save(weights, metadata=meta))
    if optimizer is not None:
        (run / "optimizer.safetensors").write_bytes(save(optimizer, metadata=meta))
    (run / "tokenizer.json").write_text(tokenizer_json)
    config = {k: v for k, v in config.items() if k != "checkpoint"}
    (run / "config.json").write_text(json.dumps({**config, "save_id": save_id}, indent=2) + "\n")
    if state is not None:
        (run / "state.json").write_text(json.dumps(
            {"save_id": save_id, "has_optimizer": optimizer is not None, "state": state}, indent=2) + "\n")
    return save_id


def flatten(run) -> None:
    """Turn a run's current checkpoint into a flat-layout run, and every checkpoint (the current
    one too) into a weights-only snapshot, as main would have left the same training."""
    run = Path(run)
    current = checkpoint.current_checkpoint(run)
    model, tok, config = checkpoint.load_model(run)
    optimizer, state = ({}, None)
    if (current / "state.json").exists():
        optimizer, state = checkpoint.load_training_state(run)
    os.unlink(run / "current.json")
    for _, d in checkpoint.list_checkpoints(run):
        m, t, c = checkpoint.load_model(d)
        shutil.rmtree(d)
        write_flat(d, weights=m.named_parameters(), tokenizer_json=t.to_str(), config=c)
    write_flat(run, weights=model.named_parameters(), tokenizer_json=tok.to_str(), config=config,
               optimizer=optimizer or None, state=state)
