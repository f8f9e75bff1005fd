"""Data-parallel training under mpiexec (lmlab.distributed): N ranks take the batches of one
process with --grad-accum N, bit for bit at N = 2; ZeRO-1 makes the same updates; runs resume
under another N; Ctrl-C, a killed rank and a rank that raises stop every rank with the last
checkpoint current; `lmlab doctor --mpi` refuses ranks that see different data.

Each test launches real processes with the mpiexec next to mpi4py (from `pip install
"lmlab[mpi]"`), over loopback, with one thread per rank and tiny models.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmlab import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120


def _mpiexec():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None, 'mpi4py is not installed (pip install "lmlab[mpi]")'
    # The launcher of the MPI mpi4py was built with: next to this Python first, then PATH.
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if found is None:
        return None, "no mpiexec on PATH (pip install mpich, or a system MPI)"
    return found, ""


MPIEXEC, WHY = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason=WHY)

TINY = ["--corpus", "builtin:shakespeare", "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
        "--block-size", "32", "--batch-size", "4", "--eval-every", "3", "--save-every", "3",
        "--no-progress", "--precision", "fp32", "--sample-after", "0"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # the lmlab these tests imported (the installed package in CI, python/ in a dev build)
    package_parent = str(Path(checkpoint.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH", "")]))
    for var in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK"):
        env.pop(var, None)
    return env


def _command(n: int, args) -> list:
    lmlab = [sys.executable, "-m", "lmlab", *map(str, args)]
    return lmlab if n == 1 else [MPIEXEC, "-n", str(n), *lmlab]


def lmlab_per_rank(argv: list) -> subprocess.CompletedProcess:
    """Two or more ranks of one MPI run, rank r running `lmlab argv[r]`: machines that each see
    their own arguments (and so their own files), as without a shared file system."""
    ranks = [arg for r, args in enumerate(argv) for arg in
             ([":"] if r else []) + ["-n", "1", sys.executable, "-m", "lmlab", *map(str, args)]]
    return subprocess.run([MPIEXEC, *ranks], env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=ROOT)


def lmlab(n: int, *args, check: bool = True) -> subprocess.CompletedProcess:
    """`lmlab ARGS` on one process, or under `mpiexec -n N`."""
    done = subprocess.run(_command(n, args), env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=ROOT)
    if check:
        assert done.returncode == 0, done.stderr[-2000:]
    return done


def _final(run: Path, name: str = "model.safetensors") -> bytes:
    return (checkpoint.current_checkpoint(run) / name).read_bytes()


TIMINGS = ("tokens_per_s", "allreduce_ms")


def _rows(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_run(a: Path, b: Path) -> None:
    """Bit for bit: weights, AdamW moments, and every logged loss and gradient norm."""
    assert _final(a) == _final(b)
    assert _final(a, "optimizer.safetensors") == _final(b, "optimizer.safetensors")
    rows_a, rows_b = _rows(a), _rows(b)
    assert len(rows_a) == len(rows_b)
    for x, y in zip(rows_a, rows_b):
        assert {k: v for k, v in x.items() if k not in TIMINGS} == \
               {k: v for k, v in y.items() if k not in TIMINGS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process with --grad-accum 2, 6 steps: what two ranks must reproduce."""
    run = tmp_path_factory.mktemp("ref") / "run"
    lmlab(1, "pretrain", "--run", run, *TINY, "--steps", 6, "--grad-accum", 2)
    return run


@needs_mpi
def test_pretrain_on_two_ranks_is_one_process_with_grad_accum_bit_for_bit(tmp_path, reference):
    run = tmp_path / "run"
    done = lmlab(2, "pretrain", "--run", run, *TINY, "--steps", 6)
    _same_run(run, reference)
    # Rank 0 alone reports and writes: one summary line, one row per logged step.
    assert done.stdout.count("finished: 6 steps") == 1
    assert [r["step"] for r in _rows(run)] == [3, 6]
    assert all(r["allreduce_ms"] > 0 for r in _rows(run))
    assert checkpoint.read_config(run)["train"]["world_size"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000006"]


@needs_mpi
def test_zero1_makes_the_same_updates_as_plain_data_parallel(tmp_path, reference):
    run = tmp_path / "run"
    lmlab(2, "pretrain", "--run", run, *TINY, "--steps", 6, "--zero", 1)
    # The moments are gathered from the two shards into the one checkpoint format.
    _same_run(run, reference)


@needs_mpi
def test_a_run_resumes_from_two_ranks_into_one_and_back(tmp_path, reference):
    run = tmp_path / "run"
    lmlab(2, "pretrain", "--run", run, *TINY, "--steps", 2)
    one = lmlab(1, "pretrain", "--run", run, "--resume", "--steps", 4, "--no-progress",
                "--sample-after", 0)
    assert "grad_accum 1 -> 2" in one.stderr
    lmlab(2, "pretrain", "--run", run, "--resume", "--steps", 6, "--no-progress", "--zero", 1,
          "--sample-after", 0)
    assert _final(run) == _final(reference)
    assert _final(run, "optimizer.safetensors") == _final(reference, "optimizer.safetensors")
    # A global batch of 2 micro-batches cannot be shared by 3 ranks: refused, nothing trained.
    refused = lmlab(3, "pretrain", "--run", run, "--resume", "--steps", 8, check=False)
    assert refused.returncode != 0 and "cannot share equally" in refused.stderr
    assert checkpoint.current_checkpoint(run).name == "step_000006"


@needs_mpi
def test_dpo_on_two_ranks_is_one_process_with_grad_accum(tmp_path, reference):
    rankings = tmp_path / "rankings.jsonl"
    with open(rankings, "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"Say {chr(97 + i)}: ", "completions": ["yes " * (i % 3 + 1), "no"],
                                "ranking": [0, 1]}) + "\n")
    common = ["dpo", reference, "--rankings", rankings, "--steps", 4, "--batch-size", 2,
              "--eval-every", 2, "--save-every", 2, "--no-progress", "--precision", "fp32"]
    lmlab(2, *common, "--out", tmp_path / "two")
    lmlab(1, *common, "--out", tmp_path / "one", "--grad-accum", 2)
    _same_run(tmp_path / "two", tmp_path / "one")
    assert "margin" in _rows(tmp_path / "two")[-1]


def _rank_pids(launcher: subprocess.Popen, run: Path) -> dict:
    """{rank: pid} of the lmlab processes training `run`."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run).encode() in cmd and b"lmlab" in cmd:
            for var in env:
                if var.startswith(b"PMI_RANK="):
                    pids[int(var[9:])] = int(entry.name)
    return pids


def _start_long_run(run: Path) -> subprocess.Popen:
    args = [*TINY, "--steps", 100000, "--save-every", 5, "--eval-every", 0]
    proc = subprocess.Popen(_command(2, ["pretrain", "--run", run, *args]), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until it has saved twice
        if (run / "current.json").exists() and checkpoint.current_checkpoint(run).name >= "step_000010":
            return proc
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the two-rank run did not reach its second checkpoint in 60 s")


def test_a_failed_exchange_is_described_as_a_lost_rank():
    from lmlab import distributed
    # mpi4py raises its own MPI.Exception when a collective cannot complete; a stand-in of that
    # class (same module), so MPI is not initialised inside the test process.
    mpi_error = type("Exception", (RuntimeError,), {"__module__": "mpi4py.MPI"})
    line = distributed.describe_failure(mpi_error("See the MPI_ERROR field in MPI_Status"))
    assert "See the MPI_ERROR field" in line and "another rank has most likely died" in line
    assert distributed.describe_failure(ValueError("bad value")) == "ValueError: bad value"
    assert distributed.describe_failure(KeyboardInterrupt()) == "KeyboardInterrupt"


def test_a_rank_stopping_on_an_lmlab_error_says_its_line_alone():
    """lmlab's own errors carry one line naming the file and the cause; a rank stopping on one
    printed its class name before it ("CheckpointError: ..."), which says nothing more."""
    from lmlab import distributed
    from lmlab.errors import CheckpointError
    line = "runs/x/state.json does not hold this stage's trainer state"
    assert distributed.describe_failure(CheckpointError(line)) == line


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks' pids in /proc")
@needs_mpi
def test_a_killed_rank_stops_the_others_and_leaves_a_resumable_run(tmp_path):
    run = tmp_path / "run"
    proc = _start_long_run(run)
    os.kill(_rank_pids(proc, run)[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=30)  # every rank ends within seconds
    assert proc.returncode != 0
    # Whoever notices first says so: the launcher names the death, or rank 0 its failed exchange.
    assert "signal 9" in out + err or "another rank has most likely died" in err, err
    assert not _rank_pids(proc, run)
    model, _, _ = checkpoint.load_model(run)  # the last checkpoint is whole
    step = json.loads((run / "current.json").read_text())["step"]
    lmlab(1, "pretrain", "--run", run, "--resume", "--steps", step + 2, "--no-progress",
          "--sample-after", 0)
    assert json.loads((run / "current.json").read_text())["step"] == step + 2


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks' pids in /proc")
@needs_mpi
def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    run = tmp_path / "run"
    proc = _start_long_run(run)
    os.kill(_rank_pids(proc, run)[1], signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped early (Ctrl-C / SIGTERM)" in out
    step = json.loads((run / "current.json").read_text())["step"]
    assert f"stopped early (Ctrl-C / SIGTERM): {step} steps" in out  # saved at the step every rank ended


@needs_mpi
def test_a_rank_that_raises_ends_every_rank_with_its_message(tmp_path):
    script = tmp_path / "faulty.py"
    script.write_text(
        "import sys\n"
        "from lmlab import distributed\n"
        "from lmlab.pretrain import pretrain, LanguageModelingStage\n"
        "step = LanguageModelingStage.train_step\n"
        "calls = []\n"
        "def faulty(self, model):\n"
        "    calls.append(1)\n"
        "    if distributed.world().rank == 1 and len(calls) == 7:\n"
        "        raise RuntimeError('disk on fire')\n"
        "    return step(self, model)\n"
        "LanguageModelingStage.train_step = faulty\n"
        f"pretrain('builtin:shakespeare', {str(tmp_path / 'run')!r}, n_layer=1, n_head=2, "
        "n_embd=16, block_size=16, batch_size=2, steps=100, save_every=3, eval_every=0, "
        "progress=False, precision='fp32')\n")
    started = time.monotonic()
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script)], env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode != 0
    assert "rank 1 of 2: RuntimeError: disk on fire; stopping every rank" in done.stderr
    assert time.monotonic() - started < 60
    # Rank 1 raised in step 7; rank 0 saved step 6 just before, or was ended during that save,
    # which leaves step 3 current (a checkpoint becomes current in one atomic step).
    assert json.loads((tmp_path / "run" / "current.json").read_text())["step"] in (3, 6)
    checkpoint.load_model(tmp_path / "run")


@needs_mpi
def test_a_bad_setting_every_rank_refuses_is_said_once(tmp_path):
    """Every rank checks the settings and refuses a bad one; rank 0 says so and its abort ends the
    others before they repeat it (they printed the same line once per rank, then again after
    MPI_Abort returned)."""
    done = lmlab(2, "pretrain", "--corpus", "builtin:shakespeare", "--run", tmp_path / "run",
                 "--steps", "5", "--lr", "-1", check=False)
    assert done.returncode == 2
    assert done.stderr.count("--lr -1.0 is not allowed") == 1, done.stderr
    assert "lmlab: rank 0 of 2: lmlab pretrain: error: --lr -1.0 is not allowed" in done.stderr


@needs_mpi
def test_doctor_checks_that_every_rank_sees_the_same_corpus(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the same text\n")
    b.write_text("other text\n")
    ok = lmlab(2, "doctor", "--mpi", "--corpus", a)
    assert "ok: all 2 rank(s)" in ok.stdout and ok.stdout.count("rank ") == 2
    py = [sys.executable, "-m", "lmlab", "doctor", "--mpi", "--corpus"]
    differ = subprocess.run([MPIEXEC, "-n", "1", *py, str(a), ":", "-n", "1", *py, str(b)],
                            env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert differ.returncode != 0
    assert "do not see the same installation: corpus differs" in differ.stderr


def _without_mpi4py(code: str, **env) -> subprocess.CompletedProcess:
    blocker = "import sys; sys.modules['mpi4py'] = None\n"
    return subprocess.run([sys.executable, "-c", blocker + code], env={**_env(), **env},
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)


def test_more_than_one_process_without_mpi4py_says_how_to_install_it():
    main = "from lmlab.cli import main; sys.exit(main(sys.argv[1:]))"
    launched = _without_mpi4py(main.replace("sys.argv[1:]", "['doctor']"), PMI_SIZE="2",
                               PMI_RANK="0")
    assert launched.returncode == 2
    assert 'lmlab doctor: error: 2 processes need mpi4py' in launched.stderr
    assert 'pip install "lmlab[mpi]"' in launched.stderr
    asked = _without_mpi4py(main.replace("sys.argv[1:]", "['doctor', '--mpi']"))
    assert asked.returncode == 2 and 'pip install "lmlab[mpi]"' in asked.stderr


def test_a_plain_run_never_imports_mpi4py(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c",
         "import sys\nfrom lmlab.cli import main\n"
         f"rc = main(['pretrain', '--run', {str(tmp_path / 'run')!r}, '--steps', '2', "
         "'--n-layer', '1', '--n-embd', '16', '--n-head', '2', '--block-size', '16', "
         "'--no-progress', '--sample-after', '0'])\n"
         "assert rc == 0 and 'mpi4py' not in sys.modules, sorted(sys.modules)\n"],
        env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]


@needs_mpi
def test_three_ranks_equal_one_process_and_two_by_two_match_within_float_rounding(tmp_path):
    # One micro-batch per rank: the rank-order sum is the sum grad accumulation makes, bit for bit.
    lmlab(3, "pretrain", "--run", tmp_path / "three", *TINY, "--steps", 3)
    lmlab(1, "pretrain", "--run", tmp_path / "one3", *TINY, "--steps", 3, "--grad-accum", 3)
    _same_run(tmp_path / "three", tmp_path / "one3")
    # Two ranks of two micro-batches add (g0 + g1) + (g2 + g3), one process ((g0 + g1) + g2) + g3:
    # the same to float32 rounding of a four-way sum.
    lmlab(2, "pretrain", "--run", tmp_path / "two", *TINY, "--steps", 3, "--grad-accum", 2)
    lmlab(1, "pretrain", "--run", tmp_path / "one4", *TINY, "--steps", 3, "--grad-accum", 4)
    a = checkpoint.load_model(tmp_path / "two")[0].params
    b = checkpoint.load_model(tmp_path / "one4")[0].params
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    losses = [[r["loss"] for r in _rows(tmp_path / run)] for run in ("two", "one4")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    # And the same N again is bit for bit the same run.
    lmlab(2, "pretrain", "--run", tmp_path / "again", *TINY, "--steps", 3, "--grad-accum", 2)
    _same_run(tmp_path / "two", tmp_path / "again")


def test_shards_cover_the_buffer_once_on_aligned_boundaries():
    # Aligned to the norm kernel's chunks, so the ranks' chunk sums are the whole buffer's.
    from lmlab.distributed import shard_bounds
    from lmlab.ops import SUM_SQUARES_CHUNK
    for n in (1, 15, 16, 17, 1000, 4095, 4097, 809_856):
        for size in (1, 2, 3, 7, 64):
            bounds = shard_bounds(n, size)
            assert len(bounds) == size and bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a <= b for a, b in bounds)
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(size - 1))
            assert all(a % SUM_SQUARES_CHUNK == 0 for a, _ in bounds if a < n)


def test_the_norm_of_shards_is_the_norm_of_the_whole_buffer_bit_for_bit():
    """ZeRO-1 clips (and logs) with the norm of a gradient no rank holds whole: the ranks' chunk
    sums, added in order, must give ops.global_norm of the whole buffer exactly, whatever N."""
    from lmlab import ops
    from lmlab.distributed import World, shard_bounds

    class Ranks(World):  # rank 0 of `size`, handed every rank's chunk sums by allgather
        distributed = True

        def __init__(self, size, shard_parts):
            super().__init__()
            self.size, self.shard_parts = size, shard_parts

        def allgather(self, obj):
            assert obj == self.shard_parts[0]
            return self.shard_parts

    rng = np.random.default_rng(0)
    for n in (1, 4095, 4097, 15_234, 809_856):
        g = (rng.standard_normal(n) * np.exp(rng.uniform(-12, 0, n))).astype(np.float32)
        for size in (1, 2, 3, 7):
            bounds = shard_bounds(n, size)
            ranks = Ranks(size, [ops.sum_squares_parts(g[a:b]) for a, b in bounds])
            assert ranks.global_norm(g[:bounds[0][1]]) == ops.global_norm(g), (n, size)


@needs_mpi
@pytest.mark.parametrize("ranks, shape", [(2, []), (3, ["--n-embd", 8, "--block-size", 8])])
def test_zero1_logs_the_gradient_norm_of_plain_data_parallel_at_every_step(tmp_path, ranks, shape):
    """The norm of every step, not only of the logged ones (TINY's first step differed in its last
    bit when each rank summed its own shard); and a model smaller than one shard, which rank 0
    holds whole while the other ranks' shards are empty."""
    args = [*TINY, "--steps", 6, "--log-every", 1, *shape]
    lmlab(ranks, "pretrain", "--run", tmp_path / "plain", *args)
    lmlab(ranks, "pretrain", "--run", tmp_path / "zero", *args, "--zero", 1)
    _same_run(tmp_path / "zero", tmp_path / "plain")
    assert len(_rows(tmp_path / "plain")) == 6


def test_launched_size_reads_the_launchers_variables(monkeypatch):
    from lmlab.distributed import launched_size
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_RANK",
                "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert launched_size() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launched_size() == 4


_STREAMING_DRIVER = """
import json, os, sys, time
from lmlab import distributed, token_shards
token_shards.STREAM_ABOVE_BYTES = 0  # every file corpus streams
real = token_shards.stream_tokens
def logged(*args, **kwargs):
    # The rank as lmlab reads it from the launcher (MPICH, Open MPI, PMIx or MVAPICH names it).
    rank = next((os.environ[v] for v in distributed._RANK_VARS if v in os.environ), "0")
    with open(sys.argv[1], "a") as f:
        f.write(json.dumps([rank, "start", time.time()]) + "\\n")
    out = real(*args, **kwargs)
    with open(sys.argv[1], "a") as f:
        f.write(json.dumps([rank, "end", time.time()]) + "\\n")
    return out
token_shards.stream_tokens = logged
from lmlab.cli import main
sys.exit(main(sys.argv[2:]))
"""


@needs_mpi
@pytest.mark.parametrize("verb", ["pretrain", "finetune"])
def test_rank_0_streams_a_large_corpus_before_the_others_read_its_shards(tmp_path, verb):
    """Under MPI rank 0 tokenizes a corpus too large for memory into the cache first; the other
    ranks start only once it is done (and then find its shards), in pretrain and finetune."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((ROOT / "python" / "lmlab" / "corpora" / "shakespeare.txt")
                      .read_text()[:50_000])
    small = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
             "--batch-size", "2", "--steps", "1", "--eval-every", "0", "--no-progress"]
    env = dict(_env(), LMLAB_CACHE=str(tmp_path / "cache"))
    if verb == "pretrain":
        args = ["pretrain", "--corpus", corpus, "--run", tmp_path / "run", *small]
    else:
        lmlab(1, "pretrain", "--run", tmp_path / "base", *TINY, "--steps", 1)
        args = ["finetune", tmp_path / "base", "--out", tmp_path / "run", "--corpus", corpus,
                "--steps", "1", "--eval-every", "0", "--no-progress", "--sample-tokens", "0"]
    log = tmp_path / "log.jsonl"
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", _STREAMING_DRIVER, log,
                           *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    times = {(rank, what): t for rank, what, t in map(json.loads, log.read_text().splitlines())}
    assert times[("1", "start")] >= times[("0", "end")], times


@needs_mpi
def test_a_run_an_interrupted_overwrite_set_aside_resumes_on_two_ranks(tmp_path):
    """Rank 0 puts back the run an --overwrite killed before its first checkpoint was replacing;
    the other ranks looked for the run before it was back, and refused: no run to resume."""
    from lmlab.rundir import REPLACED_DIR
    run = tmp_path / "run"
    lmlab(2, "pretrain", "--run", run, *TINY, "--steps", 3)
    # An overwrite killed before its first checkpoint (a process that ends without closing it).
    code = ("import os, sys; from lmlab.rundir import open_run_dir; "
            "held = open_run_dir(sys.argv[1], overwrite=True); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(run)], env=_env(), check=True, timeout=TIMEOUT)
    assert (run / REPLACED_DIR).is_dir() and not (run / "current.json").exists()
    done = lmlab(2, "pretrain", "--run", run, "--resume", "--steps", 6, "--no-progress",
                 "--sample-after", 0)
    assert "put back the run" in done.stderr
    assert checkpoint.current_checkpoint(run).name == "step_000006"


@needs_mpi
@pytest.mark.parametrize("bad", [["-env", "OMP_NUM_THREADS", "100000"],
                                 ["-env", "LMLAB_ISA", "no-such-isa"], ["--steps", "x"]])
def test_a_rank_alone_refusing_before_it_joins_ends_every_rank(tmp_path, bad):
    """A machine with a bad OMP_NUM_THREADS or LMLAB_ISA, or a rank given a bad argument, stopped
    before joining MPI: the other ranks waited for it in MPI_Init, forever. It now joins them and
    ends every rank with its one line."""
    run = ["-m", "lmlab", "pretrain", "--run", str(tmp_path / "run"), *TINY, "--steps", "2"]
    env, args = (bad, []) if bad[0] == "-env" else ([], bad)
    done = subprocess.run([MPIEXEC, "-n", "1", sys.executable, *run, ":", "-n", "1", *env,
                           sys.executable, *run, *args], env=_env(), capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("lmlab: rank 1 of 2: lmlab") == 1, done.stderr
    assert done.stderr.count("error:") == 1, done.stderr
    assert not (tmp_path / "run").exists()


@needs_mpi
def test_a_usage_error_every_rank_meets_is_said_once():
    done = lmlab(2, "pretrain", "--steps", "x", check=False)
    assert done.returncode == 2
    assert done.stderr.count("error:") == 1, done.stderr
    assert ("rank 0 of 2: lmlab pretrain: error: argument --steps: invalid int value: 'x'"
            in done.stderr)
    version = lmlab(2, "--version")
    assert version.stdout.count("lmlab") == 1


@needs_mpi
def test_a_verb_that_is_one_process_refuses_mpiexec_once(tmp_path, reference):
    """`lmlab rank` under mpiexec -n 2 ran twice and appended every judgement twice (doubling its
    weight in reward and dpo); sample, export and the other one-process verbs did all their work
    once per rank. They refuse, in one line."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / "rankings.jsonl"
    prompts.write_text("Say a: \nSay b: \n")
    done = lmlab(2, "rank", reference, "--prompts", prompts, "--out", out, "--judge", "shorter",
                 "-k", 2, "--max-new-tokens", 3, check=False)
    assert done.returncode == 2 and not out.exists()
    assert done.stderr.count("error:") == 1, done.stderr
    assert "lmlab rank: error: it runs as one process, and mpiexec started 2" in done.stderr
    export = lmlab(2, "export", reference, tmp_path / "hf", "--to", "hf", check=False)
    assert export.returncode == 2 and not (tmp_path / "hf").exists()


@needs_mpi
def test_a_diverged_run_is_said_once(tmp_path):
    """Every rank sees the same non-finite gradient norm and stops at the same step; each printed
    the same message."""
    script = tmp_path / "diverge.py"
    script.write_text("import sys\nfrom lmlab import ops\n"
                      "ops.global_norm = lambda g: float('nan')\n"
                      "from lmlab.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script), "pretrain", "--run",
                           str(tmp_path / "run"), *TINY, "--steps", "3"], env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert done.returncode == 1
    assert done.stderr.count("gradient norm nan") == 1, done.stderr


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks' pids in /proc")
@needs_mpi
def test_ctrl_c_on_every_rank_is_announced_once_and_the_run_resumes(tmp_path):
    """Ctrl-C in the terminal reaches every rank (mpiexec passes it on); each rank said it would
    stop after this step."""
    run = tmp_path / "run"
    proc = _start_long_run(run)
    for pid in _rank_pids(proc, run).values():
        os.kill(pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # (rank 0, the one that saves, may be saving when it comes, and says so instead)
    assert err.count("stopping after this step") + err.count("the run stops when it is") == 1, err
    step = json.loads((run / "current.json").read_text())["step"]
    assert f"stopped early (Ctrl-C / SIGTERM): {step} steps" in out
    lmlab(2, "pretrain", "--run", run, "--resume", "--steps", step + 2, "--no-progress",
          "--sample-after", 0)
    assert json.loads((run / "current.json").read_text())["step"] == step + 2


@needs_mpi
def test_reward_writes_nothing_when_a_rank_cannot_read_the_rankings(tmp_path, reference):
    """Rank 0 fitted and saved the reward model (saying so) while rank 1, missing the file, ended
    the run with an error."""
    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text("".join(json.dumps({"prompt": f"Say {c}: ", "completions": ["yes", "no"],
                                            "ranking": [0, 1]}) + "\n" for c in "abcdef"))
    reward = [sys.executable, "-m", "lmlab", "reward", str(reference), "--out",
              str(tmp_path / "rm"), "--steps", "5", "--rankings"]
    done = subprocess.run([MPIEXEC, "-n", "1", *reward, str(rankings), ":", "-n", "1", *reward,
                           str(tmp_path / "missing.jsonl")], env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=ROOT)
    assert done.returncode == 2
    assert "rank 1 of 2: lmlab reward: error: JSONL file" in done.stderr
    assert "saved in" not in done.stdout and not (tmp_path / "rm").exists()


@needs_mpi
def test_a_note_on_the_data_every_rank_reads_is_said_once(tmp_path, reference):
    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text("".join(json.dumps({"prompt": f"Say {c}: ", "completions": ["yes", "no"],
                                            "ranking": [0, 1]}) + "\n" for c in "abcdef")
                        + '{"prompt": "an append cut sh')
    done = lmlab(2, "dpo", reference, "--rankings", rankings, "--out", tmp_path / "dpo", "--steps",
                 1, "--batch-size", 2, "--eval-every", 0, "--no-progress")
    assert done.stderr.count("is cut short") == 1, done.stderr


@needs_mpi
def test_an_exception_nothing_catches_on_one_rank_ends_every_rank(tmp_path):
    """Through the Python API, a corpus missing on one machine raised on its rank alone, which
    exited with the traceback while the others waited for it in a collective, forever."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((ROOT / "python" / "lmlab" / "corpora" / "shakespeare.txt")
                      .read_text()[:20_000])
    script = tmp_path / "api.py"
    script.write_text(
        "import os, sys\nimport lmlab\nfrom lmlab import distributed\n"
        "corpus = sys.argv[1] if distributed.launched_rank() == 0 else sys.argv[1] + '.missing'\n"
        f"lmlab.pretrain(corpus, {str(tmp_path / 'run')!r}, n_layer=1, n_head=2, n_embd=16, "
        "block_size=16, batch_size=2, steps=2, progress=False)\n")
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(script), str(corpus)],
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "lmlab: rank 1 of 2: FileNotFoundError: corpus" in done.stderr, done.stderr


@needs_mpi
def test_reward_under_two_ranks_records_the_one_process_that_fitted_it(tmp_path, reference):
    """Rank 0 alone fits the reward head; config.json said world_size 2, as if both ranks had."""
    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text("".join(json.dumps({"prompt": f"Say {c}: ", "completions": ["yes", "no"],
                                            "ranking": [0, 1]}) + "\n" for c in "abcdef"))
    lmlab(2, "reward", reference, "--rankings", rankings, "--out", tmp_path / "rm", "--steps", 5)
    assert checkpoint.read_config(tmp_path / "rm")["train"]["world_size"] == 1


@needs_mpi
def test_a_run_on_another_machines_disk_does_not_stop_a_new_run(tmp_path, reference):
    """Rank 0 alone writes a new run, so what its machine holds at the output decides. Without a
    shared file system a stale run at the same path on another machine made that rank refuse
    ("already holds a run") and stopped the whole run."""
    shutil.copytree(reference, tmp_path / "stale")  # machine 2's leftover at the output path
    args = ["pretrain", *TINY, "--steps", 3]
    argv = [[*args, "--run", tmp_path / "new"], [*args, "--run", tmp_path / "stale"]]
    done = lmlab_per_rank(argv)
    assert done.returncode == 0, done.stderr[-2000:]
    assert checkpoint.load_training_state(tmp_path / "new")[1]["step"] == 3


@needs_mpi
def test_a_machine_without_the_reward_model_is_named(tmp_path, reference):
    """rlhf reads the reward model on every rank: a machine lacking it was reported by that rank
    alone, as "not found", rather than as what must be the same on every machine."""
    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text("".join(json.dumps({"prompt": f"Say {c}: ", "completions": ["yes", "no"],
                                            "ranking": [0, 1]}) + "\n" for c in "abcdef"))
    lmlab(1, "reward", reference, "--rankings", rankings, "--out", tmp_path / "rm", "--steps", 5)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say a: \nSay b: \n")
    common = [reference, "--prompts", prompts, "--out", tmp_path / "rl", "--steps", 1]
    argv = [["rlhf", *common, "--reward-model", tmp_path / "rm"],
            ["rlhf", *common, "--reward-model", tmp_path / "none"]]
    done = lmlab_per_rank(argv)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "rank 0 of 2" in line]
    assert len(lines) == 1, done.stderr
    assert ("lmlab rlhf: error: the ranks of this MPI run do not see the same run: reward model "
            "differs (rank 0: a run, rank 1: no run); the reward model ") in lines[0], lines[0]
    assert "must be the same on every machine" in lines[0] and "Error" not in done.stderr


def _edit_config(run: Path, **settings) -> None:
    path = checkpoint.current_checkpoint(run) / "config.json"
    config = json.loads(path.read_text())
    config["train"]["settings"].update(settings)
    path.write_text(json.dumps(config))


@needs_mpi
@pytest.mark.parametrize("differs", ["parent run", "run config", "parent missing", "run missing"])
def test_ranks_that_see_another_run_directory_are_told_it_must_be_the_same(tmp_path, reference,
                                                                          differs):
    """Each machine holds its own copy of a run (a parent, or the run to resume): where rank 1's
    differs, the run stops in one line naming what differs and which directory must be the same
    on every machine. It said `ValueError: ... every machine needs the same lmlab build and the
    same data`; and a config.json whose lr differed went unnoticed, each rank stepping with its
    own lr, so the ranks' weights drifted apart. A machine lacking the run (or its parent) was
    reported by its rank as `there is no run to resume` (or `not found`), while rank 0 had it."""
    if differs == "parent missing":
        common = ["--out", tmp_path / "ft", "--corpus", "builtin:shakespeare", "--steps", 2]
        argv = [["finetune", reference, *common], ["finetune", tmp_path / "none", *common]]
        expected = ("the ranks of this MPI run do not see the same run: parent run differs (rank 0: "
                    "a run, rank 1: no run); the parent run ", " must be the same on every machine")
    elif differs == "run missing":
        shutil.copytree(reference, tmp_path / "a")
        resume = ["--resume", "--steps", 7, "--no-progress", "--sample-after", 0]
        argv = [["pretrain", "--run", tmp_path / "a", *resume],
                ["pretrain", "--run", tmp_path / "none", *resume]]
        expected = ("the ranks of this MPI run do not see the same run: run directory differs "
                    "(rank 0: a run, rank 1: no run); the run directory ", " must be the same on "
                    "every machine")
    elif differs == "parent run":
        other = tmp_path / "other"
        lmlab(1, "pretrain", "--run", other, *TINY, "--steps", 1)
        common = ["--out", tmp_path / "ft", "--corpus", "builtin:shakespeare", "--steps", 2,
                  "--no-progress", "--sample-tokens", 0, "--eval-every", 0]
        argv = [["finetune", reference, *common], ["finetune", other, *common]]
        expected = ("the ranks of this MPI run do not see the same run: parameters differs "
                    f"(rank 0: ", f"); the parent run {reference} must be the same on every "
                    "machine; stopping every rank")
    else:
        shutil.copytree(reference, tmp_path / "a")
        shutil.copytree(reference, tmp_path / "b")
        _edit_config(tmp_path / "b", lr=0.002)
        resume = ["--resume", "--steps", 7, "--no-progress", "--sample-after", 0]
        argv = [["pretrain", "--run", tmp_path / "a", *resume],
                ["pretrain", "--run", tmp_path / "b", *resume]]
        expected = ("the ranks of this MPI run do not see the same run: setting lr differs "
                    "(rank 0: 0.001, rank 1: 0.002); the run directory ", " (its config.json) "
                    "must be the same on every machine; stopping every rank")
    done = lmlab_per_rank(argv)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if "rank 0 of 2" in line]
    assert len(lines) == 1 and all(part in lines[0] for part in expected), done.stderr
    # said as the command line says any error
    assert f"rank 0 of 2: lmlab {argv[0][0]}: error: the ranks" in lines[0], lines[0]
    assert "Error" not in done.stderr, done.stderr
