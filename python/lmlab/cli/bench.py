"""The `lmlab bench` verb: kernels (lmlab.bench), training and generation (lmlab.trainbench), each
measured against a reference in the same run; the rows are printed as a table or JSON lines."""

from __future__ import annotations

import contextlib
import json
import sys

from .. import bench, checks, ops, trainbench
from ..errors import LmlabError
from .common import command_name


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="measure kernels or training against references in the same run")
    bsub = p.add_subparsers(dest="bench_what", required=True, metavar="{kernels,train,generate}")
    k = bsub.add_parser("kernels", help="every kernel vs numpy (and PyTorch) in the same run")
    k.add_argument("--json", action="store_true", help="print one JSON object per line")
    k.add_argument("--threads", type=int, default=None,
                   help="threads for lmlab, numpy's BLAS and torch (default: lmlab's, all cores)")
    per_shapes = ", ".join(f"{n} for {name}" for name, n in bench.DEFAULT_REPEAT.items())
    k.add_argument("--repeat", type=int, default=None,
                   help=f"timed calls per kernel, best taken (default: by --shapes, {per_shapes})")
    k.add_argument("--shapes", choices=sorted(bench.SIZES), default="gpt",
                   help="gpt: the docs/DESIGN.md model's shapes; tiny: a seconds-long smoke run")
    k.set_defaults(func=run_bench_kernels)
    t = bsub.add_parser("train", help="training tokens/s and peak memory vs PyTorch, same config")
    _add_train_arguments(t)
    t.set_defaults(func=run_bench_train)
    g = bsub.add_parser("generate", help="generation tokens/s with the KV cache vs without")
    _add_generate_arguments(g)
    g.set_defaults(func=run_bench_generate)


def run_bench_kernels(args) -> int:
    checks.check("threads", args.threads)
    if args.repeat is not None:
        checks.check("repeat", args.repeat)
    bench.bench_kernels(threads=args.threads, json_lines=args.json, shapes=args.shapes,
                        repeat=args.repeat)
    return 0


def _check_model(args) -> None:
    checks.check("threads", args.threads)
    checks.check_values(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                        block_size=args.block_size, vocab_size=args.vocab_size)
    checks.check_relations({"n_embd": args.n_embd, "n_head": args.n_head})


def _add_model_arguments(parser, n_layer, n_head, n_embd, block_size, vocab_size=65,
                         text: str = "") -> None:
    """The model-shape flags; None defaults are filled in from --config (_apply_config)."""
    parser.add_argument("--n-layer", type=int, default=n_layer, help=text)
    parser.add_argument("--n-head", type=int, default=n_head, help=text)
    parser.add_argument("--n-embd", type=int, default=n_embd, help=text)
    parser.add_argument("--block-size", type=int, default=block_size, help=text)
    parser.add_argument("--vocab-size", type=int, default=vocab_size, help=text)
    parser.add_argument("--threads", type=int, default=None, help="default: lmlab's thread count")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def _add_train_arguments(parser) -> None:
    """The options of `lmlab bench train`."""
    parser.add_argument("--config", choices=sorted(trainbench.CONFIGS), default="nanogpt-cpu",
                        help="a named model shape and batch: nanogpt-cpu (4 layers, 4 heads, 128 "
                             "wide, block 64, batch 12, vocabulary 65; the default) or gpt2-small "
                             "(12 layers, 12 heads, 768 wide, block 1024, batch 4, vocabulary "
                             "50,257); the flags below override its fields")
    _add_model_arguments(parser, None, None, None, None, None, text="default: from --config")
    parser.add_argument("--batch-size", type=int, default=None, help="default: from --config")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after warmup)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure each implementation this many times, interleaved; rows and "
                             "ratios are the median round's (default 3)")
    parser.add_argument("--impl", choices=trainbench.IMPLS, action="append", default=None,
                        help="run only this implementation (repeatable); default both")
    parser.add_argument("--precision", choices=trainbench.PRECISIONS + ("both",), default="both",
                        help="matmul precision: fp32, bf16 (bfloat16 matmul operands, fp32 "
                             "accumulation and parameters; PyTorch under CPU autocast), or both "
                             "(default)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where one lmlab step's time goes, kernel by kernel")
    parser.add_argument("--isa", choices=tuple(trainbench.ISA_ENV), default="native",
                        help="avx2: lmlab on its AVX2 kernels and PyTorch restricted to AVX2, to "
                             "measure an AVX2 machine on this one (default: native)")
    parser.add_argument("--no-mfu", dest="mfu", action="store_false",
                        help="skip measuring the matmul peak that MFU is relative to")


def run_bench_train(args) -> list:
    """Run `lmlab bench train` from parsed arguments and print the rows."""
    for name, value in trainbench.CONFIGS[args.config].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    _check_model(args)
    checks.check_values(batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                        rounds=args.rounds)
    precisions = trainbench.PRECISIONS if args.precision == "both" else (args.precision,)
    # --impl lmlab --impl lmlab names one implementation: measured once, not once per flag
    impls = tuple(dict.fromkeys(args.impl or trainbench.IMPLS))
    missing = trainbench.torch_missing() if "pytorch" in impls else None
    if missing and impls == ("pytorch",):
        raise LmlabError(f"--impl pytorch: torch cannot be imported ({missing}); install PyTorch, "
                         "or measure --impl lmlab")
    if missing:
        print(f"{command_name(args)}: PyTorch skipped, torch cannot be imported ({missing}); "
              "measuring lmlab alone", file=sys.stderr)
    rows = trainbench.bench_train(args.n_layer, args.n_head, args.n_embd, args.block_size,
                                  args.batch_size, args.steps, vocab_size=args.vocab_size,
                                  threads=args.threads, impls=impls,
                                  warmup=args.warmup, precisions=precisions, isa=args.isa,
                                  mfu=args.mfu, rounds=args.rounds)
    for r in rows:
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            mfu = f"  MFU {100 * r['mfu']:5.1f}%" if "mfu" in r else ""
            print(f"{r['impl']:8s} {r['precision']:5s} {r['tokens_per_s']:10.0f} tokens/s  "
                  f"{r['ms_per_step']:8.1f} ms/step  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
                  f"({r['threads']} thread{'s' if r['threads'] != 1 else ''}, {r['isa']}){mfu}")
    if not args.json and rows:
        print(f"model FLOPs per token (6N + 12LCT): {rows[0]['flops_per_token'] / 1e6:.2f} M")
        for p in precisions:
            peak = next((r["peak"] for r in rows if r["precision"] == p and "peak" in r), None)
            if peak is not None:
                print(f"fastest {p} matmul in this run: {peak['gflops']:.0f} GFLOP/s "
                      f"({peak['impl']}, {peak['product']})")
        for label, ratio, per_round in trainbench.speed_ratios(rows):
            rounds = (f"  (median of {len(per_round)} rounds: "
                      f"{', '.join(f'{r:.2f}x' for r in per_round)})" if len(per_round) > 1 else "")
            print(f"{label}: {ratio:.2f}x{rounds}")
    if args.profile:
        cfg = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                   block_size=args.block_size, batch_size=args.batch_size,
                   vocab_size=args.vocab_size)
        for p in precisions:
            with ops.use_isa("avx2") if args.isa == "avx2" else contextlib.nullcontext():
                prof = trainbench.profile_step(cfg, steps=max(1, min(args.steps, 5)),
                                               threads=args.threads, precision=p)
            total = sum(ms for _, ms, _ in prof)
            if not args.json:
                print(f"lmlab {p} step, kernel by kernel:")
            for name, ms, calls in prof:
                if args.json:
                    print(json.dumps({"profile": name, "precision": p, "ms_per_step": ms,
                                      "calls_per_step": calls}))
                else:
                    print(f"  {name:22s} {ms:9.2f} ms/step {100 * ms / total:5.1f}%  "
                          f"{calls:4d} calls")
    return rows


def _add_generate_arguments(parser) -> None:
    """The options of a `lmlab bench generate` (KV cache vs none)."""
    _add_model_arguments(parser, 6, 6, 384, 256, text="model shape")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated")
    parser.add_argument("--precision", choices=trainbench.PRECISIONS, default="fp32",
                        help="matmul precision of lmlab and of the reference: fp32 (default), or "
                             "bf16 (lmlab's bfloat16 matmul operands, transformers' model in "
                             "bfloat16)")


def run_bench_generate(args) -> list:
    """Run a generation benchmark from parsed arguments and print the rows."""
    _check_model(args)
    checks.check_values(prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    rows = trainbench.bench_generate(args.n_layer, args.n_head, args.n_embd, args.block_size,
                                     prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                     vocab_size=args.vocab_size, threads=args.threads,
                                     precision=args.precision)
    for r in rows:
        if args.json:
            print(json.dumps(r))
            continue
        line = (f"{r['impl']:21s} {r['config']['precision']:4s} {r['tokens_per_s']:9.1f} tokens/s  "
                f"{r['ms_per_token']:8.2f} ms/token")
        if "same_tokens" in r:
            line += f"  same tokens: {r['same_tokens']}"
        if "vs_reference" in r:
            line += f"  {r['vs_reference']:.2f}x transformers"
        if "max_logit_diff" in r:
            line += f"  ({r['reference']}; its logits within {r['max_logit_diff']:.1e} of lmlab's)"
        print(line)
    missing = trainbench.generate_reference_missing(rows[0]["config"])
    if not args.json and missing is not None:
        print(f"(no reference: {missing})")
    return rows
