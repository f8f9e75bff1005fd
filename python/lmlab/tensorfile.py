"""safetensors files as lmlab reads and writes them: float32 tensors only, the header checked
(names, dtypes, shapes, offsets, file size) before any tensor is allocated, data read straight into
the arrays that will hold it, SHA-256 and size compared with what the checkpoint recorded; written
straight from the arrays' memory (safetensors_chunks), never copied into one bytes object."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .files import JSONTextError, parse_json
from .rundir import CONFIG_FILE

MAX_HEADER = 1 << 26   # bytes of a safetensors JSON header


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_header(path: Path, raw: bytes):
    try:
        return parse_json(raw)
    except JSONTextError as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid: {e}") from None


def _read_header(f, path: Path, size: int, hasher) -> tuple:
    """(tensors {name: (shape, start, end)} in file order, metadata, data start), all checked."""
    if size < 8:
        raise CheckpointError(f"{path} is truncated: {size} bytes, not even a safetensors header")
    raw = f.read(8)
    hasher.update(raw)
    (n,) = struct.unpack("<Q", raw)
    if n > min(size - 8, MAX_HEADER):
        raise CheckpointError(f"{path} is truncated or not a safetensors file: its header claims "
                              f"{n} bytes, the file holds {size}")
    raw = f.read(n)
    hasher.update(raw)
    header = _parse_header(path, raw)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    tensors, spans = {}, []
    for name, t in header.items():
        ok = (isinstance(t, dict) and isinstance(t.get("shape"), list)
              and all(_is_int(d) and d >= 0 for d in t["shape"])
              and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2
              and all(_is_int(o) for o in t["data_offsets"]))
        if not ok:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
        if t.get("dtype") != "F32":
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.get('dtype')}, expected F32 "
                                  "(float32)")
        shape, (start, end) = tuple(t["shape"]), t["data_offsets"]
        if not 0 <= start <= end or end - start != 4 * math.prod(shape):
            raise CheckpointError(f"{path}: tensor {name!r} of shape {shape} has data offsets "
                                  f"[{start}, {end}], which do not hold it")
        tensors[name] = (shape, start, end)
        spans.append((start, end))
    spans.sort()
    pos = 0
    for start, end in spans:
        if start != pos:
            raise CheckpointError(f"{path}: tensor data overlaps or leaves a gap at byte {pos}")
        pos = end
    if pos != data_len:
        what = "truncated" if pos > data_len else "longer than its header says"
        raise CheckpointError(f"{path} is {what}: the header describes {pos} bytes of tensor data, "
                              f"the file holds {data_len}")
    return tensors, meta, 8 + n


def read_metadata(path: Path) -> dict:
    """The metadata of a safetensors file's header (its tensors' data is not read)."""
    try:
        with open(path, "rb") as f:
            return _read_header(f, path, os.fstat(f.fileno()).st_size, hashlib.sha256())[1]
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None


def read_safetensors(path: Path, expected: dict | None = None, digest: dict | None = None,
                      targets=None) -> tuple:
    """({name: float32 array}, metadata) of a safetensors file. With `expected` ({name: shape})
    the header's names and shapes must match it, and then `targets()` gives the arrays the data
    is read straight into (so nothing is allocated before the header has been checked)."""
    hasher = hashlib.sha256()
    try:
        size = path.stat().st_size
        if digest is not None and size != digest["bytes"]:
            raise CheckpointError(f"{path} is {size} bytes, but {CONFIG_FILE} recorded "
                                  f"{digest['bytes']}: the file is truncated or was replaced")
        with open(path, "rb") as f:
            tensors, meta, data_start = _read_header(f, path, size, hasher)
            if expected is not None:
                missing = sorted(set(expected) - set(tensors))
                unexpected = sorted(set(tensors) - set(expected))
                if missing or unexpected:
                    raise CheckpointError(f"{path} does not match {CONFIG_FILE}'s model: missing tensors "
                                          f"{missing[:8]}, unexpected tensors {unexpected[:8]}")
                for name, shape in expected.items():
                    if tensors[name][0] != shape:
                        raise CheckpointError(f"{path}: tensor {name!r} has shape {tensors[name][0]}, "
                                              f"but {CONFIG_FILE}'s model needs {shape}")
            into = targets() if targets is not None else {}
            out = {}
            for name, (shape, start, end) in sorted(tensors.items(), key=lambda kv: kv[1][1]):
                a = into[name] if name in into else np.empty(shape, np.float32)
                buf = memoryview(a.reshape(-1)).cast("B")
                if f.readinto(buf) != end - start:
                    raise CheckpointError(f"{path} is truncated in tensor {name!r}")
                hasher.update(buf)
                if not np.all(np.isfinite(a)):
                    raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinite values")
                out[name] = a
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if digest is not None and hasher.hexdigest() != digest["sha256"]:
        raise CheckpointError(f"{path} is corrupted: its SHA-256 differs from the one {CONFIG_FILE} "
                              "recorded when it was saved")
    return out, meta


def tensor_dict(arrays, what: str) -> dict:
    if not isinstance(arrays, dict):
        raise TypeError(f"{what} must be a dict of name -> numpy array, got {type(arrays).__name__}")
    out = {}
    for name, a in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"{what} keys must be str, got {name!r}")
        a = np.asarray(a)
        if a.dtype != np.float32:
            raise TypeError(f"{what}[{name!r}] must be a float32 array, got dtype {a.dtype}")
        out[name] = np.ascontiguousarray(a)
    return out


def safetensors_chunks(arrays: dict, metadata: dict | None = None) -> list:
    """A safetensors file of float32 `arrays` as the buffers to write one after another: the
    header, then each array's own memory, so no copy of the whole file is ever made (a 124M-
    parameter checkpoint with its optimiser would otherwise hold 1.5 GB of bytes at once). The
    layout is the format's: little-endian header length, JSON header padded with spaces so the
    data starts 8-byte aligned, the tensors back to back in header order."""
    header = {"__metadata__": metadata or {"format": "lmlab"}}
    arrays = {name: np.ascontiguousarray(a, dtype="<f4") for name, a in arrays.items()}
    offset = 0
    for name, a in arrays.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return [struct.pack("<Q", len(raw)) + raw] + [memoryview(a.reshape(-1)).cast("B")
                                                  for a in arrays.values()]
