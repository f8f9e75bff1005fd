"""Fault injection: what a user's machine does to a training run, and what the run looks like after.

A tiny pretraining run with a checkpoint every 3 of its 12 steps is run uninterrupted once (the
reference). Then the same command runs in a child process that is hurt at a chosen filesystem
event (each fsync, rename and replace the run makes is one event, counted by DRIVER): SIGKILL,
Ctrl-C twice or three times, a file-size limit (RLIMIT_FSIZE, EFBIG), a full filesystem (a small
tmpfs, ENOSPC), a read-only mount (EROFS), a directory it may not write (EACCES), a second process
on the same run. After each: `lmlab sample` loads the run, `lmlab pretrain --resume` continues it,
and the resumed run ends bit for bit equal to the reference (weights, optimiser state, trainer
state, metrics, the checkpoints kept). Every damaged file a user could end up with is refused by
the command line with exit code 2 and one line naming the file.

The mount-based faults need root with CAP_SYS_ADMIN and skip elsewhere; as root, EACCES needs the
DAC-override capability dropped (util-linux setpriv), since root writes through any mode bits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from lmlab import checkpoint, metrics
from lmlab.cli import main

from flat_run import flatten

# The event tracer names files through /proc/self/fd, and the faults are Linux's (RLIMIT_FSIZE
# semantics, tmpfs, bind mounts, setpriv).
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fault injection uses Linux interfaces")

TEXT = ("the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs.\n"
        "how vexingly quick daft zebras jump! sphinx of black quartz, judge my vow.\n") * 40
SHAPE = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
         "--batch-size", "4"]
SCHEDULE = ["--steps", "12", "--save-every", "3", "--eval-every", "6", "--log-every", "2",
            "--warmup-steps", "2", "--no-progress", "--threads", "1", "--precision", "fp32"]
SAVES = (3, 6, 9, 12)

# Runs `lmlab` with os.fsync, os.rename and os.replace counted; at the events named in
# $LMLAB_FAULTS ({"event number": [actions]}) it acts before the call: "kill" (SIGKILL), "sigint",
# "sigterm", "fsize:N" (RLIMIT_FSIZE = N bytes from then on), "pause" (print "paused", wait for
# stdin to close).
DRIVER = r"""
import json, os, resource, signal, sys
plan = json.loads(os.environ.get("LMLAB_FAULTS", "{}"))
count = [0]

def act(action):
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action in ("sigint", "sigterm"):
        os.kill(os.getpid(), signal.SIGINT if action == "sigint" else signal.SIGTERM)
    elif action.startswith("fsize:"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(action[6:]), resource.RLIM_INFINITY))
    elif action == "pause":
        print("paused", flush=True)
        sys.stdin.read()

def counted(real):
    def call(*args, **kwargs):
        count[0] += 1
        for action in plan.get(str(count[0]), []):
            act(action)
        return real(*args, **kwargs)
    return call

for name in ("fsync", "rename", "replace"):
    setattr(os, name, counted(getattr(os, name)))
from lmlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclasses.dataclass
class World:
    root: object
    corpus: str
    env: dict
    reference: dict
    events: list      # (op, path) of each event of the reference run, in order

    def args(self, run, *extra):
        return ["pretrain", "--corpus", self.corpus, "--run", str(run), *SHAPE, *SCHEDULE, *extra]

    def event(self, op, contains, nth=0):
        """The 1-based number of the nth event `op` on a path containing `contains`."""
        hits = [i + 1 for i, (o, p) in enumerate(self.events) if o == op and contains in p]
        return hits[nth]

    def save_events(self, step):
        """The event numbers of the save of `step`: its files, renames and current.json."""
        first = self.event("fsync", f".tmp-step_{step:06d}")
        last = self.event("replace", "current.json", SAVES.index(step))
        return list(range(first, last + 2))  # + the fsync of the run directory after the replace


def _outcome(run) -> dict:
    """Everything a resumed run must reproduce bit for bit."""
    model, _, config = checkpoint.load_model(run)
    optimizer, state = checkpoint.load_training_state(run)
    rows = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics.read_metrics(run)]
    return {"params": model.params.tobytes(), "m": optimizer["m"].tobytes(),
            "v": optimizer["v"].tobytes(), "state": state, "metrics": rows, "train": config["train"],
            "checkpoints": [s for s, _ in checkpoint.list_checkpoints(run)],
            "checkpoint dirs": len(os.listdir(run / "checkpoints")),  # no leftovers of a save
            "files": sorted(n for n in os.listdir(run) if n not in (".lock", "loss.png"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    env = {**os.environ, "LMLAB_CACHE": str(root / "cache"),
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    events = []

    def traced(op, real):
        def call(*args, **kwargs):
            target = args[0]
            if isinstance(target, int):
                try:
                    target = os.readlink(f"/proc/self/fd/{target}")
                except OSError:
                    target = "?"
            events.append((op, os.fspath(args[-1] if op != "fsync" else target)))
            return real(*args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_CACHE", env["LMLAB_CACHE"])
        w = World(root, str(corpus), env, {}, [])
        assert main(w.args(root / "warm")) == 0  # fills the token cache, as the children find it
        for op in ("fsync", "rename", "replace"):
            mp.setattr(os, op, traced(op, getattr(os, op)))
        assert main(w.args(root / "reference")) == 0
    w.reference, w.events = _outcome(root / "reference"), events
    assert w.reference["checkpoints"] == list(SAVES) and w.reference["state"]["step"] == 12
    return w


@pytest.fixture(autouse=True)
def _cache(world, monkeypatch):
    monkeypatch.setenv("LMLAB_CACHE", world.env["LMLAB_CACHE"])


def _child(world, run, plan=None, *extra, wrap=(), **popen):
    env = {**world.env, "LMLAB_FAULTS": json.dumps({str(k): v for k, v in (plan or {}).items()})}
    return subprocess.Popen([*wrap, sys.executable, "-c", DRIVER, *world.args(run, *extra)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _run_child(world, run, plan=None, *extra, wrap=()):
    proc = _child(world, run, plan, *extra, wrap=wrap)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _cli(capsys, *argv):
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_recovers(world, run, capsys, extra_checkpoints=()):
    """`sample` loads the run and `--resume` ends it bit for bit equal to the reference (with the
    checkpoints the interrupted run saved besides the reference's)."""
    rc, out, err = _cli(capsys, "sample", str(run), "--max-new-tokens", "5", "--seed", "0")
    assert rc == 0 and out.strip(), err
    rc, _, err = _cli(capsys, *world.args(run, "--resume"))
    assert rc == 0, err
    assert "Traceback" not in err
    expected = dict(world.reference)
    expected["checkpoints"] = sorted(expected["checkpoints"] + list(extra_checkpoints))
    expected["checkpoint dirs"] += len(extra_checkpoints)
    assert _outcome(run) == expected


# -- SIGKILL ----------------------------------------------------------------------------------------


def _kill_points(world):
    """Every event of the save at step 6 (between each file, before and after the rename, before
    and after current.json), the final save's rename and pointer, and the loss plot."""
    final = world.save_events(12)
    return (world.save_events(6)
            + [world.event("rename", "step_000012"), final[-2], world.event("replace", "loss.png")])


def test_sigkill_at_every_step_of_a_save_leaves_a_run_that_resumes_bit_for_bit(world, tmp_path, capsys):
    points = _kill_points(world)
    assert len(points) >= 14, points  # a save: 6 file fsyncs, 2 renames, 3 directory fsyncs
    for n in points:
        run = tmp_path / f"kill{n}"
        rc, _, err = _run_child(world, run, {n: ["kill"]})
        assert rc == -signal.SIGKILL, (n, err)
        _assert_recovers(world, run, capsys)


def test_sigkill_before_the_first_checkpoint_is_refused_clearly(world, tmp_path, capsys):
    run = tmp_path / "run"
    first = world.event("fsync", "metrics.jsonl")
    assert first < world.event("fsync", ".tmp-step_000003")
    rc, _, _ = _run_child(world, run, {first: ["kill"]})
    assert rc == -signal.SIGKILL and (run / "metrics.jsonl").exists()
    rc, _, err = _cli(capsys, "sample", str(run))
    assert rc == 2 and f"{run} holds no checkpoint" in err and err.count("\n") == 1
    rc, _, err = _cli(capsys, *world.args(run, "--resume"))
    assert rc == 2 and err.count("\n") == 1
    assert "no run to resume" in err and str(run) in err
    rc, _, err = _cli(capsys, *world.args(run))
    assert rc == 2 and "files of an earlier run that saved no checkpoint (metrics.jsonl)" in err
    assert "--overwrite" in err and "--resume" not in err


def _files(run) -> dict:
    return {p.relative_to(run).as_posix(): p.read_bytes()
            for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_sigkill_during_an_overwrite_keeps_the_old_run_until_the_new_one_saves(world, partial,
                                                                             tmp_path, capsys):
    """--overwrite of a run (at step 6) killed at each event before the new run's first
    checkpoint leaves the old run: `sample` reads it, and `--resume` puts it back as it was and
    continues it. Killed after that checkpoint, the new run (at step 3) is the run. Either way the
    resumed run ends bit for bit as the reference."""
    old = _files(partial)
    traced = tmp_path / "traced"
    shutil.copytree(partial, traced, symlinks=True)
    events = []
    with pytest.MonkeyPatch.context() as mp:
        for op in ("fsync", "rename", "replace"):
            real = getattr(os, op)
            mp.setattr(os, op, lambda *a, op=op, real=real, **k: (events.append((op, a[-1])),
                                                                   real(*a, **k))[1])
        assert main(world.args(traced, "--overwrite")) == 0
    first_save = next(i for i, (op, path) in enumerate(events)
                      if op == "replace" and str(path).endswith("current.json")) + 1
    aside = [i + 1 for i, (op, path) in enumerate(events)
             if op == "rename" and ".replac" in os.fspath(path)]
    assert len(aside) == 4, events  # 3 entries moved aside, then the folder renamed
    points = sorted({*aside, aside[-1] + 1, aside[-1] + 2, first_save - 3, first_save,
                     first_save + 1})
    for n in points:
        run = tmp_path / f"kill{n}"
        shutil.copytree(partial, run, symlinks=True)
        rc, _, err = _run_child(world, run, {n: ["kill"]}, "--overwrite")
        assert rc == -signal.SIGKILL, (n, err)
        rc, out, err = _cli(capsys, "sample", str(run), "--max-new-tokens", "5", "--seed", "0")
        assert rc == 0 and out.strip(), (n, err)
        step = 3 if n > first_save else 6
        if step == 6:
            from lmlab.rundir import settle_overwrite
            settle_overwrite(run)
            assert _files(run) == old and not any(".replac" in f for f in os.listdir(run)), n
        assert checkpoint.load_training_state(run)[1]["step"] == step, n
        _assert_recovers(world, run, capsys)


def _overwrite_events(world, partial, tmp_path) -> list:
    """(op, path) of each event of an --overwrite of a copy of `partial`, as the driver counts them."""
    traced = tmp_path / "traced"
    shutil.copytree(partial, traced, symlinks=True)
    events = []

    def tracer(op, real):
        def call(*args, **kwargs):
            target = args[0] if op == "fsync" else args[-1]
            if isinstance(target, int):
                target = os.readlink(f"/proc/self/fd/{target}")
            events.append((op, os.fspath(target)))
            return real(*args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as mp:
        for op in ("fsync", "rename", "replace"):
            mp.setattr(os, op, tracer(op, getattr(os, op)))
        assert main(world.args(traced, "--overwrite")) == 0
    return events


@pytest.mark.parametrize("signal_name", ["sigint", "sigterm"])
def test_a_stop_before_an_overwrites_first_checkpoint_puts_the_old_run_back(world, partial,
                                                                          tmp_path, capsys,
                                                                          signal_name):
    """Ctrl-C soon after an --overwrite (often: of the wrong run) saved the new run's first steps
    as a checkpoint, and the run it replaced was deleted. A stop before the new run's first
    checkpoint saves none and puts the old run back as it was; one after it saves, as always."""
    old = _files(partial)
    events = _overwrite_events(world, partial, tmp_path)
    row2 = next(i + 1 for i, (op, path) in enumerate(events)
                if op == "fsync" and path.endswith("metrics.jsonl"))  # step 2's row, before step 3
    assert row2 < next(i + 1 for i, (op, path) in enumerate(events) if ".tmp-step_000003" in path)
    run = tmp_path / "early"
    shutil.copytree(partial, run, symlinks=True)
    rc, out, err = _run_child(world, run, {row2: [signal_name]}, "--overwrite")
    assert rc == 0, err
    assert "putting back the run --overwrite is replacing" in err
    assert "saved no checkpoint, so the run it was replacing is put back" in err
    assert _files(run) == old and not any(".replac" in f for f in os.listdir(run))
    # After the new run's first checkpoint the stop saves it, and the old run is gone.
    row4 = [i + 1 for i, (op, path) in enumerate(events)
            if op == "fsync" and path.endswith("metrics.jsonl")][1]
    run = tmp_path / "later"
    shutil.copytree(partial, run, symlinks=True)
    rc, out, err = _run_child(world, run, {row4: [signal_name]}, "--overwrite")
    assert rc == 0 and "stopping after this step and saving a checkpoint" in err, err
    assert checkpoint.load_training_state(run)[1]["step"] == 4
    assert not any(".replac" in f for f in os.listdir(run))


# -- Ctrl-C -------------------------------------------------------------------------------------------


def test_ctrl_c_then_ctrl_c_during_the_save_waits_for_it(world, tmp_path, capsys):
    run = tmp_path / "run"
    step4 = world.event("fsync", "metrics.jsonl", 1)  # the row of step 4, outside any save
    # The stop request makes step 4's save the next events; the second Ctrl-C lands in its middle.
    rc, out, err = _run_child(world, run, {step4: ["sigint"], step4 + 3: ["sigint"]})
    assert rc == 0, err
    assert "saving a checkpoint; the run stops when it is written" in err
    assert "stopped early (Ctrl-C / SIGTERM): 4 steps" in out
    assert checkpoint.load_training_state(run)[1]["step"] == 4
    _assert_recovers(world, run, capsys, extra_checkpoints=[4])


def test_sigterm_stops_after_the_step_with_a_checkpoint_as_ctrl_c_does(world, tmp_path, capsys):
    """Process managers, batch schedulers and `docker stop` send SIGTERM before they kill: it was
    Python's default, an exit on the spot that lost every step since the last save."""
    run = tmp_path / "run"
    step4 = world.event("fsync", "metrics.jsonl", 1)  # the row of step 4, outside any save
    rc, out, err = _run_child(world, run, {step4: ["sigterm"]})
    assert rc == 0, err
    assert "asked to stop (SIGTERM)" in err and "stopping after this step" in err
    assert "stopped early (Ctrl-C / SIGTERM): 4 steps" in out
    assert checkpoint.load_training_state(run)[1]["step"] == 4
    _assert_recovers(world, run, capsys, extra_checkpoints=[4])


def test_a_third_ctrl_c_forces_the_exit_and_the_previous_checkpoint_stays(world, tmp_path, capsys):
    run = tmp_path / "run"
    step4 = world.event("fsync", "metrics.jsonl", 1)
    rc, _, err = _run_child(world, run, {step4: ["sigint"], step4 + 2: ["sigint"], step4 + 4: ["sigint"]})
    assert rc == 130, err
    assert "forcing an exit; the save in progress is abandoned" in err
    assert checkpoint.load_training_state(run)[1]["step"] == 3
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000003"]  # nothing half-written left
    _assert_recovers(world, run, capsys)


def test_ctrl_c_twice_between_saves_stops_at_once_keeping_the_last_checkpoint(world, tmp_path, capsys):
    run = tmp_path / "run"
    step4 = world.event("fsync", "metrics.jsonl", 1)
    rc, _, err = _run_child(world, run, {step4: ["sigint", "sigint"]})
    assert rc == 130, err
    assert checkpoint.load_training_state(run)[1]["step"] == 3
    _assert_recovers(world, run, capsys)


# -- full disks, read-only and forbidden directories -----------------------------------------------------


def _assert_failed_save(rc, err, run, cause, kept):
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert f"lmlab pretrain: error: cannot write {run}/" in err  # the file that met the fault
    assert f"{cause}; the checkpoint step_{kept:06d} stays current" in err
    assert checkpoint.load_training_state(run)[1]["step"] == kept


def test_a_file_size_limit_during_a_save_keeps_the_previous_checkpoint(world, tmp_path, capsys):
    run = tmp_path / "run"
    size = (world.root / "reference" / "checkpoints" / "step_000003" / "model.safetensors").stat().st_size
    start = world.save_events(6)[0]
    rc, _, err = _run_child(world, run, {start: [f"fsize:{size - 1}"]})
    _assert_failed_save(rc, err, run, "File too large", kept=3)
    _assert_recovers(world, run, capsys)


def _mount(*args):
    return subprocess.run(["mount", *map(str, args)], capture_output=True, text=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """A mount point for a small tmpfs (skips where mounting is not allowed); unmounted after."""
    point = tmp_path / "mnt"
    point.mkdir()
    if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", point):
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
    yield point
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_full_disk_keeps_the_previous_checkpoint(world, tmp_path, tmpfs, capsys):
    one = sum(p.stat().st_size for p in (world.root / "reference" / "checkpoints" / "step_000003").iterdir())
    # Room for about two checkpoints and the small files: a later save meets ENOSPC.
    assert _mount("-o", f"remount,size={(2 * one + 40_000) // 4096 * 4096}", "tmpfs", tmpfs)
    run = tmpfs / "run"
    rc, _, err = _run_child(world, run)
    kept = checkpoint.load_training_state(run)[1]["step"]
    assert kept in (3, 6)
    _assert_failed_save(rc, err, run, "No space left on device", kept=kept)
    assert _mount("-o", "remount,size=16m", "tmpfs", tmpfs)  # the user frees some space
    _assert_recovers(world, run, capsys)


@pytest.fixture
def partial(world, tmp_path):
    """A run SIGKILLed during step 7, its checkpoint at step 6 (made once, copied per test)."""
    base = world.root / "partial"
    if not base.exists():
        rc, _, _ = _run_child(world, base, {world.save_events(6)[-1] + 1: ["kill"]})
        assert rc == -signal.SIGKILL and checkpoint.load_training_state(base)[1]["step"] == 6
    run = tmp_path / "run"
    shutil.copytree(base, run, symlinks=True)
    return run


def test_a_read_only_filesystem_is_refused_before_training(world, partial, capsys):
    if os.geteuid() != 0 or not _mount("--bind", partial, partial):
        pytest.skip("a read-only bind mount needs root with CAP_SYS_ADMIN")
    try:
        assert _mount("-o", "remount,bind,ro", partial)
        rc, out, _ = _cli(capsys, "sample", str(partial), "--max-new-tokens", "5", "--prompt", "a")
        assert rc == 0 and out.strip()  # reading needs no write access
        rc, _, err = _cli(capsys, *world.args(partial, "--resume"))
        assert rc == 2 and err.count("\n") == 1
        assert f"cannot open the lock file {partial}/.lock: Read-only file system" in err
    finally:
        subprocess.run(["umount", str(partial)], capture_output=True)
    _assert_recovers(world, partial, capsys)


def test_a_directory_it_may_not_write_keeps_the_previous_checkpoint(world, partial, capsys):
    wrap = ()
    if os.geteuid() == 0:  # root writes through mode bits unless it lacks the DAC capabilities
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("EACCES as root needs util-linux setpriv to drop CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        wrap = (setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}")
    os.chmod(partial / "checkpoints", 0o555)
    try:
        rc, _, err = _run_child(world, partial, None, "--resume", wrap=wrap)
    finally:
        os.chmod(partial / "checkpoints", 0o755)
    _assert_failed_save(rc, err, partial, "Permission denied", kept=6)
    _assert_recovers(world, partial, capsys)


# -- two processes, symbolic links, older runs ------------------------------------------------------------


def test_a_second_process_on_the_same_run_is_refused_naming_the_first(world, partial, capsys):
    holder = _child(world, partial, {world.save_events(9)[0]: ["pause"]}, "--resume",
                    stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "paused"
        rc, _, err = _cli(capsys, *world.args(partial, "--resume"))
        assert rc == 2 and err.count("\n") == 1
        assert f"{partial} is in use by another lmlab process (pid {holder.pid})" in err
        # A prompt, so the output is never blank whatever the 5 sampled tokens are.
        rc, out, _ = _cli(capsys, "sample", str(partial), "--max-new-tokens", "5", "--prompt", "a")
        assert rc == 0 and out.strip()  # readers take no lock
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
        holder.stdout.close()
        holder.stderr.close()
    assert holder.returncode == 0
    assert _outcome(partial) == world.reference


def test_a_symlinked_metrics_file_is_refused_and_its_target_untouched(world, partial, tmp_path, capsys):
    target = tmp_path / "precious.txt"
    target.write_text("not lmlab's\n")
    os.replace(partial / "metrics.jsonl", tmp_path / "metrics.jsonl")
    os.symlink(target, partial / "metrics.jsonl")
    rc, _, err = _cli(capsys, *world.args(partial, "--resume"))
    assert rc == 2 and f"{partial}/metrics.jsonl is a symbolic link" in err
    assert target.read_text() == "not lmlab's\n"
    os.unlink(partial / "metrics.jsonl")
    os.replace(tmp_path / "metrics.jsonl", partial / "metrics.jsonl")
    _assert_recovers(world, partial, capsys)


def test_a_run_in_the_flat_layout_of_older_versions_resumes_bit_for_bit(world, partial, capsys):
    flatten(partial)
    assert (partial / "model.safetensors").exists() and not (partial / "current.json").exists()
    _assert_recovers(world, partial, capsys)


def test_a_resume_that_runs_no_step_changes_no_file(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world.root / "reference", run)

    def files():
        return {p.relative_to(run).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
                for p in sorted(run.rglob("*")) if p.is_file()}

    before = files()
    rc, _, err = _cli(capsys, *world.args(run, "--resume"))
    assert rc == 0 and "already finished 12 of 12 steps" in err
    assert files() == before


# -- damaged files: exit 2, one line naming the file --------------------------------------------------


def _refused(capsys, run, path, message):
    rc, _, err = _cli(capsys, "sample", str(run), "--max-new-tokens", "5")
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("lmlab sample: error: ") and str(path) in err and message in err, err


def _rewrite(run, name, data: bytes):
    """Replace a file of the current checkpoint and record it in config.json's manifest, so the
    check that fires is the one on the content."""
    import hashlib

    d = checkpoint.current_checkpoint(run)
    (d / name).write_bytes(data)
    cfg = json.loads((d / "config.json").read_text())
    cfg["checkpoint"]["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / "config.json").write_text(json.dumps(cfg))
    return d / name


def _edit_config(run, edit):
    path = checkpoint.current_checkpoint(run) / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))
    return path


DAMAGE = {
    "model truncated": lambda run, d: ((d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:1000]), (d / "model.safetensors", "is 1000 bytes, but")),
    "model random bytes": lambda run, d: ((d / "model.safetensors").write_bytes(
        np.random.default_rng(0).bytes((d / "model.safetensors").stat().st_size)),
        (d / "model.safetensors", "is truncated or not a safetensors file")),
    "model bit flip": lambda run, d: (_flip(d / "model.safetensors"),
                                      (d / "model.safetensors", "is corrupted: its SHA-256 differs")),
    "model float64": lambda run, d: (None, (_rewrite(run, "model.safetensors", _as_f64(d / "model.safetensors")),
                                            "has dtype F64, expected F32")),
    "model wrong shapes": lambda run, d: (None, (_edit_config(run, lambda c: c["model"].update(n_embd=32)),
                                                 "")),
    "vocab_size 1e12": lambda run, d: (None, (_edit_config(run, lambda c: c["model"].update(vocab_size=10**12)),
                                              "model.vocab_size must be an integer in [1, 2097152]")),
    "model section a list": lambda run, d: (None, (_edit_config(run, lambda c: c.update(model=[])),
                                                   'has no "model" section')),
    "train section a string": lambda run, d: (None, (_edit_config(run, lambda c: c.update(train="fast")),
                                                     '"train" must be an object or null, got str')),
    "config not JSON": lambda run, d: ((d / "config.json").write_text("{"), (d / "config.json", "not valid JSON")),
    "tokenizer with fewer ids": lambda run, d: (None, (_rewrite(run, "tokenizer.json", _small_tokenizer()),
                                                       "tokenizer of 9 ids, but the model")),
    "tokenizer not JSON": lambda run, d: (None, (_rewrite(run, "tokenizer.json", b"[1,"),
                                                 "not a valid tokenizer.json")),
    "pointer garbage": lambda run, d: ((run / "current.json").write_text("[]"),
                                       (run / "current.json", "does not name a checkpoint")),
    "pointer to nothing": lambda run, d: ((run / "current.json").write_text('{"checkpoint": "step_000099"}'),
                                          (run / "current.json", "names checkpoints/step_000099, which is missing")),
}


def _flip(path):
    raw = bytearray(path.read_bytes())
    raw[-4] ^= 1
    path.write_bytes(bytes(raw))


def _as_f64(path) -> bytes:
    import safetensors.numpy
    tensors = safetensors.numpy.load_file(str(path))
    return safetensors.numpy.save({k: v.astype(np.float64) for k, v in tensors.items()})


def _small_tokenizer() -> bytes:
    from lmlab.tokenizer import train_tokenizer
    return train_tokenizer("abcd", "char").to_str().encode()


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_file_is_named_in_one_line_with_exit_2(world, tmp_path, capsys, case):
    run = tmp_path / "run"
    shutil.copytree(world.root / "reference", run)
    _, (path, message) = DAMAGE[case](run, checkpoint.current_checkpoint(run))
    if case == "model wrong shapes":
        message = "tensor 'wte' has shape"
        path = checkpoint.current_checkpoint(run) / "model.safetensors"
    _refused(capsys, run, path, message)


def test_a_damaged_flat_layout_model_is_named(world, partial, capsys):
    flatten(partial)
    path = partial / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _refused(capsys, partial, path, "is truncated: the header describes")


def test_a_token_cache_that_cannot_be_written_is_skipped_with_a_note(world, tmp_path, monkeypatch, capsys):
    import errno

    from lmlab import data
    from lmlab.files import write_error
    from lmlab.tokenizer import train_tokenizer

    def full(path, _):
        raise write_error(path, OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(data, "atomic_write_bytes", full)
    tok = train_tokenizer(TEXT, "char")
    ids = data.tokenize_corpus(world.corpus, tok, cache_dir=tmp_path / "cache")
    assert ids.tolist() == tok.encode(TEXT).tolist() and not ids.flags.writeable
    err = capsys.readouterr().err
    assert "lmlab: not caching the tokens of" in err and "No space left on device" in err


def test_a_damaged_token_cache_is_rebuilt(world, partial, capsys):
    caches = sorted((world.root / "cache" / "tokens").glob("*.int32"))
    saved = {p: p.read_bytes() for p in caches}
    try:
        for i, p in enumerate(caches):  # one truncated, the others with a flipped id
            if i == 0:
                p.write_bytes(saved[p][: len(saved[p]) // 2])
            else:
                raw = bytearray(saved[p])
                raw[-1] ^= 0x7f
                p.write_bytes(bytes(raw))
        _assert_recovers(world, partial, capsys)
        assert {p: p.read_bytes() for p in caches} == saved  # rebuilt as they were
    finally:
        for p, data in saved.items():
            p.write_bytes(data)


def test_a_hand_edited_flat_layout_state_is_refused_in_one_line(world, partial, capsys):
    """Flat-layout runs carry no checksums, so a state.json edited by hand is only caught when the
    trainer reads it: one line naming the file, exit 2, no traceback."""
    flatten(partial)
    state_path = partial / "state.json"
    saved = json.loads(state_path.read_text())
    del saved["state"]["adam_t"]
    state_path.write_text(json.dumps(saved))
    rc, _, err = _cli(capsys, *world.args(partial, "--resume"))
    assert rc == 2 and err.count("\n") == 1, err
    assert "state.json does not hold this stage's trainer state" in err and "Traceback" not in err
