"""End-to-end measures of learning from rankings (issue 5), from nothing, in a few minutes.

    python benchmarks/preference_eval.py --out runs/pref-eval [--judge word:the] [--threads 1]

1. pretrain a small char-level GPT on builtin:python-docs (skipped when --out already holds it);
2. prompts: text snippets from the corpus; most are ranked, the rest are held out;
3. rankings: K samples per prompt, ranked by the scripted judge through the same session a person
   uses (lmlab.rank.run_session);
4. reward model on the rankings: held-out pairwise accuracy;
5. DPO on the rankings, and RL against the reward model: how often the judge prefers the tuned
   policy's answer to the reference model's on held-out prompts (ties count half), with the KL
   from the reference; "before" compares the reference with itself (independent samples).
Prints one JSON object per measure and a summary table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lmlab import ops
from lmlab.dpo import dpo
from lmlab.judges import compare_to_reference, make_judge
from lmlab.rankings import load_rankings, preference_pairs
from lmlab.reward_model import RewardModel, reward
from lmlab.rl import rlhf
from lmlab.checkpoint import load_model
from lmlab.metrics import read_metrics
from lmlab.data import load_corpus
from lmlab.pretrain import pretrain
from lmlab.rank import answer_sampler, run_session
from lmlab.rundir import is_run


def corpus_prompts(n: int, length: int, seed: int) -> list:
    """n snippets of the corpus, each ending just after a space, so the answer starts a word."""
    text = load_corpus("builtin:python-docs")
    rng = np.random.default_rng(seed)
    out: list = []
    while len(out) < n:
        start = int(rng.integers(0, len(text) - 4 * length))
        snippet = text[start: start + 3 * length]
        cut = snippet.rfind(" ", 0, length)
        if cut < length // 2 or "\n" in snippet[:cut]:
            continue
        p = snippet[: cut + 1]
        if p not in out:
            out.append(p)
    return out


def emit(row: dict) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
          flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, every value checked: a bad one ends here (exit 2), before any work."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/pref-eval")
    ap.add_argument("--judge", default="word:the", help="word:WORD, shorter or longer")
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--rank-prompts", type=int, default=300, help="prompts ranked by the judge")
    ap.add_argument("--held-out", type=int, default=60, help="held-out prompts for the measures")
    ap.add_argument("-k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dpo-steps", type=int, default=150)
    ap.add_argument("--dpo-beta", type=float, default=0.5)
    ap.add_argument("--dpo-sft", type=float, default=1.0, help="DPO's chosen-NLL anchor weight")
    ap.add_argument("--dpo-lr", type=float, default=1e-4)
    ap.add_argument("--rl-steps", type=int, default=100)
    ap.add_argument("--rl-lr", type=float, default=3e-4)
    ap.add_argument("--kl-coef", type=float, default=1.0)
    ap.add_argument("--samples", type=int, default=2, help="answers per held-out prompt")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # --threads 0 was dropped (all cores, unsaid); a negative one ended in a traceback
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads {args.threads}: expected an integer >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        ops.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base"
    judge = make_judge(args.judge)
    L = args.max_new_tokens
    summary = {}

    # 1) the base model
    t0 = time.perf_counter()
    if not is_run(base):
        pretrain("builtin:python-docs", base, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd,
                 block_size=args.block_size, batch_size=16, steps=args.pretrain_steps, lr=3e-3,
                 warmup_steps=100, eval_every=500, save_every=0, progress=False, seed=args.seed)
    model, tok, _ = load_model(base)
    reference, _, _ = load_model(base)
    bs = model.config.block_size
    emit({"measure": "pretrain", "run": str(base), "seconds": time.perf_counter() - t0})

    # 2) prompts; 3) rankings by the judge through the ranking session
    prompts = corpus_prompts(args.rank_prompts + args.held_out, bs - L, args.seed)
    ranked, held_out = prompts[: args.rank_prompts], prompts[args.rank_prompts:]
    (out / "prompts.txt").write_text("\n".join(p.replace("\n", "\\n") for p in ranked),
                                     encoding="utf-8")
    # One rankings file per judge: a rerun with another judge must not resume the first's file.
    rankings = out / f"rankings-{judge.name.replace(':', '-')}.jsonl"
    t0 = time.perf_counter()

    # Completion j of ranked prompt i: seed SEED + 1000 + K*i + j, as `lmlab rank --seed` does.
    run_session(ranked, answer_sampler(model, tok, L, seed=args.seed + 1000), rankings, args.k,
                judge=judge, judge_name=judge.name, write=lambda s: None)
    recs = load_rankings(rankings)
    emit({"measure": "rankings", "judge": judge.name, "rankings": len(recs),
          "pairs": len(preference_pairs(recs)), "seconds": time.perf_counter() - t0})

    def measure(name: str, policy) -> dict:
        res = compare_to_reference(policy, reference, tok, held_out, judge, max_new_tokens=L,
                                      samples_per_prompt=args.samples, seed=args.seed + 99)
        emit({"measure": name, **res})
        summary[name] = res
        return res

    measure("before (reference vs itself)", reference)

    # 4) reward model
    t0 = time.perf_counter()
    rm_dir = out / "reward"
    if (rm_dir / RewardModel.HEAD_FILE).exists():
        rm_dir = out / f"reward-{int(time.time())}"
    rep = reward(base, rankings, rm_dir, val_fraction=0.2, seed=args.seed).details["report"]
    emit({"measure": "reward model", **rep, "seconds": time.perf_counter() - t0})
    summary["reward model"] = rep

    # 5) DPO
    t0 = time.perf_counter()
    dpo_dir = out / f"dpo-{int(time.time())}"
    result = dpo(base, rankings, dpo_dir, beta=args.dpo_beta, sft_weight=args.dpo_sft,
                 batch_size=8, val_fraction=0.1, steps=args.dpo_steps, lr=args.dpo_lr,
                 warmup_steps=10, eval_every=50, weight_decay=0.0, save_every=0,
                 progress=False, seed=args.seed)
    emit({"measure": "dpo training", **result.details["eval"], "seconds": time.perf_counter() - t0})
    tuned, _, _ = load_model(dpo_dir)
    measure("DPO", tuned)

    # 6) RL against the reward model
    t0 = time.perf_counter()
    rl_dir = out / f"rlhf-{int(time.time())}"
    rlhf(base, out / "prompts.txt", rl_dir, reward_model=rm_dir, k=args.k,
         prompts_per_step=4, kl_coef=args.kl_coef, max_new_tokens=L, steps=args.rl_steps,
         lr=args.rl_lr, warmup_steps=10, eval_every=50, weight_decay=0.0, save_every=0,
         progress=False, seed=args.seed)
    rows = read_metrics(rl_dir)
    steps = [r for r in rows if "reward" in r]
    first, last = steps[: len(steps) // 10 or 1], steps[-(len(steps) // 10 or 1):]
    emit({"measure": "rl training", "steps": len(steps),
          "reward_first_10pct": float(np.mean([r["reward"] for r in first])),
          "reward_last_10pct": float(np.mean([r["reward"] for r in last])),
          "kl_last_10pct": float(np.mean([r["kl"] for r in last])),
          "seconds": time.perf_counter() - t0})
    tuned, _, _ = load_model(rl_dir)
    measure("RL (reward model)", tuned)

    print(f"\njudge {judge.name}; {len(held_out)} held-out prompts x {args.samples} answers; "
          "win rate counts ties as half")
    print(f"{'policy':32} {'win rate':>9} {'W/T/L':>12} {'KL nats/answer':>15} {'per token':>10}")
    for name in ("before (reference vs itself)", "DPO", "RL (reward model)"):
        r = summary[name]
        wtl = f"{r['wins']}/{r['ties']}/{r['losses']}"
        print(f"{name:32} {r['win_rate']:9.1%} {wtl:>12} {r['kl']:15.3f} {r['kl_per_token']:10.4f}")
    rm = summary["reward model"]
    print(f"reward model: held-out pairwise accuracy {rm.get('val_accuracy', float('nan')):.1%} "
          f"on {rm['val_pairs']} pairs (train {rm['train_accuracy']:.1%} on {rm['train_pairs']})")


if __name__ == "__main__":
    main()
