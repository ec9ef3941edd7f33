"""The demo model's shape: a small Qwen2.5-VL (TEXT, VISION) with the real vocabulary and the preprocessing its
checkpoint declares; built fresh from a seed or from a saved checkpoint, and saved in Hugging Face layout, bfloat16."""

import copy
import json
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from examples.tokenizer_files import build_qwen_tokenizer_files
from visual_worker.preprocess import PreprocessConfig

IM_END, PAD, IMAGE_PAD = 151645, 151643, 151655  # Qwen's <|im_end|>, <|endoftext|>, <|image_pad|>
PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    "min_pixels": 224 * 224, "max_pixels": 280 * 280,  # any image is seen at the scale of the task images
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}
PREPROCESS = PreprocessConfig(**{k: PREPROCESSOR[k] for k in ("min_pixels", "max_pixels")})  # as the workers read it
TEXT = dict(
    vocab_size=151936, hidden_size=64,  # 151936 x 64 bf16 = 19.4 MB, tied: the bulk of the checkpoint
    intermediate_size=256, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
    # head_dim 32: 16 rotary frequencies from 1 down to 0.003 (theta 500); time takes the 2 fastest, rows the next
    # 3 (0.46-0.21 rad a cell), columns the other 11 (0.14 down to 0.003). A column or row turns enough to be told
    # from its neighbours, and the slowest column frequencies barely turn across a prompt, so an answer can find an
    # image token by its content however far back it is. (At Qwen's theta 1e6, columns would barely turn at all;
    # at a small theta every frequency would turn too fast to match content across a long prompt.)
    rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 11], "rope_theta": 500.0},
    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=IM_END,
)
VISION = dict(
    depth=4, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=64,
    fullatt_block_indexes=[1, 3], window_size=112, tokens_per_second=2,  # blocks 0 and 2 attend within windows
)
INIT_STD = 0.05  # transformers' 0.02 is made for wide models: at width 64 the image barely moves the answer at first


def build_model(seed: int, init: Path | None = None) -> Qwen2_5_VLForConditionalGeneration:
    """Fresh weights from `seed`, or the weights of the checkpoint `init` (to train on from a saved step)."""
    torch.manual_seed(seed)
    if init is not None:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    else:
        config = Qwen2_5_VLConfig(text_config={**TEXT, "initializer_range": INIT_STD}, tie_word_embeddings=True,
                                  vision_config={**VISION, "initializer_range": INIT_STD}, initializer_range=INIT_STD)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.set_attn_implementation("eager")  # training reads the attention weights (the taught heads' losses)
    return model


def save(model: Qwen2_5_VLForConditionalGeneration, out: Path) -> None:
    """The checkpoint in Hugging Face layout, bfloat16 (the model in training is left as it is)."""
    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out)
    GenerationConfig(bos_token_id=151643, eos_token_id=[IM_END, 151643], do_sample=False).save_pretrained(out)
    build_qwen_tokenizer_files(out)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
