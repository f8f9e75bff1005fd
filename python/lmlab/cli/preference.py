"""The verbs that learn from rankings: rank (collect them), reward, dpo and rlhf (train on them)."""

from __future__ import annotations

import sys
from pathlib import Path

from .. import checks
from ..checkpoint import load_model, load_tokenizer, read_config
from ..dpo import dpo
from ..judges import compare_to_reference, make_judge
from ..rank import answer_sampler, run_session
from ..rankings import check_rankings_output, read_prompts
from ..reward_model import reward
from ..sequences import check_answer_fits
from ..rl import rlhf
from ..stage import STAGE_DEFAULTS
from .common import (add_run_output, add_setting, add_threads, add_train_options, apply_threads,
                     given_settings, report_training)

EVAL_DEFAULTS = {"eval_samples": 2, "eval_max_new_tokens": 32}  # --eval-judge's answers


def add_commands(sub) -> None:
    p = sub.add_parser("rank", help="sample K answers per prompt and rank them (you, or a "
                                    "scripted judge)",
                       description="For each prompt, sample K completions with distinct seeds "
                                   "and rank them best first; every judgement is appended to the "
                                   "rankings JSONL at once (with which answers ended with the "
                                   "end-of-answer token, which reward and dpo then score), and a "
                                   "later run resumes where this one stopped.")
    p.add_argument("run", help="run directory of the model that answers")
    p.add_argument("--prompts", required=True, help="prompts file (one per line, or JSONL)")
    p.add_argument("--out", required=True, help="rankings JSONL (appended to; resumes)")
    p.add_argument("-k", "--samples", dest="k", type=int, default=4,
                   help="completions per prompt, >= 2 (default 4)")
    p.add_argument("--judge", default=None, metavar="SPEC",
                   help="rank with a scripted judge instead of a person: word:WORD, shorter, "
                        "longer")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="at most this many new tokens; an answer stopped here has not ended")
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the k most likely (default: from every token)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling, in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=0,
                   help="completion j of prompt i uses seed SEED + K*i + j")
    add_threads(p)
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("reward", help="train a reward model on rankings (Bradley-Terry)",
                       description="A frozen GPT from RUN with a linear scalar head fitted on "
                                   "every pair the rankings imply; reports held-out pairwise "
                                   "accuracy.")
    add_run_output(p, derived=True, resume=False)
    p.add_argument("--rankings", nargs="+", required=True,
                   help="rankings / pairs JSONL file(s); an answer marked ended is read with its "
                        "end token")
    add_setting(p, "reward", "val_fraction", float,
                "held-out share of the prompts ranked (each with all its rankings)")
    add_setting(p, "reward", "steps", int)
    add_setting(p, "reward", "lr", float)
    add_setting(p, "reward", "l2", float, "weight penalty on the head")
    add_setting(p, "reward", "seed", int)
    add_threads(p)
    p.set_defaults(func=cmd_reward)

    p = _tuner(sub, "dpo", "tune toward preferred answers by DPO",
               "Direct preference optimisation against the frozen RUN as reference.")
    p.add_argument("--rankings", nargs="+", default=None,
                   help="rankings / pairs JSONL file(s) (required; with --resume, the run's "
                        "own); an answer marked ended is scored with its end token")
    add_setting(p, "dpo", "beta", float, "DPO temperature")
    add_setting(p, "dpo", "batch_size", int, "pairs per micro-batch")
    add_setting(p, "dpo", "sft_weight", float,
                "add this times the chosen answers' mean token NLL, an anchor that keeps the text "
                "fluent (0 is plain DPO)")
    _finish_tuner(p, "dpo", cmd_dpo, "prompts ranked (each with all its rankings)")

    p = _tuner(sub, "rlhf", "tune by RL against a reward model (or a judge)",
               "Policy gradient with a leave-one-out baseline and a KL penalty to the frozen RUN; "
               "mean reward and KL of every step in the run's metrics.jsonl.")
    p.add_argument("--prompts", default=None,
                   help="prompts file, one per line or JSONL (required; with --resume, the run's)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--reward-model", help="a `lmlab reward` output directory")
    src.add_argument("--judge", help="score with a scripted judge: word:WORD, shorter, longer")
    add_setting(p, "rlhf", "k", int, "samples per prompt (>= 2)")
    add_setting(p, "rlhf", "prompts_per_step", int)
    add_setting(p, "rlhf", "kl_coef", float,
                "KL penalty: reward units per nat of log(policy/reference)")
    add_setting(p, "rlhf", "max_new_tokens", int)
    add_setting(p, "rlhf", "temperature", float,
                "sampling temperature; 1.0 (with no --top-k) keeps the gradient on-policy")
    add_setting(p, "rlhf", "top_k", int, "sample from the k most likely (default: from every "
                "token)")
    _finish_tuner(p, "rlhf", cmd_rlhf, "prompts")


def _tuner(sub, name: str, summary: str, description: str):
    p = sub.add_parser(name, help=summary, description=description + " Ctrl-C stops with a "
                       "checkpoint; --resume continues.")
    p.add_argument("parent", metavar="run",
                   help="run directory: the policy's start and the reference")
    p.add_argument("--out", required=True, help="new run directory")
    return p


def _finish_tuner(p, stage: str, func, held_out_what: str) -> None:
    add_setting(p, stage, "val_fraction", float, f"held-out share of the {held_out_what}")
    p.add_argument("--eval-judge", default=None, metavar="SPEC",
                   help="after training, how often this judge (word:WORD|shorter|longer) prefers "
                        "the tuned answer to the reference's on --eval-prompts (default: the "
                        "held-out prompts, or the training prompts if none is held out)")
    p.add_argument("--eval-prompts", default=None, help="prompts file for --eval-judge")
    p.add_argument("--eval-samples", type=int, default=None,
                   help=f"answers per prompt for --eval-judge (default {EVAL_DEFAULTS['eval_samples']})")
    p.add_argument("--eval-max-new-tokens", type=int, default=None,
                   help="at most this many new tokens per answer for --eval-judge (default "
                        f"{EVAL_DEFAULTS['eval_max_new_tokens']})")
    add_run_output(p, derived=False)
    add_train_options(p, stage)
    add_threads(p)
    p.set_defaults(func=func)


def cmd_rank(args) -> int:
    apply_threads(args)
    checks.check_values(k=args.k, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed)
    judge = make_judge(args.judge) if args.judge is not None else None  # '' is refused
    check_rankings_output(args.out, name="out")
    model, tok, _ = load_model(args.run)
    # Every prompt is checked now: one the run cannot encode stopped the session at its turn.
    prompts = read_prompts(args.prompts, tokenizer=tok)
    sample = answer_sampler(model, tok, args.max_new_tokens, seed=args.seed,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    try:
        run_session(prompts, sample, args.out, args.k, judge=judge,
                    judge_name=args.judge or "human", write=lambda s: print(s, flush=True),
                    max_new_tokens=args.max_new_tokens)
    except KeyboardInterrupt:  # while sampling; every judgement so far is already on disk
        print("\nlmlab rank: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def _judge_eval(args, details) -> None:
    """--eval-judge after training, on --eval-prompts, else the held-out prompts, else (a file of
    one prompt holds none out) the training prompts, said so."""
    if args.eval_judge is None:
        return
    where = ""
    if args.eval_prompts is not None:
        prompts = read_prompts(args.eval_prompts)
    elif details["val_prompts"]:
        prompts = details["val_prompts"]
    else:
        prompts, where = details["train_prompts"], " (on the training prompts: none is held out)"
    policy, tok, _ = load_model(args.out)
    reference, _, _ = load_model(args.parent)
    res = compare_to_reference(policy, reference, tok, prompts, make_judge(args.eval_judge),
                               max_new_tokens=args.eval_max_new_tokens,
                               samples_per_prompt=args.eval_samples,
                               seed=args.seed if args.seed is not None else
                               STAGE_DEFAULTS["dpo"]["seed"])
    print(f"judge {args.eval_judge}{where}: prefers the tuned answer on {res['win_rate']:.1%} of "
          f"{res['comparisons']} comparisons (wins {res['wins']}, ties {res['ties']}, losses "
          f"{res['losses']}); KL(tuned || reference) {res['kl']:.3f} nats per answer, "
          f"{res['kl_per_token']:.4f} per token")


def _check_eval(args) -> None:
    """The --eval-* options, before training: a bad judge spec or prompts file (or one holding
    text the run cannot encode) is refused, and so is an option of the eval given without
    --eval-judge (it would be silently ignored)."""
    for name in ("eval_prompts", "eval_samples", "eval_max_new_tokens"):
        if args.eval_judge is None and getattr(args, name) is not None:
            raise checks.SettingError(name, getattr(args, name), "it applies only to the eval "
                                      "after training: add --eval-judge SPEC, or leave it out")
    for name, default in EVAL_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    checks.check_values(eval_samples=args.eval_samples,
                        eval_max_new_tokens=args.eval_max_new_tokens)
    if args.eval_judge is not None:
        make_judge(args.eval_judge)
        if args.eval_prompts is not None:
            # with the parent's tokenizer (the tuned run keeps it): a prompt it cannot encode
            # stopped the eval after the whole training
            read_prompts(args.eval_prompts, tokenizer=load_tokenizer(args.parent))
        # against the parent's block (the tuned run keeps it): too long an answer, too, was
        # refused only when the eval sampled
        check_answer_fits("eval_max_new_tokens", args.eval_max_new_tokens,
                          read_config(args.parent)["model"]["block_size"])


def cmd_reward(args) -> int:
    result = reward(args.parent, args.rankings, args.out, overwrite=args.overwrite,
                    threads=args.threads, **given_settings(args, "reward", "rankings"))
    rep = result.details["report"]
    val = (f"held-out pairwise accuracy {rep['val_accuracy']:.1%} on {rep['val_pairs']} pairs"
           if "val_accuracy" in rep else "no held-out pairs (a prompt is held out with all its "
           "rankings: rank more prompts, or raise --val-fraction)")
    print(f"reward model: train accuracy {rep['train_accuracy']:.1%} on {rep['train_pairs']} "
          f"pairs, {val}; saved in {args.out}")
    return 0


def cmd_dpo(args) -> int:
    _check_eval(args)
    result = dpo(args.parent, args.rankings, args.out, resume=args.resume,
                 overwrite=args.overwrite, threads=args.threads,
                 **given_settings(args, "dpo", "rankings"))
    report_training(result)
    ev = result.details["eval"]
    where = "held-out" if ev["held_out"] else "training"
    print(f"DPO on {where} pairs: implicit reward margin {ev['val_margin']:.3f}, "
          f"preference accuracy {ev['val_accuracy']:.1%}")
    _judge_eval(args, result.details)
    return 0


def cmd_rlhf(args) -> int:
    _check_eval(args)
    result = rlhf(args.parent, args.prompts, args.out, resume=args.resume,
                  overwrite=args.overwrite, threads=args.threads,
                  **given_settings(args, "rlhf", "prompts"))
    report_training(result)
    print(f"mean reward and KL per step: {Path(args.out) / 'metrics.jsonl'}")
    _judge_eval(args, result.details)
    return 0
