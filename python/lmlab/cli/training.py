"""The verbs that train a language-modelling stage: pretrain, finetune, instruct.

Each is a thin call into the stage's function (lmlab.pretrain.pretrain, ...), which checks every
value and opens the run through lmlab.stage before any work.
"""

from __future__ import annotations

from ..finetune import finetune, finetune_summary
from ..instruct import PROBLEMS, instruct_tune
from ..pretrain import pretrain
from .common import (add_run_output, add_setting, add_threads, add_train_options,
                     given_settings, report_training)


def add_commands(sub) -> None:
    p = sub.add_parser("pretrain", help="train a GPT from scratch on a corpus",
                       description="Pretrain a GPT by next-token prediction. Ctrl-C stops after the "
                                   "current step and saves a checkpoint; --resume continues exactly.")
    add_setting(p, "pretrain", "corpus", str,
                "a text file, directory, glob, or builtin:NAME (with --resume, the run's own)")
    p.add_argument("--run", default="runs/pretrain", help="run directory (default runs/pretrain)")
    g = p.add_argument_group("model")
    add_setting(g, "pretrain", "tokenizer", str, choices=["char", "bpe"])
    add_setting(g, "pretrain", "vocab_size", int, "BPE vocabulary size (with --tokenizer bpe only)")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size"):
        add_setting(g, "pretrain", name, int)
    add_setting(g, "pretrain", "val_fraction", float, "held-out share of the corpus")
    add_run_output(p, derived=False)
    p.add_argument("--sample-after", type=int, default=0, metavar="N",
                   help="print an N-token sample when training ends")
    p.add_argument("--prompt", default="", help="prompt for --sample-after")
    add_train_options(p, "pretrain")
    add_threads(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="continue training a run on a new corpus",
                       description="Style fine-tuning: next-token training from RUN on a new "
                                   "corpus, into a new run that records its parent. Reports val "
                                   "loss on both corpora before and after, and samples from both.")
    add_run_output(p, derived=True)
    p.add_argument("--corpus", default=None, help="text file, directory, glob or builtin:NAME "
                                                  "(required; with --resume, the run's own)")
    add_setting(p, "finetune", "unknown", str,
                "characters the parent's tokenizer cannot encode: fail, drop them (skip), or map "
                "them to the replacement character U+FFFD (replace)",
                choices=["error", "skip", "replace"])
    add_setting(p, "finetune", "freeze_layers", int, "freeze the lowest N blocks")
    p.add_argument("--freeze-embeddings", action="store_const", const=True, default=None,
                   help="freeze wte/wpe (and so the tied LM head)")
    p.add_argument("--batch-size", type=int, default=None, help="(default: the parent's)")
    add_setting(p, "finetune", "val_fraction", float, "held-out share of the corpus")
    p.add_argument("--prompt", default="", help="prompt for the before/after samples")
    p.add_argument("--sample-tokens", type=int, default=200,
                   help="length of the before/after samples (default 200; 0: none)")
    add_train_options(p, "finetune")
    add_threads(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("instruct", help="instruct-tune a run (loss on responses only)",
                       description="Instruct tuning on JSONL prompt/response (or messages) data "
                                   "rendered through the chat template; only response tokens and "
                                   "<|end|> are supervised.")
    add_run_output(p, derived=True)
    add_setting(p, "instruct", "data", str, "JSONL file or builtin:python-qa")
    add_setting(p, "instruct", "batch_size", int)
    add_train_options(p, "instruct")
    add_threads(p)
    p.set_defaults(func=cmd_instruct)


def cmd_pretrain(args) -> int:
    result = pretrain(args.corpus, args.run, prompt=args.prompt, sample_after=args.sample_after,
                      resume=args.resume, overwrite=args.overwrite, threads=args.threads,
                      **given_settings(args, "pretrain", "corpus"))
    report_training(result)
    if "sample" in result.details:
        print(f"\n--- a sample from the trained model ---\n{result.details['sample']}")
    return 0


def cmd_finetune(args) -> int:
    result = finetune(args.parent, args.corpus, args.out, prompt=args.prompt,
                      sample_tokens=args.sample_tokens, resume=args.resume,
                      overwrite=args.overwrite, threads=args.threads,
                      **given_settings(args, "finetune", "corpus"))
    unknown = result.details["unknown_chars"]
    if unknown:
        print(f"{sum(unknown.values())} characters the tokenizer cannot encode were handled "
              f"with --unknown {args.unknown or 'error'}")
    elif unknown is None and args.unknown not in (None, "error"):
        print(f"characters the tokenizer cannot encode were handled with --unknown {args.unknown} "
              "(not counted: the corpus was tokenized in a streaming pass)")
    report_training(result)
    print(finetune_summary(result))
    for who, text in result.details["samples"].items():
        print(f"\n--- {who} ---\n{text}")
    return 0


def cmd_instruct(args) -> int:
    result = instruct_tune(args.parent, args.data, args.out, resume=args.resume,
                           overwrite=args.overwrite, threads=args.threads,
                           **given_settings(args, "instruct", "data"))
    for kind, idx in result.details["problems"].items():
        if idx:
            print(f"note: {len(idx)} training examples {PROBLEMS[kind]} (see lmlab inspect-data)")
    report_training(result)
    return 0
