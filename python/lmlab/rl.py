"""RL from a reward: the policy gradient with a leave-one-out baseline and a KL penalty to the
frozen run it starts from, against a reward model (lmlab.reward_model) or a scripted judge.

The surrogate loss depends on sequence log-probabilities only, so like DPO it reaches the model as
one coefficient per sequence on its response tokens, through the shared training loop; the mean
reward and KL of every step go to the run's metrics.jsonl.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import numpy as np

from . import distributed
from .checkpoint import load_model
from .judges import judge_reward, make_judge
from .rankings import check_prompts, read_prompts, split_records
from .reward_model import RewardModel
from .rundir import check_apart, is_run
from .sequences import pack_for_loss, prompt_ids_for, sample_completion, sequence_logprobs
from .stage import StageResult, open_stage
from .train import train


def leave_one_out_advantages(rewards: np.ndarray) -> np.ndarray:
    """A_i = r_i - mean_{j != i} r_j within each row (one prompt's K samples)."""
    r = np.asarray(rewards, dtype=np.float64)
    k = r.shape[-1]
    if k < 2:
        raise ValueError(f"a leave-one-out baseline needs K >= 2 samples per prompt, got {k}")
    return r - (r.sum(axis=-1, keepdims=True) - r) / (k - 1)


class RLStage:
    """Policy gradient with a leave-one-out baseline and a KL penalty to a frozen reference.

    Each micro-batch: P prompts, K samples each from the policy; reward r_i from
    reward_fn(prompt, texts, ended), which gets one prompt's K answers and the end token each
    ended with (sequences.sample_completion: True for the end of answer, an imported model's own
    end token by name, False for none; what a reward model trained on rankings scores, with the
    token the policy chose; a judge reads the text); the sequence log-ratio
    kl_i = log pi(y_i) - log ref(y_i) (an unbiased estimate of KL(pi || ref))
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
        responses, texts, ended = [], [], []
        for p, s in zip(prompt_ids, seeds):
            ids, text, end = sample_completion(model, self.tok, p, self.max_new, seed=int(s),
                                               temperature=self.temperature, top_k=self.top_k)
            responses.append(ids)
            texts.append(text)
            ended.append(end)
        return responses, texts, ended

    def _rewards(self, prompts, texts, ended, group: int) -> np.ndarray:
        r = [self.reward_fn(prompts[i], texts[i: i + group], ended[i: i + group])
             for i in range(0, len(texts), group)]
        return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in r])

    def train_step(self, model) -> dict:
        # 1) sample K answers for each of P prompts, and score them
        which = self.rng.integers(0, len(self.prompts), size=self.P)
        pids = [self.ids[i] for i in which for _ in range(self.k)]
        prompts = [self.prompts[i] for i in which for _ in range(self.k)]
        seeds = self.rng.integers(0, 2**31 - 1, size=len(pids))
        responses, texts, ended = self._rollouts(model, pids, prompts, seeds)
        reward = self._rewards(prompts, texts, ended, self.k)
        # 2) log-probabilities under the reference, then the policy (its forward feeds backward)
        x, y, mask = pack_for_loss(pids, responses, self.T, self.tok.eot_id)
        logp_ref = sequence_logprobs(self.ref, x, y, mask)
        logp = sequence_logprobs(model, x, y, mask)
        kl = logp - logp_ref
        shaped = (reward - self.kl_coef * kl).reshape(self.P, self.k)
        adv = leave_one_out_advantages(shaped).reshape(-1)
        # 3) the policy gradient as weights on the token losses (the loop runs the backward)
        w = (adv / len(pids)).astype(np.float32)[:, None] * mask
        self.calls += 1
        self.last_batch = {"x": x, "y": y, "mask": mask, "texts": texts, "reward": reward,
                           "kl": kl, "advantage": adv}
        n_tok = float(mask.sum())
        stats = {"reward": float(reward.mean()), "kl": float(kl.mean()),
                 "kl_per_token": float(kl.sum() / max(n_tok, 1.0)),
                 "response_tokens": n_tok / len(pids)}
        return {"loss": -float(shaped.mean()), "tokens": int(x.size), "weights": w, **stats}

    def skip_step(self) -> None:
        self.rng.integers(0, len(self.prompts), size=self.P)
        self.rng.integers(0, 2**31 - 1, size=self.P * self.k)
        self.calls += 1

    def evaluate(self, model) -> dict:
        seeds = self.eval_seed + np.arange(len(self.val_ids))
        responses, texts, ended = self._rollouts(model, self.val_ids, self.val_prompts, seeds)
        reward = np.array([float(np.asarray(self.reward_fn(p, [t], [e]), np.float64).reshape(-1)[0])
                           for p, t, e in zip(self.val_prompts, texts, ended)])
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


def rlhf(run, prompts, out_dir, *, resume: bool = False, overwrite: bool = False,
         threads: Optional[int] = None, **settings) -> StageResult:
    """Tune the policy in `run` by RL on prompts (a prompts file for read_prompts, or a list)
    into out_dir, against settings["reward_model"] (a `lmlab reward` run) or settings["judge"]
    (a spec such as "word:cat"): exactly one. settings: any of STAGE_DEFAULTS["rlhf"]. The
    result's details hold "val_prompts" and "train_prompts" (the held-out and the training
    prompts) and "tuner" (the RLStage)."""
    prompt_list = None
    if isinstance(prompts, (list, tuple)):
        prompt_list, prompts = list(prompts), None
    elif prompts is not None:
        prompts = str(prompts)
    with open_stage("rlhf", out_dir, {"prompts": prompts, **settings}, resume=resume,
                    overwrite=overwrite, parent=run, threads=threads) as opened:
        s = opened.settings
        # Each machine reads its own copy of the reward model: one that lacks it is named, as a
        # missing parent run is (open_stage). Every rank asks, so none waits for another.
        rm_seen = None if s["reward_model"] is None else is_run(s["reward_model"])
        distributed.world().check_same(
            "run", {"reward model": {None: None, True: "a run", False: "no run"}[rm_seen]},
            {"reward model": f"the reward model {s['reward_model']}"})
        if (s["reward_model"] is None) == (s["judge"] is None):
            raise ValueError("give exactly one of reward_model (a `lmlab reward` run, "
                             "--reward-model) or judge (--judge)")
        if prompt_list is None and s["prompts"] is None:
            raise ValueError("RL needs prompts (--prompts FILE)")
        if s["reward_model"] is not None:
            # A second run the stage reads: --overwrite into it would replace the reward model.
            check_apart(opened.out, s["reward_model"], "the reward model it scores with")
        if s["judge"] is not None:
            judge = make_judge(s["judge"])
            reward_fn, source = judge_reward(judge), f"judge {judge!r}"
        else:
            rm = RewardModel.load(s["reward_model"])
            reward_fn, source = rm.score, str(s["reward_model"])
        model, tok, _ = load_model(run)
        if prompt_list is None:
            prompt_list = read_prompts(s["prompts"], tokenizer=tok)
        else:
            check_prompts(prompt_list, tok)
        train_p, val_p = split_records([{"prompt": p} for p in prompt_list], s["val_fraction"],
                                       s["seed"])
        if s["reward_model"] is not None:
            rm.check_reads(tok, name=f"reward model {s['reward_model']}", run=str(run))
        ref, _, _ = load_model(run)
        cfg = opened.train_config()
        # The KL reference computes in the precision the policy trains in, so the policy starts
        # at exactly the reference.
        model.matmul_precision = ref.matmul_precision = cfg.precision
        stage = RLStage(model, ref, tok, [r["prompt"] for r in train_p],
                        [r["prompt"] for r in val_p], reward_fn, k=s["k"],
                        prompts_per_step=s["prompts_per_step"], kl_coef=s["kl_coef"],
                        max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
                        top_k=s["top_k"], seed=s["seed"], grad_accum=cfg.grad_accum)
        run_config = opened.run_config(
            reward=source, k=s["k"], prompts_per_step=s["prompts_per_step"],
            kl_coef=s["kl_coef"], max_new_tokens=s["max_new_tokens"],
            temperature=s["temperature"], top_k=s["top_k"], model=asdict(model.config))
        result = train(model, stage, cfg, opened.hold(), tokenizer=tok,
                       run_config=run_config, resume=resume, parent=str(run))
    return StageResult.from_training("rlhf", out_dir, result,
                                     val_prompts=[r["prompt"] for r in val_p],
                                     train_prompts=[r["prompt"] for r in train_p], tuner=stage)
