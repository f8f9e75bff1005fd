"""Tokenizers: character-level and byte-level BPE behind one interface, saved as tokenizer.json.

Both kinds are `tokenizers`-library tokenizers, so the saved tokenizer.json loads in that library
too. Every tokenizer holds the special tokens in SPECIAL_TOKENS at ids 0..3.

Behaviour worth knowing:
- Special tokens. `encode(text)` treats text as text: a user typing "<|end|>" gets the ids of the
  characters (or byte-level pieces) "<", "|", "end", ..., never the control token, so user input
  cannot end a turn or forge a role. Only `encode(text, allow_special=True)`, for templates written
  by the program, turns the exact strings in SPECIAL_TOKENS into their ids. `decode` always writes
  special tokens out as their strings.
- Characters a char tokenizer has not seen. The vocabulary of a char tokenizer is every distinct
  character of the text it was trained on, plus the special tokens and U+FFFD (the Unicode
  replacement character) at id 4. By default `encode` raises ValueError naming the unseen
  characters and their counts (`unknown_chars(text)` returns the same Counter without raising).
  With `unknown="replace"` they become U+FFFD, with `unknown="skip"` they are dropped; set it on
  the tokenizer (train_tokenizer / load / attribute) or per call. The saved tokenizer.json maps
  unseen characters to U+FFFD, which is what the `tokenizers` library does with it on its own.
- Byte-level BPE represents every string that is valid Unicode (all of UTF-8); only lone surrogate
  code points, which have no UTF-8 form, are "unknown" to it and follow the same policy.
- U+DC80-U+DCFF are how Python reads bytes that are not UTF-8 (a command-line argument typed in a
  Latin-1 terminal); the error for them names the bytes ("text is not UTF-8: it holds byte(s)
  0xe9"), not stand-in characters the user never typed.
- `decode(encode(x)) == x` for every text the tokenizer can represent. A byte-level BPE token may
  hold part of a character (an accent, an emoji), which `decode` of that token alone shows as
  U+FFFD; `token_bytes(i)` gives the token's bytes.
"""

from __future__ import annotations

import collections
import os
import re

import numpy as np

from .errors import CheckpointError
from .files import atomic_write_text

SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
REPLACEMENT_CHAR = "\ufffd"
UNKNOWN_POLICIES = ("error", "replace", "skip")
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens
MAX_TOKENIZER_BYTES = 1 << 28

# The byte-table encoding (Tokenizer._ids_by_bytes): ids 0..253, then two markers.
_BYTE_IDS, _WIDE_BYTE, _UNKNOWN_BYTE = 254, 254, 255
# Byte-level BPE's alphabet (GPT-2's, the `tokenizers` ByteLevel pre-tokenizer's): its vocabulary
# writes each byte as one printable character: "!" to "~", "\xa1" to "\xac" and "\xae" to "\xff"
# as the character of the same code point, the other 68 bytes, in order, as U+0100 onwards.
_PRINTABLE_BYTES = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
_BYTE_OF_CHAR = {chr(b): b for b in _PRINTABLE_BYTES}
_BYTE_OF_CHAR.update({chr(0x100 + n): b for n, b in
                      enumerate(b for b in range(256) if b not in _BYTE_OF_CHAR.values())})
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in sorted(SPECIAL_TOKENS, key=len, reverse=True)) + ")")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _check_policy(unknown: str) -> str:
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown must be one of {UNKNOWN_POLICIES}, got {unknown!r}")
    return unknown


class UnrepresentableText(ValueError):
    """Text holding characters a tokenizer cannot represent, under the policy unknown="error".
    Its message says which and why, not what to do: the callers that take a policy (a corpus
    being tokenized: POLICY_HINT) add that. `name` is the argument the text came from, as given
    to `encode(..., name=)` ("prompt"; None: "text"), so that the command line can show the flag
    instead ("--prompt contains 1 character ..."), as it does for a SettingError."""

    def __init__(self, rest: str, name: str | None = None):
        self.name, self.rest = name, rest
        super().__init__(self.message((name or "text") + " "))

    def message(self, label: str) -> str:
        """The error with the text's source shown as `label` (a name "prompt ", a flag "--prompt ")."""
        return f"{label}{self.rest}"


# What a caller tokenizing a corpus under a policy adds to UnrepresentableText's message.
POLICY_HINT = ("; unknown='skip' (--unknown skip) drops them, unknown='replace' (--unknown "
               "replace) maps them to U+FFFD")


def undecodable_bytes(text) -> list:
    """The bytes, sorted and distinct, that Python read as the lone surrogates U+DC80-U+DCFF
    because they were not UTF-8 (a command-line argument or terminal input typed in Latin-1):
    what an error names instead of those stand-in characters, which nobody typed."""
    return sorted({ord(c) - 0xDC00 for c in text if 0xDC80 <= ord(c) <= 0xDCFF})


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


class Tokenizer:
    """A char-level or byte-level BPE tokenizer (see the module docstring for its behaviour)."""

    def __init__(self, tk, *, unknown: str = "error"):
        """Wrap a `tokenizers.Tokenizer` built by train_tokenizer or read by Tokenizer.load."""
        model_type = type(tk.model).__name__
        if model_type == "WordLevel":
            self.kind = "char"
        elif model_type == "BPE":
            self.kind = "bpe"
        else:
            raise ValueError(f"tokenizer model must be WordLevel (char) or BPE, got {model_type!r}")
        vocab = tk.get_vocab(with_added_tokens=True)
        missing = [s for s in SPECIAL_TOKENS if s not in vocab]
        if missing:
            raise ValueError(f"not an lmlab tokenizer: special tokens {missing} are missing from its vocabulary")
        self._tk = tk
        self.unknown = _check_policy(unknown)
        # The run's chat template (lmlab.chat), or None: set by instruct tuning and load_model,
        # saved by save_run in config.json (not in tokenizer.json, which is the vocabulary alone).
        self.chat_template = None
        # The model's own end-of-text tokens besides <|endoftext|> (an imported checkpoint's eos,
        # e.g. "</s>"), where generation stops too (lmlab.chat.stop_ids): set by import and
        # load_model, saved by save_run in config.json's train section like the chat template.
        self.eos_tokens = ()
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self._special = {s: vocab[s] for s in SPECIAL_TOKENS}
        # The tokens added beside the model's vocabulary (the special tokens, and any an imported
        # tokenizer added): their text is their own, not byte-level characters (token_bytes).
        self._added = frozenset(tk.get_added_tokens_decoder())
        self.eot_id = self._special["<|endoftext|>"]
        if self.kind == "bpe":
            tk.encode_special_tokens = True  # literal "<|end|>" in text stays text (see encode)
        else:
            multi = [t for t in vocab if len(t) != 1 and t not in self._special]
            if multi:
                raise ValueError(f"a char tokenizer's tokens must be single characters; got {multi[:5]}")
            pieces = [None] * self.vocab_size
            for token, i in vocab.items():
                pieces[i] = token
            if any(p is None for p in pieces):
                raise ValueError("char tokenizer vocabulary has gaps in its ids")
            self._pieces = pieces
            chars = sorted((t, i) for t, i in vocab.items() if len(t) == 1)
            # A table from code point to id (-1: not in the vocabulary), one past the largest
            # code point: encoding is one gather over the text's code points.
            codepoints = np.array([ord(c) for c, _ in chars], dtype=np.int64)
            self._table = np.full(int(codepoints.max()) + 2, -1, dtype=np.int32)
            self._table[codepoints] = [i for _, i in chars]
            # Vocabularies of up to _BYTE_IDS ids also map ASCII bytes in one bytes.translate.
            self._byte_table = None
            if self.vocab_size <= _BYTE_IDS:
                ascii_ids = [int(i) if i >= 0 else _UNKNOWN_BYTE for i in self._table[:128]]
                ascii_ids += [_UNKNOWN_BYTE] * (128 - len(ascii_ids))
                self._byte_table = bytes(ascii_ids + [_WIDE_BYTE] * 128)
            if REPLACEMENT_CHAR not in vocab:
                raise ValueError("char tokenizer vocabulary lacks the replacement character U+FFFD")
            self._replacement_id = vocab[REPLACEMENT_CHAR]

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, unknown={self.unknown!r})"

    def special_id(self, token: str) -> int:
        """The id of a special token, e.g. special_id("<|end|>")."""
        if not isinstance(token, str):  # a list failed as "unhashable type"
            raise TypeError(f"token must be a special token's text (str), got {token!r}")
        if token not in self._special:
            raise ValueError(f"{token!r} is not a special token; special tokens are {SPECIAL_TOKENS}")
        return self._special[token]

    def token_id(self, token: str):
        """The id of any token of the vocabulary (special or not), or None where it has none."""
        if not isinstance(token, str):  # the tokenizers library's refusal names no argument
            raise TypeError(f"token must be a token's text (str), got {token!r}")
        return self._tk.token_to_id(token)

    def token(self, i: int):
        """The vocabulary's string of id i (as token_id reads it), or None outside [0, vocab_size)."""
        # int(1.7) would answer for id 1; int("a") would not say which argument it was.
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"token id must be a whole number, got {i!r}")
        return self._tk.id_to_token(int(i)) if 0 <= int(i) < self.vocab_size else None

    def special_tokens(self) -> dict:
        """{id: text} of every special token: SPECIAL_TOKENS, and an imported tokenizer's own
        (such as "</s>"). Text that spells one is encoded as plain text, never as its id."""
        found = {i: t.content for i, t in self._tk.get_added_tokens_decoder().items() if t.special}
        return {**found, **{i: t for t, i in self._special.items()}}

    def token_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes token i stands for in decoded text. A byte-level BPE token may hold
        part of a character (an accented letter or an emoji is often two to four tokens), which
        decoding it alone shows as U+FFFD; its bytes say what it is."""
        token = self.token(i)
        if token is None:
            raise ValueError(f"token id must be in [0, {self.vocab_size}), got {i}")
        if self.kind == "char" or int(i) in self._added:
            return token.encode("utf-8")
        return bytes(_BYTE_OF_CHAR[c] for c in token)

    # -- encoding ---------------------------------------------------------------------------

    def unknown_chars(self, text: str, *, allow_special: bool = False) -> collections.Counter:
        """Characters of `text` that this tokenizer cannot represent, with counts: the characters
        `encode(text, allow_special=allow_special)` would refuse (with allow_special, the exact
        strings in SPECIAL_TOKENS are tokens, not characters to check)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if allow_special:
            text = "".join(_SPECIAL_RE.split(text)[::2])  # even pieces: the text between them
        if self.kind == "bpe":
            return collections.Counter(_SURROGATE_RE.findall(text))
        cps = self._codepoints_of(text)
        missing = ~self._known(cps)
        return collections.Counter(chr(c) for c in cps[missing].tolist())

    def encode(self, text: str, *, allow_special: bool = False, unknown: str | None = None,
               name: str | None = None) -> np.ndarray:
        """Token ids of `text` as int32; `allow_special` and `unknown` as in the module docstring.
        `name`: the argument the text came from ("prompt"), which the error for characters the
        tokenizer cannot represent names in place of "text" (UnrepresentableText)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        policy = _check_policy(unknown) if unknown is not None else self.unknown
        if not allow_special:
            return self._encode_plain(text, policy, name)
        out = []
        for i, piece in enumerate(_SPECIAL_RE.split(text)):
            if i % 2:  # odd pieces are the captured special tokens
                out.append(np.array([self._special[piece]], dtype=np.int32))
            elif piece:
                out.append(self._encode_plain(piece, policy, name))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int32)

    def _encode_plain(self, text: str, policy: str, name: str | None = None) -> np.ndarray:
        if self.kind == "char":
            fast = self._ids_by_bytes(text)
            if fast is not None:
                return fast
            ids = self._ids_of(self._codepoints_of(text))
            known = ids >= 0
            if not known.all():
                self._unknown_policy(text, policy, name)
                ids = ids[known] if policy == "skip" else np.where(known, ids, self._replacement_id)
            return ids.astype(np.int32, copy=False)
        if _SURROGATE_RE.search(text):
            self._unknown_policy(text, policy, name)
            text = _SURROGATE_RE.sub(REPLACEMENT_CHAR if policy == "replace" else "", text)
        return np.asarray(self._tk.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def _unknown_policy(self, text: str, policy: str, name: str | None = None) -> None:
        if policy != "error":
            return
        counts = self.unknown_chars(text)
        shown = ", ".join(f"{c!r} x{n}" for c, n in counts.most_common(20))
        more = f" and {len(counts) - 20} more" if len(counts) > 20 else ""
        total = sum(counts.values())
        if self.kind == "char":
            why = "its vocabulary holds only what the text it was built from holds"
            what = _count(total, "character")
        else:  # byte-level BPE encodes every valid character; only lone surrogates are left
            why = "they are not valid Unicode"
            what = _count(total, "lone surrogate")
        # Name bytes that were not UTF-8 as bytes, not as their stand-ins.
        raw = undecodable_bytes(counts)
        if raw:
            named = ", ".join(f"0x{b:02x}" for b in raw[:20]) + (" and more" if len(raw) > 20 else "")
            stand_ins = ", ".join(repr(chr(0xDC00 + b)) for b in raw[:20])
            other = len(counts) - len(raw)
            also = (f"; it also holds {_count(other, 'other distinct character')} this "
                    f"{self.kind} tokenizer cannot represent") if other else ""
            raise UnrepresentableText(
                f"is not UTF-8: it holds byte(s) {named} (read as {stand_ins}){also}; give "
                "the text as UTF-8", name)
        raise UnrepresentableText(
            f"contains {what} ({len(counts)} distinct) that this {self.kind} tokenizer "
            f"cannot represent: {shown}{more} ({why})", name)

    @staticmethod
    def _codepoints_of(text: str) -> np.ndarray:
        # surrogatepass: lone surrogates become code points too, so they are reported, not crashed on.
        return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")

    def _ids_by_bytes(self, text: str, dtype=np.int32):
        """The ids of text (as `dtype`) through a byte table (ASCII) plus the table of code points
        for the rest; None where the vocabulary is too large for it or lacks a character of text."""
        if self._byte_table is None:
            return None
        return self._ids_by_utf8(text.encode("utf-8", "surrogatepass"), dtype, text)

    def _ids_by_utf8(self, raw: bytes, dtype=np.int32, text: str | None = None):
        """_ids_by_bytes for text given as its UTF-8 bytes (`text`, if given, is raw decoded)."""
        if self._byte_table is None:
            return None
        ids = np.frombuffer(raw.translate(self._byte_table), dtype=np.uint8)
        if (ids == _UNKNOWN_BYTE).any():
            return None
        if raw.isascii():
            return ids if ids.dtype == dtype else ids.astype(dtype)
        ids = ids[(np.frombuffer(raw, dtype=np.uint8) & 0xC0) != 0x80].astype(dtype)  # per char
        wide = np.flatnonzero(ids == _WIDE_BYTE)
        if text is None:
            text = raw.decode("utf-8", "surrogatepass")
        wide_ids = self._ids_of(self._codepoints_of(text)[wide])
        if (wide_ids < 0).any():
            return None
        ids[wide] = wide_ids
        return ids

    def _ids_of(self, cps: np.ndarray) -> np.ndarray:
        """The id of each code point, -1 where the vocabulary lacks it."""
        return self._table[np.minimum(cps, len(self._table) - 1)]

    def _known(self, cps: np.ndarray) -> np.ndarray:
        return self._ids_of(cps) >= 0

    # -- decoding ---------------------------------------------------------------------------

    def decode(self, ids) -> str:
        """Text of a sequence of ids; special tokens are written out as their strings."""
        arr = np.asarray(ids)
        if arr.ndim != 1 and arr.size:
            raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
        arr = arr.reshape(-1)
        # Checked in the ids' own dtype: cast to int64 first, a uint64 id >= 2**63 read as negative.
        bad = arr[(arr < 0) | (arr >= self.vocab_size)] if arr.size else arr
        if bad.size:
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got {bad[:5].tolist()}")
        arr = arr.astype(np.int64)
        if self.kind == "char":
            return "".join(self._pieces[i] for i in arr.tolist())
        return self._tk.decode(arr.tolist(), skip_special_tokens=False)

    # -- persistence ------------------------------------------------------------------------

    def to_str(self) -> str:
        """The tokenizer.json text (the `tokenizers` library's format)."""
        return self._tk.to_str(pretty=True)

    def save(self, path) -> None:
        """Write tokenizer.json atomically; `path` is the file, or a directory to write it into."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        atomic_write_text(path, self.to_str())

    @classmethod
    def from_str(cls, s: str, *, unknown: str = "error", source=None) -> "Tokenizer":
        """A tokenizer from tokenizer.json text; `source` (the file it came from) prefixes errors."""
        from tokenizers import Tokenizer as HFTokenizer

        where = f"{os.fspath(source)}: " if source is not None else ""
        try:
            tk = HFTokenizer.from_str(s)
        except Exception as e:  # the library raises its own Exception type for malformed JSON
            raise CheckpointError(f"{where}not a valid tokenizer.json: {str(e)[:200]}") from None
        ids = sorted(tk.get_vocab(with_added_tokens=True).values())
        if ids != list(range(len(ids))):
            raise CheckpointError(f"{where}token ids must be 0..{len(ids) - 1} without gaps or repeats")
        try:
            return cls(tk, unknown=unknown)
        except ValueError as e:
            raise CheckpointError(f"{where}{e}") from None

    @classmethod
    def load(cls, path, *, unknown: str = "error") -> "Tokenizer":
        """Read a tokenizer.json (or a directory holding one) written by `save`."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            if os.path.getsize(path) > MAX_TOKENIZER_BYTES:
                raise CheckpointError(f"{path} is larger than the {MAX_TOKENIZER_BYTES} bytes a "
                                      "tokenizer.json can be")
            with open(path, encoding="utf-8") as f:
                s = f.read()
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
        return cls.from_str(s, unknown=unknown, source=path)


def _char_tokenizer(text: str):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    vocab[REPLACEMENT_CHAR] = len(vocab)
    for c in sorted(set(text)):
        vocab.setdefault(c, len(vocab))
    tk = HFTokenizer(models.WordLevel(vocab, unk_token=REPLACEMENT_CHAR))
    # Every character is its own pre-token ([\s\S] also matches newlines), and Fuse joins them back
    # without separators, so the library on its own encodes and decodes exactly as we do.
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(SPECIAL_TOKENS)
    return tk


def _bpe_tokenizer(text, vocab_size: int):
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # The special strings are removed from the training text so they are never learned as merges.
    texts = [text] if isinstance(text, str) else text
    tk.train_from_iterator((_SPECIAL_RE.sub(" ", _SURROGATE_RE.sub("", t)) for t in texts),
                           trainer=trainer)
    return tk


def train_tokenizer(text: str, kind: str = "char", vocab_size: int = 512, *, unknown: str = "error") -> Tokenizer:
    """Build a tokenizer from `text`.

    kind="char": the vocabulary is the special tokens, U+FFFD, and every distinct character of
    `text` (`vocab_size` is not used). kind="bpe": byte-level BPE with at most `vocab_size` ids
    (>= 260: the 256 bytes plus the special tokens); the vocabulary reaches `vocab_size` when the
    text has enough distinct pairs to merge, and `tokenizer.vocab_size` is always the true size.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if not text:
        raise ValueError("cannot train a tokenizer on empty text")
    _check_policy(unknown)
    if kind == "char":
        return Tokenizer(_char_tokenizer(_SURROGATE_RE.sub("", text)), unknown=unknown)
    if kind == "bpe":
        if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
            raise ValueError(f"vocab_size for a bpe tokenizer must be an int >= {MIN_BPE_VOCAB}, got {vocab_size!r}")
        return Tokenizer(_bpe_tokenizer(_SURROGATE_RE.sub("", text), vocab_size), unknown=unknown)
    raise ValueError(f"kind must be 'char' or 'bpe', got {kind!r}")


def train_tokenizer_on_chunks(chunks, kind: str = "char", vocab_size: int = 512, *,
                              unknown: str = "error") -> Tokenizer:
    """train_tokenizer over a text given as an iterable of chunks, for corpora too large to hold:
    the same tokenizer as train_tokenizer on the chunks joined, when each chunk ends where a piece
    ends (lmlab.token_shards.corpus_chunks cuts there)."""
    _check_policy(unknown)
    if kind == "char":
        seen = np.zeros(0x110000, dtype=bool)
        for chunk in chunks:
            cps = np.frombuffer(chunk.encode("utf-32-le", "surrogatepass"), dtype="<u4")
            seen[: int(cps.max()) + 1 if cps.size else 0] |= np.bincount(cps).astype(bool)
        seen[0xD800:0xE000] = False  # lone surrogates are never in a vocabulary
        return train_tokenizer("".join(map(chr, np.flatnonzero(seen).tolist())), "char",
                               unknown=unknown)
    if kind == "bpe":
        if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB:
            raise ValueError(f"vocab_size for a bpe tokenizer must be an int >= {MIN_BPE_VOCAB}, got {vocab_size!r}")
        return Tokenizer(_bpe_tokenizer(chunks, vocab_size), unknown=unknown)
    raise ValueError(f"kind must be 'char' or 'bpe', got {kind!r}")
