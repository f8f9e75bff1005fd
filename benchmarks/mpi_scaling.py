"""Data parallel on one machine, measured, and across machines, projected.

    python benchmarks/mpi_scaling.py [--steps 12] [--json out.json]

For each of DESIGN.md's two configs, in the same run: `lmlab pretrain` on 1 rank x 2 threads
with --grad-accum 2, against `mpiexec -n 2` ranks x 1 thread each with its own micro-batch: the
same samples, the same updates (bit for bit), so the one difference is who computes what and the
gradient exchange. From metrics.jsonl (one row per step, the first `--skip` dropped): tokens/s
(every rank's tokens), the step time, and rank 0's time in the exchange (allreduce_ms).

Then the projection to machines on Ethernet, from the formula in README.md ("Across machines"):
a step on N machines takes the measured compute time of one machine's step, plus the gradient
exchange, which moves 2 (N - 1) / N x the gradient bytes through each machine's link (as a ring
allreduce does; lmlab's reduce-scatter + all-gather moves the same) and pays 2 (N - 1) message
latencies. Each machine keeps its own batch (weak scaling); no overlap of the exchange with the
backward pass (lmlab exchanges after it). GPT-2 small's compute time is scaled from the 6/6/384
run's measured FLOP rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from lmlab.trainbench import model_flops_per_token  # noqa: E402

CONFIGS = {  # docs/DESIGN.md's two configurations (vocab: the char tokenizer of shakespeare)
    "4/4/128": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "6/6/384": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16),
}
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=8,
                  vocab_size=50257)
LINKS = {"1 Gb/s": 1e9 / 8, "10 Gb/s": 10e9 / 8}  # bytes/s
LINK_EFFICIENCY = 0.9  # TCP payload of the line rate
LATENCY_S = 50e-6  # one message over Ethernet through MPI's TCP path
MACHINES = (2, 8, 64)


def n_params(cfg: dict) -> int:
    """Parameters of lmlab's GPT (tied head): blocks, embeddings, layer norms."""
    L, C, T, V = cfg["n_layer"], cfg["n_embd"], cfg["block_size"], cfg["vocab_size"]
    per_block = 12 * C * C + 13 * C  # qkv, projection, MLP weights and biases, two layer norms
    return L * per_block + V * C + T * C + 2 * C


def _mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if not found:
        sys.exit('mpi_scaling: no mpiexec: pip install "lmlab[mpi]"')
    return found


def run(ranks: int, cfg: dict, steps: int, skip: int, workdir: Path) -> dict:
    out = workdir / f"run-{ranks}"
    args = [sys.executable, "-m", "lmlab", "pretrain", "--run", str(out), "--overwrite",
            "--corpus", "builtin:shakespeare", "--steps", str(steps), "--eval-every", "0",
            "--save-every", "0", "--log-every", "1", "--no-progress", "--precision", "fp32",
            "--sample-after", "0", "--warmup-steps", "1"]
    for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size"):
        args += ["--" + key.replace("_", "-"), str(cfg[key])]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    if ranks == 1:
        env["OMP_NUM_THREADS"] = "2"
        command = args + ["--grad-accum", "2"]
    else:
        env["OMP_NUM_THREADS"] = "1"
        command = [_mpiexec(), "-n", str(ranks)] + args
    subprocess.run(command, env=env, check=True, cwd=workdir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = rows[skip:]
    tps = statistics.median(r["tokens_per_s"] for r in rows)
    tokens_per_step = 2 * cfg["batch_size"] * cfg["block_size"]
    comm = [r["allreduce_ms"] for r in rows if "allreduce_ms" in r]
    return {"ranks": ranks, "threads": 2 // ranks, "tokens_per_s": tps,
            "step_ms": 1e3 * tokens_per_step / tps,
            "allreduce_ms": statistics.median(comm) if comm else 0.0}


def projection(compute_s: float, grad_bytes: float, tokens_per_machine: int) -> list:
    rows = []
    for link, rate in LINKS.items():
        for n in MACHINES:
            comm_s = 2 * (n - 1) / n * grad_bytes / (rate * LINK_EFFICIENCY) + 2 * (n - 1) * LATENCY_S
            step = compute_s + comm_s
            rows.append({"link": link, "machines": n, "tokens_per_s": n * tokens_per_machine / step,
                         "efficiency": compute_s / step, "comm_ms": 1e3 * comm_s})
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, every value checked: a bad one ends here (exit 2), before any work."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    # before the runs: --skip past --steps left no step to measure (statistics.median of nothing
    # after both runs), --steps 0 ended in a CalledProcessError, a negative --skip kept the last
    if args.steps < 1:
        p.error(f"--steps {args.steps}: expected an integer >= 1")
    if not 0 <= args.skip < args.steps:
        p.error(f"--skip {args.skip}: expected an integer from 0 to --steps - 1 ({args.steps - 1}), "
                "so that a step is left to measure")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import lmlab
    print(f"lmlab {lmlab.__version__}, kernels {lmlab.cpu_info()['isa']}, {os.cpu_count()} cores")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            cfg = dict(CONFIGS[name], vocab_size=65)
            one = run(1, cfg, args.steps, args.skip, Path(tmp))
            two = run(2, cfg, args.steps, args.skip, Path(tmp))
            results[name] = {"config": cfg, "one_rank_two_threads": one, "two_ranks_one_thread": two,
                             "ratio": two["tokens_per_s"] / one["tokens_per_s"]}
    print("\n| config | 1 rank x 2 threads: tokens/s, step | 2 ranks x 1 thread: tokens/s, step, "
          "allreduce | ratio |\n|---|---|---|---|")
    for name, r in results.items():
        one, two = r["one_rank_two_threads"], r["two_ranks_one_thread"]
        print(f"| {name} | {one['tokens_per_s']:,.0f}, {one['step_ms']:.1f} ms | "
              f"{two['tokens_per_s']:,.0f}, {two['step_ms']:.1f} ms, {two['allreduce_ms']:.2f} ms | "
              f"{r['ratio']:.2f}x |")
    # The projection: one machine's compute per step = the one-rank step on this machine.
    models = {}
    for name, r in results.items():
        cfg, one = r["config"], r["one_rank_two_threads"]
        models[name] = (one["step_ms"] / 1e3, 4 * n_params(cfg),
                        2 * cfg["batch_size"] * cfg["block_size"])
    if "6/6/384" in results:
        cfg, one = results["6/6/384"]["config"], results["6/6/384"]["one_rank_two_threads"]
        flops_rate = one["tokens_per_s"] * model_flops_per_token(cfg)
        tokens = GPT2_SMALL["batch_size"] * GPT2_SMALL["block_size"]
        models["GPT-2 small (124M)"] = (tokens * model_flops_per_token(GPT2_SMALL) / flops_rate,
                                        4 * n_params(GPT2_SMALL), tokens)
    print("\nProjected, per-machine batch as measured; efficiency = compute / (compute + exchange)")
    print("| model | gradient | compute/step | link | machines | exchange/step | tokens/s | efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (compute_s, grad_bytes, tokens) in models.items():
        rows = projection(compute_s, grad_bytes, tokens)
        results.setdefault("projection", {})[name] = rows
        for row in rows:
            print(f"| {name} | {grad_bytes / 1e6:.1f} MB | {compute_s * 1e3:,.0f} ms | {row['link']} | "
                  f"{row['machines']} | {row['comm_ms']:,.0f} ms | {row['tokens_per_s']:,.0f} | "
                  f"{row['efficiency']:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
