"""End-to-end measures of the fine-tuning stages, from nothing, in a few minutes.

    python benchmarks/stages_eval.py --out runs/eval [--style-corpus builtin:shakespeare]

1. pretrain a char-level GPT on builtin:python-docs;
2. style: fine-tune it on another corpus (tiny-shakespeare by default) and
   report validation loss on the new corpus and on the original one, before and after;
3. instruct: tune it on builtin:python-qa and compare base vs tuned on the held-out questions:
   the fraction of answers that end with <|end|> within the length limit, and the fraction whose
   first words match the reference answer's.
Prints one JSON object per measure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmlab import ops
from lmlab.checkpoint import load_model
from lmlab.finetune import finetune
from lmlab.instruct import evaluate_instruct, instruct_tune, load_instruct_data
from lmlab.pretrain import pretrain
from lmlab.rundir import is_run


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, every value checked: a bad one ends here (exit 2), before any work."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/eval")
    ap.add_argument("--style-corpus", default="builtin:shakespeare",
                    help="corpus in another style for the fine-tune (default: builtin:shakespeare, "
                         "tiny-shakespeare)")
    ap.add_argument("--pretrain-steps", type=int, default=3000)
    ap.add_argument("--finetune-steps", type=int, default=500)
    ap.add_argument("--instruct-steps", type=int, default=1500)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
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
    base = out / "base"

    t0 = time.perf_counter()
    if not is_run(base):
        pretrain("builtin:python-docs", base, n_layer=4, n_head=4, n_embd=128,
                 block_size=args.block_size, batch_size=16, steps=args.pretrain_steps, lr=2e-3,
                 warmup_steps=100, eval_every=500, save_every=0, progress=False)
    print(json.dumps({"measure": "pretrain", "run": str(base), "seconds": round(time.perf_counter() - t0, 1)}))

    style = args.style_corpus
    t0 = time.perf_counter()
    report = finetune(base, style, out / "style", unknown="replace", steps=args.finetune_steps,
                      lr=1e-3, warmup_steps=50, eval_every=250, save_every=0, progress=False,
                      prompt="The ", sample_tokens=200)
    print(json.dumps({"measure": "style-finetune", "corpus": style,
                      "new_val_before": round(report.details["new_val_before"], 4),
                      "new_val_after": round(report.details["new_val_after"], 4),
                      "old_val_before": report.details["old_val_before"] and round(report.details["old_val_before"], 4),
                      "old_val_after": report.details["old_val_after"] and round(report.details["old_val_after"], 4),
                      "seconds": round(time.perf_counter() - t0, 1),
                      "sample_parent": report.details["samples"].get("parent"),
                      "sample_finetuned": report.details["samples"].get("finetuned")}))

    t0 = time.perf_counter()
    tuned_dir = out / "instruct"
    if not is_run(tuned_dir):
        instruct_tune(base, "builtin:python-qa", tuned_dir, batch_size=16,
                      steps=args.instruct_steps, lr=1e-3, warmup_steps=50, eval_every=250,
                      save_every=0, progress=False)
    _, held_out = load_instruct_data("builtin:python-qa")
    base_model, tok, _ = load_model(base)
    tuned_model, _, _ = load_model(tuned_dir)
    b = evaluate_instruct(base_model, tok, held_out, max_new_tokens=120)
    t = evaluate_instruct(tuned_model, tok, held_out, max_new_tokens=120)
    print(json.dumps({"measure": "instruct", "held_out": b["n"], "base": b, "tuned": t,
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
