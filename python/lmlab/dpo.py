"""Direct preference optimisation (DPO): tune a policy toward the preferred answers of rankings,
against the frozen run it starts from as the reference.

DPO's loss depends on sequence log-probabilities only, so it reaches the model as one coefficient
per sequence on that sequence's response tokens (lmlab.sequences), through the same weighted
cross-entropy backward and the same training loop (lmlab.train) as every other stage.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import numpy as np

from . import distributed
from .checkpoint import load_model
from .rankings import load_split_rankings, preference_pairs, ranking_paths
from .sequences import (batched_logprobs, encode_pair, log_sigmoid, pack_for_loss, sequence_logprobs,
                        sigmoid)
from .stage import StageResult, open_stage
from .train import train


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float) -> tuple:
    """Mean DPO loss over a batch and its gradient wrt each sequence log-probability.

    loss_i = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    Returns (loss, d loss/d pi_c (B,), d loss/d pi_r (B,), margins beta*z (B,)).
    """
    pi_c, pi_r, ref_c, ref_r = (np.asarray(a, dtype=np.float64) for a in (pi_c, pi_r, ref_c, ref_r))
    z = (pi_c - ref_c) - (pi_r - ref_r)
    n = z.size
    loss = float(-log_sigmoid(beta * z).mean())
    g = -beta * sigmoid(-beta * z) / n  # d loss / d z
    return loss, g, -g, beta * z


class DPOStage:
    """Direct preference optimisation from (prompt, chosen, rejected, chosen ended, rejected
    ended) pairs (rankings.preference_pairs; without the two flags no answer ended). An ended
    answer is scored with its end token (sequences.answer_ids), so DPO also learns when to stop.

    Each micro-batch holds B chosen rows then B rejected rows in one (2B, T) forward. The reference
    model's log-probabilities are computed once up front (it is frozen), so no second model is held
    during training. With sft_weight > 0 the chosen answers' mean per-token NLL is added, an anchor
    that keeps DPO from lowering the probability of the chosen answers themselves.
    """

    def __init__(self, model, tok, train_pairs, val_pairs, *, beta: float = 0.1,
                 batch_size: int = 8, seed: int = 0, grad_accum: int = 1,
                 sft_weight: float = 0.0):
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not train_pairs:
            raise ValueError("DPO needs at least one training pair (a ranking that is not a "
                             "single tie)")
        if sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {sft_weight}")
        self.beta, self.batch_size = float(beta), int(batch_size)
        self.sft_weight = float(sft_weight)
        self.pad = int(tok.eot_id)
        bs = model.config.block_size
        self.train = self._encode_pairs(tok, train_pairs, bs)
        self.val = self._encode_pairs(tok, val_pairs, bs)
        self.T = max(1, max(len(p) + max(len(c), len(r)) - 1 for p, c, r in self.train + self.val))
        self.ref_train = self._logps(model, self.train)
        self.ref_val = self._logps(model, self.val)
        self.rng = np.random.default_rng(seed)
        self.calls = 0
        self.grad_accum = grad_accum
        self.last_eval: dict = {}

    @staticmethod
    def _encode_pairs(tok, pairs, block_size):
        out = []
        for prompt, chosen, rejected, *ended in pairs:
            if len(ended) not in (0, 2):
                raise ValueError("a DPO pair is (prompt, chosen, rejected) or (prompt, chosen, "
                                 f"rejected, chosen ended, rejected ended), got {len(ended) + 3} "
                                 "items")
            c_end, r_end = ended or (False, False)
            p, c = encode_pair(tok, prompt, chosen, block_size + 1, c_end)
            p2, r = encode_pair(tok, prompt, rejected, block_size + 1, r_end)
            p = p if p.size <= p2.size else p2  # one prompt for both, fitted to the longer
            out.append((p, c[: block_size + 1 - p.size], r[: block_size + 1 - p.size]))
        return out

    def _logps(self, model, items) -> np.ndarray:
        """(n, 2) log-probabilities of chosen and rejected."""
        if not items:
            return np.zeros((0, 2))
        prompts = [p for p, _, _ in items] * 2
        responses = [c for _, c, _ in items] + [r for _, _, r in items]
        lp = batched_logprobs(model, prompts, responses, self.T, self.pad, 2 * self.batch_size)
        return lp.reshape(2, -1).T

    def train_step(self, model) -> dict:
        idx = self.rng.integers(0, len(self.train), size=self.batch_size)
        items = [self.train[i] for i in idx]
        prompts = [p for p, _, _ in items] * 2
        responses = [c for _, c, _ in items] + [r for _, _, r in items]
        x, y, mask = pack_for_loss(prompts, responses, self.T, self.pad)
        logp = sequence_logprobs(model, x, y, mask)
        B = self.batch_size
        ref = self.ref_train[idx]
        loss, g_c, g_r, margin = dpo_loss(logp[:B], logp[B:], ref[:, 0], ref[:, 1], self.beta)
        # logp = -sum(mask * losses), so d loss / d losses[b, t] = -(d loss / d logp_b) * mask
        weights = -np.concatenate([g_c, g_r])[:, None] * mask
        if self.sft_weight:
            # Optional anchor: + sft_weight * mean over pairs of the chosen answer's per-token NLL,
            # which keeps DPO from lowering the chosen answers' own probability.
            n_c = np.maximum(mask[:B].sum(axis=1, keepdims=True), 1.0)
            nll = -(logp[:B] / n_c[:, 0]).mean()
            loss += self.sft_weight * float(nll)
            weights[:B] += self.sft_weight * mask[:B] / (n_c * B)
        self.calls += 1
        return {"loss": loss, "tokens": int(x.size), "weights": weights,
                "margin": float(margin.mean()), "accuracy": float((margin > 0).mean())}

    def skip_step(self) -> None:
        self.rng.integers(0, len(self.train), size=self.batch_size)
        self.calls += 1

    def data_fingerprint(self) -> str:
        return distributed.fingerprint(*(a for item in self.train for a in item))

    def evaluate(self, model) -> dict:
        items = self.val if self.val else self.train
        ref = self.ref_val if self.val else self.ref_train
        lp = self._logps(model, items)
        dpo, _, _, margin = dpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], self.beta)
        loss = dpo
        if self.sft_weight:
            # train_step's objective, anchor included, so the loss and the val loss of a run's
            # report and metrics are one quantity; val_dpo_loss is the DPO term alone.
            _, _, mask = pack_for_loss([p for p, _, _ in items], [c for _, c, _ in items], self.T,
                                       self.pad)
            tokens = np.maximum(mask.sum(axis=1), 1.0)
            loss += self.sft_weight * float(-(lp[:, 0] / tokens).mean())
        self.last_eval = {"val_loss": loss, "val_dpo_loss": dpo, "val_margin": float(margin.mean()),
                          "val_accuracy": float((margin > 0).mean()),
                          "held_out": bool(self.val)}
        return self.last_eval

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "calls": self.calls}

    def load_state_dict(self, d: dict) -> None:
        self.rng.bit_generator.state = d["rng"]
        self.calls = int(d["calls"])



def dpo(run, rankings, out_dir, *, resume: bool = False, overwrite: bool = False,
        threads: Optional[int] = None, **settings) -> StageResult:
    """Tune the policy in `run` on rankings (a path or a list of paths) by DPO into out_dir.

    settings: any of STAGE_DEFAULTS["dpo"] (beta, sft_weight, batch_size (pairs per
    micro-batch), val_fraction, TrainConfig's steps, lr, ...). The result's details hold "eval"
    (the last held-out margin and accuracy), "val_prompts" and "train_prompts" (the held-out and
    the training rankings' prompts) and "tuner" (the DPOStage).
    """
    rankings = ranking_paths(rankings)
    with open_stage("dpo", out_dir, {"rankings": rankings, **settings}, resume=resume,
                    overwrite=overwrite, parent=run, threads=threads) as opened:
        s = opened.settings
        model, tok, _ = load_model(run)
        train_recs, val_recs = load_split_rankings(s["rankings"], s["val_fraction"], s["seed"],
                                                   "DPO", tokenizer=tok)
        cfg = opened.train_config()
        # The reference log-probabilities are computed here, before training, in the precision
        # the policy trains in, so the policy starts at exactly the reference.
        model.matmul_precision = cfg.precision
        stage = DPOStage(model, tok, preference_pairs(train_recs), preference_pairs(val_recs),
                         beta=s["beta"], batch_size=s["batch_size"], seed=s["seed"],
                         grad_accum=cfg.grad_accum, sft_weight=s["sft_weight"])
        run_config = opened.run_config(
            rankings=s["rankings"], beta=s["beta"], sft_weight=s["sft_weight"],
            batch_size=s["batch_size"], val_fraction=s["val_fraction"],
            train_pairs=len(stage.train), val_pairs=len(stage.val), model=asdict(model.config))
        result = train(model, stage, cfg, opened.hold(), tokenizer=tok,
                       run_config=run_config, resume=resume, parent=str(run))
    if not stage.last_eval:  # evaluation was off during training: report once at the end
        stage.evaluate(model)
    return StageResult.from_training("dpo", out_dir, result, eval=stage.last_eval,
                                     val_prompts=sorted({r["prompt"] for r in val_recs}),
                                     train_prompts=sorted({r["prompt"] for r in train_recs}),
                                     tuner=stage)
