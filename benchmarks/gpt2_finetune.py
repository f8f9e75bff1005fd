"""End to end at GPT-2 small's size: a transformers GPT-2 124M checkpoint imported into lmlab and
fine-tuned on builtin:shakespeare, with the wall time and peak memory of every step.

    python benchmarks/gpt2_finetune.py [--steps 20] [--block-size 64] [--batch-size 4]
                                       [--threads N] [--precision auto] [--workdir DIR]

Nothing is downloaded, so GPT-2's own weights cannot be used: the checkpoint is made here with
transformers, a randomly initialised GPT2LMHeadModel of GPT-2 small's shape (12 layers, 12 heads,
768 wide, 1024 positions, vocabulary 50,257: 124M parameters) saved by save_pretrained, with a
byte-level BPE tokenizer of 50,257 tokens laid out as GPT-2's (256 bytes and 49,999 merges, then
<|endoftext|> at id 50256) trained with the `tokenizers` library on lmlab's built-in corpora
(builtin:shakespeare and builtin:python-docs) plus the running Python's standard-library sources
(the built-in corpora alone hold about 40,700 distinct merges, short of GPT-2's count). The files,
sizes and code paths are GPT-2 124M's; only the values of the weights differ (so the loss starts
near ln 50257 = 10.8, not at GPT-2's).

Each step runs in its own process, and its peak resident memory is that process's own (the
rusage os.wait4 returns): 1. make the checkpoint (PyTorch + transformers; context only),
2. `lmlab import CKPT --run RUN --block-size B`, 3. `lmlab finetune RUN --corpus
builtin:shakespeare --out FT --steps N --batch-size 4` (llm.c's CPU fine-tune uses B = 4, T = 64),
4. `lmlab sample FT`. Prints one row per step, the fine-tune's own report (tokens/s, validation loss
before and after) and whether the largest lmlab step fits an 8 GiB laptop with 2 GiB to spare for
the system.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
LAPTOP_GIB, SYSTEM_GIB = 8.0, 2.0


def make_checkpoint(out: str) -> None:
    """The GPT-2-small-sized transformers checkpoint (module docstring), written into `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmlab.data import load_corpus

    eot = GPT2_SMALL["vocab_size"] - 1
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    stdlib = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    texts = [load_corpus("builtin:shakespeare"), load_corpus("builtin:python-docs")]
    for path in stdlib:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    trainer = trainers.BpeTrainer(vocab_size=eot, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer=trainer)
    tk.add_special_tokens(["<|endoftext|>"])
    if tk.get_vocab_size() != GPT2_SMALL["vocab_size"]:
        raise SystemExit(f"the tokenizer reached {tk.get_vocab_size()} tokens, not "
                         f"{GPT2_SMALL['vocab_size']}: the corpora hold too few distinct merges")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2_SMALL, bos_token_id=eot, eos_token_id=eot))
    model.save_pretrained(out)
    tk.save(os.path.join(out, "tokenizer.json"))


def timed(cmd: list, log: str) -> tuple:
    """(seconds, peak RSS in MiB, output) of one child process."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    with open(log) as f:
        text = f.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    return seconds, usage.ru_maxrss / 1024.0, text  # ru_maxrss is in KiB on Linux


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, every value checked: a bad one ends here (exit 2), before any work."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="fine-tuning steps (default 20)")
    p.add_argument("--block-size", type=int, default=64, help="context kept on import (default 64)")
    p.add_argument("--batch-size", type=int, default=4, help="fine-tuning batch (default 4)")
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--workdir", default=None,
                   help="keep the checkpoint and runs here (default: a temporary directory, removed)")
    p.add_argument("--make-checkpoint", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # before the minutes of making the checkpoint: --threads 0 was dropped (all cores, unsaid)
    for name in ("steps", "block_size", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} {value}: expected an integer >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint)
        return 0
    work = args.workdir or tempfile.mkdtemp(prefix="lmlab-gpt2-")
    os.makedirs(work, exist_ok=True)
    ckpt, run, ft = (os.path.join(work, n) for n in ("gpt2-small-hf", "imported", "finetuned"))
    lmlab = [sys.executable, "-m", "lmlab"]
    threads = ["--threads", str(args.threads)] if args.threads else []
    steps = [
        ("make the transformers checkpoint", [sys.executable, os.path.abspath(__file__),
                                              "--make-checkpoint", ckpt]),
        ("lmlab import", lmlab + ["import", ckpt, "--run", run, "--block-size",
                                  str(args.block_size), "--overwrite"]),
        ("lmlab finetune", lmlab + ["finetune", run, "--corpus", "builtin:shakespeare", "--out", ft,
                                    "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                                    "--warmup-steps", str(max(1, args.steps // 10)),
                                    "--eval-every", "0", "--save-every", "0", "--no-progress",
                                    "--precision", args.precision, "--overwrite", *threads]),
        ("lmlab sample", lmlab + ["sample", ft, "--prompt", "ROMEO:", "--max-new-tokens", "32",
                                  "--seed", "1", "--no-stream", *threads]),
    ]
    print(f"GPT-2 small (124M) imported and fine-tuned on builtin:shakespeare; {cpu_model()}, "
          f"{os.cpu_count()} logical CPUs; block {args.block_size}, batch {args.batch_size}, "
          f"{args.steps} steps, precision {args.precision}")
    print(f"{'step':34s} {'seconds':>9s} {'peak RSS MiB':>13s}")
    peaks, outputs = {}, {}
    try:
        for name, cmd in steps:
            seconds, peak, text = timed(cmd, os.path.join(work, name.replace(" ", "_") + ".log"))
            peaks[name], outputs[name] = peak, text
            print(f"{name:34s} {seconds:9.1f} {peak:13.0f}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    report = [ln for ln in outputs["lmlab finetune"].splitlines()
              if "tokens/s" in ln or "val loss" in ln or ln.startswith("fine-tuned")]
    print("\n".join(report))
    print("sample:", outputs["lmlab sample"].strip()[:200].replace("\n", " / "))
    largest = max((v, k) for k, v in peaks.items() if k.startswith("lmlab"))
    budget = (LAPTOP_GIB - SYSTEM_GIB) * 1024
    verdict = "fits" if largest[0] <= budget else "does NOT fit"
    print(f"largest lmlab step: {largest[1]}, {largest[0] / 1024:.2f} GiB peak RSS: {verdict} an "
          f"{LAPTOP_GIB:.0f} GiB laptop ({budget / 1024:.0f} GiB left to lmlab)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
