"""Training-throughput benchmark: lmlab against PyTorch eager on the same GPT, config and batch.

One training step is forward + backward + an AdamW update (nanoGPT's settings: betas (0.9, 0.95),
weight decay 0.1 on 2-D weights). Each implementation runs in its OWN subprocess, so its peak RSS
(getrusage's ru_maxrss of that process) is its own and imports of the other do not count; both use
the same thread count. Random token batches (the data pipeline is not what is measured).

Each implementation runs in each matmul precision asked for: "fp32", and "bf16" = mixed precision
with bfloat16 matmul operands and fp32 parameters and optimiser (lmlab's GPT.matmul_precision; for
PyTorch the forward under torch.autocast("cpu", dtype=torch.bfloat16), its standard CPU recipe).

    lmlab bench train --n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --batch-size 12
    lmlab bench generate --n-layer 6 --n-head 6 --n-embd 384 --block-size 256

The second measures generation tokens/s with the KV cache against without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from .ops import MATMUL_PRECISIONS as PRECISIONS

IMPLS = ("lmlab", "pytorch")


def _peak_rss_mib() -> float:
    import resource
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # KiB on Linux
    return kib / (1024.0 * 1024.0) if sys.platform == "darwin" else kib / 1024.0


def _batches(cfg: dict, n: int):
    rng = np.random.default_rng(0)
    shape = (cfg["batch_size"], cfg["block_size"])
    return [(rng.integers(0, cfg["vocab_size"], shape, dtype=np.int64),
             rng.integers(0, cfg["vocab_size"], shape, dtype=np.int64)) for _ in range(n)]


def lmlab_step_fn(cfg: dict, lr: float = 1e-3, precision: str = "fp32"):
    """A closure running one lmlab training step on (x, y) in a matmul precision; returns the
    mean loss."""
    from . import ops
    from .model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg["block_size"],
                          n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"]),
                matmul_precision=precision)
    m = np.zeros_like(model.params)
    v = np.zeros_like(model.params)
    B, T = cfg["batch_size"], cfg["block_size"]
    weights = np.full((B, T), 1.0 / (B * T), np.float32)
    step = [0]

    def train_step(x, y) -> float:
        _, losses = model.forward(x, y)
        loss = float(losses.mean())
        model.zero_grad()
        model.backward(weights)
        step[0] += 1
        ops.adamw_update(model.params, m, v, model.grads, model.decay_mask, lr=lr,
                         weight_decay=0.1, t=step[0])
        return loss

    return train_step


def pytorch_step_fn(cfg: dict, lr: float = 1e-3, precision: str = "fp32"):
    """The same step in PyTorch eager (torch_reference.TorchGPT, torch.optim.AdamW); "bf16" runs
    the forward (and so its backward) under CPU autocast to bfloat16, parameters staying fp32."""
    import contextlib

    import torch

    from .model import GPTConfig
    from .torch_reference import TorchGPT

    torch.manual_seed(0)
    model = TorchGPT(GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg["block_size"],
                               n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"]))
    opt = torch.optim.AdamW(model.decay_groups(0.1), lr=lr, betas=(0.9, 0.95))
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")

    def autocast():
        if precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(x, y) -> float:
        with autocast():
            _, losses = model(torch.from_numpy(x), torch.from_numpy(y))
        loss = losses.float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return train_step


def _set_threads(impl: str, threads: int) -> None:
    if impl == "pytorch":
        import torch
        torch.set_num_threads(threads)
    else:
        from . import ops
        ops.set_num_threads(threads)


def run_one(impl: str, cfg: dict, steps: int, warmup: int, threads: int,
            precision: str = "fp32") -> dict:
    """Measure one implementation in one matmul precision in this process (the subprocess body)."""
    _set_threads(impl, threads)
    make = lmlab_step_fn if impl == "lmlab" else pytorch_step_fn
    step = make(cfg, precision=precision)
    batches = _batches(cfg, 4)
    losses = []
    for i in range(warmup):
        step(*batches[i % len(batches)])
    t0 = time.perf_counter()
    for i in range(steps):
        losses.append(step(*batches[i % len(batches)]))
    dt = time.perf_counter() - t0
    tokens = steps * cfg["batch_size"] * cfg["block_size"]
    return {"impl": impl, "precision": precision, "config": cfg, "threads": threads, "steps": steps,
            "tokens_per_s": tokens / dt, "ms_per_step": 1000.0 * dt / steps,
            "peak_rss_mib": _peak_rss_mib(), "first_loss": losses[0], "last_loss": losses[-1]}


def profile_step(cfg: dict, steps: int = 3, threads: int | None = None,
                 precision: str = "fp32") -> list[tuple[str, float, int]]:
    """Where one lmlab training step's time goes: (kernel, ms per step, calls per step), slowest first.

    Wraps every lmlab.ops function with a timer (the model calls them through the module), runs
    one warmup step and `steps` timed ones; "python (rest)" is the step time outside the kernels.
    """
    from . import ops
    if threads is not None:
        ops.set_num_threads(threads)
    step = lmlab_step_fn(cfg, precision=precision)
    batches = _batches(cfg, 2)
    step(*batches[0])
    totals: dict[str, list] = {}
    originals = {}
    for name in ("matmul_forward", "matmul_backward", "layernorm_forward", "layernorm_backward",
                 "attention_forward", "attention_backward", "gelu_forward", "gelu_backward",
                 "residual_forward", "embedding_forward", "embedding_backward",
                 "crossentropy_forward", "crossentropy_backward", "adamw_update"):
        originals[name] = fn = getattr(ops, name)

        def timed(*args, _fn=fn, _name=name, **kwargs):
            t0 = time.perf_counter()
            result = _fn(*args, **kwargs)
            entry = totals.setdefault(_name, [0.0, 0])
            entry[0] += time.perf_counter() - t0
            entry[1] += 1
            return result
        setattr(ops, name, timed)
    try:
        t0 = time.perf_counter()
        for i in range(steps):
            step(*batches[i % 2])
        wall = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)
    rows = [(name, 1000.0 * t / steps, n // steps) for name, (t, n) in totals.items()]
    rows.append(("python (rest)", 1000.0 * (wall - sum(t for t, _ in totals.values())) / steps, 0))
    return sorted(rows, key=lambda r: -r[1])


def bench_generate(n_layer: int, n_head: int, n_embd: int, block_size: int,
                   prompt_len: int = 16, new_tokens: int = 64, vocab_size: int = 65,
                   threads: int | None = None) -> list[dict]:
    """Generation tokens/s of one randomly initialised model with and without the KV cache.

    Greedy decoding (sampling costs the same either way) from a prompt of prompt_len tokens; rows
    with impl "lmlab-kv-cache" and "lmlab-no-cache", config, tokens_per_s, ms_per_token, and
    whether both produced the same tokens.
    """
    from . import ops
    from .model import GPT, GPTConfig
    from .sample import generate

    if threads is not None:
        ops.set_num_threads(threads)
    cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer,
                    n_head=n_head, n_embd=n_embd)
    model = GPT(cfg)
    prompt = np.arange(prompt_len) % vocab_size
    rows, outputs = [], []
    for use_cache in (True, False):
        generate(model, prompt, 2, temperature=0, use_cache=use_cache)       # warm up
        t0 = time.perf_counter()
        outputs.append(generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache))
        dt = time.perf_counter() - t0
        rows.append({"impl": "lmlab-kv-cache" if use_cache else "lmlab-no-cache",
                     "config": dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                    block_size=block_size, vocab_size=vocab_size,
                                    prompt_len=prompt_len, new_tokens=new_tokens),
                     "threads": ops.get_num_threads(),
                     "tokens_per_s": new_tokens / dt, "ms_per_token": 1000.0 * dt / new_tokens})
    same = bool(np.array_equal(outputs[0], outputs[1]))
    for r in rows:
        r["same_tokens"] = same
    return rows


def torch_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def bench_train(n_layer: int, n_head: int, n_embd: int, block_size: int, batch_size: int,
                steps: int, vocab_size: int = 65, threads: int | None = None,
                impls=IMPLS, warmup: int = 2, precisions=("fp32",)) -> list[dict]:
    """Training tokens/s and peak RSS per implementation and precision, each in its own subprocess.

    PyTorch is skipped when torch is not installed. Returns one dict per (implementation,
    precision), implementation-major, with impl, precision, config, tokens_per_s, peak_rss_mib,
    ms_per_step (and threads, steps, losses).
    """
    for name, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd),
                        ("block_size", block_size), ("batch_size", batch_size), ("steps", steps),
                        ("vocab_size", vocab_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise ValueError(f"impls must be among {IMPLS}, got {sorted(unknown)}")
    unknown = set(precisions) - set(PRECISIONS)
    if unknown or not precisions:
        raise ValueError(f"precisions must be among {PRECISIONS}, got {sorted(precisions)}")
    if threads is None:
        from . import ops
        threads = ops.get_num_threads()
    cfg = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
               batch_size=batch_size, vocab_size=vocab_size)
    rows = []
    for impl in impls:
        if impl == "pytorch" and not torch_available():
            continue
        for precision in precisions:
            spec = json.dumps(dict(impl=impl, cfg=cfg, steps=steps, warmup=warmup,
                                   threads=threads, precision=precision))
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            proc = subprocess.run([sys.executable, "-m", "lmlab.trainbench", "--child", spec],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"bench_train: the {impl} {precision} run failed:\n"
                                   f"{proc.stderr[-2000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return rows


def speed_ratios(rows: list[dict]) -> list[tuple[str, float]]:
    """(label, lmlab tokens/s / PyTorch tokens/s) at equal precision, and lmlab bf16 against
    PyTorch fp32 (the speed a user gains over PyTorch's default), for the rows present."""
    tps = {(r["impl"], r.get("precision", "fp32")): r["tokens_per_s"] for r in rows}
    pairs = [(p, p) for p in PRECISIONS] + [("bf16", "fp32")]
    return [(f"lmlab {a} / pytorch {b}", tps[("lmlab", a)] / tps[("pytorch", b)])
            for a, b in pairs if ("lmlab", a) in tps and ("pytorch", b) in tps]


def _child_main(argv) -> None:
    """The subprocess body bench_train starts: `python -m lmlab.trainbench --child SPEC` measures
    one implementation in one precision and prints its row as JSON."""
    if len(argv) != 2 or argv[0] != "--child":
        raise SystemExit("usage: python -m lmlab.trainbench --child SPEC (bench_train's "
                         "subprocess; run `lmlab bench train` instead)")
    spec = json.loads(argv[1])
    print(json.dumps(run_one(spec["impl"], spec["cfg"], spec["steps"], spec["warmup"],
                             spec["threads"], spec.get("precision", "fp32"))))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
