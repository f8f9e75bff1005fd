"""Training-throughput benchmark: lmlab against PyTorch eager on the same GPT, config and batch.

One training step is forward + backward + an AdamW update (nanoGPT's settings: betas (0.9, 0.95),
weight decay 0.1 on 2-D weights). Each implementation runs in its OWN subprocess, so its peak RSS
(getrusage's ru_maxrss of that process) is its own and imports of the other do not count; both use
the same thread count. Random token batches (the data pipeline is not what is measured).

Each implementation runs in each matmul precision asked for: "fp32", and "bf16" = mixed precision
with bfloat16 matmul operands and fp32 parameters and optimiser (lmlab's GPT.matmul_precision; for
PyTorch the forward under torch.autocast("cpu", dtype=torch.bfloat16), its standard CPU recipe).

    lmlab bench train --n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --batch-size 12
    lmlab bench train --config gpt2-small --block-size 64
    lmlab bench generate --n-layer 6 --n-head 6 --n-embd 384 --block-size 256

The second measures generation tokens/s with the KV cache and without it, and transformers'
GPT2LMHeadModel.generate on the same weights (with its KV cache) as the reference.

Efficiency: each run reports the model FLOPs per token, 6N + 12 L C T (PaLM, appendix B; N counts
every weight matrix a token multiplies through, the tied LM head included), and each row its MFU:
tokens/s x FLOPs per token over the fastest matmul rate measured in the same run at that precision
(either library, any of `lmlab bench kernels`'s shapes and products), under the same --isa.

Rounds: the host may be shared, and a neighbour's burst can slow whichever implementation happens
to be running. So each (implementation, precision) is measured `rounds` times, the rounds
interleaved (every implementation once per round, the order reversed every other round); a row
reports its median round, and each speed ratio is the median of the rounds' ratios, each between
runs that followed one another. Every round's ratio is reported with it.

--isa avx2 measures an AVX2 machine on this one: lmlab on its AVX2 kernels (LMLAB_ISA) and PyTorch
restricted to AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), peaks included.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import numpy as np

from .errors import LmlabError
from .ops import MATMUL_PRECISIONS as PRECISIONS

IMPLS = ("lmlab", "pytorch")

# Named model shapes for `lmlab bench train --config NAME`; a flag given overrides its field.
# nanogpt-cpu: nanoGPT's CPU recipe (docs/DESIGN.md). gpt2-small: GPT-2 124M (its vocabulary and
# 1024-token context) at llm.c's CPU batch size.
CONFIGS = {
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                        vocab_size=65),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=4,
                       vocab_size=50257),
}

# The environment that holds every implementation to one instruction set ("native": none).
ISA_ENV = {
    "native": {},
    "avx2": {"LMLAB_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def model_flops_per_token(cfg: dict) -> float:
    """Training FLOPs per token, 6N + 12 L C T: N = 12 L C^2 (qkv, attention projection, MLP) +
    V C (the tied LM head), each weight multiplied once forward and twice backward at 2 FLOPs;
    12 L C T for the attention scores and their mix over the T positions (full, not causal half)."""
    L, C, T, V = cfg["n_layer"], cfg["n_embd"], cfg["block_size"], cfg["vocab_size"]
    n_weights = 12 * L * C * C + V * C
    return 6.0 * n_weights + 12.0 * L * C * T


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
            "peak_rss_mib": _peak_rss_mib(), "first_loss": losses[0], "last_loss": losses[-1],
            "isa": _isa_in_use(impl)}


def _isa_in_use(impl: str) -> str:
    """The instruction set the implementation runs on in this process, as it reports it."""
    if impl == "lmlab":
        from . import ops
        return ops.cpu_info()["isa"]
    import torch
    return str(torch.backends.cpu.get_cpu_capability())


def peak_matmul(impl: str, precision: str, threads: int, repeat: int = 5) -> dict:
    """The fastest matmul GFLOP/s of one implementation at one precision (the subprocess body):
    the forward and both backward products of each `lmlab bench kernels` shape, best of `repeat`.
    PyTorch's bf16 products take tensors already in bf16 (lmlab's take fp32 and round them)."""
    from .bench import MATMUL_SHAPES
    _set_threads(impl, threads)
    rng = np.random.default_rng(0)
    best = {"gflops": 0.0}
    for M, K, N in MATMUL_SHAPES["gpt"]:
        inp, w, dout = (rng.standard_normal(s, dtype=np.float32) for s in ((M, K), (N, K), (M, N)))
        if impl == "lmlab":
            from . import ops
            out, dinp, dw = (np.zeros(s, np.float32) for s in ((M, N), (M, K), (N, K)))
            products = {
                "fwd": lambda: ops.matmul_forward(out, inp, w, precision=precision),
                "bwd-input": lambda: ops.matmul_backward(dinp, None, None, dout, inp, w,
                                                         precision=precision, accumulate=False),
                "bwd-weight": lambda: ops.matmul_backward(None, dw, None, dout, inp, w,
                                                          precision=precision)}
        else:
            import torch
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            ti, tw, td = (torch.from_numpy(x).to(dtype) for x in (inp, w, dout))
            products = {"fwd": lambda: torch.matmul(ti, tw.T),
                        "bwd-input": lambda: torch.matmul(td, tw),
                        "bwd-weight": lambda: torch.matmul(td.T, ti)}
        for name, fn in products.items():
            fn()
            ms = min(_timed_ms(fn) for _ in range(repeat))
            gflops = 2.0 * M * K * N / ms / 1e6
            if gflops > best["gflops"]:
                best = {"gflops": gflops, "impl": impl, "product": f"{name} {M}x{K}x{N}"}
    return {"peak": best, "precision": precision, "isa": _isa_in_use(impl)}


def _timed_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1000.0 * (time.perf_counter() - t0)


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
                   threads: int | None = None, reference: bool = True,
                   precision: str = "fp32") -> list[dict]:
    """Generation tokens/s of one randomly initialised model with and without the KV cache, and of
    the same model in transformers (GPT2LMHeadModel.generate with its KV cache) as the reference,
    each computing in `precision` (bf16: lmlab's bf16 matmul operands; transformers' model in
    bfloat16, as its users run one in bf16).

    Greedy decoding (sampling costs the same either way) from a prompt of prompt_len tokens; rows
    with impl "lmlab-kv-cache", "lmlab-no-cache" and, where transformers and torch are installed
    (and `reference`), "transformers-kv-cache", run in its own process on the same thread count;
    each with config, threads, tokens_per_s and ms_per_token. The lmlab rows say whether both
    produced the same tokens (same_tokens); the reference row gives the largest difference of its
    logits for the prompt from lmlab's (max_logit_diff: the two compute the same model), and each
    lmlab row its speed over the reference's (vs_reference).
    """
    from . import ops
    from .model import GPT, GPTConfig
    from .sample import generate

    if threads is not None:
        ops.set_num_threads(threads)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    config = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                  vocab_size=vocab_size, prompt_len=prompt_len, new_tokens=new_tokens,
                  precision=precision)
    model = GPT(_gpt_config(config), matmul_precision=precision)
    prompt = _generation_prompt(config)
    rows, outputs = [], []
    for use_cache in (True, False):
        generate(model, prompt, 2, temperature=0, use_cache=use_cache)       # warm up
        t0 = time.perf_counter()
        outputs.append(generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache))
        dt = time.perf_counter() - t0
        rows.append({"impl": "lmlab-kv-cache" if use_cache else "lmlab-no-cache",
                     "config": config, "threads": ops.get_num_threads(),
                     "tokens_per_s": new_tokens / dt, "ms_per_token": 1000.0 * dt / new_tokens})
    same = bool(np.array_equal(outputs[0], outputs[1]))
    for r in rows:
        r["same_tokens"] = same
    if reference and generate_reference_missing(config) is None:
        ref = _child({"generate": config, "threads": ops.get_num_threads()}, ops.get_num_threads(),
                     "native")
        for r in rows:
            r["vs_reference"] = r["tokens_per_s"] / ref["tokens_per_s"]
        rows.append(ref)
    return rows


def torch_missing() -> str | None:
    """Why PyTorch cannot be the reference here (the ImportError's text), or None when it can. An
    import, not a search for the package: a torch that is found but does not import (a missing
    library, a broken install) failed in its child with a traceback."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return str(exc) or type(exc).__name__
    return None


def _gpt_config(config: dict):
    from .model import GPTConfig
    return GPTConfig(**{k: config[k] for k in ("vocab_size", "block_size", "n_layer", "n_head",
                                               "n_embd")})


def _generation_prompt(config: dict) -> np.ndarray:
    return np.arange(config["prompt_len"]) % config["vocab_size"]


def generate_reference_missing(config: dict) -> str | None:
    """Why bench_generate cannot measure transformers on this config, or None when it can."""
    if not transformers_available():
        return "it needs transformers and torch, and they do not both import here"
    positions = config["prompt_len"] + config["new_tokens"]
    if positions > config["block_size"]:
        return (f"transformers' GPT-2 reads at most block_size ({config['block_size']}) positions, "
                f"and --prompt-len + --new-tokens is {positions}; lmlab slides its window")
    return None


def transformers_available() -> bool:
    """Whether transformers (and torch) import here: bench_generate's reference can run."""
    if not torch_available():
        return False
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def generate_transformers(config: dict, threads: int) -> dict:
    """The reference row of bench_generate (the subprocess body): lmlab's randomly initialised GPT
    of `config` (the same seed, so the same weights) as a transformers GPT2LMHeadModel, timed
    generating greedily with its KV cache; then its prompt logits compared with lmlab's."""
    import torch
    import transformers

    from . import hf
    from .model import GPT

    torch.set_num_threads(threads)
    precision = config.get("precision", "fp32")
    model = GPT(_gpt_config(config), matmul_precision=precision)
    settings = hf.gpt2_config(model.config, bos_id=0, eos_id=None, pad_id=0)
    settings.pop("architectures")
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**settings)).eval()
    weights = {hf_name: torch.from_numpy(hf.to_hf(name, model._named[name]).copy())
               for name, hf_name, _, _ in hf.name_map(model.config)}
    reference.load_state_dict(weights, strict=False)  # the tied head and attention masks: not weights
    if precision == "bf16":
        reference = reference.to(torch.bfloat16)
    prompt = _generation_prompt(config)
    tokens = torch.from_numpy(prompt[None].astype(np.int64))
    n = config["new_tokens"]

    def run(count):
        # min_new_tokens: as many tokens as lmlab makes (the model has no end token anyway).
        return reference.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                                  use_cache=True, max_new_tokens=count, min_new_tokens=count,
                                  pad_token_id=0)
    with torch.inference_mode():
        run(2)                                                          # warm up
        t0 = time.perf_counter()
        run(n)
        dt = time.perf_counter() - t0
        theirs = reference(tokens).logits[0].double().numpy()  # bf16 widens exactly
    ours = model.forward(prompt[None].astype(np.int32))[0][0].astype(np.float64)
    return {"impl": "transformers-kv-cache", "config": config, "threads": threads,
            "tokens_per_s": n / dt, "ms_per_token": 1000.0 * dt / n,
            "reference": f"transformers {transformers.__version__}, torch {torch.__version__}",
            "max_logit_diff": float(np.abs(theirs - ours).max())}


def torch_available() -> bool:
    return torch_missing() is None


def bench_train(n_layer: int, n_head: int, n_embd: int, block_size: int, batch_size: int,
                steps: int, vocab_size: int = 65, threads: int | None = None,
                impls=IMPLS, warmup: int = 2, precisions=("fp32",), isa: str = "native",
                mfu: bool = True, rounds: int = 3, leave_out=()) -> list[dict]:
    """Training tokens/s and peak RSS per implementation and precision, each in its own subprocess,
    every one under ISA_ENV[isa], in `rounds` interleaved rounds (module docstring).

    PyTorch is skipped when torch cannot be imported (ValueError when it is the only
    implementation asked for). Returns one dict per (implementation,
    precision), implementation-major, with impl, precision, config, tokens_per_s and ms_per_step
    (of its median round), round_tokens_per_s (every round's, in order), peak_rss_mib,
    flops_per_token (and threads, steps, losses, isa); with mfu, also each row's mfu and peak (the
    fastest matmul of any implementation run, at the row's precision). leave_out: (impl, precision)
    pairs not to train, for a run too slow to be worth its minutes (their matmul peak still counts).
    """
    if isa not in ISA_ENV:
        raise ValueError(f"isa must be one of {tuple(ISA_ENV)}, got {isa!r}")
    forced = ISA_ENV[isa].get("LMLAB_ISA")
    from . import ops  # here, not at the top: a PyTorch child never loads lmlab's kernels
    if forced is not None and forced not in ops.cpu_info()["available"]:
        raise ValueError(f"isa {isa!r}: this CPU cannot run lmlab's {forced} kernels (available "
                         f"here: {', '.join(ops.cpu_info()['available'])})")
    for name, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd),
                        ("block_size", block_size), ("batch_size", batch_size), ("steps", steps),
                        ("vocab_size", vocab_size), ("rounds", rounds)):
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
    # here, not in each child: a model too large for lmlab failed as "the lmlab fp32 run failed"
    from .model import check_parameter_count
    check_parameter_count(_gpt_config(cfg))
    if "pytorch" in impls and not torch_available():
        if not set(impls) - {"pytorch"}:  # nothing left to measure: say so, not an empty table
            raise ValueError(f"impl 'pytorch': torch cannot be imported ({torch_missing()}); "
                             "install PyTorch, or measure lmlab alone")
        impls = [i for i in impls if i != "pytorch"]
    skipped = set(leave_out)
    runs = [(impl, precision) for impl in impls for precision in precisions
            if (impl, precision) not in skipped]
    measured = {run: [] for run in runs}
    for r in range(rounds):
        for impl, precision in (runs if r % 2 == 0 else runs[::-1]):
            measured[(impl, precision)].append(
                _child(dict(impl=impl, cfg=cfg, steps=steps, warmup=warmup, threads=threads,
                            precision=precision), threads, isa))
    rows = [_median_round(measured[run], cfg) for run in runs]
    if mfu:
        for precision in precisions:
            peaks = [_child(dict(peak=impl, threads=threads, precision=precision), threads, isa)
                     for impl in impls]
            peak = max((p["peak"] for p in peaks), key=lambda p: p["gflops"])
            for row in rows:
                if row["precision"] == precision:
                    row["peak"] = peak
                    row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / (peak["gflops"] * 1e9)
    return rows


def _median_round(results: list[dict], cfg: dict) -> dict:
    """One implementation's row from its rounds: its median round (the slower middle one of an
    even count), every round's tokens/s, and the largest peak RSS of any round."""
    ranked = sorted(results, key=lambda r: r["tokens_per_s"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    row["round_tokens_per_s"] = [r["tokens_per_s"] for r in results]
    row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in results)
    row["flops_per_token"] = model_flops_per_token(cfg)
    return row


def _child(spec: dict, threads: int, isa: str) -> dict:
    """Runs a measurement (run_one, peak_matmul or generate_transformers) in a fresh process under
    ISA_ENV[isa]."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), **ISA_ENV[isa])
    proc = subprocess.run([sys.executable, "-m", "lmlab.trainbench", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode == -signal.SIGINT:  # Ctrl-C reached the child first: the run's, not its
        raise KeyboardInterrupt
    if proc.returncode != 0:  # one line: the child's last word, and how to see all of it
        what = (f"{spec['impl']} {spec['precision']}" if "impl" in spec else
                f"{spec['peak']} {spec['precision']} peak matmul" if "peak" in spec else
                "transformers generation")
        how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exit {proc.returncode}")
        said = next((line.strip() for line in reversed(proc.stderr.splitlines()) if line.strip()),
                    "nothing on stderr")
        raise LmlabError(f"the {what} run failed ({how}): {said}; rerun it "
                         f"alone to see all: python -m lmlab.trainbench --child "
                         f"'{json.dumps(spec)}'")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def speed_ratios(rows: list[dict]) -> list[tuple[str, float, list]]:
    """(label, ratio, ratio of each round) of lmlab tokens/s over PyTorch tokens/s at equal
    precision, and of lmlab bf16 over PyTorch fp32 (the speed a user gains over PyTorch's
    default), for the rows present. The ratio is the median of the rounds' (module docstring); rows
    without rounds give the ratio of their tokens/s, as their one round."""
    runs = {(r["impl"], r.get("precision", "fp32")): r for r in rows}
    pairs = [(p, p) for p in PRECISIONS] + [("bf16", "fp32")]
    out = []
    for a, b in pairs:
        if ("lmlab", a) in runs and ("pytorch", b) in runs:
            out.append((f"lmlab {a} / pytorch {b}",
                        *round_ratios(runs[("lmlab", a)], runs[("pytorch", b)])))
    return out


def round_ratios(row: dict, reference: dict) -> tuple[float, list]:
    """(median, each round's) of row's tokens/s over reference's, round by round (module
    docstring); a row without rounds counts its tokens/s as its one round."""
    def rounds(r):
        return r.get("round_tokens_per_s") or [r["tokens_per_s"]]

    per_round = [x / y for x, y in zip(rounds(row), rounds(reference))]
    return statistics.median(per_round), per_round


def _child_main(argv) -> None:
    """The subprocess body bench_train starts: `python -m lmlab.trainbench --child SPEC` measures
    one implementation in one precision (or the matmul peak) and prints its row as JSON."""
    if len(argv) != 2 or argv[0] != "--child":
        raise SystemExit("usage: python -m lmlab.trainbench --child SPEC (bench_train's "
                         "subprocess; run `lmlab bench train` instead)")
    spec = json.loads(argv[1])
    if "generate" in spec:
        print(json.dumps(generate_transformers(spec["generate"], spec["threads"])))
        return
    if "peak" in spec:
        print(json.dumps(peak_matmul(spec["peak"], spec["precision"], spec["threads"])))
        return
    print(json.dumps(run_one(spec["impl"], spec["cfg"], spec["steps"], spec["warmup"],
                             spec["threads"], spec.get("precision", "fp32"))))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
