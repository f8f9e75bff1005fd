"""Tokenizers: round trips, special tokens, unseen characters, BPE vocabulary size, save/load.

The reference for our char encoder (a numpy lookup) is the `tokenizers` library itself, run on the
tokenizer.json we save; the reference for unknown-character counts is a plain Python set difference.
"""

import collections
import json
import re

import numpy as np
import pytest

from lmlab.tokenizer import REPLACEMENT_CHAR, SPECIAL_TOKENS, Tokenizer, train_tokenizer

TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog.\n"
    "  Indented line with  double  spaces and a tab\there.\n\n"
    "Unicode: héllo wörld, naïve café, 日本語, emoji 🙂, combining e\u0301.\n"
    "Numbers 0123456789 and symbols !@#$%^&*()[]{}<>|;:'\",./?\\~`-_=+\n"
)
ROUND_TRIP_TEXTS = [
    "",
    "a",
    "The lazy dog.\n\n  two spaces then newline\n",
    "   leading and trailing spaces   ",
    "\n\n\n",
    "héllo 日本語 🙂 e\u0301 café\tTab",
    TRAIN_TEXT,
]


def _words_text(n_words=4000, seed=0, n_distinct=400):
    rng = np.random.default_rng(seed)
    syllables = ["ka", "to", "ri", "men", "sol", "an", "el", "que", "dor", "vi", "ush", "pra"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 5))) for _ in range(n_distinct)]
    return " ".join(rng.choice(words, size=n_words)) + "\n"


@pytest.fixture(scope="module")
def char_tok():
    return train_tokenizer(TRAIN_TEXT, "char")


@pytest.fixture(scope="module")
def bpe_tok():
    return train_tokenizer(TRAIN_TEXT + _words_text(), "bpe", vocab_size=400)


def _hf(tok):
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(tok.to_str())


def test_char_vocab_is_specials_replacement_then_sorted_chars(char_tok):
    chars = sorted(set(TRAIN_TEXT))
    assert char_tok.kind == "char"
    assert char_tok.vocab_size == len(SPECIAL_TOKENS) + 1 + len(chars)
    assert char_tok.decode(np.arange(4)) == "".join(SPECIAL_TOKENS)
    assert char_tok.decode([4]) == REPLACEMENT_CHAR
    assert char_tok.decode(np.arange(5, char_tok.vocab_size)) == "".join(chars)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_char_round_trip_and_matches_tokenizers_library(char_tok, text):
    ids = char_tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1 and len(ids) == len(text)
    assert char_tok.decode(ids) == text
    hf = _hf(char_tok)
    assert ids.tolist() == hf.encode(text, add_special_tokens=False).ids
    assert hf.decode(ids.tolist(), skip_special_tokens=False) == text


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS + ["text never seen: ÆØÅ ℵ ∑ 𝔘𝔫𝔦 \r\n \x00 \u200b"])
def test_bpe_round_trip_any_text(bpe_tok, text):
    ids = bpe_tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert bpe_tok.decode(ids) == text
    assert not bpe_tok.unknown_chars(text)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_token_bytes_are_the_text_s_bytes_also_where_a_token_holds_part_of_a_character(
        kind, char_tok, bpe_tok):
    """inspect-data shows tokens by their bytes: a byte-level token holding part of a character
    decodes alone to U+FFFD, which said nothing about it."""
    from tokenizers import pre_tokenizers
    from lmlab.tokenizer import _BYTE_OF_CHAR
    assert set(_BYTE_OF_CHAR) == set(pre_tokenizers.ByteLevel.alphabet())  # the library's alphabet
    tok = {"char": char_tok, "bpe": bpe_tok}[kind]
    text = "héllo 日本語 🙂 e\u0301 café<|end|>"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    if kind == "bpe":
        assert any(tok.decode([i]) == REPLACEMENT_CHAR for i in ids)  # a split character
    special = tok.special_id("<|end|>")
    assert tok.token_bytes(special) == b"<|end|>" and tok.special_tokens()[special] == "<|end|>"
    assert set(tok.special_tokens().values()) == set(SPECIAL_TOKENS)


def test_bpe_compresses_the_text_it_was_trained_on(bpe_tok):
    text = _words_text(seed=1)
    assert len(bpe_tok.encode(text)) < 0.6 * len(text.encode("utf-8"))


@pytest.mark.parametrize("vocab_size", [260, 300, 777])
def test_bpe_vocab_size_honoured(vocab_size):
    tok = train_tokenizer(_words_text(20000, n_distinct=3000), "bpe", vocab_size=vocab_size)
    assert tok.kind == "bpe"
    assert tok.vocab_size == vocab_size
    assert len(_hf(tok).get_vocab()) == vocab_size
    ids = tok.encode(_words_text(200, seed=3))
    assert ids.min() >= 0 and ids.max() < vocab_size


def test_bpe_training_is_deterministic():
    a = train_tokenizer(_words_text(), "bpe", vocab_size=350)
    b = train_tokenizer(_words_text(), "bpe", vocab_size=350)
    assert a.to_str() == b.to_str()


@pytest.mark.parametrize("vocab_size", [259, 0, -5, 300.0, "512"])
def test_bpe_vocab_size_validated(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer("some text", "bpe", vocab_size=vocab_size)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_special_tokens_present_with_ids_0_to_3(kind, char_tok, bpe_tok):
    tok = char_tok if kind == "char" else bpe_tok
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.special_id(s) == i
        assert tok.decode([i]) == s
    assert tok.eot_id == tok.special_id("<|endoftext|>")
    with pytest.raises(ValueError, match="not a special token"):
        tok.special_id("<|system|>")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_literal_special_text_is_not_a_control_token_by_default(kind, char_tok, bpe_tok):
    tok = char_tok if kind == "char" else bpe_tok
    text = "a <|end|> b <|user|>"
    ids = tok.encode(text)
    assert not set(ids.tolist()) & set(range(len(SPECIAL_TOKENS)))
    assert tok.decode(ids) == text
    ids_special = tok.encode(text, allow_special=True)
    end, user = tok.special_id("<|end|>"), tok.special_id("<|user|>")
    assert ids_special.tolist().count(end) == 1 and ids_special.tolist()[-1] == user
    assert tok.decode(ids_special) == text
    # With specials allowed, the plain pieces are encoded exactly as on their own.
    expect = np.concatenate([tok.encode("a "), [end], tok.encode(" b "), [user]])
    assert ids_special.tolist() == expect.tolist()


def test_char_unknown_chars_error_names_chars_and_counts(char_tok):
    text = "hello ☃☃ ⚡ wörld"
    expected = collections.Counter(c for c in text if c not in set(TRAIN_TEXT))
    assert expected == collections.Counter({"☃": 2, "⚡": 1})
    assert char_tok.unknown_chars(text) == expected
    with pytest.raises(ValueError) as e:
        char_tok.encode(text)
    msg = str(e.value)
    assert "'☃' x2" in msg and "'⚡' x1" in msg and "3 characters (2 distinct)" in msg
    # The same error reaches sample, predict and Model.generate, which take no unknown= policy: the
    # message says why, not which keyword to pass.
    assert "vocabulary holds only what the text it was built from holds" in msg
    assert "unknown=" not in msg
    with pytest.raises(ValueError, match=r"text contains 1 character \(1 distinct\)"):
        char_tok.encode("☃")


def test_char_unknown_fallbacks(char_tok):
    text = "hé☃lo⚡"
    replaced = char_tok.encode(text, unknown="replace")
    assert char_tok.decode(replaced) == "hé" + REPLACEMENT_CHAR + "lo" + REPLACEMENT_CHAR
    skipped = char_tok.encode(text, unknown="skip")
    assert char_tok.decode(skipped) == "hélo"
    # The tokenizer-wide policy applies when the call does not choose one.
    lenient = Tokenizer.from_str(char_tok.to_str(), unknown="skip")
    assert lenient.encode(text).tolist() == skipped.tolist()
    # The saved tokenizer.json, used by the tokenizers library alone, replaces as well.
    assert _hf(char_tok).encode(text).ids == replaced.tolist()
    with pytest.raises(ValueError, match="unknown must be one of"):
        char_tok.encode(text, unknown="ignore")
    with pytest.raises(ValueError, match="unknown must be one of"):
        train_tokenizer("abc", "char", unknown="drop")


def test_unknown_chars_inside_allowed_special_text(char_tok):
    with pytest.raises(ValueError, match="'☃' x1"):
        char_tok.encode("<|user|>☃<|end|>", allow_special=True)
    ids = char_tok.encode("<|user|>☃<|end|>", allow_special=True, unknown="skip")
    assert ids.tolist() == [1, 3]


def test_bpe_lone_surrogates_are_unknown(bpe_tok):
    text = "ab\ud800cd"
    assert bpe_tok.unknown_chars(text) == collections.Counter({"\ud800": 1})
    with pytest.raises(ValueError, match=r"1 lone surrogate \(1 distinct\) that this bpe "
                                         r"tokenizer cannot represent: '\\ud800' x1 \(they are "
                                         r"not valid Unicode\)"):
        bpe_tok.encode(text)
    assert bpe_tok.decode(bpe_tok.encode(text, unknown="replace")) == "ab" + REPLACEMENT_CHAR + "cd"
    assert bpe_tok.decode(bpe_tok.encode(text, unknown="skip")) == "abcd"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_text_that_was_not_utf8_names_its_bytes(kind, char_tok, bpe_tok):
    """Python reads an argument's bytes that are not UTF-8 (Latin-1 'caf\\xe9') as lone surrogates
    U+DC80-U+DCFF: the error named those stand-ins as characters the vocabulary lacks (or, for
    BPE, as invalid Unicode the user never typed); it names the bytes."""
    tok = char_tok if kind == "char" else bpe_tok
    raw = b"caf\xe9 \xff\xe9"
    text = raw.decode("utf-8", "surrogateescape")  # what sys.argv holds for these bytes
    bad = sorted({b for b in raw if b >= 0x80})
    stand_ins = ", ".join(repr(chr(0xDC00 + b)) for b in bad)
    with pytest.raises(ValueError) as e:
        tok.encode(text)
    assert str(e.value) == ("text is not UTF-8: it holds byte(s) 0xe9, 0xff (read as "
                            f"{stand_ins}); give the text as UTF-8")
    if kind == "char":  # a character the vocabulary lacks as well: both are said
        with pytest.raises(ValueError) as e:
            tok.encode(text + "\u2603")
        assert str(e.value) == ("text is not UTF-8: it holds byte(s) 0xe9, 0xff (read as "
                                f"{stand_ins}); it also holds 1 other distinct character this "
                                "char tokenizer cannot represent; give the text as UTF-8")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_round_trip(kind, char_tok, bpe_tok, tmp_path):
    tok = char_tok if kind == "char" else bpe_tok
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    json.loads(path.read_text(encoding="utf-8"))  # plain JSON, in the tokenizers library's format
    loaded = Tokenizer.load(path)
    assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == (tok.kind, tok.vocab_size, tok.eot_id)
    text = "The lazy dog <|end|> héllo\n"
    assert loaded.encode(text).tolist() == tok.encode(text).tolist()
    assert loaded.encode(text, allow_special=True).tolist() == tok.encode(text, allow_special=True).tolist()
    assert loaded.to_str() == tok.to_str()
    # A directory holding tokenizer.json loads too, and save into a directory writes that name.
    tok.save(tmp_path)
    assert Tokenizer.load(tmp_path).to_str() == tok.to_str()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(bad)
    # A valid tokenizers file without our special tokens is refused with the reason.
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    HFTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer.load(tmp_path / "other.json")
    # A word-level vocabulary is not a char tokenizer, even with our special tokens.
    words = {t: i for i, t in enumerate(SPECIAL_TOKENS + [REPLACEMENT_CHAR, "a", "word"])}
    HFTokenizer(models.WordLevel(words, unk_token=REPLACEMENT_CHAR)).save(str(tmp_path / "words.json"))
    with pytest.raises(ValueError, match=r"single characters; got \['word'\]"):
        Tokenizer.load(tmp_path / "words.json")


def test_bad_arguments(char_tok):
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer("", "char")
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer("abc", "word")
    with pytest.raises(TypeError, match="text must be str"):
        char_tok.encode(b"bytes")
    with pytest.raises(ValueError, match=r"ids must be in \[0, "):
        char_tok.decode([0, char_tok.vocab_size])
    with pytest.raises(ValueError, match=r"ids must be in \[0, "):
        char_tok.decode([-1])
    with pytest.raises(TypeError, match="integers"):
        char_tok.decode([1.5])
    assert char_tok.decode([]) == ""
    assert char_tok.encode("").shape == (0,)


@pytest.mark.parametrize("fixture", ["char_tok", "bpe_tok"])
def test_token_takes_whole_ids_and_decode_names_the_id_given(fixture, request):
    tok = request.getfixturevalue(fixture)
    # token(1.7) answered for id 1 (int() truncated it); token("a") failed in int("a").
    for bad in (1.7, "a", None, True):
        with pytest.raises(TypeError, match="token id must be a whole number"):
            tok.token(bad)
    assert tok.token(np.int64(1)) == tok.token(1) == tok._tk.id_to_token(1)
    assert tok.token(tok.vocab_size) is None and tok.token(-1) is None
    # A uint64 id past 2**63 was cast to int64 first and reported as a negative id.
    huge = np.array([1, 2**64 - 1], np.uint64)
    with pytest.raises(ValueError, match=r"got \[18446744073709551615\]"):
        tok.decode(huge)
    assert tok.decode(np.array([1, 2], np.uint64)) == tok.decode([1, 2])


def test_special_id_and_token_id_name_a_non_str_token(char_tok):
    # special_id(["x"]) failed as "unhashable type: 'list'"; token_id(5) in the tokenizers library.
    for call in (char_tok.special_id, char_tok.token_id):
        for bad in (["<|end|>"], 5, None):
            with pytest.raises(TypeError, match=rf"token must be .*\(str\), got {re.escape(repr(bad))}"):
                call(bad)
    assert char_tok.token_id("<|end|>") == char_tok.special_id("<|end|>") == \
        SPECIAL_TOKENS.index("<|end|>")
