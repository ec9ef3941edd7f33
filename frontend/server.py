"""The OpenAI-compatible HTTP server (`launch.py serve`): POST /v1/chat/completions, streamed or not, GET /v1/models
and GET /health, in front of the visual and LLM worker processes. One thread reads the results socket and hands each
message to the asyncio queue of the request it names; requests and cancels are sent from the event loop only.

Extensions to OpenAI's request, as vLLM has them: `top_k`, `ignore_eos`; a video part
`{"type": "video_url", "video_url": {"url": <video file or folder of frames, on this host>, "fps": 2.0}}`.
"""

import asyncio
import contextlib
import json
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated, Literal

import torch
import uvicorn
import zmq
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from common.protocol import Message, ProtocolError
from frontend.client import Frontend, WorkerDied, fetch, read_video
from llm_worker.engine import SamplingParams

UNTIL_CONTEXT_END = 2**31 - 1  # max_new_tokens when the request sets none: the LLM worker stops at the context's end


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # accepted, not used: images go in at their own resolution within min/max pixels


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    url: str
    fps: float = Field(2.0, gt=0)


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class Router:
    """Reads every result message in a thread of its own and puts it on its request's asyncio queue; when a worker
    dies, every open request gets the WorkerDied error and new ones are refused."""

    def __init__(self, front: Frontend, loop: asyncio.AbstractEventLoop):
        self.front, self.loop = front, loop
        self.queues: dict[str, asyncio.Queue] = {}
        self.lock = threading.Lock()
        self.dead: WorkerDied | None = None
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self.run, name="results-router", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.closing.is_set():
            try:
                batch = self.front.receive_batch(timeout_s=0.2)
            except WorkerDied as e:
                with self.lock:
                    self.dead, queues = e, list(self.queues.values())
                for q in queues:
                    self.loop.call_soon_threadsafe(q.put_nowait, e)
                return
            except ProtocolError as e:
                print(f"server: a result message broke the protocol: {e}", file=sys.stderr)
                continue
            if batch:  # a decode step's tokens for every request in one hand-over to the event loop
                self.loop.call_soon_threadsafe(self.deliver, batch)

    def deliver(self, batch: list[Message]) -> None:
        for msg in batch:
            if (q := self.queues.get(msg.id)) is not None:
                q.put_nowait(msg)

    def check(self) -> None:
        """Raises WorkerDied when a worker is down."""
        if self.dead is not None:
            raise self.dead
        self.front.workers.check()

    def open(self, rid: str) -> asyncio.Queue:
        with self.lock:
            self.check()
            q = self.queues[rid] = asyncio.Queue()
        return q

    def close(self, rid: str) -> None:
        self.queues.pop(rid, None)

    def stop(self) -> None:
        self.closing.set()
        self.thread.join()


def sampling_fields(req: ChatRequest) -> dict:
    """The request's sampling settings for the LLM worker, checked here by SamplingParams as the worker will."""
    fields = {
        "max_new_tokens": req.max_completion_tokens or req.max_tokens or UNTIL_CONTEXT_END,
        "temperature": 1.0 if req.temperature is None else req.temperature,  # OpenAI's defaults
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": req.top_k or 0,
        "seed": req.seed,
        "ignore_eos": req.ignore_eos,
        "stop": [req.stop] if isinstance(req.stop, str) else list(req.stop or []),
    }
    try:
        SamplingParams(**fields)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return fields


async def media(part: ImagePart | VideoPart, index: int) -> tuple[dict, tuple[dict, torch.Tensor]]:
    """An image or video part → its Hugging Face content part and the tensor that carries it."""
    if isinstance(part, ImagePart):
        url = part.image_url.url
        if not url.startswith(("http://", "https://", "data:image/")):
            raise APIError(400, f"image {index}: image_url must be an http(s) URL or a data:image/...;base64, URI, "
                                f"got {url[:40]!r}", "messages")
        try:
            data = await asyncio.to_thread(fetch, url)
        except (ValueError, OSError) as e:  # bad base64, bad URI, unreachable or failing URL
            raise APIError(400, f"image {index}: cannot fetch {url[:60]!r}: {e}", "messages") from None
        if not data:
            raise APIError(400, f"image {index}: {url[:60]!r} holds no bytes", "messages")
        return {"type": "image"}, ({"name": "image"}, torch.frombuffer(bytearray(data), dtype=torch.uint8))
    video = part.video_url
    try:
        frames = await asyncio.to_thread(read_video, video.url, video.fps)
    except Exception as e:  # anything PyAV or PIL raise on the user's file is bad input
        raise APIError(400, f"video {index}: cannot read {video.url[:60]!r}: {e}", "messages") from None
    return {"type": "video", "fps": video.fps}, ({"name": "video"}, torch.from_numpy(frames))


async def to_request(req: ChatRequest, rid: str) -> Message:
    """OpenAI messages → a request message: parts become Hugging Face parts the chat template knows, in order."""
    messages, tensors, count = [], [], {ImagePart: 0, VideoPart: 0}
    for m in req.messages:
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        content = []
        for part in m.content:
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
                continue
            count[type(part)] += 1
            hf_part, tensor = await media(part, count[type(part)])
            content.append(hf_part)
            tensors.append(tensor)
        messages.append({"role": m.role, "content": content})
    return Message("request", rid, {"messages": messages, "sampling": sampling_fields(req)}, tensors)


class Server:
    def __init__(self, front: Frontend, model_name: str):
        self.front, self.model_name = front, model_name
        self.created = int(time.time())
        self.router: Router | None = None

    def send(self, msg: Message) -> None:
        try:
            self.front.requests.send_multipart(msg.encode(), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise APIError(503, "the visual worker is not taking requests") from None

    async def results(self, rid: str, queue: asyncio.Queue):
        """The request's token messages, then its finish message; an error message raises APIError with the
        worker's code. Leaving early (client gone) cancels the request in the workers."""
        done = False
        try:
            while True:
                msg = await queue.get()
                if isinstance(msg, WorkerDied):
                    done = True
                    raise APIError(503, str(msg))
                if msg.type == "error":
                    done = True
                    raise APIError(msg.fields["code"], msg.fields["message"])
                done = msg.type == "finish"
                yield msg
                if done:
                    return
        finally:
            self.router.close(rid)
            if not done:
                try:
                    self.send(Message("cancel", rid, {}))
                except APIError:
                    pass  # the workers are gone: nothing to cancel

    async def chat(self, req: ChatRequest):
        if req.model != self.model_name:
            raise APIError(400, f"model {req.model!r} is not served here; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        rid = uuid.uuid4().hex
        msg = await to_request(req, rid)
        try:
            queue = self.router.open(rid)
        except WorkerDied as e:
            raise APIError(503, str(e)) from None
        results = self.results(rid, queue)
        try:
            self.send(msg)
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
            async for msg in _chain(first, results):
                text.append(msg.fields.get("text", ""))
                finish = msg
        finally:
            await results.aclose()
        return {**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": "".join(text)}, "logprobs": None,
            "finish_reason": finish.fields["finish_reason"],
        }], "usage": usage_of(finish)}

    async def stream(self, head: dict, first: Message, results, include_usage: bool):
        """Server-sent events in the shape of OpenAI's chat.completion.chunk, then `data: [DONE]`."""
        extra = {"usage": None} if include_usage else {}  # OpenAI: usage is null on all but the last chunk

        def event(body: dict) -> str:
            return f"data: {json.dumps(body)}\n\n"

        def chunk(delta: dict, finish_reason=None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return event({**head, "object": "chat.completion.chunk", **extra, "choices": [choice]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for msg in _chain(first, results):
                if msg.type == "token" and msg.fields["text"]:
                    yield chunk({"content": msg.fields["text"]})
                elif msg.type == "finish":
                    yield chunk({}, msg.fields["finish_reason"])
                    if include_usage:
                        yield event({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage_of(msg)})
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


def usage_of(finish: Message) -> dict:
    p, c = finish.fields["prompt_tokens"], finish.fields["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def create_app(front: Frontend, model_name: str) -> FastAPI:
    """The app over a Frontend whose workers are ready."""
    server = Server(front, model_name)

    async def lifespan(app):
        server.router = Router(front, asyncio.get_running_loop())
        yield
        server.router.stop()

    app = FastAPI(title="Qwen2.5-VL disaggregated", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        if first["type"] == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first['ctx']['error']}").response()
        where = ".".join(str(x) for x in first["loc"] if x != "body")
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        return APIError(400, f"{where}: {first['msg']}{more}", where or None).response()

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

    @app.get("/health")
    async def health():
        try:
            server.router.check()
        except WorkerDied as e:
            return APIError(503, str(e)).response()
        return {"status": "ok"}

    return app


def serve_options(p) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this host only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="model id clients must name (default: the model directory's name)")
    p.add_argument("--max-batch", type=int, default=8, help="requests the LLM worker decodes together")


def serve(args) -> int:
    front = Frontend(args.transport)
    try:
        front.start_workers(args, visual=True, max_batch=args.max_batch)
        front.wait_ready({"visual", "llm"})
        name = args.served_model_name or Path(args.model).resolve().name
        print(f"serving {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr)
        uvicorn.run(create_app(front, name), host=args.host, port=args.port, log_level="warning")
        return 0
    finally:
        front.close()
