"""`lmlab export RUN --to hf OUT`: a run's current checkpoint as a Hugging Face transformers model
directory, loadable by AutoModelForCausalLM and AutoTokenizer with no lmlab code.

OUT holds config.json (GPT-2's, hf.gpt2_config), model.safetensors (hf.name_map's names and
layouts, float32), generation_config.json, the tokenizer as a fast tokenizer (tokenizer.json,
unchanged from the run, with tokenizer_config.json and special_tokens_map.json naming its special
tokens and, for an instruct-tuned run, the chat template) and a short README.md (a model card).
eos_token_id (config.json, generation_config.json) also lists the model's own end-of-text tokens
where an imported checkpoint declared others (Tokenizer.eos_tokens), so import reads them back; an
instruct-tuned run's generation_config.json lists where its answer stops (chat.reply_stop_ids:
<|end|> first, <|endoftext|> last).
A reward model run is refused: its head has no GPT-2 counterpart, and its transformer is its
parent's, which is the run to export.

Written atomically: everything goes into a temporary directory beside OUT, synced, then renamed to
OUT. An existing OUT is refused unless overwrite=True, and even then only an earlier export is
replaced: an empty directory, or a transformers model directory (a config.json with a model_type)
holding nothing but the files an export writes (EXPORT_FILES). Anything else in it (a checkpoint's
other weights or vocabulary files, a trainer's checkpoint-* folders, a run, .git) is named and
the export refused, so --overwrite never removes what lmlab did not write; nor is OUT ever an
lmlab run or checkpoint, or inside one. The old export is renamed aside, the new one renamed in,
the old one removed. A failed write or Ctrl-C removes the temporary directory and leaves the previous
export (or none) in place; a kill between those two renames leaves the old export as .OUT.old-TIME-*, which
the next export of OUT puts back before it starts (the newest, if several; older ones, left by a
kill before the last removal, are removed).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

from .chat import reply_stop_ids, stop_ids
from .checkpoint import current_checkpoint, load_model
from .errors import CheckpointError, ConversionError
from .files import TEMP_SUFFIX, fsync_dir, json_text, make_parent_dir, write_new_file
from .rundir import CHECKPOINTS_DIR, CURRENT_FILE, MODEL_FILE, REWARD_HEAD_FILE, config_kind, run_path
from .hf import chat_template_jinja, gpt2_config, name_map, to_hf
from .tensorfile import safetensors_chunks
from .tokenizer import SPECIAL_TOKENS

HF_CONFIG_FILE = "config.json"
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "README.md")
_OLD = ".old-"


# The files hf_files writes: what an earlier export holds, and all that --overwrite may replace.
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "README.md")


def hf_files(model, tok, config: dict, source: str) -> dict:
    """{file name: bytes, or buffers for write_new_file} of the transformers directory of
    (model, tokenizer, run config)."""
    cfg = model.config
    params = model.named_parameters()
    tensors = {hname: to_hf(name, params[name]) for name, hname, _, _ in name_map(cfg)}
    template = (config.get("train") or {}).get("chat_template")
    eot = tok.eot_id
    special = {"bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[0],
               "pad_token": SPECIAL_TOKENS[0], "additional_special_tokens": SPECIAL_TOKENS[1:]}
    tok_config = {
        # PreTrainedTokenizerFast reads tokenizer.json as it is (transformers 4 and 5 alike).
        "tokenizer_class": "PreTrainedTokenizerFast", **special,
        "model_max_length": cfg.block_size, "add_bos_token": False, "add_eos_token": False,
        # Decoding must give the text back exactly, as lmlab's does.
        "clean_up_tokenization_spaces": False,
    }
    if template:
        tok_config["chat_template"] = chat_template_jinja(template)
    # The model's own end-of-text tokens (an imported checkpoint's, e.g. "</s>": stop_ids) are
    # eos ids too, and an instruct-tuned run's answer ends at <|end|> and stops at <|endoftext|>
    # (chat.reply_stop_ids), so transformers stops where `lmlab sample` and `chat` do; import
    # reads them back (all but <|endoftext|>, lmlab's own).
    stops = reply_stop_ids(tok) if template else stop_ids(tok, eot)
    generation = {"bos_token_id": eot, "eos_token_id": _ids_or_id(stops), "pad_token_id": eot}
    model_eos = _ids_or_id(stop_ids(tok, eot))
    return {
        "config.json": json_text(gpt2_config(cfg, bos_id=eot, eos_id=model_eos, pad_id=eot)).encode(),
        "generation_config.json": json_text(generation).encode(),
        # transformers requires the "pt" format tag; written straight from the arrays.
        "model.safetensors": safetensors_chunks(tensors, {"format": "pt"}),
        "tokenizer.json": tok.to_str().encode("utf-8"),
        "tokenizer_config.json": json_text(tok_config).encode("utf-8"),
        "special_tokens_map.json": json_text(special).encode("utf-8"),
        "README.md": _model_card(cfg, tok, source, bool(template)).encode("utf-8"),
    }


def _ids_or_id(ids: list):
    """transformers' eos_token_id: one id, or a list where there are several."""
    return ids[0] if len(ids) == 1 else ids


def _model_card(cfg, tok, source: str, chat: bool) -> str:
    n = sum(math.prod(shape) for _, _, shape, _ in name_map(cfg))
    use = ("tok.apply_chat_template([{'role': 'user', 'content': 'Hello'}], "
           "add_generation_prompt=True, return_tensors='pt', return_dict=True)['input_ids']" if chat
           else "tok('Hello', return_tensors='pt')['input_ids']")
    return (f"# GPT-2-architecture model exported by lmlab\n\n"
            f"Exported from the lmlab run `{source}`: {cfg.n_layer} layers, {cfg.n_head} heads, "
            f"width {cfg.n_embd}, context {cfg.block_size}, {n:,} parameters; a {tok.kind} "
            f"tokenizer of {tok.vocab_size} tokens"
            f"{' with the chat template it was instruct-tuned on' if chat else ''}.\n\n"
            "```python\nimport torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained('.')\n"
            "tok = AutoTokenizer.from_pretrained('.')\n"
            f"ids = {use}\n"
            "print(tok.decode(model.generate(ids, attention_mask=torch.ones_like(ids), "
            f"max_new_tokens={max(1, min(50, cfg.block_size // 2))}, do_sample=False)[0]))\n"
            "```\n")


def _is_lmlab_run(directory: Path) -> bool:
    """A run directory (current.json beside checkpoints/) or one of its checkpoints (an lmlab
    config.json beside model.safetensors), not any folder holding a file of such a name."""
    if (directory / CURRENT_FILE).is_file() and (directory / CHECKPOINTS_DIR).is_dir():
        return True
    return (directory / MODEL_FILE).is_file() and config_kind(directory) == "lmlab"


def _check_out(out: Path, run: Path, overwrite: bool) -> list:
    """Refusals before any work; returns what an overwrite replaces."""
    r, o = run.resolve(), out.resolve()
    if o == r or r in o.parents or o in r.parents:
        raise ConversionError(f"the export directory {out} overlaps the run {run}; choose a "
                              "directory outside it")
    for d in (o, *o.parents):
        if _is_lmlab_run(d):  # an export must never replace or sit inside a run's checkpoint
            where = "is" if d == o else "is inside"
            raise ConversionError(f"{out} {where} the lmlab run or checkpoint {d}; choose a "
                                  "directory outside every run")
    if not os.path.lexists(out):
        return []
    if out.is_symlink() or not out.is_dir():
        raise ConversionError(f"{out} exists and is not a directory; choose another output")
    entries = sorted(os.listdir(out))
    if not overwrite:
        raise ConversionError(f"{out} already exists; pass --overwrite to replace it, or choose "
                              "another directory")
    if entries and config_kind(out) != "transformers":
        raise ConversionError(f"{out} is not empty and does not hold a transformers model (a "
                              f"{HF_CONFIG_FILE} with a model_type), so it is not an export "
                              "--overwrite would replace; choose another output")
    if o == Path.cwd().resolve():  # renaming it aside fails (EBUSY), and the shell stays in it
        raise ConversionError(f"{out} is the current directory, which an export cannot replace; "
                              "run the export from the directory above it")
    others = [e for e in entries if e not in EXPORT_FILES]
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ConversionError(f"{out} holds files an lmlab export does not write ({shown}), so "
                              "--overwrite would remove more than an earlier export; choose "
                              "another output, or move them out first")
    return entries


def _old_name(out: Path) -> str:
    """Where an overwrite moves the export it replaces: named by the time, so the newest of
    several sorts last (_restore_interrupted)."""
    return f".{out.name}{_OLD}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def _temp_name(out: Path) -> str:
    """Where an export is written before it is renamed to `out`."""
    return f".{out.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"


def _restore_interrupted(out: Path) -> None:
    """Put back the newest export displaced by an overwrite that was killed between its renames,
    remove older displaced copies (an overwrite killed before removing the one it replaced), and
    remove temporary directories left by killed exports."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return
    olds = []
    # This export's own temporaries only (_temp_name): ".qa.*.tmp" also matched an export to
    # qa.v2 writing beside it, whose work this one deleted.
    own_temp = re.compile(re.escape(f".{out.name}.") + r"[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))
    for name in os.listdir(parent):
        if own_temp.fullmatch(name):
            shutil.rmtree(parent / name, ignore_errors=True)
        elif name.startswith(f".{out.name}{_OLD}"):
            stamp = name[len(f".{out.name}{_OLD}"):]
            olds.append((bool(re.fullmatch(r"\d{20}-[0-9a-f]{8}", stamp)), name))
    olds = [name for _, name in sorted(olds)]  # names without a time (older lmlab) first
    if olds and not os.path.lexists(out):
        os.rename(parent / olds[-1], out)
        print(f"lmlab: restored {out} from {parent / olds[-1]} (an export over it was "
              "interrupted)", file=sys.stderr)
        olds = olds[:-1]
    for name in olds:
        shutil.rmtree(parent / name, ignore_errors=True)


def export_hf(run, out, *, overwrite: bool = False) -> dict:
    """Write the run's current checkpoint as a transformers GPT-2 directory `out` (module
    docstring). Returns {"out", "files", "replaced"}: the directory, its files, and what an
    overwrite replaced."""
    run = run_path(run)  # run_path: "" is not the current directory
    if not os.fspath(out):  # nor for the output (Path("") is "."): it was said to overlap the run
        raise ConversionError("the export directory is empty (''): name the directory to write "
                              "the transformers model into")
    out = Path(os.fspath(out))
    _restore_interrupted(out)
    replaced = _check_out(out, run, overwrite)
    model, tok, config = load_model(run)
    if (current_checkpoint(run) / REWARD_HEAD_FILE).is_file():
        parent = config.get("parent")
        raise ConversionError(
            f"{run} is a reward model: its reward head (a readout of the logits at the last "
            "position and over the response) has no place in a GPT2LMHeadModel, and its "
            f"transformer is its parent's, frozen; export {parent or 'the run it was fitted on'} "
            "for that language model")
    files = hf_files(model, tok, config, os.fspath(run))
    tmp = out.parent / _temp_name(out)
    old = out.parent / _old_name(out)
    swapped = False  # the new export renamed in
    try:
        make_parent_dir(out)
        os.mkdir(tmp)
        for name, data in files.items():
            write_new_file(tmp / name, data)
        fsync_dir(tmp)
        if os.path.lexists(out):
            os.rename(out, old)
        os.rename(tmp, out)
        swapped = True
        fsync_dir(out.parent)
    except BaseException as e:  # a failed write, or Ctrl-C: leave the previous export as it was
        if swapped:  # failed syncing (or Ctrl-C) after the swap: the new export goes back out too
            os.rename(out, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.lexists(old) and not os.path.lexists(out):
            os.rename(old, out)
        if not isinstance(e, (OSError, CheckpointError)):
            raise
        why = (f"cannot write {e.filename or out}: {e.strerror}" if isinstance(e, OSError)
               else str(e))
        kept = "the previous export is unchanged" if replaced else "nothing was written"
        raise ConversionError(f"{why}; {kept}") from None
    shutil.rmtree(old, ignore_errors=True)
    return {"out": os.fspath(out), "files": list(files), "replaced": replaced}


def describe(report: dict) -> str:
    """The verb's closing lines."""
    lines = []
    if report["replaced"]:
        lines.append(f"lmlab: --overwrite replaced {report['out']} ({', '.join(report['replaced'])})")
    lines.append(f"wrote {report['out']}: {', '.join(report['files'])}")
    lines.append(f"load it with transformers.AutoModelForCausalLM.from_pretrained({report['out']!r})")
    return "\n".join(lines)
