"""The OpenAI-compatible HTTP server (`launch.py serve`): POST /v1/chat/completions, streamed or not, GET /v1/models,
GET /health (503 while a worker is not ready) and GET /workers, in front of the visual and LLM worker processes. Media
are fetched within a MediaPolicy, the prompt is built in a thread of its own, bodies past a limit are refused unread.
One thread reads the results socket, hands each event to the asyncio queue of the request it names, and restarts a
worker that died or stopped answering; requests and cancels are sent from the event loop only.

Extensions to OpenAI's request, as vLLM has them: `top_k`, `ignore_eos`; a video part
`{"type": "video_url", "video_url": {"url": <http(s) or data URL, or a file or frame folder under
--allowed-local-media-path>, "fps": 2.0}}`.
"""

import asyncio
import contextlib
import json
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.messages import MAX_NEW_TOKENS, MAX_SEED, Error, Finish, PixelLimits, Result, SamplingParams, TokenEntry
from common.options import Options
from frontend.media import MediaError, MediaPolicy, fetch_image, image_size, read_video
from frontend.pipeline import NoWorker, Pipeline, choose_workers
from frontend.processes import WorkerDied
from frontend.prompt import Prompter
from visual_worker.preprocess import PreprocessConfig

DEFAULT_MAX_TOKENS = 1024  # max_tokens when a request sets none (--default-max-tokens); the context end bounds it too
MAX_BODY_BYTES = 64 * 2**20  # a request body past this is refused with 413 before it is parsed (--max-body-mb)
MAX_REQUEST_PIXELS = 2**27  # all images and video frames of one request, decoded: about 400 MB of RGB
MAX_TEXT_CHARS = 1 << 20  # one text part; the context refuses far less, but this bounds the tokenizer's work


class TextPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ImageURL(BaseModel):
    url: str = Field(max_length=MAX_BODY_BYTES)
    detail: str | None = None  # accepted, not used: images go in at their own resolution within min/max pixels


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    url: str = Field(max_length=MAX_BODY_BYTES)
    fps: float = Field(2.0, gt=0, le=120)


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | list[Part]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's chat request as far as this server honours it. Any other field is refused with a 400 naming it
    (`unsupported_fields`), never dropped; a few are taken at the value that asks for nothing (DEFAULT_ONLY)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Annotated[str, Field(min_length=1, max_length=256)] | list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(None, max_length=16)
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False
    user: str | None = Field(None, max_length=256)  # the caller's label for itself: accepted, as OpenAI's, and unused


# fields OpenAI clients send at values that change nothing: taken at those values, refused at any other
DEFAULT_ONLY = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "response_format": {"type": "text"},
                "tools": [], "tool_choice": "none", "parallel_tool_calls": False, "logit_bias": {}}


def unsupported_fields(req: ChatRequest) -> None:
    """Raises APIError 400 naming the first field this server would otherwise silently ignore."""
    for name, value in (req.model_extra or {}).items():
        if name not in DEFAULT_ONLY or value != DEFAULT_ONLY[name]:
            allowed = f" (only {json.dumps(DEFAULT_ONLY[name])} is)" if name in DEFAULT_ONLY else ""
            raise APIError(400, f"`{name}` is not supported by this server{allowed}: the request is refused rather "
                                "than answered without it", name, "unsupported_parameter")


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


class Router:
    """Reads every result in a thread of its own and puts it on its request's asyncio queue. It also supervises:
    when a worker dies or stops answering, the requests it held get a 503 naming it, the worker is restarted with
    backoff, and new requests are refused with 503 until it is ready again. Nothing a message holds stops it."""

    def __init__(self, pipeline: Pipeline, loop: asyncio.AbstractEventLoop):
        self.pipeline, self.loop = pipeline, loop
        self.queues: dict[str, asyncio.Queue] = {}
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.run, name="results-router", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.closing.is_set():
            try:
                self.pipeline.restart_due()
                batch = self.pipeline.receive(timeout_s=0.2)
            except WorkerDied as e:
                self.worker_died(e)
                continue
            except Exception as e:  # a bug, not input: logged, and the router goes on
                print(f"server: the results router hit {e!r}; going on", file=sys.stderr)
                time.sleep(0.2)
                continue
            if batch:  # a decode step's tokens for every request in one hand-over to the event loop
                self.loop.call_soon_threadsafe(self.deliver, batch)

    def worker_died(self, e: WorkerDied) -> None:
        wait = self.pipeline.restart(e)
        then = "it is not restarted here (it joined by itself)" if wait is None else f"restarting it in {wait:.0f} s"
        print(f"server: {e}; {then}", file=sys.stderr)
        error = WorkerDied(e.worker, f"{e}; the request was lost with it ({then.split(' in ')[0]})")
        lost = self.pipeline.lost(e.worker)  # the requests routed to it (a visual worker's: those with no token yet)
        self.loop.call_soon_threadsafe(self.deliver, [(rid, error) for rid in lost])

    def deliver(self, batch: list[Result | tuple[str, WorkerDied]]) -> None:
        for item in batch:
            rid, event = (item if isinstance(item, tuple) else (item.id, item))
            if (q := self.queues.get(rid)) is not None:
                q.put_nowait(event)

    def check(self) -> None:
        """Raises APIError 503 when the router has stopped or no ready visual and LLM worker are joined."""
        if not self.thread.is_alive():
            raise APIError(503, "the server's results router has stopped")
        health = list(self.pipeline.health.items())
        for role in ("visual", "llm"):
            if not self.pipeline.ready(role):
                states = "; ".join(f"{n} is {h.state}" + (f" ({h.reason})" if h.reason else "")
                                   for n, h in health if h.role == role)
                raise APIError(503, f"no {role} worker is ready: {states}", code="worker_unavailable")
        try:
            choose_workers(dict(health), ())
        except NoWorker as e:  # ready, but no LLM worker subscribed to a visual worker yet (a moment after a start)
            raise APIError(503, str(e), code="worker_unavailable") from None

    def open(self, rid: str) -> asyncio.Queue:
        self.check()
        with self.lock:
            q = self.queues[rid] = asyncio.Queue()
        return q

    def close(self, rid: str) -> None:
        with self.lock:
            self.queues.pop(rid, None)

    def stop(self) -> None:
        self.closing.set()
        self.thread.join()


class Server:
    def __init__(self, pipeline: Pipeline, model_name: str, media: MediaPolicy, default_max_tokens: int,
                 max_media: int, max_request_pixels: int):
        self.pipeline, self.model_name, self.media = pipeline, model_name, media
        self.default_max_tokens, self.max_media = default_max_tokens, max_media
        self.max_request_pixels = max_request_pixels  # decoded pixels of all its media: what the visual worker holds
        self.prompter = Prompter(pipeline.options.model, pipeline.context_len)
        self.text_work = ThreadPoolExecutor(1, thread_name_prefix="prompt")  # one tokenizer, one thread
        self.created = int(time.time())
        self.router: Router | None = None

    def sampling(self, req: ChatRequest) -> SamplingParams:
        """The request's sampling settings, checked by SamplingParams as the LLM worker will check them."""
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            return SamplingParams(
                max_new_tokens=req.max_completion_tokens or req.max_tokens or self.default_max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,  # OpenAI's defaults
                top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, seed=req.seed,
                ignore_eos=req.ignore_eos, stop=tuple(stop))
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def media_part(self, part: ImagePart | VideoPart, index: int) -> tuple[dict, int]:
        """An image or video part → the prompt builder's part holding its bytes or frames, and its decoded pixels."""
        if isinstance(part, ImagePart):
            url = part.image_url.url
            if not url.startswith(("http://", "https://", "data:image/")) and self.media.allowed_local_media_path is None:
                raise APIError(400, f"image {index}: image_url must be an http(s) URL or a data:image/...;base64, URI, "
                                    f"got {url[:40]!r}", "messages")
            try:
                data = await fetch_image(url, self.media)
                width, height = image_size(data, self.media)
            except MediaError as e:
                raise APIError(400, f"image {index}: cannot decode or fetch it: {e}", "messages") from None
            return {"type": "image", "data": data}, width * height
        video = part.video_url
        try:
            frames = await read_video(video.url, video.fps, self.media)
        except MediaError as e:
            raise APIError(400, f"video {index}: cannot read it: {e}", "messages") from None
        return {"type": "video", "frames": frames, "fps": video.fps}, frames.size // 3

    async def to_request(self, req: ChatRequest, rid: str):
        """OpenAI messages → a Request: media fetched (all of a request's at once), then the prompt built in the
        tokenizer's thread."""
        parts = [p for m in req.messages if isinstance(m.content, list) for p in m.content if not isinstance(p, TextPart)]
        if len(parts) > self.max_media:
            raise APIError(400, f"{len(parts)} images and videos in one request; at most {self.max_media} are allowed "
                                "(--max-media-per-request)", "messages")
        count = {ImagePart: 0, VideoPart: 0}
        numbered = []
        for p in parts:
            count[type(p)] += 1
            numbered.append(self.media_part(p, count[type(p)]))
        fetched = await asyncio.gather(*numbered)
        pixels = sum(n for _, n in fetched)
        if pixels > self.max_request_pixels:
            raise APIError(400, f"the request's images and videos hold {pixels} pixels; at most "
                                f"{self.max_request_pixels} are allowed in one request (--max-request-pixels)", "messages")
        fetched = iter(part for part, _ in fetched)
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                     [{"type": "text", "text": p.text} if isinstance(p, TextPart) else next(fetched) for p in m.content]}
                    for m in req.messages]
        sampling = self.sampling(req)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.text_work, lambda: self.prompter.request(messages, sampling,
                                                                                            PixelLimits(), rid))
        except UnicodeEncodeError:
            raise APIError(400, "the messages hold text that is not valid Unicode (a lone surrogate?)",
                           "messages") from None
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None

    def send(self, request) -> None:
        try:
            self.pipeline.submit(request)
        except NoWorker as e:
            raise APIError(503, str(e), code="worker_unavailable") from None

    async def results(self, rid: str, queue: asyncio.Queue):
        """The request's token events, then its finish event; an error raises APIError with the worker's code.
        Leaving early (client gone, worker lost) cancels the request in the workers."""
        done = False
        try:
            while True:
                event = await queue.get()
                if isinstance(event, WorkerDied):
                    raise APIError(503, str(event), code="worker_died")
                if isinstance(event, Error):
                    done = True
                    raise APIError(event.code, event.message)
                done = isinstance(event, Finish)
                yield event
                if done:
                    return
        finally:
            self.router.close(rid)
            if not done:
                self.pipeline.cancel(rid)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(400, f"model {model!r} is not served here; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    async def chat(self, req: ChatRequest):
        unsupported_fields(req)
        self.check_model(req.model)
        rid = uuid.uuid4().hex
        self.router.check()
        request = await self.to_request(req, rid)
        queue = self.router.open(rid)
        results = self.results(rid, queue)
        try:
            self.send(request)
            first = await anext(results)  # errors before the first token still get their HTTP status
        except BaseException:
            await results.aclose()
            raise
        head = {"id": f"chatcmpl-{rid}", "created": int(time.time()), "model": self.model_name}
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(self.stream(head, first, results, usage), media_type="text/event-stream")
        text, finish = [], first
        try:
            async for event in _chain(first, results):
                if isinstance(event, TokenEntry):
                    text.append(event.text)
                finish = event
        finally:
            await results.aclose()
        return {**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": None,
            "finish_reason": finish.finish_reason,
        }], "usage": usage_of(finish)}

    async def stream(self, head: dict, first, results, include_usage: bool):
        """Server-sent events in the shape of OpenAI's chat.completion.chunk, one for every generated token (its text
        may be empty: a partial character, text held back for a stop string), as vLLM does, so inter-token latency is
        measured per token; then the usage chunk if asked, then `data: [DONE]`."""
        extra = {"usage": None} if include_usage else {}  # OpenAI: usage is null on all but the last chunk

        def event(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        def chunk(delta: dict, finish_reason=None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return event({**head, "object": "chat.completion.chunk", **extra, "choices": [choice]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for item in _chain(first, results):
                if isinstance(item, TokenEntry):
                    yield chunk({"content": item.text})
                elif isinstance(item, Finish):
                    yield chunk({}, item.finish_reason)
                    if include_usage:
                        yield event({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage_of(item)})
        except APIError as e:  # after the first token: the status line has gone out already
            yield event(e.body())
        finally:
            await results.aclose()
        yield "data: [DONE]\n\n"


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the request's body has been read: the next ASGI message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def usage_of(finish: Finish) -> dict:
    p, c = finish.prompt_tokens, finish.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class BodyLimit:
    """ASGI middleware: reads a request's body first, and answers 413 unread past max_bytes (declared or streamed);
    the app then gets the body as one message, and the connection's later messages (a disconnect) as they come."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self.refuse(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was whole
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self.refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        whole = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay():
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, scope, receive, send):
        error = APIError(413, f"the request body is larger than the {self.max_bytes / 2**20:g} MiB allowed")
        await error.response()(scope, receive, send)


def create_app(pipeline: Pipeline, model_name: str, media: MediaPolicy = MediaPolicy(),
               default_max_tokens: int = DEFAULT_MAX_TOKENS, max_media: int = 16,
               max_request_pixels: int = MAX_REQUEST_PIXELS, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app over a Pipeline whose workers are ready."""
    server = Server(pipeline, model_name, media, default_max_tokens, max_media, max_request_pixels)

    async def lifespan(app):
        server.router = Router(pipeline, asyncio.get_running_loop())
        yield
        server.router.stop()

    app = FastAPI(title="Qwen2.5-VL disaggregated", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return APIError(e.status_code, message.get(e.status_code, str(e.detail))).response()

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):  # a bug: logged, answered without its internals
        print(f"server: {request.url.path}: {e!r}", file=sys.stderr)
        return APIError(500, "internal server error").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0]
        if first["type"] == "json_invalid":
            return APIError(400, "the request body is not valid JSON").response()
        where = ".".join(str(x) for x in first["loc"] if x != "body")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return APIError(400, f"{where}: {first['msg']}{more}", where or None).response()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either prompt or messages", "prompt")
        if req.messages is not None and any(isinstance(m.content, list) and any(not isinstance(p, TextPart)
                                                                                 for p in m.content)
                                            for m in req.messages):
            raise APIError(400, "/tokenize takes text only: an image or video counts as its own tokens once seen",
                           "messages")
        tokenizer = server.prompter.tokenizer
        if req.prompt is not None:
            work = lambda: tokenizer.encode(req.prompt)  # noqa: E731
        else:
            messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                         [{"type": "text", "text": p.text} for p in m.content]} for m in req.messages]
            work = lambda: tokenizer.encode_chat(messages, req.add_generation_prompt)  # noqa: E731
        try:
            ids = await asyncio.get_running_loop().run_in_executor(server.text_work, work)
        except UnicodeEncodeError:
            raise APIError(400, "the text is not valid Unicode (a lone surrogate?)", "prompt") from None
        return {"count": len(ids), "max_model_len": server.prompter.context_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        server.check_model(req.model)
        tokenizer = server.prompter.tokenizer
        if req.tokens and max(req.tokens) >= tokenizer.vocab_size:
            raise APIError(400, f"token {max(req.tokens)} is past this model's vocabulary of {tokenizer.vocab_size}",
                           "tokens")
        text = await asyncio.get_running_loop().run_in_executor(server.text_work,
                                                                lambda: tokenizer.decode(req.tokens, False))
        return {"prompt": text}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        """Answers, or gives up when the client goes away first (its request is then cancelled in the workers); once
        a stream has begun, StreamingResponse watches for that itself."""
        answer = asyncio.ensure_future(server.chat(req))
        gone = asyncio.ensure_future(client_gone(request))
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if answer.done():
            return answer.result()
        answer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await answer
        return Response(status_code=499)  # "client closed request"; no one is there to read it

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "qwen-vl-disagg"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"model {model_id!r} is not served here; this server serves {model_name!r}", "model",
                           "model_not_found")
        return {"id": model_name, "object": "model", "created": server.created, "owned_by": "qwen-vl-disagg"}

    image = PreprocessConfig.from_dir(pipeline.options.model)
    page_server = json.dumps({"model": model_name, "factor": image.patch_size * image.merge_size,
                              "min_pixels": image.min_pixels, "max_pixels": image.max_pixels})
    page = (Path(__file__).parent / "static" / "chat.html").read_text().replace("{{server}}",
                                                                                page_server.replace("<", "\\u003c"))

    @app.get("/")
    async def chat_page():
        """The web chat page (frontend/static/chat.html), given the model's name and image resize rule."""
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        server.router.check()
        return {"status": "ok"}

    @app.get("/workers")
    async def workers():
        """Each worker's state as the front end sees it."""
        now = time.monotonic()
        started = pipeline.workers.workers
        return {name: {"role": h.role, "state": h.state, "device": h.device, "pid": h.pid,
                       "busy_s": round(h.busy_s, 3), "served": h.served, "subscribers": list(h.subscribers),
                       "heartbeat_age_s": round(now - h.last_heartbeat, 3) if h.last_heartbeat else None,
                       "reason": h.reason, "started_here": h.started_here,
                       "restarts": started[name].restarts if name in started else 0,
                       "last_failures": started[name].log if name in started else []}
                for name, h in list(pipeline.health.items())}

    return app


def serve_options(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this host only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="model id clients must name (default: the model directory's name)")
    p.add_argument("--default-max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="max_tokens of a request that sets none")
    p.add_argument("--max-media-per-request", type=int, default=16, help="images and videos in one request")
    p.add_argument("--max-request-pixels", type=int, default=MAX_REQUEST_PIXELS,
                   help="decoded pixels of all images and video frames of one request")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY_BYTES / 2**20, help="largest request body")
    p.add_argument("--allowed-local-media-path", type=Path,
                   help="image and video URLs may name files under this folder (default: no local files)")
    p.add_argument("--allowed-media-domains", default="",
                   help="comma-separated hosts media URLs may name (default: any public host)")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let media URLs reach loopback, private and link-local addresses")
    p.add_argument("--media-timeout-s", type=float, default=MediaPolicy.fetch_timeout_s,
                   help="deadline for fetching and decoding one image or video")


def serve(args) -> int:
    options = Options.from_args(args)
    options.check()
    media = MediaPolicy(allowed_local_media_path=args.allowed_local_media_path,
                        allowed_media_domains=tuple(d for d in args.allowed_media_domains.split(",") if d),
                        allow_private_urls=args.allow_private_urls, fetch_timeout_s=args.media_timeout_s)
    pipeline = Pipeline(options)
    try:
        pipeline.start()
        if started := tuple(r for r in ("visual", "llm") if getattr(options, f"{r}_workers")):
            pipeline.wait_ready(started)
        if len(started) < 2:
            e = pipeline.endpoints
            print(f"workers started by hand join with --requests {e.requests} --results {e.results} --control "
                  f"{e.control}", file=sys.stderr)
        name = args.served_model_name or Path(options.model).resolve().name
        app = create_app(pipeline, name, media, args.default_max_tokens, args.max_media_per_request,
                         args.max_request_pixels, int(args.max_body_mb * 2**20))
        print(f"serving {name!r} on http://{args.host}:{args.port}/v1 (chat page: http://{args.host}:{args.port}/)",
              file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return 0
    finally:
        pipeline.close()
