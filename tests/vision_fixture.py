"""A tiny vision model built from nothing: a random-weight llama GGUF and a matching LLaVA-style projector.

No real vision model can be downloaded in the test environment, so this writes one with the `gguf` package:

- the language model is llama.cpp's `llama` architecture at toy size (n_embd 64, 2 layers) with the bundled
  SmolLM2's tokenizer and chat template copied in, so prompts tokenize and template as they do for smollm2;
- the projector is a `clip` GGUF of projector type `mlp` (LLaVA 1.5): a ViT over 32x32 images in 8x8 patches
  (16 image tokens), then the two-layer MLP into the language model's 64 dimensions. Its keys and tensor
  names are the ones llama.cpp's `clip.cpp` reads (`clip.vision.*`, `v.blk.N.*`, `mm.0`/`mm.2`); integer keys
  are uint32 and floats float32 because the loader asserts those types.

Weights are seeded, so the same files come out every time and outputs are reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter, GGUFValueType

LM_EMBD = 64
LM_LAYERS = 2
LM_HEADS = 4
LM_FF = 128

IMAGE_SIZE = 32
PATCH_SIZE = 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # what one image costs in the prompt
V_EMBD = 32
V_FF = 64  # must differ from V_EMBD: clip.cpp swaps ffn up/down of legacy LLaVA files when ffn_down takes n_embd
V_LAYERS = 2  # LLaVA reads the second-to-last layer, so one layer actually runs
V_HEADS = 4
MM_HIDDEN = 64

_TOKENIZER_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template",
)


def _copy_field(writer: GGUFWriter, reader: GGUFReader, key: str) -> None:
    field = reader.fields.get(key)
    if field is None:
        return
    kind = field.types[0]
    value = field.contents()
    if kind == GGUFValueType.ARRAY:
        writer.add_array(key, value)
    elif kind == GGUFValueType.STRING:
        writer.add_string(key, value)
    elif kind == GGUFValueType.BOOL:
        writer.add_bool(key, value)
    elif kind == GGUFValueType.UINT32:
        writer.add_uint32(key, value)
    elif kind == GGUFValueType.INT32:
        writer.add_int32(key, value)
    else:
        raise ValueError(f"unexpected type {kind} for {key}")


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _write(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_language_model(path: Path, tokenizer_gguf: Path, seed: int = 1) -> Path:
    """A llama-architecture GGUF with random weights and the tokenizer of `tokenizer_gguf`."""
    rng = np.random.default_rng(seed)
    reader = GGUFReader(tokenizer_gguf)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("corral tiny vision test model")
    writer.add_context_length(2048)
    writer.add_embedding_length(LM_EMBD)
    writer.add_block_count(LM_LAYERS)
    writer.add_feed_forward_length(LM_FF)
    writer.add_head_count(LM_HEADS)
    writer.add_head_count_kv(LM_HEADS)
    writer.add_rope_dimension_count(LM_EMBD // LM_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(0)  # all F32
    for key in _TOKENIZER_KEYS:
        _copy_field(writer, reader, key)
    # Large embeddings make the output distribution peaked, so an image's influence shows in greedy output.
    writer.add_tensor("token_embd.weight", _normal(rng, (n_vocab, LM_EMBD), 0.5))
    writer.add_tensor("output_norm.weight", np.ones(LM_EMBD, dtype=np.float32))
    w = 1.0 / np.sqrt(LM_EMBD)
    for i in range(LM_LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(LM_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", _normal(rng, (LM_EMBD, LM_EMBD), w))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(LM_EMBD, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", _normal(rng, (LM_FF, LM_EMBD), w))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", _normal(rng, (LM_FF, LM_EMBD), w))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", _normal(rng, (LM_EMBD, LM_FF), 1.0 / np.sqrt(LM_FF)))
    _write(writer)
    return path


def write_projector(path: Path, seed: int = 2, lm_embd: int = LM_EMBD) -> Path:
    """A `clip` GGUF (projector type `mlp`) whose output has `lm_embd` dimensions."""
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "clip")
    writer.add_name("corral tiny vision test projector")
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("mlp")
    writer.add_vision_image_size(IMAGE_SIZE)
    writer.add_vision_patch_size(PATCH_SIZE)
    writer.add_vision_embedding_length(V_EMBD)
    writer.add_vision_feed_forward_length(V_FF)
    writer.add_vision_block_count(V_LAYERS)
    writer.add_vision_projection_dim(lm_embd)
    writer.add_vision_head_count(V_HEADS)
    writer.add_vision_attention_layernorm_eps(1e-5)
    writer.add_vision_image_mean([0.5, 0.5, 0.5])
    writer.add_vision_image_std([0.5, 0.5, 0.5])
    writer.add_vision_use_gelu(True)
    n_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    ones, zeros = np.ones(V_EMBD, dtype=np.float32), np.zeros(V_EMBD, dtype=np.float32)
    # PyTorch layouts: conv weight (out, in, kh, kw), linear weight (out, in); gguf reverses them into ggml's.
    writer.add_tensor("v.patch_embd.weight", _normal(rng, (V_EMBD, 3, PATCH_SIZE, PATCH_SIZE), 0.2))
    writer.add_tensor("v.patch_embd.bias", zeros)
    writer.add_tensor("v.position_embd.weight", _normal(rng, (n_patches, V_EMBD), 0.1))
    writer.add_tensor("v.pre_ln.weight", ones)
    writer.add_tensor("v.pre_ln.bias", zeros)
    w = 1.0 / np.sqrt(V_EMBD)
    for i in range(V_LAYERS):
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"v.blk.{i}.{name}.weight", _normal(rng, (V_EMBD, V_EMBD), w))
            writer.add_tensor(f"v.blk.{i}.{name}.bias", zeros)
        for name in ("ln1", "ln2"):
            writer.add_tensor(f"v.blk.{i}.{name}.weight", ones)
            writer.add_tensor(f"v.blk.{i}.{name}.bias", zeros)
        writer.add_tensor(f"v.blk.{i}.ffn_up.weight", _normal(rng, (V_FF, V_EMBD), w))
        writer.add_tensor(f"v.blk.{i}.ffn_up.bias", np.zeros(V_FF, dtype=np.float32))
        writer.add_tensor(f"v.blk.{i}.ffn_down.weight", _normal(rng, (V_EMBD, V_FF), 1.0 / np.sqrt(V_FF)))
        writer.add_tensor(f"v.blk.{i}.ffn_down.bias", zeros)
    writer.add_tensor("mm.0.weight", _normal(rng, (MM_HIDDEN, V_EMBD), w))
    writer.add_tensor("mm.0.bias", np.zeros(MM_HIDDEN, dtype=np.float32))
    # Scaled up so an image's embeddings weigh as much as the (large) token embeddings.
    writer.add_tensor("mm.2.weight", _normal(rng, (lm_embd, MM_HIDDEN), 4.0 / np.sqrt(MM_HIDDEN)))
    writer.add_tensor("mm.2.bias", np.zeros(lm_embd, dtype=np.float32))
    _write(writer)
    return path


def build(directory: Path, tokenizer_gguf: Path) -> tuple[Path, Path]:
    """Both files in `directory`: (language model, projector)."""
    directory.mkdir(parents=True, exist_ok=True)
    return (write_language_model(directory / "tiny-vision.gguf", tokenizer_gguf),
            write_projector(directory / "tiny-mmproj.gguf"))
