"""OpenAI's chat request as this server takes it, and what it becomes on the way in and out: the request models
(every field honoured or refused with a 400 naming it), the error shape, the grammar a request's response_format or
forced tool call compiles to (llguidance), and the <tool_call> blocks of Qwen2.5's answers parsed back into OpenAI's
tool_calls, all at once or as a stream."""

import json
import re
import uuid
from typing import Annotated, Literal

import llguidance
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.messages import MAX_LOGIT_BIAS, MAX_NEW_TOKENS, MAX_REPETITION_PENALTY, MAX_SEED, MAX_TOP_LOGPROBS

MAX_BODY_BYTES = 64 * 2**20  # a request body past this is refused with 413 before it is parsed (--max-body-mb)
MAX_TEXT_CHARS = 1 << 20  # one text part; the context refuses far less, but this bounds the tokenizer's work
MAX_N = 16  # choices of one request: each takes a batch row
MAX_TOOLS = 128


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
             413: "invalid_request_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ImageURL(BaseModel):
    url: str = Field(max_length=MAX_BODY_BYTES)
    detail: Literal["auto", "low", "high"] | None = None  # taken, not used: mm_processor_kwargs set the resolution


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL | Annotated[str, Field(max_length=MAX_BODY_BYTES)]  # vLLM takes the URL bare too

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


class VideoURL(BaseModel):
    url: str = Field(max_length=MAX_BODY_BYTES)
    fps: float | None = Field(None, gt=0, le=120)  # frames sampled a second (default: mm_processor_kwargs.fps, 2)


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]
Content = Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | list[Part]


class CalledFunction(BaseModel):
    name: str = Field(max_length=256)
    arguments: str = Field(max_length=MAX_TEXT_CHARS)  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    """developer is OpenAI's newer name for system; an assistant turn may hold tool calls and no content; a tool
    turn answers a tool call."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(None, max_length=256)
    name: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def check(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content (only an assistant turn with tool_calls may "
                             "have none)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages hold tool_calls")
        for call in self.tool_calls or ():
            try:
                json.loads(call.function.arguments)
            except ValueError:
                raise ValueError(f"tool call {call.id!r}: arguments must be JSON text") from None
        return self

    def template_dict(self, content) -> dict:
        """The message as the chat template takes it (content already turned into the prompt builder's parts)."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


class StreamOptions(BaseModel):
    include_usage: bool = False


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    parameters: dict | None = None  # a JSON schema
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(max_length=256)
    description: str | None = None
    json_schema: dict = Field(default_factory=dict, alias="schema")  # no schema: any JSON object
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class MMProcessorKwargs(BaseModel):
    """vLLM's per-request knobs of the Hugging Face processor: Qwen's resized-area bounds, and video frames a second."""

    model_config = ConfigDict(extra="forbid")
    min_pixels: int | None = Field(None, ge=1, le=2**31 - 1)
    max_pixels: int | None = Field(None, ge=1, le=2**31 - 1)
    fps: float | None = Field(None, gt=0, le=120)


Stop = Annotated[str, Field(min_length=1, max_length=256)]


class Sampling(BaseModel):
    """The fields the chat and completions requests share: how to sample, how much, and how to answer."""

    model_config = ConfigDict(extra="allow")
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Stop | list[Stop] | None = Field(None, max_length=16)
    n: int = Field(1, ge=1, le=MAX_N)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    ignore_eos: bool = False
    user: str | None = Field(None, max_length=256)  # the caller's label for itself: accepted, as OpenAI's, and unused

    def logit_bias_ids(self, vocab: int) -> dict[int, float]:
        out = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab:
                raise APIError(400, f"logit_bias keys are token ids below {vocab}, got {key!r}", "logit_bias")
            out[int(key)] = bias
        return out


class CompletionRequest(Sampling):
    """OpenAI's legacy completions: a prompt continued as it is, no chat template. `echo` puts the prompt before the
    answer; `logprobs` is how many top tokens to report with each one's (OpenAI allows 5)."""

    prompt: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)] | \
        Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1, max_length=1 << 20)]
    max_tokens: int | None = Field(16, ge=1, le=MAX_NEW_TOKENS)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @model_validator(mode="after")
    def check(self):
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs asks for the prompt's log-probabilities, which this server does not "
                             "compute; send one of them")
        return self


class ChatRequest(Sampling):
    """OpenAI's chat request (and vLLM's extensions top_k, repetition_penalty, ignore_eos, mm_processor_kwargs). Any
    other field is refused with a 400 naming it (`unsupported_fields`), never dropped; a few are taken at the value
    that asks for nothing (DEFAULT_ONLY)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    mm_processor_kwargs: MMProcessorKwargs | None = None

    @model_validator(mode="after")
    def check(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice names a tool call but the request has no tools")
        if isinstance(self.tool_choice, NamedToolChoice) and \
                self.tool_choice.function.name not in {t.function.name for t in self.tools}:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools")
        if self.forced_tool is not None and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("a forced tool call (tool_choice required or named) and response_format both constrain "
                             "the output; give one")
        return self

    @property
    def tools_on(self) -> bool:
        """The tools are shown to the model and its <tool_call> blocks parsed (tool_choice none hides them)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tool(self) -> list[Tool] | None:
        """The tools one of which the answer must call (tool_choice required or named), else None."""
        if self.tool_choice == "required":
            return self.tools
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == self.tool_choice.function.name]
        return None


# fields OpenAI clients send at values that change nothing: taken at those values, refused at any other
DEFAULT_ONLY = {"store": False, "modalities": ["text"], "service_tier": "auto", "metadata": {}}


def unsupported_fields(req: BaseModel) -> None:
    """Raises APIError 400 naming the first field this server would otherwise silently ignore."""
    for name, value in (req.model_extra or {}).items():
        if name not in DEFAULT_ONLY or value != DEFAULT_ONLY[name]:
            allowed = f" (only {json.dumps(DEFAULT_ONLY[name])} is)" if name in DEFAULT_ONLY else ""
            raise APIError(400, f"`{name}` is not supported by this server{allowed}: the request is refused rather "
                                "than answered without it", name, "unsupported_parameter")


# JSON as OpenAI writes it: ", " and ": " between items, no other whitespace. llguidance's default takes any run of
# whitespace anywhere, which a weak model can fill until max_tokens; a schema's own "x-guidance" overrides this.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar(req: ChatRequest) -> str | None:
    """llguidance's grammar for what the answer must be: a forced tool call in Qwen2.5's <tool_call> format (the
    arguments matching the tool's parameters), or JSON (any object, or one matching a schema); None: free text."""
    if (tools := req.forced_tool) is not None:
        calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                   "arguments": t.function.parameters or {"type": "object"}},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        schema = {"x-guidance": JSON_OPTIONS, **(calls[0] if len(calls) == 1 else {"anyOf": calls})}
        source, param = llguidance.LLMatcher.grammar_from_lark(
            f'start: <tool_call> "\\n" call "\\n" </tool_call>\ncall: %json {json.dumps(schema)}'), "tools"
    elif req.response_format is None or req.response_format.type == "text":
        return None
    elif req.response_format.type == "json_object":
        source = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        param = "response_format"
    else:
        spec = req.response_format.json_schema
        if spec is None:
            raise APIError(400, "response_format json_schema needs its json_schema field", "response_format")
        try:
            source = llguidance.LLMatcher.grammar_from_json_schema(spec.json_schema or {"type": "object"},
                                                                   defaults=JSON_OPTIONS)
        except ValueError as e:
            raise APIError(400, f"response_format: the schema is not usable: {e}", "response_format") from None
        param = "response_format"
    if error := llguidance.LLMatcher.validate_grammar(source):
        raise APIError(400, f"{param}: the schema is not usable: {error.splitlines()[0]}", param)
    return source


TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tool_call(body: str) -> dict | None:
    """The JSON between <tool_call> tags → OpenAI's tool call; None if it is not {"name": ..., "arguments": ...}."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse_tool_calls(text: str, parallel: bool = True) -> tuple[str | None, list[dict]]:
    """A whole answer → (its content outside the well-formed <tool_call> blocks, or None when empty; the calls)."""
    calls, kept, at = [], [], 0
    for m in TOOL_CALL.finditer(text):
        if (call := tool_call(m.group(1))) is not None and (parallel or not calls):
            calls.append(call)
            kept.append(text[at:m.start()])
            at = m.end()
    content = ("".join(kept) + text[at:]).strip() if calls else text
    return content or None, calls


class ToolStream:
    """Streamed text → content deltas and whole tool calls: text from a `<tool_call>` on is held until its
    `</tool_call>`, and a tail that may begin one waits for the next piece."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, parallel: bool = True):
        self.held, self.parallel, self.calls = "", parallel, 0

    def feed(self, text: str, done: bool = False) -> tuple[str, list[dict]]:
        self.held += text
        content, calls = "", []
        while True:
            start = self.held.find(self.OPEN)
            if start < 0:
                keep = 0 if done else next((k for k in range(len(self.OPEN) - 1, 0, -1)
                                            if self.held.endswith(self.OPEN[:k])), 0)
                content += self.held[:len(self.held) - keep]
                self.held = self.held[len(self.held) - keep:]
                break
            end = self.held.find(self.CLOSE, start)
            if end < 0:
                content += self.held[:start]
                self.held = self.held[start:]
                if done:  # an unclosed block is text
                    content, self.held = content + self.held, ""
                break
            call = tool_call(self.held[start + len(self.OPEN):end].strip())
            if call is not None and (self.parallel or not self.calls):
                calls.append(call)
                self.calls += 1
                content += self.held[:start]
            else:
                content += self.held[:end + len(self.CLOSE)]
            self.held = self.held[end + len(self.CLOSE):]
        return content, calls


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or text-only chat messages rendered with the chat template."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=1024)
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    tokens: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(max_length=1 << 20)
