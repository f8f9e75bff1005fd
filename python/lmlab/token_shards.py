"""Corpora larger than memory: a streaming pass that tokenizes a corpus's files into shard files,
and TokenShards, the memory-mapped array over them that training samples from.

lmlab.data.tokenize_corpus comes here for a corpus of files larger than STREAM_ABOVE_BYTES (or when
asked with stream=True); smaller ones and built-in corpora keep the one-file token cache there.

The pass reads the files in blocks and cuts the text only after a line break ("\\n", or "\\r\\n",
which the text holds as "\\n") with a visible character on both sides (printable ASCII, or a
letter, digit, punctuation mark or symbol of any script: never a space), or, before an indented
line, just before its indentation's last space or tab. There both tokenizers start a new piece (the
char tokenizer anywhere; byte-level BPE's pre-tokenizer makes that lone line break, or the line
break and the indentation but its last space, a piece of its own, and starts " word" after it;
whereas after "\\n\\n", "  \\n" or "\\n  " it would split the whitespace run differently at the end
of a chunk than inside the text, and files are joined by a blank line), so tokenizing chunk by
chunk gives exactly the ids of tokenizing the whole text (tests/test_data_stream.py checks it).
Text over MAX_PENDING_BYTES without such a point is cut at its last line break (or character), the
one place BPE may differ. The text is the text load_corpus gives: files in the same order, UTF-8
with the byte-order mark dropped and "\\r\\n" as "\\n", several files joined by a blank line.
Chunks stay UTF-8 bytes (checked, never decoded where the tokenizer can read bytes): ASCII text
goes from the file to the ids without a Python string.

The ids (uint8 for a byte-table char vocabulary, uint16 when the vocabulary fits, else int32) go to the cache directory's
tokens/stream-KEY/ as shard_NNNNN.bin files of up to SHARD_TOKENS ids, each written atomically,
with manifest.json naming the shards done, their SHA-256 and where in the sources the next one
starts. KEY hashes the tokenizer, the unknown-character policy and each source's path, size and
modification time: a changed source gives a new key, so the corpus is tokenized again (and the
previous pass, which no key can name again, is removed: _remove_dead_passes); an
interrupted pass resumes after its last shard, writing the shards an uninterrupted pass writes
(its reads keep the file's block grid), so their digest does not depend on the interruption.
Memory stays bounded by a few chunks whatever the corpus size. BPE text is split into the pre-tokenizer's pieces and each distinct piece is encoded
once, into a table in C++ (cpp/pieces.h) that splits ASCII text and looks pieces up at tens of
MB/s; `regex` splits the non-ASCII stretches. Chunks are encoded in `workers` processes (BPE; the
char tokenizer's byte-table lookup keeps up with the disk in one). A special token's text in a
corpus is text, as Tokenizer.encode reads it: no corpus can forge a special token.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import sys
import time
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Iterator, Optional

import numpy as np
from tqdm.auto import tqdm

from .data import check_corpus_bytes
from .files import ABANDONED_AFTER_S, atomic_write_bytes, atomic_write_json, remove_abandoned
from .tokenizer import POLICY_HINT, UnrepresentableText

STREAM_ABOVE_BYTES = 64 << 20
FORMAT = "lmlab-token-shards-v1"
READ_BYTES = 4 << 20  # one read of a source file
CHUNK_BYTES = 4 << 20  # the text one worker encodes at a time
MAX_PENDING_BYTES = 64 << 20  # a line longer than this is cut without a safe point
SHARD_TOKENS = 16 << 20  # ids per shard file (what the pass holds before writing one)
_BOM = b"\xef\xbb\xbf"
# Byte-level BPE's pre-tokenizer pattern (GPT-2's, as the `tokenizers` ByteLevel pre-tokenizer uses).
_BYTE_LEVEL_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
_MAX_PIECE_CACHE = 2_000_000  # distinct pieces the table holds before it is emptied
_ADD_BATCH = 16_384  # pieces encoded by `tokenizers` at a time
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
_SAFE_CUT = re.compile(r"(?<=[!-~])\n(?=[!-~])")  # a chunk may be cut just after this line break


# -- reading the sources in safe chunks ----------------------------------------------------------


def _visible(buf: bytes, start: int, end: int) -> bool:
    """Whether buf[start:end] is one character that is no kind of space: printable ASCII, or a
    letter, digit, punctuation mark or symbol (no whitespace, control or format character, in
    any engine's reading of \\s)."""
    if end - start == 1:
        return 0x21 <= buf[start] <= 0x7E
    try:
        char = buf[start:end].decode("utf-8")
    except UnicodeDecodeError:
        return False  # cut short by the buffer's end, or not UTF-8 (reported when decoded)
    return len(char) == 1 and unicodedata.category(char)[0] in "LNPS"


def _last_safe_cut(buf: bytes, lo: int = 0) -> int:
    """Where to cut buf at its last b"\\n" with a visible character (_visible) before it and one
    after it or after its next line's indentation (0 if none): just past the b"\\n", or before an
    indented line, just before its indentation's last space or tab (the pre-tokenizer ends the
    whitespace piece there, at a chunk's end as inside the text, and starts " word" after it).
    A b"\\r\\n" counts as the b"\\n" it is read as, so a file with Windows line endings has cuts
    too; non-ASCII neighbours count, so text in other scripts has cuts too. Line breaks before
    `lo` are not looked at: a caller that looked at them before passes where it stopped."""
    j = len(buf) - 1
    while True:
        j = buf.rfind(b"\n", lo, j)
        if j <= 0:
            return 0
        end = j - 1 if buf[j - 1] == 0x0D else j  # just past the character before the line break
        start = end - 1
        while start > 0 and end - start < 4 and 0x80 <= buf[start] < 0xC0:
            start -= 1  # back to the first byte of a multi-byte character
        if start < 0 or not _visible(buf, start, end):
            continue
        k = j + 1
        while k < len(buf) and buf[k] in b" \t":
            k += 1  # past the next line's indentation
        if k == len(buf):
            continue
        lead = buf[k]
        after = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if _visible(buf, k, k + after):
            return j + 1 if k == j + 1 else k - 1


def _forced_cut(buf: bytes) -> int:
    """Where to cut a buffer with no safe point: after its last line break, else at a character."""
    j = buf.rfind(b"\n") + 1
    if j:
        return j
    j = len(buf) - 1
    while j > 0 and 0x80 <= buf[j] < 0xC0:
        j -= 1  # back to the first byte of the last character, which goes to the next piece
    return j or len(buf)


def _decode(raw: bytes, path: str, base: int) -> bytes:
    """raw (from byte offset base of path) as corpus text: checked to be UTF-8, the byte-order
    mark dropped, "\\r\\n" as "\\n"; still bytes."""
    skip = len(_BOM) if base == 0 and raw.startswith(_BOM) else 0
    body = raw[skip:] if skip else raw
    check_corpus_bytes(body, path, base + skip)
    return body.replace(b"\r\n", b"\n")


def _segments(files: list, start=(0, 0)) -> Iterator[tuple]:
    """(text as UTF-8 bytes, next position, safe) in order: the corpus text from `start` (file
    index, byte offset); a chunk may end after a segment marked safe, and resumes at its next
    position."""
    multi = len(files) > 1
    first, offset = start
    for index in range(first, len(files)):
        path = files[index]
        base = offset if index == first else 0
        pending = b""
        try:
            f = open(path, "rb")
        except OSError as e:
            raise type(e)(e.errno, f"cannot read corpus file ({e.strerror})", path) from None
        with f:
            f.seek(base)
            at = base
            while True:
                # Blocks on the file's READ_BYTES grid, also from a resumed pass's offset: the
                # cuts (so the chunks and shards) are then those of an uninterrupted pass.
                block = f.read(READ_BYTES - at % READ_BYTES)
                if not block:
                    break
                at += len(block)
                pending += block
                # Only the new block's line breaks, and the one just before it (then last, with
                # no byte after it to look at): looking at all of them again for every block was
                # quadratic in a text without a cut (a minute for 70 MB of indented lines).
                cut = _last_safe_cut(pending, max(0, len(pending) - len(block) - 1))
                if not cut and len(pending) > MAX_PENDING_BYTES:
                    cut = _forced_cut(pending)
                if cut:
                    yield _decode(pending[:cut], path, base), (index, base + cut), True
                    base += cut
                    pending = pending[cut:]
        tail = _decode(pending, path, base)
        last = index == len(files) - 1
        if multi:
            ends_with_newline = tail.endswith(b"\n") if tail else base > 0
            tail += (b"" if ends_with_newline else b"\n") + (b"" if last else b"\n")
        yield tail, (index + 1, 0), last  # a join ends in a blank line: never safe


def corpus_chunks(files: list, start=(0, 0), chunk_bytes: Optional[int] = None) -> Iterator[tuple]:
    """(text as UTF-8 bytes, next position): the corpus text in chunks of about chunk_bytes
    (CHUNK_BYTES), each ending where tokenizing may restart (module docstring)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    parts, size = [], 0
    for text, position, safe in _segments(files, start):
        parts.append(text)
        size += len(text)
        if safe and size >= chunk_bytes:
            yield b"".join(parts), position
            parts, size = [], 0
    if parts:
        yield b"".join(parts), (len(files), 0)


def corpus_text_for_tokenizer(files: list) -> Iterator[str]:
    """The corpus text chunk by chunk, to train a tokenizer on without holding it whole."""
    return (text.decode("utf-8") for text, _ in corpus_chunks(files))


# -- encoding chunks -----------------------------------------------------------------------------


class _ChunkEncoder:
    """Token ids of a chunk: the char tokenizer's lookup, or BPE through a table of pieces."""

    def __init__(self, tokenizer_json: str, policy: str):
        from .tokenizer import Tokenizer
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.policy = policy
        self.pattern = None
        pre = json.loads(tokenizer_json).get("pre_tokenizer") or {}
        if (self.tokenizer.kind == "bpe" and pre.get("type") == "ByteLevel"
                and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)):
            import regex
            from . import _core
            self.pattern = regex.compile(_BYTE_LEVEL_PATTERN)
            # Piece -> ids, in C++: it splits ASCII text itself (cpp/pieces.h), and looks up the
            # pieces `regex` cuts from the rest.
            self.table = _core.PieceTable(_ascii_classes(self.pattern))

    def _regions(self, text: str) -> Iterator[tuple]:
        """(start, end, ascii) covering text in order: ASCII stretches, cut at safe points as
        chunks are so each splits as it would inside the whole text, and what lies between."""
        if text.isascii():
            yield 0, len(text), True
            return
        pos, regions = 0, 0
        for run in _NON_ASCII_RUN.finditer(text):
            if run.start() < pos:
                continue
            regions += 1
            if regions > len(text) >> 12:  # mostly non-ASCII: one pass of `regex` is quicker
                yield pos, len(text), False
                return
            lo = run.start()
            while lo > pos:  # back to the safe point at or before the run
                lo = text.rfind("\n", pos, lo)
                if lo < 0:
                    lo = pos
                elif lo + 1 < run.start() and lo > pos and "!" <= text[lo + 1] <= "~" \
                        and "!" <= text[lo - 1] <= "~":
                    lo += 1
                    break
            after = _SAFE_CUT.search(text, run.end())
            hi = after.start() + 1 if after else len(text)
            if lo > pos:
                yield pos, lo, True
            yield lo, hi, False
            pos = hi
        if pos < len(text):
            yield pos, len(text), True

    def _add_pieces(self, pieces: list) -> None:
        """Encodes pieces (UTF-8 bytes) with the BPE and puts them in the table, a batch at a time:
        `tokenizers` returns a heavy object per piece, and a chunk of diverse text can hold a
        million new pieces."""
        tk = self.tokenizer._tk
        encode = getattr(tk, "encode_batch_fast", tk.encode_batch)  # no offsets: tokenizers >= 0.20
        for at in range(0, len(pieces), _ADD_BATCH):
            batch = pieces[at:at + _ADD_BATCH]
            words = [p.decode("utf-8") for p in batch]
            encoded = [e.ids for e in encode(words, add_special_tokens=False)]
            counts = np.fromiter(map(len, encoded), np.int64, count=len(encoded))
            flat = np.fromiter(itertools.chain.from_iterable(encoded), np.int32,
                               count=int(counts.sum()))
            self.table.add(batch, flat, counts)

    def _encode_bpe(self, raw: bytes, lengths: Optional[np.ndarray]) -> np.ndarray:
        ids, missing = self.table.encode(raw, lengths)
        if ids is None:
            if len(self.table) + len(missing) > _MAX_PIECE_CACHE:  # bound memory: start afresh
                self.table.clear()
                _, missing = self.table.encode(raw, lengths)  # now every distinct piece of raw
            self._add_pieces(missing)
            ids, missing = self.table.encode(raw, lengths)
        return ids

    def __call__(self, raw) -> np.ndarray:
        """The ids of a chunk given as UTF-8 bytes (a str is encoded first)."""
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        if self.pattern is None:
            if self.tokenizer.kind == "char":
                # A byte-table vocabulary (< 256 ids) maps the bytes straight to uint8 ids, the
                # shards' width for it.
                fast = self.tokenizer._ids_by_utf8(raw, np.uint8)
                if fast is not None:
                    return fast
            return self.tokenizer.encode(raw.decode("utf-8"), unknown=self.policy)
        if raw.isascii():
            return self._encode_bpe(raw, None)
        text = raw.decode("utf-8")
        parts = []
        for lo, hi, ascii in self._regions(text):
            if ascii:
                parts.append(self._encode_bpe(text[lo:hi].encode("ascii"), None))
            else:
                words = self.pattern.findall(text, lo, hi)
                lengths = np.fromiter((len(w.encode("utf-8")) for w in words), np.int64,
                                      count=len(words))
                parts.append(self._encode_bpe(text[lo:hi].encode("utf-8"), lengths))
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _ascii_classes(pattern) -> bytes:
    """Each ASCII character's class in _BYTE_LEVEL_PATTERN as `pattern` (the `regex` module's)
    sees it: 0 other, 1 letter (\\p{L}), 2 digit (\\p{N}), 3 whitespace (\\s); cpp/pieces.h."""
    import regex
    classes = bytearray(128)
    for c in range(128):
        for value, cls in ((1, r"\p{L}"), (2, r"\p{N}"), (3, r"\s")):
            if regex.fullmatch(cls, chr(c)):
                classes[c] = value
    return bytes(classes)


_ENCODER: Optional[_ChunkEncoder] = None


def _start_worker(tokenizer_json: str, policy: str) -> None:
    global _ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _ENCODER = _ChunkEncoder(tokenizer_json, policy)


def _encode_in_worker(text: str) -> np.ndarray:
    return _ENCODER(text)


def _can_spawn() -> bool:
    """Whether worker processes can start: a spawned worker imports the main script again, which
    is safe for `python -m`, console scripts and scripts guarded by `if __name__ == "__main__"`."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if getattr(main, "__spec__", None) is not None or not path:
        return True
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "__main__" in f.read()
    except OSError:
        return False


def _has_text(raw: bytes) -> bool:
    """Whether a chunk holds anything besides whitespace (whitespace as str.strip sees it)."""
    stripped = raw.strip()  # ASCII whitespace, without decoding
    if not stripped:
        return False
    return bool(stripped[:64].decode("utf-8", "ignore").strip() or stripped.decode("utf-8").strip())


def _encoded(chunks, tokenizer_json: str, policy: str, workers: int):
    """(ids, next position, whether the chunk has text) per chunk, in order, `workers` processes
    encoding."""
    if workers <= 1:
        encoder = _ChunkEncoder(tokenizer_json, policy)
        for text, position in chunks:
            yield encoder(text), position, _has_text(text)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=(tokenizer_json, policy)) as pool:
        queue = collections.deque()
        for text, position in chunks:
            queue.append((pool.submit(_encode_in_worker, text), position, _has_text(text)))
            if len(queue) > 2 * workers:  # bounded: a few chunks in flight
                future, *rest = queue.popleft()
                yield (future.result(), *rest)
        while queue:
            future, *rest = queue.popleft()
            yield (future.result(), *rest)


# -- the shards ----------------------------------------------------------------------------------


class TokenShards:
    """A read-only 1-D array of token ids over memory-mapped shard files: len(), slices (views),
    integer-array indexing (a gather across shards) and np.asarray (a copy) work as on an array."""

    ndim = 1

    def __init__(self, maps: list, digest: str, start: int = 0, stop: Optional[int] = None):
        self._maps = maps
        self._bounds = np.cumsum([0] + [len(m) for m in maps])
        self.digest = digest  # the SHA-256 of the shards: compared across MPI ranks
        self.start = start
        self.stop = int(self._bounds[-1]) if stop is None else stop
        self.dtype = maps[0].dtype if maps else np.dtype("<u2")

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple:
        return (len(self),)

    @property
    def size(self) -> int:
        return len(self)

    def __getitem__(self, key):
        if isinstance(key, slice):
            lo, hi, step = key.indices(len(self))
            if step != 1:
                raise ValueError("TokenShards slices take step 1")
            return TokenShards(self._maps, self.digest, self.start + lo, self.start + max(lo, hi))
        idx = np.asarray(key)
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"TokenShards index must be integers or a slice, got {idx.dtype}")
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"token index out of range for {len(self)} tokens")
        idx = np.where(idx < 0, idx + len(self), idx) + self.start
        shard = np.searchsorted(self._bounds, idx, side="right") - 1
        out = np.empty(idx.shape, self.dtype)
        for s in np.unique(shard):
            where = shard == s
            out[where] = self._maps[s][idx[where] - self._bounds[s]]
        return out if idx.ndim else out[()]

    def __array__(self, dtype=None, copy=None):
        whole = self[np.arange(len(self))]
        return whole if dtype is None else whole.astype(dtype)


def _sources(files: list) -> list:
    out = []
    for path in files:
        st = os.stat(path)
        out.append({"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _remove_dead_passes(tokens_dir: str) -> None:
    """Remove the stream-* folders no pass can find again: those with a source that is no longer
    what their manifest says (another size or modification time, or gone; KEY holds them, so each
    edit of a large corpus left its previous tokenization behind, as large as the corpus), once
    no one has written their manifest for ABANDONED_AFTER_S (a pass writes it after every shard).
    A run still training on such shards keeps reading them: its memory maps outlive the unlink."""
    try:
        names = [n for n in os.listdir(tokens_dir) if n.startswith("stream-")]
    except OSError:
        return
    now = time.time()
    for name in names:
        manifest = os.path.join(tokens_dir, name, "manifest.json")
        try:
            if now - os.stat(manifest).st_mtime <= ABANDONED_AFTER_S:
                continue
            with open(manifest, encoding="utf-8") as f:
                sources = json.load(f)["sources"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue  # no manifest (a pass that wrote no shard: little to free), or unreadable
        if not _sources_changed(sources):
            continue
        shutil.rmtree(os.path.join(tokens_dir, name), ignore_errors=True)


def _sources_changed(sources) -> bool:
    """Whether a manifest's sources are no longer the files they were (False where it cannot
    tell: such a folder is kept)."""
    try:
        return _sources([s["path"] for s in sources]) != sources
    except (FileNotFoundError, NotADirectoryError):
        return True
    except (OSError, KeyError, TypeError):
        return False


def _manifest_of(saved, sources: list, dtype: str) -> bool:
    """Whether `saved` (a manifest.json's value) is a manifest of this pass: its format, sources
    and dtype, and shard entries of the form the pass writes. Anything else (a file damaged or
    edited) is ignored, and the pass starts over, as without one."""
    if not (isinstance(saved, dict) and saved.get("format") == FORMAT
            and saved.get("sources") == sources and saved.get("dtype") == dtype
            and isinstance(saved.get("complete"), bool) and isinstance(saved.get("shards"), list)):
        return False
    return all(isinstance(e, dict) and isinstance(e.get("file"), str) and "/" not in e["file"]
               and isinstance(e.get("tokens"), int) and isinstance(e.get("sha256"), str)
               and isinstance(e.get("next"), list) and len(e["next"]) == 2
               and all(isinstance(n, int) for n in e["next"])
               for e in saved["shards"])


def _shard_ok(path: str, entry: dict, itemsize: int) -> bool:
    try:
        if os.path.getsize(path) != entry["tokens"] * itemsize:
            return False
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        return h.hexdigest() == entry["sha256"]
    except (OSError, KeyError, TypeError):
        return False


def _open(directory: str, manifest: dict) -> TokenShards:
    dtype = np.dtype(manifest["dtype"])
    maps = [np.memmap(os.path.join(directory, s["file"]), dtype=dtype, mode="r",
                      shape=(s["tokens"],)) for s in manifest["shards"] if s["tokens"]]
    digest = hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()
    return TokenShards(maps, digest[:16])


def stream_tokens(files: list, spec: str, tokenizer, cache_root: str, policy: str, *,
                  workers: Optional[int] = None, progress: bool = True,
                  hint: str = POLICY_HINT) -> TokenShards:
    """The token ids of a corpus's files as TokenShards, tokenized here in one streaming pass
    unless its shards are already in cache_root (module docstring); `hint` as in
    data.tokenize_corpus."""
    sources = _sources(files)
    key = hashlib.sha256(json.dumps([FORMAT, tokenizer.to_str(), policy, sources]).encode())
    directory = os.path.join(cache_root, "tokens", "stream-" + key.hexdigest()[:40])
    manifest_path = os.path.join(directory, "manifest.json")
    _remove_dead_passes(os.path.dirname(directory))
    # A pass killed mid-write (kill -9, power loss) leaves a shard's temporary file; each shard
    # is written once, so the next write of it, which sweeps such files, may never come.
    remove_abandoned(directory, ".")
    dtype = ("|u1" if tokenizer.vocab_size <= 1 << 8 else
             "<u2" if tokenizer.vocab_size <= 1 << 16 else "<i4")
    manifest = {"format": FORMAT, "dtype": dtype, "sources": sources, "shards": [],
                "complete": False}
    try:
        with open(manifest_path, encoding="utf-8") as f:
            saved = json.load(f)
        if _manifest_of(saved, sources, dtype):
            manifest = saved
    except (OSError, ValueError, RecursionError):
        pass  # no manifest, or one damaged: the pass starts over
    itemsize = np.dtype(manifest["dtype"]).itemsize
    # Keep the shards that are whole; an interrupted pass resumes after the last of them.
    good = []
    for entry in manifest["shards"]:
        if not _shard_ok(os.path.join(directory, entry["file"]), entry, itemsize):
            break
        good.append(entry)
    if len(good) < len(manifest["shards"]):
        manifest["complete"] = False
    manifest["shards"] = good
    if manifest["complete"]:
        return _open(directory, manifest)
    os.makedirs(directory, exist_ok=True)
    start = tuple(good[-1]["next"]) if good else (0, 0)
    done = sum(s["size"] for s in sources[:start[0]]) + (start[1] if start[0] < len(files) else 0)
    bar = tqdm(total=sum(s["size"] for s in sources), initial=done, unit="B", unit_scale=True,
               desc="tokenizing", disable=not progress, dynamic_ncols=True)
    if workers is None:  # processes pay off for BPE over several chunks (char is I/O bound)
        several = sum(s["size"] for s in sources) > 2 * CHUNK_BYTES
        bpe = tokenizer.kind == "bpe"
        workers = min(4, os.cpu_count() or 1) if several and bpe and _can_spawn() else 1
    parts, count, any_text = [], 0, any(s["tokens"] for s in good)

    def flush(position) -> None:
        nonlocal parts, count
        ids = np.concatenate(parts) if parts else np.zeros(0, manifest["dtype"])
        parts, count = [], 0
        name = f"shard_{len(manifest['shards']):05d}.bin"
        atomic_write_bytes(os.path.join(directory, name), memoryview(ids).cast("B"))
        manifest["shards"].append({"file": name, "tokens": int(ids.size), "next": list(position),
                                   "sha256": hashlib.sha256(memoryview(ids).cast("B")).hexdigest()})
        atomic_write_json(manifest_path, manifest)

    try:
        with bar:
            position = start
            chunks = corpus_chunks(files, start)
            for ids, position, has_text in _encoded(chunks, tokenizer.to_str(), policy, workers):
                parts.append(ids.astype(manifest["dtype"], copy=False))  # held in the shard's width
                count += ids.size
                any_text = any_text or has_text
                bar.update(_bytes_done(sources, position) - bar.n)
                if count >= SHARD_TOKENS:
                    flush(position)
            if not any_text:
                raise ValueError(f"corpus {spec!r} is empty (no text besides whitespace)")
            if parts or not manifest["shards"]:
                flush(position)
    except ValueError as e:
        more = hint if isinstance(e, UnrepresentableText) else ""
        raise ValueError((f"corpus {spec!r}: {e}" if not str(e).startswith("corpus") else str(e))
                         + more) from None
    manifest["complete"] = True
    atomic_write_json(manifest_path, manifest)
    return _open(directory, manifest)


def _bytes_done(sources: list, position) -> int:
    index, offset = position
    return sum(s["size"] for s in sources[:index]) + (offset if index < len(sources) else 0)
