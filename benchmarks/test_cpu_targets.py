"""benchmarks/cpu_targets.py's judgement on made-up measurements: which target sets apply to a CPU,
which PyTorch option is the fastest, when a target is met, and that a missing measurement fails.
Nothing is timed here (`python benchmarks/cpu_targets.py` measures)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# tests/ holds the loader the script tests share; only tests/'s own run has it on sys.path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchmark_scripts import load_script  # noqa: E402


@pytest.fixture
def targets(monkeypatch):
    return load_script("cpu_targets", monkeypatch)


def train_row(impl, precision, tokens_per_s, rounds=None, **extra):
    return dict(impl=impl, precision=precision, tokens_per_s=tokens_per_s,
                round_tokens_per_s=rounds or [tokens_per_s], flops_per_token=1e9, **extra)


def by_name(results):
    return {r["target_name"]: r for r in results}


ZEN3 = {"available": ["avx2", "portable"], "bf16_paths": ["emulated"]}
ZEN4 = {"available": ["avx512", "avx2", "portable"], "bf16_paths": ["avx512_bf16", "emulated"]}
SAPPHIRE_RAPIDS = {"available": ["avx512", "avx2", "portable"],
                   "bf16_paths": ["amx", "avx512_bf16", "emulated"]}
GRAVITON = {"available": ["neon", "portable"], "bf16_paths": ["emulated"]}


@pytest.mark.parametrize("info, sets", [(ZEN3, ["avx2"]), (ZEN4, ["avx2", "avx512_bf16"]),
                                        (SAPPHIRE_RAPIDS, ["avx2", "avx512_bf16", "amx"]),
                                        (GRAVITON, [])])
def test_applicable_sets(targets, info, sets):
    assert targets.applicable_sets(info) == sets


def test_avx2_training_met_and_not_met(targets):
    avx2 = targets.TARGET_SETS["avx2"]
    rows = [train_row("lmlab", "fp32", 1600, [1600, 1500, 1700]),
            train_row("lmlab", "bf16", 1400),
            train_row("pytorch", "fp32", 1000, [1000, 1500, 1000])]
    results = by_name(targets.training_results(avx2, "6/6/384", rows, "fp32"))
    default = results["6/6/384 training, lmlab fp32"]
    # the median of the rounds' ratios (1.6, 1.0, 1.7), not the ratio of the medians
    assert default["ratio"] == pytest.approx(1.6) and default["target"] == 1.1
    assert default["met"] is True
    other = results["6/6/384 training, lmlab bf16 (not its default)"]
    assert other["met"] is None and other["target"] is None
    assert targets.exit_status(list(results.values())) == 0
    slow = [train_row("lmlab", "fp32", 1050), rows[2]]
    result = targets.training_results(avx2, "6/6/384", slow, "fp32")[0]
    assert result["met"] is False and "NOT met" in targets.format_result(result)
    assert targets.exit_status([result]) == 1


def test_pytorch_bf16_faster_than_fp32_is_the_fastest(targets):
    amx = targets.TARGET_SETS["amx"]
    peak = dict(gflops=1000.0, impl="pytorch", product="fwd 4096x384x1536")
    rows = [train_row("lmlab", "bf16", 5000, mfu=0.8, peak=peak),
            train_row("lmlab", "fp32", 2000),
            train_row("pytorch", "fp32", 2000), train_row("pytorch", "bf16", 4000)]
    results = by_name(targets.training_results(amx, "6/6/384", rows, "bf16"))
    default = results["6/6/384 training, lmlab bf16"]
    assert default["reference"].startswith("PyTorch bf16 4,000 tokens/s")
    assert default["ratio"] == pytest.approx(1.25) and default["met"] is False  # 1.3x asked
    mfu = results["6/6/384 MFU, lmlab bf16"]
    assert mfu["ratio"] == 0.8 and mfu["met"] is True
    assert targets.format_result(mfu).endswith("80.0%  target >= 75.0%  met")


def test_missing_rows_are_not_met(targets):
    amx = targets.TARGET_SETS["amx"]
    # no PyTorch row, and a lmlab row without MFU: neither target passes silently
    results = by_name(targets.training_results(amx, "6/6/384", [train_row("lmlab", "bf16", 5000)],
                                               "bf16"))
    assert results["6/6/384 training, lmlab bf16"]["met"] is False
    assert results["6/6/384 MFU, lmlab bf16"]["met"] is False
    assert targets.training_results(amx, "4/4/128", [], "bf16")[0]["met"] is False


def kernel_row(kernel, shape, ratio, reference_name="torch 2.13.0+cpu bf16 matmul"):
    return dict(kernel=kernel, shape=shape, lmlab=100.0 * ratio, reference=100.0, ratio=ratio,
                reference_name=reference_name)


def every_matmul_row(targets, ratio):
    return [kernel_row(kernel, f"{M}x{K}x{N}", ratio) for M, K, N in targets.bench.MATMUL_SHAPES["gpt"]
            for kernel in targets.BF16_MATMULS]


def test_matmul_targets(targets):
    zen4 = targets.TARGET_SETS["avx512_bf16"]
    rows = every_matmul_row(targets, 0.96)
    results = targets.matmul_results(zen4, rows)
    assert len(results) == len(rows) and all(r["met"] for r in results)
    assert not any(r["met"] for r in targets.matmul_results(zen4, every_matmul_row(targets, 0.9)))
    # one shape's row missing, and one measured against numpy (no torch): both NOT met
    rows[0] = dict(rows[0], reference_name="numpy matmul (openblas), fp32")
    results = targets.matmul_results(zen4, rows[:-1])
    assert [r["met"] for r in results].count(False) == 2
    assert results[-1]["measured"] == "not measured" and results[-1]["ratio"] is None
    assert targets.exit_status(results) == 1


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--rounds", "0"], ["--steps", "-1"],
                                  ["--only", "avx512"], ["--threads", "two"]])
def test_bad_arguments_exit_2(targets, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        targets.parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_arguments(targets):
    args = targets.parse_args(["--threads", "2", "--rounds", "1", "--steps", "3", "--json",
                               "--only", "amx"])
    assert (args.threads, args.rounds, args.steps, args.json, args.only) == (2, 1, 3, True, "amx")
    args = targets.parse_args([])
    assert (args.threads, args.steps, args.only, args.json) == (None, None, None, False)
