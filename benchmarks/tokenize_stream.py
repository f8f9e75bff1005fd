"""Streaming tokenization of a large corpus: MB/s and peak memory, char and BPE.

    python benchmarks/tokenize_stream.py [--mb 1024] [--workers N] [--corpus-dir DIR]

Makes a corpus of --mb megabytes in a temporary directory (or DIR, kept for the next run) from
the built-in corpora (shakespeare and python-docs): their paragraphs repeated and shuffled with a
fixed seed into 64 MB files. Then, for each tokenizer (char, and a 1,024-token byte-level BPE
trained on the built-in text), a child process tokenizes the whole corpus into shards with
lmlab.token_shards (a fresh cache each time, so nothing is reused) and the parent reports the
pass's MB/s and the child's peak RSS (wait4's ru_maxrss: the largest of the child and its worker
processes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILE_BYTES = 64 << 20

CHILD = """
import json, sys, time
from lmlab import token_shards
from lmlab.data import _corpus_files
from lmlab.tokenizer import Tokenizer
corpus, cache, tokenizer, workers = sys.argv[1:5]
files = _corpus_files(corpus)
tok = Tokenizer.from_str(open(tokenizer, encoding="utf-8").read())
began = time.perf_counter()
shards = token_shards.stream_tokens(files, corpus, tok, cache, "error",
                                    workers=int(workers) or None, progress=False)
print(json.dumps({"seconds": time.perf_counter() - began, "tokens": len(shards)}))
"""


def make_corpus(directory: Path, megabytes: int, seed: int = 0) -> int:
    from lmlab.data import load_corpus
    paragraphs = []
    for name in ("shakespeare", "python-docs"):
        paragraphs += [p + "\n\n" for p in load_corpus(f"builtin:{name}").split("\n\n") if p.strip()]
    rng = random.Random(seed)
    target, written, index = megabytes << 20, 0, 0
    directory.mkdir(parents=True, exist_ok=True)
    while written < target:
        rng.shuffle(paragraphs)
        text = "".join(paragraphs).encode("utf-8")
        with open(directory / f"part_{index:04d}.txt", "ab") as f:
            while written < target and f.tell() < FILE_BYTES:
                piece = text[: min(len(text), target - written, FILE_BYTES - f.tell())]
                piece = piece[: piece.rfind(b"\n") + 1] or piece  # whole lines (UTF-8 safe)
                f.write(piece)
                written += len(piece)
        index += 1
    return written


def measure(corpus: Path, tokenizer_json: Path, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(corpus), cache,
                                  str(tokenizer_json), str(workers)],
                                 stdout=subprocess.PIPE, env=env, text=True)
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"tokenize_stream: the child failed (exit {child.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    # user+sys of the child and its worker processes: on a loaded machine MB per CPU-second is a
    # steadier figure than MB/s (n free cores give about n times it).
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return result


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, every value checked: a bad one ends here (exit 2), before any work."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=1024, help="corpus size in MiB (default 1024)")
    p.add_argument("--workers", type=int, default=0, help="encoding processes (0: lmlab's default)")
    p.add_argument("--corpus-dir", default=None, help="make (or reuse) the corpus here")
    p.add_argument("--kinds", nargs="+", default=["char", "bpe"], choices=["char", "bpe"])
    args = p.parse_args(argv)
    # --mb 0 made no corpus, and its child failed on the missing directory with a traceback
    if args.mb < 1:
        p.error(f"--mb {args.mb}: expected an integer >= 1 (MiB of corpus)")
    if args.workers < 0:
        p.error(f"--workers {args.workers}: expected an integer >= 0 (0: lmlab's default)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "python"))
    from lmlab.data import load_corpus
    from lmlab.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(args.corpus_dir or tmp) / "corpus"
        size = sum(f.stat().st_size for f in corpus.glob("*.txt")) if corpus.is_dir() else 0
        if size < args.mb << 20:
            started = time.perf_counter()
            size = make_corpus(corpus, args.mb)
            print(f"made {size / 2**20:,.0f} MiB in {corpus} ({time.perf_counter() - started:.0f} s)")
        sample = load_corpus("builtin:shakespeare") + load_corpus("builtin:python-docs")
        print(f"{os.cpu_count()} cores; corpus {size / 2**20:,.0f} MiB in "
              f"{len(list(corpus.glob('*.txt')))} files\n")
        print(f"load average {os.getloadavg()[0]:.1f}\n")
        print("| tokenizer | seconds | MB/s | CPU seconds | MB/CPU-s | peak RSS | tokens |\n"
              "|---|---|---|---|---|---|---|")
        for kind in args.kinds:
            tok = train_tokenizer(sample, kind, 1024, unknown="error")
            path = Path(tmp) / f"{kind}.json"
            tok.save(path)
            r = measure(corpus, path, args.workers)
            print(f"| {kind} | {r['seconds']:.1f} | {size / 1e6 / r['seconds']:.1f} | "
                  f"{r['cpu_seconds']:.1f} | {size / 1e6 / r['cpu_seconds']:.1f} | "
                  f"{r['peak_rss_mib']:,.0f} MiB | {r['tokens']:,} |", flush=True)


if __name__ == "__main__":
    main()
