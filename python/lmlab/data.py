"""Training data: text corpora, token caches, train/val split, random batches, the instruct dataset,
and the JSONL reader the instruct and rankings (lmlab.rankings) files share.

Corpus specs (load_corpus):
  a file                    its text
  a directory               every *.txt and *.md below it, recursively (links to folders
                            followed), in sorted path order, skipping hidden files and folders
                            (names starting with ".")
  a glob ("data/*.txt", "books/**/*.md")   the matching files, in sorted order
A file reached by several paths (links, a link loop) is read once, at its first path in that order.
  builtin:NAME              a built-in corpus: shipped (shakespeare) or assembled offline from this
                            Python (see BUILTIN_CORPORA)
Files must be UTF-8 text (a leading byte-order mark is dropped; "\\r\\n" becomes "\\n"; a NUL
byte, or a UTF-16 or UTF-32 byte-order mark, is refused: check_corpus_bytes). A single
file's text is used as it is; several files are joined in order, each ending with a newline, with a
blank line between files.

Instruct data (load_instruct_jsonl), one JSON object per line:
  {"prompt": "...", "response": "..."}
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
roles are "user" and "assistant"; each conversation needs at least one assistant message.

Token caches (tokenize_corpus): a corpus's ids are kept in <cache>/tokens/HASH.int32, HASH naming
the text, the tokenizer and the unknown-character policy, so an edit gives a new file and the old
one could never be named again. tokens/sources/ holds one small record per source (the corpus path,
made absolute, and the tokenizer and policy) saying which cache that source gave last, and the
caches it gave before ("retired", with when). A retired cache is removed by any later tokenization
once no record names it as its current cache (the same text reached by another path, or by this
path again, keeps it) and it has been neither retired nor written for TOKEN_CACHE_GRACE_S (a run
that read the text just before the edit may still be about to open it). A record whose source names
nothing now (the file or folder deleted or moved away, a glob that matches no file) is removed once
untouched for TOKEN_CACHE_GRACE_S, its current cache retired with it: the caches it named go as
retired ones do, unless another path or a built-in corpus gives them (a source that comes back is
tokenized again). No other cache is ever removed: a file no record retired (another version's
cache, a file of the user's) stays. A damaged record (cut short, edited by hand: JSON that is not a
record of this format) retires nothing but keeps each cache whose name its bytes hold, as it may be
another path's claim; its source's next tokenization replaces it, and once untouched for
TOKEN_CACHE_GRACE_S it is removed. A record of another format (another lmlab version's) is left
alone and keeps what it names; one that cannot be read at all (permission) stops all removal, since
it may name any cache. A run that has the cache mapped keeps reading it after the unlink. A
built-in corpus's text is assembled by the Python that runs it, and installations sharing a cache
may each need theirs: each text it gives has a record of its own, which never retires it. Records
and caches are replaced atomically, so a kill leaves either the old or the new one, and a temporary
file that the cleanup removes once abandoned (files.remove_abandoned): at worst a retirement is
lost and its file stays. Two runs of one path racing an edit (one read the text before it, one
after) may leave the record naming the older cache; the newer is then retired, and if no run uses
the path within the grace period, the next one tokenizes it again: time lost, never wrong ids. Two
runs cleaning at once skip what the other removed first.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import math
import os
import re
import stat
import sys
import time

import numpy as np

from . import distributed
from .builtin_corpus import BUILTIN_CORPORA, build_builtin, cache_dir as default_cache_dir
from .errors import CheckpointError
from .files import (ABANDONED_AFTER_S, JSONTextError, atomic_write_bytes, atomic_write_json,
                    complete_lines, parse_json, remove_abandoned)
from .tokenizer import POLICY_HINT, UnrepresentableText

__all__ = [
    "BUILTIN_CORPORA", "load_corpus", "corpus_fingerprint", "tokenize_corpus", "split_tokens", "BatchSampler",
    "load_instruct_jsonl", "read_jsonl_objects", "need_str", "need_regular_file",
]

CORPUS_SUFFIXES = (".txt", ".md")
_TOKENS_FORMAT = b"lmlab-tokens-v2"
# A token cache file: magic, the id count (uint64) and the ids' SHA-256, padded to 64 bytes, then
# the ids as little-endian int32.
_TOKENS_MAGIC = b"LMLABTOK"
_TOKENS_HEADER = 64
_CACHE_NAME = re.compile(r"[0-9a-f]{40}\.int32")
_CACHE_NAME_BYTES = re.compile(_CACHE_NAME.pattern.encode("ascii"))
_SOURCE_FORMAT = "lmlab-token-source-v1"
_SOURCE_RECORD_NAME = re.compile(r"[0-9a-f]{40}\.json")
# How long a retired token cache stays after it was retired or last written (module docstring).
TOKEN_CACHE_GRACE_S = ABANDONED_AFTER_S
_ROLES = ("user", "assistant")


# -- corpora ------------------------------------------------------------------------------------


_WIDE_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
               (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def check_corpus_bytes(raw: bytes, path: str, base: int = 0) -> None:
    """Refuse a stretch of a corpus file that is not UTF-8 text, naming what it is and how to
    convert it: raw is the file's bytes from byte offset `base` (past a UTF-8 byte-order mark).
    A UTF-16 or UTF-32 file is named by its byte-order mark; a NUL byte, which no text holds, marks
    one without it (its ASCII would read as UTF-8 with a NUL after each character) or a binary file."""
    if base == 0:
        for bom, encoding in _WIDE_BOMS:
            if raw.startswith(bom):
                raise ValueError(f"{path} is {encoding} text (it starts with a {encoding} byte-order "
                                 f"mark), not UTF-8: convert it to UTF-8 first (e.g. iconv -f "
                                 f"{encoding.lower()} -t utf-8)")
    nul = raw.find(b"\0")
    before = raw[:nul] if nul >= 0 else raw  # the first problem is the one named
    if not before.isascii():
        try:
            before.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset "
                f"{base + e.start} ({e.reason}); convert it to UTF-8 first (e.g. iconv -f latin1 "
                "-t utf-8)") from None
    if nul >= 0:
        raise ValueError(f"{path} is not UTF-8 text: it holds a NUL byte at byte offset {base + nul} "
                         "(a binary file, or UTF-16 or UTF-32 without a byte-order mark, which "
                         "iconv -f utf-16 -t utf-8 converts)")


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise type(e)(e.errno, f"cannot read corpus file ({e.strerror})", path) from None
    base = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    data = data[base:]
    check_corpus_bytes(data, path, base)
    return data.decode("utf-8").replace("\r\n", "\n")


def _walk_error(e: OSError) -> None:
    """os.walk's onerror: a folder of the corpus that cannot be listed is an error, not a folder
    skipped in silence (the model would train on part of the corpus)."""
    raise type(e)(e.errno, f"cannot list corpus folder ({e.strerror})", e.filename) from None


def need_regular_file(path: str, what: str, expected: str = "a file") -> str:
    """path, which must name a regular file (symlinks followed); otherwise one line naming `what`,
    the path and what was `expected`: missing, a directory, or a FIFO, device or socket (whose
    read would wait forever or never end)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found: expected {expected}") from None
    except OSError as e:
        raise type(e)(e.errno, f"cannot read {what} ({e.strerror})", path) from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{what} {path} is a directory: expected {expected}")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {path} is not a regular file (a FIFO, device or socket): "
                         f"expected {expected}")
    return path


def _corpus_files(spec: str) -> list:
    """The files of a corpus spec, each a regular file: a FIFO, device or socket among them,
    named or inside a folder, is refused before anything is read."""
    if os.path.isdir(spec):
        files, seen = [], set()
        for root, dirs, names in os.walk(spec, onerror=_walk_error, followlinks=True):
            if os.path.realpath(root) in seen:  # a link loop, or a second link to a folder
                dirs[:] = []
                continue
            seen.add(os.path.realpath(root))
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files.extend(os.path.join(root, n) for n in names
                         if not n.startswith(".") and n.lower().endswith(CORPUS_SUFFIXES))
        files.sort(key=lambda p: os.path.relpath(p, spec).split(os.sep))
        if not files:
            raise ValueError(f"corpus directory {spec} contains no {' or '.join(CORPUS_SUFFIXES)} files")
    elif os.path.lexists(spec):
        files = [spec]
    elif glob.has_magic(spec):
        files = sorted(f for f in glob.glob(spec, recursive=True) if not os.path.isdir(f))
        if not files:
            raise FileNotFoundError(f"no files match the corpus glob {spec!r}")
    else:
        files = None
    if files is not None:
        files = [need_regular_file(path, "corpus file") for path in files]
        # A glob's ** follows a link loop until the system refuses: one file, dozens of times.
        unique = {}
        for path in files:
            unique.setdefault(os.path.realpath(path), path)
        return list(unique.values())
    known = ", ".join(f"builtin:{k}" for k in sorted(BUILTIN_CORPORA))
    raise FileNotFoundError(f"corpus {spec!r} not found: no such file or directory, and not a glob or "
                            f"builtin:NAME (built-in corpora: {known})")


def load_corpus(spec, *, cache_dir=None) -> str:
    """The text of a corpus spec (see the module docstring)."""
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"corpus spec must be a str or path, got {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec.startswith("builtin:"):
        text = build_builtin(spec[len("builtin:"):], cache_dir)
    else:
        parts = [_read_text(path) for path in _corpus_files(spec)]
        if len(parts) > 1:
            parts = [t if t.endswith("\n") else t + "\n" for t in parts]
        text = "\n".join(parts)
    if not text.strip():
        raise ValueError(f"corpus {spec!r} is empty (no text besides whitespace)")
    return text


def corpus_fingerprint(spec, *, cache_dir=None) -> str:
    """A short SHA-256 of a corpus spec's files (read in blocks: any size), or of a built-in's
    text: the same on every machine that holds the same corpus."""
    spec = os.fspath(spec)
    h = hashlib.sha256()
    if spec.startswith("builtin:"):
        h.update(load_corpus(spec, cache_dir=cache_dir).encode("utf-8"))
    else:
        for path in _corpus_files(spec):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            h.update(b"\0")
    return h.hexdigest()[:16]


def tokenize_corpus(spec, tokenizer, cache_dir=None, *, unknown: str | None = None,
                    stream: bool | None = None, progress: bool = True, hint: str = POLICY_HINT):
    """Token ids of a corpus as a read-only memory-mapped int32 array.

    A corpus of files larger than token_shards.STREAM_ABOVE_BYTES (or any, with stream=True) is
    tokenized in a streaming pass with bounded memory into shard files instead, and comes back as
    a token_shards.TokenShards (same ids, used like the array; `progress` shows the pass's bar):
    see lmlab.token_shards for its cache and resume rules.

    The ids are cached in `cache_dir` (default $LMLAB_CACHE or ~/.cache/lmlab) under tokens/, in a
    file named by a hash of the corpus text, the tokenizer.json and the unknown-character policy:
    the second call with the same inputs reads the cache, and any change to the text or the
    tokenizer tokenises afresh. The cache a corpus path gave before an edit, or before the corpus
    was deleted, is removed by a later call once no path (or built-in corpus) gives it any more
    and TOKEN_CACHE_GRACE_S has passed since (the rule, and what is never removed: the module
    docstring). A cache file that is
    truncated, damaged or of another format (its header's count and SHA-256 do not match its ids)
    is rebuilt; a cache that cannot be written (disk full, permission) is skipped with a note.
    `unknown` ("error", "replace", "skip") overrides the tokenizer's policy for characters it
    cannot represent; `hint` is what the error for such characters adds (by default, how to
    choose a policy).
    """
    policy = unknown if unknown is not None else tokenizer.unknown
    files = _stream_files(spec, stream)
    if files:
        from .token_shards import stream_tokens
        root = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
        return stream_tokens(files, os.fspath(spec), tokenizer, root, policy, progress=progress,
                             hint=hint)
    text = load_corpus(spec, cache_dir=cache_dir)
    tokenizer_text = tokenizer.to_str()
    h = hashlib.sha256(_TOKENS_FORMAT + b"\0")
    h.update(tokenizer_text.encode("utf-8") + b"\0" + policy.encode("utf-8") + b"\0")
    h.update(text.encode("utf-8", "surrogatepass"))
    root = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    path = os.path.join(root, "tokens", h.hexdigest()[:40] + ".int32")
    # A write killed before its rename leaves a temporary file as large as the cache; once this
    # one is written it is only read, so its next write, which would sweep those, never comes.
    remove_abandoned(os.path.dirname(path), ".")
    cached = _read_token_cache(path)
    if cached is not None:
        _record_source(os.path.dirname(path), spec, tokenizer_text, policy, os.path.basename(path))
        return cached
    try:
        ids = tokenizer.encode(text, unknown=policy)
    except UnrepresentableText as e:
        raise ValueError(f"corpus {os.fspath(spec)!r}: {e}{hint}") from None
    except ValueError as e:
        raise ValueError(f"corpus {os.fspath(spec)!r}: {e}") from None
    if ids.size == 0:
        raise ValueError(f"corpus {os.fspath(spec)!r} gives no tokens")
    payload = np.ascontiguousarray(ids, dtype="<i4")
    header = (_TOKENS_MAGIC + len(payload).to_bytes(8, "little") + hashlib.sha256(payload).digest())
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_bytes(path, header.ljust(_TOKENS_HEADER, b"\0") + payload.tobytes())
    except (OSError, CheckpointError) as e:
        print(f"lmlab: not caching the tokens of {os.fspath(spec)!r} ({e})", file=sys.stderr)
        payload.flags.writeable = False
        return payload
    written = _read_token_cache(path)
    if written is None:  # removed or replaced since the rename by another process: ours is right
        payload.flags.writeable = False
        return payload
    _record_source(os.path.dirname(path), spec, tokenizer_text, policy, os.path.basename(path))
    return written


def _record_source(tokens_dir: str, spec, tokenizer_text: str, policy: str,
                   cache_name: str) -> None:
    """Note in tokens/sources/ that `spec` (under this tokenizer and policy) now gives cache_name,
    retiring the cache it gave before, then remove the retired caches no source gives any more
    (module docstring). Best effort: a record that cannot be written only keeps files longer."""
    spec = os.fspath(spec)
    if spec.startswith("builtin:"):
        # One record per text a built-in gives (the Python assembling it may differ between
        # installations sharing this cache): such a record never moves, so never retires.
        source, which = spec, cache_name
    else:
        source, which = os.path.abspath(spec), ""
    key = hashlib.sha256("\0".join((_SOURCE_FORMAT, tokenizer_text, policy, source, which))
                         .encode("utf-8", "surrogatepass")).hexdigest()[:40]
    record_path = os.path.join(tokens_dir, "sources", key + ".json")
    now = time.time()
    try:
        previous = _read_source_record(record_path)
    except (_UnusableRecord, OSError):
        previous = None  # damaged or unreadable: this write replaces it
    retired = dict(previous["retired"]) if previous else {}
    if previous and previous["cache"] != cache_name:
        retired[previous["cache"]] = now
    retired.pop(cache_name, None)  # this source gives it again
    retired = {name: since for name, since in retired.items()
               if os.path.exists(os.path.join(tokens_dir, name))}
    if previous is None or previous["cache"] != cache_name or previous["retired"] != retired:
        record = {"format": _SOURCE_FORMAT, "source": source, "cache": cache_name,
                  "retired": [{"cache": name, "since": since}
                              for name, since in sorted(retired.items())]}
        try:
            os.makedirs(os.path.dirname(record_path), exist_ok=True)
            atomic_write_json(record_path, record)
        except (OSError, CheckpointError):
            return  # our claim on cache_name is not on disk: remove nothing this time
    _remove_stale_records_and_caches(tokens_dir, now)


class _UnusableRecord(ValueError):
    """A file in tokens/sources/ that is not a source record this version can use. `names`: the
    cache names its bytes mention, which it may still give; `foreign`: a record of another format
    (another lmlab version's), left alone, where any other is damaged (module docstring)."""

    def __init__(self, message: str, names: set, foreign: bool):
        super().__init__(message)
        self.names, self.foreign = names, foreign


def _read_source_record(path: str):
    """A source record as {"source": path or builtin:NAME, "cache": name, "retired": {name:
    since}}, or None when there is none; _UnusableRecord when it is damaged or another format's,
    OSError when it cannot be read."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    names = {m.decode("ascii") for m in _CACHE_NAME_BYTES.findall(raw)}
    try:
        saved = parse_json(raw)
    except JSONTextError as e:
        raise _UnusableRecord(f"{path}: {e}", names, foreign=False) from None
    if isinstance(saved, dict) and isinstance(saved.get("format"), str) \
            and saved["format"] != _SOURCE_FORMAT:
        raise _UnusableRecord(f"{path} is a record of another format ({saved['format']})", names,
                             foreign=True)
    entries = saved.get("retired") if isinstance(saved, dict) else None
    if not (isinstance(saved, dict) and isinstance(saved.get("source"), str)
            and _is_cache_name(saved.get("cache")) and isinstance(entries, list)
            and all(isinstance(e, dict) and _is_cache_name(e.get("cache"))
                    and _is_time(e.get("since")) for e in entries)):
        raise _UnusableRecord(f"{path} is not a token source record", names, foreign=False)
    return {"source": saved["source"], "cache": saved["cache"],
            "retired": {e["cache"]: float(e["since"]) for e in entries}}


def _is_time(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (a hand-edited record)
        return False


def _is_cache_name(name) -> bool:
    # A record names a file beside it, never a path: an edited record cannot reach other files.
    return isinstance(name, str) and _CACHE_NAME.fullmatch(name) is not None


def _remove_stale_records_and_caches(tokens_dir: str, now: float) -> None:
    """Remove the source records untouched for TOKEN_CACHE_GRACE_S that are damaged or whose
    source is gone, then each cache some valid record retired (or a removed record named) that no
    record names now, once it has been neither retired nor written for TOKEN_CACHE_GRACE_S
    (module docstring). A run that has it mapped keeps reading it. Another process may be doing
    the same: a file gone between the listing and its use is skipped."""
    records_dir = os.path.join(tokens_dir, "sources")
    # A killed write of a record its source never writes again (deleted) leaves its temporary file.
    remove_abandoned(records_dir, ".")
    try:
        names = [n for n in os.listdir(records_dir) if _SOURCE_RECORD_NAME.fullmatch(n)]
    except OSError:
        return
    current, retired_at = set(), {}
    for name in names:
        path = os.path.join(records_dir, name)
        try:
            seen = os.stat(path)
            old = now - seen.st_mtime >= TOKEN_CACHE_GRACE_S  # no run may be about to use it
            record = _read_source_record(path)
        except FileNotFoundError:
            continue  # removed since the listing
        except OSError:
            return  # it may give any cache: remove none until it can be read or is gone
        except _UnusableRecord as e:
            if e.foreign or not (old and _remove_if_unchanged(path, seen)):
                current.update(e.names)  # it may still give them
            continue
        if record is None:
            continue
        if old and _source_gone(record["source"]) and _remove_if_unchanged(path, seen):
            # No run can read its source now: the cache it gave last is retired with the record.
            retiring = {**record["retired"], record["cache"]: seen.st_mtime}
        else:
            current.add(record["cache"])
            retiring = record["retired"]
        for cache, since in retiring.items():
            retired_at[cache] = max(since, retired_at.get(cache, since))
    for cache, since in retired_at.items():
        if cache in current:
            continue
        path = os.path.join(tokens_dir, cache)
        try:
            if now - max(since, os.stat(path).st_mtime) >= TOKEN_CACHE_GRACE_S:
                os.unlink(path)
        except OSError:
            pass  # gone already, or not ours to remove


def _source_gone(source: str) -> bool:
    """Whether a record's source names nothing now: its path deleted or moved away, or a glob
    that matches no file. A built-in corpus, or a path that cannot be checked (permission), is
    not gone."""
    if source.startswith("builtin:"):
        return False
    try:
        os.lstat(source)
        return False
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError:
        return False
    return not (glob.has_magic(source) and next(glob.iglob(source, recursive=True), None))


def _remove_if_unchanged(path: str, seen: os.stat_result) -> bool:
    """Remove the file `path` if it is still the file `seen` was taken of (not replaced since by
    another process's write); whether it is gone now."""
    try:
        st = os.stat(path)
        if (st.st_ino, st.st_mtime_ns) != (seen.st_ino, seen.st_mtime_ns):
            return False
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _stream_files(spec, stream) -> list:
    """The files of a corpus to tokenize in a streaming pass ([] for the in-memory path)."""
    if stream is False or str(os.fspath(spec)).startswith("builtin:"):
        return []
    from .token_shards import STREAM_ABOVE_BYTES
    files = _corpus_files(os.fspath(spec))
    if stream or sum(os.path.getsize(f) for f in files) > STREAM_ABOVE_BYTES:
        return files
    return []


def corpus_files_if_large(spec) -> list:
    """The files of a corpus too large to read whole ([] otherwise): train its tokenizer on
    token_shards.corpus_text_for_tokenizer(files) instead of load_corpus."""
    return _stream_files(spec, None)


def _read_token_cache(path: str):
    """The ids of a token cache file, or None when it is missing, stale or damaged."""
    try:
        size = os.path.getsize(path)
        if size <= _TOKENS_HEADER:
            return None
        with open(path, "rb") as f:
            head = f.read(_TOKENS_HEADER)
        count = int.from_bytes(head[8:16], "little")
        if head[:8] != _TOKENS_MAGIC or size != _TOKENS_HEADER + 4 * count:
            return None
        ids = np.memmap(path, dtype="<i4", mode="r", offset=_TOKENS_HEADER, shape=(count,))
    except (OSError, ValueError):
        return None
    return ids if hashlib.sha256(ids).digest() == head[16:48] else None


def split_tokens(tokens, val_fraction: float = 0.1):
    """(train, val): the first 1 - val_fraction of the tokens and the last val_fraction (views)."""
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = len(tokens)
    n_val = int(round(n * val_fraction))
    return tokens[: n - n_val], tokens[n - n_val:]


class BatchSampler:
    """Random (B, T) windows of a token array: x = tokens[i:i+T], y = tokens[i+1:i+T+1].

    Window starts are drawn uniformly from a numpy Generator seeded with `seed`. state_dict()
    captures the generator's exact state, so a sampler restored with load_state_dict draws the same
    batches an uninterrupted one would.
    """

    def __init__(self, tokens, batch_size: int, block_size: int, seed: int):
        for name, v in (("batch_size", batch_size), ("block_size", block_size)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        from .token_shards import TokenShards  # a streamed corpus: sampled in place
        if not isinstance(tokens, (np.ndarray, TokenShards)):
            tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
        if len(tokens) < block_size + 1:
            raise ValueError(f"the token array has {len(tokens)} tokens, but block_size={block_size} needs at "
                             f"least {block_size + 1} (a window plus its next token); use more text or a "
                             f"smaller block_size")
        self.tokens = tokens
        self.batch_size = int(batch_size)
        self.block_size = int(block_size)
        self.seed = int(seed)
        self.batches_drawn = 0
        self._rng = np.random.default_rng(self.seed)
        self._offsets = np.arange(self.block_size + 1)

    def next(self):
        """x, y: int32 arrays of shape (batch_size, block_size)."""
        starts = self._rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        windows = np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int32)
        self.batches_drawn += 1
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    __next__ = next

    def skip(self) -> None:
        """Step past one batch: the generator moves exactly as next() moves it."""
        self._rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        self.batches_drawn += 1

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        """JSON-serialisable state: the generator state and the batch count, plus the shape checks."""
        return {
            "seed": self.seed, "batch_size": self.batch_size, "block_size": self.block_size,
            "n_tokens": int(len(self.tokens)), "batches_drawn": self.batches_drawn,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, d: dict) -> None:
        """Continue from a saved state: the generator and the batch count. The batch shape must
        match; the token count need not (n_tokens is recorded, not checked): a corpus edited since
        the checkpoint is drawn from as it is now, from the same generator, and lmlab.train notes
        the change by the data's hash."""
        if not isinstance(d, dict) or "rng" not in d:
            raise ValueError("not a BatchSampler state dict (no 'rng' entry)")
        mine = {"batch_size": self.batch_size, "block_size": self.block_size}
        for key, value in mine.items():
            if d.get(key) != value:
                raise ValueError(f"sampler state was saved with {key}={d.get(key)!r}, this sampler has {value}; "
                                 f"resume with the same batch shape")
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = d["rng"]
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"invalid sampler RNG state: {e}") from None
        self._rng = rng
        self.seed = int(d.get("seed", self.seed))
        self.batches_drawn = int(d.get("batches_drawn", 0))


# -- JSONL datasets -----------------------------------------------------------------------------


def read_jsonl_objects(path, *, appended: bool = False, allow_empty: bool = False):
    """(path, [(line number, object), ...]) of a JSONL file of objects; errors name the line.

    appended: a file lmlab appends to a line at a time (rankings, by files.append_line), whose
    torn last line, left by an interrupted append, is skipped (files.complete_lines) with a note.
    allow_empty: a file with no record gives [] instead of an error."""
    path = need_regular_file(os.fspath(path), "JSONL file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise type(e)(e.errno, f"cannot read JSONL file ({e.strerror})", path) from None
    lines = complete_lines(data) if appended else data.split(b"\n")
    cut_short = len(lines) == data.count(b"\n") and data[data.rfind(b"\n") + 1:].strip()
    if cut_short and distributed.world().is_root:  # under mpiexec every rank reads it; one says so
        print(f"lmlab: note: the last line of {path} is cut short (an append interrupted by a "
              "kill or a full disk) and is skipped; the next append to the file removes it",
              file=sys.stderr)
    records = []
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
        if not line.strip():
            continue
        if lineno == 1:
            line = line.removeprefix("\ufeff")  # the byte-order mark some editors put first
        try:
            obj = parse_json(line)
        except JSONTextError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append((lineno, obj))
    if not records and not allow_empty:
        raise ValueError(f"{path} contains no records")
    return path, records


def need_str(obj: dict, key: str, where: str) -> str:
    """obj[key], which must be a string; the error names where the object came from."""
    v = obj[key]
    if not isinstance(v, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(v).__name__}")
    return v


def load_instruct_jsonl(path, *, line_numbers: bool = False):
    """Conversations from an instruct JSONL file: a list of [{"role", "content"}, ...] lists; with
    line_numbers, (conversations, the file line of each)."""
    path, records = read_jsonl_objects(path)
    out = []
    for lineno, obj in records:
        where = f"{path}:{lineno}"
        if "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not msgs:
                raise ValueError(f"{where}: 'messages' must be a non-empty list")
            conv = []
            for j, m in enumerate(msgs):
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise ValueError(f"{where}: messages[{j}] must be an object with 'role' and 'content'")
                if m["role"] not in _ROLES:
                    raise ValueError(f"{where}: messages[{j}] has role {m['role']!r}; expected one of {_ROLES}")
                conv.append({"role": m["role"], "content": need_str(m, "content", f"{where}: messages[{j}]")})
            if not any(m["role"] == "assistant" for m in conv):
                raise ValueError(f"{where}: the conversation has no assistant message, so nothing to learn")
        elif "prompt" in obj and "response" in obj:
            conv = [{"role": "user", "content": need_str(obj, "prompt", where)},
                    {"role": "assistant", "content": need_str(obj, "response", where)}]
        else:
            raise ValueError(f"{where}: expected keys 'prompt' and 'response', or 'messages'; "
                             f"got {sorted(obj)}")
        out.append(conv)
    if line_numbers:
        return out, [lineno for lineno, _ in records]
    return out
