"""open_run_dir: every rule for opening a run directory for writing, in each direction."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lmlab.errors import LmlabError, RunDirError
from lmlab.checkpoint import read_config, save_run
from lmlab.rundir import (CURRENT_FILE, REPLACED_DIR, RunDir, is_run, open_run_dir,
                          settle_overwrite)


def flat_run(path):
    """A run as lmlab wrote it before checkpoints were directories (the files are placeholders:
    open_run_dir looks at names, checkpoint.py at contents)."""
    path.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.safetensors", "config.json", "tokenizer.json",
                 "state.json", "metrics.jsonl", "loss.png"):
        (path / name).write_text(name)
    return path


def new_run(path):
    (path / "checkpoints" / "step_000010").mkdir(parents=True)
    (path / "checkpoints" / "step_000010" / "config.json").write_text("{}")
    (path / CURRENT_FILE).write_text('{"checkpoint": "step_000010", "step": 10}')
    (path / "metrics.jsonl").write_text('{"step": 10}\n')
    return path


def test_fresh_run_is_created_locked_and_released(tmp_path):
    run = tmp_path / "a" / "b"
    with open_run_dir(run) as rd:
        assert isinstance(rd, RunDir) and rd.is_open and rd.path == run and run.is_dir()
        assert os.fspath(rd) == str(run) and rd.replaced == [] and not is_run(run)
        with pytest.raises(RunDirError, match=rf"{run} is already open in this process; pass its RunDir"):
            open_run_dir(run)
    assert not rd.is_open
    open_run_dir(run).close()  # released: opens again


@pytest.mark.parametrize("make", [flat_run, new_run])
def test_existing_run_needs_resume_or_overwrite(tmp_path, make):
    run = make(tmp_path / "run")
    assert is_run(run)
    with pytest.raises(RunDirError, match=rf"{run} already holds a run; pass --resume .* --overwrite"):
        open_run_dir(run)
    # A writer that cannot continue a run (reward, import) is not told to.
    with pytest.raises(RunDirError, match=rf"{run} already holds a run; pass --overwrite to "):
        open_run_dir(run, resumable=False)
    before = sorted(os.listdir(run))
    with open_run_dir(run, resume=True) as rd:
        assert rd.replaced == []
    assert sorted(os.listdir(run)) == sorted(before + [".lock"] * (".lock" not in before))


def test_overwrite_sets_the_run_aside_and_lists_it_keeping_other_files(tmp_path):
    run = new_run(tmp_path / "run")
    (run / "notes.txt").write_text("mine")
    (run / "loss.png").write_text("png")
    with open_run_dir(run, overwrite=True) as rd:
        assert rd.replaced == ["current.json", "checkpoints/", "metrics.jsonl", "loss.png"]
        assert sorted(os.listdir(run)) == [".lock", REPLACED_DIR, "notes.txt"] and not is_run(run)
        save_run(rd, *tiny_model(), train_config={"stage": "test"})
    assert sorted(os.listdir(run)) == [".lock", "checkpoints", "current.json", "notes.txt"]
    assert os.listdir(run / "checkpoints") == ["step_000000"]
    flat = flat_run(tmp_path / "flat")
    with open_run_dir(flat, overwrite=True) as rd:
        assert rd.replaced == ["metrics.jsonl", "loss.png", "model.safetensors", "optimizer.safetensors",
                               "tokenizer.json", "state.json", "config.json"]
        assert sorted(os.listdir(flat)) == [".lock", REPLACED_DIR]
        save_run(rd, *tiny_model(), train_config={"stage": "test"})
    assert sorted(os.listdir(flat)) == [".lock", "checkpoints", "current.json"]


def tiny_model():
    from lmlab.model import GPT, GPTConfig
    from lmlab.tokenizer import train_tokenizer
    tok = train_tokenizer("abc")
    return GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8)), tok


def snapshot(run):
    """{relative path: bytes} of every file of a run but its lock."""
    found = {}
    for d, _, names in os.walk(run):
        for n in names:
            p = os.path.join(d, n)
            if n != ".lock":
                with open(p, "rb") as f:
                    found[os.path.relpath(p, run)] = f.read()
    return found


@pytest.mark.parametrize("make", [flat_run, new_run])
def test_a_replaced_run_is_read_until_the_new_run_saves_and_put_back_if_it_never_does(tmp_path, make):
    """The run --overwrite replaces is kept until the new run's first checkpoint is current:
    readers read it meanwhile, and a new run that ends without a checkpoint (an error) puts it
    back as it was."""
    from lmlab.checkpoint import current_checkpoint

    run = make(tmp_path / "run")
    before = snapshot(run)
    old = current_checkpoint(run)
    with open_run_dir(run, overwrite=True):
        assert current_checkpoint(run) == run / REPLACED_DIR / old.relative_to(run)
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5}\n')  # the new run's
        (run / "checkpoints" / ".tmp-step_000010-aa").mkdir(parents=True)  # a save cut short
    assert snapshot(run) == before and current_checkpoint(run) == old
    assert not os.path.lexists(run / REPLACED_DIR)


KILLED_OVERWRITE = """
import os, sys
from lmlab import rundir
when = sys.argv[2]
real_rename = os.rename
moves = []
def rename(a, b):
    moves.append(b)
    if when == "setting-aside" and len(moves) == 3:
        os._exit(9)  # a kill mid-move: two entries aside, the rest in place
    real_rename(a, b)
os.rename = rename
rd = rundir.open_run_dir(sys.argv[1], overwrite=True)
with open(os.path.join(sys.argv[1], "metrics.jsonl"), "w") as f:
    f.write('{"step": 1}\\n')
if when == "training":
    os._exit(9)  # killed before its first checkpoint
"""


@pytest.mark.parametrize("when", ["setting-aside", "training"])
def test_an_overwrite_killed_before_its_first_checkpoint_leaves_the_old_run(tmp_path, when, capsys):
    """kill -9 at any point of an --overwrite before the new run's first checkpoint: the old run
    is still read, and the next verb writing there puts it back before deciding anything, so a
    --resume continues it."""
    from lmlab.checkpoint import current_checkpoint

    run = new_run(tmp_path / "run")
    (run / "loss.png").write_text("png")
    before = snapshot(run)
    r = subprocess.run([sys.executable, "-c", KILLED_OVERWRITE, str(run), when],
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 9
    if when == "training":
        assert current_checkpoint(run).parent.parent.name == REPLACED_DIR  # still readable
    moved = {"setting-aside": ["metrics.jsonl", "current.json"],  # current.json goes first
             "training": ["checkpoints", "loss.png", "metrics.jsonl", "current.json"]}[when]
    assert settle_overwrite(run) == moved
    assert "put back the run" in capsys.readouterr().err
    assert snapshot(run) == before
    assert sorted(os.listdir(run)) == [".lock", "checkpoints", "current.json", "loss.png", "metrics.jsonl"]
    with open_run_dir(run, resume=True) as rd:
        assert rd.restored == []


def _killed_at(n, act) -> bool:
    """Run act() in a forked child that dies (os._exit, as a kill -9) at its nth call of os.link,
    os.unlink or os.rename; returns whether it died there (False: act finished first)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            count = [0]

            def counted(real):
                def call(*args, **kwargs):
                    count[0] += 1
                    if count[0] == n:
                        os._exit(9)
                    return real(*args, **kwargs)
                return call

            for name in ("link", "unlink", "rename"):
                setattr(os, name, counted(getattr(os, name)))
            act()
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 3
        os._exit(code)  # no RunDir closes: as if killed just after act
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    assert code in (0, 9), code
    return code == 9


FLAT_CHECKPOINT = ("model.safetensors", "optimizer.safetensors", "config.json", "tokenizer.json",
                   "state.json")


@pytest.mark.parametrize("phase", ["setting-aside", "putting-back"])
def test_a_flat_layout_run_an_overwrite_moves_is_whole_somewhere_at_every_kill(tmp_path, phase):
    """A flat-layout checkpoint is read from one directory, and --overwrite moved its files into
    .replacing-run (and back) one by one: a kill between two left it split, and `sample` said
    "missing config.json" until a writer put the run back. Killed at every step of either move,
    one directory holds it whole, and the next writer puts the run back as it was."""
    from lmlab.checkpoint import current_checkpoint

    n, killed, held = 0, True, []  # held: the child's RunDir is never closed, as in a kill
    while killed:
        n += 1
        run = flat_run(tmp_path / f"run{n}")
        before = snapshot(run)
        if phase == "setting-aside":
            killed = _killed_at(n, lambda: held.append(open_run_dir(run, overwrite=True)))
        else:
            assert not _killed_at(0, lambda: held.append(open_run_dir(run, overwrite=True)))
            assert sorted(os.listdir(run)) == [".lock", REPLACED_DIR]
            killed = _killed_at(n, lambda: settle_overwrite(run))
        where = current_checkpoint(run)
        assert {f: (where / f).read_text() for f in FLAT_CHECKPOINT} == {
            f: f for f in FLAT_CHECKPOINT}, (n, where)
        settle_overwrite(run)
        assert snapshot(run) == before, n
        assert sorted(os.listdir(run)) == sorted([".lock", *before]), n
    assert n > 10  # every link, unlink and rename of the move was a kill point


def test_a_kill_after_the_new_runs_first_checkpoint_keeps_the_new_run(tmp_path):
    run = new_run(tmp_path / "run")
    with open_run_dir(run, overwrite=True) as rd:
        save_run(rd, *tiny_model(), train_config={"stage": "new"}, state={"step": 3})
        # As if killed between current.json and the removal of the replaced run:
        os.mkdir(run / REPLACED_DIR)
        (run / REPLACED_DIR / "metrics.jsonl").write_text("old")
    with open_run_dir(run, resume=True) as rd:
        assert rd.restored == []
    assert not os.path.lexists(run / REPLACED_DIR)
    assert read_config(run)["train"]["stage"] == "new"


def test_files_that_only_share_a_name_with_a_checkpoints_are_left_alone(tmp_path):
    run = tmp_path / "project"
    run.mkdir()
    (run / "config.json").write_text('{"mine": true}')
    (run / "state.json").write_text("{}")
    with open_run_dir(run, overwrite=True) as rd:
        assert rd.replaced == []
    assert (run / "config.json").read_text() == '{"mine": true}' and (run / "state.json").exists()
    open_run_dir(run).close()


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(RunDirError, match=r"no run to resume in .*nope \(it does not exist\)"):
        open_run_dir(tmp_path / "nope", resume=True)
    assert not (tmp_path / "nope").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match=r"\(it holds no checkpoint\); start it without --resume"):
        open_run_dir(tmp_path / "empty", resume=True)
    with pytest.raises(RunDirError, match="pass one of them"):
        open_run_dir(tmp_path / "empty", resume=True, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        open_run_dir(tmp_path / "file")


def test_a_crashed_runs_metrics_are_not_appended_to(tmp_path):
    """A run killed before its first save leaves metrics.jsonl and no checkpoint: a fresh run
    there is refused (nothing is silently mixed in) until --overwrite clears it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9}\n')
    # Nothing to resume there, so the advice is --overwrite alone.
    with pytest.raises(RunDirError, match=r"files of an earlier run that saved no checkpoint "
                                          r"\(metrics.jsonl\), so there is nothing to resume; pass "
                                          r"--overwrite to replace them"):
        open_run_dir(run)
    with pytest.raises(RunDirError, match="no run to resume"):
        open_run_dir(run, resume=True)
    with open_run_dir(run, overwrite=True) as rd:
        assert rd.replaced == ["metrics.jsonl"]
        assert not (run / "metrics.jsonl").exists()


def test_output_may_not_be_the_parent_nor_inside_it_nor_contain_it(tmp_path):
    parent = new_run(tmp_path / "base")
    with pytest.raises(RunDirError, match="is the run it starts from"):
        open_run_dir(parent, parent=parent)
    with pytest.raises(RunDirError, match="is the run it starts from"):
        open_run_dir(tmp_path / "x" / ".." / "base", parent=str(parent))
    with pytest.raises(RunDirError, match="is inside the run it starts from"):
        open_run_dir(parent / "child", parent=parent)
    assert not (parent / "child").exists()
    with pytest.raises(RunDirError, match="is inside the output"):
        open_run_dir(tmp_path, parent=parent)
    open_run_dir(tmp_path / "sibling", parent=parent).close()


@pytest.mark.parametrize("where", ["metrics.jsonl", "checkpoints/step_000010",
                                   "checkpoints/step_000010/model.safetensors", ".lock"])
def test_symlinks_inside_the_run_are_refused(tmp_path, where):
    run = new_run(tmp_path / "run")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("untouched")
    link = run / where
    if os.path.lexists(link):
        os.rename(link, tmp_path / "moved")
    os.symlink(target, link)
    for kw in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(RunDirError, match=rf"{link} is a symbolic link; lmlab does not follow"):
            open_run_dir(run, **kw)
    assert os.listdir(target) == ["keep.txt"]


def test_leftovers_of_an_interrupted_save_are_cleaned(tmp_path):
    run = new_run(tmp_path / "run")
    (run / ".metrics.jsonl.abc123.tmp").write_text("torn")
    (run / "checkpoints" / ".tmp-step_000020-ff").mkdir()
    (run / "checkpoints" / ".tmp-step_000020-ff" / "model.safetensors").write_text("half")
    (run / "checkpoints" / ".old-step_000010-ee").mkdir()
    (run / "model.safetensors").write_text("flat-layout leftover after the move")
    (run / "state.json").write_text("flat-layout leftover after the move")
    (run / "notes.tmp").write_text("a user's file, not ours")
    with open_run_dir(run, resume=True) as rd:
        assert sorted(rd.cleaned) == [".metrics.jsonl.abc123.tmp", "checkpoints/.old-step_000010-ee",
                                      "checkpoints/.tmp-step_000020-ff", "model.safetensors", "state.json"]
    assert sorted(os.listdir(run)) == [".lock", "checkpoints", "current.json", "metrics.jsonl", "notes.tmp"]
    (run / "config.json").write_text("a user's own, beside the run")
    with open_run_dir(run, resume=True) as rd:
        assert rd.cleaned == []
    assert (run / "config.json").exists()
    assert os.listdir(run / "checkpoints") == ["step_000010"]


def test_what_a_first_save_killed_midway_left_is_no_run_and_is_cleaned(tmp_path):
    """A writer killed in its first save (lmlab import, whose only files are the checkpoint's)
    leaves checkpoints/ holding a temporary directory, or nothing; running it again must work
    without --overwrite, as nothing of a run is there."""
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step_000000-ab12cd34").mkdir(parents=True)
    (run / "checkpoints" / ".tmp-step_000000-ab12cd34" / "model.safetensors").write_text("half")
    (run / ".lock").write_text("")
    with open_run_dir(run, resumable=False) as rd:
        assert rd.cleaned == ["checkpoints/.tmp-step_000000-ab12cd34"] and rd.replaced == []
    assert os.listdir(run / "checkpoints") == []
    with open_run_dir(run) as rd:  # killed between creating checkpoints/ and its first entry
        assert rd.cleaned == []
    # A checkpoint beside the leftovers is a run's file still.
    (run / "checkpoints" / "step_000010").mkdir()
    with pytest.raises(RunDirError, match=r"saved no checkpoint \(checkpoints\)"):
        open_run_dir(run)


def test_another_process_holding_the_run_is_named(tmp_path):
    run = new_run(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from lmlab.rundir import open_run_dir
            rd = open_run_dir({str(run)!r}, resume=True)
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError) as e:
            open_run_dir(run, resume=True)
        assert str(e.value) == (f"{run} is in use by another lmlab process (pid {holder.pid}); wait "
                                "for it to finish or stop it first")
        assert isinstance(e.value, LmlabError) and isinstance(e.value, ValueError)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    open_run_dir(run, resume=True).close()  # the holder's exit released it


def test_an_empty_run_directory_is_refused_before_any_work(tmp_path, monkeypatch):
    """Path('') is the current directory: run='' (an unset --run "$RUN") trained the default
    model into whatever directory the script ran in. It is refused, by open_run_dir and by the
    stages before they load any data, and nothing is written."""
    import lmlab
    from lmlab.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunDirError, match=r"the run directory is empty \(''\)"):
        open_run_dir("")
    with pytest.raises(RunDirError, match=r"the run directory is empty"):
        lmlab.pretrain("builtin:shakespeare", "", steps=1, progress=False)
    with pytest.raises(RunDirError, match=r"the run directory is empty"):
        lmlab.finetune(tmp_path / "nowhere", "builtin:shakespeare", out="", steps=1)
    assert main(["pretrain", "--corpus", "builtin:shakespeare", "--run", "", "--steps", "1"]) == 2
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("existing", [False, True], ids=["created", "the user's"])
def test_a_stage_that_fails_before_its_first_save_leaves_no_directory_it_created(
        tmp_path, monkeypatch, capsys, existing):
    """A stage that fails after opening its output but before its first save (here its first step)
    removes the directory it created, parents too, lock and all; a directory the user made, even
    an empty one, is kept (without a lock left in it)."""
    import importlib
    from lmlab.cli import main

    def fail(self, model):
        raise ValueError("the first step failed")

    pretrain_module = importlib.import_module("lmlab.pretrain")
    monkeypatch.setattr(pretrain_module.LanguageModelingStage, "train_step", fail)
    (tmp_path / "corpus.txt").write_text("the cat sat on the mat. " * 40)
    run = tmp_path / "new" / "run"
    if existing:
        run.mkdir(parents=True)
    assert main(["pretrain", "--corpus", str(tmp_path / "corpus.txt"), "--run", str(run),
                 "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                 "--batch-size", "2", "--steps", "2", "--warmup-steps", "1", "--eval-every", "0",
                 "--no-progress"]) == 2
    assert capsys.readouterr().err == "lmlab pretrain: error: the first step failed\n"
    if existing:
        assert os.listdir(run) == []
    else:
        assert sorted(os.listdir(tmp_path)) == ["corpus.txt"]
