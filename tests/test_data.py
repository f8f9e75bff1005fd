"""Corpora, built-in corpora, the token cache, the split, the batch sampler and the JSONL loaders."""

import json
import os
import socket
import time

import numpy as np
import pytest

from lmlab import builtin_corpus, data
from lmlab.data import (BatchSampler, load_corpus, load_instruct_jsonl,
                        split_tokens, tokenize_corpus)
from lmlab.tokenizer import train_tokenizer


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # No test may read or write the user's real cache.
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def docs_cache(tmp_path_factory):
    """A cache dir holding builtin:python-docs, built once for this module."""
    root = tmp_path_factory.mktemp("docs-cache")
    builtin_corpus.build_builtin("python-docs", str(root))
    return str(root)


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


# -- corpus specs ---------------------------------------------------------------------------------


def test_load_corpus_file(tmp_path):
    p = _write(tmp_path / "a.txt", "\ufeffline one\r\nline two")
    assert load_corpus(str(p)) == "line one\nline two"  # BOM dropped, CRLF -> LF, no newline added
    assert load_corpus(p) == "line one\nline two"  # a Path works too


def test_load_corpus_directory_sorted_recursive_txt_md_only(tmp_path):
    root = tmp_path / "corpus"
    _write(root / "b.txt", "B")
    _write(root / "a.md", "A\n")
    _write(root / "sub" / "c.txt", "C")
    _write(root / "sub" / "skip.py", "not text")
    _write(root / ".hidden.txt", "hidden")
    _write(root / ".git" / "d.txt", "hidden dir")
    _write(root / "a0" / "z.txt", "Z")
    # Sorted by relative path: a.md, a0/z.txt, b.txt, sub/c.txt; each ends with "\n", blank line between.
    assert load_corpus(str(root)) == "A\n\nZ\n\nB\n\nC\n"


def test_load_corpus_glob(tmp_path):
    _write(tmp_path / "x1.txt", "one")
    _write(tmp_path / "x2.txt", "two")
    _write(tmp_path / "y.txt", "why")
    _write(tmp_path / "deep" / "x3.txt", "three")
    assert load_corpus(str(tmp_path / "x*.txt")) == "one\n\ntwo\n"
    assert load_corpus(str(tmp_path / "**" / "x*.txt")) == "three\n\none\n\ntwo\n"
    with pytest.raises(FileNotFoundError, match="no files match"):
        load_corpus(str(tmp_path / "nothing*.txt"))


def test_load_corpus_follows_links_to_folders_and_reads_each_file_once(tmp_path):
    # A linked folder was skipped by a folder spec (part of the corpus, silently) while a glob
    # read it; a link loop made a glob's ** read one file dozens of times.
    _write(tmp_path / "elsewhere" / "b.txt", "linked")
    _write(tmp_path / "c" / "a.txt", "top")
    (tmp_path / "c" / "books").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "c" / "again").symlink_to(tmp_path / "elsewhere")  # the same files, once
    (tmp_path / "c" / "loop").symlink_to(tmp_path / "c")
    assert load_corpus(str(tmp_path / "c")) == "top\n\nlinked\n"
    assert load_corpus(str(tmp_path / "c" / "**" / "*.txt")) == "top\n\nlinked\n"


def test_load_corpus_missing_names_the_spec_and_builtins(tmp_path):
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError) as e:
        load_corpus(missing)
    assert missing in str(e.value) and "builtin:python-docs" in str(e.value)


@pytest.mark.parametrize("content", ["", "   \n\n\t  "])
def test_load_corpus_empty(tmp_path, content):
    p = _write(tmp_path / "empty.txt", content)
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(str(p))


def test_load_corpus_empty_directory(tmp_path):
    _write(tmp_path / "d" / "notes.py", "x = 1")
    with pytest.raises(ValueError, match=r"contains no \.txt or \.md files"):
        load_corpus(str(tmp_path / "d"))


def test_load_corpus_non_utf8_names_file_and_offset(tmp_path):
    p = _write(tmp_path / "latin1.txt", "caf\u00e9 ok".encode("utf-8") + b" na\xefve")
    with pytest.raises(ValueError) as e:
        load_corpus(str(p))
    msg = str(e.value)
    assert str(p) in msg and "byte 0xef at byte offset 11" in msg


def test_load_corpus_unreadable_file(tmp_path, monkeypatch):
    p = _write(tmp_path / "locked.txt", "secret")
    real_open = open

    def deny(path, *a, **k):
        if os.fspath(path) == str(p):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    # data.open shadows the builtin inside lmlab.data only (running as root defeats chmod 000).
    monkeypatch.setattr(data, "open", deny, raising=False)
    with pytest.raises(PermissionError) as e:
        load_corpus(str(p))
    assert "cannot read corpus file" in str(e.value) and str(p) in str(e.value)


def test_load_corpus_refuses_a_device_or_fifo_inside_a_folder_or_glob(tmp_path):
    # A FIFO among a folder's files blocked the read forever, /dev/zero never ended, a socket
    # failed or was skipped in silence (a glob): each is refused by name before anything is read.
    # The test uses a socket, which fails without hanging.
    _write(tmp_path / "d" / "a.txt", "some text")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "d" / "z.txt"))
    sock.close()
    for spec in (tmp_path / "d", tmp_path / "d" / "*.txt"):
        with pytest.raises(ValueError, match=r"corpus file .*z\.txt is not a regular file"):
            load_corpus(str(spec))
    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(ValueError, match=r"fifo\.txt is not a regular file"):
        load_corpus(str(tmp_path / "fifo.txt"))


def test_load_corpus_refuses_a_folder_it_cannot_list(tmp_path, monkeypatch):
    # os.walk skips a folder it cannot list unless told otherwise: the model trained on part of
    # the corpus without a word (running as root defeats chmod 000, hence the patched scandir).
    _write(tmp_path / "d" / "a.txt", "some text")
    _write(tmp_path / "d" / "locked" / "b.txt", "more text")
    locked = str(tmp_path / "d" / "locked")
    real_scandir = os.scandir

    def deny(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", deny)
    with pytest.raises(PermissionError, match=r"cannot list corpus folder \(Permission denied\)"
                                              r".*locked"):
        load_corpus(str(tmp_path / "d"))


def test_unknown_builtin_lists_known():
    with pytest.raises(ValueError) as e:
        load_corpus("builtin:milton")
    assert "'milton'" in str(e.value)
    for name in data.BUILTIN_CORPORA:
        assert f"builtin:{name}" in str(e.value)


def test_builtin_shakespeare_ships_with_the_package():
    """No download and no ../shared: the text is package data, read as stored."""
    text = load_corpus("builtin:shakespeare")
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert text.count("ROMEO") > 100


def test_bad_spec_type():
    with pytest.raises(TypeError, match="corpus spec"):
        load_corpus(42)


# -- built-in corpora -----------------------------------------------------------------------------


def test_builtin_python_docs_is_large_english_and_cached(docs_cache, monkeypatch):
    text = load_corpus("builtin:python-docs", cache_dir=docs_cache)
    assert len(text.encode("utf-8")) >= 1_000_000
    # Real stdlib documentation, in the documented order: reference topics, then modules A..Z.
    assert "Module json\n===========" in text and "Module collections\n" in text
    assert text.index("Module abc\n") < text.index("Module json\n") < text.index("Module zipfile\n")
    assert "json.dumps(obj" in text and " at 0x" not in text
    words = text.split()
    assert sum(w.lower() in {"the", "a", "of", "is", "to"} for w in words) > 0.05 * len(words)

    # A second load reads the cache: building again would fail here.
    def no_build():
        raise AssertionError("rebuilt a cached corpus")

    monkeypatch.setattr(builtin_corpus, "_assemble_in_child", no_build)
    assert load_corpus("builtin:python-docs", cache_dir=docs_cache) == text


def test_builtin_python_docs_is_deterministic(docs_cache, tmp_path):
    first = load_corpus("builtin:python-docs", cache_dir=docs_cache)
    again = builtin_corpus.build_builtin("python-docs", str(tmp_path / "fresh"))
    assert again == first


def test_builtin_small_is_prefix_of_full(docs_cache):
    full = load_corpus("builtin:python-docs", cache_dir=docs_cache)
    small = load_corpus("builtin:python-docs-small", cache_dir=docs_cache)
    assert 100_000 < len(small) <= builtin_corpus.SMALL_CHARS
    assert full.startswith(small) and small.endswith("\n")


def test_builtin_cache_location_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "here"))
    path = builtin_corpus.corpus_cache_path("python-docs")
    assert path.startswith(str(tmp_path / "here"))
    assert f"{os.sys.version_info.major}.{os.sys.version_info.minor}" in os.path.basename(path)


# -- token cache ----------------------------------------------------------------------------------


class CountingTokenizer:
    """Wraps a Tokenizer and counts how often the corpus is actually encoded."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0
        self.unknown, self.to_str = tok.unknown, tok.to_str

    def encode(self, text, **kw):
        self.calls += 1
        return self.tok.encode(text, **kw)


def test_tokenize_corpus_caches_and_invalidates(tmp_path):
    p = _write(tmp_path / "c.txt", "hello world\n" * 50)
    tok = CountingTokenizer(train_tokenizer("hello world!\n", "char"))
    cache = tmp_path / "tc"
    ids = tokenize_corpus(str(p), tok, cache_dir=cache)
    assert isinstance(ids, np.memmap) and ids.dtype == np.int32 and not ids.flags.writeable
    assert ids.tolist() == tok.tok.encode(load_corpus(str(p))).tolist()
    assert tok.calls == 1
    again = tokenize_corpus(str(p), tok, cache_dir=cache)
    assert tok.calls == 1 and again.tolist() == ids.tolist()  # cache hit: no re-tokenising
    _write(p, "hello world!\n" * 50)  # a changed file invalidates the cache
    changed = tokenize_corpus(str(p), tok, cache_dir=cache)
    assert tok.calls == 2 and len(changed) == 13 * 50
    assert changed.tolist() == tok.tok.encode("hello world!\n" * 50).tolist()
    # A different tokenizer gets its own cache entry.
    other = CountingTokenizer(train_tokenizer("hello world!\nxyz", "char"))
    tokenize_corpus(str(p), other, cache_dir=cache)
    assert other.calls == 1
    files = os.listdir(cache / "tokens")
    # The edited text's cache stays within the grace period; sources/ holds the source records.
    assert sorted(f for f in files if not f.endswith(".int32")) == ["sources"]
    assert len(files) == 4 and not [f for f in files if f.endswith(".tmp")]


def _caches(cache):
    return {f.name for f in (cache / "tokens").glob("*.int32")}


def _tokenize(path, tok, cache):
    return tokenize_corpus(str(path), tok, cache_dir=cache)


def test_an_edited_corpus_loses_its_old_cache_after_the_grace_period(tmp_path, monkeypatch):
    """Each edit gave a new cache file and left the old one, as large as the corpus's ids, which
    nothing could name again. A later tokenization removes it once the grace period has passed;
    within it the old file stays (a run that read the text just before the edit may open it)."""
    p = _write(tmp_path / "c.txt", "hello world\n" * 50)
    tok = train_tokenizer("hello world!\n", "char")
    cache = tmp_path / "tc"
    first = _tokenize(p, tok, cache)
    old = _caches(cache)
    _write(p, "hello world!\n" * 50)
    _tokenize(p, tok, cache)
    assert old < _caches(cache) and len(_caches(cache)) == 2  # within the grace period
    monkeypatch.setattr(data, "TOKEN_CACHE_GRACE_S", 0.0)
    _tokenize(p, tok, cache)  # a cache hit: nothing written, but the dead file goes
    assert len(_caches(cache)) == 1 and not old & _caches(cache)
    # A run that mapped the old cache keeps reading it after the unlink.
    assert first.tolist() == tok.encode("hello world\n" * 50).tolist()
    # Edited back, the path gives its first text again: tokenized afresh, the other one retired.
    _write(p, "hello world\n" * 50)
    _tokenize(p, tok, cache)
    assert _caches(cache) == old


def test_a_cache_is_kept_while_another_path_gives_the_same_text(tmp_path, monkeypatch):
    """Two paths with the same text share one cache file: the edit of one must not take it from
    the other. It goes once neither gives it; a tokenizer of its own keeps its own cache."""
    monkeypatch.setattr(data, "TOKEN_CACHE_GRACE_S", 0.0)
    a = _write(tmp_path / "a.txt", "hello world\n" * 50)
    b = _write(tmp_path / "copy" / "b.txt", "hello world\n" * 50)
    tok = CountingTokenizer(train_tokenizer("hello world!\n", "char"))
    other_tok = train_tokenizer("hello world!\nxyz", "char")
    cache = tmp_path / "tc"
    _tokenize(a, tok, cache)
    shared = _caches(cache)
    _tokenize(b, tok, cache)
    assert tok.calls == 1 and _caches(cache) == shared
    _tokenize(a, other_tok, cache)  # same path, another tokenizer: another source
    _write(a, "hello world!\n" * 50)
    _tokenize(a, tok, cache)
    assert shared <= _caches(cache)  # b still gives it
    calls = tok.calls
    _tokenize(b, tok, cache)
    assert tok.calls == calls  # read from the cache, not tokenized again
    _write(b, "hello\n" * 50)
    _tokenize(b, tok, cache)
    # Neither path gives it now; a's other tokenizer still gives its own cache of the first text.
    assert not shared & _caches(cache) and len(_caches(cache)) == 3


def test_a_cache_another_path_took_up_is_not_removed(tmp_path, monkeypatch):
    """A path edited to the text of another path takes up that path's cache; when it moves on,
    the cache stays for the other path, while the path's own earlier caches go."""
    monkeypatch.setattr(data, "TOKEN_CACHE_GRACE_S", 0.0)
    a = _write(tmp_path / "a.txt", "hello\n" * 50)
    b = _write(tmp_path / "b.txt", "world\n" * 50)
    tok = train_tokenizer("hello world!\n", "char")
    cache = tmp_path / "tc"
    _tokenize(a, tok, cache)
    a_first = _caches(cache)
    _tokenize(b, tok, cache)
    b_cache = _caches(cache) - a_first
    _write(a, "world\n" * 50)
    _tokenize(a, tok, cache)
    assert _caches(cache) == b_cache
    _write(a, "hello world!\n" * 50)
    _tokenize(a, tok, cache)
    assert b_cache < _caches(cache) and len(_caches(cache)) == 2


def test_a_builtin_corpus_keeps_its_cache_when_a_file_with_its_text_is_edited(tmp_path,
                                                                              monkeypatch):
    """builtin:shakespeare and a file holding its text share one cache: the file's edits retire
    only the caches the file alone gave."""
    monkeypatch.setattr(data, "TOKEN_CACHE_GRACE_S", 0.0)
    text = load_corpus("builtin:shakespeare")
    tok = CountingTokenizer(train_tokenizer(text + "Z", "char"))
    cache = tmp_path / "tc"
    first = tokenize_corpus("builtin:shakespeare", tok, cache_dir=cache)
    shared = _caches(cache)
    p = _write(tmp_path / "s.txt", text)
    _tokenize(p, tok, cache)
    _write(p, text + "Z")
    _tokenize(p, tok, cache)
    edited_once = _caches(cache) - shared
    _write(p, text + "ZZ")
    _tokenize(p, tok, cache)
    assert shared <= _caches(cache) and not edited_once & _caches(cache)
    calls = tok.calls
    again = tokenize_corpus("builtin:shakespeare", tok, cache_dir=cache)
    assert tok.calls == calls and again.tolist() == first.tolist()


def test_files_no_record_retired_are_left_alone(tmp_path, monkeypatch):
    """Only a cache some source record retired is ever removed: a cache file written by an
    earlier version (named by no record) and any other file stay."""
    monkeypatch.setattr(data, "TOKEN_CACHE_GRACE_S", 0.0)
    p = _write(tmp_path / "c.txt", "hello world\n" * 50)
    tok = train_tokenizer("hello world!\n", "char")
    cache = tmp_path / "tc"
    _tokenize(p, tok, cache)
    retired = _caches(cache)
    legacy = _write(cache / "tokens" / ("ab" * 20 + ".int32"), b"an older lmlab's cache")
    notes = _write(cache / "tokens" / "notes.txt", "mine")
    foreign = _write(cache / "tokens" / "sources" / "README", "not a record")
    _write(p, "hello world!\n" * 50)
    _tokenize(p, tok, cache)
    assert not retired & _caches(cache)
    assert legacy.exists() and notes.exists() and foreign.exists()
    # A record edited by hand to retire a file outside tokens/ is not a record: nothing goes.
    victim = _write(tmp_path / "victim.int32", b"precious")
    record = {"format": "lmlab-token-source-v1", "source": "x", "cache": "ab" * 20 + ".int32",
              "retired": [{"cache": "../../victim.int32", "since": 0}]}
    edited = _write(cache / "tokens" / "sources" / ("cd" * 20 + ".json"), json.dumps(record))
    _write(p, "hello\n" * 50)
    _tokenize(p, tok, cache)
    assert victim.exists() and not edited.exists()  # a damaged record, past the grace period
    # Nor is one with a time no float holds: it is refused, not a crash.
    record["retired"] = [{"cache": "ef" * 20 + ".int32", "since": 10 ** 400}]
    _write(edited, json.dumps(record))
    _write(p, "hello world\n" * 50)
    _tokenize(p, tok, cache)
    assert legacy.exists() and not edited.exists()


class _Clock:
    """data's clock, moved on by hand: the grace period passes without a test waiting for it."""

    def __init__(self):
        self.now = time.time()

    def time(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(data, "time", clock)
    return clock


def _written_now(path, clock):
    """path, its mtime set to the clock's now: written within the grace period."""
    os.utime(path, (clock.now, clock.now))
    return path


def _record_of(cache):
    [record] = (cache / "tokens" / "sources").glob("*.json")
    return record


def test_a_damaged_record_does_not_stop_the_removal(tmp_path, clock):
    """A source record that is not one (cut short, edited by hand) stopped every removal for
    good: it could name any cache. Now it keeps only the caches it mentions, is replaced the
    next time its source is tokenized, and is removed once untouched for the grace period."""
    p = _write(tmp_path / "c.txt", "hello world\n" * 50)
    tok = train_tokenizer("hello world!\n", "char")
    cache = tmp_path / "tc"
    _tokenize(p, tok, cache)
    [first] = _caches(cache)
    _write(p, "hello world!\n" * 50)
    _tokenize(p, tok, cache)
    [second] = _caches(cache) - {first}
    sources = cache / "tokens" / "sources"
    garbage = _write(sources / ("cd" * 20 + ".json"), "{not json")
    cut_short = _write(sources / ("ef" * 20 + ".json"),
                       '{"format": "lmlab-token-source-v1", "source": "/x", "cache": "' + second)
    clock.now += data.TOKEN_CACHE_GRACE_S + 1
    _written_now(garbage, clock)
    _written_now(cut_short, clock)
    _tokenize(p, tok, cache)
    assert _caches(cache) == {second}  # the retired cache went; the damaged records stay
    assert garbage.exists() and cut_short.exists()
    _write(p, "hello\n" * 50)
    _tokenize(p, tok, cache)
    clock.now += data.TOKEN_CACHE_GRACE_S + 1
    _written_now(cut_short, clock)
    _tokenize(p, tok, cache)
    # The record cut short may be the claim of a path giving the same text: its cache stays.
    assert second in _caches(cache) and not garbage.exists() and cut_short.exists()
    clock.now += data.TOKEN_CACHE_GRACE_S + 1
    _tokenize(p, tok, cache)
    assert len(_caches(cache)) == 1 and not cut_short.exists()
    # A source whose own record is damaged writes it afresh.
    record = _record_of(cache)
    _write(record, "{")
    _tokenize(p, tok, cache)
    assert json.loads(record.read_text())["cache"] in _caches(cache)


def test_a_deleted_corpus_loses_its_record_and_caches_after_the_grace_period(tmp_path, clock):
    """A record whose corpus was deleted or moved stayed for good, and with it every cache it
    named. Once its path names nothing and it is untouched for the grace period, it goes, and so
    do its caches, unless another path, a glob, or a built-in corpus still gives them."""
    tok = train_tokenizer("hello world!\n", "char")
    cache = tmp_path / "tc"
    gone = _write(tmp_path / "gone.txt", "hello world\n" * 50)
    _tokenize(gone, tok, cache)
    _write(gone, "hello\n" * 50)
    _tokenize(gone, tok, cache)
    gone_caches = _caches(cache)
    shared = _write(tmp_path / "shared.txt", "world\n" * 50)
    twin = _write(tmp_path / "twin.txt", "world\n" * 50)
    _tokenize(shared, tok, cache)
    _tokenize(twin, tok, cache)
    [shared_cache] = _caches(cache) - gone_caches
    _write(tmp_path / "books" / "a.txt", "hello world!\n" * 50)
    _tokenize(tmp_path / "books" / "*.txt", tok, cache)  # a glob, which no path is
    kept = _caches(cache) - gone_caches
    records = len(list((cache / "tokens" / "sources").glob("*.json")))
    gone.unlink()
    shared.unlink()
    _tokenize(twin, tok, cache)
    assert _caches(cache) == gone_caches | kept  # within the grace period: all stay
    clock.now += data.TOKEN_CACHE_GRACE_S + 1
    _tokenize(twin, tok, cache)
    assert _caches(cache) == kept and shared_cache in kept  # twin.txt still gives it
    assert len(list((cache / "tokens" / "sources").glob("*.json"))) == records - 2
    # A moved corpus comes back as it was: tokenized again, the cache is its own once more.
    _write(gone, "hello\n" * 50)
    _tokenize(gone, tok, cache)
    assert len(_caches(cache)) == len(kept) + 1


def test_a_builtin_corpus_record_is_never_removed(tmp_path, clock):
    text = load_corpus("builtin:shakespeare")
    tok = train_tokenizer(text, "char")
    cache = tmp_path / "tc"
    tokenize_corpus("builtin:shakespeare", tok, cache_dir=cache)
    builtin = _caches(cache)
    p = _write(tmp_path / "c.txt", "First\n" * 50)
    _tokenize(p, tok, cache)
    clock.now += data.TOKEN_CACHE_GRACE_S + 1
    _tokenize(p, tok, cache)
    assert builtin < _caches(cache)
    assert len(list((cache / "tokens" / "sources").glob("*.json"))) == 2


def test_two_cleanups_at_once_skip_what_the_other_removed(tmp_path, clock, monkeypatch):
    """Another run cleaning the same cache may remove a record or a cache between this run's
    listing and its use of it: the cleanup skips it and never fails."""
    tok = train_tokenizer("hello world!\n", "char")
    cache = tmp_path / "tc"
    gone = _write(tmp_path / "gone.txt", "hello world\n" * 50)
    _tokenize(gone, tok, cache)
    gone.unlink()
    p = _write(tmp_path / "c.txt", "hello\n" * 50)
    _tokenize(p, tok, cache)
    _write(p, "world\n" * 50)
    _tokenize(p, tok, cache)
    _write(cache / "tokens" / "sources" / ("cd" * 20 + ".json"), "{not json")
    clock.now += data.TOKEN_CACHE_GRACE_S + 1
    real_listdir, real_read = os.listdir, data._read_source_record

    def listdir(path):  # a record listed, then removed before it is read
        return real_listdir(path) + (["00" * 20 + ".json"] if path.endswith("sources") else [])

    def read_then_lose(path):  # each record, and every cache, removed by the other run once read
        try:
            return real_read(path)
        finally:
            os.unlink(path)
            for cache_file in (cache / "tokens").glob("*.int32"):
                cache_file.unlink()

    monkeypatch.setattr(data.os, "listdir", listdir)
    monkeypatch.setattr(data, "_read_source_record", read_then_lose)
    data._remove_stale_records_and_caches(str(cache / "tokens"), clock.now)
    assert not list((cache / "tokens" / "sources").glob("*.json")) and not _caches(cache)


def test_record_writes_a_kill_cut_short_are_swept(tmp_path, monkeypatch):
    """A record is written atomically: a kill leaves the previous record and a temporary file,
    which the write of that record sweeps. A record that is never written again (its corpus
    deleted) left it for good; the cleanup now sweeps it once abandoned."""
    p = _write(tmp_path / "c.txt", "hello world\n" * 50)
    tok = train_tokenizer("hello world!\n", "char")
    cache = tmp_path / "tc"
    _tokenize(p, tok, cache)
    record = _record_of(cache)
    before = record.read_bytes()
    torn = _write(record.parent / f".{record.name}.x1y2z3.tmp", b'{"format": "lmlab-tok')
    long_ago = time.time() - data.ABANDONED_AFTER_S - 1
    os.utime(torn, (long_ago, long_ago))
    fresh = _write(record.parent / ".other.json.a1b2c3.tmp", b"{")  # a write going on now
    _tokenize(_write(tmp_path / "d.txt", "world\n" * 50), tok, cache)
    assert not torn.exists() and fresh.exists() and record.read_bytes() == before


def test_another_formats_record_is_left_alone_and_keeps_what_it_names(tmp_path, clock):
    """A record of another format (another lmlab version sharing the cache) is not damaged: it
    stays, and so does any cache it names."""
    p = _write(tmp_path / "c.txt", "hello world\n" * 50)
    tok = train_tokenizer("hello world!\n", "char")
    cache = tmp_path / "tc"
    _tokenize(p, tok, cache)
    [first] = _caches(cache)
    other = _write(cache / "tokens" / "sources" / ("cd" * 20 + ".json"),
                   json.dumps({"format": "lmlab-token-source-v9", "caches": [first]}))
    _write(p, "hello world!\n" * 50)
    _tokenize(p, tok, cache)
    clock.now += data.TOKEN_CACHE_GRACE_S + 1
    _tokenize(p, tok, cache)
    assert first in _caches(cache) and other.exists()


def test_tokenize_corpus_default_cache_dir_is_env(tmp_path):
    p = _write(tmp_path / "c.txt", "abcabc")
    tokenize_corpus(str(p), train_tokenizer("abc", "char"))
    assert len(list((tmp_path / "cache" / "tokens").glob("*.int32"))) == 1


def test_tokenize_corpus_unknown_chars(tmp_path):
    p = _write(tmp_path / "c.txt", "abc☃d")
    tok = train_tokenizer("abcd", "char")
    with pytest.raises(ValueError) as e:
        tokenize_corpus(str(p), tok, cache_dir=tmp_path / "tc")
    assert str(p) in str(e.value) and "'☃' x1" in str(e.value)
    # A corpus is tokenized under a policy the caller can choose: the message says how.
    assert "unknown='skip' (--unknown skip) drops them" in str(e.value)
    ids = tokenize_corpus(str(p), tok, cache_dir=tmp_path / "tc", unknown="skip")
    assert tok.decode(ids) == "abcd"


# -- split and batches ----------------------------------------------------------------------------


def test_split_tokens():
    tokens = np.arange(1000, dtype=np.int32)
    train, val = split_tokens(tokens, 0.1)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train, val]), tokens)
    train, val = split_tokens(tokens, 0.0)
    assert len(train) == 1000 and len(val) == 0
    for bad in (-0.1, 1.0, "0.1"):
        with pytest.raises(ValueError, match="val_fraction"):
            split_tokens(tokens, bad)


def test_batch_sampler_windows_are_contiguous_and_shifted():
    tokens = np.arange(10_000, dtype=np.int32)
    s = BatchSampler(tokens, batch_size=8, block_size=16, seed=0)
    starts = set()
    for _ in range(20):
        x, y = s.next()
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int32
        assert x.flags.c_contiguous and y.flags.c_contiguous
        # tokens[i] == i, so a window starting at i is i + arange(T), its target one further.
        assert np.array_equal(x, x[:, :1] + np.arange(16))
        assert np.array_equal(y, x + 1)
        assert x.min() >= 0 and y.max() <= 9_999
        starts.update(x[:, 0].tolist())
    assert len(starts) > 100  # random starts, not a fixed few


def test_batch_sampler_reaches_both_ends():
    tokens = np.arange(6, dtype=np.int32)
    s = BatchSampler(tokens, batch_size=64, block_size=5, seed=1)
    x, y = s.next()
    assert np.array_equal(x, np.tile(np.arange(5), (64, 1))) and np.array_equal(y, x + 1)


def test_batch_sampler_seeded():
    tokens = np.arange(5000, dtype=np.int32)
    a = [BatchSampler(tokens, 4, 8, seed=7).next()[0] for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    b = BatchSampler(tokens, 4, 8, seed=8).next()[0]
    assert not np.array_equal(a[0], b)


def test_batch_sampler_resume_draws_the_same_batches():
    tokens = np.random.default_rng(0).integers(0, 50, size=3000).astype(np.int32)
    straight = BatchSampler(tokens, 4, 32, seed=3)
    expected = [straight.next() for _ in range(10)]
    first = BatchSampler(tokens, 4, 32, seed=3)
    for _ in range(6):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # it must survive state.json
    assert state["batches_drawn"] == 6
    resumed = BatchSampler(tokens, 4, 32, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    for x_exp, y_exp in expected[6:]:
        x, y = resumed.next()
        assert np.array_equal(x, x_exp) and np.array_equal(y, y_exp)
    assert resumed.batches_drawn == 10


def test_batch_sampler_state_mismatch_is_refused():
    tokens = np.arange(3000, dtype=np.int32)
    state = BatchSampler(tokens, 4, 32, seed=0).state_dict()
    with pytest.raises(ValueError, match="block_size=32"):
        BatchSampler(tokens, 4, 16, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="not a BatchSampler state"):
        BatchSampler(tokens, 4, 32, seed=0).load_state_dict({"step": 3})


def test_batch_sampler_resumes_on_a_corpus_of_another_length():
    """A corpus edited between a checkpoint and its resume (lmlab.train notes it by the data's
    hash): the saved generator goes on drawing window starts, now over the text as it is. Only the
    batch shape must match. Reference: numpy's generator restored from the same state, drawing
    starts in [0, n - T) of the new length."""
    tokens = np.arange(3000, dtype=np.int32)
    first = BatchSampler(tokens, 4, 32, seed=5)
    for _ in range(3):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))
    longer = np.arange(3500, dtype=np.int32) * 2
    resumed = BatchSampler(longer, 4, 32, seed=0)
    resumed.load_state_dict(state)
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    for _ in range(2):
        starts = rng.integers(0, len(longer) - 32, size=4)
        x, y = resumed.next()
        assert np.array_equal(x, np.stack([longer[s:s + 32] for s in starts]))
        assert np.array_equal(y, np.stack([longer[s + 1:s + 33] for s in starts]))
    assert resumed.batches_drawn == 5


def test_batch_sampler_too_short_corpus_says_how_long():
    with pytest.raises(ValueError) as e:
        BatchSampler(np.arange(64, dtype=np.int32), 2, 64, seed=0)
    assert "has 64 tokens" in str(e.value) and "at least 65" in str(e.value)
    BatchSampler(np.arange(65, dtype=np.int32), 2, 64, seed=0).next()


@pytest.mark.parametrize("kw,match", [
    ({"batch_size": 0}, "batch_size"), ({"block_size": -1}, "block_size"), ({"batch_size": 2.0}, "batch_size"),
    ({"seed": -1}, "seed"), ({"tokens": np.zeros((10, 10), np.int32)}, "1-D"),
    ({"tokens": np.zeros(100, np.float32)}, "integer"),
])
def test_batch_sampler_bad_arguments(kw, match):
    args = {"tokens": np.arange(100, dtype=np.int32), "batch_size": 2, "block_size": 8, "seed": 0, **kw}
    with pytest.raises(ValueError, match=match):
        BatchSampler(**args)


# -- instruct JSONL -------------------------------------------------------------------------------


def _jsonl(tmp_path, lines, name="d.jsonl"):
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    return str(_write(tmp_path / name, text))


def test_load_instruct_both_forms(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "<|end|> again?"}, {"role": "assistant", "content": ""}]
    p = _jsonl(tmp_path, [{"prompt": "What is 2+2?", "response": "4"}, "", {"messages": msgs}])
    convs = load_instruct_jsonl(p)
    assert convs == [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], msgs]


def test_load_instruct_reads_a_byte_order_mark_and_crlf(tmp_path):
    # Windows editors start a UTF-8 file with a byte-order mark; corpora and prompts drop it.
    p = _write(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\r\n\r\n'
                                       b'{"prompt": "c", "response": "d"}\r\n')
    assert [[m["content"] for m in c] for c in load_instruct_jsonl(p)] == [["a", "b"], ["c", "d"]]


@pytest.mark.parametrize("bad,match", [
    ("{not json}", r"not valid JSON: Expecting property name enclosed in double quotes \(column 2\)"),
    ('{"prompt": "a", "prompt": "b", "response": "c"}', "the key 'prompt' appears twice"),
    pytest.param('{"prompt": "a", "response": "c", "n": ' + "[" * 100000 + "]" * 100000 + "}",
                 "JSON nested too deeply", id="nested-past-the-parser"),  # was a RecursionError
    pytest.param('{"prompt": "a", "response": "c", "n": ' + "9" * 5000 + "}",
                 "a number with too many digits", id="5000-digit-number"),  # named no file
    ('["a", "b"]', "expected a JSON object"),
    ({"prompt": "only a prompt"}, "expected keys 'prompt' and 'response', or 'messages'"),
    ({"prompt": "p", "response": 3}, "'response' must be a string"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object"),
    ({"messages": [{"role": "system", "content": "x"}]}, "role 'system'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
])
def test_load_instruct_errors_name_the_line(tmp_path, bad, match):
    p = _jsonl(tmp_path, [{"prompt": "a", "response": "b"}, "", bad])
    with pytest.raises(ValueError, match=match) as e:
        load_instruct_jsonl(p)
    assert f"{p}:3:" in str(e.value)


def test_jsonl_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_instruct_jsonl(tmp_path / "none.jsonl")
    with pytest.raises(ValueError, match="is a directory: expected a file"):
        load_instruct_jsonl(tmp_path)
    os.mkfifo(tmp_path / "fifo.jsonl")  # opening it would wait for a writer forever
    with pytest.raises(ValueError, match=r"fifo\.jsonl is not a regular file"):
        load_instruct_jsonl(tmp_path / "fifo.jsonl")
    empty = _write(tmp_path / "e.jsonl", "\n\n")
    with pytest.raises(ValueError, match="contains no records"):
        load_instruct_jsonl(empty)
    latin = _write(tmp_path / "l.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"l\.jsonl:2: not UTF-8"):
        load_instruct_jsonl(latin)
