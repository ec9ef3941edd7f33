"""Model configuration read from a Hugging Face Qwen2.5-VL checkpoint's config.json (transformers 4.x and 5.x layouts),
and the identity of a checkpoint."""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels: 112 / 14 / 2 = 4x4 merged tokens per window
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584  # = the LLM's hidden size
    tokens_per_second: int = 4  # video: temporal M-RoPE ids per second (published checkpoints say 2; 4 is transformers' default)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:  # 3 * 2 * 14 * 14 = 1176 values per flattened patch
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # (t, h, w) share of head_dim/2 rotary frequencies
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    dtype: str = "bfloat16"  # dtype the checkpoint was saved in
    quantization_config: dict | None = None  # a pre-quantized checkpoint's (AWQ), as config.json gives it


def _pick(cls, raw: dict, **overrides):
    names = cls.__dataclass_fields__
    kwargs = {k: v for k, v in raw.items() if k in names}
    kwargs.update(overrides)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})


def load_config(model_dir) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model directory in Hugging Face layout holds config.json")
    raw = json.loads(path.read_text())
    if raw.get("model_type") != "qwen2_5_vl":
        raise ValueError(f"{path}: model_type is {raw.get('model_type')!r}, this project runs 'qwen2_5_vl' checkpoints")
    # transformers 5 nests the text fields under text_config; 4.x writes them at top level
    text_raw = {**raw, **raw.get("text_config", {})}
    rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
    tie = raw.get("tie_word_embeddings", False) or text_raw.get("tie_word_embeddings", False)
    text = _pick(
        TextConfig,
        text_raw,
        rope_theta=rope.get("rope_theta", text_raw.get("rope_theta", 1e6)),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        tie_word_embeddings=bool(tie),
    )
    if 2 * sum(text.mrope_section) != text.head_dim:
        raise ValueError(f"{path}: mrope_section {list(text.mrope_section)} must sum to head_dim/2 = {text.head_dim // 2}")
    vision_raw = raw.get("vision_config", {})
    vision_rope = vision_raw.get("rope_parameters") or {}
    vision = _pick(VisionConfig, vision_raw, rope_theta=vision_rope.get("rope_theta", 10000.0))
    dtype = raw.get("dtype") or raw.get("torch_dtype") or text_raw.get("torch_dtype") or "bfloat16"
    return _pick(ModelConfig, raw, text=text, vision=vision, dtype=dtype)


def model_identity(model_dir) -> str:
    """A digest of what makes two workers' answers agree: config.json and each tensor file's size, header and first and
    last MiB (random or trained weights of one shape differ there). The front end refuses a worker whose model's
    digest is not its own."""
    d = Path(model_dir)
    h = hashlib.sha256((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            h.update(f"{f.name}:{size}".encode())
            h.update(fh.read(2**20))
            fh.seek(max(0, size - 2**20))
            h.update(fh.read(2**20))
    return h.hexdigest()[:16]
