"""The reward model: the transformer of a run, frozen, with a linear scalar head fitted on the
pairs that rankings imply, by Bradley-Terry (-log sigmoid(r_better - r_worse)) in float64 numpy.

The model exposes its final-layer-norm output h only through the tied LM head (logits = wte @ h),
so the head reads logits: w . logits = (wte^T w) . h, i.e. a linear readout of h restricted to the
span of the embedding rows (all of h when vocab_size >= n_embd). It reads the last position and
the mean over the response positions, since a rule such as "contains this word" is spread over the
response; an answer that ended is read with its end token (sequences.answer_ids), so the last
position is that token's, by a head fitted on rankings with ended answers (RewardModel's
reads_end_token; a head fitted on text alone scores text alone). Why frozen: dr/dlogits is not a cross-entropy gradient, so model.backward cannot carry
it. `lmlab rlhf --reward-model` scores its samples with it.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Optional, Sequence

import numpy as np
from safetensors.numpy import load, save

from . import distributed
from .checkpoint import current_checkpoint, load_model, read_checkpoint_file, save_run
from .metrics import append_metrics
from .rankings import answers_ended, load_split_rankings, pairs_from_ranking, ranking_paths
from .sequences import encode_pair, log_sigmoid, sigmoid
from .tokenizer import SPECIAL_TOKENS
from .stage import StageResult, open_stage

def reward_features(model, tok, prompts: Sequence[str], completions: Sequence[str],
                    ended: Optional[Sequence[bool]] = None, batch_size: int = 16) -> np.ndarray:
    """(N, 2V) float64 features of each prompt+completion: the logits (= wte @ h_final) at the
    last position, and their mean over the completion's positions. A completion that ended
    (ended[i], True or the end token's name; None: none did) is read with the end token it ended
    with (sequences.answer_ids), which is then the last position."""
    bs = model.config.block_size
    V = model.config.vocab_size
    if ended is None:
        ended = [False] * len(completions)
    if len(ended) != len(completions):
        raise ValueError(f"ended has {len(ended)} entries for {len(completions)} completions")
    out = np.zeros((len(prompts), 2 * V), dtype=np.float64)
    for i in range(0, len(prompts), batch_size):
        items = [encode_pair(tok, p, c, bs, e) for p, c, e in
                 zip(prompts[i:i + batch_size], completions[i:i + batch_size],
                     ended[i:i + batch_size])]
        T = max(p.size + r.size for p, r in items)
        x = np.full((len(items), T), tok.eot_id, dtype=np.int32)
        for b, (p, r) in enumerate(items):
            x[b, : p.size + r.size] = np.concatenate([p, r])
        logits, _ = model.forward(x)
        for b, (p, r) in enumerate(items):
            n = p.size + r.size
            out[i + b, :V] = logits[b, n - 1]
            # With an empty completion the mean falls back to the last prompt position.
            out[i + b, V:] = logits[b, max(p.size, 1) - 1 if r.size == 0 else p.size: n].mean(0)
    return out


def bt_loss_and_grad(w: np.ndarray, d_phi: np.ndarray, l2: float) -> tuple:
    """Bradley-Terry loss mean(-log sigmoid(w . (phi_better - phi_worse))) + l2/2 |w|^2, and its
    gradient wrt w. d_phi: (P, F) feature differences better - worse."""
    d = d_phi @ w
    loss = float(-log_sigmoid(d).mean() + 0.5 * l2 * (w @ w))
    grad = -(sigmoid(-d)[:, None] * d_phi).mean(axis=0) + l2 * w
    return loss, grad


class RewardModel:
    """A frozen GPT trunk with a linear scalar head over standardised features (module docstring).

    r(prompt, completion) = w . (phi - mu) / sigma + b, with b chosen so that the mean reward of
    the training completions is 0 (Bradley-Terry fixes only reward differences).
    """

    HEAD_FILE = "reward_head.safetensors"

    def __init__(self, model, tok, w=None, b: float = 0.0, mu=None, sigma=None,
                 reads_end_token: bool = False):
        F = 2 * model.config.vocab_size
        self.model, self.tok = model, tok
        # Whether the head was fitted on answers read with their end token (some training answer
        # had ended); if not, score() reads every answer as text alone, as the head was fitted.
        self.reads_end_token = bool(reads_end_token)
        self.w = np.zeros(F) if w is None else np.asarray(w, dtype=np.float64)
        self.mu = np.zeros(F) if mu is None else np.asarray(mu, dtype=np.float64)
        self.sigma = np.ones(F) if sigma is None else np.asarray(sigma, dtype=np.float64)
        self.b = float(b)
        if not self.w.shape == self.mu.shape == self.sigma.shape == (F,):
            raise ValueError(f"reward head shapes {self.w.shape}, {self.mu.shape}, "
                             f"{self.sigma.shape} do not match the model's {F} features")

    def _standardise(self, phi):
        return (phi - self.mu) / self.sigma

    def score_features(self, phi: np.ndarray) -> np.ndarray:
        return self._standardise(phi) @ self.w + self.b

    def score(self, prompt: str, completions: Sequence[str],
              ended: Optional[Sequence[bool]] = None) -> np.ndarray:
        """Rewards of several completions of one prompt; ended as in reward_features (RL passes
        whether each sampled answer ended), used only by a head that reads end tokens."""
        phi = reward_features(self.model, self.tok, [prompt] * len(completions), completions,
                              ended if self.reads_end_token else None)
        return self.score_features(phi)

    def check_reads(self, tok, *, name: str = "the reward model", run: str = "the run") -> None:
        """Refuse, before any sampling, a policy tokenizer whose answers this head's tokenizer
        cannot encode: score() re-encodes the policy's decoded text, and a character its char
        vocabulary lacks would otherwise stop RL at the first sample that holds one. A byte-level
        BPE reward model reads any text; a char one reads a char policy whose every character it
        holds (special tokens are read as themselves), and no BPE policy, which can sample any
        character."""
        if self.tok.kind == "bpe":
            return
        how = ("fit a reward model on this run's rankings (lmlab reward RUN --rankings ...) or "
               "on a run with its tokenizer")
        if tok.kind == "bpe":
            raise ValueError(f"{name} cannot read {run}'s answers: its char tokenizer lacks most "
                             f"of what a byte-level BPE tokenizer can sample; {how}")
        special = {tok.special_id(s) for s in SPECIAL_TOKENS}
        text = tok.decode([i for i in range(tok.vocab_size) if i not in special])
        missing = sorted(self.tok.unknown_chars(text))
        if missing:
            shown = ", ".join(repr(c) for c in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise ValueError(f"{name} cannot read {run}'s answers: its char tokenizer lacks "
                             f"{len(missing)} character(s) {run} can sample ({shown}); {how}")

    def save(self, run_dir, *, parent: Optional[str] = None, train_config: Optional[dict] = None):
        """One checkpoint holding the transformer and the head (checkpoint.save_run's extra files)."""
        head = save({"w": self.w, "mu": self.mu, "sigma": self.sigma, "b": np.array([self.b]),
                     "reads_end_token": np.array([float(self.reads_end_token)])})
        save_run(run_dir, self.model, self.tok, train_config=train_config or {"stage": "reward"},
                 optimizer=None, state=None, parent=parent, files={self.HEAD_FILE: head})

    @classmethod
    def load(cls, run_dir) -> "RewardModel":
        if not (current_checkpoint(run_dir) / cls.HEAD_FILE).exists():
            raise FileNotFoundError(f"{run_dir} is not a reward model run (no {cls.HEAD_FILE}); "
                                    "train one with `lmlab reward`")
        model, tok, _ = load_model(run_dir)
        t = load(read_checkpoint_file(run_dir, cls.HEAD_FILE))
        # Heads saved before end tokens were read have no flag: they read text alone.
        reads_end = "reads_end_token" in t and bool(t["reads_end_token"][0])
        return cls(model, tok, t["w"], float(t["b"][0]), t["mu"], t["sigma"], reads_end)


def _pair_features(model, tok, records, read_end_token: bool) -> tuple:
    """Features of every completion (an ended one with its end token if read_end_token), and for
    every implied pair the (better, worse) rows."""
    prompts, comps, ended, pairs = [], [], [], []
    for rec in records:
        base = len(comps)
        prompts += [rec["prompt"]] * len(rec["completions"])
        comps += list(rec["completions"])
        ended += answers_ended(rec)
        pairs += [(base + b, base + w) for b, w in pairs_from_ranking(rec["ranking"],
                                                                      len(rec["completions"]))]
    phi = (reward_features(model, tok, prompts, comps, ended if read_end_token else None)
           if comps else np.zeros((0, 0)))
    return phi, np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def pairwise_accuracy(rm: RewardModel, phi, pairs) -> float:
    """Share of pairs the reward model orders like the ranking (a tie in reward counts half)."""
    if len(pairs) == 0:
        return float("nan")
    r = rm.score_features(phi)
    d = r[pairs[:, 0]] - r[pairs[:, 1]]
    return float(((d > 0) + 0.5 * (d == 0)).mean())


def train_reward_model(model, tok, train_records, val_records=(), *, steps: int = 300,
                       lr: float = 0.05, l2: float = 1e-2, log=None) -> tuple:
    """Fit the Bradley-Terry head with full-batch Adam on float64 features.

    Returns (RewardModel, report dict with train/val pairwise accuracy and pair counts).
    log(row) receives a metrics row every 10 steps and at the end.
    """
    reads_end = any(any(answers_ended(rec)) for rec in train_records)
    phi, pairs = _pair_features(model, tok, train_records, reads_end)
    if len(pairs) == 0:
        raise ValueError("the training rankings imply no (better, worse) pair; every ranking is "
                         "a single tie")
    rm = RewardModel(model, tok, reads_end_token=reads_end)
    rm.mu = phi.mean(axis=0)
    rm.sigma = phi.std(axis=0) + 1e-6
    z = rm._standardise(phi)
    d_phi = z[pairs[:, 0]] - z[pairs[:, 1]]
    w = np.zeros(phi.shape[1])
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    beta1, beta2 = 0.9, 0.999
    vphi, vpairs = (_pair_features(model, tok, val_records, reads_end) if val_records
                    else (None, []))
    for t in range(1, steps + 1):
        loss, g = bt_loss_and_grad(w, d_phi, l2)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        w -= lr * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + 1e-8)
        if log is not None and (t % 10 == 0 or t == steps):
            rm.w = w
            row = {"step": t, "loss": loss, "train_accuracy": pairwise_accuracy(rm, phi, pairs)}
            if len(vpairs):
                row["val_accuracy"] = pairwise_accuracy(rm, vphi, vpairs)
            log(row)
    rm.w = w
    rm.b = -float((z @ w).mean())
    report = {"train_pairs": int(len(pairs)), "train_accuracy": pairwise_accuracy(rm, phi, pairs),
              "val_pairs": int(len(vpairs)), "final_loss": bt_loss_and_grad(w, d_phi, l2)[0]}
    if len(vpairs):
        report["val_accuracy"] = pairwise_accuracy(rm, vphi, vpairs)
    return rm, report



def reward(run, rankings, out_dir, *, overwrite: bool = False, threads: Optional[int] = None,
           **settings) -> StageResult:
    """Train a reward model on rankings (a path or a list of paths) over the frozen trunk of
    `run` and save it to out_dir. settings: any of STAGE_DEFAULTS["reward"]. The result's details
    hold "report" (train/held-out pairwise accuracy and pair counts) and "reward_model"."""
    rankings = ranking_paths(rankings)
    with open_stage("reward", out_dir, {"rankings": rankings, **settings}, overwrite=overwrite,
                    parent=run, threads=threads) as opened:
        s = opened.settings
        model, tok, _ = load_model(run)
        train_recs, val_recs = load_split_rankings(s["rankings"], s["val_fraction"], s["seed"],
                                                   "a reward model", tokenizer=tok)
        world = distributed.world()
        # Every rank has read the run and the rankings before rank 0 writes: a rank that could not
        # (a file missing on its machine) ends the run here, where rank 0 went on to write the
        # reward model and report it saved while the run failed.
        world.barrier()
        if not world.is_root:
            # One full-batch fit of a linear head: rank 0 does it and writes the run.
            report = world.bcast(None)
            return StageResult(stage="reward", run_dir=str(out_dir), steps_done=s["steps"],
                               final_loss=report["final_loss"], val_loss=None,
                               stopped_early=False, seconds=0.0, tokens_per_s=0.0,
                               details={"report": report, "reward_model": None})
        opened.hold()
        t0 = time.perf_counter()
        rm, report = train_reward_model(model, tok, train_recs, val_recs, steps=s["steps"],
                                        lr=s["lr"], l2=s["l2"],
                                        log=lambda row: append_metrics(out_dir, row))
        rm.save(out_dir, parent=str(run), train_config=opened.run_config(
            world_size=1,  # rank 0 alone fits the head, whatever mpiexec started
            rankings=s["rankings"], val_fraction=s["val_fraction"], model=asdict(model.config),
            precision=model.matmul_precision,
            features="logits at the last position + mean logits over the completion (with "
                     "its end token when it ended)",
            report=report))
        world.bcast(report)
    return StageResult(stage="reward", run_dir=str(out_dir), steps_done=s["steps"],
                       final_loss=report["final_loss"], val_loss=None, stopped_early=False,
                       seconds=time.perf_counter() - t0, tokens_per_s=0.0,
                       details={"report": report, "reward_model": rm})
