"""The safetensors -> GGUF converter: llama.cpp reads what it writes, tokenizes as Hugging Face does, and
anything it cannot convert is refused with a message naming why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from corral.engine.model import LlamaModel
from corral.store.gguf_import import gguf_metadata
from corral.store.safetensors_convert import ConvertError, convert


@pytest.fixture(scope="module")
def minilm(minilm_gguf: Path):
    model = LlamaModel(minilm_gguf)
    yield model
    model.close()


def test_metadata_follows_llama_cpp_bert(minilm_gguf: Path):
    meta = gguf_metadata(minilm_gguf)
    assert meta["general.architecture"] == "bert"
    assert meta["bert.context_length"] == 512 and meta["bert.embedding_length"] == 384
    assert meta["bert.block_count"] == 6 and meta["bert.attention.head_count"] == 12
    assert meta["bert.pooling_type"] == 1  # mean, from 1_Pooling/config.json
    assert meta["bert.attention.causal"] is False
    assert meta["tokenizer.ggml.model"] == "bert"
    assert meta["tokenizer.ggml.bos_token_id"] == 101 and meta["tokenizer.ggml.seperator_token_id"] == 102
    assert meta["general.size_label"] == "23M"


def test_tokenization_matches_the_hugging_face_tokenizer(minilm, minilm_reference):
    """The phantom-space vocabulary makes llama.cpp's WordPiece give Hugging Face's ids, [CLS] and [SEP] too."""
    for sentence, expected in zip(minilm_reference["sentences"], minilm_reference["token_ids"]):
        assert minilm.tokenize(sentence, add_special=True, parse_special=False) == expected, sentence


def test_vocabulary_is_in_phantom_space_form(minilm):
    assert minilm.n_vocab == 30522
    assert minilm.detokenize_special(101) == "[CLS]"  # special tokens keep their text
    assert minilm.token_bytes(7592) == b" hello"  # a word-initial piece: '▁hello', read as ' hello'
    assert minilm.tokenize("tokenization", False, False) == [19204, 3989]  # 'token' + '##ization'


def _fake_folder(tmp_path: Path, config: dict) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": np.zeros((4, 2), dtype=np.float32)}, str(folder / "model.safetensors"))
    return folder


def test_other_architectures_are_refused_by_name(tmp_path):
    folder = _fake_folder(tmp_path, {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    with pytest.raises(ConvertError, match="LlamaForCausalLM"):
        convert(folder, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def _copy_of(minilm_dir: Path, tmp_path: Path) -> Path:
    """The model folder with its weights linked, so a test can change its configs."""
    folder = tmp_path / "copy"
    shutil.copytree(minilm_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "model.safetensors").symlink_to(minilm_dir / "model.safetensors")
    return folder


def test_pooling_comes_from_the_sentence_transformers_config(minilm_dir, tmp_path):
    folder = _copy_of(minilm_dir, tmp_path)
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {**pooling, "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}))
    converted = convert(folder, tmp_path / "cls.gguf")
    assert converted.pooling == "cls" and gguf_metadata(tmp_path / "cls.gguf")["bert.pooling_type"] == 2

    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {**pooling, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}))
    with pytest.raises(ConvertError, match="pooling_mode_max_tokens"):
        convert(folder, tmp_path / "max.gguf")


def test_cased_tokenizers_are_refused(minilm_dir, tmp_path):
    """llama.cpp's WordPiece always lowercases, so a cased vocabulary would be read wrongly."""
    folder = _copy_of(minilm_dir, tmp_path)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = False
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ConvertError, match="cased"):
        convert(folder, tmp_path / "cased.gguf")


def test_missing_pieces_are_named(minilm_dir, tmp_path):
    folder = _copy_of(minilm_dir, tmp_path)
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.txt").unlink()
    with pytest.raises(ConvertError, match="no tokenizer"):
        convert(folder, tmp_path / "x.gguf")
    (folder / "config.json").unlink()
    with pytest.raises(ConvertError, match="config.json"):
        convert(folder, tmp_path / "x.gguf")
