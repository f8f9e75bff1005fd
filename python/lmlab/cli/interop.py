"""The verbs that move models between lmlab and Hugging Face transformers: export (a run as a
transformers GPT-2 directory, lmlab.hf_export) and import (a transformers GPT-2 checkpoint as a
run, lmlab.hf_import)."""

from __future__ import annotations

import sys

from ..checks import check
from ..hf_export import describe, export_hf
from ..hf_import import import_hf


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="write a run as a Hugging Face transformers model directory")
    p.add_argument("run", help="the run directory (its current checkpoint is exported)")
    p.add_argument("--to", required=True, choices=("hf",),
                   help="hf: a GPT2LMHeadModel directory (config.json, model.safetensors, the "
                        "tokenizer as a fast tokenizer, the chat template of an instruct run)")
    p.add_argument("out", help="the directory to write (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export at OUT (a transformers model directory; "
                        "never an lmlab run)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="make a local Hugging Face GPT-2 checkpoint an lmlab run")
    p.add_argument("hf_dir", metavar="HF_DIR",
                   help="a directory holding config.json (GPT-2), model.safetensors or "
                        "pytorch_model.bin (or their sharded indexes), and tokenizer.json; nothing is "
                        "downloaded")
    p.add_argument("--run", required=True, help="the run directory to write")
    p.add_argument("--block-size", type=int, default=None,
                   help="keep the first N position embeddings: contexts of at most N tokens, "
                        "less memory to train (default: the checkpoint's n_positions)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run in the run directory (says what it replaces; "
                        "the old run is kept until the new one is saved)")
    p.set_defaults(func=cmd_import)


def cmd_export(args) -> int:
    print(describe(export_hf(args.run, args.out, overwrite=args.overwrite)))
    return 0


def cmd_import(args) -> int:
    if args.block_size is not None:
        check("block_size", args.block_size)
    report = import_hf(args.hf_dir, args.run, overwrite=args.overwrite, block_size=args.block_size)
    m = report["model"]
    for warning in report["warnings"]:
        print(f"lmlab import: warning: {warning}", file=sys.stderr)
    added = (f"; added the special tokens {', '.join(report['added_tokens'])} (embedding rows: "
             "the mean of the others)" if report["added_tokens"] else "")
    eos = (f"; generation also stops at its end-of-text token{'s' * (len(report['eos_tokens']) > 1)} "
           f"{', '.join(report['eos_tokens'])}" if report["eos_tokens"] else "")
    print(f"imported {args.hf_dir} -> {report['run']}: {m.n_layer} layers, {m.n_head} heads, "
          f"width {m.n_embd}, context {m.block_size}, vocabulary {m.vocab_size}{added}{eos}")
    return 0
