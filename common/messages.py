"""Every message between the front end, the visual worker and the LLM worker: one typed class each.

A field typed `Tensor` or `Blob` travels as a raw frame of its own after the msgpack header (common/protocol.py);
every other field is checked against its declared type when a message arrives, nested ones included.

    front end ──Request──▶ visual worker ──Embeds / Cancel / Ping──▶ LLM worker ──Tokens / Finish──▶ front end
    any worker ──Error / Ready / Heartbeat──▶ front end;  front end ──Cancel──▶ visual worker (→ LLM worker)
    front end ──Alive──▶ every worker (its control socket)

With many workers of each kind, a Request names the LLM worker the front end chose for it (the visual worker
publishes its Embeds under that name), and every message to the front end comes after a frame naming its sender
(common/protocol.py).
"""

from typing import Annotated, Literal

from msgspec import Meta, Struct
from torch import Tensor

Count = Annotated[int, Meta(ge=0, le=2**31 - 1)]
WorkerName = Annotated[str, Meta(pattern=r"^(visual|llm)-[A-Za-z0-9_.-]{1,64}$")]  # role-instance: visual-0, llm-1
LLMName = Annotated[str, Meta(pattern=r"^llm-[A-Za-z0-9_.-]{1,64}$")]
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Grid = tuple[Annotated[int, Meta(ge=1, le=2**16)], Annotated[int, Meta(ge=1, le=2**16)], Annotated[int, Meta(ge=1, le=2**16)]]
MAX_NEW_TOKENS = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs
MAX_LOGIT_BIAS = 1024  # tokens one request may bias
MAX_GRAMMAR_CHARS = 1 << 20


class Blob:
    """Opaque bytes (an encoded image) that travel as a frame of their own, not inside the header."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = memoryview(data).cast("B")

    def __bytes__(self) -> bytes:
        return bytes(self.data)

    def __len__(self) -> int:
        return self.data.nbytes

    def __eq__(self, other) -> bool:
        return isinstance(other, Blob) and self.data == other.data


class SamplingParams(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """How one request samples; checked here, at construction and on arrival, so no worker meets a value it cannot
    sample with."""

    max_new_tokens: Annotated[int, Meta(ge=1, le=MAX_NEW_TOKENS)] = 64
    temperature: Annotated[float, Meta(ge=0, le=MAX_TEMPERATURE)] = 0.0  # 0 = greedy; the OpenAI API allows 0..2
    top_p: Annotated[float, Meta(gt=0, le=1)] = 1.0
    top_k: Count = 0  # 0 = no limit
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks ask for exact output lengths)
    stop: tuple[Annotated[str, Meta(min_length=1, max_length=256)], ...] = ()  # strings that end the text
    frequency_penalty: Annotated[float, Meta(ge=-2, le=2)] = 0.0  # OpenAI's: times a token's count in the output
    presence_penalty: Annotated[float, Meta(ge=-2, le=2)] = 0.0  # once for any token already in the output
    repetition_penalty: Annotated[float, Meta(gt=0, le=MAX_REPETITION_PENALTY)] = 1.0  # transformers': prompt and output
    logit_bias: dict[TokenId, Annotated[float, Meta(ge=-100, le=100)]] = {}  # added to those tokens' logits
    logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # each token's, with this many top ones
    grammar: Annotated[str, Meta(max_length=MAX_GRAMMAR_CHARS)] | None = None  # llguidance's: what the text must match

    def __post_init__(self):
        # msgspec checks the Meta bounds on decode only; these checks also cover objects built in Python
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {list(self.stop)!r}")
        if len(self.stop) > 16:
            raise ValueError(f"at most 16 stop strings, got {len(self.stop)}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # NaN fails this too
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= 2**31 - 1:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}], got {self.repetition_penalty}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS or not all(
                isinstance(t, int) and 0 <= t <= 2**31 - 1 and -100 <= b <= 100 for t, b in self.logit_bias.items()):
            raise ValueError(f"logit_bias maps at most {MAX_LOGIT_BIAS} token ids to biases in [-100, 100]")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs}")
        if self.grammar is not None and len(self.grammar) > MAX_GRAMMAR_CHARS:
            raise ValueError(f"the grammar is longer than {MAX_GRAMMAR_CHARS} characters")

    @property
    def adjusts_logits(self) -> bool:
        """Whether anything but temperature, top-k and top-p stands between the logits and the draw."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.grammar is not None)


class Image(Struct, tag="image", forbid_unknown_fields=True):
    data: Blob  # the encoded file (PNG, JPEG, ...), decoded by the visual worker


class Video(Struct, tag="video", forbid_unknown_fields=True):
    frames: Tensor  # (T, H, W, 3) uint8, sampled at fps
    fps: Annotated[float, Meta(gt=0, le=120)]


class PixelLimits(Struct, frozen=True, forbid_unknown_fields=True):
    """Per-request bounds on the resized image area (Qwen's min_pixels / max_pixels); None: the checkpoint's."""

    min_pixels: Annotated[int, Meta(ge=1)] | None = None
    max_pixels: Annotated[int, Meta(ge=1)] | None = None


class Request(Struct, tag="request", forbid_unknown_fields=True):
    """Front end → visual worker. prompt_ids hold one <|image_pad|> / <|video_pad|> per media item, in order."""

    id: str
    prompt_ids: list[TokenId]
    media: list[Image | Video]
    sampling: SamplingParams
    pixels: PixelLimits = PixelLimits()
    max_prompt_tokens: Count = MAX_NEW_TOKENS  # refused before the ViT when the expanded prompt is longer
    llm: LLMName = "llm-0"  # the LLM worker that decodes it


class Chunk(Struct, array_like=True, forbid_unknown_fields=True):
    kind: Literal["image", "video"]
    index: Count  # its place along the hidden dimension: columns index * width ...
    data: Tensor  # (rows, width or the remainder)


class Embeds(Struct, tag="embeds", forbid_unknown_fields=True):
    """Visual worker → LLM worker: the request's prompt (one pad per media item) and its vision embeddings, split
    along the hidden dimension into chunk_width-wide chunks."""

    id: str
    prompt_ids: list[TokenId]
    image_grid_thw: list[Grid]
    video_grid_thw: list[Grid]
    second_per_grid_ts: list[Annotated[float, Meta(gt=0)]]
    sampling: SamplingParams
    hidden: Annotated[int, Meta(ge=1)]
    chunk_width: Annotated[int, Meta(ge=1)]
    dtype: Literal["float32", "bfloat16", "float16"]
    chunks: list[Chunk]
    timings: dict[str, float] = {}


class Logprob(Struct, array_like=True, forbid_unknown_fields=True):
    """A generated token's log-probability under the model (log-softmax of its raw logits, float32), and the most
    likely tokens' at that step when asked for."""

    logprob: float
    top: list[tuple[TokenId, float]] = []


class TokenEntry(Struct, array_like=True, forbid_unknown_fields=True):
    """One request's share of a decode step: its new token ids, the text that may be shown now, and with
    SamplingParams.logprobs set, each new token's Logprob."""

    id: str
    token_ids: list[TokenId]
    text: str
    logprobs: list[Logprob] = []


class Tokens(Struct, tag="tokens", forbid_unknown_fields=True):
    """LLM worker → front end, one per decode step for every request that got a token (a batch of 8 is one message)."""

    requests: list[TokenEntry]


class Finish(Struct, tag="finish", forbid_unknown_fields=True):
    id: str
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: Count
    completion_tokens: Count
    timings: dict[str, float] = {}


class Error(Struct, tag="error", forbid_unknown_fields=True):
    id: str
    message: str
    code: Literal[400, 500, 503]  # 400: the request was at fault; 500: the pipeline was; 503: a worker is down


class Ready(Struct, tag="ready", forbid_unknown_fields=True):
    """Worker → front end once it can serve: what it is, so that the front end admits it or refuses it."""

    model: str  # common/checkpoint.py model_identity: a worker of another model is refused
    device: str
    capacity: Count = 1  # requests it works on at once (the LLM worker's batch rows)
    context_len: Count = 0  # the LLM worker's tokens per request (prompt + output)
    embeds: str = ""  # a visual worker's: the endpoint its embeddings are published on, for the LLM workers


class Heartbeat(Struct, tag="heartbeat", forbid_unknown_fields=True):
    """Worker → front end every HEARTBEAT_S from a thread of its own: the process is alive and not stopped; busy_s
    is how long its loop has been inside one piece of work (a stuck worker's grows without end). A visual worker
    names the LLM workers subscribed to its embeddings: the front end pairs a request's workers only among those."""

    pid: Count
    busy_s: Annotated[float, Meta(ge=0)] = 0.0
    subscribers: list[LLMName] = []


class Alive(Struct, tag="alive", forbid_unknown_fields=True):
    """Front end → every worker on its control socket every HEARTBEAT_S from a thread of its own: a worker that hears
    none for FRONTEND_SILENT_S drops the requests it holds rather than compute answers nobody reads. `embeds` are the
    visual workers' endpoints, which every LLM worker subscribes to."""

    pid: Count
    embeds: list[str] = []


class Ping(Struct, tag="ping", forbid_unknown_fields=True):
    """Visual worker → LLM worker while idle: PUB/SUB drops what is sent before a subscription, so the LLM worker
    reports ready only once one has arrived."""


class Cancel(Struct, tag="cancel", forbid_unknown_fields=True):
    """Front end → visual worker → LLM worker, in order behind the request it names."""

    id: str
    llm: LLMName = "llm-0"


Message = Request | Embeds | Tokens | Finish | Error | Ready | Heartbeat | Alive | Ping | Cancel
Result = TokenEntry | Finish | Error  # what the front end hands a request's reader, one per event
HEARTBEAT_S = 0.5
FRONTEND_SILENT_S = 10.0
