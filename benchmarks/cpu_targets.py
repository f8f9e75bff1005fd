"""The project's performance targets for this CPU's family, measured in one run against PyTorch.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/cpu_targets.py [--threads N]
        [--rounds N] [--steps N] [--json] [--only {avx2,avx512_bf16,amx}]

Which target sets apply comes from lmlab.cpu_info(); each set is measured as its CPU family runs:

- avx2 (every CPU with AVX2; lmlab on its AVX2 kernels, PyTorch held to AVX2, as `lmlab bench
  train --isa avx2`): 4/4/128 training >= 1.5x PyTorch's fastest option, 6/6/384 >= 1.1x.
- avx512_bf16 (lmlab's bf16 products forced onto that path, AMX left unused): the bf16 matmul >=
  0.95x PyTorch's on every `lmlab bench kernels` shape and product; 6/6/384 >= 1.2x PyTorch's
  fastest with MFU >= 75%; 4/4/128 >= 2x.
- amx: the bf16 matmul >= 0.9x PyTorch's (oneDNN); 6/6/384 >= 1.3x with MFU >= 75%; 4/4/128 >= 2x.

Training is lmlab.trainbench.bench_train (each library in its own process, interleaved rounds,
ratios the median of the rounds'); the matmul, lmlab.bench.bench_kernels's bf16 matmul rows.
"PyTorch's fastest option" is the faster of its fp32 and bf16 autocast in the same run; lmlab runs
at its default precision (lmlab.ops.resolve_precision("auto") under the set's kernels), its other
precision printed for information. A missing measurement is a target NOT met, never a pass.

Prints the CPU, date and versions, then one line per target (measured, reference, ratio, target,
met or NOT met); --json, one JSON object per target instead. Exit status: 0 every target met, 1 some
not, 2 a usage error (or --only naming a set this CPU lacks), 3 the targets cannot be checked here
(no torch: they are all relative to PyTorch; or no set applies to this CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from lmlab import bench, ops, trainbench  # noqa: E402

MODELS = {  # the README's two training configs
    "4/4/128": trainbench.CONFIGS["nanogpt-cpu"],
    "6/6/384": dict(trainbench.CONFIGS["nanogpt-cpu"], n_layer=6, n_head=6, n_embd=384,
                    block_size=256, batch_size=16),
}
# Timed steps per model by default: the README's commands (a 6/6/384 step takes seconds).
DEFAULT_STEPS = {"4/4/128": 20, "6/6/384": 6}
BF16_MATMULS = ("matmul fwd bf16", "matmul bwd-input bf16", "matmul bwd-weight bf16")
MFU_MODEL = "6/6/384"


@dataclass(frozen=True)
class TargetSet:
    """One CPU family's targets: how it is measured, and the ratios (and MFU) it must reach."""
    name: str
    isa: str                        # bench_train's isa: lmlab.trainbench.ISA_ENV
    bf16_path: str | None           # lmlab's bf16 path forced for the set, None: left as it is
    training: dict                  # model -> lmlab / PyTorch's fastest, at least
    matmul: float | None = None     # lmlab bf16 matmul / PyTorch's, at least, on every shape
    mfu: float | None = None        # lmlab's MFU on MFU_MODEL, at least
    # model -> (impl, precision) runs not measured. Held to AVX2, PyTorch's bf16 autocast is
    # emulated: 14-30x slower than its fp32 on 4/4/128 (README), and on 6/6/384 one step took 75 s
    # (54.7 tokens/s against its fp32's ~1,500; AMD EPYC Zen 3, 2 threads, 2026-11-30), so three
    # rounds would take half an hour. It is measured on 4/4/128, where the run shows it losing.
    left_out: dict = field(default_factory=dict)

TARGET_SETS = {
    "avx2": TargetSet("avx2", isa="avx2", bf16_path=None,
                      training={"4/4/128": 1.5, "6/6/384": 1.1},
                      left_out={"6/6/384": (("pytorch", "bf16"),)}),
    "avx512_bf16": TargetSet("avx512_bf16", isa="native", bf16_path="avx512_bf16",
                             training={"6/6/384": 1.2, "4/4/128": 2.0}, matmul=0.95, mfu=0.75),
    "amx": TargetSet("amx", isa="native", bf16_path="amx",
                     training={"6/6/384": 1.3, "4/4/128": 2.0}, matmul=0.9, mfu=0.75),
}


def applicable_sets(cpu_info: dict) -> list[str]:
    """The target sets that apply to a CPU of this lmlab.cpu_info(): avx2 where lmlab can run its
    AVX2 kernels, a bf16 set where its bf16 path exists."""
    return [name for name, target_set in TARGET_SETS.items()
            if (target_set.bf16_path in cpu_info["bf16_paths"] if target_set.bf16_path
                else target_set.isa in cpu_info["available"])]


def result(target_set: str, name: str, measured: str, reference: str, ratio, target: float | None,
           unit: str = "x") -> dict:
    """One target's line: met when the ratio is measured and reaches the target (target None: a
    figure printed for information, met None)."""
    met = None if target is None else (ratio is not None and ratio >= target)
    return dict(set=target_set, target_name=name, measured=measured, reference=reference,
                ratio=ratio, target=target, unit=unit, met=met)


def training_results(target_set: TargetSet, model: str, rows: list[dict],
                     lmlab_precision: str) -> list[dict]:
    """The training targets of one model from bench_train's rows: lmlab at `lmlab_precision`
    against PyTorch's fastest row, lmlab's other precision for information, and MFU where the set
    asks for it."""
    by_run = {(r["impl"], r["precision"]): r for r in rows}
    lmlab_row = by_run.get(("lmlab", lmlab_precision))
    pytorch_rows = [r for r in rows if r["impl"] == "pytorch"]
    fastest = max(pytorch_rows, key=lambda r: r["tokens_per_s"], default=None)
    out = []
    for precision in (lmlab_precision, *(p for p in trainbench.PRECISIONS if p != lmlab_precision)):
        row = by_run.get(("lmlab", precision))
        default = precision == lmlab_precision
        if row is None and not default:
            continue
        ratio = (trainbench.round_ratios(row, fastest)[0] if row is not None and fastest
                 else None)
        out.append(result(
            target_set.name,
            f"{model} training, lmlab {precision}{'' if default else ' (not its default)'}",
            _tokens(row), _tokens(fastest, reference=True), ratio,
            target_set.training[model] if default else None))
    if target_set.mfu is not None and model == MFU_MODEL:
        peak = (lmlab_row or {}).get("peak")
        mfu = (lmlab_row or {}).get("mfu")
        measured = ("not measured" if mfu is None else
                    f"{lmlab_row['tokens_per_s'] * lmlab_row['flops_per_token'] / 1e9:,.0f} "
                    f"model GFLOP/s")
        reference = ("not measured" if peak is None else
                     f"peak {peak['gflops']:,.0f} GFLOP/s ({peak['impl']}, {peak['product']})")
        out.append(result(target_set.name, f"{model} MFU, lmlab {lmlab_precision}", measured,
                          reference, mfu, target_set.mfu, unit="%"))
    return out


def _tokens(row: dict | None, reference: bool = False) -> str:
    if row is None:
        return "not measured"
    figure = f"{row['tokens_per_s']:,.0f} tokens/s"
    return f"PyTorch {row['precision']} {figure} (its fastest)" if reference else figure


def matmul_results(target_set: TargetSet, kernel_rows: list[dict]) -> list[dict]:
    """The bf16 matmul target on every `lmlab bench kernels` shape and product (a row that is
    missing, or whose reference is not PyTorch's, is NOT met)."""
    by_case = {(r["kernel"], r["shape"]): r for r in kernel_rows
               if r["reference_name"].startswith("torch")}
    out = []
    for M, K, N in bench.MATMUL_SHAPES["gpt"]:
        shape = f"{M}x{K}x{N}"
        for kernel in BF16_MATMULS:
            row = by_case.get((kernel, shape))
            measured = "not measured" if row is None else f"{row['lmlab']:,.0f} GFLOP/s"
            reference = ("not measured" if row is None else
                         f"{row['reference_name']} {row['reference']:,.0f} GFLOP/s")
            out.append(result(target_set.name, f"{kernel} {shape}", measured, reference,
                              None if row is None else row["ratio"], target_set.matmul))
    return out


def format_result(r: dict) -> str:
    """One printed line: name, measured, reference, ratio, target, met/NOT met."""
    def figure(value):
        if value is None:
            return "-"
        return f"{100 * value:.1f}%" if r["unit"] == "%" else f"{value:.2f}x"
    verdict = {True: "met", False: "NOT met", None: "(information)"}[r["met"]]
    target = "" if r["target"] is None else f"  target >= {figure(r['target'])}"
    return (f"[{r['set']}] {r['target_name']}: {r['measured']} against {r['reference']}: "
            f"{figure(r['ratio'])}{target}  {verdict}")


def exit_status(results: list[dict]) -> int:
    """0 when every target is met, 1 when one is not (lines for information do not count)."""
    return 0 if all(r["met"] is not False for r in results) else 1


def parse_args(argv=None) -> argparse.Namespace:
    """The arguments, every value checked: a bad one ends here (exit 2), before any work."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None,
                   help="threads for lmlab and PyTorch (default: lmlab's default count)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds per training measurement, median taken (default 3)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed training steps per round (default: "
                        + ", ".join(f"{n} on {m}" for m, n in DEFAULT_STEPS.items()) + ")")
    p.add_argument("--json", action="store_true", help="one JSON object per target")
    p.add_argument("--only", choices=tuple(TARGET_SETS), default=None,
                   help="measure this target set alone (default: every set this CPU has)")
    args = p.parse_args(argv)
    for name in ("threads", "rounds", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} {value}: expected an integer >= 1")
    return args


@contextlib.contextmanager
def bf16_path(name: str | None):
    """lmlab's bf16 products on one path, in this process and in bench_train's children (which
    read LMLAB_BF16 at import); None: as they are."""
    if name is None:
        yield
        return
    before = os.environ.get("LMLAB_BF16")
    os.environ["LMLAB_BF16"] = name
    try:
        with ops.use_bf16_path(name):
            yield
    finally:
        if before is None:
            os.environ.pop("LMLAB_BF16")
        else:
            os.environ["LMLAB_BF16"] = before


def lmlab_default_precision(target_set: TargetSet) -> str:
    """What `--precision auto` trains in under the set's kernels and bf16 path."""
    isa = ops.use_isa(target_set.isa) if target_set.isa != "native" else contextlib.nullcontext()
    with isa, bf16_path(target_set.bf16_path):
        return ops.precision_name(ops.resolve_precision("auto"))


def measure_set(target_set: TargetSet, args, report) -> list[dict]:
    """Run one set's measurements, reporting each target's line as soon as it is known."""
    results = []
    lmlab_precision = lmlab_default_precision(target_set)
    with bf16_path(target_set.bf16_path):
        if target_set.matmul is not None:
            kernel_rows = bench.bench_kernels(threads=args.threads, json_lines=True,
                                              out=io.StringIO())
            results += report(matmul_results(target_set, kernel_rows))
        for model, cfg in MODELS.items():
            rows = trainbench.bench_train(
                cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["block_size"],
                cfg["batch_size"], args.steps or DEFAULT_STEPS[model], vocab_size=cfg["vocab_size"],
                threads=args.threads, precisions=trainbench.PRECISIONS, isa=target_set.isa,
                rounds=args.rounds, mfu=target_set.mfu is not None,
                leave_out=target_set.left_out.get(model, ()))
            results += report(training_results(target_set, model, rows, lmlab_precision))
    return results


def cpu_description() -> str:
    """The CPU's model name (/proc/cpuinfo) and, where lscpu runs, its family and model numbers."""
    name = "unknown CPU"
    with contextlib.suppress(OSError):
        name = next((line.split(":", 1)[1].strip()
                     for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), name)
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return name
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    numbers = [f"{key.lower()} {fields[key].strip()}" for key in ("CPU family", "Model")
               if key in fields]
    return f"{name} (lscpu: {', '.join(numbers)})" if numbers else name


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = trainbench.torch_missing()
    if missing:
        print(f"cpu_targets: torch cannot be imported ({missing}); every target is relative to "
              "PyTorch, so none can be checked here", file=sys.stderr)
        return 3
    import torch

    info = ops.cpu_info()
    sets = applicable_sets(info)
    if args.only is not None and args.only not in sets:
        print(f"cpu_targets: --only {args.only}: that set does not apply to this CPU (lmlab "
              f"kernels here: {', '.join(info['available'])}; bf16 paths: "
              f"{', '.join(info['bf16_paths'])})", file=sys.stderr)
        return 2
    if not sets:
        print("cpu_targets: no target set applies to this CPU (it has neither AVX2 nor a native "
              "bf16 path)", file=sys.stderr)
        return 3
    sets = [args.only] if args.only else sets
    # bench_train's children import lmlab: the one this script imported, installed or not
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(Path(ops.__file__).resolve().parents[1])]
        + [p for p in [os.environ.get("PYTHONPATH")] if p])
    threads = args.threads or ops.get_num_threads()
    if not args.json:
        print(f"CPU: {cpu_description()}")
        print(f"date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; lmlab kernels "
              f"{info['isa']} (available: {', '.join(info['available'])}), bf16 path "
              f"{info['bf16_path']} (paths: {', '.join(info['bf16_paths'])}); torch "
              f"{torch.__version__}; {threads} thread{'s' if threads != 1 else ''}")
        print(f"target sets: {', '.join(sets)}", flush=True)

    def report(lines: list[dict]) -> list[dict]:
        for r in lines:
            print(json.dumps(r) if args.json else format_result(r), flush=True)
        return lines

    args.threads = threads
    results = []
    for name in sets:
        target_set = TARGET_SETS[name]
        for model, runs in target_set.left_out.items():
            if not args.json:
                print(f"[{name}] {model}: not measured, too slow to be the fastest option: "
                      f"{', '.join(' '.join(run) for run in runs)} (see TARGET_SETS)", flush=True)
        results += measure_set(target_set, args, report)
    status = exit_status(results)
    if not args.json:
        unmet = sum(r["met"] is False for r in results)
        print("every target met" if status == 0 else
              f"{unmet} of {sum(r['met'] is not None for r in results)} targets NOT met")
    return status


if __name__ == "__main__":
    sys.exit(main())
