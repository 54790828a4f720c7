"""A quick look at a GGUF file before llama.cpp is handed it: the header parses, every tensor lies inside the
file, and the header values llama.cpp asserts on (instead of reporting them) are in range.

llama.cpp reports most damage as a failed load, but a few values abort the whole process (`GGML_ASSERT`s on
`block_count`, the expert counts and the RoPE scaling type while it reads hyperparameters, and on a negative
or NaN norm epsilon at the first decode), and a truncated file is clearer named as one. Only the header is
read, through mmap, and arrays are skipped rather than decoded, so a check costs milliseconds even for a
model of many gigabytes.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
_MAX_EXPERTS = 512  # LLAMA_MAX_EXPERTS
_ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")


class GGUFError(ValueError):
    """The file is not a GGUF that llama.cpp can safely be given; the message says what is wrong."""


class _Cursor:
    def __init__(self, data: mmap.mmap | bytes, size: int) -> None:
        self.data = data
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"the header is truncated or damaged: {what} at byte {self.pos} would run past the end "
                            f"of the file ({self.size} bytes)")

    def take(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.take("<Q", what)
        self.need(n, what)
        raw = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int, key: str) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind], f"the value of {key!r}")
        if kind == _STRING:
            return self.string(f"the value of {key!r}")
        if kind != _ARRAY:
            raise GGUFError(f"the header is damaged: key {key!r} has unknown value type {kind}")
        item = self.take("<I", f"the array type of {key!r}")
        count = self.take("<Q", f"the array length of {key!r}")
        if item in _SCALARS:
            self.need(struct.calcsize(_SCALARS[item]) * count, f"the array {key!r}")
            self.pos += struct.calcsize(_SCALARS[item]) * count
        elif item == _STRING:
            self.need(8 * count, f"the array {key!r}")  # every string takes at least its length
            data, pos, size, unpack = self.data, self.pos, self.size, struct.unpack_from
            for _ in range(count):  # skipped, not decoded: vocabularies hold 100,000s of strings
                if pos + 8 > size:
                    pos = size + 1  # cut short: reported just below
                    break
                pos += 8 + unpack("<Q", data, pos)[0]
            self.pos = min(pos, size + 1)
            self.need(0, f"the array {key!r}")
        else:
            raise GGUFError(f"the header is damaged: array {key!r} has unsupported item type {item}")
        return None  # arrays are skipped: nothing checked here needs them


def check_gguf(path: Path) -> dict[str, Any]:
    """Raises GGUFError when the file is damaged, truncated or would make llama.cpp abort; returns the
    header's scalar and string values."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 24:
            raise GGUFError(f"the file is {size} bytes long, too short for a GGUF header (it is truncated or empty)")
        data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _check(_Cursor(data, size))
    finally:
        data.close()


def _check(cur: _Cursor) -> dict[str, Any]:
    magic = bytes(cur.data[:4])
    if magic != MAGIC:
        raise GGUFError(f"it is not a GGUF file (it starts with {magic!r}, not {MAGIC!r})")
    cur.pos = 4
    version = cur.take("<I", "the version")
    if version not in (2, 3):
        raise GGUFError(f"GGUF version {version} is not supported (llama.cpp reads versions 2 and 3)")
    n_tensors = cur.take("<Q", "the tensor count")
    n_kv = cur.take("<Q", "the key count")
    cur.need(13 * n_kv + 24 * n_tensors, "the keys and tensor descriptions")  # the least each one takes
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a key")
        kind = cur.take("<I", f"the type of {key!r}")
        value = cur.value(kind, key)
        if value is not None:
            meta[key] = value
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"the header is damaged: general.alignment is {alignment!r}, not a power of two")
    tensors = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        n_dims = cur.take("<I", f"the dimensions of tensor {name!r}")
        if n_dims > _MAX_DIMS:
            raise GGUFError(f"the header is damaged: tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
        dims = [cur.take("<q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
        kind = cur.take("<I", f"the type of tensor {name!r}")
        offset = cur.take("<Q", f"the offset of tensor {name!r}")
        if any(d < 0 for d in dims):
            raise GGUFError(f"the header is damaged: tensor {name!r} has shape {dims}")
        tensors.append((name, dims, kind, offset))
    data_start = -(-cur.pos // alignment) * alignment
    for name, dims, kind, offset in tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            continue  # a type this gguf package does not know: llama.cpp judges it
        rows = 1
        for d in dims[1:]:
            rows *= d
        if dims and dims[0] % block:
            raise GGUFError(f"the header is damaged: tensor {name!r} has rows of {dims[0]} values, not a multiple "
                            f"of its type's block of {block}")
        end = data_start + offset + (dims[0] // block if dims else 1) * type_size * rows
        if end > cur.size:
            raise GGUFError(f"the file is truncated or damaged: tensor {name!r} needs bytes up to {end}, but the "
                            f"file has {cur.size}")
    _check_hyperparameters(meta)
    return meta


def _check_hyperparameters(meta: dict[str, Any]) -> None:
    """The values llama.cpp's hyperparameter loader asserts on, which would abort the process."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch == "clip" or not isinstance(meta.get(f"{arch}.block_count"), int):
        return  # llama.cpp refuses a file without these (or reads no hyperparameters from a projector)

    def count(key: str) -> int:
        value = meta.get(f"{arch}.{key}", 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    def bad(key: str, rule: str) -> GGUFError:
        return GGUFError(f"the header is damaged: {arch}.{key} is {meta.get(f'{arch}.{key}')!r}, but {rule}")

    layers = count("block_count")
    if not 0 < layers <= _MAX_LAYERS:
        raise bad("block_count", f"llama.cpp needs 1 to {_MAX_LAYERS}")
    experts, used = count("expert_count"), count("expert_used_count")
    groups, groups_used = count("expert_group_count"), count("expert_group_used_count")
    if experts > _MAX_EXPERTS:
        raise bad("expert_count", f"llama.cpp supports at most {_MAX_EXPERTS}")
    if used > experts or (experts > 0 and used == 0):
        raise bad("expert_used_count", f"expert_count is {experts}")
    if experts > 0 and groups >= experts or experts == 0 and groups != 0:
        raise bad("expert_group_count", f"expert_count is {experts}")
    if groups > 1 and (experts % groups or not 0 < groups_used < groups):
        raise bad("expert_group_used_count", f"expert_count is {experts} in {groups} groups")
    if count("nextn_predict_layers") > layers:
        raise bad("nextn_predict_layers", f"block_count is {layers}")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling is not None and scaling not in _ROPE_SCALING_TYPES:
        raise bad("rope.scaling.type", f"llama.cpp knows only {', '.join(_ROPE_SCALING_TYPES)}")
    for key in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):  # asserted while decoding
        eps = meta.get(f"{arch}.{key}")
        if isinstance(eps, float) and not 0.0 <= eps < math.inf:
            raise bad(key, "it must be a finite number, 0 or more")
