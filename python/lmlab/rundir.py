"""A run directory: its layout, and the one way to open one for writing (open_run_dir).

    RUN/
      current.json            names the current checkpoint: {"checkpoint": "step_000200", "step": 200}
      checkpoints/step_N/     one complete checkpoint per save (checkpoint.py says what is inside);
                              the newest `keep` are kept, the current one always
      metrics.jsonl           one JSON object per logged step
      loss.png                the loss curves
      .lock                   locked (flock) by the process writing the run (empty)
      .replaced-run/          only while --overwrite replaces the run: the old run (see below)
Runs written before checkpoints were directories (the "flat layout") hold one checkpoint's files
at the top (model.safetensors, config.json, ...); they still load and resume, and their first new
save moves them to the layout above.

open_run_dir applies every rule a writing verb needs, before any work starts: an existing run is
refused unless resuming (or overwrite=True, which sets it aside: see below); resuming needs a run;
a transformers model directory (a config.json with a model_type, beside model.safetensors: the
flat layout's names) is not a run, and is refused, overwrite or not;
the output may not be its parent run, nor inside it, nor contain it; symbolic links inside the
run directory are refused (lmlab would write through them); an exclusive lock is held while the
RunDir is open, so two processes never write one run; leftovers of an interrupted save (temporary
files and directories) are removed. Readers (sample, predict, chat) only read and take no lock.

An overwrite never leaves a directory without a run: the run it replaces is moved into
RUN/.replacing-run/ entry by entry (a flat-layout checkpoint's files linked there before they
leave the run, so one of the two always holds it whole: _move), which is then renamed to
RUN/.replaced-run/ in one step, and kept there until the new run's first checkpoint is current
(checkpoint.save_run then removes it).
Until then readers read the replaced run. If the new run ends without a checkpoint (an error, a
kill, or a stop asked before its first save, which then saves none: train._optimise), the replaced
run is put back: when its RunDir closes, or, after a kill, by the next process
that opens the directory for writing (settle_overwrite).

A run directory that the stage left empty (it failed before writing anything)
loses its lock file when its RunDir closes, and is removed with any parents opening created, so
a failed start leaves no trace; a directory that existed before (a user's, even empty) is kept.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import sys
from pathlib import Path

from .errors import RunDirError
from .files import TEMP_SUFFIX, fsync_dir

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
# What a run consists of (overwrite sets these aside): its own entries, and in the flat layout a
# checkpoint's files, config.json last, so a run half removed by a crash no longer looks like one.
RUN_ENTRIES = (CURRENT_FILE, CHECKPOINTS_DIR, METRICS_FILE, LOSS_PLOT_FILE)
RUN_NAMES = RUN_ENTRIES + CHECKPOINT_FILES
# Names a save uses before its checkpoint is complete (checkpoints/.tmp-*) or while displacing one
# (checkpoints/.old-*); atomic file writes use ".<name>.<random>.tmp".
SAVE_TEMP_PREFIX = ".tmp-"
SAVE_OLD_PREFIX = ".old-"
CHECKPOINT_NAME = re.compile(r"step_(\d+)(?:\.(\d+))?")
# Where --overwrite keeps the run it replaces: REPLACING_DIR while its entries are moved, renamed
# to REPLACED_DIR once they all are (module docstring).
REPLACING_DIR = ".replacing-run"
REPLACED_DIR = ".replaced-run"


def config_kind(directory) -> str | None:
    """ "lmlab" where directory's config.json is an lmlab checkpoint's (a "model" section),
    "transformers" where it is a transformers model's (a "model_type"), else None."""
    try:
        with open(Path(directory) / CONFIG_FILE, "rb") as f:
            config = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        return "lmlab"
    if isinstance(config, dict) and "model_type" in config:
        return "transformers"
    return None


def is_run(path) -> bool:
    """Whether `path` holds a run's checkpoint (either layout). A transformers model directory
    (config.json, model.safetensors: the flat layout's names) is not one."""
    p = Path(path)
    flat = (p / CONFIG_FILE).is_file() and (p / MODEL_FILE).is_file()
    return (p / CURRENT_FILE).is_file() or (flat and config_kind(p) != "transformers")


def check_not_transformers(path) -> None:
    """Refuse (RunDirError) to write a run into a transformers model directory: its config.json,
    model.safetensors and tokenizer.json have a run's file names, and --overwrite would set them
    aside as a run's and remove them, destroying the user's model."""
    path = run_path(path)
    if config_kind(path) == "transformers":
        raise RunDirError(f"{path} holds a Hugging Face transformers model (its config.json has a "
                          "model_type), not an lmlab run; a run is never written into one, "
                          "--overwrite or not: choose another directory")


def _is_leftover(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX) and name != LOCK_FILE


def _is_save_leftover(name: str) -> bool:
    """A name in checkpoints/ that an interrupted save or prune left (never a checkpoint)."""
    return name.startswith((SAVE_TEMP_PREFIX, SAVE_OLD_PREFIX)) or _is_leftover(name)


def run_files(path: Path) -> list:
    """The run's entries in `path` (what overwrite sets aside; where `path` holds no run, the files
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

    path: the run directory; replaced: what overwrite=True set aside in REPLACED_DIR (names
    relative to path); restored: what opening put back from an overwrite interrupted before its
    first checkpoint; cleaned: leftovers of an interrupted save that opening removed; created:
    the directories opening created (the run's first, then missing parents), which closing
    removes again while they hold nothing but the lock (the stage wrote nothing there).
    """

    def __init__(self, path: Path, fd: int, created=()):
        self.path = path
        self.replaced: list = []
        self.restored: list = []
        self.cleaned: list = []
        self.created = list(created)
        self._fd = fd

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"RunDir({os.fspath(self.path)!r}, open={self._fd is not None})"

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        """Release the lock (idempotent). A run this one was replacing is put back first if no
        checkpoint of the new run became current (it stopped before its first save)."""
        if self._fd is not None:
            try:
                put_back = _settle(self.path)
            except OSError as e:
                put_back = []
                print(f"lmlab: could not put back the run {self.path / REPLACED_DIR} replaced: "
                      f"{e.strerror} ({e.filename}); the next lmlab command writing {self.path} "
                      "tries again", file=sys.stderr)
            fd, self._fd = self._fd, None
            self._remove_if_unused()
            os.close(fd)  # closing the only descriptor releases the flock
            if put_back:
                print(f"lmlab: the new run in {self.path} saved no checkpoint, so the run it was "
                      f"replacing is put back ({', '.join(put_back)})", file=sys.stderr)

    def _remove_if_unused(self) -> None:
        """Leave no trace of a stage that ended before writing anything into its directory (an
        error before its first save): the lock goes, then each directory opening created, if
        empty, innermost first (still locked, so no other writer is inside; _lock does not take
        a lock file removed meanwhile). Anything else in it (a user's file, a crashed run's
        metrics) keeps it, and a directory that existed before is kept."""
        try:
            if os.listdir(self.path) != [LOCK_FILE]:
                return
            os.unlink(self.path / LOCK_FILE)
            for d in self.created:
                os.rmdir(d)
        except OSError:
            pass  # in use, or not ours to remove: it stays

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


def _move_back_order(names) -> list:
    """Entries to move into the run directory, the one that makes it a run last (current.json;
    config.json in the flat layout), so a kill midway never leaves a partial run looking whole."""
    last = {CURRENT_FILE: 2, CONFIG_FILE: 1}
    return sorted(names, key=lambda n: (last.get(n, 0), n))


def _move(src: Path, dst: Path, names: list) -> None:
    """Move the run entries `names` from src to dst (the run directory and REPLACING_DIR, either
    way), in the order given, so that a reader finds a whole checkpoint at every instant. A
    directory-layout run is found by its current.json (callers move it first out of the run, last
    into it) and is read wherever its checkpoints/ are. A flat-layout checkpoint is several files
    a reader takes from one directory, the first of the run and REPLACING_DIR holding its
    config.json (checkpoint.current_checkpoint), so one by one they would leave it split: they are
    hard-linked into dst first, config.json last, then removed from src, config.json first. A
    move a kill interrupted may find a file in both (the same file, linked): it is removed from
    src. Where the filesystem has no hard links, they are renamed as the other entries are."""
    flat = [n for n in names if n in CHECKPOINT_FILES and (src / n).is_file()
            and not (src / n).is_symlink()]
    linked = []
    for name in sorted(flat, key=lambda n: n == CONFIG_FILE):
        try:
            os.link(src / name, dst / name)
        except FileExistsError:
            if not os.path.samefile(src / name, dst / name):
                continue  # renamed over it below, as any entry
        except OSError:
            break  # no hard links here (EPERM, ENOTSUP, ...): the rest are renamed
        linked.append(name)
    if CONFIG_FILE in linked:
        for name in sorted(linked, key=lambda n: n != CONFIG_FILE):
            os.unlink(src / name)
    else:
        linked = []  # not all linked: each is renamed (over its link in dst, if any)
    for name in names:
        if name in linked:
            continue
        if name in flat and (dst / name).is_file() and os.path.samefile(src / name, dst / name):
            os.unlink(src / name)  # linked before a kill: a rename between links does nothing
        else:
            os.rename(src / name, dst / name)


def _set_aside(path: Path, names: list) -> None:
    """Move the run entries `names` into REPLACED_DIR as one step (module docstring)."""
    aside = path / REPLACING_DIR
    os.mkdir(aside)
    # current.json first: readers then look aside
    _move(path, aside, list(reversed(_move_back_order(names))))
    fsync_dir(aside)
    os.rename(aside, path / REPLACED_DIR)
    fsync_dir(path)


def _settle(path: Path) -> list:
    """Finish what an overwrite left in `path` (its lock held): a replaced run is removed once the
    new run has a checkpoint, and put back otherwise. Returns the names put back.

    Whenever REPLACING_DIR exists, it and the run directory's run entries together are the old run
    (while it is set aside, and while it is put back), so finishing is moving them all back."""
    aside, replaced = path / REPLACING_DIR, path / REPLACED_DIR
    if replaced.is_dir() and not replaced.is_symlink():
        if is_run(path):  # the new run's first checkpoint is current
            shutil.rmtree(replaced)
            return []
        # The new run saved no checkpoint: its files (and what its writes left) go, then the old
        # run comes back.
        leftovers = {n for n in os.listdir(path) if _is_leftover(n)}
        for name in set(run_files(path)) | set(os.listdir(replaced)) | leftovers:
            if os.path.lexists(path / name):
                _remove(path / name)
        os.rename(replaced, aside)
        fsync_dir(path)
    if not aside.is_dir() or aside.is_symlink():
        return []
    names = _move_back_order(os.listdir(aside))
    _move(aside, path, names)
    os.rmdir(aside)
    fsync_dir(path)
    return names


def settle_overwrite(path) -> list:
    """Put back the run an overwrite killed before its new run's first checkpoint was replacing
    (or remove it, if the new run has one), unless another process holds `path`'s lock (it is
    writing there). Changes nothing where no overwrite left anything. Returns the names put back,
    having said so on stderr. Verbs call it before deciding whether `path` holds a run."""
    path = Path(os.fspath(path))
    if not any(os.path.isdir(path / d) for d in (REPLACING_DIR, REPLACED_DIR)):
        return []
    try:
        fd = _lock(path)
    except RunDirError:
        return []  # held: its writer settles it
    run = RunDir(path, fd)
    try:
        return _settle_and_report(run)
    finally:
        run.close()


def _settle_and_report(run: RunDir) -> list:
    try:
        run.restored = _settle(run.path)
    except OSError as e:
        raise RunDirError(f"cannot put back the run in {run.path / REPLACED_DIR}: {e.strerror} "
                          f"({e.filename})") from None
    if run.restored:
        print(f"lmlab: put back the run in {run.path} that an interrupted --overwrite was "
              f"replacing (its new run saved no checkpoint): {', '.join(run.restored)}",
              file=sys.stderr)
    return run.restored


def report_replaced(run: RunDir) -> None:
    """Say on stderr what an overwrite set aside in opening `run`, and where it is kept."""
    if run.replaced:
        print(f"lmlab: --overwrite replaces the run in {run.path} ({', '.join(run.replaced)}); it "
              f"is kept in {run.path / REPLACED_DIR} until the new run's first checkpoint",
              file=sys.stderr)


def check_apart(path, other, what: str = "the run it starts from") -> None:
    """Refuse the output run directory `path` where it is, is inside or holds `other`, a run the
    command reads (`what` names it, as "the run it starts from"): opening it, above all with
    --overwrite, would set aside or write over what the command reads."""
    out, par = Path(path).resolve(), Path(other).resolve()
    if out == par:
        raise RunDirError(f"the output {path} is {what} ({other}); choose a new directory for "
                          "the output")
    if par in out.parents:
        raise RunDirError(f"the output {path} is inside {what} ({other}); choose a directory "
                          "outside it")
    if out in par.parents:
        raise RunDirError(f"{what} ({other}) is inside the output {path}; choose another output "
                          "directory")


def _check_parent(path: Path, parent) -> None:
    check_apart(path, parent)


def _lock(path: Path) -> int:
    lock = path / LOCK_FILE
    while True:
        fd = _lock_file(lock)
        # A writer closing a directory it left empty removes the lock file (RunDir.close): one
        # locked after that is no longer the run's lock, so lock the one there now.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _lock_file(lock: Path) -> int:
    """The lock file opened (created if absent) and flocked: its descriptor, or RunDirError."""
    path = lock.parent
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
    so an unset variable in --run "$RUN" would write a run among whatever files are there.
    Anything but a str or os.PathLike is refused (RunDirError naming what it got), rather than
    left to os.fspath's TypeError, which names neither the run directory nor what it takes."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise RunDirError(f"the run directory must be a path (a str or os.PathLike), got "
                          f"{type(path).__name__}")
    if not os.fspath(path):
        raise RunDirError("the run directory is empty (''): name one (a run in the current "
                          "directory is '.')")
    return Path(os.fspath(path))


def open_run_dir(path, *, resume: bool = False, overwrite: bool = False, parent=None,
                 resumable: bool = True) -> RunDir:
    """Open `path` for writing a run, applying every rule in the module docstring.

    resume: `path` must hold a run to continue. Otherwise an existing run (or files of one, such as
    the metrics of a run that crashed before its first save) is refused unless overwrite=True,
    which sets them aside until the new run's first checkpoint (module docstring) and lists them in
    RunDir.replaced. parent: the run this one starts from.
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
    check_not_transformers(path)
    restored = settle_overwrite(path)
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
    created = []  # what mkdir creates: the run's directory, then its missing parents
    for d in (path, *path.parents):
        if os.path.lexists(d):
            break
        created.append(d)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create the run directory {path}: {e.strerror}") from None
    run = RunDir(path, _lock(path), created)
    try:
        # Settled again under the lock: another writer may have been between the two.
        run.restored = restored + _settle_and_report(run)
        if overwrite:
            if os.path.lexists(path / REPLACED_DIR):  # not a directory: not ours to remove
                raise RunDirError(f"{path / REPLACED_DIR} is in the way of --overwrite, which "
                                  "keeps the run it replaces there; move it away")
            names = run_files(path)
            if names:
                _set_aside(path, names)
            run.replaced = [n + ("/" if n == CHECKPOINTS_DIR else "") for n in names]
        run.clean_leftovers()
    except OSError as e:
        run.close()
        raise RunDirError(f"cannot clean the run directory {path}: {e.strerror} "
                          f"({e.filename})") from None
    except RunDirError:
        run.close()
        raise
    return run
