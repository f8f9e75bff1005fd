"""A run directory: its layout, and the one way to open one for writing (open_run_dir).

    RUN/
      current.json            names the current checkpoint: {"checkpoint": "step_000200", "step": 200}
      checkpoints/step_N/     one complete checkpoint per save (checkpoint.py says what is inside);
                              the newest `keep` are kept, the current one always
      metrics.jsonl           one JSON object per logged step
      loss.png                the loss curves
      .lock                   locked (flock) by the process writing the run (empty)
Runs written before checkpoints were directories (the "flat layout") hold one checkpoint's files
at the top (model.safetensors, config.json, ...); they still load and resume, and their first new
save moves them to the layout above.

open_run_dir applies every rule a writing verb needs, before any work starts: an existing run is
refused unless resuming (or overwrite=True, which lists what it removes); resuming needs a run;
the output may not be its parent run, nor inside it, nor contain it; symbolic links inside the
run directory are refused (lmlab would write through them); an exclusive lock is held while the
RunDir is open, so two processes never write one run; leftovers of an interrupted save (temporary
files and directories) are removed. Readers (sample, predict, chat) only read and take no lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from pathlib import Path

from .errors import RunDirError
from .files import TEMP_SUFFIX

CURRENT_FILE = "current.json"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT_FILE = "loss.png"
LOCK_FILE = ".lock"
# The files of one checkpoint; in the flat layout they sit at the run's top.
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "state.json"
REWARD_HEAD_FILE = "reward_head.safetensors"
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, TOKENIZER_FILE, STATE_FILE, REWARD_HEAD_FILE,
                    CONFIG_FILE)
# What a run consists of (overwrite removes these): its own entries, and in the flat layout a
# checkpoint's files, config.json last, so a run half removed by a crash no longer looks like one.
RUN_ENTRIES = (CURRENT_FILE, CHECKPOINTS_DIR, METRICS_FILE, LOSS_PLOT_FILE)
RUN_NAMES = RUN_ENTRIES + CHECKPOINT_FILES
# Names a save uses before its checkpoint is complete (checkpoints/.tmp-*) or while displacing one
# (checkpoints/.old-*); atomic file writes use ".<name>.<random>.tmp".
SAVE_TEMP_PREFIX = ".tmp-"
SAVE_OLD_PREFIX = ".old-"
CHECKPOINT_NAME = re.compile(r"step_(\d+)(?:\.(\d+))?")


def is_run(path) -> bool:
    """Whether `path` holds a run's checkpoint (either layout)."""
    p = Path(path)
    return (p / CURRENT_FILE).is_file() or ((p / CONFIG_FILE).is_file() and (p / MODEL_FILE).is_file())


def _is_leftover(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX) and name != LOCK_FILE


def _is_save_leftover(name: str) -> bool:
    """A name in checkpoints/ that an interrupted save or prune left (never a checkpoint)."""
    return name.startswith((SAVE_TEMP_PREFIX, SAVE_OLD_PREFIX)) or _is_leftover(name)


def run_files(path: Path) -> list:
    """The run's entries in `path` (what overwrite removes; where `path` holds no run, the files
    of one that saved no checkpoint); a checkpoint's file names count only where they form a
    flat-layout run (a lone config.json may be anybody's), and checkpoints/ only where it holds
    more than an interrupted first save left (opening removes that, as any save's leftovers)."""
    ours = RUN_NAMES if is_run(path) else RUN_ENTRIES
    found = [n for n in ours if os.path.lexists(path / n)]
    ckpts = path / CHECKPOINTS_DIR
    if CHECKPOINTS_DIR in found and ckpts.is_dir() and not ckpts.is_symlink() and all(
            _is_save_leftover(n) for n in os.listdir(ckpts)):
        found.remove(CHECKPOINTS_DIR)
    return found


def moved_flat_files(path) -> list:
    """The flat-layout checkpoint files left at the top of a run whose current.json names a
    checkpoint in checkpoints/ (the save that moved the run there removes them, model.safetensors
    last, so they are recognised by it even after a kill). A user's own config.json is not ours."""
    p = Path(path)
    if not ((p / CURRENT_FILE).is_file() and (p / MODEL_FILE).is_file()):
        return []
    return [n for n in CHECKPOINT_FILES if n != MODEL_FILE and (p / n).is_file()] + [MODEL_FILE]


def _symlinks(path: Path) -> list:
    """Symbolic links at the run's top, in checkpoints/ and in each checkpoint directory."""
    found, dirs = [], [path]
    while dirs:
        d = dirs.pop()
        try:
            entries = list(os.scandir(d))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            if e.is_symlink():
                found.append(Path(e.path))
            elif e.is_dir() and (d == path and e.name == CHECKPOINTS_DIR or d.name == CHECKPOINTS_DIR):
                dirs.append(Path(e.path))
    return sorted(found)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def _holder_pid(fd: int) -> str:
    """The pid holding the flock on `fd`'s file, from /proc/locks (Linux); "unknown" elsewhere.
    Read from the kernel rather than written into the lock file, so opening a run changes no file."""
    try:
        st = os.fstat(fd)
        device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            pids = {fields[4] for fields in (line.split() for line in f)
                    if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device}
    except OSError:
        return "unknown"
    return pids.pop() if len(pids) == 1 else "unknown"


class RunDir:
    """An open run directory: holds its exclusive lock until close() (or the end of a with block).

    path: the run directory; removed: what overwrite=True removed (names relative to path);
    cleaned: leftovers of an interrupted save that opening removed.
    """

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.removed: list = []
        self.cleaned: list = []
        self._fd = fd

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"RunDir({os.fspath(self.path)!r}, open={self._fd is not None})"

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def clean_leftovers(self) -> list:
        """Remove what interrupted saves left: temporary files and directories, and a flat-layout
        checkpoint's files once current.json names a newer checkpoint. Returns the names removed."""
        gone = []
        top = self.path
        for name in sorted(os.listdir(top)):
            if _is_leftover(name):
                gone.append(name)
        ckpts = top / CHECKPOINTS_DIR
        if ckpts.is_dir():
            for name in sorted(os.listdir(ckpts)):
                if _is_save_leftover(name):
                    gone.append(f"{CHECKPOINTS_DIR}/{name}")
        gone += moved_flat_files(top)
        for name in gone:
            _remove(top / name)
        self.cleaned += gone
        return gone


def _check_parent(path: Path, parent) -> None:
    out, par = path.resolve(), Path(parent).resolve()
    if out == par:
        raise RunDirError(f"the output {path} is the run it starts from ({parent}); choose a new "
                          "directory for the output")
    if par in out.parents:
        raise RunDirError(f"the output {path} is inside the run it starts from ({parent}); choose "
                          "a directory outside it")
    if out in par.parents:
        raise RunDirError(f"the run it starts from ({parent}) is inside the output {path}; choose "
                          "another output directory")


def _lock(path: Path) -> int:
    lock = path / LOCK_FILE
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lock, flags, 0o666)
    except OSError as e:
        raise RunDirError(f"cannot open the lock file {lock}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        pid = _holder_pid(fd)
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            if pid == str(os.getpid()):
                raise RunDirError(f"{path} is already open in this process; pass its RunDir "
                                  "instead of opening it again") from None
            raise RunDirError(f"{path} is in use by another lmlab process (pid {pid}); wait for it "
                              "to finish or stop it first") from None
        raise RunDirError(f"cannot lock {lock}: {e.strerror}") from None
    return fd


def run_path(path) -> Path:
    """`path` as a Path; an empty one is refused (RunDirError): Path("") is the current directory,
    so an unset variable in --run "$RUN" would write a run among whatever files are there."""
    if not os.fspath(path):
        raise RunDirError("the run directory is empty (''): name one (a run in the current "
                          "directory is '.')")
    return Path(os.fspath(path))


def open_run_dir(path, *, resume: bool = False, overwrite: bool = False, parent=None,
                 resumable: bool = True) -> RunDir:
    """Open `path` for writing a run, applying every rule in the module docstring.

    resume: `path` must hold a run to continue. Otherwise an existing run (or files of one, such as
    the metrics of a run that crashed before its first save) is refused unless overwrite=True,
    which removes them and lists them in RunDir.removed. parent: the run this one starts from.
    resumable: whether the writer can continue a run (reward and import cannot), for the advice.
    Raises RunDirError with one line naming the run and what to do.
    """
    if resume and overwrite:
        raise RunDirError("--resume continues a run and --overwrite replaces it: pass one of them")
    path = run_path(path)
    if parent is not None:
        _check_parent(path, parent)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"the run directory {path} is a file, not a directory")
    if resume and not is_run(path):
        why = "it does not exist" if not path.exists() else "it holds no checkpoint"
        raise RunDirError(f"there is no run to resume in {path} ({why}); start it without --resume")
    links = _symlinks(path)
    if links:
        raise RunDirError(f"{links[0]} is a symbolic link; lmlab does not follow links inside a run "
                          "directory (it would write through them): replace it by what it points "
                          "to, or remove it")
    existing = [] if resume or not path.is_dir() else run_files(path)
    if existing and not overwrite:
        if is_run(path):
            resume_it = "--resume to continue it, " if resumable else ""
            raise RunDirError(f"{path} already holds a run; pass {resume_it}--overwrite to replace "
                              "it, or choose another directory")
        # A run stopped before its first checkpoint: nothing to resume, only files to replace.
        raise RunDirError(f"{path} holds files of an earlier run that saved no checkpoint "
                          f"({', '.join(existing)}), so there is nothing to resume; pass "
                          "--overwrite to replace them, or choose another directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create the run directory {path}: {e.strerror}") from None
    run = RunDir(path, _lock(path))
    try:
        if overwrite:
            for name in run_files(path):
                _remove(path / name)
                run.removed.append(name + ("/" if name == CHECKPOINTS_DIR else ""))
        run.clean_leftovers()
    except OSError as e:
        run.close()
        raise RunDirError(f"cannot clean the run directory {path}: {e.strerror} "
                          f"({e.filename})") from None
    return run
