"""Streaming tokenization (lmlab.token_shards): the shards hold exactly the ids of the in-memory
path (lmlab.data.tokenize_corpus with stream=False) for both tokenizers, an interrupted pass
resumes after its last whole shard, a changed source is tokenized again, a damaged shard is
rebuilt, and training samples the memory-mapped shards as it samples an array.

The chunk, read and shard sizes are shrunk so that small corpora cross many boundaries.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lmlab import token_shards
from lmlab.data import BatchSampler, load_corpus, split_tokens, tokenize_corpus
from lmlab.tokenizer import SPECIAL_TOKENS, train_tokenizer, train_tokenizer_on_chunks

SHAKESPEARE = load_corpus("builtin:shakespeare")[:120_000]


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(token_shards, "READ_BYTES", 777)
    monkeypatch.setattr(token_shards, "CHUNK_BYTES", 3000)
    monkeypatch.setattr(token_shards, "SHARD_TOKENS", 9000)
    # One process unless a test asks for workers: spawned ones would not see these sizes.
    monkeypatch.setattr(token_shards, "_can_spawn", lambda: False)


@pytest.fixture
def corpus(tmp_path):
    """A directory whose files exercise every joint: a byte-order mark, CRLF, files that start
    with indentation (no safe cut at the file boundary), no final newline, non-ASCII text."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(SHAKESPEARE[:70_000])
    (root / "b.txt").write_bytes(b"\xef\xbb\xbf  indented line\r\nsecond line\r\n\n\n" +
                                 "caf\u00e9 na\u00efve \u2014 \u65e5\u672c\n".encode() * 50 + b"end")
    (root / "sub" / "c.md").write_text("    code block\n\tand a tab  \n  " + SHAKESPEARE[70_000:])
    (root / "sub" / "d.txt").write_text("\n\n   \n")
    return root


def _in_memory(spec, tok, cache):
    return np.asarray(tokenize_corpus(spec, tok, cache_dir=cache, stream=False))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_streamed_shards_hold_exactly_the_in_memory_ids(tmp_path, corpus, kind):
    text = load_corpus(corpus)
    tok = train_tokenizer(text, kind, 400)
    shards = tokenize_corpus(corpus, tok, cache_dir=tmp_path / "cache", stream=True,
                             progress=False)
    assert isinstance(shards, token_shards.TokenShards) and len(shards._maps) > 3
    assert all(isinstance(m, np.memmap) for m in shards._maps)  # read from disk, not held
    expected = _in_memory(corpus, tok, tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(shards), expected)
    assert tok.decode(np.asarray(shards)) == text
    # A single file is its text as it is (no newline added).
    single = tokenize_corpus(corpus / "b.txt", tok, cache_dir=tmp_path / "c1", stream=True,
                             progress=False)
    np.testing.assert_array_equal(np.asarray(single), _in_memory(corpus / "b.txt", tok, tmp_path))


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_a_tokenizer_trained_chunk_by_chunk_is_the_one_trained_on_the_whole_text(corpus, kind):
    files = sorted(str(p) for p in corpus.rglob("*") if p.is_file())
    files = [f for f in files if not f.endswith(("c.md", "d.txt"))] + \
            [str(corpus / "sub" / "c.md"), str(corpus / "sub" / "d.txt")]
    chunks = list(token_shards.corpus_text_for_tokenizer(files))
    assert len(chunks) > 5 and "".join(chunks) == load_corpus(corpus)
    whole = train_tokenizer(load_corpus(corpus), kind, 400)
    streamed = train_tokenizer_on_chunks(iter(chunks), kind, 400)
    assert streamed.to_str() == whole.to_str()


def test_worker_processes_give_the_same_shards(tmp_path, corpus):
    tok = train_tokenizer(load_corpus(corpus), "bpe", 400)
    files = [str(corpus / "a.txt"), str(corpus / "b.txt")]
    one = token_shards.stream_tokens(files, "x", tok, str(tmp_path / "one"), "error", workers=1,
                                     progress=False)
    two = token_shards.stream_tokens(files, "x", tok, str(tmp_path / "two"), "error", workers=2,
                                     progress=False)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(two))


def _manifest(cache) -> dict:
    (path,) = (cache / "tokens").glob("stream-*/manifest.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("damage", ["[]", "{\"format\": 1", "shards not a list", "entry not a dict",
                                    "entry without its file"])
def test_a_damaged_manifest_is_ignored_and_the_pass_starts_over(tmp_path, corpus, damage):
    """manifest.json is lmlab's own, but a disk or a person can damage it: valid JSON of another
    form (a list; shard entries that are not objects) was a traceback (AttributeError, TypeError)
    on every later run of the corpus; now the pass starts over, as without a manifest."""
    tok = train_tokenizer(load_corpus(corpus), "char")
    cache = tmp_path / "cache"
    tokenize_corpus(corpus, tok, cache_dir=cache, stream=True, progress=False)
    path = next(cache.glob("tokens/stream-*")) / "manifest.json"
    saved = json.loads(path.read_text())
    text = {"[]": "[]", "{\"format\": 1": '{"format": 1',
            "shards not a list": json.dumps({**saved, "shards": "shard_00000.bin"}),
            "entry not a dict": json.dumps({**saved, "shards": ["shard_00000.bin"]}),
            "entry without its file": json.dumps(
                {**saved, "shards": [{k: v for k, v in e.items() if k != "file"}
                                     for e in saved["shards"]]})}[damage]
    path.write_text(text)
    again = tokenize_corpus(corpus, tok, cache_dir=cache, stream=True, progress=False)
    np.testing.assert_array_equal(np.asarray(again), _in_memory(corpus, tok, tmp_path / "mem"))
    assert _manifest(cache) == saved


def test_an_interrupted_pass_resumes_after_its_last_whole_shard(tmp_path, corpus, monkeypatch):
    tok = train_tokenizer(load_corpus(corpus), "char")
    cache = tmp_path / "cache"
    real = token_shards._ChunkEncoder.__call__
    calls = []

    def dies_on_the_eighth_chunk(self, text):
        calls.append(len(text))
        if len(calls) == 8 and dying:
            raise KeyboardInterrupt
        return real(self, text)

    dying = True
    monkeypatch.setattr(token_shards._ChunkEncoder, "__call__", dies_on_the_eighth_chunk)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(corpus, tok, cache_dir=cache, stream=True, progress=False)
    dying = False
    partial = _manifest(cache)
    assert not partial["complete"] and len(partial["shards"]) >= 1
    kept = {s["file"]: os.stat(next(cache.glob("tokens/stream-*")) / s["file"]).st_mtime_ns
            for s in partial["shards"]}
    chars_before = sum(calls[:-1])
    calls.clear()
    resumed = tokenize_corpus(corpus, tok, cache_dir=cache, stream=True, progress=False)
    np.testing.assert_array_equal(np.asarray(resumed), _in_memory(corpus, tok, cache))
    # The shards written before the interruption were kept, and their text not read again.
    directory = next(cache.glob("tokens/stream-*"))
    assert {f: os.stat(directory / f).st_mtime_ns for f in kept} == kept
    assert sum(calls) < len(load_corpus(corpus)) - chars_before + 3000 * 4
    assert _manifest(cache)["complete"]
    # The shards are those of an uninterrupted pass, so their digest (what MPI ranks with a cache
    # each compare) is the same whether or not a machine's pass was interrupted.
    straight = tokenize_corpus(corpus, tok, cache_dir=tmp_path / "straight", stream=True,
                               progress=False)
    assert _manifest(cache)["shards"] == _manifest(tmp_path / "straight")["shards"]
    assert resumed.digest == straight.digest


def test_shards_are_reused_until_a_source_changes(tmp_path, corpus, monkeypatch):
    tok = train_tokenizer(load_corpus(corpus) + "Z", "char")
    cache = tmp_path / "cache"
    tokenize_corpus(corpus, tok, cache_dir=cache, stream=True, progress=False)

    def no_encoding(self, text):
        raise AssertionError("the corpus was tokenized again")

    with monkeypatch.context() as m:
        m.setattr(token_shards._ChunkEncoder, "__call__", no_encoding)
        again = tokenize_corpus(corpus, tok, cache_dir=cache, stream=True, progress=False)
    np.testing.assert_array_equal(np.asarray(again), _in_memory(corpus, tok, cache))
    with open(corpus / "a.txt", "a") as f:
        f.write("Z")
    changed = tokenize_corpus(corpus, tok, cache_dir=cache, stream=True, progress=False)
    assert len(changed) == len(again) + 1
    np.testing.assert_array_equal(np.asarray(changed), _in_memory(corpus, tok, cache))


def test_a_pass_no_corpus_can_use_again_is_removed(tmp_path, corpus):
    """Each edit of a large corpus left its previous shards in the cache, as large as the corpus,
    which no pass could find again (their key holds the old size and time). A later pass removes
    them once no one has written them for an hour; a pass another corpus (or tokenizer) can still
    use, and a stale one written within the hour (a pass still running), are kept."""
    from lmlab.files import ABANDONED_AFTER_S

    tok = train_tokenizer(load_corpus(corpus) + "Z", "char")
    cache = tmp_path / "cache"
    other = tmp_path / "other.txt"
    other.write_text(SHAKESPEARE[:5000])
    tokenize_corpus(other, tok, cache_dir=cache, stream=True, progress=False)
    tokenize_corpus(corpus, tok, cache_dir=cache, stream=True, progress=False)
    kept, old = sorted(cache.glob("tokens/stream-*"), key=lambda d: d.stat().st_mtime_ns)
    hour_ago = os.stat(old).st_mtime - ABANDONED_AFTER_S - 60
    for folder in (kept, old):
        os.utime(folder / "manifest.json", (hour_ago, hour_ago))
    with open(corpus / "a.txt", "a") as f:
        f.write("Z")
    tokenize_corpus(corpus, tok, cache_dir=cache, stream=True, progress=False)
    passes = set(cache.glob("tokens/stream-*"))
    assert kept in passes and old not in passes and len(passes) == 2
    # The corpus edited again: the pass just written is stale, but written within the hour.
    with open(corpus / "a.txt", "a") as f:
        f.write("Z")
    tokenize_corpus(corpus, tok, cache_dir=cache, stream=True, progress=False)
    assert passes < set(cache.glob("tokens/stream-*"))


def test_a_damaged_shard_is_tokenized_again(tmp_path, corpus):
    tok = train_tokenizer(load_corpus(corpus), "char")
    cache = tmp_path / "cache"
    first = np.asarray(tokenize_corpus(corpus, tok, cache_dir=cache, stream=True, progress=False))
    directory = next(cache.glob("tokens/stream-*"))
    shard = directory / _manifest(cache)["shards"][2]["file"]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    again = tokenize_corpus(corpus, tok, cache_dir=cache, stream=True, progress=False)
    np.testing.assert_array_equal(np.asarray(again), first)


def test_sampling_shards_draws_the_batches_of_the_array(tmp_path, corpus):
    tok = train_tokenizer(load_corpus(corpus), "char")
    shards = tokenize_corpus(corpus, tok, cache_dir=tmp_path, stream=True, progress=False)
    array = _in_memory(corpus, tok, tmp_path)
    for a, b in zip(split_tokens(shards, 0.1), split_tokens(array, 0.1)):
        assert len(a) == len(b)
        one, two = BatchSampler(a, 16, 64, seed=5), BatchSampler(b, 16, 64, seed=5)
        for _ in range(20):  # windows cross shard boundaries
            for x, y in zip(one.next(), two.next()):
                np.testing.assert_array_equal(x, y)
        assert one.state_dict() == two.state_dict()
    assert shards[5] == array[5] and shards[-1] == array[-1]
    np.testing.assert_array_equal(shards[100:30000][[0, 9000, -1]], array[100:30000][[0, 9000, -1]])


def test_errors_name_the_file_and_what_to_do(tmp_path, corpus):
    tok = train_tokenizer(load_corpus(corpus), "char")
    (corpus / "bad.txt").write_bytes(b"fine\n" * 500 + b"\xff broken")
    with pytest.raises(ValueError, match=r"bad\.txt is not UTF-8 text: byte 0xff at byte offset 2500"):
        tokenize_corpus(corpus, tok, cache_dir=tmp_path, stream=True, progress=False)
    (corpus / "bad.txt").write_text("unseen \u2603 snowman\n")
    with pytest.raises(ValueError, match="cannot represent: '\u2603' x1"):
        tokenize_corpus(corpus, tok, cache_dir=tmp_path, stream=True, progress=False)
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text(" \n\n")
    with pytest.raises(ValueError, match="is empty"):
        tokenize_corpus(blank, tok, cache_dir=tmp_path, stream=True, progress=False)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("raw, message", [
    # iconv -f latin1 on these would turn them into mojibake: their encoding is named instead.
    ("hi\n".encode("utf-16"), r"is UTF-16 text \(it starts with a UTF-16 byte-order mark\), not "
                              r"UTF-8: convert it to UTF-8 first \(e\.g\. iconv -f utf-16"),
    ("hi\n".encode("utf-32"), "is UTF-32 text"),
    # UTF-16 without a mark reads as UTF-8 with a NUL after each letter: it was trained on so.
    (b"fine\n" * 500 + "hi there\n".encode("utf-16-le"), "holds a NUL byte at byte offset 2501 "
                                                         r"\(a binary file, or UTF-16"),
    (b"\xef\xbb\xbfok\x00", "NUL byte at byte offset 5"),  # the offset counts the UTF-8 mark
    (b"caf\xe9\x00", r"byte 0xe9 at byte offset 3 .*iconv -f latin1"),  # the first problem
])
def test_a_file_that_is_not_utf8_text_is_named_with_its_encoding(tmp_path, stream, raw, message):
    tok = train_tokenizer("fine hi there", "char")
    path = tmp_path / "odd.txt"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message) as e:
        tokenize_corpus(path, tok, cache_dir=tmp_path, stream=stream, progress=False)
    assert f"{path} is " in str(e.value)


def test_pretrain_trains_and_resumes_from_streamed_shards(tmp_path, corpus, monkeypatch):
    from lmlab.pretrain import pretrain
    monkeypatch.setattr(token_shards, "STREAM_ABOVE_BYTES", 0)  # every file corpus streams
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    settings = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_every=0,
                    progress=False, precision="fp32")
    first = pretrain(str(corpus), tmp_path / "run", steps=2, **settings)
    assert list((tmp_path / "cache" / "tokens").glob("stream-*/manifest.json"))
    resumed = pretrain(None, tmp_path / "run", resume=True, steps=4, progress=False)
    straight = pretrain(str(corpus), tmp_path / "straight", steps=4, **settings)
    assert first.steps_done == 2 and resumed.steps_done == 4
    assert resumed.final_loss == straight.final_loss  # the same batches from the shards


@pytest.mark.parametrize("streamed", [False, True])
def test_a_resume_on_a_corpus_with_new_characters_says_what_pretraining_can_do(tmp_path, monkeypatch,
                                                                               streamed):
    # Pretraining has no --unknown (its tokenizer is built from the corpus): the error for a
    # corpus edited before a resume names what to do instead of that flag.
    from lmlab.pretrain import pretrain
    if streamed:
        monkeypatch.setattr(token_shards, "STREAM_ABOVE_BYTES", 0)
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "a.txt"
    path.write_text("abc cab\n" * 40)
    pretrain(str(path), tmp_path / "run", steps=1, n_layer=1, n_head=2, n_embd=16, block_size=8,
             batch_size=2, eval_every=0, progress=False)
    path.write_text("abc cab\n" * 40 + "xyz\n")
    with pytest.raises(ValueError, match="3 characters") as e:
        pretrain(None, tmp_path / "run", resume=True, steps=2, progress=False)
    assert "drops them" not in str(e.value) and "lmlab finetune" in str(e.value)


def test_finetune_on_a_streamed_corpus_trains_as_on_the_text(tmp_path, corpus, monkeypatch):
    from lmlab.finetune import finetune
    from lmlab.pretrain import pretrain
    monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / "cache"))
    settings = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_every=0,
                    progress=False, precision="fp32")
    pretrain("builtin:shakespeare", tmp_path / "base", steps=2, **settings)
    tune = dict(steps=3, eval_every=0, progress=False, precision="fp32", unknown="replace",
                sample_tokens=0)
    in_memory = finetune(tmp_path / "base", str(corpus), tmp_path / "mem", **tune)
    monkeypatch.setattr(token_shards, "STREAM_ABOVE_BYTES", 0)  # every file corpus streams
    streamed = finetune(tmp_path / "base", str(corpus), tmp_path / "streamed", **tune)
    assert list((tmp_path / "cache" / "tokens").glob("stream-*/manifest.json"))
    assert in_memory.details["unknown_chars"] and streamed.details["unknown_chars"] is None
    assert streamed.final_loss == in_memory.final_loss  # the same ids, the same batches


def test_chunk_cuts_split_bpe_pieces_as_the_whole_text_does(tmp_path):
    # Trailing spaces and blank lines before a line: "\n\n" or "  \n" at a chunk's end would be
    # one whitespace piece there but two inside the text, so chunks are never cut after them.
    root = tmp_path / "ws"
    root.mkdir()
    line = "word:  \nnext\n\nTitle  \n\n  indented\nplain\ncaf\u00e9\n"
    (root / "a.txt").write_text(line * 400)
    (root / "b.txt").write_text("Second file\n" * 300)
    files = sorted(str(p) for p in root.iterdir())
    text = load_corpus(root)
    tok = train_tokenizer(text, "bpe", 300)
    pre = tok._tk.pre_tokenizer
    chunks = [c.decode() for c, _ in token_shards.corpus_chunks(files)]
    assert len(chunks) > 5 and "".join(chunks) == text
    pieces = [p for chunk in chunks for p, _ in pre.pre_tokenize_str(chunk)]
    assert pieces == [p for p, _ in pre.pre_tokenize_str(text)]


def test_a_file_with_windows_line_endings_is_cut_as_its_text_is(tmp_path, monkeypatch):
    # "\r\n" is read as "\n": a cut after it is as safe as after "\n". Were such a file never
    # cut, its lines would pile up to MAX_PENDING_BYTES and be cut there, at any line break (here
    # after a blank line), where BPE splits the whitespace differently than in the whole text.
    monkeypatch.setattr(token_shards, "MAX_PENDING_BYTES", 200)
    monkeypatch.setattr(token_shards, "READ_BYTES", 64)
    path = tmp_path / "windows.txt"
    path.write_bytes(b"word word\r\n\r\nnext  \r\n  indented\r\nplain\r\n" * 200)
    text = load_corpus(path)
    assert "\r" not in text
    tok = train_tokenizer(text, "bpe", 300)
    lf = tmp_path / "unix.txt"
    lf.write_text(text)
    assert (len(list(token_shards.corpus_chunks([str(path)])))
            == len(list(token_shards.corpus_chunks([str(lf)]))) > 2)
    streamed = tokenize_corpus(path, tok, cache_dir=tmp_path / "s", stream=True, progress=False)
    np.testing.assert_array_equal(np.asarray(streamed), _in_memory(path, tok, tmp_path / "m"))


def test_text_in_other_scripts_is_cut_at_its_line_breaks(tmp_path, monkeypatch):
    # Cut only between printable ASCII, Russian or Chinese text had no cut: its lines piled up to
    # MAX_PENDING_BYTES and were cut at any line break (here in a blank line), where BPE splits
    # the whitespace differently than in the whole text.
    monkeypatch.setattr(token_shards, "MAX_PENDING_BYTES", 300)
    monkeypatch.setattr(token_shards, "READ_BYTES", 64)
    path = tmp_path / "other.txt"
    path.write_text("\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440\n\n"
                    "\u4f60\u597d\u3002\n\u00ab\u00e9t\u00e9\u00bb\n" * 150)
    text = load_corpus(path)
    tok = train_tokenizer(text, "bpe", 300)
    monkeypatch.setattr(token_shards, "MAX_PENDING_BYTES", 1 << 30)
    assert len(list(token_shards.corpus_chunks([str(path)]))) > 2  # cut without forcing
    monkeypatch.setattr(token_shards, "MAX_PENDING_BYTES", 300)
    streamed = tokenize_corpus(path, tok, cache_dir=tmp_path / "s", stream=True, progress=False)
    np.testing.assert_array_equal(np.asarray(streamed), _in_memory(path, tok, tmp_path / "m"))


def test_no_cut_next_to_a_space_of_any_script_changes_the_pieces(tmp_path, monkeypatch):
    # Line breaks between every kind of neighbour: ASCII, letters, marks, symbols, and the
    # spaces, controls and format characters that are (or in some engine might be) \s.
    monkeypatch.setattr(token_shards, "MAX_PENDING_BYTES", 1 << 30)
    monkeypatch.setattr(token_shards, "READ_BYTES", 5)
    pre = train_tokenizer("x", "bpe", 300)._tk.pre_tokenizer
    chars = list("ab.!' \t\x0b\x0c\x1c") + ["\n", "\r\n", "\u00e9", "\u4f60", "\u3002", "\u2014",
                                            "\u00a0", "\u3000", "\u2028", "\x85", "\u200b",
                                            "\u180e", "\u1680", "\u202f", "\u0301", "\U0001F600"]
    rng = np.random.default_rng(0)
    for i in range(150):
        path = tmp_path / f"{i}.txt"
        path.write_text("".join(rng.choice(chars, size=80)) + "x", newline="")
        text = load_corpus(path)
        monkeypatch.setattr(token_shards, "CHUNK_BYTES", int(rng.integers(1, 20)))
        chunks = [c.decode() for c, _ in token_shards.corpus_chunks([str(path)])]
        assert "".join(chunks) == text
        assert ([p for c in chunks for p, _ in pre.pre_tokenize_str(c)]
                == [p for p, _ in pre.pre_tokenize_str(text)]), repr(text)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_text_whose_every_line_is_indented_is_cut_before_the_indentations_last_space(
        tmp_path, monkeypatch, kind):
    # After "line\n" comes "    next": a cut there would make "\n" and "   " two pieces where the
    # text has "\n   " and " next"; just before the last space of the indentation it does not.
    # Without a cut, the lines piled up to MAX_PENDING_BYTES and were cut at any line break.
    monkeypatch.setattr(token_shards, "READ_BYTES", 64)
    monkeypatch.setattr(token_shards, "CHUNK_BYTES", 200)
    path = tmp_path / "poem.txt"
    path.write_text("    Shall I compare thee\n\tto a summer's day?\n  \t  Thou art\n\n  more\n" * 80)
    text = load_corpus(path)
    tok = train_tokenizer(text, kind, 300)
    chunks = [c.decode() for c, _ in token_shards.corpus_chunks([str(path)])]
    assert len(chunks) > 2 and "".join(chunks) == text  # cut without reaching MAX_PENDING_BYTES
    pre = train_tokenizer("x", "bpe", 300)._tk.pre_tokenizer
    assert ([p for c in chunks for p, _ in pre.pre_tokenize_str(c)]
            == [p for p, _ in pre.pre_tokenize_str(text)])
    monkeypatch.setattr(token_shards, "MAX_PENDING_BYTES", 200)
    streamed = tokenize_corpus(path, tok, cache_dir=tmp_path / "s", stream=True, progress=False)
    np.testing.assert_array_equal(np.asarray(streamed), _in_memory(path, tok, tmp_path / "m"))


def test_each_line_break_is_looked_at_once_while_no_cut_is_found(tmp_path, monkeypatch):
    # A space before every line break: none is a safe cut, so the text piles up until
    # MAX_PENDING_BYTES; looking at all its line breaks again for every block read was quadratic.
    monkeypatch.setattr(token_shards, "MAX_PENDING_BYTES", 1 << 30)
    monkeypatch.setattr(token_shards, "READ_BYTES", 1000)
    path = tmp_path / "spaced.txt"
    path.write_bytes(b"a line with a space at its end \n" * 4000)
    looked = []
    visible = token_shards._visible
    monkeypatch.setattr(token_shards, "_visible",
                        lambda buf, start, end: looked.append(start) or visible(buf, start, end))
    (text, _), = token_shards.corpus_chunks([str(path)])
    assert text == path.read_bytes() and len(looked) < 3 * 4000


def test_the_piece_table_encodes_as_the_tokenizer(corpus):
    # cpp/pieces.h splits ASCII itself and `regex` splits the rest: both must give the
    # tokenizer's own ids, on the corpus and on text made of the pattern's awkward cases.
    text = load_corpus(corpus) + "\n".join(["x\u00e9 \u65e5 a\u2028b\x1c c\x85d \u00bd 3"] * 3000)
    tok = train_tokenizer(text, "bpe", 400)
    encoder = token_shards._ChunkEncoder(tok.to_str(), "error")
    for part in (text, text[:5000], "plain ascii\n\n  only\t\x0b\x1f\n", "\u00e9" * 9000, "",
                 "don't 's 're 've 'm 'll 'd 'S 'x '' ''s  'tis\n", "  \n \n\n\t x  1 2\x00\x7f!?"):
        regions = list(encoder._regions(part))
        assert "".join(part[lo:hi] for lo, hi, _ in regions) == part
        np.testing.assert_array_equal(encoder(part), tok.encode(part))
    # Random strings over the characters each alternative of the pattern turns on.
    rng = np.random.default_rng(0)
    alphabet = list("ab'srtvelmdS09 \n\t\x0b\x1c.!-_") + ["'s", "'ll", " '", "\u00e9", "\u3000"]
    for _ in range(300):
        part = "".join(rng.choice(alphabet, size=int(rng.integers(1, 60))))
        np.testing.assert_array_equal(encoder(part), tok.encode(part), err_msg=repr(part))


def test_the_piece_table_gives_the_same_ids_after_emptying_itself(corpus, monkeypatch):
    text = load_corpus(corpus)
    tok = train_tokenizer(text, "bpe", 400)
    monkeypatch.setattr(token_shards, "_MAX_PIECE_CACHE", 40)  # far fewer than the distinct pieces
    monkeypatch.setattr(token_shards, "_ADD_BATCH", 7)  # new pieces reach `tokenizers` in batches
    encoder = token_shards._ChunkEncoder(tok.to_str(), "error")
    for part in (text[:20_000], text[20_000:45_000], text):
        np.testing.assert_array_equal(encoder(part), tok.encode(part))
        assert len(encoder.table) <= max(40, len(set(encoder.pattern.findall(part))))


def test_special_token_text_in_a_corpus_is_read_as_text(tmp_path):
    # As Tokenizer.encode reads it: a corpus cannot forge a special token, streamed or not.
    root = tmp_path / "special"
    root.mkdir()
    (root / "a.txt").write_text("First story.\n<|endoftext|>\nSecond story, caf\u00e9.\n" * 500)
    tok = train_tokenizer(load_corpus(root), "bpe", 300)
    streamed = np.asarray(tokenize_corpus(str(root), tok, cache_dir=tmp_path / "s", stream=True))
    np.testing.assert_array_equal(streamed, _in_memory(str(root), tok, tmp_path / "m"))
    assert not np.isin(streamed, [tok.special_id(s) for s in SPECIAL_TOKENS]).any()


def test_the_piece_table_refuses_what_it_cannot_split():
    from lmlab import _core
    with pytest.raises(ValueError, match="128 bytes"):
        _core.PieceTable(b"\x00" * 5)
    with pytest.raises(ValueError, match="0-3"):
        _core.PieceTable(b"\x07" * 128)
    table = _core.PieceTable(bytes(128))
    with pytest.raises(ValueError, match="must be ASCII"):
        table.encode("caf\u00e9".encode())
    with pytest.raises(ValueError, match="sum to 3 but text has 5"):
        table.encode(b"hello", np.array([1, 2], np.int64))
    with pytest.raises(ValueError, match="must be > 0"):
        table.encode(b"hello", np.array([5, 0], np.int64))
    with pytest.raises(TypeError, match="int64"):
        table.encode(b"hello", np.array([5], np.int32))
    with pytest.raises(ValueError, match="2 pieces but 1 counts"):
        table.add([b"a", b"b"], np.array([1], np.int32), np.array([1], np.int64))
    with pytest.raises(ValueError, match="counts sum to 1 but there are 2 ids"):
        table.add([b"a"], np.array([1, 2], np.int32), np.array([1], np.int64))
    table.add([b"ab", b"c"], np.array([7, 8, 9], np.int32), np.array([2, 1], np.int64))
    ids, missing = table.encode(b"abcd", np.array([2, 1, 1], np.int64))
    assert ids is None and missing == [b"d"]
    ids, missing = table.encode(b"abc", np.array([2, 1], np.int64))
    assert ids.tolist() == [7, 8, 9] and missing == [] and len(table) == 2


@pytest.mark.parametrize("stream", [True, False])
def test_temporaries_of_a_killed_pass_are_removed_when_the_cache_is_next_used(tmp_path, corpus,
                                                                              stream):
    """kill -9 while a shard (or the in-memory path's cache file) is written leaves its temporary
    file; once the cache is whole it is only read, so using it sweeps those no writer has touched
    for files.ABANDONED_AFTER_S, and leaves a fresh one (a live writer's)."""
    import time

    from lmlab.files import ABANDONED_AFTER_S
    tok = train_tokenizer(load_corpus(corpus), "char")
    cache = tmp_path / "cache"
    first = np.asarray(tokenize_corpus(corpus, tok, cache_dir=cache, stream=stream, progress=False))
    directory = next(cache.glob("tokens/stream-*")) if stream else cache / "tokens"
    name = ".shard_00003.bin" if stream else ".0123abcd.int32"  # as files.atomic_write names them
    stale, fresh = directory / f"{name}.k1lled.tmp", directory / f"{name}.l1ve.tmp"
    for p in (stale, fresh):
        p.write_bytes(b"partial")
    old = time.time() - ABANDONED_AFTER_S - 60
    os.utime(stale, (old, old))
    again = tokenize_corpus(corpus, tok, cache_dir=cache, stream=stream, progress=False)
    np.testing.assert_array_equal(np.asarray(again), first)
    assert not stale.exists() and fresh.exists()
