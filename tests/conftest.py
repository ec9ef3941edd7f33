"""Tiny Qwen2.5-VL checkpoints written by transformers itself (random weights), shared by the parity tests."""

import json
import shutil
from pathlib import Path

import pytest
import torch

TINY_TEXT = dict(
    vocab_size=151936,  # the real vocabulary, so real token ids (image pad 151655, ...) are in range
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per kv head
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
    bos_token_id=151643,
    eos_token_id=151645,
)
TINY_VISION = dict(
    depth=3,
    hidden_size=32,
    intermediate_size=48,
    num_heads=2,
    out_hidden_size=64,
    fullatt_block_indexes=[1],  # blocks 0 and 2 use window attention
    tokens_per_second=2,
)


def tiny_config(**overrides):
    from transformers import Qwen2_5_VLConfig

    text = {**TINY_TEXT, **overrides.pop("text", {})}
    vision = {**TINY_VISION, **overrides.pop("vision", {})}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **overrides)


def write_tiny_checkpoint(out: Path, tokenizer_dir: Path, *, layout="published", seed=0, **config_overrides) -> Path:
    """layout: 'published' (save_pretrained: visual.*, model.*), 'sharded' (the same in several shards),
    'transformers5' (state_dict names model.visual.*, model.language_model.*), 'flat_config' (published tensors,
    transformers 4.x config.json with text fields at top level)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(**config_overrides)).eval()
    if layout == "sharded":
        model.save_pretrained(out, max_shard_size="5MB")
    else:
        model.save_pretrained(out)
    if layout == "transformers5":
        for f in out.glob("model*.safetensors*"):
            f.unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            del state["lm_head.weight"]
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    if layout == "flat_config":
        raw = json.loads((out / "config.json").read_text())
        text = raw.pop("text_config")
        rope = text.pop("rope_parameters")
        raw.update(text, model_type="qwen2_5_vl", torch_dtype=raw.pop("dtype"), rope_theta=rope["rope_theta"])
        raw["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
        (out / "config.json").write_text(json.dumps(raw, indent=2))
    GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643], do_sample=False).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    return out


PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from examples.tokenizer_files import build_qwen_tokenizer_files

    out = tmp_path_factory.mktemp("qwen_tokenizer")
    build_qwen_tokenizer_files(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer_dir) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), tokenizer_dir)


@pytest.fixture(scope="session")
def reference(tiny_model):
    """transformers' own model on the same checkpoint, float32."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()
