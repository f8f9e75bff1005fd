"""Durable file writes (atomic replacement of a file, line appends to JSONL files, fsync of files
and directories), and the one reader of JSON that lmlab did not write itself.

`atomic_write*` write into a temporary file in the target's directory, flush and fsync it, and
rename it over the target, so a crash leaves either the old file or the new one, never a torn
one. The temporary file is named ".<name>.<random>.tmp" (TEMP_SUFFIX; atomic_write_file, for
writers that want a file name, keeps the target's suffix after it), so whoever cleans a
directory after a crash can recognise it: the next write of the same file removes those a killed
writer abandoned (remove_abandoned). An OSError (disk full, file too large, permission) comes
out as errors.CheckpointError naming the path and the cause.

`parse_json` is the one reader of JSON that lmlab did not just write (a file a person may have
edited, another tool's file, a request body): whatever is wrong comes out as JSONTextError, a
ValueError whose message the caller prefixes with the file and line.

JSONL files that grow a line at a time (metrics.jsonl, rankings) are appended by append_line: one
whole line per write, under an exclusive flock, then fsync. A kill can still cut a long write short
(the kernel stops it at a page boundary; a full disk stops any), leaving a last line without its
"\n". The one rule both sides share (complete_lines): an unterminated last line that parses as JSON
is a record (another tool's file without a final newline); one that starts as every record lmlab
appends does ("{") but does not parse is a torn write, which readers skip and the next append_line
removes before it writes; anything else is not lmlab's (a text or binary file given by mistake),
which readers keep as a line, to be reported, and append_line refuses to write after.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import stat
import tempfile
import time

import numpy as np

from .errors import CheckpointError

TEMP_SUFFIX = ".tmp"

# A temporary file untouched this long was left by a writer that was killed: a live one writes it
# continuously and renames it within seconds.
ABANDONED_AFTER_S = 3600.0


def write_error(path, exc: OSError) -> CheckpointError:
    """The one-line error for a failed write of `path`."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    return CheckpointError(f"cannot write {os.fspath(path)}: {cause}")


def make_parent_dir(path):
    """Create the folders above `path` (a file or folder about to be written) and return path. A
    failure is the one-line CheckpointError of write_error; a file standing where a folder must be
    is named as such (os.makedirs says "File exists" of it, as if the folder were there)."""
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        check_parent_dir(path)
        raise write_error(path, e) from None
    return path


def check_parent_dir(path) -> None:
    """Refuse `path` when the nearest of the folders above it that exists is not a folder (a file
    named as one: --png out.png/chart.png), creating nothing: make_parent_dir's error, for a
    command to give before its work when it writes the file at the end."""
    above = os.path.dirname(os.path.abspath(os.fspath(path)))
    while not os.path.lexists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise CheckpointError(f"cannot write {os.fspath(path)}: {above} is a file, not a "
                              "directory")


def fsync_dir(directory) -> None:
    """Make renames and creations inside `directory` durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_new_file(path, data) -> None:
    """Create `path` (which must not exist, and is never followed as a symlink), write `data` (bytes,
    or a list of buffers written one after another) and fsync it. For files inside a directory that
    is itself made visible atomically later."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o666)
        with os.fdopen(fd, "wb") as f:
            for chunk in (data if isinstance(data, list) else [data]):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(path, e) from None


def remove_abandoned(directory, prefix: str, suffix: str = TEMP_SUFFIX) -> None:
    """Remove the files in `directory` named prefix...suffix that no writer has touched for
    ABANDONED_AFTER_S: temporary files of killed writes (a cache file of a large corpus leaves one
    as large as itself). Best effort: what cannot be listed or removed stays."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    now = time.time()
    for name in names:
        if name.startswith(prefix) and name.endswith(suffix):
            p = os.path.join(directory, name)
            try:
                if now - os.lstat(p).st_mtime > ABANDONED_AFTER_S:
                    os.unlink(p)
            except OSError:
                pass


def atomic_write(path, write) -> None:
    """Create or replace `path` atomically; `write(f)` writes the content to a binary file object."""
    def fill(fd: int, tmp: str) -> None:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    _replace_atomically(path, TEMP_SUFFIX, fill)


def atomic_write_file(path, write_to) -> None:
    """atomic_write for a writer that wants a file name rather than a file object (matplotlib's
    GIF writer): write_to(tmp) writes the content to a temporary path that keeps path's suffix."""
    def fill(fd: int, tmp: str) -> None:
        os.close(fd)
        write_to(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    _replace_atomically(path, TEMP_SUFFIX + os.path.splitext(os.fspath(path))[1], fill)


def check_replaceable(path) -> None:
    """A rename over a device, FIFO or socket would put a regular file in its place: run as root,
    `--png /dev/null` would have replaced /dev/null for every program on the machine. Such a path
    is refused (a symlink is replaced itself, never what it points to, so it may stand there), by
    every atomic write, and by a command before its work when it writes the file at the end."""
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"cannot write {path}: it is a directory, not a file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise CheckpointError(f"cannot write {path}: it is a device, FIFO or socket, not a "
                              "regular file")


def _replace_atomically(path, suffix: str, fill) -> None:
    """Create a temporary file ".<name>.<random><suffix>" beside path, fill(fd, tmp) it (written
    and synced), rename it over path and sync the directory; on any failure remove it."""
    path = os.fspath(path)
    check_replaceable(path)
    directory = os.path.dirname(os.path.abspath(path))
    prefix = "." + os.path.basename(path) + "."
    remove_abandoned(directory, prefix, suffix)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        fill(fd, tmp)
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise
    fsync_dir(directory)


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def json_default(obj):
    """json.dumps default= for the values lmlab saves: numpy scalars and arrays, paths, dataclasses."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def json_text(obj) -> str:
    return json.dumps(obj, indent=2, default=json_default) + "\n"


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json_text(obj))


class JSONTextError(ValueError):
    """What is wrong with a JSON text, in words, without the file: the reader adds where it was."""


class NotJSON(JSONTextError):
    """The text is not JSON at all (not UTF-8, or not JSON's syntax), rather than JSON that lmlab
    refuses: a reader of lines that may be JSON or plain text takes such a line as text."""


def _no_duplicate_keys(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise JSONTextError(f"the key {key!r} appears twice in one object")
    return obj


def parse_json(data):
    """The value of a JSON text (str, or bytes as UTF-8) that lmlab did not just write itself: a
    file a person may have edited, another tool's file, a request body. Anything Python's json
    would refuse with another exception, or accept with a guess, is JSONTextError naming the
    cause: not UTF-8, not JSON (with the position), nested too deeply for the parser, a number
    too long to convert, or a key given twice in one object (which one was meant?)."""
    try:
        if isinstance(data, (bytes, bytearray)):
            data = data.decode("utf-8")
        return json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError as e:
        raise NotJSON(f"not UTF-8 (byte 0x{e.object[e.start]:02x} at byte offset "
                      f"{e.start})") from None
    except json.JSONDecodeError as e:
        lines = e.doc.rstrip("\n").count("\n") + 1
        where = f"line {e.lineno} column {e.colno}" if lines > 1 else f"column {e.colno}"
        raise NotJSON(f"not valid JSON: {e.msg} ({where})") from None
    except RecursionError:
        raise JSONTextError("JSON nested too deeply") from None
    except JSONTextError:
        raise
    except ValueError:  # an integer past sys.get_int_max_str_digits()
        raise JSONTextError("a number with too many digits") from None


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return True


def _torn(tail: bytes) -> bool:
    """Whether an unterminated last line is a write of append_line cut short: the start of a record
    (each is a JSON object, written from its "{") that does not parse (module docstring)."""
    return tail.startswith(b"{") and not _is_json(tail)


def complete_lines(data: bytes) -> list:
    """The lines of JSONL `data` (bytes, without their "\n"), less a torn last line (module
    docstring); blank lines are kept, for the caller's line numbers."""
    lines = data.split(b"\n")
    last = lines.pop()  # b"" after a final "\n"
    if last.strip() and not _torn(last):
        lines.append(last)
    return lines


def _unterminated_tail(fd: int, size: int) -> bytes:
    """The bytes after the last "\n" of the open file (b"" when it ends with one, or is empty)."""
    tail, pos = b"", size
    while pos > 0:
        n = min(1 << 16, pos)
        pos -= n
        block = os.pread(fd, n, pos)
        cut = block.rfind(b"\n")
        if cut >= 0:
            return block[cut + 1:] + tail
        tail = block + tail
    return tail


def append_line(path, line: bytes, *, follow_links: bool = True) -> None:
    """Append `line` (one whole line, ending with "\n") to the JSONL file `path`, created if missing,
    in one write under an exclusive flock, then fsync it: writers in several processes never
    interleave lines, and a crash or Ctrl-C never loses a line written. A torn last line (module
    docstring) is removed first; a whole one without its "\n" gets it, and a write that fails (disk
    full, file too large) is cut off again. follow_links=False refuses a symbolic link. An OSError
    comes out as CheckpointError naming the file."""
    path = os.fspath(path)
    flags = os.O_RDWR | os.O_CREAT | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            end = os.fstat(fd).st_size
            tail = _unterminated_tail(fd, end)
            if _torn(tail):
                end -= len(tail)
                os.ftruncate(fd, end)
            elif tail and tail.strip() and not _is_json(tail):
                raise CheckpointError(
                    f"{path} ends with a line that is not JSON and was not written by lmlab (no "
                    "final newline), so it is not a JSON-lines file lmlab appends to; nothing was "
                    "written: choose another file")
            elif tail:
                line = b"\n" + line
            start, view = end, memoryview(line)
            try:
                while view:  # a regular file takes the line in one write; loop only on a short write
                    written = os.pwrite(fd, view, end)
                    view, end = view[written:], end + written
                os.fsync(fd)
            except OSError:
                try:  # a write the disk cut short (full, file too large) leaves no torn line
                    os.ftruncate(fd, start)
                except OSError:
                    pass
                raise
        finally:
            os.close(fd)  # closing releases the lock
    except OSError as e:
        raise write_error(path, e) from None
