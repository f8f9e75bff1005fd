"""Smoke test of the kernel benchmark runner (lmlab.bench) on tiny shapes: the rows it returns and prints,
the JSON-lines mode, and the OpenBLAS environment warning. No timing is asserted."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest

from benchmark_scripts import load_script
from lmlab import bench
from lmlab.cli import main

KERNELS = {"matmul fwd", "matmul bwd-input", "matmul bwd-weight", "softmax fwd", "softmax bwd",
           "crossentropy fwd", "crossentropy bwd", "layernorm fwd", "layernorm bwd", "gelu fwd", "gelu bwd",
           "adamw", "attention fwd+bwd", "matmul fwd bf16", "matmul bwd-input bf16",
           "matmul bwd-weight bf16"}


def check_row(row):
    assert {"kernel", "shape", "lmlab", "reference", "unit", "ratio", "reference_name"} <= set(row)
    assert row["unit"] == ("GFLOP/s" if row["kernel"].startswith("matmul") else "ms")
    assert row["lmlab"] > 0 and row["reference"] > 0 and row["ratio"] > 0
    # The benchmark compares the two results it timed: a fast but wrong kernel must show. bf16 rows
    # are compared with the fp32 product: bf16 operands (8 significant bits) cost ~2^-8 relative.
    assert row["max_rel_err"] < (1e-2 if row["kernel"].endswith("bf16") else 1e-4), row


def test_bench_kernels_tiny_rows():
    out = io.StringIO()
    rows = bench.bench_kernels(threads=1, shapes="tiny", repeat=1, out=out)
    assert {r["kernel"] for r in rows} == KERNELS
    for row in rows:
        check_row(row)
        assert row["threads"] == 1
    text = out.getvalue()
    assert "reference" in text.splitlines()[1]
    assert len(text.splitlines()) == 2 + len(rows)
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    assert any("scaled_dot_product_attention" in r["reference_name"] for r in rows)


def test_bench_kernels_json_lines():
    out = io.StringIO()
    rows = bench.bench_kernels(threads=1, json_lines=True, shapes="tiny", repeat=1, out=out)
    printed = [json.loads(line) for line in out.getvalue().splitlines()]
    assert printed == rows
    for row in printed:
        check_row(row)


def test_cli_arguments_round_trip(capsys):
    assert main(["bench", "kernels", "--json", "--threads", "1", "--repeat", "1", "--shapes",
                 "tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {json.loads(line)["kernel"] for line in lines} == KERNELS


@pytest.mark.parametrize("bad", [{"shapes": "huge"}, {"repeat": 0}])
def test_bench_kernels_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        bench.bench_kernels(threads=1, **{"shapes": "tiny", **bad})


def test_openblas_environment_warning(monkeypatch, capsys):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.delenv("OPENBLAS_L2_SIZE", raising=False)
    warning = bench.openblas_warning()
    assert "OPENBLAS_CORETYPE" in warning and "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE" in warning
    bench.bench_kernels(threads=1, shapes="tiny", repeat=1, out=io.StringIO())
    assert "depressed" in capsys.readouterr().err
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert bench.openblas_warning() is None


@pytest.mark.parametrize("argv, expected", [
    (["--config", "gpt2-small", "--block-size", "64"],
     dict(n_layer=12, n_head=12, n_embd=768, block_size=64, batch_size=4, vocab_size=50257)),
    (["--config", "gpt2-small"],
     dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=4, vocab_size=50257)),
    ([], dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65)),
])
def test_bench_train_named_configs_and_overrides(argv, expected, monkeypatch):
    """--config names a shape; a flag given overrides that one field (the run itself is stubbed:
    what is checked is the configuration bench_train receives)."""
    from lmlab import trainbench
    seen = {}

    def fake(n_layer, n_head, n_embd, block_size, batch_size, steps, vocab_size, **kw):
        seen.update(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                    batch_size=batch_size, vocab_size=vocab_size)
        return []
    monkeypatch.setattr(trainbench, "bench_train", fake)
    assert main(["bench", "train", *argv]) == 0
    assert seen == expected


def test_bench_train_measures_an_implementation_named_twice_once(monkeypatch):
    """--impl is repeatable: `--impl lmlab --impl lmlab` measured lmlab twice, two rows of the
    same implementation (and the speed ratio of the second against the first)."""
    from lmlab import trainbench
    seen = []

    def fake(*args, impls, **kw):
        seen.append(impls)
        return []
    monkeypatch.setattr(trainbench, "bench_train", fake)
    assert main(["bench", "train", "--impl", "lmlab", "--impl", "lmlab"]) == 0
    assert main(["bench", "train", "--impl", "pytorch", "--impl", "lmlab", "--impl", "pytorch"]) == 0
    assert main(["bench", "train"]) == 0
    assert seen == [("lmlab",), ("pytorch", "lmlab"), tuple(trainbench.IMPLS)]


@pytest.fixture
def torch_unimportable(tmp_path, monkeypatch):
    """A `torch` that is found but raises ImportError when imported (a broken install, or none)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
        monkeypatch.delitem(sys.modules, name)


def test_bench_kernels_says_the_torch_reference_is_skipped(torch_unimportable, capsys):
    """Without an importable torch its reference rows were left out without a word."""
    rows = bench.bench_kernels(threads=1, shapes="tiny", repeat=1, out=io.StringIO())
    assert not any("torch" in r["reference_name"] for r in rows)
    err = capsys.readouterr().err
    assert "torch cannot be imported (No module named torch)" in err and "skipped" in err


def test_bench_train_without_importable_torch(torch_unimportable, monkeypatch, capsys):
    """A torch that the package search found but that does not import was measured anyway: its
    child failed and the run ended in a traceback. --impl pytorch alone then measured nothing
    (an empty table, or "max() arg is an empty sequence" measuring MFU). Now: the only
    implementation asked for is refused in one line; beside lmlab it is skipped with a note."""
    from lmlab import trainbench
    ran = []

    def child(spec, threads, isa):
        ran.append(spec.get("impl"))
        return {"impl": spec["impl"], "precision": spec["precision"], "tokens_per_s": 1.0,
                "ms_per_step": 1.0, "peak_rss_mib": 1.0, "threads": 1, "isa": "avx2"}
    monkeypatch.setattr(trainbench, "_child", child)
    tiny = ["--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--block-size", "4",
            "--batch-size", "1", "--steps", "1", "--rounds", "1", "--precision", "fp32"]
    for more in ([], ["--no-mfu"]):
        assert main(["bench", "train", "--impl", "pytorch", *tiny, *more]) == 2
        err = capsys.readouterr().err
        assert err == ("lmlab bench train: error: --impl pytorch: torch cannot be imported (No "
                       "module named torch); install PyTorch, or measure --impl lmlab\n")
    assert main(["bench", "train", *tiny, "--no-mfu"]) == 0
    assert ran == ["lmlab"]
    assert "PyTorch skipped, torch cannot be imported" in capsys.readouterr().err
    with pytest.raises(ValueError, match="impl 'pytorch': torch cannot be imported"):
        trainbench.bench_train(1, 1, 8, 4, 1, 1, impls=("pytorch",), mfu=False, rounds=1)


def test_bench_train_child_failure_is_one_line():
    """A measurement that failed in its process ended `lmlab bench train` in a RuntimeError
    traceback with the child's; now one line: the child's last word and how to rerun it."""
    from lmlab import trainbench
    spec = {"impl": "lmlab", "cfg": {}, "steps": 1, "warmup": 0, "threads": 1,
            "precision": "fp32"}
    with pytest.raises(ValueError) as exc:
        trainbench._child(spec, 1, "native")
    text = str(exc.value)
    assert "\n" not in text
    assert text.startswith("the lmlab fp32 run failed (exit 1): KeyError: 'vocab_size'")
    assert "python -m lmlab.trainbench --child" in text


@pytest.mark.parametrize("script, argv, work, expected", [
    ("mpi_scaling", ["--steps", "4", "--skip", "4"], ["run"],
     "--skip 4: expected an integer from 0 to --steps - 1 (3), so that a step is left to measure"),
    ("mpi_scaling", ["--skip", "-1"], ["run"],
     "--skip -1: expected an integer from 0 to --steps - 1 (11), so that a step is left to measure"),
    ("mpi_scaling", ["--steps", "0"], ["run"], "--steps 0: expected an integer >= 1"),
    ("tokenize_stream", ["--mb", "0"], ["make_corpus", "measure"],
     "--mb 0: expected an integer >= 1 (MiB of corpus)"),
    ("tokenize_stream", ["--workers", "-1"], ["make_corpus", "measure"],
     "--workers -1: expected an integer >= 0 (0: lmlab's default)"),
    ("gpt2_finetune", ["--threads", "0"], ["timed"], "--threads 0: expected an integer >= 1"),
    ("gpt2_finetune", ["--steps", "-1"], ["timed"], "--steps -1: expected an integer >= 1"),
    ("stages_eval", ["--threads", "0"], ["is_run", "pretrain"],
     "--threads 0: expected an integer >= 1"),
    ("preference_eval", ["--threads", "-2"], ["make_judge", "pretrain"],
     "--threads -2: expected an integer >= 1"),
])
def test_benchmark_scripts_refuse_bad_values_before_any_work(script, argv, work, expected,
                                                             monkeypatch, capsys, tmp_path):
    """benchmarks/ scripts took any integer: mpi_scaling's --skip at or past --steps ran both
    pretrains and then failed in statistics.median (a traceback), --steps 0 in a
    CalledProcessError; --threads 0 was silently all cores; tokenize_stream's --mb 0 failed in
    its child. Each is now a usage error naming the flag, before any work starts."""
    module = load_script(script, monkeypatch)

    def started(*args, **kwargs):
        raise AssertionError(f"{script} started its work")
    for name in work:
        monkeypatch.setattr(module, name, started)
    monkeypatch.chdir(tmp_path)  # a script that writes its runs by default writes them here
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {expected}")


def test_bench_kernels_warns_when_numpy_cannot_follow_threads(monkeypatch, capsys):
    """Without threadpoolctl numpy's BLAS keeps the thread count it took at load, and rows that
    said threads 1 compared lmlab on one thread with numpy on every core, without a word."""
    from lmlab import ops
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import threadpoolctl: ImportError
    default = ops.get_num_threads()
    bench.bench_kernels(threads=default, shapes="tiny", repeat=1, out=io.StringIO())
    assert "threadpoolctl" not in capsys.readouterr().err
    other = 1 if default > 1 else 2
    bench.bench_kernels(threads=other, shapes="tiny", repeat=1, out=io.StringIO())
    err = capsys.readouterr().err
    assert (f"threadpoolctl is not installed, so numpy's BLAS keeps its own thread count "
            f"({default}), not {other}") in err


def test_bench_train_child_ended_by_ctrl_c_is_an_interruption(monkeypatch):
    """Ctrl-C reaches the whole process group; a child that ended of it before the parent's own
    KeyboardInterrupt was reported as a failed measurement ("the lmlab fp32 run failed (killed
    by signal 2): KeyboardInterrupt"), not as the interruption it was."""
    import subprocess

    from lmlab import trainbench

    def interrupted(command, **kwargs):
        return subprocess.CompletedProcess(command, -2, "", "Traceback ...\nKeyboardInterrupt\n")
    monkeypatch.setattr(trainbench.subprocess, "run", interrupted)
    spec = {"impl": "lmlab", "cfg": {}, "steps": 1, "warmup": 0, "threads": 1,
            "precision": "fp32"}
    with pytest.raises(KeyboardInterrupt):
        trainbench._child(spec, 1, "native")


GENERATE_TINY = ["bench", "generate", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
                 "--block-size", "32", "--new-tokens", "6", "--prompt-len", "4", "--threads", "1"]


def test_bench_generate_measures_transformers_on_the_same_model(capsys):
    """The reference row runs the same weights in transformers: its logits must be lmlab's (a
    reference computing another model would make the ratio meaningless)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    assert main(GENERATE_TINY + ["--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"lmlab-kv-cache", "lmlab-no-cache", "transformers-kv-cache"}
    ref = by_impl["transformers-kv-cache"]
    assert ref["max_logit_diff"] < 1e-4 and ref["threads"] == 1
    assert ref["reference"].startswith("transformers ")
    for impl in ("lmlab-kv-cache", "lmlab-no-cache"):
        row = by_impl[impl]
        assert row["same_tokens"] is True
        assert row["vs_reference"] == pytest.approx(row["tokens_per_s"] / ref["tokens_per_s"])
    assert main(GENERATE_TINY) == 0
    text = capsys.readouterr().out
    assert "x transformers" in text and "its logits within" in text


def test_bench_generate_in_bf16_measures_both_in_bf16(capsys):
    """--precision bf16: lmlab decodes with bf16 matmul operands, and the reference is transformers'
    model in bfloat16; both still compute the same model (their prompt logits agree to bf16's
    precision, where fp32 agrees to 1e-4 and another model would be off by whole units)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    assert main(GENERATE_TINY + ["--json", "--precision", "bf16"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["config"]["precision"] for r in rows] == ["bf16"] * 3
    ref = rows[2]
    assert ref["impl"] == "transformers-kv-cache" and 1e-6 < ref["max_logit_diff"] < 0.05
    assert all(r["same_tokens"] for r in rows[:2])
    assert main(GENERATE_TINY + ["--precision", "bf16"]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["bf16"] * 3


def test_bench_generate_without_transformers_says_there_is_no_reference(monkeypatch, capsys):
    from lmlab import trainbench
    monkeypatch.setattr(trainbench, "transformers_available", lambda: False)
    assert main(GENERATE_TINY) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["lmlab-kv-cache", "lmlab-no-cache"]
    assert lines[2] == "(no reference: it needs transformers and torch, and they do not both import here)"


def test_bench_generate_past_the_block_says_transformers_cannot_follow(capsys):
    """transformers' GPT-2 has block_size positions; lmlab slides its window past them."""
    pytest.importorskip("transformers")
    argv = GENERATE_TINY[:GENERATE_TINY.index("--new-tokens")] + ["--new-tokens", "40", "--prompt-len",
                                                                 "4", "--threads", "1"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "transformers" not in lines[0] + lines[1]
    assert lines[2] == ("(no reference: transformers' GPT-2 reads at most block_size (32) "
                        "positions, and --prompt-len + --new-tokens is 44; lmlab slides its window)")


def test_bench_kernels_runs_torch_on_the_bench_thread_count(monkeypatch):
    """The bf16 matmul reference ran on torch's own thread count (every core), not --threads, so
    its ratio set lmlab on N threads against torch on all; torch's count is restored after. Here
    torch and lmlab share one OpenMP runtime, which hides it: torch's pool is modelled as its own
    (another OpenMP runtime, or MKL's), as it is in other builds."""
    torch = pytest.importorskip("torch")
    from lmlab import ops

    torch_pool = {"threads": 3}  # not the bench's count
    monkeypatch.setattr(torch, "get_num_threads", lambda: torch_pool["threads"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: torch_pool.update(threads=n))
    seen = {"torch": set(), "lmlab": set()}

    def counted(fn, who, count):
        def call(*args, **kwargs):
            seen[who].add(count())
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(torch, "matmul", counted(torch.matmul, "torch", torch.get_num_threads))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        counted(sdpa, "torch", torch.get_num_threads))
    for name in ("matmul_forward", "matmul_backward", "softmax_forward", "attention_forward"):
        monkeypatch.setattr(ops, name, counted(getattr(ops, name), "lmlab", ops.get_num_threads))
    bench.bench_kernels(threads=1, shapes="tiny", repeat=1, out=io.StringIO())
    assert seen == {"torch": {1}, "lmlab": {1}}
    assert torch_pool["threads"] == 3


def test_bench_kernels_help_states_the_repeat_a_run_uses(capsys):
    """--help said "default 5" while --shapes tiny takes 2: the help names each shape set's."""
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    stated = re.search(r"--repeat REPEAT (.*?) --shapes \{", text).group(1)
    main(["bench", "kernels", "--threads", "1", "--shapes", "tiny"])
    used = re.search(r"best of (\d+)", capsys.readouterr().out).group(1)
    assert f"{used} for tiny" in stated
    for shapes, repeat in bench.DEFAULT_REPEAT.items():
        assert f"{repeat} for {shapes}" in stated


def test_bench_train_refuses_a_model_too_large_before_any_child(monkeypatch, capsys):
    """A model past lmlab's parameter limit was refused only inside each measurement's child, as
    "the lmlab fp32 run failed (exit 1): ValueError: ..."; it is the run's own error now."""
    from lmlab import trainbench

    def child(*args):
        raise AssertionError("a child was started")
    monkeypatch.setattr(trainbench, "_child", child)
    assert main(["bench", "train", "--impl", "lmlab", "--n-head", "1", "--n-embd", "65536"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab bench train: error: the config describes ") and err.count("\n") == 1
    assert "parameters" in err and "more than the 2,147,483,648 an lmlab GPT may have" in err
