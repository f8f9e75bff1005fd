"""The `lmlab` command line: every verb is a thin call into the modules that do the work.

    lmlab pretrain   train a GPT from scratch on a corpus (next-token prediction)
    lmlab sample     generate text from a trained run
    lmlab predict    show the next-token distribution for a prompt
    lmlab finetune   continue training a run on a new corpus (style fine-tuning)
    lmlab instruct   tune a run on prompt/response pairs, loss on the responses only
    lmlab inspect-data  show which tokens of an instruct dataset receive loss
    lmlab chat       talk to an instruct-tuned run
    lmlab rank | reward | dpo | rlhf   learn from human rankings
    lmlab bench      measure kernels or training throughput against references
    lmlab demo       teaching views: gradient descent, loss, sampling, embeddings
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import numpy as np


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="OpenMP threads for the kernels (default: all cores)")


def _apply_threads(args) -> None:
    if getattr(args, "threads", None):
        from . import ops
        ops.set_num_threads(args.threads)


def _add_train_options(p: argparse.ArgumentParser, *, steps: int, lr: float, warmup: int) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=steps, help=f"optimiser steps (default {steps})")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--min-lr", type=float, default=None, help="end of the cosine decay (default lr/10)")
    g.add_argument("--warmup-steps", type=int, default=warmup, help=f"linear warmup steps (default {warmup})")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    g.add_argument("--eval-every", type=int, default=250, help="validation every N steps")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=10, help="metrics.jsonl row every N steps")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .ops import MATMUL_PRECISIONS
    g.add_argument("--precision", choices=("auto",) + MATMUL_PRECISIONS, default="auto",
                   help="matmul precision: fp32, or bf16 = the operands of every matmul and "
                        "attention product rounded to bfloat16 with fp32 accumulation (parameters, "
                        "gradients, optimiser state and other ops stay fp32). auto (default): bf16 "
                        "where the CPU has AMX tiles for it (2-3x faster, see `lmlab bench train`), "
                        "else fp32. --resume keeps the run's own precision")


def resolve_precision(args) -> str:
    """--precision: a name as given; "auto" is the run's own when resuming (the precision it was
    started in, so nothing to note), else bf16 where this CPU multiplies bf16 on AMX tiles, else
    fp32."""
    if args.precision != "auto":
        return args.precision
    run_dir = getattr(args, "run", None) or getattr(args, "out", None)
    if getattr(args, "resume", False) and run_dir is not None:
        from .checkpoint import read_config, saved_precision
        try:
            return saved_precision(read_config(run_dir))
        except (OSError, ValueError):
            pass  # no readable run there: train() reports that
    from .ops import cpu_info
    return "bf16" if cpu_info()["bf16_matmul"] == "amx" else "fp32"


def _train_kwargs(args) -> dict:
    return dict(steps=args.steps, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                grad_accum=args.grad_accum, eval_every=args.eval_every,
                save_every=args.save_every, log_every=args.log_every,
                progress=not args.no_progress, precision=resolve_precision(args))


def _add_derived_run(p: argparse.ArgumentParser) -> None:
    """RUN and --out NEW: a stage that starts from a run writes a new one (as rank/dpo/rlhf do)."""
    p.add_argument("parent", metavar="run", help="the run directory to start from")
    p.add_argument("--out", dest="run", required=True,
                   help="the new run directory (it records its parent)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="same seed, same text")


# --- pretrain ------------------------------------------------------------------------------------

def _cmd_pretrain(args) -> int:
    from .pretrain import pretrain
    from .train import NonFiniteLoss

    _apply_threads(args)
    try:
        result = pretrain(args.corpus, args.run, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                          n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          block_size=args.block_size, batch_size=args.batch_size,
                          resume=args.resume, seed=args.seed, **_train_kwargs(args))
    except NonFiniteLoss as exc:
        print(f"lmlab pretrain: {exc}", file=sys.stderr)
        return 1
    _report_training(result, args.run)
    if args.sample_after and not result.stopped_early:
        print("\n--- a sample from the trained model ---")
        _generate_and_print(args.run, prompt=args.prompt, max_new_tokens=args.sample_after,
                            temperature=0.8, top_k=None, top_p=None, seed=0, num_samples=1,
                            stop=None, stream=True)
    return 0


def _report_training(result, run) -> None:
    status = "stopped early (Ctrl-C)" if result.stopped_early else "finished"
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"{status}: {result.steps_done} steps in {result.seconds:.1f} s, "
          f"loss {result.final_loss:.4f}{val}, {result.tokens_per_s:,.0f} tokens/s; run in {run}")


# --- sample --------------------------------------------------------------------------------------

class _StopString(Exception):
    """Raised from the streaming callback when the stop string has appeared."""


def _generate_and_print(run, *, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                        num_samples, stop, stream, raw=False) -> None:
    """Sample from a run and print as tokens arrive. A run with a chat template (instruct-tuned)
    gets the prompt as a user turn and answers until <|end|>, unless raw is set."""
    from .checkpoint import load_model
    from .sample import generate

    model, tok, config = load_model(run)
    template = (config.get("train") or {}).get("chat_template")
    if template and not raw:
        from .instruct import render
        prompt_ids, _ = render(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        stop_ids, echo = [tok.special_id(template["end"])], f"{prompt}\n> "
    else:
        prompt_ids = tok.encode(prompt) if prompt else np.array([tok.eot_id], dtype=np.int32)
        stop_ids, echo = [tok.eot_id], prompt
    prompt_ids = prompt_ids[-model.config.block_size:]
    for i in range(num_samples):
        s = None if seed is None else seed + i
        if num_samples > 1:
            print(f"--- sample {i + 1}" + (f" (seed {s})" if s is not None else "") + " ---")
        sys.stdout.write(echo)
        new: list = []
        shown = ""

        def on_token(token_id: int) -> None:
            # Decode everything so far and print the new suffix, so a character split across BPE
            # tokens appears whole; stop as soon as the stop string shows up.
            nonlocal shown
            new.append(int(token_id))
            full = tok.decode(new)
            text = full[: full.index(stop)] if stop and stop in full else full
            if stream and not text.endswith("\ufffd"):
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
            if len(text) < len(full):
                raise _StopString

        try:
            generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=s, stop_ids=stop_ids, callback=on_token)
        except _StopString:
            pass
        text = tok.decode(new)
        if stop and stop in text:
            text = text[: text.index(stop)]
        sys.stdout.write(text[len(shown):] + "\n")
        sys.stdout.flush()


def _cmd_sample(args) -> int:
    _apply_threads(args)
    _generate_and_print(args.run, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, num_samples=args.num_samples, stop=args.stop,
                        stream=not args.no_stream, raw=args.raw)
    return 0


# --- predict -------------------------------------------------------------------------------------

def _cmd_predict(args) -> int:
    from .checkpoint import load_model
    from .sample import next_token_distribution

    _apply_threads(args)
    model, tok, _ = load_model(args.run)
    probs = next_token_distribution(model, tok.encode(args.prompt))
    order = np.argsort(-probs, kind="stable")[: args.top_k]
    rows = [(tok.decode([int(i)]), int(i), float(probs[i])) for i in order]
    if args.json:
        for text, i, p in rows:
            print(json.dumps({"token": text, "id": i, "probability": p}))
    else:
        print(f"next token after {args.prompt!r}:")
        width = max(len(repr(t)) for t, _, _ in rows)
        for text, i, p in rows:
            bar = "#" * int(round(p * 50))
            print(f"  {repr(text):<{width}}  {p:7.2%}  {bar}")
    if args.png:
        _bar_chart(rows, args.prompt, args.png)
        print(f"wrote {args.png}")
    return 0


def _bar_chart(rows, prompt, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [repr(t) for t, _, _ in rows]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    ax.barh(range(len(rows))[::-1], [p for _, _, p in rows], color="tab:blue")
    ax.set_yticks(range(len(rows))[::-1], labels)
    ax.set_xlabel("probability")
    ax.set_title(f"next token after {prompt!r}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- finetune, instruct, inspect-data, chat ------------------------------------------------------

def _cmd_finetune(args) -> int:
    from .finetune import finetune
    from .train import NonFiniteLoss

    _apply_threads(args)
    try:
        report = finetune(args.parent, args.corpus, args.run, unknown=args.unknown,
                          freeze_layers=args.freeze_layers, freeze_embeddings=args.freeze_embeddings,
                          batch_size=args.batch_size, prompt=args.prompt,
                          sample_tokens=args.sample_tokens, resume=args.resume, seed=args.seed,
                          **_train_kwargs(args))
    except NonFiniteLoss as exc:
        print(f"lmlab finetune: {exc}", file=sys.stderr)
        return 1
    if report.unknown_chars:
        n = sum(report.unknown_chars.values())
        print(f"{n} characters the tokenizer cannot encode were handled with --unknown {args.unknown}")
    print(report.summary())
    for who, text in report.samples.items():
        print(f"\n--- {who} ---\n{text}")
    return 0


def _cmd_instruct(args) -> int:
    from .instruct import instruct_tune
    from .train import NonFiniteLoss

    _apply_threads(args)
    try:
        result, problems = instruct_tune(args.parent, args.data, args.run,
                                         batch_size=args.batch_size, resume=args.resume,
                                         seed=args.seed, **_train_kwargs(args))
    except NonFiniteLoss as exc:
        print(f"lmlab instruct: {exc}", file=sys.stderr)
        return 1
    for kind, idx in problems.items():
        if idx:
            print(f"note: {len(idx)} examples {kind.replace('_', ' ')} (see lmlab inspect-data)")
    _report_training(result, args.run)
    return 0


def _cmd_inspect_data(args) -> int:
    from .checkpoint import load_model
    from .instruct import inspect_examples, load_instruct_data

    model, tok, _ = load_model(args.run)
    block = args.block_size or model.config.block_size
    train_convs, _ = load_instruct_data(args.data)
    print(inspect_examples(tok, train_convs, block, n=args.n,
                           color=not args.no_color and sys.stdout.isatty()))
    return 0


def _cmd_chat(args) -> int:
    from .checkpoint import load_model
    from .instruct import respond

    _apply_threads(args)
    model, tok, _ = load_model(args.run)
    print("lmlab chat: type a message, an empty line or Ctrl-D to quit.")
    history: list = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            return 0
        messages = (history if args.history else []) + [{"role": "user", "content": line}]
        sys.stdout.write("model> ")
        sys.stdout.flush()
        text, ended = respond(model, tok, messages, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed)
        print(text + ("" if ended else " [...]"))
        history = messages + [{"role": "assistant", "content": text}]


# --- bench ---------------------------------------------------------------------------------------

def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure kernels or training against references in the same run")
    bsub = p.add_subparsers(dest="bench_what", required=True, metavar="{kernels,train,generate}")
    from . import bench, trainbench
    k = bsub.add_parser("kernels", help="every kernel vs numpy (and PyTorch) in the same run")
    bench.add_bench_kernels_arguments(k)
    k.set_defaults(func=bench.run_bench_kernels)
    t = bsub.add_parser("train", help="training tokens/s and peak memory vs PyTorch, same config")
    trainbench.add_bench_train_arguments(t)
    t.set_defaults(func=trainbench.run_bench_train)
    g = bsub.add_parser("generate", help="generation tokens/s with the KV cache vs without")
    trainbench.add_bench_generate_arguments(g)
    g.set_defaults(func=trainbench.run_bench_generate)


# --- parser --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmlab", description="Train small GPT language models on a CPU and watch them learn.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="train a GPT from scratch on a corpus",
                       description="Pretrain a GPT by next-token prediction. Ctrl-C stops after the "
                                   "current step and saves a checkpoint; --resume continues exactly.")
    p.add_argument("--corpus", default=None,
                   help="a text file, directory, glob, or builtin:NAME (default builtin:python-docs; "
                        "with --resume, the run's own)")
    p.add_argument("--run", default="runs/pretrain", help="run directory (default runs/pretrain)")
    p.add_argument("--tokenizer", choices=["char", "bpe"], default="char")
    p.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--resume", action="store_true", help="continue the run in --run exactly")
    p.add_argument("--sample-after", type=int, default=0, metavar="N",
                   help="print an N-token sample when training ends")
    p.add_argument("--prompt", default="", help="prompt for --sample-after")
    _add_train_options(p, steps=2000, lr=1e-3, warmup=100)
    _add_threads(p)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("sample", help="generate text from a trained run")
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", default="")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--stop", default=None, help="stop string: output is cut where it appears")
    p.add_argument("--no-stream", action="store_true", help="print each sample when complete")
    p.add_argument("--raw", action="store_true",
                   help="continue the prompt as plain text even if the run has a chat template")
    _add_sampling_options(p)
    _add_threads(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("predict", help="the next-token distribution for a prompt")
    p.add_argument("run", help="run directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--png", default=None, help="also draw a bar chart to this PNG")
    p.add_argument("--json", action="store_true", help="one JSON object per token")
    _add_threads(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("finetune", help="continue training a run on a new corpus",
                       description="Style fine-tuning: next-token training from RUN on a new "
                                   "corpus, into a new run that records its parent. Reports val "
                                   "loss on both corpora before and after, and samples from both.")
    _add_derived_run(p)
    p.add_argument("--corpus", required=True, help="text file, directory, glob or builtin:NAME")
    p.add_argument("--unknown", choices=["error", "skip", "replace"], default="error",
                   help="characters the parent's tokenizer cannot encode: fail (default), drop "
                        "them, or map them to the replacement character U+FFFD")
    p.add_argument("--freeze-layers", type=int, default=0, help="freeze the lowest N blocks")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="freeze wte/wpe (and so the tied LM head)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the parent's")
    p.add_argument("--prompt", default="", help="prompt for the before/after samples")
    p.add_argument("--sample-tokens", type=int, default=200)
    _add_train_options(p, steps=500, lr=3e-4, warmup=50)
    _add_threads(p)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("instruct", help="instruct-tune a run (loss on responses only)",
                       description="Instruct tuning on JSONL prompt/response (or messages) data "
                                   "rendered through the chat template; only response tokens and "
                                   "<|end|> are supervised.")
    _add_derived_run(p)
    p.add_argument("--data", default="builtin:python-qa",
                   help="JSONL file or builtin:python-qa (default)")
    p.add_argument("--batch-size", type=int, default=16)
    _add_train_options(p, steps=1000, lr=3e-4, warmup=50)
    _add_threads(p)
    p.set_defaults(func=_cmd_instruct)

    p = sub.add_parser("inspect-data", help="show which tokens of an instruct dataset get loss")
    p.add_argument("run", help="run directory whose tokenizer and block size to use")
    p.add_argument("--data", default="builtin:python-qa")
    p.add_argument("-n", type=int, default=3, help="examples to show")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--no-color", action="store_true")
    p.set_defaults(func=_cmd_inspect_data)

    p = sub.add_parser("chat", help="talk to an instruct-tuned run")
    p.add_argument("run", help="run directory")
    p.add_argument("--history", action="store_true", help="keep earlier turns in the context")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=120)
    g.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    _add_threads(p)
    p.set_defaults(func=_cmd_chat)

    from .preference import add_preference_commands
    add_preference_commands(sub)

    _add_bench(sub)
    from . import demo
    demo.add_demo_arguments(sub)
    return parser


def _version() -> str:
    from . import __version__
    return f"lmlab {__version__}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
        return rc if isinstance(rc, int) else 0  # some runners return their result rows
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, UnicodeDecodeError, PermissionError) as exc:
        print(f"lmlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlmlab: interrupted", file=sys.stderr)
        return 130

if __name__ == "__main__":
    sys.exit(main())
