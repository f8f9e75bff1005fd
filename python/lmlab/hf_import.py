"""`lmlab import HF_DIR --run RUN`: a local Hugging Face GPT-2 checkpoint (GPT-2 124M, distilgpt2,
any saved GPT2LMHeadModel) as an lmlab run, which sample, finetune, instruct, dpo and rlhf take
like any other. Nothing is downloaded: HF_DIR is a directory the user has.

HF_DIR holds config.json (model_type "gpt2"), the weights (model.safetensors, a sharded
model.safetensors.index.json, or pytorch_model.bin or its sharded pytorch_model.bin.index.json,
read with PyTorch's weights-only loader where PyTorch is installed; float32, float16, bfloat16 or
float64, read as float32) and tokenizer.json.

Refused, each in one line naming the feature: another model type or architecture, an activation
other than GPT-2's tanh GELU, an MLP width other than 4C, attention scaled otherwise than by
1/sqrt(head size) (scale_attn_weights false, scale_attn_by_inverse_layer_idx), cross-attention, a
layer norm epsilon other than lmlab's 1e-5, an LM head that is not wte (untied, or a stored
lm_head.weight that differs), a missing tensor (a layer without bias), tensors lmlab has no place
for, a tokenizer that is neither byte-level BPE nor an lmlab char tokenizer or that does not give
text back exactly, one that transformers encodes or decodes otherwise than lmlab reads it (a
post-processor adding tokens, a char tokenizer with another pre-tokenizer, decoder or unknown
token, add_prefix_space in tokenizer_config.json for GPT-2's tokenizer class), a tokenizer whose
size is not the model's vocab_size, and a model beyond the bounds every verb checks when it loads a
run (checkpoint.MAX_BLOCK positions, which block_size crops, MAX_PARAMS parameters, ...).
reorder_and_upcast_attn is accepted: it computes the same attention (in fp32, as lmlab does).
Truncation and padding saved in tokenizer.json are ignored, as transformers ignores them. Dropout
settings are not kept: lmlab trains without dropout.

The model's own end-of-text tokens (eos_token_id in config.json and generation_config.json, an id
or a list; eos_token in tokenizer_config.json and special_tokens_map.json), where they are other
than <|endoftext|> (e.g. "</s>"), are recorded as the run's train.eos_tokens: generation from the
run, and from every run tuned from it, stops at them as well as at lmlab's own end token, as
transformers' generation stops at them. One the vocabulary lacks is left out with a warning.

An lmlab tokenizer holds the special tokens <|endoftext|>, <|user|>, <|assistant|> and <|end|>
(tokenizer.SPECIAL_TOKENS; instruct tuning and the chat template use them). Those the checkpoint's
tokenizer lacks (GPT-2's has only <|endoftext|>) are added after its last id, and the embedding
gains one row for each, the mean of the existing rows, so they start as an average token. Those it
holds as ordinary (not special) tokens are made special, so text spelling one stays text.
`block_size` keeps the first N position embeddings: the same model on contexts of at most N tokens,
which fits fine-tuning a 124M model in a laptop's memory.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import numpy as np

from .chat import TEMPLATE
from .checkpoint import MAX_BLOCK, MAX_EMBD, MAX_LAYERS, MAX_PARAMS, MAX_VOCAB, save_run
from .errors import ConversionError, RunDirError
from .files import JSONTextError, parse_json
from .hf import HF_PREFIX, LM_HEAD, TANH_GELU_NAMES, chat_template_jinja, from_hf, name_map
from .model import GPT, GPTConfig, parameter_layout
from .reference import LAYERNORM_EPS
from .rundir import check_not_transformers, is_run, open_run_dir, report_replaced, settle_overwrite
from .tokenizer import SPECIAL_TOKENS, Tokenizer

ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
# GPT2Config's sizes and their defaults, which transformers uses for one config.json leaves out,
# and the other names (GPT2Config.attribute_map) under which it also reads them.
_SIZE_DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
                  "n_head": 12}
_SIZE_ALIASES = {"n_positions": "max_position_embeddings", "n_embd": "hidden_size",
                 "n_layer": "num_hidden_layers", "n_head": "num_attention_heads"}
# Buffers some GPT-2 checkpoints store (the causal mask), not parameters.
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_FLOAT_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}
# Text a tokenizer must give back exactly: ASCII, whitespace runs, accents, CJK, an emoji.
_ROUND_TRIP_PROBE = "Hello, world!\n\tdef f(x):  return x ** 2  # ok\r\ncafé naïve 東京 🙂 <>|"


def _refuse(where, what: str) -> ConversionError:
    return ConversionError(f"{where}: {what}")


# -- config.json -----------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a transformers model directory holds "
                                "config.json, the weights and tokenizer.json")
    try:
        data = parse_json(path.read_bytes())
    except OSError as e:
        raise _refuse(path, f"cannot read it ({e.strerror})") from None
    except JSONTextError as e:
        raise _refuse(path, str(e)) from None
    if not isinstance(data, dict):
        raise _refuse(path, "expected a JSON object")
    return data


def model_config(hf: dict, path: Path) -> GPTConfig:
    """lmlab's GPTConfig of a transformers GPT-2 config.json, or ConversionError naming the first
    feature lmlab's GPT cannot represent."""
    kind = hf.get("model_type")
    if kind != "gpt2":
        raise _refuse(path, f"model_type {kind!r} is not 'gpt2'; lmlab's GPT is GPT-2's "
                            "architecture (learned absolute position embeddings, LayerNorm with "
                            "biases, GELU MLP, tied LM head) and imports only GPT-2 checkpoints")
    listed = hf.get("architectures") or []
    if isinstance(listed, str):  # one name where transformers writes a list of them
        listed = [listed]
    if not isinstance(listed, list):
        raise _refuse(path, f"architectures is {type(listed).__name__} {listed!r}, where a list of "
                            "class names (e.g. [\"GPT2LMHeadModel\"]) is expected")
    archs = [a for a in listed if a not in ARCHITECTURES]
    if archs:
        raise _refuse(path, f"architecture {archs[0]} has parts lmlab's GPT lacks; lmlab imports "
                            f"{' or '.join(ARCHITECTURES)}")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELU_NAMES:
        raise _refuse(path, f"activation_function {act!r} is not lmlab's GELU, GPT-2's tanh form "
                            f"({', '.join(TANH_GELU_NAMES)})")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or np.float32(eps) != np.float32(LAYERNORM_EPS):
        raise _refuse(path, f"layer_norm_epsilon {eps!r} is not lmlab's {LAYERNORM_EPS} (fixed in "
                            "its LayerNorm kernel)")
    if hf.get("scale_attn_weights", True) is not True:
        raise _refuse(path, "scale_attn_weights is false: lmlab's attention always scales scores "
                            "by 1/sqrt(head size)")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise _refuse(path, "scale_attn_by_inverse_layer_idx is true: lmlab's attention scales "
                            "scores by 1/sqrt(head size) only, not by 1/layer")
    if hf.get("add_cross_attention", False):
        raise _refuse(path, "add_cross_attention is true: lmlab's GPT has no cross-attention")
    sizes = {}
    for key, default in _SIZE_DEFAULTS.items():
        # transformers reads a size under its other name where the file has one (that name wins
        # over GPT-2's own), and GPT2Config's default where it has neither.
        alias = _SIZE_ALIASES.get(key)
        name = alias if alias in hf else key
        v = hf.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _refuse(path, f"{name} must be a positive integer, got {v!r}")
        sizes[key] = v
    inner = hf.get("n_inner")
    if inner is not None and inner != 4 * sizes["n_embd"]:
        raise _refuse(path, f"n_inner {inner!r} is not 4 * n_embd = {4 * sizes['n_embd']}: "
                            "lmlab's MLP is 4 times the model width")
    if sizes["n_embd"] % sizes["n_head"]:
        raise _refuse(path, f"n_embd {sizes['n_embd']} is not divisible by n_head {sizes['n_head']}")
    return GPTConfig(vocab_size=sizes["vocab_size"], block_size=sizes["n_positions"],
                     n_layer=sizes["n_layer"], n_head=sizes["n_head"], n_embd=sizes["n_embd"])


def _check_loadable(cfg: GPTConfig, path: Path, cropped: bool) -> None:
    """Refuse, before the weights are read, a model larger than a run may be (checkpoint.py's
    bounds, which every verb checks when it loads a run): imported, it could never be loaded."""
    context = ("block_size" if cropped else "n_positions", cfg.block_size, MAX_BLOCK,
               "" if cropped else "; --block-size N keeps its first N positions")
    for name, value, top, hint in (context, ("n_layer", cfg.n_layer, MAX_LAYERS, ""),
                                   ("n_embd", cfg.n_embd, MAX_EMBD, ""),
                                   ("vocab_size", cfg.vocab_size, MAX_VOCAB, "")):
        if value > top:
            raise _refuse(path, f"{name} {value} is more than the {top} an lmlab run holds{hint}")
    n = sum(math.prod(shape) for _, shape in parameter_layout(cfg))
    if n > MAX_PARAMS:
        raise _refuse(path, f"the model has {n:,} parameters, more than the {MAX_PARAMS:,} an "
                            "lmlab run holds")


# -- weights ---------------------------------------------------------------------------------------

def _read_safetensors(path: Path) -> dict:
    """{name: float32 array} of a safetensors file of float tensors (bf16 widened exactly)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else size
            if n > size - 8:
                raise _refuse(path, "not a safetensors file (its header is longer than the file)")
            header = parse_json(f.read(n))
            if not isinstance(header, dict):
                raise _refuse(path, "not a safetensors file (its header is not a JSON object)")
            out = {}
            for name, t in header.items():
                if name == "__metadata__" or _BUFFER.fullmatch(name.removeprefix(HF_PREFIX)):
                    continue
                dtype = _FLOAT_DTYPES.get(t.get("dtype"))
                if dtype is None:
                    raise _refuse(path, f"tensor {name!r} has dtype {t.get('dtype')}; lmlab reads "
                                        f"float tensors ({', '.join(_FLOAT_DTYPES)})")
                start, end = t["data_offsets"]
                f.seek(8 + n + start)
                raw = f.read(end - start)
                a = np.frombuffer(raw, dtype=dtype)
                if len(raw) != end - start or a.size != int(np.prod(t["shape"])):
                    raise _refuse(path, f"tensor {name!r} is truncated or its offsets do not hold it")
                if t["dtype"] == "BF16":  # bfloat16 is the top half of a float32
                    a = (a.astype("<u4") << 16).view("<f4")
                out[name] = a.astype(np.float32).reshape(t["shape"])
            return out
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConversionError):
            raise
        raise _refuse(path, f"not a valid safetensors file ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise _refuse(path, f"cannot read it: {e.strerror}") from None


def _read_torch_bin(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise _refuse(path, "reading pytorch_model.bin needs PyTorch, which is not installed; "
                            "install torch, or save the model as model.safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # no code runs: weights only
    except Exception as e:  # torch raises many types for a damaged or unsafe file
        raise _refuse(path, f"cannot read it with torch.load(weights_only=True): {str(e)[:200]}") from None
    if not isinstance(state, dict):  # what save_pretrained writes: {name: tensor}
        raise _refuse(path, f"holds a {type(state).__name__}, not a state dict ({{name: tensor}}, "
                            "what transformers' save_pretrained writes)")
    return {k: v.float().numpy() for k, v in state.items()
            if hasattr(v, "numpy") and not _BUFFER.fullmatch(k.removeprefix(HF_PREFIX))}


def _read_sharded(index: Path, read_shard) -> dict:
    """The tensors of a sharded checkpoint: every shard its index's weight_map names, each read
    by read_shard (transformers writes both formats' indexes alike)."""
    shards = _read_json(index).get("weight_map")
    if not isinstance(shards, dict):
        raise _refuse(index, 'no "weight_map" object')
    tensors = {}
    for shard in sorted(set(shards.values())):
        tensors.update(read_shard(index.parent / os.path.basename(str(shard))))
    return tensors


# Where a transformers directory keeps its weights, in the order transformers prefers them, and how
# each is read.
_WEIGHT_FILES = (("model.safetensors", _read_safetensors),
                 ("model.safetensors.index.json", lambda p: _read_sharded(p, _read_safetensors)),
                 ("pytorch_model.bin", _read_torch_bin),
                 ("pytorch_model.bin.index.json", lambda p: _read_sharded(p, _read_torch_bin)))


def read_weights(hf_dir: Path) -> dict:
    """{name without "transformer.": float32 array} of the checkpoint's weights."""
    for name, read in _WEIGHT_FILES:
        if (hf_dir / name).is_file():
            tensors = read(hf_dir / name)
            break
    else:
        raise FileNotFoundError(f"{hf_dir} holds no weights: expected "
                                f"{', '.join(n for n, _ in _WEIGHT_FILES[:-1])} or "
                                f"{_WEIGHT_FILES[-1][0]}")
    return {k.removeprefix(HF_PREFIX): v for k, v in tensors.items()}


def _place_weights(model: GPT, cfg: GPTConfig, tensors: dict, hf: dict, where: Path) -> None:
    """Copy the checkpoint's tensors into `model` (whose vocabulary and context may be larger
    and smaller than the checkpoint's: rows are added, positions cropped)."""
    expected = {}
    for name, hname, shape, transposed in name_map(cfg):
        expected[hname.removeprefix(HF_PREFIX)] = (name, shape[::-1] if transposed else shape)
    missing = [k for k in expected if k not in tensors]
    if missing:
        why = ("lmlab's layers all have biases" if missing[0].endswith(".bias")
               else "lmlab's GPT needs it")
        raise _refuse(where, f"the checkpoint has no tensor {missing[0]} ({why}); "
                             f"{len(missing)} missing in all")
    extra = sorted(k for k in tensors if k not in expected and k != LM_HEAD)
    if extra:
        raise _refuse(where, f"the checkpoint holds tensors lmlab's GPT has no place for: "
                             f"{', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    for key, (name, shape) in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise _refuse(where, f"tensor {key} has shape {tuple(tensors[key].shape)}, but "
                                 f"config.json's sizes need {tuple(shape)}")
    # lmlab's LM head is wte. A stored lm_head.weight that is not wte is the head transformers
    # computes with, tied or not (transformers 5 unties a model whose checkpoint holds both with
    # different values); untied and not stored, transformers' head is random. Either is refused.
    head = tensors.get(LM_HEAD)
    if head is not None and not np.array_equal(head, tensors["wte.weight"]):
        raise _refuse(where, "lm_head.weight is not wte (transformers computes with the stored "
                             "head, so the LM head is untied whatever tie_word_embeddings says): "
                             "lmlab's LM head is the token embedding wte")
    if head is None and not hf.get("tie_word_embeddings", True):
        raise _refuse(where, "the LM head is untied (tie_word_embeddings is false and "
                             "lm_head.weight is missing): lmlab's LM head is the token embedding wte")
    params = model.named_parameters()
    for key, (name, _) in expected.items():
        w = from_hf(name, tensors.pop(key))
        if name == "wte":
            params[name][: len(w)] = w
            params[name][len(w):] = w.mean(axis=0, dtype=np.float64)  # added special tokens
        elif name == "wpe":
            params[name][...] = w[: model.config.block_size]
        else:
            params[name][...] = w


# -- tokenizer -------------------------------------------------------------------------------------

def read_tokenizer(hf_dir: Path, vocab_size: int):
    """(lmlab Tokenizer, special tokens added) of HF_DIR/tokenizer.json, checked."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: lmlab imports a model with its fast tokenizer "
                                "(in transformers, AutoTokenizer.from_pretrained(d).save_pretrained(d) "
                                "writes one)")
    try:
        tk = HFTokenizer.from_file(os.fspath(path))
    except Exception as e:  # the library raises its own Exception type
        raise _refuse(path, f"not a valid tokenizer.json: {str(e)[:200]}") from None
    # Truncation and padding saved in the file are settings of a call, not of the vocabulary:
    # transformers turns them off for a call that asks for neither, and lmlab's encode is always
    # such a call (the whole text, unpadded).
    tk.no_truncation()
    tk.no_padding()
    spec = json.loads(tk.to_str())
    kind = type(tk.model).__name__
    parts = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if kind == "BPE" and (parts.count('"ByteLevel"') < 2 or spec.get("normalizer") is not None):
        raise _refuse(path, "a BPE tokenizer that is not byte-level (GPT-2's kind: a ByteLevel "
                            "pre-tokenizer and decoder, no normalizer); lmlab's BPE tokenizers "
                            "are byte-level")
    if kind not in ("BPE", "WordLevel"):
        raise _refuse(path, f"a {kind} tokenizer; lmlab's tokenizers are byte-level BPE or "
                            "character-level")
    n = tk.get_vocab_size(with_added_tokens=True)
    if n != vocab_size:
        raise _refuse(path, f"the tokenizer has {n} tokens but the model's vocab_size is "
                            f"{vocab_size}; they must be equal")
    vocab = tk.get_vocab(with_added_tokens=True)
    added = [s for s in SPECIAL_TOKENS if s not in vocab]
    # lmlab's special tokens the checkpoint holds as ordinary tokens become special, as in every
    # lmlab tokenizer: text that spells one ("<|end|>" typed by a user) is then encoded as text, and
    # never ends a turn or forges a role (tokenizer.py).
    special = {t.content for t in tk.get_added_tokens_decoder().values() if t.special}
    tk.add_special_tokens(added + [AddedToken(s, special=True) for s in SPECIAL_TOKENS
                                   if s in vocab and s not in special])
    tok = Tokenizer.from_str(tk.to_str(), source=path)
    if tok.kind == "bpe" and tok.decode(tok.encode(_ROUND_TRIP_PROBE)) != _ROUND_TRIP_PROBE:
        raise _refuse(path, "the tokenizer does not give text back exactly (decode(encode(x)) != "
                            "x); lmlab's tokenizers must")
    _check_same_tokens(tk, tok, vocab, path)
    return tok, added


def _check_same_tokens(tk, tok: Tokenizer, vocab: dict, path: Path) -> None:
    """Refuse a tokenizer that the tokenizers library (what transformers runs, on the checkpoint
    and on its export alike) encodes or decodes otherwise than lmlab's Tokenizer of the same
    tokenizer.json: the model would be given ids it was not trained on. lmlab's char tokenizer reads
    one token per character and U+FFFD for a character it lacks, whatever the file's pre-tokenizer,
    model and decoder say, and lmlab's encode adds no tokens to the text."""
    probe = _ROUND_TRIP_PROBE
    if tok.kind == "char":  # every character it knows, and one it does not
        known = sorted(t for t in vocab if len(t) == 1)
        unseen = next(chr(c) for c in range(0xE000, 0x110000) if chr(c) not in vocab)
        probe += "".join(known) + unseen
    ours = tok.encode(probe, unknown="replace").tolist()
    try:
        theirs = tk.encode(probe).ids
        plain = tk.encode(probe, add_special_tokens=False).ids
        text = tk.decode(ours, skip_special_tokens=False)
    except Exception as e:  # the library raises its own Exception type
        raise _refuse(path, f"the tokenizer cannot encode and decode text: {str(e)[:200]}") from None
    if theirs != ours and plain == ours:
        extra = [t for t in theirs if t not in ours] or theirs
        raise _refuse(path, f"the tokenizer's post-processor adds {tk.id_to_token(extra[0])!r} to "
                            "every text; lmlab's encode adds no tokens, so its prompts would lack it")
    if theirs != ours:
        at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b),
                  min(len(theirs), len(ours)))
        how = ("one token per character, U+FFFD for an unseen one" if tok.kind == "char"
               else "byte-level BPE")
        raise _refuse(path, f"the tokenizers library encodes text with this tokenizer otherwise "
                            f"than lmlab reads it ({how}): token {at} is "
                            f"{tk.id_to_token(theirs[at]) if at < len(theirs) else None!r}, lmlab's "
                            f"{tk.id_to_token(ours[at]) if at < len(ours) else None!r}")
    if text != tok.decode(ours):
        raise _refuse(path, "the tokenizers library decodes ids with this tokenizer otherwise "
                            f"than lmlab does (its decoder gives {text[:24]!r} for lmlab's "
                            f"{tok.decode(ours)[:24]!r})")


def _check_tokenizer_config(hf_dir: Path) -> None:
    """Refuse tokenizer_config.json settings with which transformers encodes otherwise than
    tokenizer.json says: its GPT-2 tokenizer (the class AutoTokenizer picks for a gpt2 model that
    names none) puts a space before every text when add_prefix_space is true."""
    path = hf_dir / "tokenizer_config.json"
    if not path.is_file():
        return
    config = _read_json(path)
    cls = config.get("tokenizer_class")
    if config.get("add_prefix_space") and (cls is None or str(cls).startswith("GPT2Tokenizer")):
        raise _refuse(path, f"add_prefix_space is true: transformers' {cls or 'GPT2Tokenizer'} "
                            "then puts a space before every text, which lmlab's byte-level BPE "
                            "never adds")


def _chat_template(hf_dir: Path):
    """lmlab's template when the checkpoint's chat template is lmlab's (a run exported by lmlab
    after instruct tuning), else None. The template is where transformers reads it: the file
    chat_template.jinja where there is one (what save_pretrained writes since transformers 4.43,
    so an export loaded and saved again by transformers keeps it there), else tokenizer_config.json's
    "chat_template"."""
    jinja_file, config = hf_dir / "chat_template.jinja", hf_dir / "tokenizer_config.json"
    if jinja_file.is_file():
        try:
            jinja = jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise _refuse(jinja_file, f"cannot read it as UTF-8 text ({e})") from None
    elif config.is_file():
        jinja = _read_json(config).get("chat_template")
    else:
        return None
    return dict(TEMPLATE) if jinja == chat_template_jinja(TEMPLATE) else None


def _eos_tokens(hf_dir: Path, hf: dict, tok: Tokenizer, vocab_size: int) -> tuple:
    """(the checkpoint's end-of-text tokens other than <|endoftext|>, warnings): every token it
    declares as its end of text, where transformers reads them: config.json's and
    generation_config.json's eos_token_id (an id or a list of ids), tokenizer_config.json's and
    special_tokens_map.json's eos_token (a string, or an object with its "content"). transformers
    stops generating at any of them, so lmlab's generation does too (chat.stop_ids). One the
    vocabulary lacks (an id beyond the model's vocab_size, as a GPT-2 config's default 50256 in a
    smaller vocabulary; a string tokenizer.json has no token for) is one the model can never
    produce: it is left out, with a warning naming it. Returned as token strings, by id."""
    found, warnings = {}, []

    def ignore(path: Path, what: str) -> None:
        warnings.append(f"{path.name}'s {what} is not a token of the model's vocabulary of "
                        f"{vocab_size}; the model can never produce it, so generation does not "
                        "stop at it")

    sources = [(hf_dir / "config.json", hf)]
    for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_dir / name).is_file():
            sources.append((hf_dir / name, _read_json(hf_dir / name)))
    for path, data in sources:
        ids = data.get("eos_token_id")
        for i in ids if isinstance(ids, list) else [] if ids is None else [ids]:
            if isinstance(i, bool) or not isinstance(i, int):
                raise _refuse(path, f"eos_token_id must be a token id or a list of token ids, got "
                                    f"{ids!r}")
            if not 0 <= i < vocab_size:
                ignore(path, f"eos_token_id {i}")
            else:
                found[tok.token(i)] = i
        token = data.get("eos_token")
        if isinstance(token, dict):  # transformers' AddedToken, saved as an object
            token = token.get("content")
        if token is None:
            continue
        if not isinstance(token, str):
            raise _refuse(path, f"eos_token must be a token's text, got {data.get('eos_token')!r}")
        i = tok.token_id(token)
        if i is None or i >= vocab_size:
            ignore(path, f"eos_token {token!r}")
        else:
            found[token] = i
    found.pop(SPECIAL_TOKENS[0], None)  # lmlab's own end of text, where generation stops anyway
    return tuple(sorted(found, key=found.get)), warnings


# -- the verb --------------------------------------------------------------------------------------

def import_hf(hf_dir, run, *, overwrite: bool = False, block_size: int | None = None) -> dict:
    """Write the transformers GPT-2 checkpoint in `hf_dir` as the lmlab run `run` (module
    docstring). Returns {"run", "model" (its GPTConfig), "added_tokens", "eos_tokens" (the model's
    own end-of-text tokens besides <|endoftext|>), "warnings" (end tokens left out, each a line),
    "checkpoint"}."""
    hf_dir = Path(os.fspath(hf_dir))
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir} is not a directory: pass the directory that holds the "
                                "model's config.json")
    check_not_transformers(run)
    settle_overwrite(run)
    if not overwrite and is_run(run):  # refused before the (long) conversion, as stages do
        raise RunDirError(f"{run} already holds a run; pass --overwrite to replace it, or choose "
                          "another directory")
    hf = _read_json(hf_dir / "config.json")
    cfg = model_config(hf, hf_dir / "config.json")
    if block_size is not None:
        if (isinstance(block_size, bool) or not isinstance(block_size, int)
                or not 1 <= block_size <= cfg.block_size):
            raise ValueError(f"--block-size must be an integer in [1, {cfg.block_size}] (the "
                             f"checkpoint's n_positions), got {block_size!r}")
    tok, added = read_tokenizer(hf_dir, cfg.vocab_size)
    _check_tokenizer_config(hf_dir)
    template = _chat_template(hf_dir)
    # Saved by save_run as the run's train.eos_tokens, and kept by every run tuned from it.
    tok.eos_tokens, warnings = _eos_tokens(hf_dir, hf, tok, cfg.vocab_size)
    run_cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=block_size or cfg.block_size,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    _check_loadable(run_cfg, hf_dir / "config.json", cropped=block_size is not None)
    tensors = read_weights(hf_dir)
    model = GPT(run_cfg)
    _place_weights(model, cfg, tensors, hf, hf_dir)
    del tensors
    train = {"stage": "import", "source": os.fspath(hf_dir.resolve()), "settings": {},
             "precision": "fp32", "added_tokens": added, "n_positions": cfg.block_size,
             "hf": {k: hf.get(k) for k in ("model_type", "architectures", "activation_function",
                                            "transformers_version")}}
    if template:
        train["chat_template"] = template
    with open_run_dir(run, overwrite=overwrite, parent=hf_dir, resumable=False) as handle:
        report_replaced(handle)
        where = save_run(handle, model, tok, train_config=train)
    return {"run": os.fspath(run), "model": model.config, "added_tokens": added,
            "eos_tokens": list(tok.eos_tokens), "warnings": warnings,
            "checkpoint": os.fspath(where)}
