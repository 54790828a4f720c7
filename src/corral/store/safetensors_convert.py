"""Hugging Face safetensors folders to GGUF, for the BERT family of embedding models (MiniLM, bge, e5).

Written on the `gguf` and `safetensors` packages alone (numpy, no torch), following what llama.cpp's
`convert_hf_to_gguf.py` writes for `BertModel`, so llama.cpp's own BERT graph and WordPiece tokenizer run
the result:

- tensors take llama.cpp's names (`token_embd`, `blk.N.attn_q`, ...) through gguf's own name map, all in
  F32: these models are small, and on the CPU F32 matrices embed about 1.8x faster than F16 ones (ggml
  would convert every activation to F16 first);
- the WordPiece vocabulary is rewritten in llama.cpp's form: `##` continuations lose their prefix and
  word-initial pieces gain the phantom space `▁` (special tokens stay as they are);
- the pooling comes from the sentence-transformers config (`modules.json` -> `1_Pooling/config.json`),
  mean pooling when there is none.

No ggml compute runs here: converting is reading, casting and writing arrays.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors import SafetensorError, safe_open

from .gguf_import import model_config
from .names import Name
from .store import CONFIG_MEDIA_TYPE, MODEL_MEDIA_TYPE, Layer, Manifest, Store

# The architectures this converter writes (config.json's `architectures[0]`).
BERT_ARCHITECTURES = frozenset({"BertModel", "BertForMaskedLM"})
# Tensors a sentence embedding does not use: MLM/NSP heads, the pooler, the position-id buffer.
_DROPPED_PREFIXES = ("cls.", "pooler.")
_DROPPED = frozenset({"embeddings.position_ids"})
PHANTOM_SPACE = "\u2581"

logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file it writes at INFO


class ConvertError(ValueError):
    """The folder cannot be converted; the message says what is missing or unsupported."""


@dataclass(frozen=True)
class Converted:
    path: Path
    architecture: str  # the Hugging Face architecture converted
    pooling: str  # mean | cls | last
    meta: dict[str, Any]  # the GGUF's scalar key/values, as `gguf_metadata` would read them back


def _read_json(path: Path, what: str) -> Any:
    """`what` names the file as the user knows it (`config.json`, `1_Pooling/config.json`)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{what} is missing") from None
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{what} cannot be read: {exc}") from None


def is_safetensors_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def architecture(folder: Path) -> str:
    config = _read_json(folder / "config.json", "the model's config.json")
    names = config.get("architectures") or [config.get("model_type") or "unknown"]
    return str(names[0])


# -- tokenizer -----------------------------------------------------------------------------------------
def _wordpiece_vocab(folder: Path) -> tuple[dict[str, int], set[str], bool]:
    """(token -> id, the special tokens, lowercases input) from tokenizer.json, else vocab.txt."""
    tokenizer_path = folder / "tokenizer.json"
    config_path = folder / "tokenizer_config.json"
    tok_config = _read_json(config_path, "tokenizer_config.json") if config_path.is_file() else {}
    if tokenizer_path.is_file():
        tok = _read_json(tokenizer_path, "tokenizer.json")
        model = tok.get("model") or {}
        if model.get("type") != "WordPiece":
            raise ConvertError(f"the tokenizer is {model.get('type')!r}, not a BERT WordPiece tokenizer")
        if model.get("continuing_subword_prefix", "##") != "##":
            raise ConvertError("the WordPiece tokenizer does not use '##' for continuations")
        vocab = {str(k): int(v) for k, v in model["vocab"].items()}
        specials = {t["content"] for t in tok.get("added_tokens") or [] if t.get("special")}
        for added in tok.get("added_tokens") or []:
            vocab.setdefault(added["content"], int(added["id"]))
        normalizer = tok.get("normalizer") or {}
        if normalizer and normalizer.get("type") != "BertNormalizer":
            raise ConvertError(f"the tokenizer's normalizer is {normalizer.get('type')!r}, not BertNormalizer")
        lowercase = bool(normalizer.get("lowercase", tok_config.get("do_lower_case", True)))
    elif (folder / "vocab.txt").is_file():
        lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
        vocab = {line: i for i, line in enumerate(lines)}
        specials = {tok_config.get(k) or d for k, d in (("unk_token", "[UNK]"), ("sep_token", "[SEP]"),
                    ("pad_token", "[PAD]"), ("cls_token", "[CLS]"), ("mask_token", "[MASK]"))}
        lowercase = bool(tok_config.get("do_lower_case", True))
    else:
        raise ConvertError("no tokenizer: the folder has neither tokenizer.json nor vocab.txt")
    return vocab, specials, lowercase


def _token_table(folder: Path, n_vocab: int) -> tuple[list[str], list[int], dict[str, int]]:
    """Tokens in llama.cpp's phantom-space form, their types, and the special tokens' ids."""
    vocab, specials, lowercase = _wordpiece_vocab(folder)
    if not lowercase:
        # llama.cpp's WordPiece tokenizer always lowercases; a cased vocabulary would be read wrongly.
        raise ConvertError("the tokenizer is cased (lowercase: false); llama.cpp's BERT tokenizer only "
                           "handles uncased WordPiece vocabularies")
    if max(vocab.values(), default=-1) >= n_vocab:
        raise ConvertError(f"the tokenizer has ids up to {max(vocab.values())}, but config.json's "
                           f"vocab_size is {n_vocab}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in vocab.items():
        if text in specials:
            tokens[i], types[i] = text, gguf.TokenType.CONTROL
        elif text.startswith("##"):
            tokens[i], types[i] = text[2:], gguf.TokenType.NORMAL
        else:
            tokens[i], types[i] = PHANTOM_SPACE + text, gguf.TokenType.NORMAL
    ids = {name: vocab[text] for name, text in (("unk", "[UNK]"), ("cls", "[CLS]"), ("sep", "[SEP]"),
                                                 ("pad", "[PAD]"), ("mask", "[MASK]")) if text in vocab}
    for needed in ("unk", "cls", "sep"):
        if needed not in ids:
            raise ConvertError(f"the vocabulary has no [{needed.upper()}] token")
    return tokens, [int(t) for t in types], ids


# -- pooling -------------------------------------------------------------------------------------------
_POOLING_MODES = {
    "pooling_mode_mean_tokens": ("mean", gguf.PoolingType.MEAN),
    "pooling_mode_cls_token": ("cls", gguf.PoolingType.CLS),
    "pooling_mode_lasttoken": ("last", gguf.PoolingType.LAST),
}
_UNSUPPORTED_MODULES = ("Dense", "LayerNorm", "WeightedLayerPooling", "CNN", "LSTM")


def _pooling(folder: Path) -> tuple[str, gguf.PoolingType]:
    """The sentence-transformers pooling; mean pooling for a plain Hugging Face model."""
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        return "mean", gguf.PoolingType.MEAN
    modules = _read_json(modules_path, "modules.json")
    pooling_dir, pooling_path = None, ""
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind in _UNSUPPORTED_MODULES:
            raise ConvertError(f"the sentence-transformers module {kind} ({module.get('path')}) is not supported")
        if kind == "Pooling":
            pooling_path = str(module.get("path", ""))
            pooling_dir = folder / pooling_path
    if pooling_dir is None:
        return "mean", gguf.PoolingType.MEAN
    config = _read_json(pooling_dir / "config.json", f"the pooling config {pooling_path}/config.json")
    chosen = [mode for key, mode in _POOLING_MODES.items() if config.get(key)]
    others = [k for k, v in config.items() if k.startswith("pooling_mode") and v and k not in _POOLING_MODES]
    if others or len(chosen) != 1:
        what = ", ".join(others) or ("of several kinds at once" if chosen else "(none is set)")
        raise ConvertError(f"{pooling_path}/config.json: pooling {what} is not supported "
                           "(one of mean, cls or last token)")
    return chosen[0]


# -- tensors -------------------------------------------------------------------------------------------
def _bf16_tensor(path: Path, name: str) -> np.ndarray:
    """numpy has no bfloat16: read the raw bytes at the tensor's offsets and widen them to float32."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        info = json.loads(fh.read(size))[name]
        start, end = info["data_offsets"]
        fh.seek(8 + size + start)
        raw = np.frombuffer(fh.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of every shard, as float32 arrays keyed by Hugging Face name (prefixes stripped)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConvertError("the folder has no .safetensors files")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="np") as fh:
                for key in fh.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    name = key.removeprefix("bert.")
                    if name in _DROPPED or name.startswith(_DROPPED_PREFIXES):
                        continue
                    dtype = fh.get_slice(key).get_dtype()
                    if dtype == "BF16":
                        array = _bf16_tensor(file, key)
                    elif dtype in ("F32", "F16", "F64"):
                        array = fh.get_tensor(key).astype(np.float32, copy=False)
                    else:
                        raise ConvertError(f"tensor {key} has type {dtype}; only float tensors are converted")
                    if name.endswith(".gamma"):
                        name = name[: -len(".gamma")] + ".weight"
                    elif name.endswith(".beta"):
                        name = name[: -len(".beta")] + ".bias"
                    tensors[name] = array
        except ConvertError:
            raise
        except (SafetensorError, OSError, ValueError, KeyError) as exc:  # a damaged or truncated file
            raise ConvertError(f"{file.name} is not a readable safetensors file: {exc}") from None
    return tensors


# -- the conversion ------------------------------------------------------------------------------------
def _hparam(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or value <= 0:
        raise ConvertError(f"config.json has no valid {key}")
    return value


def convert(folder: Path, out: Path, name: str = "") -> Converted:
    """Writes `folder`'s BERT model to the GGUF file `out`; a model it cannot convert is a ConvertError."""
    folder = Path(folder)
    config = _read_json(folder / "config.json", "the model's config.json")
    arch = architecture(folder)
    if arch not in BERT_ARCHITECTURES or config.get("model_type", "bert") != "bert":
        raise ConvertError(
            f"cannot convert architecture '{arch}': corral converts BERT embedding models "
            f"({', '.join(sorted(BERT_ARCHITECTURES))}); convert others to GGUF with llama.cpp and FROM the file"
        )
    if config.get("hidden_act", "gelu") != "gelu":
        raise ConvertError(f"activation {config.get('hidden_act')!r} is not supported (BERT uses gelu)")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConvertError(f"position embeddings {config.get('position_embedding_type')!r} are not supported")
    n_vocab = _hparam(config, "vocab_size")
    n_layers = _hparam(config, "num_hidden_layers")
    tokens, types, special = _token_table(folder, n_vocab)
    pooling_name, pooling = _pooling(folder)
    tensors = _tensors(folder)
    words = tensors.get("embeddings.word_embeddings.weight")
    if words is None:
        raise ConvertError("the model has no word embeddings (embeddings.word_embeddings.weight)")
    if words.shape[0] != n_vocab:
        raise ConvertError(f"the word embeddings have {words.shape[0]} rows, but vocab_size is {n_vocab}")

    arch_name = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT]
    n_params = sum(int(a.size) for a in tensors.values())
    meta: dict[str, Any] = {
        "general.architecture": arch_name,
        "general.name": name or folder.name,
        "general.size_label": gguf.utility.size_label(n_params, 0, 0, 0),
        "general.file_type": int(gguf.LlamaFileType.ALL_F32),
        f"{arch_name}.context_length": _hparam(config, "max_position_embeddings"),
        f"{arch_name}.embedding_length": _hparam(config, "hidden_size"),
        f"{arch_name}.feed_forward_length": _hparam(config, "intermediate_size"),
        f"{arch_name}.block_count": n_layers,
        f"{arch_name}.attention.head_count": _hparam(config, "num_attention_heads"),
        f"{arch_name}.attention.layer_norm_epsilon": float(config.get("layer_norm_eps", 1e-12)),
        f"{arch_name}.attention.causal": False,
        f"{arch_name}.pooling_type": int(pooling),
        "tokenizer.ggml.model": "bert",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.token_type_count": int(config.get("type_vocab_size", 1)),
        # llama.cpp starts a BERT input with its BOS, which is [CLS], and ends it with [SEP]
        "tokenizer.ggml.bos_token_id": special["cls"],
        "tokenizer.ggml.seperator_token_id": special["sep"],
        "tokenizer.ggml.unknown_token_id": special["unk"],
        **({"tokenizer.ggml.padding_token_id": special["pad"]} if "pad" in special else {}),
        **({"tokenizer.ggml.mask_token_id": special["mask"]} if "mask" in special else {}),
    }
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers)
    writer = gguf.GGUFWriter(out, arch_name)
    try:
        writer.add_name(meta["general.name"])
        writer.add_size_label(meta["general.size_label"])
        writer.add_context_length(meta[f"{arch_name}.context_length"])
        writer.add_embedding_length(meta[f"{arch_name}.embedding_length"])
        writer.add_feed_forward_length(meta[f"{arch_name}.feed_forward_length"])
        writer.add_block_count(n_layers)
        writer.add_head_count(meta[f"{arch_name}.attention.head_count"])
        writer.add_layer_norm_eps(meta[f"{arch_name}.attention.layer_norm_epsilon"])
        writer.add_causal_attention(False)
        writer.add_pooling_type(pooling)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)

        writer.add_tokenizer_model("bert")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_type_count(meta["tokenizer.ggml.token_type_count"])
        writer.add_bos_token_id(special["cls"])
        writer.add_sep_token_id(special["sep"])
        writer.add_unk_token_id(special["unk"])
        if "pad" in special:
            writer.add_pad_token_id(special["pad"])
        if "mask" in special:
            writer.add_mask_token_id(special["mask"])

        for hf_name, array in tensors.items():
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ConvertError(f"tensor {hf_name} has no place in llama.cpp's BERT model")
            writer.add_tensor(gguf_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return Converted(path=Path(out), architecture=arch, pooling=pooling_name, meta=meta)


# -- into the store ------------------------------------------------------------------------------------
def convert_to_layers(store: Store, folder: Path, name: str = "") -> tuple[Layer, Layer]:
    """The model layer and its config blob. The GGUF is written beside the blobs and renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=store.blobs, prefix=".tmp-", suffix=".gguf")
    os.close(fd)
    try:
        converted = convert(folder, Path(tmp), name)
        layer = store.put_file(Path(tmp), MODEL_MEDIA_TYPE, move=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return layer, store.put_json(model_config(converted.meta), CONFIG_MEDIA_TYPE)


def import_safetensors(store: Store, name: Name, folder: Path) -> Manifest:
    """A stored model from a safetensors folder: the converted GGUF layer plus its config blob."""
    layer, config = convert_to_layers(store, folder, name.model)
    manifest = Manifest(config=config, layers=[layer])
    store.write_manifest(name, manifest)
    return manifest
