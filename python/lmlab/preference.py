"""Learning from rankings: ranking data, scripted judges, a reward model, DPO and RL.

Rankings (JSONL, one judgement per line; DESIGN.md "Data formats"):
    {"prompt": str, "completions": [str, ...], "ranking": [...]}
`ranking` lists every completion index exactly once, best first. An item is either an index or a
list of indices tied at that place: [2, [0, 1], 3] means 2 is best, 0 and 1 tie, 3 is worst.
Pairwise data as other tools write it, {"prompt", "chosen", "rejected"}, is read as a two-item
ranking [0, 1] over [chosen, rejected]. Extra keys (who judged, sampling seeds) are kept.

A judge is any callable (prompt, completions) -> ranking; the scripted ones here score each
completion and rank by score (equal scores tie), so a class can run the whole loop without a person.

The three tuners share one mechanism with every other stage: lmlab.train.train() and the per-token
weighted cross-entropy of model.backward(weights). A sequence's log-probability is minus the sum
of the per-token losses over its response, so any loss that depends on sequence log-probabilities
has, per token, the gradient (dloss/dlogp) * (-1): DPO and the policy gradient become one scalar
coefficient per sequence, put on that sequence's response tokens (0 on prompt and padding).

Reward model: the transformer of a run, frozen, with a linear scalar head trained by
Bradley-Terry (-log sigmoid(r_better - r_worse)) in float64 numpy. The model exposes its
final-layer-norm output h only through the tied LM head (logits = wte @ h), so the head reads
logits: w . logits = (wte^T w) . h, i.e. a linear readout of h restricted to the span of the
embedding rows (all of h when vocab_size >= n_embd). It reads the last position and the mean over
the response positions, since a rule such as "contains this word" is spread over the response.
Why frozen: dr/dlogits is not a cross-entropy gradient, so model.backward cannot carry it.

The stages' own numbers (DPO's margin and accuracy, RL's mean reward and KL per step) are returned
from train_step/evaluate, and the shared loop logs them in the run's metrics.jsonl.
"""

from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .rundir import is_run

# --- rankings ------------------------------------------------------------------------------------


def normalize_ranking(ranking, n: int, *, name: str = "ranking") -> list:
    """Validate a ranking over n completions; return it as a list of groups (lists of indices).

    Accepts items that are ints or lists of ints; every index 0..n-1 must appear exactly once.
    """
    if not isinstance(ranking, (list, tuple)):
        raise TypeError(f"{name} must be a list (best first), got {type(ranking).__name__}")
    groups, seen = [], set()
    for item in ranking:
        group = list(item) if isinstance(item, (list, tuple)) else [item]
        if not group:
            raise ValueError(f"{name} has an empty group of ties: {ranking!r}")
        for i in group:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"{name} items must be completion indices (int) or lists of "
                                f"them, got {i!r} in {ranking!r}")
            if not 0 <= i < n:
                raise ValueError(f"{name} index {i} out of range for {n} completions "
                                 f"(0..{n - 1}) in {ranking!r}")
            if i in seen:
                raise ValueError(f"{name} lists completion {i} twice: {ranking!r}")
            seen.add(int(i))
        groups.append([int(i) for i in group])
    missing = sorted(set(range(n)) - seen)
    if missing:
        raise ValueError(f"{name} leaves out completion(s) {missing}; every one of the {n} "
                         f"must be ranked: {ranking!r}")
    return groups


def compact_ranking(groups) -> list:
    """The JSON form: a single index for a group of one, a list for ties."""
    return [g[0] if len(g) == 1 else list(g) for g in groups]


def pairs_from_ranking(ranking, n: Optional[int] = None) -> list:
    """Every (better, worse) index pair a ranking implies, best pairs first; ties give no pair."""
    if n is None:
        n = sum(len(g) if isinstance(g, (list, tuple)) else 1 for g in ranking)
    groups = normalize_ranking(ranking, n)
    pairs = []
    for a, better in enumerate(groups):
        for worse in groups[a + 1:]:
            pairs.extend((b, w) for b in better for w in worse)
    return pairs


def parse_record(obj, *, where: str = "record") -> dict:
    """One JSON object -> {"prompt", "completions", "ranking" (compact), ...extra keys}."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "chosen" in obj or "rejected" in obj:
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
        if missing:
            raise ValueError(f"{where}: a pair needs prompt, chosen and rejected; missing {missing}")
        rec = {k: v for k, v in obj.items() if k not in ("chosen", "rejected")}
        rec["completions"] = [obj["chosen"], obj["rejected"]]
        rec["ranking"] = [0, 1]
    else:
        missing = [k for k in ("prompt", "completions", "ranking") if k not in obj]
        if missing:
            raise ValueError(f"{where}: a ranking needs prompt, completions and ranking (or "
                             f"prompt, chosen and rejected); missing {missing}")
        rec = dict(obj)
    if not isinstance(rec["prompt"], str):
        raise ValueError(f"{where}: prompt must be a string, got {type(rec['prompt']).__name__}")
    comps = rec["completions"]
    if not isinstance(comps, list) or not all(isinstance(c, str) for c in comps):
        raise ValueError(f"{where}: completions must be a list of strings")
    try:
        rec["ranking"] = compact_ranking(normalize_ranking(rec["ranking"], len(comps)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None
    return rec


def load_rankings(path) -> list:
    """Read a rankings JSONL file (rankings and/or pairs) with lmlab.data's loader; errors name
    the file and line. Rankings come back in the compact form (a group of one as its index)."""
    from .data import load_rankings_jsonl

    return [{**rec, "ranking": compact_ranking(rec["ranking"])}
            for rec in load_rankings_jsonl(path)]


def append_ranking(path, record: dict) -> None:
    """Append one judgement and force it to disk, so a crash or Ctrl-C never loses it."""
    rec = parse_record(record)
    line = json.dumps(rec, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def preference_pairs(records: Iterable[dict]) -> list:
    """(prompt, chosen, rejected) for every pair implied by every ranking."""
    out = []
    for rec in records:
        comps = rec["completions"]
        out.extend((rec["prompt"], comps[b], comps[w])
                   for b, w in pairs_from_ranking(rec["ranking"], len(comps)))
    return out


def split_records(records: Sequence[dict], val_fraction: float, seed: int) -> tuple:
    """Split by ranking (not by pair), so no held-out prompt's pairs leak into training."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = int(round(len(records) * val_fraction))
    if val_fraction > 0 and len(records) >= 2:
        n_val = min(max(n_val, 1), len(records) - 1)
    val = [records[i] for i in sorted(order[:n_val])]
    train = [records[i] for i in sorted(order[n_val:])]
    return train, val


def read_prompts(path) -> list:
    """Prompts from a file: JSONL objects with "prompt", or else one prompt per line."""
    path = Path(path)
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    prompts = []
    for lineno, ln in enumerate(lines, 1):
        obj = None
        if ln.lstrip().startswith("{"):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError:
                obj = None
        if isinstance(obj, dict):
            if not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: a JSON line needs a string \"prompt\"")
            prompts.append(obj["prompt"])
        else:
            # One prompt per line; "\n" in the file stands for a newline inside the prompt.
            prompts.append(ln.replace("\\n", "\n"))
    if not prompts:
        raise ValueError(f"{path}: no prompts (expected one per line, or JSONL with \"prompt\")")
    return prompts


# --- scripted judges -----------------------------------------------------------------------------


class ScoreJudge(abc.ABC):
    """A judge that scores each completion and ranks by score, best first; equal scores tie.
    Subclasses define score()."""

    name = "score"

    @abc.abstractmethod
    def score(self, prompt: str, completion: str) -> float:
        """Higher is better."""

    def __call__(self, prompt: str, completions: Sequence[str]) -> list:
        scores = [self.score(prompt, c) for c in completions]
        groups: list = []
        for i in sorted(range(len(completions)), key=lambda i: -scores[i]):
            if groups and scores[groups[-1][0]] == scores[i]:
                groups[-1].append(i)
            else:
                groups.append([i])
        return compact_ranking(groups)

    def __repr__(self) -> str:
        return self.name


class PreferWord(ScoreJudge):
    """More (non-overlapping) occurrences of `word` is better."""

    def __init__(self, word: str):
        if not isinstance(word, str) or not word:
            raise ValueError(f"PreferWord needs a non-empty word, got {word!r}")
        self.word = word
        self.name = f"word:{word}"

    def score(self, prompt: str, completion: str) -> float:
        return float(completion.count(self.word))


class PreferShorter(ScoreJudge):
    """Fewer characters is better."""

    name = "shorter"

    def score(self, prompt: str, completion: str) -> float:
        return -float(len(completion))


class PreferLonger(ScoreJudge):
    """More characters is better."""

    name = "longer"

    def score(self, prompt: str, completion: str) -> float:
        return float(len(completion))


def make_judge(spec: str) -> ScoreJudge:
    """"word:WORD", "shorter" or "longer" -> the scripted judge."""
    if not isinstance(spec, str):
        raise TypeError(f"judge spec must be a string, got {type(spec).__name__}")
    if spec.startswith("word:"):
        return PreferWord(spec[len("word:"):])
    if spec == "shorter":
        return PreferShorter()
    if spec == "longer":
        return PreferLonger()
    raise ValueError(f"unknown judge {spec!r}: expected word:WORD, shorter or longer")


def judge_preference(judge, prompt: str, a: str, b: str) -> float:
    """1 if the judge ranks a above b, 0 if below, 0.5 for a tie."""
    groups = normalize_ranking(judge(prompt, [a, b]), 2, name="judge ranking")
    if len(groups) == 1:
        return 0.5
    return 1.0 if groups[0] == [0] else 0.0


# --- sequences -----------------------------------------------------------------------------------


def _encode(tok, text: str) -> np.ndarray:
    # Special tokens are allowed: sampled text decodes them to their names (e.g. "<|user|>"), and
    # the ids must round-trip.
    return np.asarray(tok.encode(text, allow_special=True), dtype=np.int32)


def _prompt_ids(tok, prompt: str) -> np.ndarray:
    # An empty prompt becomes the context generation starts from.
    ids = _encode(tok, prompt)
    return ids if ids.size else np.array([tok.eot_id], dtype=np.int32)


def encode_pair(tok, prompt: str, response: str, max_len: int) -> tuple:
    """(prompt ids, response ids) fitted into max_len tokens.

    An empty prompt becomes <|endoftext|>, the context generation starts from. Too long: the
    prompt loses its oldest tokens first (keeping one), then the response is cut at the end.
    """
    p = _prompt_ids(tok, prompt)
    r = _encode(tok, response)
    if p.size + r.size > max_len:
        p = p[-max(1, max_len - r.size):]
        r = r[: max_len - p.size]
    return p, r


def pack_for_loss(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], T: int,
                  pad_id: int) -> tuple:
    """Batch prompt+response sequences for next-token losses: x, y (N, T) and the response mask.

    mask[b, t] = 1 where y[b, t] is a response token. Right padding (mask 0) leaves the real
    positions unchanged, since attention is causal.
    """
    n = len(prompts)
    x = np.full((n, T), pad_id, dtype=np.int32)
    y = np.full((n, T), pad_id, dtype=np.int32)
    mask = np.zeros((n, T), dtype=np.float32)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        seq = np.concatenate([p, r])
        m = seq.size - 1
        if m > T:
            raise ValueError(f"sequence of {seq.size} tokens does not fit T={T} (+1)")
        x[b, :m] = seq[:-1]
        y[b, :m] = seq[1:]
        mask[b, p.size - 1: m] = 1.0
    return x, y, mask


def sequence_logprobs(model, x, y, mask) -> np.ndarray:
    """log p(response | prompt) per row, float64: minus the masked sum of per-token losses."""
    _, losses = model.forward(x, y)
    return -(losses.astype(np.float64) * mask).sum(axis=1)


def _batched_logprobs(model, prompts, responses, T, pad_id, batch_size) -> np.ndarray:
    out = np.zeros(len(prompts), dtype=np.float64)
    for i in range(0, len(prompts), batch_size):
        j = min(len(prompts), i + batch_size)
        x, y, mask = pack_for_loss(prompts[i:j], responses[i:j], T, pad_id)
        out[i:j] = sequence_logprobs(model, x, y, mask)
    return out


def _log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def _sigmoid(z):
    return np.exp(_log_sigmoid(z))


# --- DPO -----------------------------------------------------------------------------------------


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float) -> tuple:
    """Mean DPO loss over a batch and its gradient wrt each sequence log-probability.

    loss_i = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    Returns (loss, d loss/d pi_c (B,), d loss/d pi_r (B,), margins beta*z (B,)).
    """
    pi_c, pi_r, ref_c, ref_r = (np.asarray(a, dtype=np.float64) for a in (pi_c, pi_r, ref_c, ref_r))
    z = (pi_c - ref_c) - (pi_r - ref_r)
    n = z.size
    loss = float(-_log_sigmoid(beta * z).mean())
    g = -beta * _sigmoid(-beta * z) / n  # d loss / d z
    return loss, g, -g, beta * z


class DPOStage:
    """Direct preference optimisation from (prompt, chosen, rejected) pairs.

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
            raise ValueError("DPO needs at least one training pair (a ranking with two "
                             "distinguishable completions)")
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
        for prompt, chosen, rejected in pairs:
            p, c = encode_pair(tok, prompt, chosen, block_size + 1)
            p2, r = encode_pair(tok, prompt, rejected, block_size + 1)
            p = p if p.size <= p2.size else p2  # one prompt for both, fitted to the longer
            out.append((p, c[: block_size + 1 - p.size], r[: block_size + 1 - p.size]))
        return out

    def _logps(self, model, items) -> np.ndarray:
        """(n, 2) log-probabilities of chosen and rejected."""
        if not items:
            return np.zeros((0, 2))
        prompts = [p for p, _, _ in items] * 2
        responses = [c for _, c, _ in items] + [r for _, _, r in items]
        lp = _batched_logprobs(model, prompts, responses, self.T, self.pad, 2 * self.batch_size)
        return lp.reshape(2, -1).T

    def train_step(self, model, scale: float) -> dict:
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
        model.backward((weights * scale).astype(np.float32))
        self.calls += 1
        return {"loss": loss, "tokens": int(x.size), "margin": float(margin.mean()),
                "accuracy": float((margin > 0).mean())}

    def evaluate(self, model) -> dict:
        items = self.val if self.val else self.train
        ref = self.ref_val if self.val else self.ref_train
        lp = self._logps(model, items)
        loss, _, _, margin = dpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], self.beta)
        self.last_eval = {"val_loss": loss, "val_margin": float(margin.mean()),
                          "val_accuracy": float((margin > 0).mean()),
                          "held_out": bool(self.val)}
        return self.last_eval

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "calls": self.calls}

    def load_state_dict(self, d: dict) -> None:
        self.rng.bit_generator.state = d["rng"]
        self.calls = int(d["calls"])


# --- sampling completions ------------------------------------------------------------------------


def prompt_ids_for(tok, prompt: str, block_size: int, max_new_tokens: int) -> np.ndarray:
    """The prompt's ids, oldest tokens dropped so that max_new_tokens still fit the block."""
    if not 0 < max_new_tokens < block_size:
        raise ValueError(f"max_new_tokens must be in 1..{block_size - 1} (block_size "
                         f"{block_size} also holds the prompt), got {max_new_tokens}")
    return _prompt_ids(tok, prompt)[-(block_size - max_new_tokens):]


def sample_completion(model, tok, prompt_ids, max_new_tokens: int, *, seed: int,
                      temperature: float = 1.0, top_k=None, top_p=None) -> tuple:
    """One sampled answer: (response ids, text). generate() stops before a sampled
    <|endoftext|>; the ids put it back (it is part of what the policy chose), the text does not."""
    from .sample import generate

    new = np.asarray(generate(model, prompt_ids, max_new_tokens, temperature=temperature,
                              top_k=top_k, top_p=top_p, seed=seed, stop_ids=[tok.eot_id]),
                     dtype=np.int32)
    text = tok.decode(new)
    if new.size < max_new_tokens:
        new = np.append(new, np.int32(tok.eot_id))
    return new, text


# --- reward model --------------------------------------------------------------------------------


def reward_features(model, tok, prompts: Sequence[str], completions: Sequence[str],
                    batch_size: int = 16) -> np.ndarray:
    """(N, 2V) float64 features of each prompt+completion: the logits (= wte @ h_final) at the
    last position, and their mean over the completion's positions."""
    bs = model.config.block_size
    V = model.config.vocab_size
    out = np.zeros((len(prompts), 2 * V), dtype=np.float64)
    for i in range(0, len(prompts), batch_size):
        items = [encode_pair(tok, p, c, bs) for p, c in
                 zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
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
    loss = float(-_log_sigmoid(d).mean() + 0.5 * l2 * (w @ w))
    grad = -(_sigmoid(-d)[:, None] * d_phi).mean(axis=0) + l2 * w
    return loss, grad


class RewardModel:
    """A frozen GPT trunk with a linear scalar head over standardised features (module docstring).

    r(prompt, completion) = w . (phi - mu) / sigma + b, with b chosen so that the mean reward of
    the training completions is 0 (Bradley-Terry fixes only reward differences).
    """

    HEAD_FILE = "reward_head.safetensors"

    def __init__(self, model, tok, w=None, b: float = 0.0, mu=None, sigma=None):
        F = 2 * model.config.vocab_size
        self.model, self.tok = model, tok
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

    def score(self, prompt: str, completions: Sequence[str]) -> np.ndarray:
        """Rewards of several completions of one prompt."""
        phi = reward_features(self.model, self.tok, [prompt] * len(completions), completions)
        return self.score_features(phi)

    def save(self, run_dir, *, parent: Optional[str] = None, train_config: Optional[dict] = None):
        from safetensors.numpy import save

        from .checkpoint import save_run
        head = save({"w": self.w, "mu": self.mu, "sigma": self.sigma, "b": np.array([self.b])})
        save_run(run_dir, self.model, self.tok, train_config=train_config or {"stage": "reward"},
                 optimizer=None, state=None, parent=parent, files={self.HEAD_FILE: head})

    @classmethod
    def load(cls, run_dir) -> "RewardModel":
        from safetensors.numpy import load

        from .checkpoint import current_checkpoint, load_model, read_checkpoint_file
        if not (current_checkpoint(run_dir) / cls.HEAD_FILE).exists():
            raise FileNotFoundError(f"{run_dir} is not a reward model run (no {cls.HEAD_FILE}); "
                                    "train one with `lmlab reward`")
        model, tok, _ = load_model(run_dir)
        t = load(read_checkpoint_file(run_dir, cls.HEAD_FILE))
        return cls(model, tok, t["w"], float(t["b"][0]), t["mu"], t["sigma"])


def _pair_features(model, tok, records) -> tuple:
    """Features of every completion, and for every implied pair the (better, worse) rows."""
    prompts, comps, pairs = [], [], []
    for rec in records:
        base = len(comps)
        prompts += [rec["prompt"]] * len(rec["completions"])
        comps += list(rec["completions"])
        pairs += [(base + b, base + w) for b, w in pairs_from_ranking(rec["ranking"],
                                                                      len(rec["completions"]))]
    phi = reward_features(model, tok, prompts, comps) if comps else np.zeros((0, 0))
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
    phi, pairs = _pair_features(model, tok, train_records)
    if len(pairs) == 0:
        raise ValueError("the training rankings imply no (better, worse) pair; every ranking is "
                         "a single tie")
    rm = RewardModel(model, tok)
    rm.mu = phi.mean(axis=0)
    rm.sigma = phi.std(axis=0) + 1e-6
    z = rm._standardise(phi)
    d_phi = z[pairs[:, 0]] - z[pairs[:, 1]]
    w = np.zeros(phi.shape[1])
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    beta1, beta2 = 0.9, 0.999
    vphi, vpairs = _pair_features(model, tok, val_records) if val_records else (None, [])
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


# --- RL against a reward -------------------------------------------------------------------------


def leave_one_out_advantages(rewards: np.ndarray) -> np.ndarray:
    """A_i = r_i - mean_{j != i} r_j within each row (one prompt's K samples)."""
    r = np.asarray(rewards, dtype=np.float64)
    k = r.shape[-1]
    if k < 2:
        raise ValueError(f"a leave-one-out baseline needs K >= 2 samples per prompt, got {k}")
    return r - (r.sum(axis=-1, keepdims=True) - r) / (k - 1)


def judge_reward(judge: ScoreJudge) -> Callable:
    """A reward function (prompt, completions) -> rewards from a scoring judge."""
    return lambda prompt, comps: np.array([judge.score(prompt, c) for c in comps], np.float64)


class RLStage:
    """Policy gradient with a leave-one-out baseline and a KL penalty to a frozen reference.

    Each micro-batch: P prompts, K samples each from the policy; reward r_i from reward_fn; the
    sequence log-ratio kl_i = log pi(y_i) - log ref(y_i) (an unbiased estimate of KL(pi || ref))
    is folded into the reward, r'_i = r_i - kl_coef * kl_i, which makes the REINFORCE estimate the
    exact gradient of E[r] - kl_coef * KL. The surrogate loss -(1/PK) sum_i A_i log pi(y_i) has,
    with losses = -log pi per token, the per-token weight +A_i / (P K) on y_i's tokens.
    The log-probabilities are the model's own (temperature 1): sampling at another temperature or
    with top_k makes the estimate off-policy, so keep the defaults unless exploring that on purpose.
    """

    def __init__(self, model, ref_model, tok, prompts, val_prompts, reward_fn, *, k: int = 4,
                 prompts_per_step: int = 4, kl_coef: float = 1.0, max_new_tokens: int = 32,
                 temperature: float = 1.0, top_k=None, seed: int = 0, grad_accum: int = 1,
                 ):
        if k < 2:
            raise ValueError(f"k (samples per prompt) must be >= 2 for the baseline, got {k}")
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        if not prompts:
            raise ValueError("RL needs at least one prompt")
        bs = model.config.block_size
        self.ref, self.tok, self.reward_fn = ref_model, tok, reward_fn
        self.k, self.P, self.kl_coef = int(k), int(prompts_per_step), float(kl_coef)
        self.max_new, self.temperature, self.top_k = int(max_new_tokens), temperature, top_k
        self.prompts = list(prompts)
        self.val_prompts = list(val_prompts) or self.prompts
        self.ids = [prompt_ids_for(tok, p, bs, self.max_new) for p in self.prompts]
        self.val_ids = [prompt_ids_for(tok, p, bs, self.max_new) for p in self.val_prompts]
        self.T = bs
        self.rng = np.random.default_rng(seed)
        self.eval_seed = seed + 7919
        self.calls = 0
        self.grad_accum = grad_accum
        self.last_batch: dict = {}  # the latest rollouts, for inspection and teaching

    def _rollouts(self, model, prompt_ids, prompts, seeds) -> tuple:
        responses, texts = [], []
        for p, s in zip(prompt_ids, seeds):
            ids, text = sample_completion(model, self.tok, p, self.max_new, seed=int(s),
                                          temperature=self.temperature, top_k=self.top_k)
            responses.append(ids)
            texts.append(text)
        return responses, texts

    def _rewards(self, prompts, texts, group: int) -> np.ndarray:
        r = [self.reward_fn(prompts[i], texts[i: i + group]) for i in range(0, len(texts), group)]
        return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in r])

    def train_step(self, model, scale: float) -> dict:
        # 1) sample K answers for each of P prompts, and score them
        which = self.rng.integers(0, len(self.prompts), size=self.P)
        pids = [self.ids[i] for i in which for _ in range(self.k)]
        prompts = [self.prompts[i] for i in which for _ in range(self.k)]
        seeds = self.rng.integers(0, 2**31 - 1, size=len(pids))
        responses, texts = self._rollouts(model, pids, prompts, seeds)
        reward = self._rewards(prompts, texts, self.k)
        # 2) log-probabilities under the reference, then the policy (its forward feeds backward)
        x, y, mask = pack_for_loss(pids, responses, self.T, self.tok.eot_id)
        logp_ref = sequence_logprobs(self.ref, x, y, mask)
        logp = sequence_logprobs(model, x, y, mask)
        kl = logp - logp_ref
        shaped = (reward - self.kl_coef * kl).reshape(self.P, self.k)
        adv = leave_one_out_advantages(shaped).reshape(-1)
        # 3) the policy gradient through the weighted cross-entropy
        w = (adv / len(pids)).astype(np.float32)[:, None] * mask
        model.backward(w * np.float32(scale))
        self.calls += 1
        self.last_batch = {"x": x, "y": y, "mask": mask, "texts": texts, "reward": reward,
                           "kl": kl, "advantage": adv}
        n_tok = float(mask.sum())
        stats = {"reward": float(reward.mean()), "kl": float(kl.mean()),
                 "kl_per_token": float(kl.sum() / max(n_tok, 1.0)),
                 "response_tokens": n_tok / len(pids)}
        return {"loss": -float(shaped.mean()), "tokens": int(x.size), **stats}

    def evaluate(self, model) -> dict:
        seeds = self.eval_seed + np.arange(len(self.val_ids))
        responses, texts = self._rollouts(model, self.val_ids, self.val_prompts, seeds)
        reward = np.array([float(np.asarray(self.reward_fn(p, [t]), np.float64).reshape(-1)[0])
                           for p, t in zip(self.val_prompts, texts)])
        x, y, mask = pack_for_loss(self.val_ids, responses, self.T, self.tok.eot_id)
        kl = sequence_logprobs(model, x, y, mask) - sequence_logprobs(self.ref, x, y, mask)
        ev = {"val_reward": float(reward.mean()), "val_kl": float(kl.mean())}
        # The loop tracks "val_loss": here the negated objective E[r] - kl_coef * KL.
        ev["val_loss"] = -(ev["val_reward"] - self.kl_coef * ev["val_kl"])
        return ev

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "calls": self.calls}

    def load_state_dict(self, d: dict) -> None:
        self.rng.bit_generator.state = d["rng"]
        self.calls = int(d["calls"])


# --- measuring a tuned policy against its reference ----------------------------------------------


def compare_to_reference(policy, reference, tok, prompts: Sequence[str], judge, *,
                         max_new_tokens: int = 32, samples_per_prompt: int = 1,
                         temperature: float = 1.0, top_k=None, seed: int = 0) -> dict:
    """How often the judge prefers the policy's answer to the reference's (ties count half), and
    KL(policy || reference) estimated on the policy's own samples (nats per answer and per token).

    The two models sample with different seeds, so comparing a model with itself gives ~50%.
    """
    bs = policy.config.block_size
    prefs, kls, ntok, wins, ties = [], [], 0.0, 0, 0
    for i, prompt in enumerate(prompts):
        pids = prompt_ids_for(tok, prompt, bs, max_new_tokens)
        for s in range(samples_per_prompt):
            base = seed + 2 * (i * samples_per_prompt + s)
            ids, mine = sample_completion(policy, tok, pids, max_new_tokens, seed=base,
                                          temperature=temperature, top_k=top_k)
            _, theirs = sample_completion(reference, tok, pids, max_new_tokens, seed=base + 1,
                                          temperature=temperature, top_k=top_k)
            pref = judge_preference(judge, prompt, mine, theirs)
            prefs.append(pref)
            wins += pref == 1.0
            ties += pref == 0.5
            x, y, mask = pack_for_loss([pids], [ids], bs, tok.eot_id)
            kls.append(float(sequence_logprobs(policy, x, y, mask)[0]
                             - sequence_logprobs(reference, x, y, mask)[0]))
            ntok += float(mask.sum())
    n = len(prefs)
    return {"win_rate": float(np.mean(prefs)), "wins": int(wins), "ties": int(ties),
            "losses": int(n - wins - ties), "comparisons": n, "kl": float(np.mean(kls)),
            "kl_per_token": float(np.sum(kls) / max(ntok, 1.0))}


# --- the three stages as functions (what the command line calls) ---------------------------------


def _open_stage_run(run, out_dir, resume: bool, seed: int, train_kwargs: dict):
    from dataclasses import replace

    from .checkpoint import load_model
    from .train import TrainConfig, run_precision

    out_dir = Path(out_dir)
    if not resume and is_run(out_dir):
        raise FileExistsError(f"{out_dir} already holds a run; pass resume=True (--resume) to "
                              "continue it, or choose another run directory")
    if Path(run).resolve() == out_dir.resolve():
        raise ValueError(f"the tuned run must go to a new directory, not the parent {run}")
    model, tok, _ = load_model(run)
    cfg = TrainConfig(seed=seed, **train_kwargs)
    # The stage's reference computations (DPO's log-probabilities, RL's KL) run in the precision
    # the policy trains in, so the policy starts at exactly the reference.
    cfg = replace(cfg, precision=run_precision(cfg, out_dir, resume))
    model.matmul_precision = cfg.precision
    out_dir.mkdir(parents=True, exist_ok=True)
    return model, tok, cfg, out_dir


def _model_config(model) -> dict:
    from dataclasses import asdict
    return asdict(model.config)


def dpo(run, rankings, out_dir, *, beta: float = 0.1, batch_size: int = 8,
        sft_weight: float = 0.0, val_fraction: float = 0.1, resume: bool = False,
        seed: int = 1337, **train_kwargs):
    """Tune the policy in `run` on rankings (paths) by DPO into out_dir; returns (TrainResult,
    stage), the stage holding the last held-out margin and accuracy in .last_eval.

    The defaults here are plain DPO; `lmlab dpo` defaults to beta 0.5 with sft_weight 1, the
    setting benchmarks/preference_eval.py measured."""
    from .train import train

    paths = [rankings] if isinstance(rankings, (str, os.PathLike)) else list(rankings)
    records = [r for p in paths for r in load_rankings(p)]
    train_recs, val_recs = split_records(records, val_fraction, seed)
    model, tok, cfg, out_dir = _open_stage_run(run, out_dir, resume, seed, train_kwargs)
    stage = DPOStage(model, tok, preference_pairs(train_recs), preference_pairs(val_recs),
                     beta=beta, batch_size=batch_size, seed=seed, grad_accum=cfg.grad_accum,
                     sft_weight=sft_weight)
    run_config = {"stage": "dpo", "rankings": [str(p) for p in paths], "beta": beta,
                  "sft_weight": sft_weight,
                  "batch_size": batch_size, "val_fraction": val_fraction,
                  "train_pairs": len(stage.train), "val_pairs": len(stage.val),
                  "model": _model_config(model)}
    result = train(model, stage, cfg, out_dir, tokenizer=tok, run_config=run_config,
                   resume=resume, parent=str(run))
    if not stage.last_eval:  # evaluation was off during training: report once at the end
        stage.evaluate(model)
    stage.val_prompts = sorted({r["prompt"] for r in val_recs})
    return result, stage


def rlhf(run, prompts, out_dir, *, reward_model=None, judge=None, k: int = 4,
         prompts_per_step: int = 4, kl_coef: float = 1.0, max_new_tokens: int = 32,
         temperature: float = 1.0, top_k=None, val_fraction: float = 0.1, resume: bool = False,
         seed: int = 1337, **train_kwargs):
    """Tune the policy in `run` by RL against a reward model run dir (or a scripted judge's
    scores) on prompts (a list, or a file for read_prompts); returns (TrainResult, stage)."""
    from .checkpoint import load_model
    from .train import train

    if (reward_model is None) == (judge is None):
        raise ValueError("give exactly one of reward_model (a `lmlab reward` run) or judge")
    if isinstance(prompts, (str, os.PathLike)):
        prompts = read_prompts(prompts)
    if judge is not None:
        judge = make_judge(judge) if isinstance(judge, str) else judge
        reward_fn, source = judge_reward(judge), f"judge {judge!r}"
    else:
        rm = RewardModel.load(reward_model)
        reward_fn, source = rm.score, str(reward_model)
    recs = [{"prompt": p} for p in prompts]
    train_p, val_p = split_records(recs, val_fraction, seed)
    train_kwargs.setdefault("log_every", 1)  # mean reward and KL of every step in metrics.jsonl
    model, tok, cfg, out_dir = _open_stage_run(run, out_dir, resume, seed, train_kwargs)
    ref, _, _ = load_model(run)
    ref.matmul_precision = model.matmul_precision
    stage = RLStage(model, ref, tok, [r["prompt"] for r in train_p], [r["prompt"] for r in val_p],
                    reward_fn, k=k, prompts_per_step=prompts_per_step, kl_coef=kl_coef,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    seed=seed, grad_accum=cfg.grad_accum)
    run_config = {"stage": "rlhf", "reward": source, "k": k, "prompts_per_step": prompts_per_step,
                  "kl_coef": kl_coef, "max_new_tokens": max_new_tokens,
                  "temperature": temperature, "top_k": top_k, "model": _model_config(model)}
    result = train(model, stage, cfg, out_dir, tokenizer=tok, run_config=run_config,
                   resume=resume, parent=str(run))
    return result, stage


def reward(run, rankings, out_dir, *, val_fraction: float = 0.2, steps: int = 300,
           lr: float = 0.05, l2: float = 1e-2, seed: int = 1337) -> tuple:
    """Train a reward model on rankings (paths) over the frozen trunk of `run`; save it to
    out_dir; returns (RewardModel, report with held-out pairwise accuracy)."""
    from .checkpoint import append_metrics, load_model

    paths = [rankings] if isinstance(rankings, (str, os.PathLike)) else list(rankings)
    records = [r for p in paths for r in load_rankings(p)]
    train_recs, val_recs = split_records(records, val_fraction, seed)
    out_dir = Path(out_dir)
    if is_run(out_dir):
        raise FileExistsError(f"{out_dir} already holds a reward model; choose another directory")
    model, tok, _ = load_model(run)
    out_dir.mkdir(parents=True, exist_ok=True)
    rm, report = train_reward_model(model, tok, train_recs, val_recs, steps=steps, lr=lr, l2=l2,
                                    log=lambda row: append_metrics(out_dir, row))
    rm.save(out_dir, parent=str(run), train_config={
        "stage": "reward", "rankings": [str(p) for p in paths], "val_fraction": val_fraction,
        "steps": steps, "lr": lr, "l2": l2, "seed": seed, "model": _model_config(model),
        "precision": model.matmul_precision,
        "features": "logits at the last position + mean logits over the completion",
        "report": report})
    return rm, report


# --- command line --------------------------------------------------------------------------------


def add_preference_commands(subparsers) -> None:
    """Add the verbs rank, reward, dpo and rlhf to the `lmlab` command's subparsers."""
    from . import rank as rank_module
    from .cli import _add_threads
    rank_module.add_rank_arguments(subparsers.add_parser(
        "rank", help="sample K answers per prompt and rank them (you, or a scripted judge)",
        description="For each prompt, sample K completions with distinct seeds and rank them "
                    "best first; every judgement is appended to the rankings JSONL at once, and "
                    "a later run resumes where this one stopped."))

    p = subparsers.add_parser("reward", help="train a reward model on rankings (Bradley-Terry)",
                              description="A frozen GPT from RUN with a linear scalar head fitted "
                                          "on every pair the rankings imply; reports held-out "
                                          "pairwise accuracy.")
    p.add_argument("run", help="run directory whose transformer the reward model reads")
    p.add_argument("--rankings", nargs="+", required=True, help="rankings / pairs JSONL file(s)")
    p.add_argument("--out", required=True, help="directory for the reward model")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out share of rankings")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--l2", type=float, default=1e-2, help="weight penalty on the head")
    p.add_argument("--seed", type=int, default=1337)
    _add_threads(p)
    p.set_defaults(func=_cmd_reward)

    p = _tuner_parser(subparsers, "dpo", "tune toward preferred answers by DPO",
                      "Direct preference optimisation against the frozen RUN as reference.",
                      "--rankings", nargs="+", help="rankings / pairs JSONL file(s)")
    p.add_argument("--beta", type=float, default=0.5, help="DPO temperature (default 0.5)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch")
    p.add_argument("--sft-weight", type=float, default=1.0,
                   help="add this times the chosen answers' mean token NLL, an anchor that keeps "
                        "the text fluent (default 1; 0 is plain DPO)")
    _finish_tuner(p, _cmd_dpo, "rankings", steps=150, lr=1e-4)

    p = _tuner_parser(subparsers, "rlhf", "tune by RL against a reward model (or a judge)",
                      "Policy gradient with a leave-one-out baseline and a KL penalty to the "
                      "frozen RUN; mean reward and KL of every step in the run's metrics.jsonl.",
                      "--prompts", help="prompts file (one per line, or JSONL)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--reward-model", help="a `lmlab reward` output directory")
    src.add_argument("--judge", help="score with a scripted judge: word:WORD, shorter, longer")
    p.add_argument("-k", "--samples", type=int, default=4, help="samples per prompt (>= 2)")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--kl-coef", type=float, default=1.0,
                   help="KL penalty: reward units per nat of log(policy/reference) (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; 1.0 (with no --top-k) keeps the gradient on-policy")
    p.add_argument("--top-k", type=int, default=None)
    _finish_tuner(p, _cmd_rlhf, "prompts", steps=100, lr=3e-4)
    p.set_defaults(log_every=1)  # reward and KL of every step


def _tuner_parser(subparsers, name: str, summary: str, description: str, data_flag: str,
                  **data):
    p = subparsers.add_parser(name, help=summary, description=description + " Ctrl-C stops with "
                              "a checkpoint; --resume continues.")
    p.add_argument("run", help="run directory: the policy's start and the reference")
    p.add_argument(data_flag, required=True, **data)
    p.add_argument("--out", required=True, help="new run directory")
    return p


def _finish_tuner(p, func, held_out_what: str, *, steps: int, lr: float) -> None:
    from .cli import _add_threads, _add_train_options

    p.add_argument("--val-fraction", type=float, default=0.1,
                   help=f"held-out share of the {held_out_what}")
    p.add_argument("--eval-judge", default=None, metavar="SPEC",
                   help="after training, how often this judge (word:WORD|shorter|longer) prefers "
                        "the tuned answer to the reference's on --eval-prompts")
    p.add_argument("--eval-prompts", default=None, help="prompts file for --eval-judge")
    p.add_argument("--eval-samples", type=int, default=2, help="answers per prompt for the eval")
    p.add_argument("--eval-max-new-tokens", type=int, default=32)
    p.add_argument("--resume", action="store_true")
    # Defaults measured by benchmarks/preference_eval.py on a small char model.
    _add_train_options(p, steps=steps, lr=lr, warmup=10)
    _add_threads(p)
    p.set_defaults(func=func)


def _train_options(args) -> dict:
    from .cli import _train_kwargs
    return _train_kwargs(args)


def _report(result, out) -> None:
    from .cli import _report_training
    _report_training(result, out)


def _judge_eval(args, prompts) -> None:
    from .checkpoint import load_model

    if not args.eval_judge:
        return
    if args.eval_prompts:
        prompts = read_prompts(args.eval_prompts)
    if not prompts:
        raise ValueError("--eval-judge needs prompts: give --eval-prompts")
    policy, tok, _ = load_model(args.out)
    reference, _, _ = load_model(args.run)
    res = compare_to_reference(policy, reference, tok, prompts, make_judge(args.eval_judge),
                               max_new_tokens=args.eval_max_new_tokens,
                               samples_per_prompt=args.eval_samples,
                               seed=args.seed)
    print(f"judge {args.eval_judge}: prefers the tuned answer on {res['win_rate']:.1%} of "
          f"{res['comparisons']} comparisons (wins {res['wins']}, ties {res['ties']}, losses "
          f"{res['losses']}); KL(tuned || reference) {res['kl']:.3f} nats per answer, "
          f"{res['kl_per_token']:.4f} per token")


def _cmd_reward(args) -> int:
    from .cli import _apply_threads

    _apply_threads(args)
    _, rep = reward(args.run, args.rankings, args.out, val_fraction=args.val_fraction,
                    steps=args.steps, lr=args.lr, l2=args.l2, seed=args.seed)
    val = (f"held-out pairwise accuracy {rep['val_accuracy']:.1%} on {rep['val_pairs']} pairs"
           if "val_accuracy" in rep else "no held-out pairs (raise --val-fraction)")
    print(f"reward model: train accuracy {rep['train_accuracy']:.1%} on {rep['train_pairs']} "
          f"pairs, {val}; saved in {args.out}")
    return 0


def _cmd_dpo(args) -> int:
    from .cli import _apply_threads

    _apply_threads(args)
    result, stage = dpo(args.run, args.rankings, args.out, beta=args.beta,
                        batch_size=args.batch_size, sft_weight=args.sft_weight,
                        val_fraction=args.val_fraction,
                        resume=args.resume, seed=args.seed, **_train_options(args))
    _report(result, args.out)
    ev = stage.last_eval
    where = "held-out" if ev["held_out"] else "training"
    print(f"DPO on {where} pairs: implicit reward margin {ev['val_margin']:.3f}, "
          f"preference accuracy {ev['val_accuracy']:.1%}")
    _judge_eval(args, stage.val_prompts)
    return 0


def _cmd_rlhf(args) -> int:
    from .cli import _apply_threads

    _apply_threads(args)
    result, stage = rlhf(args.run, args.prompts, args.out, reward_model=args.reward_model,
                         judge=args.judge, k=args.samples, prompts_per_step=args.prompts_per_step,
                         kl_coef=args.kl_coef, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k,
                         val_fraction=args.val_fraction, resume=args.resume, seed=args.seed,
                         **_train_options(args))
    _report(result, args.out)
    print(f"mean reward and KL per step: {Path(args.out) / 'metrics.jsonl'}")
    _judge_eval(args, stage.val_prompts)
    return 0
