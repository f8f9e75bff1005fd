"""How an lmlab GPT corresponds to Hugging Face transformers' GPT-2 (GPT2LMHeadModel): parameter
names and layouts, the config.json fields and the values lmlab's GPT fixes, the chat template in
Jinja. hf_export.py writes a transformers directory with these rules, hf_import.py reads one.

lmlab's parameter h.{i}.attn.c_attn.weight is transformers' transformer.h.{i}.attn.c_attn.weight:
same names under "transformer.", except the embeddings (lmlab "wte" is "transformer.wte.weight").
GPT-2's linear layers are Conv1D modules, which store their weight as (in, out); lmlab stores
(out, in) like torch.nn.Linear, so those four weights per block are transposed on the way across.
c_attn packs q, k and v along its output in that order in both. The LM head is tied to wte in
both, so transformers' lm_head.weight is not stored.
"""

from __future__ import annotations

import json

import numpy as np

from .chat import TEMPLATE
from .model import GPTConfig, parameter_layout
from .reference import LAYERNORM_EPS

HF_PREFIX = "transformer."
LM_HEAD = "lm_head.weight"
# transformers' names for GPT-2's tanh-form GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
# the one lmlab computes (cpp/gelu.cpp); "gelu_fast" writes sqrt(2/pi) as 0.7978845608, equal in fp32,
# and "gelu_accurate" and "gelu_python_tanh" are the same formula written out again.
GELU_NAME = "gelu_new"
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate", "gelu_python_tanh")
# The weights transposed between lmlab's (out, in) and Conv1D's (in, out).
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                    "mlp.c_proj.weight")


def hf_name(name: str) -> str:
    """transformers' name of an lmlab parameter."""
    return HF_PREFIX + (name + ".weight" if name in ("wte", "wpe") else name)


def is_transposed(name: str) -> bool:
    """Whether an lmlab parameter is stored transposed by transformers (a Conv1D weight)."""
    return name.endswith(_CONV1D_SUFFIXES)


def name_map(cfg: GPTConfig) -> list:
    """(lmlab name, transformers name, lmlab shape, transposed) of every parameter, storage order."""
    return [(name, hf_name(name), shape, is_transposed(name))
            for name, shape in parameter_layout(cfg)]


def to_hf(name: str, array: np.ndarray) -> np.ndarray:
    """An lmlab parameter laid out as transformers stores it."""
    return np.ascontiguousarray(array.T) if is_transposed(name) else array


def from_hf(name: str, array: np.ndarray) -> np.ndarray:
    """A transformers tensor laid out as the lmlab parameter `name`."""
    return np.ascontiguousarray(array.T) if is_transposed(name) else array


def gpt2_config(cfg: GPTConfig, *, bos_id: int, eos_id, pad_id: int) -> dict:
    """config.json of a GPT2LMHeadModel that computes what lmlab's GPT of `cfg` computes.

    eos_id is one id or a list of them (transformers stops generating at any). Dropout is 0: lmlab
    trains without it, so training the export in transformers does the same."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": GELU_NAME, "layer_norm_epsilon": LAYERNORM_EPS,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False,
        "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
    }


def chat_template_jinja(template: dict = TEMPLATE) -> str:
    """The Jinja chat template of lmlab's instruct format (instruct.render): a user or system turn
    is <|user|> + content, an assistant turn <|assistant|> + content + <|end|>, and the generation
    prompt <|assistant|>; any other role is an error, as in lmlab."""
    user, assistant, end = (json.dumps(template[k]) for k in ("user", "assistant", "end"))
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' or message['role'] == 'system' -%}"
        "{{ " + user + " + message['content'] }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ " + assistant + " + message['content'] + " + end + " }}"
        "{%- else -%}"
        "{{ raise_exception(\"message role must be 'user', 'system' or 'assistant', got \" "
        "+ message['role']) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + assistant + " }}{%- endif -%}"
    )
