"""The Qwen2.5-VL tokenizer and chat template as the front end and the LLM worker use them at runtime (only
`tokenizers` and `jinja2`)."""

import json
import uuid
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"

# Qwen2.5's tool-calling chat template (its Instruct models' own: tools in the system turn, calls as <tool_call> JSON,
# results as <tool_response> in a user turn) with Qwen2.5-VL's image and video parts and default system prompt. Used
# for a request with tools, tool calls or tool results when the checkpoint's own template does not render tools (the
# Qwen2.5-VL Instruct template does not).
TOOLS_CHAT_TEMPLATE = """
{%- macro render(content) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for part in content %}
            {%- if part.type == 'image' %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif part.type == 'video' %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif part.type == 'text' %}
                {{- part.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}
    {{- render(messages[0].content) }}
{%- else %}
    {{- 'You are a helpful assistant.' }}
{%- endif %}
{%- if tools %}
    {{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with '
        'function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
        '<args-json-object>}\\n</tool_call>' }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + render(message.content) + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- elif message.role == 'assistant' and message.tool_calls %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + render(message.content) }}
        {%- endif %}
        {%- for call in message.tool_calls %}
            {{- '\\n<tool_call>\\n{\\"name\\": \\"' + call.function.name + '\\", \\"arguments\\": ' + call.function.arguments
                + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + render(message.content) + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


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
        self._special = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        self._tools_template = compile_chat_template(
            chat_template if chat_template is not None and "tools" in chat_template else TOOLS_CHAT_TEMPLATE)
        self._added = {i: t.content.encode() for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._byte_of = {c: b for b, c in _bytes_to_unicode().items()}

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

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 below this, added (special) tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (byte-level BPE: a piece of a UTF-8 character, maybe); b"" past the vocabulary
        (the embedding rows a model pads its vocabulary with)."""
        if token_id in self._added:
            return self._added[token_id]
        piece = self._tok.id_to_token(token_id)
        return bytes(self._byte_of[c] for c in piece) if piece is not None else b""

    def apply_chat_template(self, messages: list[dict], add_generation_prompt=True, tools: list | None = None) -> str:
        """tools: OpenAI function tools. A conversation with tools, tool calls or tool results is rendered by the
        checkpoint's template if it renders tools, else by TOOLS_CHAT_TEMPLATE."""
        if self._template is None:
            raise ValueError("this checkpoint has no chat template (tokenizer_config.json, chat_template.jinja/.json)")
        messages = [{k: _plain(v) for k, v in m.items() if v is not None} for m in messages]
        agentic = tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        return (self._tools_template if agentic else self._template).render(
            messages=messages, tools=_plain(tools) if tools else None, documents=None,
            add_generation_prompt=add_generation_prompt, **self._special_tokens,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt=True, tools: list | None = None) -> list[int]:
        """The chat template's token ids, where the special tokens are the template's own: a client's text that
        spells one (`<|im_end|>` to fake a turn, `<|image_pad|>` to fake an image) is tokenized as plain text.

        Texts without such strings (nearly all) give exactly what tokenizing the whole rendered prompt gives, as
        transformers does. Otherwise the prompt is rendered with a marker in place of each text, and the pieces
        between markers (the template's) and the texts (the client's) are tokenized apart."""
        structured = json.dumps([tools, [m.get("tool_calls") for m in messages]], ensure_ascii=False)
        if any(token in structured for token in self._special):
            raise ValueError("tools or tool calls spell a special token of this model; only message texts may")
        texts = [t for m in messages for t in _texts(m.get("content"))]
        if not any(token in text for text in texts for token in self._special):
            return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools))
        marker = f"\ue000{uuid.uuid4().hex}\ue001"
        marked = [{**m, "content": _mark(m.get("content"), marker)} for m in messages]
        pieces = self.apply_chat_template(marked, add_generation_prompt, tools).split(marker)
        if len(pieces) != len(texts) + 1:
            raise ValueError("this checkpoint's chat template changes message texts; it cannot keep the special "
                             "tokens a client typed apart from its own")
        ids = self.encode(pieces[0])
        for text, piece in zip(texts, pieces[1:]):
            self._tok.encode_special_tokens = True  # callers use one Tokenizer from one thread
            try:
                ids += self.encode(text)
            finally:
                self._tok.encode_special_tokens = False
            ids += self.encode(piece)
        return ids


def _texts(content) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [p["text"] for p in content or () if isinstance(p, dict) and p.get("type") == "text"]


def _mark(content, marker: str):
    if isinstance(content, str):
        return marker
    return [{**p, "text": marker} if isinstance(p, dict) and p.get("type") == "text" else p for p in content or ()]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character byte-level BPE writes it as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return chars
